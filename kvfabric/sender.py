"""The prefill side of the KV plane: one persistent connection to one decode receiver.

    sender = KVSender(address, token, identity, transport="tcp")   # connects + handshakes
    for layer in range(L):                  # as each layer's KV is computed
        sender.send_layer(plan, layer, k_cache, v_cache)
    sender.finish(plan, payload)            # e.g. the first token, for the decode side
    sender.abort(plan)                      # instead of finish, on the prefill side's abort

Every layer leaves with a digest of each of its blocks, sealed with the
cluster token together with the frame's transfer id, request id, attempt and
layer (``digests.py``); the receiver checks them before the layer counts.
``fault_rate`` (tests only, off by default; ``faults.py``) corrupts a random
fraction of transfers on purpose and records them in ``faults_injected``.

A background thread reads the connection: CANCEL frames (the receiver no
longer expects a transfer: later calls for it raise FabricTransferCancelled,
and for nixl the in-flight writes are waited for, then CANCEL_ACK is sent)
and the connection's end (later calls raise FabricPeerError).
``send_timeout_s`` bounds how long one frame may take to leave (a stopped or
cut-off receiver stops taking bytes): past it the connection is shut (the
receiver sees the frame truncated) and calls raise FabricPeerError.
Keep one KVSender per decode peer; it is safe to call from one thread at a time.
"""

import select
import socket
import threading
import time

import torch

from pdserve.kvfabric.descriptors import FabricIdentity, TransferPlan
from pdserve.kvfabric.digests import (
    MAC_SIZE,
    encode_finish_aux,
    finish_aux_size,
    finish_mac,
    mac_key,
)
from pdserve.kvfabric.errors import FabricHandshakeError, FabricPeerError, FabricTransferCancelled
from pdserve.kvfabric.faults import FaultInjector
from pdserve.kvfabric.frames import (
    ABORT,
    BEGIN,
    CANCEL,
    CANCEL_ACK,
    FINISH,
    HELLO,
    WELCOME,
    FrameHeader,
    Hello,
    ProtocolError,
    decode_welcome,
    encode_header,
    encode_msg,
    encode_raw_header,
    read_aux,
    read_control_payload,
    read_header,
)
from pdserve.kvfabric.transport import LayerWire, Transport, resolve_transport

MAX_REMEMBERED_CANCELS = 4096


