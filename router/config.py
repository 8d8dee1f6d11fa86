"""``pdserve serve`` configuration: YAML loaded into frozen dataclasses, validated on
load; every error names the file and the key."""

import dataclasses
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pdserve.router.admission import SloConfig

ROLES = ("prefill", "decode", "colocated")
MODES = ("disaggregated", "colocated")
TRANSPORTS = ("tcp", "nixl", "nccl", "cuda_ipc")
ENGINE_KEYS = ("device", "dtype", "block_size", "num_blocks", "kv_cache_memory_gb",
               "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens",
               "max_model_len", "enable_prefix_caching", "hash_seed", "seed", "cuda_graphs",
               "async_scheduling", "load_format")


class ConfigError(ValueError):
    """A bad config; the message names the file and the key."""


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    control_port: int = 0  # 0 = any free port
    request_timeout_s: float = 600.0
    api_keys: tuple[str, ...] = ()
    heartbeat_timeout_s: float = 5.0
    loop_stall_s: float = 10.0
    slo: SloConfig = field(default_factory=SloConfig)  # YAML: router.slo (see _slo_section)


@dataclass(frozen=True)
class WorkerConfig:
    name: str
    role: str
    engine: dict = field(default_factory=dict)
    host: str = "127.0.0.1"
    env: dict = field(default_factory=dict)
    kv_port: int = 0  # decode: the KV receiver's port (0 = any free port)
    kv_advertise: str = ""  # decode: "host:port" prefill peers dial instead (a proxy, a NAT)
    launch_prefix: tuple[str, ...] = ()  # argv before python, e.g. ip netns exec NAME


@dataclass(frozen=True)
class ServeConfig:
    path: str
    model: str
    mode: str
    transport: str
    cluster_token: str
    router: RouterConfig
    engine: dict
    workers: tuple[WorkerConfig, ...]
    launcher: str = "local"
    fault_injection: bool = False  # tests only: workers honour Stall messages
    kv_fault_rate: float = 0.0  # tests only: fraction of KV transfers corrupted on purpose
    kv_fault_seed: int | None = None
    kv_lease_s: float = 5.0  # blocks held for a decode worker that stops renewing are freed
    kv_transfer_timeout_s: float = 120.0  # a hand-off's KV must land within this

    def worker_engine(self, w: WorkerConfig) -> dict:
        return {"model": self.model, **self.engine, **w.engine}


def _check_keys(where: str, data: dict, allowed, path: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{path}: unknown key '{where}{key}' "
                              f"(allowed: {', '.join(sorted(allowed))})")


def _typed(path: str, key: str, value, kind):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: key '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _engine_section(path: str, where: str, data) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: key '{where}' must be a mapping")
    _check_keys(f"{where}.", data, ENGINE_KEYS, path)
    for k in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens"):
        if k in data and data[k] is not None and (
                not isinstance(data[k], int) or isinstance(data[k], bool) or data[k] < 1):
            raise ConfigError(f"{path}: key '{where}.{k}' must be a positive integer, "
                              f"got {data[k]!r}")
    return dict(data)


def _slo_section(path: str, data) -> SloConfig:
    """``router.slo``: ``{ttft_ms, tpot_ms, max_queue_s, max_waiting}``, all optional.
    Targets are positive milliseconds (null: none); a request that no placement can
    serve within them waits up to ``max_queue_s`` (at most ``max_waiting`` such
    requests at once), then gets 429 with Retry-After."""
    if data is None:
        return SloConfig()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: key 'router.slo' must be a mapping")
    _check_keys("router.slo.", data, ("ttft_ms", "tpot_ms", "max_queue_s", "max_waiting"), path)

    def number(key: str, low: float, strict: bool, what: str):
        v = data.get(key)
        if v is None:
            return None
        if (not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v)
                or v < low or (strict and v == low)):
            raise ConfigError(f"{path}: key 'router.slo.{key}' must be {what}, got {v!r}")
        return v

    kw = {}
    for key, name in (("ttft_ms", "ttft_s"), ("tpot_ms", "tpot_s")):
        v = number(key, 0, True, "a positive number of milliseconds")
        kw[name] = None if v is None else v / 1e3
    v = number("max_queue_s", 0, False, "a number of seconds >= 0")
    if v is not None:
        kw["max_wait_s"] = float(v)
    v = number("max_waiting", 0, False, "an integer >= 0")
    if v is not None:
        if not isinstance(v, int):
            raise ConfigError(f"{path}: key 'router.slo.max_waiting' must be an integer >= 0, "
                              f"got {v!r}")
        kw["max_waiting"] = v
    return SloConfig(**kw)


