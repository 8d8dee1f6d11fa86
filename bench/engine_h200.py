"""pdserve.LLM on one H200, Llama-3-8B shape, random bf16 weights, against the hardware.

    PYTHONPATH=<dir holding pdserve> python3 bench/engine_h200.py [--requests 1000]

One process, in this order: the two ceilings (HBM copy bandwidth, bf16
matmul rate); transformers ``generate`` on the same architecture (batch 1,
and padded batches of a sample of the trace's requests); then pdserve:
batch-1 decode step vs the weight-read floor, batch 64 at 2,048 tokens of
context vs the weights+KV read limit, one 4,096-token prefill's MFU, an
offline run of the trace's requests, peak memory and KV capacity.

The model dir is made in a temp dir: a Llama-3-8B ``config.json`` and a
word-level tokenizer of 128,256 tokens ("t0" .. "t128255"), so every id the
model can emit decodes. Prompts are random ids; outputs have fixed lengths
(``ignore_eos``). Writes ``engine_h200.json`` to $OUT (or bench/results),
updated after every section, so a run cut short keeps what it measured.
"""

import argparse
import csv
import gc
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from triton.testing import do_bench

from pdserve.bench.common import write_result

TRACE = Path(__file__).resolve().parents[2] / "shared/traces/AzureLLMInferenceTrace_conv_2023.csv"
VOCAB = 128256
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False,
}
RESULT: dict = {}


def save() -> None:
    write_result("engine_h200", RESULT)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_model_dir() -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = Path(tempfile.mkdtemp(prefix="llama3_8b_shape_"))
    (d / "config.json").write_text(json.dumps(CONFIG))
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", bos_token="t1",
                            eos_token="t2").save_pretrained(d)
    return d


def bytes_read_per_step(eng) -> int:
    """Weight bytes a decode step reads: every parameter but the embedding table (a
    step gathers only its rows). Pure."""
    model = eng.model
    return sum(p.numel() * p.element_size() for p in model.parameters()) \
        - model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()