class KVSender:
    """Connects to ``address`` ("host:port") and handshakes in the constructor.

    Raises FabricHandshakeError (refused: the message names why) or
    FabricPeerError (unreachable). ``fault_rate``/``fault_seed``: the test knob
    of ``faults.py`` (None: from ``PDSERVE_FABRIC_FAULT_RATE``, default off).
    ``send_timeout_s``: None waits for the receiver forever.
    """

    def __init__(self, address: str, token: str, identity: FabricIdentity,
                 transport: str | Transport = "tcp", connect_timeout_s: float = 5.0,
                 fault_rate: float | None = None, fault_seed: int | None = None,
                 send_timeout_s: float | None = None) -> None:
        self.address = address
        self.identity = identity
        self._mac_key = mac_key(token)
        self._faults = FaultInjector.from_knob(fault_rate, fault_seed)
        self._wire = LayerWire(self._mac_key, self._send_frame, self._faults)
        self._transport = resolve_transport(transport)
        self._path = self._transport.sender_path(identity)
        self._state_lock = threading.Lock()  # cancelled set + posting of one-sided writes
        self._send_lock = threading.Lock()  # one frame at a time on the socket
        self._cancelled: dict[str, str] = {}  # transfer_id -> receiver's reason
        self._begun: set[str] = set()  # digests_at_finish paths: BEGIN sent, not yet ended
        self._dead: str | None = None
        self._send_timeout_s = send_timeout_s
        self.bytes_sent = 0
        host, port = address.rsplit(":", 1)
        try:
            self._sock = socket.create_connection((host, int(port)), timeout=connect_timeout_s)
        except OSError as e:
            raise FabricPeerError(f"cannot reach KV receiver {address}: {e}") from e
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._handshake(token)
        except BaseException:
            self._sock.close()
            self._path.close()
            raise
        self._sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"kvsend-{address}")
        self._reader.start()

    def _handshake(self, token: str) -> None:
        hello = encode_msg(Hello(token=token, identity=self.identity,
                                 transport=self._transport.name,
                                 agent_name=self._path.agent_name))
        try:
            self._sock.sendall(encode_header(HELLO, len(hello)) + hello)
            h = read_header(self._sock)
            read_aux(self._sock, h)
            if h.kind != WELCOME:
                raise ProtocolError(f"expected WELCOME, got kind {h.kind}")
            welcome = decode_welcome(read_control_payload(self._sock, h))
        except (EOFError, OSError, ProtocolError) as e:
            raise FabricHandshakeError(f"KV receiver {self.address} closed the handshake: "
                                       f"{e}") from e
        if not welcome.ok:
            raise FabricHandshakeError(f"KV receiver {self.address} refused: {welcome.error}")
        self.remote_num_blocks = welcome.num_blocks
        self._path.attach(welcome)

    # -- public API --

    def send_layer(self, plan: TransferPlan, layer_idx: int, k_cache: torch.Tensor,
                   v_cache: torch.Tensor) -> int:
        """Send the plan's src blocks of layer ``layer_idx``; returns the KV bytes sent.

        ``k_cache``/``v_cache``: that layer's ``[NB, B, Hkv, D]`` caches (read only).
        tcp: returns once the bytes are in the socket. nixl: returns once the
        write is posted; the src blocks must stay unchanged until finish/abort.
        Mutates ``bytes_sent``. Raises FabricPeerError (peer gone),
        FabricTransferCancelled (receiver cancelled it), ValueError (bad plan).
        """
        self._check_plan(plan, k_cache)
        if not 0 <= layer_idx < plan.num_layers:
            raise ValueError(f"layer {layer_idx} out of range 0..{plan.num_layers - 1}")
        if plan.num_blocks == 0:
            return 0
        self._begin(plan)
        with self._state_lock:
            self._check_usable(plan)
            if self._path.one_sided:  # posted under the lock: a CANCEL waits for it
                nbytes = self._path.send_layer(plan, layer_idx, k_cache, v_cache, self._wire)
        if not self._path.one_sided:
            nbytes = self._path.send_layer(plan, layer_idx, k_cache, v_cache, self._wire)
        self.bytes_sent += nbytes
        return nbytes

    def send_layers(self, plan: TransferPlan,
                    kv_layers: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Send every layer of a plan whose KV is already complete (``send_layer`` for
        each, or fewer launches where the path can: cuda_ipc). Same contract."""
        if len(kv_layers) != plan.num_layers:
            raise ValueError(f"{len(kv_layers)} KV layers for a plan of {plan.num_layers}")
        for k, _ in kv_layers:
            self._check_plan(plan, k)
        if plan.num_blocks == 0:
            return 0
        self._begin(plan)
        with self._state_lock:
            self._check_usable(plan)
            if self._path.one_sided:
                nbytes = self._path.send_layers(plan, kv_layers, self._wire)
        if not self._path.one_sided:
            nbytes = self._path.send_layers(plan, kv_layers, self._wire)
        self.bytes_sent += nbytes
        return nbytes

    def finish(self, plan: TransferPlan, payload: bytes = b"") -> None:
        """Send the completion frame carrying ``payload`` (small, opaque) after every layer.

        Waits for the plan's in-flight writes (nixl, nccl, cuda_ipc). Raises like
        ``send_layer``, and ValueError (cuda_ipc) if a layer of the plan was not sent.
        """
        self._check_usable(plan)
        self._begun.discard(plan.transfer_id)
        writes = self._take_writes(plan)
        self._path.wait_writes(writes)
        if self._path.digests_at_finish:  # the layers left no frames: their digests go here
            algo, values = self._path.finish_digests(plan, writes)
            header = encode_header(FINISH, len(payload), plan,
                                   aux_nbytes=finish_aux_size(values.size))
            aux = encode_finish_aux(self._mac_key, header, bytes(payload), algo, values)
        else:
            header = encode_header(FINISH, len(payload), plan, aux_nbytes=MAC_SIZE)
            aux = finish_mac(self._mac_key, header, payload)
        self._send_frame(header + aux, memoryview(payload))

    def abort(self, plan: TransferPlan, reason: str = "aborted by the prefill side") -> None:
        """Tell the receiver to fail the transfer; later calls for it raise
        FabricTransferCancelled. Sends nothing if the peer is already gone.
        """
        with self._state_lock:
            self._cancelled[plan.transfer_id] = reason
        self._begun.discard(plan.transfer_id)
        try:
            self._path.wait_writes(self._take_writes(plan))
        except FabricPeerError:
            pass
        data = reason.encode()
        if self._dead is None:
            try:
                self._send_frame(encode_header(ABORT, len(data), plan), memoryview(data))
            except FabricPeerError:
                pass

    @property
    def stream_ordered(self) -> bool:
        """``send_layer`` only enqueues GPU work on the current stream, ordered after the
        work launched there before: a caller may call it right after launching the
        layer's compute, from a side stream that waits on the compute stream."""
        return self._path.stream_ordered

    @property
    def is_alive(self) -> bool:
        return self._dead is None

    @property
    def faults_injected(self) -> dict[str, tuple[int, int]]:
        """Transfers the fault knob corrupted: transfer id -> (layer, packed block index).

        Block index ``i < n`` is K of the plan's i-th block, ``n + i`` its V. Empty when off.
        """
        return {} if self._faults is None else dict(self._faults.injected)

    def close(self) -> None:
        """Wait for in-flight writes, then close the connection. Idempotent."""
        self._path.close()
        self._dead = self._dead or "closed by the prefill side"
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._reader.join(timeout=2.0)

    def __enter__(self) -> "KVSender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --

    def _check_plan(self, plan: TransferPlan, k_cache: torch.Tensor) -> None:
        if plan.src_block_ids is None:
            raise ValueError(f"plan {plan.transfer_id} has no src block ids")
        if plan.num_layers != self.identity.num_layers:
            raise ValueError(f"plan {plan.transfer_id} has {plan.num_layers} layers, "
                             f"identity {self.identity.num_layers}")
        i = self.identity
        if (tuple(k_cache.shape[1:]) != (i.block_size, i.num_kv_heads, i.head_dim)
                or str(k_cache.dtype).removeprefix("torch.") != i.dtype):
            raise ValueError(f"KV layer {tuple(k_cache.shape)} {k_cache.dtype} does not match "
                             f"the fabric identity {i}")
        if plan.src_block_ids and max(plan.src_block_ids) >= k_cache.shape[0]:
            raise ValueError(f"plan {plan.transfer_id}: src block {max(plan.src_block_ids)} "
                             f">= {k_cache.shape[0]} blocks")

    def _check_usable(self, plan: TransferPlan) -> None:
        if self._dead is not None:
            raise FabricPeerError(f"KV receiver {self.address}: {self._dead}")
        reason = self._cancelled.get(plan.transfer_id)
        if reason is not None:
            raise FabricTransferCancelled(f"transfer {plan.transfer_id}: {reason}")

    def _begin(self, plan: TransferPlan) -> None:
        """On a path whose layers leave no frames, tell the receiver once per transfer
        that this connection writes it (so our death fails it there at once).
        Mutates ``_begun``. Raises FabricPeerError, FabricTransferCancelled."""
        if not self._path.digests_at_finish or plan.transfer_id in self._begun:
            return
        self._check_usable(plan)
        self._send_frame(encode_header(BEGIN, 0, plan), None)
        self._begun.add(plan.transfer_id)
        while len(self._begun) > MAX_REMEMBERED_CANCELS:  # transfers never finished
            self._begun.pop()

    def _take_writes(self, plan: TransferPlan) -> list:
        with self._state_lock:
            return self._path.take_writes(plan.transfer_id)

    def _send_frame(self, header: bytes, payload: memoryview | None) -> None:
        try:
            with self._send_lock:
                if self._send_timeout_s is None:
                    self._sock.sendall(header)
                    if payload is not None and len(payload):
                        self._sock.sendall(payload)
                else:
                    deadline = time.monotonic() + self._send_timeout_s
                    self._send_by(header, deadline)
                    if payload is not None and len(payload):
                        self._send_by(payload, deadline)
        except OSError as e:
            self._dead = self._dead or f"connection failed ({e})"
            try:  # a frame may be half sent: end the stream so the receiver sees it cut
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            raise FabricPeerError(f"KV receiver {self.address}: {self._dead}") from e

    def _send_by(self, data, deadline: float) -> None:
        """Send all of ``data`` before ``deadline`` (monotonic) or raise TimeoutError.
        Non-blocking sends on the blocking socket, so the reader thread is unaffected."""
        view = memoryview(data).cast("B")
        poller = select.poll()
        poller.register(self._sock, select.POLLOUT)
        while view:
            try:
                view = view[self._sock.send(view, socket.MSG_DONTWAIT):]
                continue
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"a frame did not leave within {self._send_timeout_s:g} s")
            poller.poll(left * 1000)

    def _read_loop(self) -> None:
        try:
            while True:
                h = read_header(self._sock)
                read_aux(self._sock, h)
                reason = read_control_payload(self._sock, h).decode(errors="replace")
                if h.kind != CANCEL:
                    raise ProtocolError(f"unexpected frame kind {h.kind} from the receiver")
                with self._state_lock:
                    self._cancelled[h.transfer_id] = reason
                    while len(self._cancelled) > MAX_REMEMBERED_CANCELS:
                        self._cancelled.pop(next(iter(self._cancelled)))
                    writes = self._path.take_writes(h.transfer_id)
                try:
                    self._path.wait_writes(writes)
                except FabricPeerError:
                    pass
                ack = FrameHeader(CANCEL_ACK, h.transfer_id, h.request_id, -1, h.attempt,
                                  h.dst_digest, 0)
                with self._send_lock:
                    self._sock.sendall(encode_raw_header(ack))
        except (EOFError, OSError, ProtocolError) as e:
            self._dead = self._dead or ("receiver closed the connection"
                                        if isinstance(e, EOFError) else f"connection failed ({e})")
