"""GEMV configs chosen inside the decode graph rather than one shape at a time (H200).

    PYTHONPATH=<dir holding pdserve> python3 bench/gemv_insitu_h200.py

The Triton GEMV autotunes each weight shape alone (``do_bench``, L2 flushed). In a
batch-1 decode step the GEMVs run back to back under PDL, so the best config in
isolation need not be the best in the chain. This script (Llama-3-8B shape, random
bf16 weights) starts from the current picks (``SM90_PICKS`` where a shape has one,
else autotuned; "autotuned" in the output) and, one weight shape at a time,
tries every config in ``triton_gemv.CONFIGS`` (and ``--extra`` ones) in the captured
batch-1 decode graph
(recaptured per trial, timed on a real step's inputs: CUDA events over 50
back-to-back replays, median of 5 rounds), keeping a change only when the graph
gets faster. It reports the graph time of the autotuned picks and of the in-graph
picks (both re-measured at the end, alternating, 3 times), against the weight-read
floor measured in the same run. Writes ``gemv_insitu_h200.json`` to $OUT.
"""

import argparse
import random
import statistics
import time

import torch

from pdserve.bench.common import write_result
from pdserve.bench.engine_h200 import (
    batch1_llm,
    bytes_read_per_step,
    copy_bandwidth,
    engine_steps,
    random_prompt,
)
from pdserve.kernels import triton_gemv


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def replay_ms(graphs, reps: int = 50, rounds: int = 5) -> float:
    graphs.replay_resident(1)  # slots off: no KV written below
    for _ in range(10):
        graphs.replay_resident(1, write_kv=True)
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graphs.replay_resident(1, write_kv=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def short_run(eng, seed: int) -> None:
    """One 128-token prompt, 8 greedy tokens: leaves a real step's inputs on the device."""
    from pdserve import SamplingParams

    p = SamplingParams(temperature=0, ignore_eos=True, max_tokens=8, skip_special_tokens=False)
    engine_steps(eng, [p], [random_prompt(random.Random(seed), 128)])


def graph_ms(eng, picks: dict) -> float:
    """Batch-1 graph time with ``picks`` forced as the GEMV configs. Mutates the
    GEMV's record of picks and recaptures the engine's graphs."""
    triton_gemv._chosen.update(picks)
    eng.runner.graphs.capture()
    short_run(eng, 1)
    return replay_ms(eng.runner.graphs)


def parse_config(text: str) -> triton_gemv.GemvConfig:
    """``block_n,block_k,num_warps,num_stages[,split_k]``"""
    return triton_gemv.GemvConfig(*(int(v) for v in text.split(",")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--extra", type=parse_config, nargs="*", default=[],
                    help="configs to try beside CONFIGS, e.g. 64,128,4,6")
    args = ap.parse_args()
    candidates = tuple(triton_gemv.CONFIGS) + tuple(args.extra)

    bw = copy_bandwidth()
    eng = batch1_llm(2048).engine
    floor_ms = bytes_read_per_step(eng) / bw * 1e3
    short_run(eng, 0)  # autotunes every shape
    auto = {k: c for k, c in triton_gemv.chosen_configs().items()}
    log(f"copy {bw / 1e12:.2f} TB/s, floor {floor_ms:.3f} ms; autotuned picks: {auto}")
    best = dict(auto)
    best_ms = graph_ms(eng, best)
    log(f"autotuned picks: graph {best_ms:.3f} ms")
    trials = []
    for key in sorted(auto, key=lambda k: -k[0] * k[1]):
        n, k = key[0], key[1]
        for cfg in candidates:
            if cfg == best[key] or k < cfg.split_k * cfg.block_k:
                continue
            ms = graph_ms(eng, {**best, key: cfg})
            trials.append({"N": n, "K": k, "config": vars(cfg), "graph_ms": ms})
            if ms < best_ms:
                best[key], best_ms = cfg, ms
                log(f"  N={n} K={k}: {cfg} -> {ms:.3f} ms (kept)")
        graph_ms(eng, best)
    final = {"autotuned": [], "in_graph": []}
    for _ in range(3):
        final["autotuned"].append(graph_ms(eng, auto))
        final["in_graph"].append(graph_ms(eng, best))
    a, b = statistics.median(final["autotuned"]), statistics.median(final["in_graph"])
    log(f"batch-1 graph: autotuned {a:.3f} ms ({a / floor_ms:.3f}x floor), in-graph picks "
        f"{b:.3f} ms ({b / floor_ms:.3f}x floor)")
    path = write_result("gemv_insitu_h200", {"extra_candidates": [vars(c) for c in args.extra],
        "gpu": torch.cuda.get_device_name(0), "copy_bandwidth_TB_s": bw / 1e12,
        "floor_ms": floor_ms,
        "autotuned_picks": {f"{k[0]}x{k[1]}": vars(c) for k, c in auto.items()},
        "in_graph_picks": {f"{k[0]}x{k[1]}": vars(c) for k, c in best.items()},
        "graph_ms_autotuned": final["autotuned"], "graph_ms_in_graph": final["in_graph"],
        "ratio_in_graph_to_autotuned": b / a, "ratio_to_floor": {"autotuned": a / floor_ms,
                                                                 "in_graph": b / floor_ms},
        "trials": trials})
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
