"""The decode side of the KV plane: accepts prefill peers and lands their KV blocks.

    KVReceiver(kv_layers, identity, token, transport="tcp", host, port=0)
      ├─ accept thread: one connection per prefill peer; handshake (token,
      │  identity, transport), then one thread per connection reading frames
      │  (tcp: LAYER payloads recv_into a staging buffer, block digests
      │  checked there, then scattered into the dst blocks under the table's lock)
      ├─ service thread: NIXL notifications (nixl: block digests checked on
      │  the landed dst blocks before the layer counts), time-outs, drain grace
      └─ TransferTable: what is expected, and the callbacks (``transfers.py``)

Callbacks run on the receiver's threads, outside its locks; they must be quick.
"""

import hmac
import logging
import socket
import threading
import time

import torch

from pdserve.kvfabric.descriptors import FabricIdentity, TransferPlan
from pdserve.kvfabric.digests import (
    ALGO_NAMES,
    DigestError,
    as_block_rows,
    block_digests,
    cache_block_digests,
    check_finish_mac,
    decode_layer_aux,
    mac_key,
)
from pdserve.kvfabric.finish_check import landed_digest_error
from pdserve.kvfabric.frames import (
    ABORT,
    BEGIN,
    CANCEL,
    CANCEL_ACK,
    FINISH,
    HELLO,
    KIND_NAMES,
    LAYER,
    WELCOME,
    FrameHeader,
    ProtocolError,
    TruncatedFrame,
    VersionMismatch,
    Welcome,
    decode_hello,
    discard,
    encode_header,
    encode_msg,
    encode_raw_header,
    parse_notification,
    read_aux,
    read_control_payload,
    read_header,
)
from pdserve.kvfabric.layout import check_kv_layers
from pdserve.kvfabric.tcp import LayerStaging
from pdserve.kvfabric.transfers import TransferTable, run_actions
from pdserve.kvfabric.transport import Transport, resolve_transport

log = logging.getLogger(__name__)


class _Conn:
    """One accepted prefill peer."""

    def __init__(self, sock: socket.socket, peer: str, identity: FabricIdentity) -> None:
        self.sock = sock
        self.peer = peer
        self.one_sided = False
        self.digests_at_finish = False  # its FINISH carries every layer's digests
        self.agent_name = ""
        self.staging = LayerStaging(identity)
        self.frame: FrameHeader | None = None  # the frame being read, for truncation reports
        self._send_lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def send_cancel(self, plan: TransferPlan, reason: str) -> None:
        """Tell the peer to stop sending ``plan`` (best effort)."""
        data = reason.encode()
        try:
            self.send(encode_header(CANCEL, len(data), plan) + data)
        except OSError:
            pass


