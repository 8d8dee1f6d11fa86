"""The receiver's check of a FINISH that carries every layer's digests (``cuda_ipc``).

The layers of such a path leave no frames: the sender's copies wrote the decode
side's blocks directly. FINISH then carries, sealed, the digests of every layer's
src blocks; the receiver recomputes them over the dst blocks it is about to use,
all layers in one checksum launch (the engine's cache is one allocation) and one
device-to-host copy, and names the first block that differs.
"""

import numpy as np
import torch

from pdserve.kernels.ops import layer_block_checksums
from pdserve.kvfabric.descriptors import TransferPlan
from pdserve.kvfabric.digests import ALGO_NAMES, ALGO_WSUM, DigestError, decode_finish_aux


def landed_digest_error(key: bytes, header: bytes, payload: bytes, aux: bytes,
                        plan: TransferPlan, kv_layers: list[tuple[torch.Tensor, torch.Tensor]],
                        dst_index: torch.Tensor) -> str | None:
    """Why FINISH (``header`` bytes, ``payload``, ``aux``) does not vouch for the plan's dst
    blocks in ``kv_layers``, or None: its seal, its digest count, then every digest. Pure."""
    try:
        algo, sent = decode_finish_aux(key, header, payload, aux, plan.num_layers)
    except DigestError as e:
        return f"finish frame: {e}"
    n = plan.num_blocks
    if sent.shape[1] != 2 * n:
        return (f"finish frame carries {sent.size} block digests, expected "
                f"{2 * n * plan.num_layers}")
    if n == 0:
        return None
    if algo != ALGO_WSUM:
        return f"finish frame digests use {ALGO_NAMES[algo]}, expected wsum"
    landed = layer_block_checksums(kv_layers, dst_index).cpu().numpy()  # [L, 2n]
    wrong = np.flatnonzero(landed != sent)
    if wrong.size == 0:
        return None
    layer, bad = divmod(int(wrong[0]), 2 * n)
    half = "K" if bad < n else "V"
    return (f"digest mismatch in layer {layer}, block {bad} ({half} of dst block "
            f"{plan.dst_block_ids[bad % n]}, {ALGO_NAMES[algo]})")
