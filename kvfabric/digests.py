"""Per-block digests of the KV bytes a transfer moves, and the seal that binds them to a frame.

Every LAYER frame carries one digest per moved block, K blocks first, then V
(the order of the packed ``[2, n, B, Hkv, D]`` buffer), and a MAC keyed by
the cluster token over the frame header and those digests. The receiver
recomputes the digests over what it is about to scatter (tcp) or over what
landed (nixl) and fails the transfer on any difference, so corrupted bytes,
a frame replayed into another transfer, and a truncated payload never
complete a transfer. The aux section of a LAYER frame::

    offset  size     field
    0       1        algorithm (ALGO_CRC32 or ALGO_WSUM)
    1       3        pad
    4       4        count = 2 * num_blocks
    8       4*count  digests (uint32)
    ..      16       MAC (HMAC-SHA256, truncated) of header bytes + the above

FINISH frames carry only the MAC (of header bytes + payload) as aux, except
on paths whose layers leave no frame of their own (``cuda_ipc``: a copy
kernel writes the peer's memory): there the FINISH aux carries every
layer's digests, layer after layer, in the LAYER aux format, sealed with
the header and the payload, and the receiver checks them all at once.

Two digest algorithms, chosen by the sender from where its bytes are and
named in the frame, so the receiver computes the same one wherever its bytes are:

- ``ALGO_CRC32``: zlib.crc32 of each block's bytes (CPU memory).
- ``ALGO_WSUM``: a weighted sum of each block's bytes read as int32 words,
  ``sum_c cw[c] * (sum_i w[i] * x[c, i] mod P) mod P`` over chunks ``c`` of
  CHUNK words, P = 2**31 - 1, with pseudo-random position weights; every
  intermediate is exact in int64, so CPU and GPU agree bit for bit
  (``kernels.reference.block_checksums`` defines it; on a GPU a Triton kernel
  reads each block once); detects any changed word (P is prime and larger than
  any single-byte change), swaps of words and zeroed tails.
"""

import hashlib
import hmac
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from pdserve.kernels.ops import block_checksums
from pdserve.kernels.reference import checksum_rows

ALGO_CRC32, ALGO_WSUM = 1, 2
ALGO_NAMES = {ALGO_CRC32: "crc32", ALGO_WSUM: "wsum"}
MAC_SIZE = 16
_AUX = struct.Struct("<B3xI")


class DigestError(Exception):
    """The aux section cannot be parsed (the frame is rejected, not the connection)."""


@dataclass(frozen=True)
class BlockDigests:
    """One layer's digests: ``values[i]`` for packed block ``i`` (K blocks, then V blocks)."""

    algo: int
    values: tuple[int, ...]

    def first_mismatch(self, other: "BlockDigests") -> int | None:
        """Index of the first block whose digest differs, or None. Pure."""
        for i, (a, b) in enumerate(zip(self.values, other.values, strict=True)):
            if a != b:
                return i
        return None


def algo_for(device: torch.device) -> int:
    """The algorithm a sender uses for bytes on ``device``. Pure."""
    return ALGO_CRC32 if device.type == "cpu" else ALGO_WSUM


def block_digests(algo: int, blocks: torch.Tensor) -> BlockDigests:
    """Digests of each row of ``blocks`` (``[m, bytes_per_block]`` uint8, any device). Pure."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 2:
        raise ValueError(f"blocks must be a 2-D uint8 tensor, got {blocks.dtype} "
                         f"{tuple(blocks.shape)}")
    if algo == ALGO_CRC32:
        return BlockDigests(algo, _crc32_rows(blocks))
    if algo == ALGO_WSUM:
        return BlockDigests(algo, _wsum_rows(blocks))
    raise DigestError(f"unknown digest algorithm {algo}")


def as_block_rows(t: torch.Tensor, num_rows: int) -> torch.Tensor:
    """A contiguous tensor's bytes as ``[num_rows, -1]`` uint8 (no copy). Pure."""
    return t.reshape(-1).view(torch.uint8).view(num_rows, -1)


def cache_block_digests(algo: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_ids: torch.Tensor) -> BlockDigests:
    """Digests of blocks ``block_ids`` (``[n]`` int64, on the cache's device) of one
    layer's ``[NB, B, Hkv, D]`` caches, K blocks then V: what packing them would digest. Pure.
    """
    if algo == ALGO_WSUM and block_ids.numel():  # on a GPU: one pass over the blocks
        return BlockDigests(algo, tuple(block_checksums(k_cache, v_cache, block_ids).tolist()))
    num_blocks = k_cache.shape[0]
    rows = torch.cat([as_block_rows(k_cache, num_blocks).index_select(0, block_ids),
                      as_block_rows(v_cache, num_blocks).index_select(0, block_ids)])
    return block_digests(algo, rows)  # [2n, bytes_per_block]


