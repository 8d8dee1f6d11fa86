"""The config keys the fault rows use: the KV lease and transfer time-out, the
``fault_injection`` mapping, and per-worker ``kv_port`` / ``kv_advertise`` /
``launch_prefix``; each reaches the worker's spec, and bad values name their key."""

import json

import pytest
import yaml

from pdserve.engine.worker_main import spec_from_json
from pdserve.router.config import ConfigError, load_config
from pdserve.router.launcher import worker_spec_json

BASE = {"model": "smollm2-135m", "cluster_token": "t",
        "workers": [{"name": "p", "role": "prefill"}, {"name": "d", "role": "decode"}]}


def load(tmp_path, **over):
    cfg = {**BASE, **over}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def test_defaults(tmp_path):
    cfg = load(tmp_path)
    assert (cfg.kv_lease_s, cfg.kv_transfer_timeout_s) == (5.0, 120.0)
    assert (cfg.fault_injection, cfg.kv_fault_rate, cfg.kv_fault_seed) == (False, 0.0, None)
    d = cfg.workers[1]
    assert (d.kv_port, d.kv_advertise, d.launch_prefix) == (0, "", ())
    spec = spec_from_json(worker_spec_json(cfg, d, "127.0.0.1:1"))
    assert (spec.kv_lease_s, spec.transfer_timeout_s, spec.kv_port, spec.kv_advertise) == (
        5.0, 120.0, 0, "")
    assert spec.engine.extra == {}


def test_fault_and_fabric_keys_reach_the_worker_spec(tmp_path):
    workers = [{"name": "p", "role": "prefill", "launch_prefix": ["ip", "netns", "exec", "a"]},
               {"name": "d", "role": "decode", "kv_port": 40001,
                "kv_advertise": "127.0.0.1:40002"}]
    cfg = load(tmp_path, kv_lease_s=2, kv_transfer_timeout_s=7.5, workers=workers,
               fault_injection={"kv_fault_rate": 0.25, "kv_fault_seed": 3})
    assert (cfg.kv_lease_s, cfg.kv_transfer_timeout_s) == (2.0, 7.5)
    assert (cfg.fault_injection, cfg.kv_fault_rate, cfg.kv_fault_seed) == (True, 0.25, 3)
    assert cfg.workers[0].launch_prefix == ("ip", "netns", "exec", "a")
    p = spec_from_json(worker_spec_json(cfg, cfg.workers[0], "127.0.0.1:1"))
    d = spec_from_json(worker_spec_json(cfg, cfg.workers[1], "127.0.0.1:1"))
    assert p.engine.extra == {"fault_injection": True, "kv_fault_rate": 0.25,
                              "kv_fault_seed": 3}
    assert (p.kv_lease_s, p.transfer_timeout_s) == (2.0, 7.5)
    assert (d.kv_port, d.kv_advertise) == (40001, "127.0.0.1:40002")
    assert json.loads(worker_spec_json(cfg, cfg.workers[1], "x"))["kv_port"] == 40001


def test_fault_injection_true_stays_a_stall_switch(tmp_path):
    cfg = load(tmp_path, fault_injection=True)
    assert (cfg.fault_injection, cfg.kv_fault_rate) == (True, 0.0)
    spec = spec_from_json(worker_spec_json(cfg, cfg.workers[0], "x"))
    assert spec.engine.extra == {"fault_injection": True}


@pytest.mark.parametrize("over,message", [
    ({"kv_lease_s": 0}, "key 'kv_lease_s' must be > 0, got 0"),
    ({"kv_transfer_timeout_s": "soon"}, "key 'kv_transfer_timeout_s' must be float"),
    ({"fault_injection": {"kv_fault_rate": 1.5}},
     "key 'fault_injection.kv_fault_rate' must be within 0..1, got 1.5"),
    ({"fault_injection": {"rate": 0.1}}, "unknown key 'fault_injection.rate'"),
    ({"fault_injection": "yes"}, "key 'fault_injection' must be a boolean or a mapping"),
    ({"workers": [{"name": "p", "role": "prefill"},
                  {"name": "d", "role": "decode", "kv_port": 70000}]},
     "key 'workers[1].kv_port' must be a port number, got 70000"),
    ({"workers": [{"name": "p", "role": "prefill"},
                  {"name": "d", "role": "decode", "kv_advertise": "nohost"}]},
     "key 'workers[1].kv_advertise' must be host:port, got 'nohost'"),
    ({"workers": [{"name": "p", "role": "prefill", "launch_prefix": "ip netns exec a"},
                  {"name": "d", "role": "decode"}]},
     "key 'workers[0].launch_prefix' must be a list of strings"),
])
def test_bad_values_name_the_file_and_key(tmp_path, over, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, **over)
    assert str(info.value).startswith(str(tmp_path / "c.yaml") + ": ")
    assert message in str(info.value)
