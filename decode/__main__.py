"""``python -m pdserve.decode SPEC_JSON``: run one decode (or colocated) worker."""

from pdserve.decode.worker import DecodeWorker
from pdserve.engine.worker_main import run_worker

if __name__ == "__main__":
    run_worker(DecodeWorker)
