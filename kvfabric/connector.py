"""The connector's scheduler half: decides which blocks move. No torch, no transport.

The worker half is ``KVSender`` (prefill side) and ``KVReceiver`` (decode
side); only a ``TransferPlan`` crosses between the halves. Both sides derive
the same plan for a request independently::

    decode side:  plan(request_id, None,       dst_table, num_cached)  -> expect(plan)
    token plane:  PrefillRequest(first_block=num_cached, dst_block_ids=plan.dst_block_ids)
    prefill side: plan_from_suffix(request_id, src_table, first_block, dst_block_ids)
                  -> send_layer(plan, ...) for each layer, then finish(plan, payload)

Tables are indexed by prompt block: entry ``i`` holds prompt block ``i``
(the last one may be partial; it still moves). Only blocks at index
``>= num_cached_blocks`` move, because the decode side already holds the
leading ``num_cached_blocks`` (its prefix-cache hits).
"""

from collections.abc import Sequence

from pdserve.kvfabric.descriptors import TransferPlan, make_transfer_id


class KVConnectorScheduler:
    """Plans transfers for a model with ``num_layers`` layers. Holds no per-request state."""

    def __init__(self, num_layers: int) -> None:
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        self.num_layers = num_layers

    def plan(
        self,
        request_id: str,
        src_block_ids: Sequence[int] | None,
        dst_block_ids: Sequence[int],
        num_cached_blocks: int,
        attempt: int = 0,
    ) -> TransferPlan:
        """Plan moving prompt blocks ``num_cached_blocks..`` from src to dst. Pure.

        ``src_block_ids``: the prefill side's table for the whole prompt, or
        ``None`` on the decode side (which does not know it).
        ``dst_block_ids``: the decode side's table for the whole prompt,
        its cached prefix included. Raises ValueError on tables that disagree.
        """
        num_blocks = len(dst_block_ids)
        if not 0 <= num_cached_blocks <= num_blocks:
            raise ValueError(f"request {request_id}: num_cached_blocks {num_cached_blocks} "
                             f"outside 0..{num_blocks}")
        if src_block_ids is not None and len(src_block_ids) != num_blocks:
            raise ValueError(f"request {request_id}: prefill table has {len(src_block_ids)} "
                             f"blocks, decode table {num_blocks}")
        src = None if src_block_ids is None else tuple(src_block_ids[num_cached_blocks:])
        return TransferPlan(
            transfer_id=make_transfer_id(request_id, attempt), request_id=request_id,
            attempt=attempt, src_block_ids=src,
            dst_block_ids=tuple(dst_block_ids[num_cached_blocks:]),
            num_layers=self.num_layers)

    def plan_from_suffix(
        self,
        request_id: str,
        src_block_ids: Sequence[int],
        first_block: int,
        dst_block_ids: Sequence[int],
        attempt: int = 0,
    ) -> TransferPlan:
        """The prefill side's plan from a PrefillRequest's ``first_block`` and its
        ``dst_block_ids`` (decode blocks for prompt blocks ``first_block..``). Pure.

        Equals ``plan(request_id, src, full_dst_table, first_block)`` field by field.
        """
        if not 0 <= first_block <= len(src_block_ids):
            raise ValueError(f"request {request_id}: first_block {first_block} outside "
                             f"0..{len(src_block_ids)}")
        if len(src_block_ids) - first_block != len(dst_block_ids):
            raise ValueError(f"request {request_id}: {len(src_block_ids) - first_block} blocks "
                             f"to send but {len(dst_block_ids)} destination blocks")
        return TransferPlan(
            transfer_id=make_transfer_id(request_id, attempt), request_id=request_id,
            attempt=attempt, src_block_ids=tuple(src_block_ids[first_block:]),
            dst_block_ids=tuple(dst_block_ids), num_layers=self.num_layers)

    @staticmethod
    def num_blocks_to_move(num_prompt_tokens: int, block_size: int,
                           num_cached_blocks: int) -> int:
        """Blocks the plan will cover for a prompt (a trailing partial block counts). Pure."""
        total = (num_prompt_tokens + block_size - 1) // block_size
        return max(0, total - num_cached_blocks)
