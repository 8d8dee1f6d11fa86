"""``python -m pdserve.prefill SPEC_JSON``: run one prefill worker."""

from pdserve.engine.worker_main import run_worker
from pdserve.prefill.worker import PrefillWorker

if __name__ == "__main__":
    run_worker(PrefillWorker)
