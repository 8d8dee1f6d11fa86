"""Public request traces -> ``TraceRow``s: Azure LLM inference CSVs and Mooncake JSONL.

    read_azure(path)     TIMESTAMP,ContextTokens,GeneratedTokens   (wall-clock timestamps)
    read_mooncake(path)  {timestamp (ms), input_length, output_length, hash_ids}
    read_trace(path)     either, chosen by the file's suffix (.csv / .jsonl)
    select_rows(rows, num_requests, sample, skip, seed)   a contiguous window or a seeded sample
    scale_rows(rows, length_scale, max_input, max_output) lengths shrunk to fit a small box

Every row's ``timestamp_s`` counts from the trace's first row (the first row is 0.0).
Mooncake ``hash_ids`` name 512-token prompt blocks, chained over the prefix: equal ids
at the same position mean a shared prefix (``MOONCAKE_BLOCK_TOKENS``).
"""

import csv
import datetime
import json
import math
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512
TRACES_DIR = Path(os.environ.get("PDSERVE_TRACES_DIR", "/work/shared/traces"))
NAMED_TRACES = {
    "azure-conv": "AzureLLMInferenceTrace_conv_2023.csv",
    "azure-code": "AzureLLMInferenceTrace_code_2023.csv",
    "mooncake": "mooncake_synthetic_trace.jsonl",
}


@dataclass(frozen=True)
class TraceRow:
    timestamp_s: float
    num_input_tokens: int
    num_output_tokens: int
    hash_ids: tuple[int, ...] | None = None  # Mooncake only
    block_tokens: int = MOONCAKE_BLOCK_TOKENS  # tokens each hash id stands for


def trace_path(name_or_path: str) -> Path:
    """A named trace (``azure-conv``, ``azure-code``, ``mooncake``) in TRACES_DIR, or a path."""
    if name_or_path in NAMED_TRACES:
        return TRACES_DIR / NAMED_TRACES[name_or_path]
    return Path(name_or_path)


def _azure_seconds(stamp: str) -> float:
    """'2023-11-16 18:17:03.9799600' -> POSIX seconds (7 fraction digits kept as a float)."""
    whole, _, frac = stamp.strip().partition(".")
    t = datetime.datetime.strptime(whole, "%Y-%m-%d %H:%M:%S")
    t = t.replace(tzinfo=datetime.timezone.utc)
    return t.timestamp() + (float("0." + frac) if frac else 0.0)


def read_azure(path: Path) -> list[TraceRow]:
    with open(path, newline="") as f:
        rows = [(_azure_seconds(r["TIMESTAMP"]), int(r["ContextTokens"]),
                 int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
    if not rows:
        return []
    t0 = rows[0][0]
    return [TraceRow(t - t0, n_in, n_out) for t, n_in, n_out in rows]


def read_mooncake(path: Path) -> list[TraceRow]:
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            out.append(TraceRow(r["timestamp"] / 1000.0, int(r["input_length"]),
                                int(r["output_length"]), tuple(r["hash_ids"])))
    if out and out[0].timestamp_s:
        t0 = out[0].timestamp_s
        out = [replace(r, timestamp_s=r.timestamp_s - t0) for r in out]
    return out


def read_trace(path: str | Path) -> list[TraceRow]:
    path = trace_path(str(path))
    if path.suffix == ".csv":
        return read_azure(path)
    if path.suffix in (".jsonl", ".json"):
        return read_mooncake(path)
    raise ValueError(f"unknown trace format {path.suffix!r} for {path} (want .csv or .jsonl)")


def select_rows(rows: list[TraceRow], num_requests: int | None, sample: str = "first",
                skip: int = 0, seed: int = 0) -> list[TraceRow]:
    """``first``: rows[skip : skip + n]; ``random``: a seeded sample of n rows kept in
    trace order. Timestamps are re-based so the first selected row is at 0. Pure."""
    pool = rows[skip:]
    n = len(pool) if num_requests is None else min(num_requests, len(pool))
    if sample == "first":
        chosen = pool[:n]
    elif sample == "random":
        idx = sorted(random.Random(seed).sample(range(len(pool)), n))
        chosen = [pool[i] for i in idx]
    else:
        raise ValueError(f"sample must be 'first' or 'random', not {sample!r}")
    if not chosen:
        return []
    t0 = chosen[0].timestamp_s
    return [replace(r, timestamp_s=r.timestamp_s - t0) for r in chosen]


def scale_rows(rows: list[TraceRow], length_scale: float = 1.0, max_input: int | None = None,
               max_output: int | None = None) -> list[TraceRow]:
    """Lengths times ``length_scale`` (at least 1), then capped. A Mooncake block shrinks
    with the scale too (``block_tokens``), so the prefix structure is kept. Pure."""
    block = max(1, round(MOONCAKE_BLOCK_TOKENS * length_scale))
    out = []
    for r in rows:
        n_in = max(1, round(r.num_input_tokens * length_scale))
        n_out = max(1, round(r.num_output_tokens * length_scale))
        if r.hash_ids is not None:  # stay within the blocks the trace names
            n_in = min(n_in, len(r.hash_ids) * block)
        if max_input is not None:
            n_in = min(n_in, max_input)
        if max_output is not None:
            n_out = min(n_out, max_output)
        out.append(replace(r, num_input_tokens=n_in, num_output_tokens=n_out,
                           block_tokens=block if r.hash_ids is not None else r.block_tokens))
    return out


def num_blocks(row: TraceRow) -> int:
    """How many of the row's hash ids its (possibly scaled) prompt reaches."""
    return math.ceil(row.num_input_tokens / row.block_tokens)
