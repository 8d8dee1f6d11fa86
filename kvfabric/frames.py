"""Wire format of the KV plane's side channel (TCP). Nothing is pickled.

Every frame is a fixed header, two short ids, ``aux_nbytes`` of integrity
data, then ``nbytes`` of payload::

    offset  size  field
    0       4     magic  b"PDKV"
    4       1     kind   (HELLO, WELCOME, LAYER, FINISH, ABORT, CANCEL, CANCEL_ACK, BEGIN)
    5       1     version  (PROTOCOL_VERSION; a zero pad byte in version 1)
    6       2     len(transfer_id)   <= 255
    8       2     len(request_id)    <= 255
    10      4     layer  (int32, -1 when not a layer frame)
    14      4     attempt
    18      4     dst_digest  (crc32 of the plan's dst block ids: both sides agree on them)
    22      8     nbytes of payload
    30      4     aux_nbytes
    34      ..    transfer_id utf-8, request_id utf-8, aux, payload

Payloads: HELLO / WELCOME carry a msgspec-msgpack ``Hello`` / ``Welcome``;
LAYER carries the packed ``[2, n, B, Hkv, D]`` blocks of one layer (tcp) or
nothing (nixl: header and aux travel as the NIXL notification of the write,
and ``nbytes`` says how much was written); FINISH carries the caller's opaque
payload; ABORT and CANCEL carry a utf-8 reason; BEGIN (paths whose layers
leave no frames: cuda_ipc) carries nothing and tells the receiver which
connection a transfer's writes come from, so its death fails the transfer
at once. Aux: LAYER frames carry the per-block digests and their seal, FINISH
frames a seal (or every layer's digests, ``digests.py``); other frames none.
"""

import socket
import struct
import zlib
from dataclasses import dataclass

import msgspec

from pdserve.kvfabric.descriptors import FabricIdentity, TransferPlan

MAGIC = b"PDKV"
HELLO, WELCOME, LAYER, FINISH, ABORT, CANCEL, CANCEL_ACK, BEGIN = range(1, 9)
KIND_NAMES = {HELLO: "HELLO", WELCOME: "WELCOME", LAYER: "LAYER", FINISH: "FINISH",
              ABORT: "ABORT", CANCEL: "CANCEL", CANCEL_ACK: "CANCEL_ACK", BEGIN: "BEGIN"}
PROTOCOL_VERSION = 3  # 2: version byte, aux section with per-block digests and seals;
# 3: BEGIN, and FINISH carrying every layer's digests (cuda_ipc)
_HEADER = struct.Struct("<4sBBHHiIIQI")  # 34 bytes
HEADER_SIZE = _HEADER.size
MAX_CONTROL_BYTES = 16 << 20  # handshake metadata, finish payloads, reasons
MAX_AUX_BYTES = 32 << 20  # digests of up to ~4M blocks (a FINISH carrying every layer's)


class ProtocolError(Exception):
    """The byte stream cannot be parsed any further: the connection must close."""


class VersionMismatch(ProtocolError):
    """The peer speaks another version of this wire format."""


@dataclass(frozen=True)
class FrameHeader:
    kind: int
    transfer_id: str
    request_id: str
    layer: int
    attempt: int
    dst_digest: int
    nbytes: int
    aux_nbytes: int = 0


def dst_digest(dst_block_ids: tuple[int, ...]) -> int:
    """crc32 of the destination block ids. Pure."""
    return zlib.crc32(struct.pack(f"<{len(dst_block_ids)}q", *dst_block_ids))


def plan_header(kind: int, nbytes: int, plan: TransferPlan | None = None, layer: int = -1,
                aux_nbytes: int = 0) -> FrameHeader:
    """The header of one frame about ``plan``. Pure."""
    if plan is None:
        return FrameHeader(kind, "", "", layer, 0, 0, nbytes, aux_nbytes)
    return FrameHeader(kind, plan.transfer_id, plan.request_id, layer, plan.attempt,
                       dst_digest(plan.dst_block_ids), nbytes, aux_nbytes)