class KVReceiver:
    """Listens on ``host:port`` (0 = any free port; see ``address``) from construction."""

    def __init__(self, kv_layers: list[tuple[torch.Tensor, torch.Tensor]],
                 identity: FabricIdentity, token: str, transport: str | Transport = "tcp",
                 host: str = "127.0.0.1", port: int = 0,
                 handshake_timeout_s: float = 5.0) -> None:
        self.num_blocks = check_kv_layers(kv_layers, identity)
        self.identity = identity
        self._kv_layers = kv_layers
        self._token = token.encode()
        self._mac_key = mac_key(token)
        self._transport = resolve_transport(transport)
        self._path = self._transport.receiver_path(identity, kv_layers)
        self._handshake_timeout_s = handshake_timeout_s
        self._max_layer_bytes = 2 * self.num_blocks * identity.bytes_per_block
        self._conns: dict[_Conn, None] = {}
        self._conns_lock = threading.Lock()
        self._table = TransferTable(identity, self._live_conns)
        self._closing = threading.Event()
        self._wake = threading.Event()  # set by expect and close: poll now
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(0.2)
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self._threads = [threading.Thread(target=f, daemon=True, name=f"kvrecv-{f.__name__}")
                         for f in (self._accept_loop, self._service_loop)]
        for t in self._threads:
            t.start()

    # -- public API --

    def expect(self, plan: TransferPlan, on_complete, on_error, timeout_s: float = 30.0,
               on_timing=None) -> None:
        """Expect ``plan``'s KV into its dst blocks. Mutates the table.

        Exactly one of ``on_complete(plan, payload)`` (every layer arrived with
        matching block digests, and the sealed finish frame) or
        ``on_error(plan, reason)`` will run. ``on_timing(plan, nbytes, wire_s)``, if
        given, runs just before ``on_complete``: the KV bytes landed and the seconds
        their layer frames took to read off the wire (tcp; 0.0 for one-sided peers,
        whose writes land without us).
        Raises ValueError for a plan that cannot fit this cache or is already expected.
        """
        if plan.num_layers != self.identity.num_layers:
            raise ValueError(f"plan {plan.transfer_id} has {plan.num_layers} layers, "
                             f"the cache {self.identity.num_layers}")
        if plan.dst_block_ids and max(plan.dst_block_ids) >= self.num_blocks:
            raise ValueError(f"plan {plan.transfer_id}: dst block {max(plan.dst_block_ids)} "
                             f">= {self.num_blocks} blocks")
        device = self._kv_layers[0][0].device
        dst_index = torch.tensor(plan.dst_block_ids, dtype=torch.int64, device=device)
        self._table.add(self._table.new_pending(plan, dst_index, on_complete, on_error,
                                                timeout_s, on_timing))
        self._wake.set()

    def cancel(self, transfer_id: str, reason: str = "cancelled by the decode side") -> bool:
        """Stop expecting a transfer; its on_error runs (nixl: once peers confirm).

        After this returns the receiver writes nothing more into its blocks.
        Returns False if it was not expected.
        """
        actions = self._table.fail(transfer_id, reason)
        run_actions(actions or [])
        return actions is not None

    @property
    def num_pending(self) -> int:
        """Transfers expected and not yet reported (complete or failed)."""
        return len(self._table)

    @property
    def bytes_received(self) -> int:
        """KV payload bytes landed in this cache (headers and control frames excluded)."""
        return self._table.bytes_received

    @property
    def num_dropped_frames(self) -> int:
        return self._table.num_dropped_frames

    @property
    def num_connections(self) -> int:
        with self._conns_lock:
            return len(self._conns)

    def close(self) -> None:
        """Stop listening, drop every connection (their transfers fail). Idempotent."""
        self._closing.set()
        self._wake.set()
        self._listener.close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            _shutdown(conn.sock)
        for t in self._threads:
            t.join(timeout=2.0)
        self._path.close()

    def __enter__(self) -> "KVReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- threads --

    def _live_conns(self) -> list[_Conn]:
        with self._conns_lock:
            return list(self._conns)

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, f"{addr[0]}:{addr[1]}", self.identity)
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name=f"kvrecv-conn-{conn.peer}").start()

    def _service_loop(self) -> None:
        """Poll notifications every 0.5 ms while a transfer is expected, every 20 ms
        otherwise (fast polling costs a core's worth of wake-ups, which a small CPU box
        takes from the engine; ``expect`` wakes the loop)."""
        fast = self._path.has_notifications
        while not self._closing.is_set():
            busy = fast and len(self._table) > 0
            self._wake.wait(0.0005 if busy else 0.02)
            self._wake.clear()
            for agent, msg in self._path.poll_notifications():
                self._on_notification(agent, msg)
            run_actions(self._table.expire(time.monotonic()))

    def _on_notification(self, agent: str, msg: bytes) -> None:
        """A one-sided layer landed: check its digests on the dst blocks, then count it."""
        try:
            h, aux = parse_notification(msg)
        except ProtocolError as e:
            log.warning("dropping NIXL notification from %s: %s", agent, e)
            return
        with self._conns_lock:
            conn = next((c for c in self._conns if c.agent_name == agent), None)
        if h.kind != LAYER or conn is None:
            log.warning("dropping NIXL notification %s from %s", h, agent)
            return
        t, actions = self._table.precheck_layer(conn, h)
        run_actions(actions)
        if t is None:
            return
        k_cache, v_cache = self._kv_layers[h.layer]
        error = self._digest_error(h, aux, t.plan, lambda algo: cache_block_digests(
            algo, k_cache, v_cache, t.dst_index))
        run_actions(self._table.layer_arrived(conn, h, None, error))

    def _digest_error(self, h: FrameHeader, aux: bytes, plan: TransferPlan,
                      digest_of) -> str | None:
        """Why layer frame ``h``'s bytes are not what its sender digested, or None. Pure.

        ``digest_of(algo)``: the digests of the bytes about to be used (K blocks, then V).
        """
        try:
            sent = decode_layer_aux(self._mac_key, encode_raw_header(h), aux)
        except DigestError as e:
            return f"layer {h.layer}: {e}"
        n = plan.num_blocks
        if len(sent.values) != 2 * n:
            return f"layer {h.layer}: {len(sent.values)} block digests, expected {2 * n}"
        bad = sent.first_mismatch(digest_of(sent.algo))
        if bad is None:
            return None
        half = "K" if bad < n else "V"
        return (f"digest mismatch in layer {h.layer}, block {bad} ({half} of dst block "
                f"{plan.dst_block_ids[bad % n]}, {ALGO_NAMES[sent.algo]})")

    def _finish_digest_error(self, h: FrameHeader, aux: bytes, payload: bytes) -> str | None:
        """Why a digest-carrying FINISH does not vouch for what landed, or None."""
        t = self._table.lookup(h)
        if t is None:
            return None  # finish_arrived drops or fails it with the reason
        return landed_digest_error(self._mac_key, encode_raw_header(h), payload, aux, t.plan,
                                   self._kv_layers, t.dst_index)

    def _serve(self, conn: _Conn) -> None:
        try:
            if not self._handshake(conn):
                return
        except (OSError, EOFError, ProtocolError) as e:
            log.warning("KV handshake with %s failed: %s", conn.peer, e)
            _shutdown(conn.sock)
            return
        reason = "disconnected"
        try:
            while True:
                conn.frame = None
                h = read_header(conn.sock)
                conn.frame = h
                self._on_frame(conn, h)
        except TruncatedFrame as e:
            reason = "disconnected mid-frame"
            h = conn.frame
            if h is not None:  # the transfer whose frame was cut fails with that reason
                where = f" layer {h.layer}" if h.kind == LAYER else ""
                run_actions(self._table.fail(h.transfer_id, (
                    f"truncated {KIND_NAMES[h.kind]} frame{where} from prefill peer "
                    f"{conn.peer} ({e})"), drain=False) or [])
        except EOFError:
            reason = "disconnected"
        except ProtocolError as e:
            reason = f"sent a malformed frame ({e})"
        except OSError as e:
            reason = f"connection failed ({e})"
        finally:
            with self._conns_lock:
                self._conns.pop(conn, None)
            _shutdown(conn.sock)
            run_actions(self._table.peer_lost(conn, f"prefill peer {conn.peer} {reason}"))

    def _handshake(self, conn: _Conn) -> bool:
        """Read HELLO, answer WELCOME; on refusal answer, close and return False."""
        conn.sock.settimeout(self._handshake_timeout_s)
        try:
            h = read_header(conn.sock)
        except VersionMismatch as e:
            log.warning("refusing KV peer %s: %s", conn.peer, e)
            _send_welcome(conn, Welcome(ok=False, error=str(e)))
            _shutdown(conn.sock)
            return False
        read_aux(conn.sock, h)
        if h.kind != HELLO:
            raise ProtocolError(f"expected HELLO, got kind {h.kind}")
        hello = decode_hello(read_control_payload(conn.sock, h))
        error = None
        if not hmac.compare_digest(hello.token.encode(), self._token):
            error = "cluster token mismatch"
        elif hello.transport not in ("tcp", self._transport.name):
            error = f"transport mismatch: prefill {hello.transport}, decode {self._transport.name}"
        else:
            error = hello.identity.first_mismatch(self.identity)
        if error is not None:
            log.warning("refusing KV peer %s: %s", conn.peer, error)
            _send_welcome(conn, Welcome(ok=False, error=error))
            _shutdown(conn.sock)
            return False
        conn.one_sided = hello.transport != "tcp"
        conn.digests_at_finish = conn.one_sided and self._transport.digests_at_finish
        conn.agent_name = hello.agent_name
        with self._conns_lock:
            self._conns[conn] = None
        fields = self._path.welcome_fields() if conn.one_sided else {}
        _send_welcome(conn, Welcome(ok=True, num_blocks=self.num_blocks, **fields))
        conn.sock.settimeout(None)
        return True

    def _on_frame(self, conn: _Conn, h: FrameHeader) -> None:
        if h.kind == LAYER:
            self._on_layer(conn, h)
            return
        if h.kind not in (FINISH, ABORT, CANCEL_ACK, BEGIN):
            raise ProtocolError(f"unexpected frame kind {h.kind}")
        aux = read_aux(conn.sock, h)
        payload = read_control_payload(conn.sock, h)
        if h.kind == BEGIN:
            actions = self._table.begin(conn, h)
        elif h.kind == FINISH and conn.digests_at_finish:
            error = self._finish_digest_error(h, aux, payload)
            actions = self._table.finish_arrived(conn, h, payload, error, all_layers=True)
        elif h.kind == FINISH:
            seal_error = check_finish_mac(self._mac_key, encode_raw_header(h), payload, aux)
            actions = self._table.finish_arrived(conn, h, payload, seal_error)
        elif h.kind == ABORT:
            reason = payload.decode(errors="replace")
            actions = self._table.fail(h.transfer_id, f"aborted by prefill side: {reason}",
                                       drain=False) or []
        else:
            actions = self._table.peer_acked(conn, h.transfer_id)
        run_actions(actions)

    def _on_layer(self, conn: _Conn, h: FrameHeader) -> None:
        """Stage a layer, check its block digests on the staging buffer, then scatter it."""
        if h.nbytes > self._max_layer_bytes:
            raise ProtocolError(f"layer frame of {h.nbytes} bytes exceeds the cache")
        t, actions = self._table.precheck_layer(conn, h)
        run_actions(actions)
        if t is None:
            discard(conn.sock, h.aux_nbytes + h.nbytes, memoryview(bytearray(1 << 16)))
            return
        t0 = time.perf_counter()
        aux = read_aux(conn.sock, h)
        raw = conn.staging.read(conn.sock, h.nbytes)  # [nbytes] uint8, host
        wire_s = time.perf_counter() - t0
        rows = as_block_rows(raw, 2 * t.plan.num_blocks)
        error = self._digest_error(h, aux, t.plan, lambda algo: block_digests(algo, rows))
        k_cache, v_cache = self._kv_layers[h.layer]
        write = lambda t: conn.staging.unpack(raw, k_cache, v_cache, t.dst_index)
        run_actions(self._table.layer_arrived(conn, h, write, error, wire_s))


def _send_welcome(conn: _Conn, welcome: Welcome) -> None:
    data = encode_msg(welcome)
    conn.send(encode_header(WELCOME, len(data)) + data)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
