"""L2 prefetch in the decode step's small kernels, swept on one H200 (Llama-3-8B shape).

    PYTHONPATH=<dir holding pdserve> python3 bench/l2_prefetch_h200.py [--mb 0 8 16 ...]

For each budget (MiB per fused kernel, ``EngineConfig.l2_prefetch_mb``) it recaptures
the decode graphs and times the batch-1 and batch-8 graphs replayed back to back
after a greedy run through ``LLMEngine.step`` (128-token prompts, 128 new tokens,
``ignore_eos``; its median step time is kept too), replayed back to back on that
run's last inputs (CUDA events over 50 replays, median of 5 rounds; no L2 flush
between replays, as in serving); checks that the greedy tokens equal the first
budget's; and puts each time beside the weight-read floor (bytes a step reads /
HBM copy bandwidth measured in this run).
Writes ``l2_prefetch_h200.json`` to $OUT (or bench/results).
"""

import argparse
import random
import statistics
import time

import torch

from pdserve.bench.common import write_result
from pdserve.bench.engine_h200 import copy_bandwidth, make_model_dir, random_prompt


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def replay_ms(graphs, b: int, reps: int = 50, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean time of ``reps`` back-to-back replays."""
    graphs.replay_resident(b)  # slots off: no KV written below
    for _ in range(10):
        graphs.replay_resident(b, write_kv=True)
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graphs.replay_resident(b, write_kv=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def decode_run(eng, seed: int, batch: int, new: int = 128) -> tuple[float, list]:
    """``batch`` requests of 128-token prompts (fixed by ``seed``), greedy, ``new`` tokens
    each: (median wall ms of a pure decode step, every request's token ids)."""
    from pdserve import SamplingParams

    rng = random.Random(seed)
    greedy = SamplingParams(temperature=0, ignore_eos=True, skip_special_tokens=False,
                            max_tokens=new)
    prompts = [random_prompt(rng, 128) for _ in range(batch)]
    tokens: dict[str, list[int]] = {}
    base = f"s{seed}-{time.monotonic_ns()}"
    for i, p in enumerate(prompts):
        eng.add_request(f"{base}-{i}", p, greedy)
    steps = []
    while eng.has_unfinished():
        t = time.perf_counter()
        for delta in eng.step():
            tokens.setdefault(delta.request_id, []).extend(delta.new_token_ids)
        steps.append((time.perf_counter() - t,
                      all(s.num_new_tokens == 1 for s in eng.current_schedule.scheduled)))
    return (statistics.median(t for t, pure in steps if pure) * 1e3,
            [tokens[k] for k in sorted(tokens)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, nargs="+", default=[0, 4, 8, 16, 24, 32, 48])
    args = ap.parse_args()
    from pdserve import LLM

    bw = copy_bandwidth()
    log(f"copy {bw / 1e12:.2f} TB/s")
    llm = LLM(str(make_model_dir()), extra={"load_format": "dummy"}, max_model_len=4096,
              max_num_seqs=8, max_num_batched_tokens=4096)
    eng = llm.engine
    read_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters()) \
        - eng.model.embed_tokens.weight.numel() * 2
    floor_ms = read_bytes / bw * 1e3
    decode_run(eng, 0, 1, 8)  # autotunes the GEMVs, warms everything
    graphs = eng.runner.graphs
    rows, want = [], {}
    for mb in args.mb:
        eng.model.l2_prefetch_bytes = int(mb * 2**20)
        graphs.capture()
        row = {"mb": mb}
        for b in (1, 8):
            step_ms, tokens = decode_run(eng, b, b)
            row[f"batch{b}_step_ms"] = step_ms
            row[f"batch{b}_graph_ms"] = replay_ms(graphs, b)  # on the last step's inputs
            want.setdefault(b, tokens)
            row[f"batch{b}_tokens_identical_to_first"] = tokens == want[b]
        row["batch1_step_ratio_to_floor"] = row["batch1_step_ms"] / floor_ms
        row["batch1_graph_ratio_to_floor"] = row["batch1_graph_ms"] / floor_ms
        rows.append(row)
        log(f"{mb:5.1f} MiB: batch 1 step {row['batch1_step_ms']:.3f} ms "
            f"({row['batch1_step_ratio_to_floor']:.3f}x floor), graph "
            f"{row['batch1_graph_ms']:.3f} ms; batch 8 step {row['batch8_step_ms']:.3f} ms, "
            f"graph {row['batch8_graph_ms']:.3f} ms; same tokens "
            f"{row['batch1_tokens_identical_to_first']}/{row['batch8_tokens_identical_to_first']}")
    best = min(rows, key=lambda r: r["batch1_graph_ms"])
    path = write_result("l2_prefetch_h200", {
        "gpu": torch.cuda.get_device_name(0), "copy_bandwidth_TB_s": bw / 1e12,
        "weight_bytes_read_per_step": read_bytes, "floor_ms": floor_ms, "sweep": rows,
        "best_mb_batch1_graph": best["mb"],
        "note": "step: median wall time of LLMEngine.step over a pure-decode run (128-token "
                "prompts, 128 new tokens, lookahead on); graph: the captured decode graph "
                "replayed on that run's last inputs, CUDA events over 50 back-to-back "
                "replays, median of 5 rounds; tokens: greedy ids equal to the first row's"})
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
