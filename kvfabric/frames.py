"""Wire format of the KV plane's side channel (TCP). Nothing is pickled.

Every frame is a fixed header, two short ids, then ``nbytes`` of payload::

    offset  size  field
    0       4     magic  b"PDKV"
    4       1     kind   (HELLO, WELCOME, LAYER, FINISH, ABORT, CANCEL, CANCEL_ACK)
    5       1     pad
    6       2     len(transfer_id)   <= 255
    8       2     len(request_id)    <= 255
    10      4     layer  (int32, -1 when not a layer frame)
    14      4     attempt
    18      4     dst_digest  (crc32 of the plan's dst block ids: both sides agree on them)
    22      8     nbytes of payload
    30      ..    transfer_id utf-8, request_id utf-8, payload

Payloads: HELLO / WELCOME carry a msgspec-msgpack ``Hello`` / ``Welcome``;
LAYER carries the packed ``[2, n, B, Hkv, D]`` blocks of one layer (tcp) or
nothing (nixl: the header travels as the NIXL notification of the write, and
``nbytes`` says how much was written); FINISH carries the caller's opaque
payload; ABORT and CANCEL carry a utf-8 reason.
"""

import socket
import struct
import zlib
from dataclasses import dataclass

import msgspec

from pdserve.kvfabric.descriptors import FabricIdentity, TransferPlan

MAGIC = b"PDKV"
HELLO, WELCOME, LAYER, FINISH, ABORT, CANCEL, CANCEL_ACK = range(1, 8)
KIND_NAMES = {HELLO: "HELLO", WELCOME: "WELCOME", LAYER: "LAYER", FINISH: "FINISH",
              ABORT: "ABORT", CANCEL: "CANCEL", CANCEL_ACK: "CANCEL_ACK"}
_HEADER = struct.Struct("<4sBxHHiIIQ")  # 30 bytes
HEADER_SIZE = _HEADER.size
MAX_CONTROL_BYTES = 16 << 20  # handshake metadata, finish payloads, reasons


class ProtocolError(Exception):
    """The byte stream cannot be parsed any further: the connection must close."""


@dataclass(frozen=True)
class FrameHeader:
    kind: int
    transfer_id: str
    request_id: str
    layer: int
    attempt: int
    dst_digest: int
    nbytes: int


def dst_digest(dst_block_ids: tuple[int, ...]) -> int:
    """crc32 of the destination block ids. Pure."""
    return zlib.crc32(struct.pack(f"<{len(dst_block_ids)}q", *dst_block_ids))


def encode_header(kind: int, nbytes: int, plan: TransferPlan | None = None,
                  layer: int = -1) -> bytes:
    """Header bytes (ids included) of one frame about ``plan``. Pure."""
    if plan is None:
        return encode_raw_header(FrameHeader(kind, "", "", layer, 0, 0, nbytes))
    return encode_raw_header(FrameHeader(kind, plan.transfer_id, plan.request_id, layer,
                                         plan.attempt, dst_digest(plan.dst_block_ids), nbytes))


def encode_raw_header(h: FrameHeader) -> bytes:
    """Header bytes of any header, also a malformed one (tests use that). Pure."""
    tid, rid = h.transfer_id.encode(), h.request_id.encode()
    return _HEADER.pack(MAGIC, h.kind, len(tid), len(rid), h.layer, h.attempt, h.dst_digest,
                        h.nbytes) + tid + rid


def decode_header(fixed: bytes, ids: bytes) -> FrameHeader:
    """Parse the 30 fixed bytes plus the id bytes. Raises ProtocolError."""
    magic, kind, tlen, rlen, layer, attempt, digest, nbytes = _HEADER.unpack(fixed)
    if magic != MAGIC or kind not in KIND_NAMES:
        raise ProtocolError(f"bad frame magic {magic!r} or kind {kind}")
    try:
        tid, rid = ids[:tlen].decode(), ids[tlen:tlen + rlen].decode()
    except UnicodeDecodeError as e:
        raise ProtocolError("frame ids are not utf-8") from e
    return FrameHeader(kind, tid, rid, layer, attempt, digest, nbytes)


def split_ids_length(fixed: bytes) -> int:
    """How many id bytes follow the fixed header. Raises ProtocolError."""
    if fixed[:4] != MAGIC:
        raise ProtocolError(f"bad frame magic {fixed[:4]!r}")
    _, _, tlen, rlen, *_ = _HEADER.unpack(fixed)
    if tlen > 255 or rlen > 255:
        raise ProtocolError(f"frame ids too long ({tlen}, {rlen})")
    return tlen + rlen


def parse_notification(msg: bytes) -> FrameHeader:
    """A NIXL notification is a payload-less frame header. Raises ProtocolError."""
    if len(msg) < HEADER_SIZE:
        raise ProtocolError(f"notification of {len(msg)} bytes is too short")
    n = split_ids_length(msg[:HEADER_SIZE])
    return decode_header(msg[:HEADER_SIZE], msg[HEADER_SIZE:HEADER_SIZE + n])


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` (recv_into, no copies). Raises EOFError on close."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("peer closed the connection")
        got += n


def read_header(sock: socket.socket) -> FrameHeader:
    """Read one frame header (not its payload). Raises EOFError / ProtocolError."""
    fixed = bytearray(HEADER_SIZE)
    recv_exact(sock, memoryview(fixed))
    ids = bytearray(split_ids_length(bytes(fixed)))
    recv_exact(sock, memoryview(ids))
    return decode_header(bytes(fixed), bytes(ids))


def read_control_payload(sock: socket.socket, header: FrameHeader) -> bytes:
    """Read a small (non-layer) payload. Raises ProtocolError if it is too large."""
    if header.nbytes > MAX_CONTROL_BYTES:
        raise ProtocolError(f"{KIND_NAMES[header.kind]} payload of {header.nbytes} bytes")
    buf = bytearray(header.nbytes)
    recv_exact(sock, memoryview(buf))
    return bytes(buf)


def discard(sock: socket.socket, nbytes: int, scratch: memoryview) -> None:
    """Read and drop ``nbytes`` using ``scratch`` (any non-empty size)."""
    while nbytes > 0:
        chunk = scratch[:min(nbytes, len(scratch))]
        recv_exact(sock, chunk)
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
