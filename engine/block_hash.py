"""The one block-hash function of the whole system.

A full block of ``block_size`` tokens is named by a chained hash::

    h_0 = H(seed ; ROOT,    tokens[0:B])
    h_i = H(seed ; h_{i-1}, tokens[i*B:(i+1)*B])

``H`` is keyed BLAKE2b with an 8-byte digest, keyed by the config's hash
seed, so every process (router, prefill, decode, fabric) agrees on every
hash without sharing state. Hashes are unsigned 64-bit ints so they travel
in msgpack unchanged. A hit is always confirmed by comparing token ids.
"""

import hashlib
import struct
from collections.abc import Sequence

HASH_ALGORITHM = "blake2b-64"
_ROOT = b"pdserve-root"


def _key(seed: int) -> bytes:
    return struct.pack("<Q", seed & 0xFFFFFFFFFFFFFFFF)


def hash_block(parent: int | None, token_ids: Sequence[int], seed: int) -> int:
    """Hash of one full block given its parent's hash (None for the first block). Pure."""
    h = hashlib.blake2b(digest_size=8, key=_key(seed))
    h.update(_ROOT if parent is None else struct.pack("<Q", parent))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return int.from_bytes(h.digest(), "little")


def hash_block_chain(
    token_ids: Sequence[int], block_size: int, seed: int, parent: int | None = None
) -> list[int]:
    """Hashes of every *full* block of ``token_ids`` (a trailing partial block is skipped).

    ``parent`` continues an existing chain. Pure.
    """
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size], seed)
        hashes.append(parent)
    return hashes