def batch1_llm(max_model_len: int):
    """``pdserve.LLM`` on this model shape with random weights, one sequence at a time
    (only the batch-1 decode graph is captured)."""
    from pdserve import LLM

    return LLM(str(make_model_dir()), extra={"load_format": "dummy"},
               max_model_len=max_model_len, max_num_seqs=1, max_num_batched_tokens=2048)


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 2 GiB device-to-device copy."""
    a = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median") / 1e3
    return 2 * a.numel() * a.element_size() / t


def matmul_rate() -> float:
    """FLOP/s of a bf16 8192^3 matmul on random data."""
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = do_bench(lambda: x @ y, warmup=50, rep=300, return_mode="median") / 1e3
    return 2 * 8192 ** 3 / t


def ceilings() -> tuple[float, float]:
    bw, mm = copy_bandwidth(), matmul_rate()
    torch.cuda.empty_cache()
    return bw, mm


def trace_requests(path: Path, n: int) -> list[tuple[int, int]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))[:n]
    return [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in rows]


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def hf_section(model_dir: Path, sample: list[tuple[int, int]], rng: random.Random) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    try:
        return _hf_runs(hf, sample, rng)
    finally:
        del hf
        gc.collect()
        torch.cuda.empty_cache()


def _hf_runs(hf, sample: list[tuple[int, int]], rng: random.Random) -> dict:
    def gen(prompts: list[list[int]], new: int) -> float:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    out = {}
    p1 = random_prompt(rng, 128)
    gen([p1], 4)  # warm-up
    t = gen([p1], 64)
    out["batch1_prompt128_new64_tok_s"] = 64 / t
    log(f"HF batch 1: {64 / t:.1f} tok/s")
    # Padded batches of the sample, grouped by output length (less padding waste).
    groups = sorted(sample, key=lambda r: r[1])
    useful, elapsed, out_tokens = 0, 0.0, 0
    for i in range(0, len(groups), 16):
        grp = groups[i:i + 16]
        prompts = [random_prompt(rng, c) for c, _ in grp]
        elapsed += gen(prompts, max(g for _, g in grp))
        useful += sum(c + g for c, g in grp)
        out_tokens += sum(g for _, g in grp)
    out["trace_sample"] = {
        "requests": len(sample), "batch": 16, "seconds": elapsed,
        "total_tok_s": useful / elapsed, "output_tok_s": out_tokens / elapsed,
        "note": "HF generate, left-padded batches of 16 grouped by output length; tokens "
                "counted are each request's own prompt + output (padding not credited)"}
    log(f"HF trace sample: {useful / elapsed:.0f} total tok/s over {elapsed:.1f} s")
    return out


def engine_steps(engine, params_list, prompts) -> list[tuple[float, bool, int]]:
    """Run requests to completion; (seconds, pure decode?, requests) per step."""
    base = f"r{time.monotonic_ns()}"
    for i, (p, sp) in enumerate(zip(prompts, params_list, strict=True)):
        engine.add_request(f"{base}-{i}", p, sp)
    steps = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        sched = engine.current_schedule.scheduled
        steps.append((dt, all(s.num_new_tokens == 1 for s in sched), len(sched)))
    return steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--hf-sample", type=int, default=32)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--trace", type=Path, default=TRACE)
    args = ap.parse_args()
    from pdserve import LLM, SamplingParams

    rng = random.Random(0)
    torch.manual_seed(0)
    RESULT["gpu"] = torch.cuda.get_device_name(0)
    RESULT["model"] = {k: CONFIG[k] for k in ("num_hidden_layers", "hidden_size",
                                               "num_attention_heads", "num_key_value_heads",
                                               "intermediate_size", "vocab_size")}
    bw, mm = ceilings()
    RESULT["ceilings"] = {"copy_bandwidth_TB_s": bw / 1e12, "bf16_matmul_TFLOP_s": mm / 1e12}
    log(f"copy {bw / 1e12:.2f} TB/s, matmul {mm / 1e12:.0f} TFLOP/s")
    save()
    model_dir = make_model_dir()
    reqs = trace_requests(args.trace, args.requests)
    sample = random.Random(1).sample(reqs, min(args.hf_sample, len(reqs)))
    if not args.skip_hf:
        RESULT["transformers"] = hf_section(model_dir, sample, rng)
        save()

    t0 = time.perf_counter()
    llm = LLM(str(model_dir), extra={"load_format": "dummy"}, max_model_len=8192,
              max_num_seqs=256, max_num_batched_tokens=8192)
    eng = llm.engine
    startup = time.perf_counter() - t0
    mc = eng.model_config
    weight_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters())
    read_bytes = bytes_read_per_step(eng)
    kv_per_token = eng.kv_spec.bytes_per_token
    graphs = eng.runner.graphs
    RESULT["pdserve_setup"] = {
        "startup_s": startup, "graph_capture_s": graphs.capture_seconds if graphs else None,
        "graph_buckets": list(graphs.buckets) if graphs else [],
        "weight_bytes": weight_bytes, "weight_bytes_read_per_step": read_bytes,
        "kv_bytes_per_token": kv_per_token,
        "kv_pool_tokens": eng.pool.num_blocks * eng.config.block_size,
        "gpu_memory_utilization": eng.config.gpu_memory_utilization,
        "max_num_seqs": 256, "max_num_batched_tokens": 8192, "max_model_len": 8192}
    log(f"pdserve up in {startup:.1f} s; KV pool {RESULT['pdserve_setup']['kv_pool_tokens']} "
        "tokens")
    save()
    greedy = dict(temperature=0, ignore_eos=True, skip_special_tokens=False)

    # batch 1 decode
    steps = engine_steps(eng, [SamplingParams(max_tokens=8, **greedy)],
                         [random_prompt(rng, 128)])  # warm-up
    steps = engine_steps(eng, [SamplingParams(max_tokens=256, **greedy)],
                         [random_prompt(rng, 128)])
    dec = statistics.median(t for t, d, _ in steps if d)
    floor = read_bytes / bw
    RESULT["batch1_decode"] = {
        "prompt": 128, "new_tokens": 256, "step_ms_median": dec * 1e3,
        "tok_s": 1 / dec, "floor_ms": floor * 1e3, "ratio_to_floor": dec / floor,
        "floor_all_weights_ms": weight_bytes / bw * 1e3,
        "ratio_to_floor_all_weights": dec / (weight_bytes / bw),
        "floor_note": "floor = bytes read per step (weights less the embedding table) / "
                      "measured copy bandwidth; KV of <400 tokens is negligible; "
                      "floor_all_weights = every weight byte / the same bandwidth "
                      "(the issue's formula)"}
    log(f"batch 1: {dec * 1e3:.2f} ms/step ({1 / dec:.0f} tok/s), floor {floor * 1e3:.2f} ms, "
        f"ratio {dec / floor:.3f}")
    save()

    # batch 64 at 2,048 tokens of context (prompts 2,016, 64 new: contexts 2,016 .. 2,080)
    steps = engine_steps(eng, [SamplingParams(max_tokens=64, **greedy)] * 64,
                         [random_prompt(rng, 2016) for _ in range(64)])
    full = [t for t, d, n in steps if d and n == 64]
    dec = statistics.median(full)
    kv_read = 64 * 2048 * kv_per_token
    limit_s = (read_bytes + kv_read) / bw
    RESULT["batch64_ctx2048"] = {
        "step_ms_median": dec * 1e3, "tok_s": 64 / dec, "limit_tok_s": 64 / limit_s,
        "ratio_to_limit": limit_s / dec, "kv_bytes_read_per_step": kv_read,
        "full_batch_steps": len(full)}
    log(f"batch 64 x 2048: {64 / dec:.0f} tok/s vs limit {64 / limit_s:.0f} "
        f"({limit_s / dec:.3f}x)")
    save()

    # prefill of one 4,096-token prompt
    times = []
    for _ in range(4):
        steps = engine_steps(eng, [SamplingParams(max_tokens=1, **greedy)],
                             [random_prompt(rng, 4096)])
        times.append(steps[0][0])
    t_pre = statistics.median(times[1:])
    n = 4096
    h, inter, hq, hkv, hd = (mc.hidden_size, mc.intermediate_size, mc.num_heads,
                             mc.num_kv_heads, mc.head_dim)
    linear = h * (hq + 2 * hkv) * hd + hq * hd * h + 3 * h * inter
    flops = 2 * n * linear * mc.num_layers + 2 * h * mc.vocab_size \
        + 4 * mc.num_layers * hq * hd * n * (n + 1) // 2
    RESULT["prefill_4096"] = {
        "seconds_median": t_pre, "flops": flops, "TFLOP_s": flops / t_pre / 1e12,
        "mfu_vs_measured_matmul": flops / t_pre / mm, "all_times_s": times,
        "flops_note": "2*params*tokens for the linears, causal attention 4*L*Hq*D*n(n+1)/2, "
                      "lm_head for the last token only"}
    log(f"prefill 4096: {t_pre * 1e3:.1f} ms, {flops / t_pre / 1e12:.0f} TFLOP/s, "
        f"MFU {flops / t_pre / mm:.3f}")
    save()

    # the trace: the HF sample first (same requests as the baseline), then all of it
    def offline(rows):
        prompts = [random_prompt(rng, c) for c, _ in rows]
        params = [SamplingParams(max_tokens=g, **greedy) for _, g in rows]
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t
        got = sum(len(o.outputs[0].token_ids) for o in outs)
        assert got == sum(g for _, g in rows), "an output came back short"
        total = sum(c + g for c, g in rows)
        return {"requests": len(rows), "seconds": dt, "total_tok_s": total / dt,
                "output_tok_s": got / dt, "prompt_tokens": sum(c for c, _ in rows),
                "output_tokens": got}

    RESULT["pdserve_trace_sample"] = offline(sample)
    if "transformers" in RESULT:
        RESULT["pdserve_trace_sample"]["ratio_vs_transformers"] = (
            RESULT["pdserve_trace_sample"]["total_tok_s"]
            / RESULT["transformers"]["trace_sample"]["total_tok_s"])
    save()
    torch.cuda.reset_peak_memory_stats()
    RESULT["pdserve_trace"] = offline(reqs)
    RESULT["pdserve_trace"]["trace"] = f"{TRACE.name}, first {len(reqs)} rows"
    RESULT["pdserve_trace"]["note"] = (
        "all requests queued at once (offline), prompts of random ids, ignore_eos, "
        "skip_special_tokens=False (the word-level test tokenizer decodes slowly otherwise)")
    if "transformers" in RESULT:
        RESULT["pdserve_trace"]["ratio_vs_transformers_sample"] = (
            RESULT["pdserve_trace"]["total_tok_s"]
            / RESULT["transformers"]["trace_sample"]["total_tok_s"])
    free, total = torch.cuda.mem_get_info()
    RESULT["memory"] = {"peak_allocated_GiB": torch.cuda.max_memory_allocated() / 2 ** 30,
                        "device_used_GiB": (total - free) / 2 ** 30,
                        "device_total_GiB": total / 2 ** 30,
                        "kv_pool_GiB": eng.kv_cache.storage.numel() * 2 / 2 ** 30}
    log(f"trace x{len(reqs)}: {RESULT['pdserve_trace']['total_tok_s']:.0f} total tok/s "
        f"in {RESULT['pdserve_trace']['seconds']:.1f} s")
    save()
    print(json.dumps(RESULT, indent=1))


if __name__ == "__main__":
    main()
