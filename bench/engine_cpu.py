"""pdserve.LLM against transformers ``generate`` on the CPU, same prompts, same weights.

    python -m pdserve.bench.engine_cpu [--new-tokens 64]

Prints output tokens/s of both at batch 1 and batch 8 (mixed prompt lengths) and
the ratio; writes bench/results/engine_cpu.json. For batch 8 it also measures, in
the same run, the GEMM floor of a decode step (``bench.gemm_floor``: the model's
weights, every layer and lm_head, 8 rows, the fastest torch call) beside the step
time that 2x transformers' tokens/s would allow (8 tokens per step, no prefill
counted: an upper bound), so that the JSON shows whether 2x is reachable here.
"""

import argparse
import time

import torch

from pdserve import LLM, SamplingParams
from pdserve.bench import gemm_floor
from pdserve.bench.common import write_result
from pdserve.engine.tokenizer import apply_chat_template

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea and the stars at night.",
    "Explain how a refrigerator works. " * 4,
    "Give me three tips for learning a new language.",
    "Describe the water cycle in detail, step by step. " * 6,
    "Who wrote Hamlet?",
    "What are the benefits of regular exercise for the heart and the mind? " * 3,
    "Summarize the history of the printing press. " * 10,
]


def hf_generate(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return (out.shape[1] - width) * len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    llm = LLM("smollm2-135m", num_blocks=1024)
    hf = AutoModelForCausalLM.from_pretrained(str(llm.engine.model_dir),
                                              dtype=torch.float32).eval()
    prompts = [apply_chat_template(llm.tokenizer, [{"role": "user", "content": q}])
               for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    rows = {}
    for batch in (1, 8):
        group = prompts[:batch] if batch > 1 else [prompts[1]]
        llm.generate(group, params, use_tqdm=False)  # warm-up
        hf_generate(hf, llm.tokenizer, group, 4)
        ours, theirs = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            outs = llm.generate(group, params, use_tqdm=False)
            ours.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t))
            t = time.perf_counter()
            n = hf_generate(hf, llm.tokenizer, group, args.new_tokens)
            theirs.append(n / (time.perf_counter() - t))
        rows[f"batch{batch}"] = {
            "prompt_lens": [len(p) for p in group],
            "pdserve_tok_s": round(max(ours), 2),
            "transformers_tok_s": round(max(theirs), 2),
            "ratio": round(max(ours) / max(theirs), 3),
        }
        print(f"batch {batch}: pdserve {max(ours):.1f} tok/s, transformers {max(theirs):.1f} "
              f"tok/s, ratio {max(ours) / max(theirs):.2f}x", flush=True)
    batch = 8
    floor = gemm_floor.measure(gemm_floor.decode_weights(llm.engine.model), batch)
    needed = 1e3 * batch / (2 * rows["batch8"]["transformers_tok_s"])
    ours = 1e3 * batch / rows["batch8"]["pdserve_tok_s"]
    rows["batch8"].update({
        "pdserve_step_ms": round(ours, 2),  # mean per step, prefill included
        "gemm_floor_step_ms": floor.step_ms,
        "gemm_floor_form": floor.best_form,
        "gemm_floor_forms_ms": dict(floor.form_ms),
        "gemm_floor_num_gemms": floor.num_gemms,
        "step_ms_needed_for_2x": round(needed, 2),
    })
    print(f"batch {batch} ceiling: the {floor.num_gemms} GEMMs of a decode step alone take "
          f"{floor.step_ms:.1f} ms ({floor.best_form}; {dict(floor.form_ms)}); 2x "
          f"transformers needs <= {needed:.1f} ms per step (no prefill counted); "
          f"pdserve: {ours:.1f} ms per step, prefill included", flush=True)
    path = write_result("engine_cpu", {"new_tokens": args.new_tokens,
                                       "torch_threads": torch.get_num_threads(), **rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
