"""SLO targets: the YAML ``router.slo`` section and the request body's ``slo`` field."""

import pytest

from pdserve.router.admission import SloConfig, SloTargets
from pdserve.router.config import ConfigError, load_config
from pdserve.router.protocol import ApiError, parse_chat, parse_completion

USER = [{"role": "user", "content": "Hi"}]
BASE = """model: smollm2-135m
workers:
  - {name: prefill0, role: prefill}
  - {name: decode0, role: decode}
router:
  port: 8000
"""


@pytest.fixture(scope="module")
def tok():
    from pdserve.engine.tokenizer import load_tokenizer
    from pdserve.engine.weights import resolve_model_dir

    return load_tokenizer(resolve_model_dir("smollm2-135m"))


def config(tmp_path, slo: str):
    path = tmp_path / "c.yaml"
    path.write_text(BASE + slo)
    return load_config(path)


def test_router_slo_section_loads_into_the_frozen_config(tmp_path):
    assert config(tmp_path, "").router.slo == SloConfig()
    cfg = config(tmp_path, "  slo: {ttft_ms: 250, tpot_ms: 40, max_queue_s: 2, max_waiting: 8}\n")
    assert cfg.router.slo == SloConfig(ttft_s=0.25, tpot_s=0.04, max_waiting=8, max_wait_s=2.0)
    assert cfg.router.slo.as_dict() == {"ttft_ms": 250.0, "tpot_ms": 40.0, "max_queue_s": 2.0,
                                        "max_waiting": 8}
    only = config(tmp_path, "  slo: {tpot_ms: 0.5, max_queue_s: 0}\n").router.slo
    assert (only.ttft_s, only.tpot_s, only.max_wait_s, only.max_waiting) == (None, 0.0005,
                                                                            0.0, 64)


@pytest.mark.parametrize("slo, message", [
    ("[1, 2]", "key 'router.slo' must be a mapping"),
    ("{ttft: 5}", "unknown key 'router.slo.ttft' (allowed: max_queue_s, max_waiting, "
                  "tpot_ms, ttft_ms)"),
    ("{ttft_ms: 0}", "key 'router.slo.ttft_ms' must be a positive number of milliseconds, "
                     "got 0"),
    ("{tpot_ms: -3}", "key 'router.slo.tpot_ms' must be a positive number of milliseconds, "
                      "got -3"),
    ("{ttft_ms: fast}", "key 'router.slo.ttft_ms' must be a positive number of "
                        "milliseconds, got 'fast'"),
    ("{ttft_ms: .inf}", "key 'router.slo.ttft_ms' must be a positive number of "
                        "milliseconds, got inf"),
    ("{max_queue_s: -1}", "key 'router.slo.max_queue_s' must be a number of seconds >= 0, "
                          "got -1"),
    ("{max_waiting: 2.5}", "key 'router.slo.max_waiting' must be an integer >= 0, got 2.5"),
    ("{max_waiting: true}", "key 'router.slo.max_waiting' must be an integer >= 0, got True"),
])
def test_bad_router_slo_is_one_line_naming_file_and_key(tmp_path, slo, message):
    with pytest.raises(ConfigError) as e:
        config(tmp_path, f"  slo: {slo}\n")
    assert str(e.value) == f"{tmp_path / 'c.yaml'}: {message}"
    assert "\n" not in str(e.value)


def test_request_slo_field_parses_to_seconds(tok):
    req = parse_chat({"messages": USER, "slo": {"ttft_ms": 500, "tpot_ms": 25.5}}, "m", 100,
                     tok)
    assert req.slo == SloTargets(ttft_s=0.5, tpot_s=0.0255)
    assert parse_chat({"messages": USER}, "m", 100, tok).slo is None
    assert parse_chat({"messages": USER, "slo": None}, "m", 100, tok).slo is None
    assert parse_chat({"messages": USER, "slo": {"tpot_ms": None}}, "m", 100, tok).slo == \
        SloTargets(None, None)
    done = parse_completion({"prompt": "Hi", "slo": {"ttft_ms": 2000}}, "m", 100, tok)
    assert done.slo == SloTargets(ttft_s=2.0, tpot_s=None)


@pytest.mark.parametrize("slo, param, message", [
    ("fast", "slo", "'slo' must be an object, got a string"),
    ({"ttft": 5}, "slo.ttft", "'slo' has an unknown key 'ttft' (allowed: ttft_ms, tpot_ms)"),
    ({"ttft_ms": 0}, "slo.ttft_ms", "'slo.ttft_ms' must be a positive number of "
                                    "milliseconds, got 0"),
    ({"tpot_ms": -1.5}, "slo.tpot_ms", "'slo.tpot_ms' must be a positive number of "
                                       "milliseconds, got -1.5"),
    ({"tpot_ms": "50"}, "slo.tpot_ms", "'slo.tpot_ms' must be a positive number of "
                                       "milliseconds, got \"50\""),
    ({"ttft_ms": True}, "slo.ttft_ms", "'slo.ttft_ms' must be a positive number of "
                                       "milliseconds, got true"),
])
def test_bad_request_slo_is_a_400(tok, slo, param, message):
    for parse, body in ((parse_chat, {"messages": USER}), (parse_completion, {"prompt": "Hi"})):
        with pytest.raises(ApiError) as e:
            parse({**body, "slo": slo}, "m", 100, tok)
        err = e.value.body()["error"]
        assert (e.value.status_code, err["param"], err["message"]) == (400, param, message)
        assert err["type"] == "invalid_request_error"
