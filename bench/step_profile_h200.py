"""Where a decode step's time goes on one H200: Llama-3-8B shape, random bf16 weights.

    PYTHONPATH=<dir holding pdserve> python3 bench/step_profile_h200.py

For batch 1 (128-token prompts) and batch 64 (2,016-token prompts) it runs
decode steps through ``LLMEngine.step``, with the one-step lookahead
(``async_scheduling``, the default with CUDA graphs: the host launches step
n+1 before it processes step n) and without it (``*_sync``), and reports per
step (medians):

- ``step_ms``: wall time of one ``engine.step()`` call (one step's results);
- ``graph_gpu_ms``: GPU time of the captured decode graph alone, replayed
  back to back on the last step's device inputs with KV writes off (CUDA
  events);
- ``host_not_hidden_ms`` = ``step_ms - graph_gpu_ms``: per step, the time the
  GPU does not spend in the graph (host work left in the critical path, plus
  sampling and copies). With the lookahead this is what overlap failed to hide;
- ``wait_for_gpu_ms``: time the host sat blocked on the step's sampled ids
  (hidden host work shows up as time taken from here);
  ``host_busy_ms`` = ``step_ms - wait_for_gpu_ms``: host work per step;
- host phases by wrapping the engine's methods with timers: ``schedule``
  (synchronous steps), ``plan_ahead`` (the lookahead's plan), ``prepare``,
  ``replay_launch``, ``sample_launch`` (enqueue only), ``wait_for_gpu``,
  ``update``, ``deltas``;
- GPU kernel time per step by kernel family (torch.profiler over a few graph
  replays), with the weight-read floor and the KV-read floor beside it.

Everything is a ratio to the HBM copy bandwidth measured in the same run.
Writes ``step_profile_h200.json`` to $OUT (or bench/results).
"""

import argparse
import collections
import statistics
import time

import torch
from triton.testing import do_bench

from pdserve.bench.common import write_result
from pdserve.bench.engine_h200 import (
    bytes_read_per_step,
    copy_bandwidth,
    make_model_dir,
    random_prompt,
)

