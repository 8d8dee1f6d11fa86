"""Disaggregation on one GPU: what moving the KV costs, measured in one run.

    main process = prefill engine (Llama-3-8B shape, random bf16 weights)
      ├─ d2d copy of 512 MiB (the bandwidth to compare against)
      ├─ decode process (this file, --role decode): a KVReceiver on its own KV cache
      ├─ transfer: 32 layers x 256 blocks (a 4,096-token prompt, 512 MiB) per transport
      ├─ TTFT: colocated prefill vs prefill_only + layer-wise push (prefill/layer_push.py)
      │        until the decode side holds every layer and the finish frame
      └─ HTTP: `pdserve serve` with configs/gpu-1x-{disagg,colocated}.yaml, greedy text
               (and logprobs) compared between the two

    python -m pdserve.bench.disagg_h200 [--tiny --device cpu] [--transports cuda_ipc,nixl,tcp]

Writes ``disagg_h200.json`` (or ``disagg_cpu_tiny.json``) under $OUT or bench/results.

Run 1 (rev a92330a, bench/results/disagg_h200.json): d2d copy 2.11 TB/s; nixl moved
the 512 MiB at 15.8 GB/s (0.0075x), about 1 ms per 16 MiB layer write, so UCX did not
take the CUDA IPC path that DESIGN.md measured at 1.3 TB/s (next: UCX_PROTO_INFO=y /
UCX_TLS to see and force it); tcp 0.46 GB/s. Layer-wise push hid most of it: the last
layer landed 1.4 ms after prefill ended, but prefill with the push ran 128 ms against
105 ms colocated (TTFT 1.23x). Greedy text and logprobs identical over HTTP.

Run of rev 951ecb2 (bench/results/disagg_h200.json), cuda_ipc added: TTFT of the 4k prompt
109.5 ms against 105.4 ms colocated = 1.039x (1.023-1.054x over this session's runs; nixl
1.189x); the last layer landed 2.2 ms after prefill ended. Transfer of the 512 MiB into
the decode worker's memory: the data moves at 1.94 TB/s = 0.92x the 2.10 TB/s d2d copy
(GPU time of the cross-process copy, checksums fused); end to end, from the first send
to the decode side's completion with every block's digest checked there, 237 GB/s in
one send_layers call (0.11x) and 56-110 GB/s layer by layer across runs: a fixed ~2 ms
per transfer of host-side Python on both sides plus the receiver re-reading the 512 MiB
to check it (0.32 ms, fabric_micro_h200.json). Greedy text and logprobs identical over
HTTP with cuda_ipc serving; HTTP TTFT 113-190 ms disaggregated, 111-176 ms colocated.
"""

import argparse
import gc
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from pdserve.bench.common import write_result

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128)
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64)
VOCAB = 128256
PROMPT_VOCAB = 49152  # the carried SmolLM2 tokenizer knows ids below this


def log(msg: str) -> None:
    print(f"[disagg {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_model_dir(root: Path, shape: dict, tok_dir: Path) -> Path:
    """A Llama config of ``shape`` beside a carried tokenizer (weights: load_format dummy)."""
    d = root / "llama3-8b-shape"
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB,
               max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False, attention_bias=False, hidden_act="silu",
               rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
               torch_dtype="bfloat16", **shape)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    if (tok_dir / "tokenizer.json.gz").exists():
        with gzip.open(tok_dir / "tokenizer.json.gz") as f:
            (d / "tokenizer.json").write_bytes(f.read())
    else:
        shutil.copy(tok_dir / "tokenizer.json", d)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, d)
    return d


def default_tok_dir() -> Path:
    carried = ROOT / "build" / "pdtok"
    if carried.exists():
        return carried
    from pdserve.engine.weights import resolve_model_dir
    return Path(resolve_model_dir("smollm2-135m"))


def kv_identity(model_dir: Path, num_blocks: int, device: torch.device):
    from transformers import AutoConfig

    from pdserve.engine.block_hash import HASH_ALGORITHM
    from pdserve.engine.config import ModelConfig
    from pdserve.engine.kv_cache import KVCacheSpec
    from pdserve.kvfabric import FabricIdentity

    mc = ModelConfig.from_hf(AutoConfig.from_pretrained(str(model_dir)))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = KVCacheSpec(mc.num_layers, num_blocks, 16, mc.num_kv_heads, mc.head_dim, dtype)
    return FabricIdentity.from_kv_spec(str(model_dir), spec, 0, HASH_ALGORITHM), spec


