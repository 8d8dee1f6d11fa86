"""A request inside the engine: one invariant instead of phases.

    all_token_ids = prompt_token_ids + output_token_ids      (num_tokens)
    [0 ............. num_computed_tokens) have KV in the cache
    [num_computed_tokens .. num_tokens)   still to compute

Prefill, chunked prefill, prefix hits and decode are all "compute the rest".
"""

import enum
from dataclasses import dataclass, field

from pdserve.engine.block_pool import Block
from pdserve.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # blocks held, KV arriving from a prefill peer
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens clipped to the context
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_computed_total: int = 0  # tokens this request has actually run through the model
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    blocks: list[Block] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of full blocks, in order
    stop_reason: str | int | None = None
    # Decode-only mode: stop after the prompt is computed and its first token sampled.
    prefill_only: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None
