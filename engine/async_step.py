"""One-step lookahead: the host launches step n+1 before it reads step n's tokens.

A decode step's host work (schedule, inputs, launch, then update, stop checks,
detokenizing) used to sit between two GPU steps. With the lookahead it runs
while the GPU computes::

    host: | launch n | launch n+1 | process n | launch n+2 | process n+1 | ...
    GPU:             [ step n    ][ step n+1              ][ step n+2 ...

Step n+1 needs no token value from the host: its input ids are step n's
sampled ids, read on the device (``TokenFeed``); positions, slots, context
lengths and block tables follow from the counts alone. ``plan_next`` gives
each request of step n that may go on the slot for its one more token and
schedules it one position ahead; ``LLMEngine.step`` then processes step n
(``Scheduler.update``, deltas) exactly as the synchronous path does.

What runs ahead, and what does not (the synchronous step runs instead):

- only a step of decodes (one token each, each sampling), none of them
  ``prefill_only`` (prefill workers stay synchronous), launched from a plain
  ``schedule()``; the next step continues the same requests;
- no lookahead while a waiting request could be admitted (a free seat):
  admission, prefill chunks and preemption stay in ``Scheduler.schedule``,
  which runs only when no step is in flight. A request waiting for a seat
  is admitted one step later than the synchronous path would;
- no lookahead when the pool cannot give every continuing request its slot
  (the synchronous step preempts instead);
- a request known to finish with step n's token (``max_tokens``, the
  context, ``prefill_only``) is left out of step n+1.

A request that turns out to finish at step n (EOS, stop token, stop string)
or is aborted while step n+1 runs has one extra row in step n+1: its token
is never appended, emitted or counted (``Scheduler.update`` skips finished
requests). The row writes the KV of the last accepted token at position
``num_computed_tokens``, in a block that is not registered in the prefix
cache (only blocks of computed tokens are); its blocks are freed at once, as
on the synchronous path. Every later use of those blocks in this process is
queued behind that write on the same stream; the KV fabric, which writes
from outside the stream, gets blocks only through
``LLMEngine.reserve_for_transfer``, which first waits for the step in flight.

Sampling: a seeded request draws from its own generator once per step it is
sampled in, in step order, so its tokens equal the synchronous path's.
Unseeded random sampling shares the engine's generator, which a discarded
row also advances: those draws differ from the synchronous path (they are
random either way); greedy and seeded outputs are identical. Step n+1's
sampling must not read the host's token history (there are no penalties
today): step n's token is not in it yet.
"""

from dataclasses import dataclass

from pdserve.engine.llama import LayerHook
from pdserve.engine.model_runner import ModelInputs, ModelRunner, TokenFeed
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampler import PendingSample
from pdserve.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput


@dataclass(frozen=True)
class InFlightStep:
    """A launched step whose sampled ids the host has not read yet."""

    schedule: SchedulerOutput
    inputs: ModelInputs
    sample: PendingSample  # ``sample.token_ids`` [S] on the device, rows = sample_order

    def feed(self) -> TokenFeed:
        """This step's sampled ids as the next step's input ids. Pure."""
        rows = {s.request.request_id: i for i, s in enumerate(self.inputs.sample_order)}
        return TokenFeed(self.sample.token_ids, rows)


def runs_ahead(out: SchedulerOutput) -> bool:
    """Whether a step may run with a lookahead step behind it: decodes only, each
    sampling, none prefill-only. Pure."""
    for s in out.scheduled:
        req = s.request
        if s.num_new_tokens != 1 or req.num_computed_tokens + 1 != req.num_tokens \
                or req.prefill_only:
            return False
    return True


def ends_with_next_token(req: Request, max_model_len: int) -> bool:
    """Whether the token in flight for ``req`` surely finishes it (length, context,
    prefill-only), whatever its value. Pure."""
    return (req.prefill_only or len(req.output_token_ids) + 1 >= req.max_tokens
            or req.num_tokens + 1 >= max_model_len)


class Lookahead:
    """Holds at most one step in flight and plans the step after it."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.in_flight: InFlightStep | None = None

    def launch(self, out: SchedulerOutput, layer_hook: LayerHook | None = None,
               after: InFlightStep | None = None) -> InFlightStep:
        """Enqueue ``out`` (``after``: the unprocessed step whose ids it reads). Mutates
        the KV cache and the sampler's generators, not ``in_flight`` (the caller holds
        the step there until it processes it)."""
        inputs, sample = self.runner.launch(out, layer_hook,
                                            after.feed() if after is not None else None)
        return InFlightStep(out, inputs, sample)

    def take(self) -> InFlightStep | None:
        """Hand over the step in flight (None if none). Mutates ``in_flight``."""
        step, self.in_flight = self.in_flight, None
        return step

    def wait(self) -> None:
        """Block until the step in flight has finished on the device (its KV written).
        Changes nothing."""
        if self.in_flight is not None:
            self.in_flight.sample.wait()

    def plan_next(self, prev: InFlightStep) -> SchedulerOutput | None:
        """The step after ``prev`` (launched, unprocessed): every running request of
        ``prev`` that may go on, one token each, one position ahead. None (nothing
        changed) where the synchronous ``schedule()`` must decide: a waiting request
        with a free seat, a running request not in ``prev``, the token budget, or a
        pool short of the blocks. Mutates: the continuing requests' blocks and the
        pool (each gets the slot for the token after ``prev``'s)."""
        sch = self.scheduler
        if sch.waiting and len(sch.running) < sch.max_num_seqs:
            return None
        rows = {s.request.request_id for s in prev.inputs.sample_order}
        going_on = []
        for req in sch.running:
            if req.request_id not in rows or req.status != RequestStatus.RUNNING:
                return None
            if not ends_with_next_token(req, sch.max_model_len):
                going_on.append(req)
        if not going_on or len(going_on) > sch.max_num_batched_tokens:
            return None
        kv = sch.kv
        need = sum(kv.num_blocks_needed(r, 2) for r in going_on)
        if need > kv.pool.num_free_blocks:
            return None
        for req in going_on:  # slots for num_computed_tokens + 2 tokens: prev's and ours
            ok = kv.allocate_slots(req, 2)
            assert ok
        return SchedulerOutput(tuple(ScheduledRequest(r, 1) for r in going_on), ())