def layer_sums(layers, block_ids: list[int]) -> list[float]:
    """float64 sum of K and V of ``block_ids`` per layer (an exactness check). Pure."""
    idx = torch.tensor(block_ids, device=layers[0][0].device)
    return [float(k.index_select(0, idx).double().sum() + v.index_select(0, idx).double().sum())
            for k, v in layers]


# ---------------------------------------------------------------- decode process


def decode_main(args) -> None:
    """A KVReceiver on its own cache; line-JSON commands on stdin, events on stdout."""
    from pdserve.engine.kv_cache import KVCache
    from pdserve.kvfabric import KVReceiver
    from pdserve.kvfabric.descriptors import TransferPlan

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints must not corrupt the command channel
    device = torch.device(args.device)
    identity, spec = kv_identity(Path(args.model_dir), args.num_blocks, device)
    kv = KVCache(spec, device)
    receiver = KVReceiver(kv.layers, identity, TOKEN, args.transports.split(",")[0])
    lock = threading.Lock()

    def say(obj) -> None:
        with lock:
            out.write(json.dumps(obj) + "\n")
            out.flush()

    say({"address": receiver.address})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "expect":
            p = cmd["plan"]
            plan = TransferPlan(p["transfer_id"], p["request_id"], 0, None,
                                tuple(p["dst_block_ids"]), p["num_layers"])
            receiver.expect(plan,
                            lambda pl, payload: say({"event": "complete", "t": time.monotonic(),
                                                     "tid": pl.transfer_id}),
                            lambda pl, why: say({"event": "error", "why": why,
                                                 "tid": pl.transfer_id}), 60.0)
            say({"ok": True})
        elif cmd["op"] == "sums":
            say({"sums": layer_sums(kv.layers, cmd["block_ids"]),
                 "bytes_received": receiver.bytes_received})
        else:
            break
    receiver.close()


class DecodeProc:
    """A decode process whose receiver speaks ``transport`` (and tcp, as every one does)."""

    def __init__(self, args, model_dir: Path, transport: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve.bench.disagg_h200", "--role", "decode",
             "--model-dir", str(model_dir), "--device", args.device,
             "--num-blocks", str(args.num_blocks), "--transports", transport],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.address = self.read()["address"]

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("decode process died")
        return json.loads(line)

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def expect(self, plan) -> None:
        d = dict(transfer_id=plan.transfer_id, request_id=plan.request_id,
                 dst_block_ids=list(plan.dst_block_ids), num_layers=plan.num_layers)
        assert self.call(op="expect", plan=d)["ok"]

    def wait_event(self) -> dict:
        ev = self.read()
        if ev.get("event") != "complete":
            raise RuntimeError(f"transfer failed: {ev}")
        return ev

    def stop(self) -> None:
        try:
            self.call(op="exit")
        except (RuntimeError, OSError, ValueError):
            pass
        self.proc.wait(timeout=30)


