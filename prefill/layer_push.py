"""Layer-wise push that overlaps the fabric with the next layer's compute.

    engine thread (compute stream)        push thread (side stream)
    layer i kernels launched
    push(i): record event e_i, queue ---> wait e_i (layer i's KV is written)
    layer i+1 kernels launched             send_layer(i): pack on the side stream,
    ...                                    then post (nixl WRITE / nccl send / tcp)
    flush() after the step  <-----------  every queued layer sent (or failed)

On CUDA the engine thread never waits for the fabric: the push thread waits
for layer i's event, so a one-sided write cannot read KV that is still being
computed, and the pack runs on its own stream beside layer i+1. A
stream-ordered path (cuda_ipc: a copy kernel, nothing on the host) skips the
thread: the engine thread launches it on the side stream, which waits for the
compute stream on the GPU. On the CPU
``push`` sends at once in the calling thread (there is nothing to overlap
with, and the order of the tested CPU path stays as it was).
"""

import queue
import threading
from collections.abc import Callable

import torch

from pdserve.kvfabric import FabricError

Send = Callable[[], int]
FLUSH_TIMEOUT_S = 120.0


class LayerPusher:
    """Runs layer sends in order on one thread; collects failures by request id."""

    def __init__(self, device: torch.device) -> None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._errors: dict[str, str] = {}
        self._jobs: queue.Queue | None = None
        self._side = None
        if device.type == "cuda":
            self._side = torch.cuda.Stream(device)
            self._jobs = queue.Queue()
            threading.Thread(target=self._loop, daemon=True, name="prefill-push").start()

    def push(self, request_id: str, send: Send, stream_ordered: bool = False) -> None:
        """Queue ``send`` (one ``KVSender.send_layer`` call) to run once the work
        launched so far on the current stream is done. Mutates the queue.

        ``stream_ordered`` sends (``KVSender.stream_ordered``) run at once in the calling
        thread, on the side stream made to wait for the current one: no thread hop, no
        host wait, and the calling thread's few launches overlap the GPU's compute."""
        if self._jobs is None:
            self._run(request_id, send)
            return
        if stream_ordered:
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                self._run(request_id, send)
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._jobs.put((request_id, send, event))

    def flush(self) -> dict[str, str]:
        """Wait until every queued send ran; returns and forgets {request id: error}."""
        if self._jobs is not None:
            done = threading.Event()
            self._jobs.put((None, done.set, None))
            if not done.wait(FLUSH_TIMEOUT_S):
                raise RuntimeError(f"layer sends did not finish within {FLUSH_TIMEOUT_S} s")
        errors, self._errors = self._errors, {}
        return errors

    def _run(self, request_id: str, send: Send) -> None:
        if request_id in self._errors:
            return  # an earlier layer failed: the transfer is aborted after the step
        try:
            send()
        except (ValueError, FabricError) as exc:
            self._errors[request_id] = str(exc)
        except Exception as exc:  # noqa: BLE001 (the push thread must survive anything)
            if self._jobs is None:
                raise
            self._errors[request_id] = f"{type(exc).__name__}: {exc}"

    def _loop(self) -> None:
        torch.cuda.set_device(self.device)
        while True:
            request_id, send, event = self._jobs.get()
            if event is None:
                send()  # a flush marker
                continue
            event.synchronize()
            with torch.cuda.stream(self._side):
                self._run(request_id, send)