RESULT: dict = {}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class PhaseTimer:
    """Wraps named bound methods of objects with wall-clock accumulators."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = collections.defaultdict(float)

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.acc[name] += time.perf_counter() - t

        setattr(obj, attr, timed)

    def take(self) -> dict[str, float]:
        out, self.acc = dict(self.acc), collections.defaultdict(float)
        return out


def family(name: str) -> str:
    n = name.lower()
    for key, fam in (("_decode_kernel", "attention_decode"), ("rope_store", "rope_kv_store"),
                     ("silu", "silu_mul"), ("rms", "rmsnorm"), ("norm", "rmsnorm"),
                     ("gemv", "gemm"), ("gemm", "gemm"), ("nvjet", "gemm"), ("sm90", "gemm"),
                     ("cutlass", "gemm"), ("memcpy", "memcpy"), ("memset", "memset"),
                     ("elementwise", "elementwise"), ("reduce", "reduce"),
                     ("index", "index")):
        if key in n:
            return fam
    return "other"


def kernel_breakdown(graphs, b: int, reps: int = 5) -> dict:
    from torch.profiler import ProfilerActivity, profile

    graphs.replay_resident(b)  # slots off: the replays below write no KV
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graphs.replay_resident(b, write_kv=True)
        torch.cuda.synchronize()
    fams: dict[str, float] = collections.defaultdict(float)
    top: dict[str, float] = collections.defaultdict(float)
    count = 0
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
        fams[family(ev.name)] += us / reps / 1e3
        top[ev.name[:90]] += us / reps / 1e3
        count += 1
    return {"kernels_per_step": count / reps,
            "family_ms": dict(sorted(fams.items(), key=lambda kv: -kv[1])),
            "sum_kernel_ms": sum(fams.values()),
            "top_kernels_ms": dict(sorted(top.items(), key=lambda kv: -kv[1])[:12])}


def graph_gpu_ms(graphs, b: int) -> float:
    """The graph alone on the inputs of the step that just ran (no KV written)."""
    graphs.replay_resident(b)
    return do_bench(lambda: graphs.replay_resident(b, write_kv=True), warmup=5, rep=60,
                    return_mode="median")


def profile_batch(eng, timer: PhaseTimer, batch: int, prompt_len: int, new: int,
                  bw: float, read_bytes: int, rng) -> dict:
    from pdserve import SamplingParams

    sp = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True,
                        skip_special_tokens=False)
    base = f"p{batch}-{time.monotonic_ns()}"
    for i in range(batch):
        eng.add_request(f"{base}-{i}", random_prompt(rng, prompt_len), sp)
    rows = []
    mid = None
    while eng.has_unfinished():
        timer.take()
        t = time.perf_counter()
        eng.step()
        dt = time.perf_counter() - t
        sched = eng.current_schedule.scheduled
        phases = timer.take()
        if all(s.num_new_tokens == 1 for s in sched) and len(sched) == batch:
            rows.append((dt, phases))
            if mid is None and len(rows) == new // 2:
                if eng.lookahead is not None:
                    eng.lookahead.wait()  # the step in flight is done before we re-run it
                g = eng.runner.graphs
                bucket = g.bucket_for(batch)
                mid = {"graph_gpu_ms": graph_gpu_ms(g, bucket), **kernel_breakdown(g, bucket)}
    step_ms = statistics.median(r[0] for r in rows) * 1e3
    names = sorted({k for _, p in rows for k in p})
    phases = {k: statistics.median(p.get(k, 0.0) for _, p in rows) * 1e3 for k in names}
    ctx = prompt_len + new // 2
    kv_bytes = batch * ctx * eng.kv_spec.bytes_per_token
    floor_ms = (read_bytes + kv_bytes) / bw * 1e3
    wait_ms = phases.get("wait_for_gpu", 0.0)
    out = {"batch": batch, "prompt": prompt_len, "new_tokens": new, "steps": len(rows),
           "async_scheduling": eng.lookahead is not None,
           "step_ms": step_ms, "floor_ms": floor_ms, "ratio_step_to_floor": step_ms / floor_ms,
           "wait_for_gpu_ms": wait_ms, "host_busy_ms": step_ms - wait_ms,
           "host_phase_ms": phases, **(mid or {})}
    if mid:
        out["ratio_graph_to_floor"] = mid["graph_gpu_ms"] / floor_ms
        out["host_not_hidden_ms"] = step_ms - mid["graph_gpu_ms"]
    log(f"batch {batch} (async {out['async_scheduling']}): step {step_ms:.3f} ms, graph "
        f"{out.get('graph_gpu_ms', 0):.3f} ms, not hidden {out.get('host_not_hidden_ms', 0):.3f}"
        f" ms, host busy {out['host_busy_ms']:.3f} ms, floor {floor_ms:.3f} ms; phases "
        f"{({k: round(v, 3) for k, v in phases.items()})}")
    if mid:
        log(f"  kernels/step {mid['kernels_per_step']:.0f}; families "
            f"{({k: round(v, 3) for k, v in mid['family_ms'].items()})}")
    return out


def main() -> None:
    import random

    ap = argparse.ArgumentParser()
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.parse_args()
    from pdserve import LLM

    rng = random.Random(0)
    RESULT["gpu"] = torch.cuda.get_device_name(0)
    bw = copy_bandwidth()
    RESULT["copy_bandwidth_TB_s"] = bw / 1e12
    log(f"copy {bw / 1e12:.2f} TB/s")
    llm = LLM(str(make_model_dir()), extra={"load_format": "dummy"}, max_model_len=8192,
              max_num_seqs=64, max_num_batched_tokens=8192)
    eng = llm.engine
    read_bytes = bytes_read_per_step(eng)
    RESULT["weight_bytes_read_per_step"] = read_bytes
    from pdserve.engine.sampler import PendingSample

    timer = PhaseTimer()
    timer.wrap(eng.scheduler, "schedule", "schedule")
    timer.wrap(eng.scheduler, "update", "update")
    timer.wrap(eng.runner, "prepare", "prepare")
    timer.wrap(eng.runner.sampler, "sample_async", "sample_launch")
    timer.wrap(PendingSample, "result", "wait_for_gpu")
    timer.wrap(eng.runner.graphs, "replay", "replay_launch")
    timer.wrap(eng, "_delta", "deltas")
    lookahead = eng.lookahead
    if lookahead is not None:
        timer.wrap(lookahead, "plan_next", "plan_ahead")
    RESULT["async_scheduling_default"] = lookahead is not None
    for suffix, ahead in (("", lookahead), ("_sync", None)):
        eng.lookahead = ahead  # between runs: no step is in flight
        profile_batch(eng, timer, 1, 128, 8, bw, read_bytes, rng)  # warm-up
        RESULT[f"batch1{suffix}"] = profile_batch(eng, timer, 1, 128, 128, bw, read_bytes,
                                                  rng)
        write_result("step_profile_h200", RESULT)
        RESULT[f"batch64{suffix}"] = profile_batch(eng, timer, 64, 2016, 64, bw, read_bytes,
                                                   rng)
        write_result("step_profile_h200", RESULT)
    eng.lookahead = lookahead


if __name__ == "__main__":
    main()