def _crc32_rows(blocks: torch.Tensor) -> tuple[int, ...]:
    rows = blocks.contiguous().cpu()  # no copy for CPU tensors
    mv, width = memoryview(rows.numpy()).cast("B"), rows.shape[1]
    return tuple(zlib.crc32(mv[i * width:(i + 1) * width]) for i in range(rows.shape[0]))


def _wsum_rows(blocks: torch.Tensor) -> tuple[int, ...]:
    if blocks.shape[0] == 0:
        return ()
    return tuple(checksum_rows(blocks).tolist())


# -- aux sections and their seal --

def mac_key(token: str) -> bytes:
    """The MAC key every peer of a cluster derives from its token. Pure."""
    return hashlib.sha256(b"pdserve-kvfabric-mac\0" + token.encode()).digest()


def _mac(key: bytes, header: bytes, body: bytes | memoryview) -> bytes:
    h = hmac.new(key, header, hashlib.sha256)
    h.update(body)
    return h.digest()[:MAC_SIZE]


def layer_aux_size(num_blocks: int) -> int:
    """Bytes of a LAYER frame's aux section for a plan of ``num_blocks``. Pure."""
    return finish_aux_size(2 * num_blocks)


def _seal(key: bytes, sealed: bytes, algo: int, count: int, words: bytes) -> bytes:
    """An aux section: algorithm, count, ``words`` (count uint32), then the MAC of
    ``sealed`` + all of that. Pure."""
    body = _AUX.pack(algo, count) + words
    return body + _mac(key, sealed, body)


def _open(key: bytes, sealed: bytes, aux: bytes, what: str) -> tuple[int, int, bytes]:
    """Check an aux section's seal over ``sealed`` (``what`` it covers, for the message):
    (algorithm, count, body). Raises DigestError. Pure."""
    if len(aux) < _AUX.size + MAC_SIZE:
        raise DigestError(f"digest section of {len(aux)} bytes is too short")
    body, mac = aux[:-MAC_SIZE], aux[-MAC_SIZE:]
    if not hmac.compare_digest(mac, _mac(key, sealed, body)):
        raise DigestError(f"digest seal does not match the frame (replayed, rewritten or "
                          f"corrupted {what})")
    algo, count = _AUX.unpack_from(body)
    if algo not in ALGO_NAMES or len(body) != _AUX.size + 4 * count:
        raise DigestError(f"bad digest section (algorithm {algo}, {count} digests)")
    return algo, count, body


def encode_layer_aux(key: bytes, header: bytes, digests: BlockDigests) -> bytes:
    """The aux section of a LAYER frame whose header bytes are ``header``. Pure."""
    n = len(digests.values)
    return _seal(key, header, digests.algo, n, struct.pack(f"<{n}I", *digests.values))


def decode_layer_aux(key: bytes, header: bytes, aux: bytes) -> BlockDigests:
    """Check the seal and parse a LAYER frame's aux section. Raises DigestError. Pure."""
    algo, count, body = _open(key, header, aux, "header or digests")
    return BlockDigests(algo, struct.unpack_from(f"<{count}I", body, _AUX.size))


def finish_aux_size(num_digests: int) -> int:
    """Bytes of a FINISH aux section that carries ``num_digests`` block digests. Pure."""
    return _AUX.size + 4 * num_digests + MAC_SIZE


def encode_finish_aux(key: bytes, header: bytes, payload: bytes, algo: int,
                      values: np.ndarray) -> bytes:
    """The aux section of a FINISH frame carrying every layer's digests: ``values`` is
    ``[num_layers, 2n]`` (any integer dtype, values < 2**32), layer order; sealed with the
    header bytes and the payload. The LAYER aux format, built without Python ints. Pure."""
    flat = np.ascontiguousarray(values, dtype="<u4").reshape(-1)
    return _seal(key, header + payload, algo, flat.size, flat.tobytes())


def decode_finish_aux(key: bytes, header: bytes, payload: bytes, aux: bytes,
                      num_layers: int) -> tuple[int, np.ndarray]:
    """Check the seal of a digest-carrying FINISH aux: (algorithm, ``[num_layers, m]``
    uint32 digests). Raises DigestError. Pure."""
    algo, count, body = _open(key, header + payload, aux, "header, payload or digests")
    if count % num_layers:
        raise DigestError(f"{count} block digests do not split into {num_layers} layers")
    values = np.frombuffer(body, dtype="<u4", offset=_AUX.size, count=count)
    return algo, values.reshape(num_layers, -1)


def finish_mac(key: bytes, header: bytes, payload: bytes | memoryview) -> bytes:
    """The aux section of a FINISH frame. Pure."""
    return _mac(key, header, payload)


def check_finish_mac(key: bytes, header: bytes, payload: bytes, aux: bytes) -> str | None:
    """Why a FINISH frame's seal is wrong, or None. Pure."""
    if len(aux) != MAC_SIZE or not hmac.compare_digest(aux, _mac(key, header, payload)):
        return "finish frame seal does not match (replayed, rewritten or corrupted)"
    return None
