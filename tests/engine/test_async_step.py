"""The one-step lookahead (engine/async_step.py) against the synchronous step, on the
real model: the same tokens, text, finish reasons and logprobs, nothing extra emitted,
every block free at the end. On the CPU nothing overlaps, but the lookahead, the
discarded rows and the token feed from the sampled-ids tensor run as on a GPU."""

import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.config import EngineConfig

PROMPTS = ["Hello, my name is", "The capital of France is", "1, 2, 3, 4,",
           "Write a poem about the sea", "Count: 1, 2, 3,",
           "In a distant galaxy, far beyond the reach of any telescope, there lived"]


def _llm(overlap: bool, **kw) -> LLM:
    kw = {"num_blocks": 128, "max_num_batched_tokens": 64, **kw}
    return LLM("smollm2-135m", async_scheduling=overlap, **kw)


@pytest.fixture(scope="module")
def pair():
    return _llm(False), _llm(True)


@pytest.fixture(scope="module")
def greedy(pair):
    """The synchronous engine's greedy continuations of PROMPTS (12 tokens, no EOS)."""
    return pair[0].generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12,
                                                    ignore_eos=True), use_tqdm=False)


class LaunchLog:
    """Records every step the runner launches: (rows, whether fed from the device)."""

    def __init__(self, llm: LLM) -> None:
        self.steps: list[tuple[tuple[str, ...], bool]] = []
        runner = llm.engine.runner
        launch = runner.launch

        def logged(out, layer_hook=None, feed=None):
            inputs, sample = launch(out, layer_hook, feed)
            ids = tuple(s.request.request_id for s in inputs.sample_order)
            self.steps.append((ids, feed is not None))
            return inputs, sample

        runner.launch = logged
        self._undo = lambda: delattr(runner, "launch")

    def close(self) -> None:
        self._undo()

    @property
    def rows(self) -> int:
        return sum(len(ids) for ids, _ in self.steps)

    @property
    def fed(self) -> int:
        return sum(1 for _, fed in self.steps if fed)


def _same(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert x.text == y.text
        assert x.finish_reason == y.finish_reason
        assert x.outputs[0].stop_reason == y.outputs[0].stop_reason
        assert x.outputs[0].logprobs == y.outputs[0].logprobs


def _all_free(llm: LLM) -> None:
    e = llm.engine
    assert not e.has_unfinished() and not e.has_work()
    assert e.pool.num_free_blocks == e.pool.num_blocks
    assert e.scheduler.num_running == 0 and e.scheduler.num_waiting == 0


def test_switch(pair):
    sync, ahead = pair
    assert sync.engine.lookahead is None and ahead.engine.lookahead is not None
    assert EngineConfig().async_scheduling is None  # None: on exactly when graphs run


def test_alone_stop_token_emits_nothing_extra_and_max_tokens_runs_no_extra_row(pair,
                                                                                greedy):
    sync, ahead = pair
    base = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    full = greedy[4].token_ids[:10]
    tid = full[5]
    k = full.index(tid) + 1
    stop = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[tid])
    log = LaunchLog(ahead)
    try:
        out = ahead.generate(PROMPTS[4], stop, use_tqdm=False)[0]
        # prefill (synchronous) + k - 1 decodes + 1 lookahead row dropped: k + 1 rows
        assert out.token_ids == full[:k] and out.finish_reason == "stop"
        assert out.outputs[0].stop_reason == tid
        assert log.rows == k + 1 and log.fed == k - 1
        log.steps.clear()
        out = ahead.generate(PROMPTS[4], base, use_tqdm=False)[0]
        # max_tokens is known ahead: the last token's step has no lookahead behind it
        assert out.token_ids == full and out.finish_reason == "length"
        assert log.rows == 10 and log.fed == 8
    finally:
        log.close()
    _all_free(ahead)


def test_mixed_batch_finishing_on_eos_stop_token_stop_string_and_length(pair, greedy):
    sync, ahead = pair
    full = greedy
    params = [
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                       stop_token_ids=[full[1].token_ids[6]]),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                       stop=[full[2].text[3:6]]),
        SamplingParams(temperature=0, max_tokens=12),  # ends on EOS (token 2)
        SamplingParams(temperature=0, max_tokens=11, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    ]
    want = sync.generate(PROMPTS, params, use_tqdm=False)
    log = LaunchLog(ahead)
    try:
        got = ahead.generate(PROMPTS, params, use_tqdm=False)
    finally:
        log.close()
    _same(got, want)
    assert [o.finish_reason for o in got] == ["length", "stop", "stop", "stop", "length",
                                              "length"]
    assert got[3].token_ids[-1] == 2 and got[3].outputs[0].stop_reason is None
    assert got[1].outputs[0].stop_reason == full[1].token_ids[6]
    assert got[2].outputs[0].stop_reason == full[2].text[3:6]
    assert [len(o.token_ids) for o in got] == [3, 7, len(want[2].token_ids), 9, 11, 12]
    assert log.fed > 0
    # every row beyond the emitted tokens belongs to a request that stopped unexpectedly
    # (stop token, stop string, EOS): at most one each
    extra = log.rows - sum(len(o.token_ids) for o in got)
    assert 1 <= extra <= 3
    _all_free(ahead)


