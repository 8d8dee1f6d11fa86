"""The launcher shares a machine's cores among the CPU workers it starts there."""

from pathlib import Path

from pdserve.router.config import load_config
from pdserve.router.launcher import cpu_threads_per_worker

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_two_cpu_workers_share_two_cores():
    cfg = load_config(CONFIGS / "local.yaml")
    assert cpu_threads_per_worker(cfg, 2) == {"prefill0": 1, "decode0": 1}
    assert cpu_threads_per_worker(cfg, 16) == {"prefill0": 8, "decode0": 8}


def test_four_cpu_workers_never_get_zero_threads():
    cfg = load_config(CONFIGS / "local-2p2d.yaml")
    assert cpu_threads_per_worker(cfg, 2) == {"prefill0": 1, "prefill1": 1,
                                              "decode0": 1, "decode1": 1}


def test_gpu_workers_are_left_alone():
    cfg = load_config(CONFIGS / "gpu-1x-disagg.yaml")
    assert cpu_threads_per_worker(cfg, 16) == {}
