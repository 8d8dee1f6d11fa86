"""What every benchmark result carries: command, git revision, machine, date."""

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def git_revision() -> str:
    rev = os.environ.get("PDSERVE_REV")
    if rev:
        return rev
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} (CPU)"


def write_result(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write ``payload`` plus provenance as JSON; returns the path. Mutates the filesystem."""
    record = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "git_revision": git_revision(),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **payload,
    }
    out_dir = Path(out_dir or os.environ.get("OUT") or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
