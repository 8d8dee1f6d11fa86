"""Start real ``pdserve serve`` processes (router + workers) for end-to-end tests."""

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str
    port: int
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)  # time.monotonic() of each line

    def status(self) -> dict:
        host = self.url.removeprefix("http://").rsplit(":", 1)[0]
        out = subprocess.run([sys.executable, "-m", "pdserve.router.cli", "status", "--json",
                              "--host", host, "--port", str(self.port)],
                             capture_output=True, text=True, timeout=30, check=True)
        import json

        return json.loads(out.stdout)

    def poll_status(self) -> dict:
        """The router's /status as ``status`` prints it, without starting a process: for
        polling loops (a ``pdserve status`` process costs ~0.5 s of a core the workers
        under test need)."""
        return httpx.get(self.url + "/status", timeout=10).json()

    def wait_quiet(self, timeout_s: float = 30.0, names: set[str] | None = None) -> dict:
        """Wait until every worker (or every one in ``names``: a killed worker's last
        report stays stale forever) reports every block free and nothing running; returns
        ``pdserve status`` then."""
        deadline = time.monotonic() + timeout_s
        while True:
            ws = [w for w in self.poll_status()["workers"] if names is None or w["name"] in names]
            if all(w["free_blocks"] == w["total_blocks"] and w["running"] == 0
                   and w["waiting"] == 0 and w["pending_transfers"] == 0 for w in ws):
                return self.status()
            if time.monotonic() > deadline:
                return self.status()
            time.sleep(0.3)


def write_config(tmp_path, port: int, **overrides) -> str:
    cfg = {
        "model": "smollm2-135m",
        "mode": "disaggregated",
        "transport": "tcp",
        "router": {"host": "127.0.0.1", "port": port, "request_timeout_s": 120},
        "engine": {"device": "cpu", "num_blocks": 512, "max_num_seqs": 48,
                   "max_num_batched_tokens": 256},
        "workers": [{"name": "prefill0", "role": "prefill"},
                    {"name": "decode0", "role": "decode"}],
    }
    for k, v in overrides.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    path = tmp_path / f"serve-{port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def start_serve(config_path: str, port: int, timeout_s: float = 240.0,
                host: str = "127.0.0.1") -> Served:
    """``pdserve serve config_path --port port``; ``host``: the config's router.host."""
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.router.cli", "serve", config_path,
                             "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    served = Served(f"http://{host}:{port}", port, proc)

    def pump():
        for line in iter(proc.stdout.readline, ""):
            served.stamps.append(time.monotonic())
            served.lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not any("pdserve: serving" in ln for ln in served.lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("pdserve serve did not start:\n" + "".join(served.lines))
        time.sleep(0.2)
    httpx.get(served.url + "/health", timeout=10).raise_for_status()
    return served


def stop_serve(served: Served) -> int:
    served.proc.terminate()
    try:
        return served.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        served.proc.kill()
        return -9


@pytest.fixture(scope="session")
def reference_llm():
    from pdserve import LLM

    return LLM("smollm2-135m", num_blocks=256)


@pytest.fixture(scope="session")
def expected(reference_llm):
    """Greedy texts of single-process decoding for the fault rows' prompts (faults.py)."""
    from pdserve import SamplingParams
    from tests.e2e.faults import MAX_TOKENS, NUM_PROMPTS, prompt

    outs = reference_llm.chat([prompt(i) for i in range(NUM_PROMPTS)],
                              SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                              use_tqdm=False)
    return {i: o.text for i, o in enumerate(outs)}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure, attach the last lines of a ``cluster`` fixture's output (router and
    ``[worker]`` lines) to the report."""
    outcome = yield
    report = outcome.get_result()
    served = getattr(item, "funcargs", {}).get("cluster")
    if report.failed and hasattr(served, "stamps"):
        t0 = served.stamps[0] if served.stamps else 0.0
        tail = zip(served.stamps[-150:], served.lines[-150:], strict=False)
        report.sections.append(("pdserve output (last 150 lines, seconds since start)",
                                "".join(f"{t - t0:8.2f} {line}" for t, line in tail)))


@pytest.fixture(scope="session")
def expected_long(reference_llm):
    """Greedy texts of ``long_prompt(i)`` for i < 4 (faults.py)."""
    from pdserve import SamplingParams
    from tests.e2e.faults import LONG_MAX_TOKENS, long_prompt

    outs = reference_llm.chat([long_prompt(i) for i in range(4)],
                              SamplingParams(temperature=0, max_tokens=LONG_MAX_TOKENS),
                              use_tqdm=False)
    return {i: o.text for i, o in enumerate(outs)}