def encode_header(kind: int, nbytes: int, plan: TransferPlan | None = None,
                  layer: int = -1, aux_nbytes: int = 0) -> bytes:
    """Header bytes (ids included) of one frame about ``plan``. Pure."""
    return encode_raw_header(plan_header(kind, nbytes, plan, layer, aux_nbytes))


def encode_raw_header(h: FrameHeader, version: int = PROTOCOL_VERSION) -> bytes:
    """Header bytes of any header, also a malformed one (tests use that). Pure.

    These bytes are also what a frame's seal covers (``digests.py``).
    """
    tid, rid = h.transfer_id.encode(), h.request_id.encode()
    return _HEADER.pack(MAGIC, h.kind, version, len(tid), len(rid), h.layer, h.attempt,
                        h.dst_digest, h.nbytes, h.aux_nbytes) + tid + rid


def decode_header(fixed: bytes, ids: bytes) -> FrameHeader:
    """Parse the fixed bytes plus the id bytes. Raises ProtocolError."""
    magic, kind, version, tlen, rlen, layer, attempt, digest, nbytes, aux = _HEADER.unpack(fixed)
    if magic != MAGIC or kind not in KIND_NAMES:
        raise ProtocolError(f"bad frame magic {magic!r} or kind {kind}")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(f"KV protocol version mismatch: peer {version or 1}, "
                            f"ours {PROTOCOL_VERSION}")
    if aux > MAX_AUX_BYTES:
        raise ProtocolError(f"{KIND_NAMES[kind]} aux section of {aux} bytes")
    try:
        tid, rid = ids[:tlen].decode(), ids[tlen:tlen + rlen].decode()
    except UnicodeDecodeError as e:
        raise ProtocolError("frame ids are not utf-8") from e
    return FrameHeader(kind, tid, rid, layer, attempt, digest, nbytes, aux)


def split_ids_length(fixed: bytes) -> int:
    """How many id bytes follow the fixed header. Raises ProtocolError."""
    if fixed[:4] != MAGIC:
        raise ProtocolError(f"bad frame magic {fixed[:4]!r}")
    _, _, _, tlen, rlen, *_ = _HEADER.unpack(fixed)
    if tlen > 255 or rlen > 255:
        raise ProtocolError(f"frame ids too long ({tlen}, {rlen})")
    return tlen + rlen


def parse_notification(msg: bytes) -> tuple[FrameHeader, bytes]:
    """A NIXL notification is a payload-less frame: (header, aux). Raises ProtocolError."""
    if len(msg) < HEADER_SIZE:
        raise ProtocolError(f"notification of {len(msg)} bytes is too short")
    n = split_ids_length(msg[:HEADER_SIZE])
    h = decode_header(msg[:HEADER_SIZE], msg[HEADER_SIZE:HEADER_SIZE + n])
    aux = msg[HEADER_SIZE + n:]
    if len(aux) != h.aux_nbytes:
        raise ProtocolError(f"notification carries {len(aux)} aux bytes, header says "
                            f"{h.aux_nbytes}")
    return h, aux


