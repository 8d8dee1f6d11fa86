"""The Triton block checksum equals the torch reference bit for bit, and any changed
word changes it. CPU: Triton's interpreter (conftest sets it up); GPU: real sizes."""

import pytest
import torch

from pdserve.kernels import reference

pytest.importorskip("triton")
from kernel_checks import gpu, interpreter  # noqa: E402

from pdserve.kernels.triton_checksum import block_checksums  # noqa: E402


def caches(num_blocks, bs, hkv, d, dtype, device):
    shape = (num_blocks, bs, hkv, d)
    return (torch.randn(shape, dtype=dtype, device=device),
            torch.randn(shape, dtype=dtype, device=device))


def check(num_blocks, bs, hkv, d, dtype, device, n, tile=2048):
    k, v = caches(num_blocks, bs, hkv, d, dtype, device)
    ids = torch.randperm(num_blocks, device=device)[:n]
    got = block_checksums(k, v, ids, tile=tile)
    want = reference.block_checksums(k, v, ids)
    assert got.dtype == torch.int64 and got.shape == (2 * n,)
    assert torch.equal(got, want)
    assert bool(((got >= 0) & (got < reference.WSUM_P)).all())
    # one word of one V block changed: exactly that block's checksum changes
    j = int(torch.randint(n, ()).item())
    v.view(num_blocks, -1)[ids[j], 5] += 1
    again = block_checksums(k, v, ids, tile=tile)
    changed = (again != got).nonzero().flatten().tolist()
    assert changed == [n + j]


@interpreter
@pytest.mark.parametrize("bs,hkv,d,dtype,tile", [
    (16, 2, 64, torch.float16, 512),  # 1 chunk, several tiles
    (4, 1, 24, torch.float32, 2048),  # a chunk smaller than a tile, not a power of 2
    (16, 8, 40, torch.float32, 4096),  # 20480 words: 2 chunks, the last zero-padded
])
def test_checksum_interpreter(bs, hkv, d, dtype, tile):
    check(9, bs, hkv, d, dtype, "cpu", n=5, tile=tile)


@interpreter
def test_no_blocks_gives_an_empty_result():
    k, v = caches(3, 4, 1, 8, torch.float32, "cpu")
    assert block_checksums(k, v, torch.zeros(0, dtype=torch.int64)).shape == (0,)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_checksum_gpu(dtype):
    check(1024, 16, 8, 128, dtype, "cuda", n=256)
