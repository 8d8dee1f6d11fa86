"""The prefill worker: takes prompts with their destination blocks, runs (chunked,
batched) prefill, pushes each finished layer's KV to the chosen decode worker, and
hands the first token over with the last frame.

Public names: ``PrefillWorker``; run with ``python -m pdserve.prefill SPEC_JSON``.
"""
