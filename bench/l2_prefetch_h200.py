"""L2 prefetch in the decode step's small kernels, swept on one H200 (Llama-3-8B shape).

    PYTHONPATH=<dir holding pdserve> python3 bench/l2_prefetch_h200.py [--mb 0 8 16 ...]

For each budget (MiB per fused kernel, ``EngineConfig.l2_prefetch_mb``) it recaptures
the decode graphs and times the batch-1 and batch-8 graphs replayed back to back
(CUDA events over 50 replays, median of 5 rounds; no L2 flush between replays, as
in serving), checks that the logits are bit-identical to the budget-0 graph, and
puts each time beside the weight-read floor (bytes a step reads / HBM copy
bandwidth measured in this run). Then it runs batch-1 decode through
``LLMEngine.step`` (128-token prompt, 256 new tokens, greedy, ``ignore_eos``) with
the best budget and with none, as ``bench/engine_h200.py`` measures it.
Writes ``l2_prefetch_h200.json`` to $OUT (or bench/results).
"""

import argparse
import random
import statistics
import time

import torch

from pdserve.bench.common import write_result
from pdserve.bench.engine_h200 import copy_bandwidth, engine_steps, make_model_dir, random_prompt


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


def decode_step_ms(eng, rng: random.Random) -> float:
    from pdserve import SamplingParams

    greedy = dict(temperature=0, ignore_eos=True, skip_special_tokens=False)
    engine_steps(eng, [SamplingParams(max_tokens=8, **greedy)], [random_prompt(rng, 128)])
    steps = engine_steps(eng, [SamplingParams(max_tokens=256, **greedy)],
                         [random_prompt(rng, 128)])
    return statistics.median(t for t, pure, _ in steps if pure) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, nargs="+", default=[0, 4, 8, 16, 24, 32, 48])
    args = ap.parse_args()
    from pdserve import LLM

    rng = random.Random(0)
    bw = copy_bandwidth()
    log(f"copy {bw / 1e12:.2f} TB/s")
    llm = LLM(str(make_model_dir()), extra={"load_format": "dummy"}, max_model_len=4096,
              max_num_seqs=8, max_num_batched_tokens=4096)
    eng = llm.engine
    read_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters()) \
        - eng.model.embed_tokens.weight.numel() * 2
    floor_ms = read_bytes / bw * 1e3
    decode_step_ms(eng, rng)  # autotunes the GEMVs, warms everything
    graphs = eng.runner.graphs
    rows, want = [], {}
    for mb in args.mb:
        eng.model.l2_prefetch_bytes = int(mb * 2**20)
        graphs.capture()
        row = {"mb": mb}
        for b in (1, 8):
            ms = replay_ms(graphs, b)
            logits = graphs.replay_resident(b).clone()
            want.setdefault(b, logits)
            row[f"batch{b}_graph_ms"] = ms
            row[f"batch{b}_identical_to_off"] = bool(torch.equal(logits, want[b]))
        row["batch1_ratio_to_floor"] = row["batch1_graph_ms"] / floor_ms
        rows.append(row)
        log(f"{mb:5.1f} MiB: batch 1 {row['batch1_graph_ms']:.3f} ms "
            f"({row['batch1_ratio_to_floor']:.3f}x floor), batch 8 {row['batch8_graph_ms']:.3f} "
            f"ms, identical {row['batch1_identical_to_off']}/{row['batch8_identical_to_off']}")
    best = min(rows, key=lambda r: r["batch1_graph_ms"])
    steps = {}
    for mb in (0, best["mb"]):
        eng.model.l2_prefetch_bytes = int(mb * 2**20)
        graphs.capture()
        steps[mb] = decode_step_ms(eng, rng)
        log(f"engine batch-1 step with {mb} MiB: {steps[mb]:.3f} ms "
            f"({steps[mb] / floor_ms:.3f}x floor)")
    path = write_result("l2_prefetch_h200", {
        "gpu": torch.cuda.get_device_name(0), "copy_bandwidth_TB_s": bw / 1e12,
        "weight_bytes_read_per_step": read_bytes, "floor_ms": floor_ms, "sweep": rows,
        "best_mb": best["mb"],
        "engine_batch1_step_ms": {"off": steps[0], "best": steps[best["mb"]]},
        "engine_batch1_ratio_to_floor": {"off": steps[0] / floor_ms,
                                         "best": steps[best["mb"]] / floor_ms},
        "note": "graph times: CUDA events over 50 back-to-back replays, median of 5 rounds; "
                "engine step: median wall time of LLMEngine.step at batch 1 (lookahead on)"})
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
