"""A man-in-the-middle TCP proxy for KV fabric tests: parses the sender's frames and lets
the test corrupt, cut, drop or replay them; the receiver's bytes pass unchanged.

    proxy = Mitm(receiver_address, tamper)   # tamper(header, frame_bytes) -> list | CUT
    sender connects to proxy.address

Also used between a live cluster's prefill and decode workers (tests/e2e), where
the decode worker advertises the proxy's address (``kv_advertise``).

``tamper`` returns the byte strings to forward in place of the frame (``[frame]``
forwards it, ``[]`` drops it), or ``Cut(prefix)``: forward ``prefix``, then close
both sides. Every frame seen is kept in ``frames`` as (header, bytes).
"""

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.kvfabric.frames import HEADER_SIZE, FrameHeader, decode_header, split_ids_length


@dataclass(frozen=True)
class Cut:
    prefix: bytes


Tamper = Callable[[FrameHeader, bytes], "list[bytes] | Cut"]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket) -> tuple[FrameHeader, bytes]:
    """One whole frame (header, ids, aux, payload) as it was on the wire."""
    fixed = _recv_exact(sock, HEADER_SIZE)
    ids = _recv_exact(sock, split_ids_length(fixed))
    h = decode_header(fixed, ids)
    return h, fixed + ids + _recv_exact(sock, h.aux_nbytes + h.nbytes)


class Mitm:
    """Proxies every connection made to ``address`` to ``target`` ("host:port"), each on
    its own upstream connection (a sender whose connection was cut reconnects).
    ``keep_frames=False``: record headers only (long runs through a live cluster)."""

    def __init__(self, target: str, tamper: Tamper, keep_frames: bool = True) -> None:
        self.target = target
        self.tamper = tamper
        self.keep_frames = keep_frames
        self.frames: list[tuple[FrameHeader, bytes]] = []
        self.num_connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="mitm-accept").start()

    def close(self) -> None:
        self._listener.close()
        for s in self._socks:
            _close(s)

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            host, port = self.target.rsplit(":", 1)
            try:
                up = socket.create_connection((host, int(port)))
            except OSError:
                _close(down)
                continue
            self.num_connections += 1
            self._socks += [down, up]
            threading.Thread(target=self._to_receiver, args=(down, up), daemon=True).start()
            threading.Thread(target=self._to_sender, args=(up, down), daemon=True).start()

    def _to_receiver(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                h, frame = read_frame(src)
                self.frames.append((h, frame if self.keep_frames else b""))
                out = self.tamper(h, frame)
                if isinstance(out, Cut):
                    dst.sendall(out.prefix)
                    break
                for data in out:
                    dst.sendall(data)
        except (EOFError, OSError):
            pass
        _close(src)
        _close(dst)

    def _to_sender(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        _close(src)
        _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
