"""Per-request timings -> latency metrics, throughput and goodput; plots.

One request, times in seconds from the moment it was sent::

    sent        first token        token 2   ...   last token   [DONE]
     |---- ttft ----|---- itl[0] ----|   ...   |              |
     |------------------------------- e2e ---------------------|
    tpot = (last token - first token) / (num_output_tokens - 1)

``token_times_s`` holds the time of every streamed chunk that carried text, so ITLs are
chunk gaps (a chunk normally carries one token). ``num_output_tokens`` comes from the
usage chunk. A request meets the SLO when it succeeded, its TTFT <= slo_ttft and its
TPOT <= slo_tpot (a one-token answer has no TPOT and passes that half); goodput is the
number of such requests per second of the run.
"""

from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    index: int
    scheduled_s: float  # planned arrival, from the start of the run
    sent_s: float  # actual send, from the start of the run
    num_prompt_tokens: int
    num_output_tokens: int = 0
    num_requested_output_tokens: int = 0
    token_times_s: list[float] = field(default_factory=list)  # from sent
    e2e_s: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_times_s)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] if self.ok else None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.num_output_tokens < 2:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) / (self.num_output_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:], strict=False)] if self.ok else []

    def meets(self, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
        if not self.ok:
            return False
        if slo_ttft_s is not None and self.ttft_s > slo_ttft_s:
            return False
        tpot = self.tpot_s
        return slo_tpot_s is None or tpot is None or tpot <= slo_tpot_s

    def to_json(self) -> dict:
        d = asdict(self)
        d["ttft_s"], d["tpot_s"] = self.ttft_s, self.tpot_s
        return d


def stats_ms(values_s: list[float]) -> dict | None:
    """mean / p50 / p90 / p99 / max in milliseconds (numpy's linear percentiles). Pure."""
    if not values_s:
        return None
    x = np.asarray(values_s, dtype=float) * 1000.0
    out = {"mean": float(x.mean())}
    out.update({f"p{p}": float(np.percentile(x, p)) for p in PERCENTILES})
    out["max"] = float(x.max())
    return {k: round(v, 3) for k, v in out.items()}


def summarize(results: list[RequestResult], duration_s: float,
              slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> dict:
    """Throughput, latency percentiles and goodput of one run. Pure."""
    ok = [r for r in results if r.ok]
    num_out = sum(r.num_output_tokens for r in ok)
    num_in = sum(r.num_prompt_tokens for r in ok)
    slo_ttft = None if slo_ttft_ms is None else slo_ttft_ms / 1000.0
    slo_tpot = None if slo_tpot_ms is None else slo_tpot_ms / 1000.0
    num_good = sum(r.meets(slo_ttft, slo_tpot) for r in results)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = (r.error or "no tokens").split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    return {
        "num_requests": len(results),
        "num_ok": len(ok),
        "num_errors": len(results) - len(ok),
        "errors": errors,
        "num_short_outputs": sum(r.num_output_tokens < r.num_requested_output_tokens
                                 for r in ok),
        "duration_s": round(duration_s, 4),
        "num_prompt_tokens": num_in,
        "num_output_tokens": num_out,
        "request_throughput": round(per_s(len(ok)), 4),
        "output_token_throughput": round(per_s(num_out), 3),
        "total_token_throughput": round(per_s(num_in + num_out), 3),
        "ttft_ms": stats_ms([r.ttft_s for r in ok]),
        "tpot_ms": stats_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": stats_ms([x for r in ok for x in r.itls_s]),
        "e2e_ms": stats_ms([r.e2e_s for r in ok]),
        "send_lag_ms": stats_ms([r.sent_s - r.scheduled_s for r in results]),
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "goodput": round(per_s(num_good), 4),
        "slo_attainment": round(num_good / len(results), 4) if results else 0.0,
    }


def _cdf(ax, values_ms: list[float], label: str) -> None:
    x = np.sort(np.asarray(values_ms, dtype=float))
    if len(x):
        ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=label)


def plot_runs(runs: list[dict], path, title: str = "", slo: dict | None = None) -> None:
    """CDFs of TTFT and TPOT for every run, plus SLO attainment and goodput against the
    rate when runs differ in rate. ``runs``: dicts with ``label``, ``rate``, ``series``
    (a label), ``summary`` and ``requests`` (``RequestResult``s). Writes ``path``."""
    plot_grid({"": runs}, path, title, slo)


def plot_grid(rows: dict[str, list[dict]], path, title: str = "",
              slo: dict | None = None) -> None:
    """``plot_runs`` for several named groups of runs, one row of panels each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_runs = [r for runs in rows.values() for r in runs]
    many_rates = len({r["rate"] for r in all_runs if r["rate"] is not None}) > 1
    ncols = 4 if many_rates else 2
    fig, axes = plt.subplots(len(rows), ncols, figsize=(4.6 * ncols, 3.8 * len(rows)),
                             squeeze=False)
    for ax_row, (name, runs) in zip(axes, rows.items(), strict=True):
        _plot_row(ax_row, runs, name, slo or {})
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_row(axes, runs: list[dict], name: str, slo: dict) -> None:
    prefix = f"{name}: " if name else ""
    for run in runs:
        ok = [q for q in run["requests"] if q.ok]
        _cdf(axes[0], [q.ttft_s * 1000 for q in ok], run["label"])
        _cdf(axes[1], [q.tpot_s * 1000 for q in ok if q.tpot_s is not None], run["label"])
    for ax, metric, key in ((axes[0], "TTFT", "ttft_ms"), (axes[1], "TPOT", "tpot_ms")):
        if slo.get(key):
            ax.axvline(slo[key], color="k", ls=":", lw=1)
        ax.set_xlabel(f"{metric} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{prefix}{metric} CDF", fontsize=9)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    if len(axes) < 4:
        return
    for series in dict.fromkeys(r["series"] for r in runs):
        pts = sorted(((r["rate"], r["summary"]) for r in runs
                      if r["series"] == series and r["rate"] is not None), key=lambda p: p[0])
        xs = [p[0] for p in pts]
        axes[2].plot(xs, [p[1]["slo_attainment"] for p in pts], "o-", label=series or "run")
        axes[3].plot(xs, [p[1]["goodput"] for p in pts], "o-", label=series or "run")
    for ax, ylabel in ((axes[2], "SLO attainment"), (axes[3], "goodput (req/s)")):
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{prefix}{ylabel}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
