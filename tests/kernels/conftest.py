"""Kernel tests: the Triton kernels against the torch references.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors
(float16 / float32 only: the interpreter mis-loads bfloat16). The interpreter
is chosen when ``@triton.jit`` decorates a kernel, so the variable is set
here, before the test modules import ``pdserve.kernels.triton_*``; a kernel
module that something imported earlier is re-decorated. Nothing else in the
test session runs Triton on the CPU, and with a GPU nothing is changed: the
``gpu`` tests then run compiled kernels and the interpreter tests are skipped
(unless ``TRITON_INTERPRET=1`` is set by hand).
"""

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in [m for m in sys.modules if m.startswith("pdserve.kernels.triton_")]:
        importlib.reload(sys.modules[_name])


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.fixture
def paged_cache():
    """Factory: random caches and block tables for ragged ``context_lens``.

    Blocks are handed out in random order; table entries past a sequence's
    blocks hold random (valid) ids that a kernel must not use. Returns
    ``(k_clean, v_clean, k_poisoned, v_poisoned, block_tables)``: the
    poisoned caches hold NaN in every slot outside some sequence's context,
    so a kernel that reads past a context produces NaN, while the reference
    runs on the clean caches.
    """

    def make(context_lens, num_kv_heads, head_dim, block_size, dtype, device="cpu"):
        nblocks = [cdiv(c, block_size) for c in context_lens]
        max_blocks = max(nblocks) + 1
        num_blocks = sum(nblocks) + 3
        perm = torch.randperm(num_blocks)
        tables = torch.randint(0, num_blocks, (len(context_lens), max_blocks), dtype=torch.int32)
        used = torch.zeros(num_blocks * block_size, dtype=torch.bool)
        first = 0
        for i, (ctx, nb) in enumerate(zip(context_lens, nblocks, strict=True)):
            ids = perm[first:first + nb]
            first += nb
            tables[i, :nb] = ids.to(torch.int32)
            slots = (ids[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:ctx]
            used[slots] = True
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        k = torch.randn(shape, dtype=dtype)
        v = torch.randn(shape, dtype=dtype)
        k_bad, v_bad = k.clone(), v.clone()
        unused = ~used.view(num_blocks, block_size)
        k_bad[unused] = float("nan")
        v_bad[unused] = float("nan")
        return tuple(x.to(device) for x in (k, v, k_bad, v_bad, tables))

    return make

