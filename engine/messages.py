"""Messages of the request/token plane (ZeroMQ + msgspec msgpack; nothing pickled).

    router --GenerateRequest/Abort--> decode worker (or colocated worker)
    router --Reroute--> decode worker       (its prefill peer was ejected)
    decode --PrefillRequest/Abort--> prefill worker
    decode --LeaseRenew--> prefill worker  (while it still expects the KV; engine/lease.py)
    prefill --PrefillDone--> decode          (after the last KV layer is sent)
    worker --TokenBatch--> router            (one message per step, many sequences)

Every message carries the cluster token; a receiver drops frames without it.
"""

import msgspec

from pdserve.engine.sampling_params import SamplingParams


class SamplingSpec(msgspec.Struct, frozen=True, omit_defaults=True):
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def to_params(self) -> SamplingParams:
        """Validated engine params; raises ValueError naming a bad field."""
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
            max_tokens=self.max_tokens, stop=tuple(self.stop),
            stop_token_ids=tuple(self.stop_token_ids), ignore_eos=self.ignore_eos,
            logprobs=self.logprobs, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output)


class GenerateRequest(msgspec.Struct, tag="generate", frozen=True):
    token: str
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    prefill_worker: str | None = None  # worker id of the prefill peer; None = prefill here
    deadline: float | None = None  # unix time after which the request is aborted


class PrefillRequest(msgspec.Struct, tag="prefill", frozen=True):
    token: str
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    decode_worker: str  # worker id of the decode peer (where PrefillDone goes)
    kv_address: str  # decode side's fabric endpoint
    first_block: int  # index of the first prompt block the decode side lacks
    dst_block_ids: list[int]  # decode-side block ids for prompt blocks first_block..
    deadline: float | None = None


class PrefillDone(msgspec.Struct, tag="prefill_done", frozen=True):
    token: str
    request_id: str
    first_token_id: int | None  # None on error
    logprob: list | None = None  # [token_id, logprob, [[top id, top logprob], ...]]
    num_cached_tokens: int = 0
    kv_bytes: int = 0
    error: str | None = None


class Abort(msgspec.Struct, tag="abort", frozen=True):
    token: str
    request_id: str


class LeaseRenew(msgspec.Struct, tag="lease_renew", frozen=True):
    """Decode -> prefill: keep holding these requests' blocks for me (``engine/lease.py``).
    Renewals for holds the prefill worker no longer has are ignored."""

    token: str
    decode_worker: str  # the renewing decode worker's request address (the lease's peer)
    request_ids: list[str]


class Reroute(msgspec.Struct, tag="reroute", frozen=True):
    """Router -> decode: the prefill peer of this request is gone; prefill it here."""

    token: str
    request_id: str
    reason: str = ""


class Stall(msgspec.Struct, tag="stall", frozen=True):
    """Fault injection (only honoured when the worker was started with it enabled):
    block the engine loop for ``seconds`` while the heartbeat thread keeps answering."""

    token: str
    seconds: float


class TokenDelta(msgspec.Struct, frozen=True, omit_defaults=True):
    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # per new token: [sampled id, sampled logprob, [[top id, top logprob], ...]]
    logprobs: list[list] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None


class TokenBatch(msgspec.Struct, tag="tokens", frozen=True):
    token: str
    worker_id: str
    deltas: list[TokenDelta]


Message = (GenerateRequest | PrefillRequest | PrefillDone | Abort | TokenBatch | Reroute | Stall
           | LeaseRenew)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Message:
    """Raises msgspec.DecodeError / ValidationError on a malformed frame."""
    return _decoder.decode(data)
