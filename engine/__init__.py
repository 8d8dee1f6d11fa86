"""What both worker pools share: the model, the paged KV cache, the scheduler.

Public names: ``LLM`` and ``SamplingParams`` (offline API), ``LLMEngine`` and
``EngineConfig`` (driven by the workers), ``hash_block_chain`` (the one block
hash, used by the router too).
"""