def test_seeded_sampling_and_logprobs_equal_the_synchronous_step(pair):
    sync, ahead = pair
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=11 + i,
                             max_tokens=4 + 2 * i, ignore_eos=True, logprobs=2)
              for i in range(3)]
    params += [SamplingParams(temperature=0, max_tokens=6, logprobs=3),
               SamplingParams(temperature=1.2, seed=5, max_tokens=10)]
    want = sync.generate(PROMPTS[:5], params, use_tqdm=False)
    got = ahead.generate(PROMPTS[:5], params, use_tqdm=False)
    _same(got, want)
    assert [len(o.token_ids) for o in got] == [4, 6, 8, len(want[3].token_ids), 10]
    for o, p in zip(got[:4], params[:4], strict=True):
        assert [lp.token_id for lp in o.outputs[0].logprobs] == o.token_ids
        assert all(len(lp.top) == p.logprobs for lp in o.outputs[0].logprobs)
    _all_free(ahead)


def _drive(llm: LLM, abort_after: int) -> list[list[tuple]]:
    e = llm.engine
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for i, text in enumerate(PROMPTS[:3]):
        e.add_request(f"drive-{i}", llm.tokenizer.encode(text), p)
    calls = []
    while e.has_unfinished():
        deltas = e.step()
        calls.append([(d.request_id, d.new_token_ids, d.new_text, d.finished,
                       d.finish_reason, d.num_output_tokens) for d in deltas])
        if len(calls) == abort_after:
            assert e.abort("drive-1")
    return calls


def test_abort_mid_stream_gives_the_same_deltas_call_by_call(pair):
    sync, ahead = pair
    want = _drive(sync, abort_after=3)
    got = _drive(ahead, abort_after=3)
    assert got == want  # call k returns step k's deltas on both paths
    assert sum(1 for c in got for d in c if d[0] == "drive-1") == 3
    assert [d[0] for d in got[-1]] == ["drive-0", "drive-2"] and got[-1][0][5] == 8
    _all_free(sync)
    _all_free(ahead)


def test_prefix_cache_registers_only_accepted_tokens(pair, greedy):
    sync, ahead = pair
    for llm in pair:
        assert llm.engine.pool.reset_prefix_cache()
    # stops on its 10th token: the lookahead row after it is dropped
    first = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                           stop_token_ids=[greedy[5].token_ids[9]])
    a = ahead.generate(PROMPTS[5], first, use_tqdm=False)[0]
    assert a.token_ids == greedy[5].token_ids[:10] and a.finish_reason == "stop"
    assert sync.generate(PROMPTS[5], first, use_tqdm=False)[0].token_ids == a.token_ids
    follow = ahead.tokenizer.encode(PROMPTS[5]) + a.token_ids + ahead.tokenizer.encode(" Then")
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    want = sync.generate([follow], p, use_tqdm=False)[0]
    got = ahead.generate([follow], p, use_tqdm=False)[0]
    assert got.token_ids == want.token_ids
    assert got.num_cached_tokens == want.num_cached_tokens > 0
    _all_free(ahead)


def test_pool_too_small_preempts_and_frees_every_block():
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    prompts = PROMPTS[:4]  # 5-11 tokens each: 2 blocks each by the end, 6 in the pool
    outs = []
    for overlap in (False, True):
        small = _llm(overlap, num_blocks=6)
        outs.append(small.generate(prompts, params, use_tqdm=False))
        assert small.engine.scheduler.num_preemptions > 0
        _all_free(small)
    _same(outs[1], outs[0])
    assert all(len(o.token_ids) == 14 and o.finish_reason == "length" for o in outs[1])


def test_transfer_hooks_while_a_step_is_in_flight(pair):
    """Decode side of a hand-off on the lookahead engine: blocks reserved and the request
    queued while decodes run ahead; the KV (computed by a prefill-only request on the
    synchronous engine, copied block by block) gives the same tokens as a local run."""
    sync, ahead = pair
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = sync.tokenizer.encode(PROMPTS[5])
    want = sync.generate([prompt], p, use_tqdm=False)[0].token_ids
    pe, de = sync.engine, ahead.engine
    pe.add_request("xfer", prompt, p, prefill_only=True)
    while pe.has_unfinished():
        pe.step()
    (src,) = pe.finished_prefills
    assert src.finish_reason == "length" and src.blocks  # held until the KV is sent
    bg: dict[str, list[int]] = {"bg-0": [], "bg-1": []}
    for i in range(2):
        de.add_request(f"bg-{i}", ahead.tokenizer.encode(PROMPTS[i]), p)
    for _ in range(2):
        for d in de.step():
            bg[d.request_id].extend(d.new_token_ids)
    assert de.lookahead.in_flight is not None
    req = de.reserve_for_transfer("xfer", prompt, p)
    assert req is not None and len(req.blocks) == len(src.blocks)
    for (pk, pv), (dk, dv) in zip(pe.kv_cache.layers, de.kv_cache.layers, strict=True):
        dk[req.block_ids] = pk[src.block_ids]
        dv[req.block_ids] = pv[src.block_ids]
    pe.release_prefill(src)
    tokens = list(de.complete_transfer("xfer", src.output_token_ids[0]).new_token_ids)
    while de.has_unfinished():
        for d in de.step():
            (tokens if d.request_id == "xfer" else bg[d.request_id]).extend(d.new_token_ids)
    assert tokens == want
    alone = sync.generate(PROMPTS[:2], p, use_tqdm=False)
    assert [bg["bg-0"], bg["bg-1"]] == [o.token_ids for o in alone]
    _all_free(sync)
    _all_free(ahead)