class TruncatedFrame(EOFError):
    """The peer closed the connection in the middle of a frame."""


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` (recv_into, no copies).

    Raises EOFError on a close before the first byte, TruncatedFrame after it.
    """
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            if got:
                raise TruncatedFrame(f"peer closed after {got} of {len(view)} bytes")
            raise EOFError("peer closed the connection")
        got += n


def read_header(sock: socket.socket) -> FrameHeader:
    """Read one frame header (not its aux or payload).

    Raises EOFError (closed between frames), TruncatedFrame, ProtocolError.
    """
    fixed = bytearray(HEADER_SIZE)
    recv_exact(sock, memoryview(fixed))
    ids = bytearray(split_ids_length(bytes(fixed)))
    try:
        recv_exact(sock, memoryview(ids))
    except EOFError as e:
        raise TruncatedFrame(f"peer closed inside a frame header: {e}") from e
    return decode_header(bytes(fixed), bytes(ids))


def read_body(sock: socket.socket, nbytes: int, what: str) -> bytes:
    """Read ``nbytes`` of a frame whose header was read. Raises TruncatedFrame."""
    buf = bytearray(nbytes)
    try:
        recv_exact(sock, memoryview(buf))
    except EOFError as e:
        raise TruncatedFrame(f"{what} truncated: {e}") from e
    return bytes(buf)


def read_aux(sock: socket.socket, header: FrameHeader) -> bytes:
    """Read a frame's aux section (bounded by decode_header). Raises TruncatedFrame."""
    return read_body(sock, header.aux_nbytes, f"{KIND_NAMES[header.kind]} frame")


def read_control_payload(sock: socket.socket, header: FrameHeader) -> bytes:
    """Read a small (non-layer) payload. Raises ProtocolError if it is too large."""
    if header.nbytes > MAX_CONTROL_BYTES:
        raise ProtocolError(f"{KIND_NAMES[header.kind]} payload of {header.nbytes} bytes")
    return read_body(sock, header.nbytes, f"{KIND_NAMES[header.kind]} frame")


def discard(sock: socket.socket, nbytes: int, scratch: memoryview) -> None:
    """Read and drop ``nbytes`` using ``scratch`` (any non-empty size). Raises TruncatedFrame."""
    while nbytes > 0:
        chunk = scratch[:min(nbytes, len(scratch))]
        try:
            recv_exact(sock, chunk)
        except EOFError as e:
            raise TruncatedFrame(f"frame truncated while discarding it: {e}") from e
        nbytes -= len(chunk)


class Hello(msgspec.Struct, frozen=True):
    """Sender -> receiver, first frame on a connection."""

    token: str
    identity: FabricIdentity
    transport: str
    agent_name: str = ""  # nixl: the sender's agent (notifications come from it)


class Welcome(msgspec.Struct, frozen=True):
    """Receiver -> sender, answer to Hello. ``ok=False``: refused, then closed."""

    ok: bool
    error: str | None = None
    num_blocks: int = 0
    agent_metadata: bytes = b""  # nixl: the receiver's agent metadata
    mem_type: str = "DRAM"  # nixl: "DRAM" or "VRAM"
    device_id: int = 0
    layer_addrs: list[tuple[int, int]] = []  # nixl: (K base, V base) per layer
    host_id: str = ""  # cuda_ipc: the receiver's host (its IPC handles open only there)
    ipc_storages: list["IpcStorage"] = []  # cuda_ipc: exported KV allocations
    ipc_layers: list[tuple[int, int, int, int]] = []  # cuda_ipc: per layer (K storage,
    # K byte offset, V storage, V byte offset) into ipc_storages


class IpcStorage(msgspec.Struct, frozen=True):
    """A CUDA allocation exported for another process on the same host (torch's
    ``UntypedStorage._share_cuda_`` fields; raw bytes, nothing pickled)."""

    device: int
    handle: bytes
    size: int
    offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


_enc = msgspec.msgpack.Encoder()
_hello_dec = msgspec.msgpack.Decoder(Hello)
_welcome_dec = msgspec.msgpack.Decoder(Welcome)


def encode_msg(msg: Hello | Welcome) -> bytes:
    return _enc.encode(msg)


def decode_hello(data: bytes) -> Hello:
    """Raises ProtocolError on a malformed Hello."""
    try:
        return _hello_dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
        raise ProtocolError(f"malformed HELLO: {e}") from e


def decode_welcome(data: bytes) -> Welcome:
    """Raises ProtocolError on a malformed Welcome."""
    try:
        return _welcome_dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"malformed WELCOME: {e}") from e
