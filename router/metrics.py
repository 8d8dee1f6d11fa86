"""Prometheus metrics of the HTTP front door, in a registry owned by one app.

Each ``create_app`` builds its own ``RouterMetrics`` (its own
``CollectorRegistry``), so several apps in one process never clash. A request
is followed by a ``RequestTracker``::

    tracker = metrics.start("chat")      # arrival time
    tracker.begin()                      # reached the dispatcher: running += 1
    tracker.on_tokens(n)                 # first call: TTFT; later calls: inter-token latency
    tracker.finish(200, num_prompt_tokens=37)   # running -= 1, counters; idempotent

Names (all prefixed ``pdserve_router_``): ``requests_total{endpoint,status}``,
``time_to_first_token_seconds``, ``inter_token_latency_seconds``,
``request_duration_seconds``, ``prompt_tokens_total``, ``generation_tokens_total``,
``running_requests``. ``status`` is the HTTP status, or for a stream the status
its error event carries; 499 marks a client that went away.
"""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "pdserve_router_"
CLIENT_CLOSED = 499
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class RouterMetrics:
    """The app's collectors. Mutated only through ``RequestTracker``s and ``count``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Time from request arrival to its first token",
                              ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds",
                             "Time between consecutive output tokens", ["endpoint"],
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram(PREFIX + "request_duration_seconds",
                                  "Time from request arrival to its end", ["endpoint"],
                                  buckets=_DURATION_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of served requests",
                                     ["endpoint"], registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Output tokens streamed",
                                         ["endpoint"], registry=r)
        self.running = Gauge(PREFIX + "running_requests", "Requests being generated now",
                             registry=r)

    def count(self, endpoint: str, status: int) -> None:
        """Count a request that never reached generation (auth, validation errors)."""
        self.requests.labels(endpoint, str(status)).inc()

    def start(self, endpoint: str) -> "RequestTracker":
        """Begin following one generation request (arrival is now). Pure."""
        return RequestTracker(self, endpoint)

    def exposition(self) -> str:
        """Prometheus text of this registry. Pure."""
        return generate_latest(self.registry).decode()


class RequestTracker:
    """One request's timings; records into its ``RouterMetrics``."""

    def __init__(self, metrics: RouterMetrics, endpoint: str) -> None:
        self._m = metrics
        self._endpoint = endpoint
        self._arrival = time.monotonic()
        self._last_token: float | None = None
        self._begun = False
        self._done = False

    def begin(self) -> None:
        """The request reached the dispatcher. Mutates the running gauge."""
        if not self._begun:
            self._begun = True
            self._m.running.inc()

    def on_tokens(self, num_tokens: int) -> None:
        """Record ``num_tokens`` new output tokens arriving now."""
        if num_tokens <= 0:
            return
        now = time.monotonic()
        ep = self._endpoint
        if self._last_token is None:
            self._m.ttft.labels(ep).observe(now - self._arrival)
        else:
            gap = (now - self._last_token) / num_tokens
            for _ in range(num_tokens):
                self._m.itl.labels(ep).observe(gap)
        self._last_token = now
        self._m.generation_tokens.labels(ep).inc(num_tokens)

    def finish(self, status: int, num_prompt_tokens: int) -> None:
        """Close the request with its HTTP (or error event) status. Idempotent."""
        if self._done:
            return
        self._done = True
        ep = self._endpoint
        if self._begun:
            self._m.running.dec()
        self._m.requests.labels(ep, str(status)).inc()
        self._m.prompt_tokens.labels(ep).inc(num_prompt_tokens)
        self._m.duration.labels(ep).observe(time.monotonic() - self._arrival)
