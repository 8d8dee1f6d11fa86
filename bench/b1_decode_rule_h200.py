"""Which decode partition rule makes the batch-1 engine step fastest (H200).

    PYTHONPATH=<dir holding pdserve> python3 bench/b1_decode_rule_h200.py

Llama-3-8B shape, random bf16 weights, ``max_model_len`` 8192 (the block tables are
sized for it, so a fixed partition size launches 32 partitions per KV head at batch
1 however short the context). For each candidate rule for small batches (the fixed
partitions of ``triton_decode.default_tuning``, or partitions that follow each
sequence's context on the device, ``DecodeTuning.max_partitions``) the bench puts
the rule in place of ``default_tuning`` (this process only), recaptures the
batch-1 graph, and runs a 128-token prompt for 256 greedy tokens (``ignore_eos``)
through ``LLMEngine.step``: the median step time, as ``engine_h200`` reports it,
against the weight-read floor from the copy bandwidth measured in the same run.
Rules alternate over ``--rounds`` rounds. Writes ``b1_decode_rule_h200.json``.
"""

import argparse
import random
import statistics
import time

import torch
import triton

from pdserve.bench.common import write_result
from pdserve.bench.engine_h200 import (
    batch1_llm,
    bytes_read_per_step,
    copy_bandwidth,
    engine_steps,
    random_prompt,
)
from pdserve.kernels import triton_decode

ORIGINAL = triton_decode.default_tuning


def follow(programs: int, min_part: int, num_warps: int = 4):
    """A rule: full batches as before; otherwise partitions that follow the context,
    about ``programs`` programs per launch at long contexts."""
    def rule(n, hkv, max_blocks, bs, device):
        base = ORIGINAL(n, hkv, max_blocks, bs, device)
        if base.num_stages == 2:  # the full-batch rule
            return base
        return triton_decode.DecodeTuning(
            2048, 64, num_warps=num_warps, max_partitions=max(1, triton.cdiv(programs, n * hkv)),
            min_partition=min_part)
    return rule


RULES = {
    "fixed (default)": ORIGINAL,
    "follow 128 programs, min 64": follow(128, 64),
    "follow 128 programs, min 128": follow(128, 128),
    "follow 256 programs, min 64": follow(256, 64),
    "follow 256 programs, min 128": follow(256, 128),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def batch1_step_ms(eng, rng: random.Random) -> float:
    from pdserve import SamplingParams

    p = SamplingParams(temperature=0, ignore_eos=True, max_tokens=256, skip_special_tokens=False)
    steps = engine_steps(eng, [p], [random_prompt(rng, 128)])
    return statistics.median(t for t, d, _ in steps if d) * 1e3


def warm_batch1_engine():
    """The copy bandwidth (bytes/s) measured now, the Llama-3-8B-shaped batch-1 engine
    (``max_model_len`` 8192) warmed by one short request, its weight-read floor (ms) at
    that bandwidth, and the prompt generator: ``(bw, engine, floor_ms, rng)``."""
    from pdserve import SamplingParams

    bw = copy_bandwidth()
    eng = batch1_llm(8192).engine
    rng = random.Random(0)
    warm = SamplingParams(temperature=0, ignore_eos=True, max_tokens=8, skip_special_tokens=False)
    engine_steps(eng, [warm], [random_prompt(rng, 128)])
    return bw, eng, bytes_read_per_step(eng) / bw * 1e3, rng


def alternate(eng, rng, floor_ms: float, rounds: int, variants: dict) -> dict:
    """For ``rounds`` rounds, each variant in turn: ``variants[name]()`` puts it in place,
    the batch-1 graph is recaptured and ``batch1_step_ms`` timed. Returns name -> step
    times (ms); the caller restores what the variants changed. Mutates the engine's
    graphs."""
    times: dict = {name: [] for name in variants}
    for r in range(rounds):
        for name, apply in variants.items():
            apply()
            eng.runner.graphs.capture()
            t = batch1_step_ms(eng, rng)
            times[name].append(t)
            log(f"round {r}: {name}: {t:.3f} ms/step ({t / floor_ms:.3f}x floor)")
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    bw, eng, floor_ms, rng = warm_batch1_engine()

    def use(rule):
        return lambda: setattr(triton_decode, "default_tuning", rule)

    times = alternate(eng, rng, floor_ms, args.rounds,
                      {name: use(rule) for name, rule in RULES.items()})
    triton_decode.default_tuning = ORIGINAL
    rows = {name: {"step_ms": ts, "median_ms": statistics.median(ts),
                   "ratio_to_floor": statistics.median(ts) / floor_ms,
                   "tuning_at_batch1": str(RULES[name](1, 8, 512, 16, torch.device("cuda")))}
            for name, ts in times.items()}
    base = rows["fixed (default)"]["median_ms"]
    for name, row in rows.items():
        row["ratio_to_fixed"] = row["median_ms"] / base
        log(f"{name}: {row['median_ms']:.3f} ms = {row['ratio_to_floor']:.3f}x floor, "
            f"{row['ratio_to_fixed']:.3f}x fixed")
    path = write_result("b1_decode_rule_h200", {
        "gpu": torch.cuda.get_device_name(0), "copy_bandwidth_TB_s": bw / 1e12,
        "floor_ms": floor_ms, "prompt": 128, "new_tokens": 256, "max_model_len": 8192,
        "rounds": args.rounds, "rules": rows})
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
