"""Each running request's block ids as an int32 array, kept between steps by the model
runner so that a step's block tables are copied rows, not rebuilt lists."""

import numpy as np

from pdserve.engine.request import Request


class BlockTableCache:
    """Each running request's block ids as an int32 array, grown as blocks are added.

    An entry is reused while it is the same request object in the same life
    (preemption frees every block, so ``num_preemptions`` changes) and its
    blocks only grew; otherwise it is rebuilt.
    """

    def __init__(self) -> None:
        self._rows: dict[str, tuple[Request, int, np.ndarray, int]] = {}

    def row(self, req: Request) -> np.ndarray:
        """The request's block ids [>= len(req.blocks)] int32; read-only for the caller."""
        blocks = req.blocks
        n = len(blocks)
        ent = self._rows.get(req.request_id)
        if ent is not None and ent[0] is req and ent[1] == req.num_preemptions and ent[3] <= n:
            _, _, arr, have = ent
        else:
            arr, have = np.empty(max(16, n), dtype=np.int32), 0
        if n > have:
            if n > arr.shape[0]:
                grown = np.empty(max(n, 2 * arr.shape[0]), dtype=np.int32)
                grown[:have] = arr[:have]
                arr = grown
            arr[have:n] = [b.block_id for b in blocks[have:n]]
        self._rows[req.request_id] = (req, req.num_preemptions, arr, n)
        return arr

    def prune(self, keep_ids: set[str]) -> None:
        """Forget every request not in ``keep_ids``. Mutates the cache."""
        self._rows = {k: v for k, v in self._rows.items() if k in keep_ids}

    def __len__(self) -> int:
        return len(self._rows)