# ---------------------------------------------------------------- measurements


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 20) -> float:
    """Bytes copied per second by a device-to-device copy of ``nbytes`` (each byte once)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    sync(device)
    return nbytes * reps / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def transfer_rates(engine, sender, decode: DecodeProc, num_blocks: int, reps: int) -> dict:
    """Move blocks 0..n-1 of every layer into the decode side's 0..n-1; time to complete.

    Layer by layer (``send_layer`` 32 times, as the layer-wise push does) and in bulk
    (``send_layers``: the prompt's KV was computed earlier). Each timing runs from the
    first send to the decode side's completion callback, digest checks included.
    """
    from pdserve.kvfabric import KVConnectorScheduler

    layers = engine.kv_cache.layers
    planner = KVConnectorScheduler(len(layers))
    src = list(range(num_blocks))
    dst = list(range(num_blocks))  # the decode pool's order differs in general
    out: dict = {}
    for mode in ("layerwise", "bulk"):
        rates, nbytes, phases = [], 0, []
        for r in range(reps + 1):
            plan = planner.plan_from_suffix(f"xfer-{mode}-{r}-{id(sender)}", src, 0, dst)
            decode.expect(plan)
            sync(engine.device)
            t0 = time.monotonic()
            if mode == "bulk":
                nbytes = sender.send_layers(plan, layers)
            else:
                nbytes = sum(sender.send_layer(plan, i, k, v) for i, (k, v) in enumerate(layers))
            t_sent = time.monotonic()
            sender.finish(plan, b"")
            t_finished = time.monotonic()
            t1 = decode.wait_event()["t"]
            if r:  # the first one warms registrations and buffers
                rates.append(nbytes / (t1 - t0))
                phases.append((t_sent - t0, t_finished - t_sent, t1 - t_finished))
        got = decode.call(op="sums", block_ids=dst)["sums"]
        key = "" if mode == "layerwise" else "bulk_"
        out.update({f"{key}phases_ms_median": {  # where the time goes, host clock
            name: 1e3 * statistics.median(p[i] for p in phases)
            for i, name in enumerate(("sends_return", "finish_returns", "receiver_after"))},
                    f"{key}bytes_per_s_median": statistics.median(rates),
                    f"{key}bytes_per_s_best": max(rates),
                    f"{key}exact": got == layer_sums(layers, src)})
    if sender.stream_ordered:  # its data moves on our stream: time the GPU part alone
        gpu_rates = []
        for r in range(reps):
            plan = planner.plan_from_suffix(f"xfer-gpu-{r}-{id(sender)}", src, 0, dst)
            decode.expect(plan)
            ev0, ev1 = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            torch.cuda._sleep(20_000_000)  # ~10 ms of GPU cycles while the host enqueues
            ev0.record()
            sender.send_layers(plan, layers)
            ev1.record()
            sender.finish(plan, b"")
            decode.wait_event()
            gpu_rates.append(nbytes / (ev0.elapsed_time(ev1) * 1e-3))
        out["bulk_data_movement_bytes_per_s_median"] = statistics.median(gpu_rates)
    return {"bytes": nbytes, "reps": reps, **out}


def random_prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, PROMPT_VOCAB, (n,), generator=g).tolist()


def ttft_colocated(engine, prompt: list[int], rid: str) -> float:
    from pdserve.engine.sampling_params import SamplingParams

    t0 = time.monotonic()
    engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=1))
    while True:
        for d in engine.step():
            if d.request_id == rid and d.new_token_ids:
                return time.monotonic() - t0  # max_tokens=1: it finished in this step


def ttft_disagg(engine, sender, decode: DecodeProc, pusher, prompt: list[int],
                rid: str) -> dict:
    """prefill_only + layer-wise push; TTFT ends when the decode side holds it all."""
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.kvfabric import KVConnectorScheduler

    layers = engine.kv_cache.layers
    planner = KVConnectorScheduler(len(layers))
    n_blocks = -(-len(prompt) // 16)
    dst = list(range(n_blocks))
    decode.expect(planner.plan(rid, None, dst, 0))
    plans: dict = {}

    def hook(layer: int) -> None:
        for s in engine.current_schedule.scheduled:
            req = s.request
            last_chunk = req.num_computed_tokens + s.num_new_tokens == req.num_tokens
            if req.request_id != rid or not last_chunk:
                continue
            plan = plans.get(rid) or plans.setdefault(
                rid, planner.plan_from_suffix(rid, req.block_ids, 0, dst))
            k, v = layers[layer]
            pusher.push(rid, lambda p=plan, i=layer, k=k, v=v: sender.send_layer(p, i, k, v),
                        sender.stream_ordered)

    t0 = time.monotonic()
    engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=1),
                       prefill_only=True)
    while not engine.finished_prefills:
        engine.step(hook)
    errors = pusher.flush()
    t_prefill = time.monotonic()
    if errors:
        raise RuntimeError(f"push failed: {errors}")
    req = engine.finished_prefills[0]
    sender.finish(plans[rid], bytes([req.output_token_ids[0] % 256]))
    t_finished = time.monotonic()
    t_land = decode.wait_event()["t"]
    engine.release_prefill(req)
    return {"ttft_s": t_land - t0, "prefill_s": t_prefill - t0,
            "prefill_end_to_landed_s": t_land - t_prefill,
            "finish_call_s": t_finished - t_prefill}


def fabric_part(args, model_dir: Path, device: torch.device) -> dict:
    from pdserve.engine.block_hash import HASH_ALGORITHM
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.kvfabric import FabricIdentity, KVSender
    from pdserve.prefill.layer_push import LayerPusher

    out: dict = {}
    nbytes = args.prompt_len * 2 * 8 * 128 * 2 * 32 if not args.tiny else 64 << 20
    out["d2d_copy_bytes_per_s"] = copy_bandwidth(device, nbytes)
    log(f"d2d copy {out['d2d_copy_bytes_per_s'] / 1e9:.1f} GB/s ({nbytes >> 20} MiB)")
    cfg = EngineConfig(model=str(model_dir), device=args.device, num_blocks=args.num_blocks,
                       max_num_seqs=4, max_num_batched_tokens=args.prompt_len + 64,
                       max_model_len=8192, enable_prefix_caching=False, cuda_graphs=False,
                       extra={"load_format": "dummy"})
    t = time.monotonic()
    engine = LLMEngine(cfg)
    log(f"prefill engine up in {time.monotonic() - t:.1f} s")
    names = args.transports.split(",")
    one_sided = [n for n in names if n != "tcp"] or ["tcp"]
    decodes = {n: DecodeProc(args, model_dir, n) for n in one_sided}
    for n in names:  # a tcp sender talks to any receiver
        decodes.setdefault(n, decodes[one_sided[0]])
    log(f"decode processes listening: { {n: d.address for n, d in decodes.items()} }")
    identity = FabricIdentity.from_kv_spec(str(model_dir), engine.kv_spec, 0, HASH_ALGORITHM)
    pusher = LayerPusher(engine.device)
    prompt_blocks = args.prompt_len // 16
    try:
        for i in range(2):  # warm kernels
            ttft_colocated(engine, random_prompt(args.prompt_len, 100 + i), f"warm{i}")
        senders = {}
        for name in names:
            senders[name] = KVSender(decodes[name].address, TOKEN, identity, transport=name)
            xfer = transfer_rates(engine, senders[name], decodes[name], prompt_blocks,
                                  args.reps)
            for key in ("", "bulk_"):
                xfer[f"{key}ratio_to_d2d_copy"] = (xfer[f"{key}bytes_per_s_median"]
                                                   / out["d2d_copy_bytes_per_s"])
                log(f"transfer {name} {key or 'layerwise_'}: "
                    f"{xfer[f'{key}bytes_per_s_median'] / 1e9:.1f} GB/s median, "
                    f"ratio {xfer[f'{key}ratio_to_d2d_copy']:.3f}, exact={xfer[f'{key}exact']}")
            if "bulk_data_movement_bytes_per_s_median" in xfer:
                xfer["bulk_data_movement_ratio_to_d2d_copy"] = (
                    xfer["bulk_data_movement_bytes_per_s_median"] / out["d2d_copy_bytes_per_s"])
                log(f"transfer {name} data movement (GPU time of the copy into the decode "
                    f"worker, checksums fused): "
                    f"{xfer['bulk_data_movement_bytes_per_s_median'] / 1e9:.0f} GB/s, ratio "
                    f"{xfer['bulk_data_movement_ratio_to_d2d_copy']:.3f}")
            out[f"transfer_{name}"] = xfer
        colo = [ttft_colocated(engine, random_prompt(args.prompt_len, 200 + i), f"colo{i}")
                for i in range(args.reps)]
        out["ttft_colocated_s"] = {"median": statistics.median(colo), "all": colo}
        log(f"TTFT colocated median {statistics.median(colo) * 1e3:.1f} ms")
        for name, sender in senders.items():
            runs = [ttft_disagg(engine, sender, decodes[name], pusher,
                                random_prompt(args.prompt_len, 300 + i), f"dis-{name}-{i}")
                    for i in range(args.reps + 1)][1:]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            med["ratio_to_colocated"] = med["ttft_s"] / out["ttft_colocated_s"]["median"]
            med["all"] = runs
            out[f"ttft_disagg_{name}"] = med
            log(f"TTFT disagg {name}: {med['ttft_s'] * 1e3:.1f} ms, ratio "
                f"{med['ratio_to_colocated']:.3f}, prefill end -> landed "
                f"{med['prefill_end_to_landed_s'] * 1e3:.2f} ms")
        for s in senders.values():
            s.close()
    finally:
        for d in set(decodes.values()):
            d.stop()
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- HTTP end to end


def serve_config(args, src: str, model_dir: Path, tmp: Path, port: int) -> Path:
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / src).read_text())
    cfg["model"] = str(model_dir)
    cfg["router"]["port"] = port
    if args.http_transport and cfg["mode"] == "disaggregated":
        cfg["transport"] = args.http_transport
    cfg["engine"].update(load_format="dummy", max_model_len=8192, cuda_graphs=False)
    if args.device == "cpu":
        cfg["engine"].update(device="cpu", dtype="float32", num_blocks=1024)
        for w in cfg["workers"]:
            w.get("engine", {}).pop("device", None)
            w.get("engine", {}).pop("num_blocks", None)
    path = tmp / f"serve-{src}"
    path.write_text(yaml.safe_dump(cfg))
    return path


def http_run(args, config: Path, port: int, prompts: list[list[int]]) -> dict:
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "pdserve.router.cli", "serve", str(config),
                             "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                     daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while not any("pdserve: serving" in ln for ln in lines):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("pdserve serve did not start:\n" + "".join(lines[-40:]))
            time.sleep(0.2)
        log(f"serving {config.name}")
        results = []
        with httpx.Client(timeout=120) as client:
            model = client.get(url + "/v1/models").json()["data"][0]["id"]
            for prompt in prompts:
                body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens,
                        "temperature": 0.0, "logprobs": 1}
                r = client.post(url + "/v1/completions", json=body)
                r.raise_for_status()
                c = r.json()["choices"][0]
                lp = c.get("logprobs") or {}
                results.append({"text": c["text"], "tokens": lp.get("tokens"),
                                "token_logprobs": lp.get("token_logprobs")})
            ttfts = []
            for i in range(3):
                body = {"model": model, "prompt": random_prompt(args.prompt_len, 900 + i),
                        "max_tokens": 4,
                        "temperature": 0.0, "stream": True}
                t0 = time.monotonic()
                first = None
                with client.stream("POST", url + "/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if first is None and line.startswith("data:") and '"text"' in line:
                            first = time.monotonic() - t0
                ttfts.append(first)
        return {"completions": results, "http_ttft_s": ttfts}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def http_part(args, model_dir: Path, tmp: Path) -> dict:
    prompts = [random_prompt(n, 500 + n) for n in (37, 700, args.prompt_len)]
    runs = {}
    for name, src, port in (("disaggregated", "gpu-1x-disagg.yaml", 18411),
                            ("colocated", "gpu-1x-colocated.yaml", 18412)):
        runs[name] = http_run(args, serve_config(args, src, model_dir, tmp, port), port, prompts)
        log(f"{name}: texts {[c['text'][:30] for c in runs[name]['completions']]} "
            f"http ttft {[round(t * 1e3, 1) for t in runs[name]['http_ttft_s']]} ms")
    a, b = runs["disaggregated"]["completions"], runs["colocated"]["completions"]
    return {"greedy_text_identical": [x["text"] for x in a] == [y["text"] for y in b],
            "greedy_logprobs_identical": a == b,
            "max_tokens": args.max_tokens, "prompt_lens": [len(p) for p in prompts],
            "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", default="main", choices=["main", "decode"])
    ap.add_argument("--model-dir")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small model shape (CPU debugging)")
    ap.add_argument("--transports", default="cuda_ipc,nixl,tcp")
    ap.add_argument("--http-transport", default="",
                    help="override the disaggregated config's transport for the HTTP part")
    ap.add_argument("--num-blocks", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--skip-fabric", action="store_true")
    ap.add_argument("--tokenizer", type=Path)
    args = ap.parse_args()
    from pdserve.engine.worker_main import GIL_SWITCH_INTERVAL_S
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # as the prefill and decode workers do
    if args.role == "decode":
        decode_main(args)
        return
    if args.device == "cuda":
        args.device = "cuda:0"  # every process names the same GPU with its index
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tmp = Path(tempfile.mkdtemp(prefix="pd-disagg-"))
    model_dir = make_model_dir(tmp, TINY if args.tiny else LLAMA3_8B,
                               args.tokenizer or default_tok_dir())
    result: dict = {"shape": TINY if args.tiny else LLAMA3_8B, "vocab_size": VOCAB,
                    "prompt_len": args.prompt_len, "transports": args.transports.split(","),
                    "note": ("one GPU, prefill = this process, decode = a second process; "
                             "d2d copy counts each byte once (read+write = 2x); transfer "
                             "time = first send_layer to the decode side's on_complete; "
                             "TTFT disagg ends when the decode side holds every layer and "
                             "the finish frame (it then streams the first token)")}
    name = "disagg_cpu_tiny" if args.tiny else "disagg_h200"
    if not args.skip_fabric:
        result["fabric"] = fabric_part(args, model_dir, device)
        log(f"wrote {write_result(name, result)} (fabric part)")
    if not args.skip_http:
        try:
            result["http"] = http_part(args, model_dir, tmp)
        except Exception as e:  # keep the fabric numbers if serving fails
            result["http"] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
            log(f"HTTP part failed: {e}")
    path = write_result(name, result)
    log(f"wrote {path}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
