"""Whether the GEMV's own L2 prefetch before the PDL wait makes the batch-1 engine step
faster (H200).

    PYTHONPATH=<dir holding pdserve> python3 bench/gemv_prefetch_h200.py

Under PDL a GEMV's programs are placed while the kernel ahead is still finishing and
then wait for it; its weight rows do not depend on that kernel, so a program can ask
L2 for the first bytes of each of its rows (``triton_gemv.PREFETCH_ROW_BYTES``,
``cp.async.bulk.prefetch.L2``) before waiting, reading HBM during the tail that would
otherwise leave it idle. For each budget the bench recaptures the batch-1 graph of
the Llama-3-8B-shaped engine (random bf16 weights, ``max_model_len`` 8192) and runs a
128-token prompt for 256 greedy tokens through ``LLMEngine.step``: the median step
time against the weight-read floor from the copy bandwidth measured in the same run,
budgets alternating over ``--rounds`` rounds. Writes ``gemv_prefetch_h200.json``.
"""

import argparse
import statistics

import torch

from pdserve.bench.b1_decode_rule_h200 import alternate, warm_batch1_engine
from pdserve.bench.common import write_result
from pdserve.kernels import triton_gemv

BUDGETS = (0, 256, 512, 768)  # bytes per W row (72e5b03 also tried 1024-4096: slower)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    bw, eng, floor_ms, rng = warm_batch1_engine()
    default = triton_gemv.PREFETCH_ROW_BYTES

    def use(b):
        return lambda: setattr(triton_gemv, "PREFETCH_ROW_BYTES", b)

    times = alternate(eng, rng, floor_ms, args.rounds, {b: use(b) for b in BUDGETS})
    triton_gemv.PREFETCH_ROW_BYTES = default
    base = statistics.median(times[0])
    rows = {str(b): {"step_ms": ts, "median_ms": statistics.median(ts),
                     "ratio_to_floor": statistics.median(ts) / floor_ms,
                     "ratio_to_no_prefetch": statistics.median(ts) / base}
            for b, ts in times.items()}
    for b, row in rows.items():
        print(f"{b} B/row: {row['median_ms']:.3f} ms = {row['ratio_to_floor']:.3f}x floor, "
              f"{row['ratio_to_no_prefetch']:.3f}x no prefetch", flush=True)
    print("wrote", write_result("gemv_prefetch_h200", {
        "gpu": torch.cuda.get_device_name(0), "copy_bandwidth_TB_s": bw / 1e12,
        "floor_ms": floor_ms, "prompt": 128, "new_tokens": 256, "max_model_len": 8192,
        "rounds": args.rounds, "budgets_bytes_per_row": rows}))


if __name__ == "__main__":
    main()