def load_config(path: str | os.PathLike) -> ServeConfig:
    """Read and validate ``path``. Raises ConfigError naming the file and the key."""
    p = str(path)
    try:
        raw = yaml.safe_load(Path(p).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    _check_keys("", raw, ("model", "mode", "transport", "cluster_token", "router", "engine",
                          "workers", "launcher", "fault_injection", "kv_lease_s",
                          "kv_transfer_timeout_s"), p)
    model = _typed(p, "model", raw.get("model", "smollm2-135m"), str)
    mode = raw.get("mode", "disaggregated")
    if mode not in MODES:
        raise ConfigError(f"{p}: key 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    transport = raw.get("transport", "tcp")
    if transport not in TRANSPORTS:
        raise ConfigError(f"{p}: key 'transport' must be one of {', '.join(TRANSPORTS)}, "
                          f"got {transport!r}")
    launcher = raw.get("launcher", "local")
    if launcher not in ("local", "ray"):
        raise ConfigError(f"{p}: key 'launcher' must be local or ray, got {launcher!r}")
    token = raw.get("cluster_token")
    if token is None:
        token = os.environ.get("PDSERVE_CLUSTER_TOKEN") or secrets.token_hex(16)
    elif isinstance(token, str) and token.startswith("env:"):
        var = token[4:]
        if var not in os.environ:
            raise ConfigError(f"{p}: key 'cluster_token' names ${var}, which is not set")
        token = os.environ[var]
    token = _typed(p, "cluster_token", token, str)
    router_raw = raw.get("router") or {}
    if not isinstance(router_raw, dict):
        raise ConfigError(f"{p}: key 'router' must be a mapping")
    fields_ = {f.name: f for f in dataclasses.fields(RouterConfig)}
    _check_keys("router.", router_raw, fields_, p)
    router_kwargs = {}
    for k, v in router_raw.items():
        if k == "slo":
            router_kwargs[k] = _slo_section(p, v)
        elif k == "api_keys":
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{p}: key 'router.api_keys' must be a list of strings")
            router_kwargs[k] = tuple(v)
        else:
            kind = {"host": str, "port": int, "control_port": int}.get(k, float)
            router_kwargs[k] = _typed(p, f"router.{k}", v, kind)
    router = RouterConfig(**router_kwargs)
    if not 0 <= router.port < 65536:
        raise ConfigError(f"{p}: key 'router.port' must be a port number, got {router.port}")
    engine = _engine_section(p, "engine", raw.get("engine"))
    workers_raw = raw.get("workers")
    if not isinstance(workers_raw, list) or not workers_raw:
        raise ConfigError(f"{p}: key 'workers' must be a non-empty list")
    workers = []
    names = set()
    for i, w in enumerate(workers_raw):
        where = f"workers[{i}]"
        if not isinstance(w, dict):
            raise ConfigError(f"{p}: key '{where}' must be a mapping")
        _check_keys(f"{where}.", w, ("name", "role", "engine", "host", "env", "kv_port",
                                     "kv_advertise", "launch_prefix"), p)
        role = w.get("role")
        if role not in ROLES:
            raise ConfigError(f"{p}: key '{where}.role' must be one of {', '.join(ROLES)}, "
                              f"got {role!r}")
        name = _typed(p, f"{where}.name", w.get("name", f"{role}{i}"), str)
        if name in names:
            raise ConfigError(f"{p}: key '{where}.name': duplicate worker name {name!r}")
        names.add(name)
        env = w.get("env") or {}
        if not isinstance(env, dict):
            raise ConfigError(f"{p}: key '{where}.env' must be a mapping")
        kv_port = _typed(p, f"{where}.kv_port", w.get("kv_port", 0), int)
        if not 0 <= kv_port < 65536:
            raise ConfigError(f"{p}: key '{where}.kv_port' must be a port number, got {kv_port}")
        kv_advertise = _typed(p, f"{where}.kv_advertise", w.get("kv_advertise", ""), str)
        if kv_advertise and not kv_advertise.rpartition(":")[2].isdigit():
            raise ConfigError(f"{p}: key '{where}.kv_advertise' must be host:port, "
                              f"got {kv_advertise!r}")
        prefix = w.get("launch_prefix") or []
        if not isinstance(prefix, list) or not all(isinstance(x, str) for x in prefix):
            raise ConfigError(f"{p}: key '{where}.launch_prefix' must be a list of strings")
        workers.append(WorkerConfig(name=name, role=role,
                                    engine=_engine_section(p, f"{where}.engine", w.get("engine")),
                                    host=_typed(p, f"{where}.host", w.get("host", router.host),
                                                str),
                                    env={str(k): str(v) for k, v in env.items()},
                                    kv_port=kv_port, kv_advertise=kv_advertise,
                                    launch_prefix=tuple(prefix)))
    roles = {w.role for w in workers}
    if not roles & {"decode", "colocated"}:
        raise ConfigError(f"{p}: key 'workers' needs at least one decode or colocated worker")
    if mode == "colocated" and "prefill" in roles:
        raise ConfigError(f"{p}: key 'mode' is colocated but a worker has role prefill")
    if mode == "disaggregated" and "prefill" not in roles:
        raise ConfigError(f"{p}: key 'mode' is disaggregated but no worker has role prefill")
    faults = _fault_section(p, raw.get("fault_injection", False))
    timing = {}
    for key in ("kv_lease_s", "kv_transfer_timeout_s"):
        if key in raw:
            timing[key] = _typed(p, key, raw[key], float)
            if not timing[key] > 0:
                raise ConfigError(f"{p}: key '{key}' must be > 0, got {raw[key]!r}")
    return ServeConfig(path=p, model=model, mode=mode, transport=transport,
                       cluster_token=token, router=router, engine=engine,
                       workers=tuple(workers), launcher=launcher, **faults, **timing)


def _fault_section(path: str, data) -> dict:
    """``fault_injection`` (tests only): ``true`` (workers honour Stall messages), or a
    mapping that also corrupts a random fraction of KV transfers on purpose:
    ``{kv_fault_rate: 0.3, kv_fault_seed: 1}`` (the receiver's digests catch each one)."""
    if isinstance(data, bool):
        return {"fault_injection": data}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: key 'fault_injection' must be a boolean or a mapping")
    _check_keys("fault_injection.", data, ("kv_fault_rate", "kv_fault_seed"), path)
    rate = _typed(path, "fault_injection.kv_fault_rate", data.get("kv_fault_rate", 0.0), float)
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"{path}: key 'fault_injection.kv_fault_rate' must be within 0..1, "
                          f"got {rate!r}")
    seed = data.get("kv_fault_seed")
    if seed is not None:
        seed = _typed(path, "fault_injection.kv_fault_seed", seed, int)
    return {"fault_injection": True, "kv_fault_rate": rate, "kv_fault_seed": seed}
