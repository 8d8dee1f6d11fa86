"""The Triton block checksum equals the torch reference bit for bit, and any changed
word changes it. CPU: Triton's interpreter (conftest sets it up); GPU: real sizes."""

import pytest
import torch

from pdserve.kernels import reference

pytest.importorskip("triton")
from kernel_checks import gpu, interpreter  # noqa: E402

from pdserve.kernels.layers import uniform_layer_stride  # noqa: E402
from pdserve.kernels.triton_checksum import (  # noqa: E402
    block_checksums,
    copy_blocks_checksums,
    layer_block_checksums,
)


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


def check_layers(num_layers, num_blocks, bs, hkv, d, dtype, device, n):
    """One launch over an engine-shaped cache [L, 2, NB, ...] equals the reference per
    layer; a list of separate tensors takes the per-layer path with the same result."""
    store = torch.randn((num_layers, 2, num_blocks, bs, hkv, d), device=device).to(dtype)
    layers = [(store[i, 0], store[i, 1]) for i in range(num_layers)]
    ids = torch.randperm(num_blocks, device=device)[:n]
    assert uniform_layer_stride(layers) == 2 * num_blocks * bs * hkv * d * store.element_size()
    got = layer_block_checksums(layers, ids)
    assert got.shape == (num_layers, 2 * n)
    assert torch.equal(got, reference.layer_block_checksums(layers, ids))
    apart = [(k.clone(), v.clone()) for k, v in layers]
    assert uniform_layer_stride(apart) is None
    assert torch.equal(layer_block_checksums(apart, ids), got)
    store[num_layers - 1, 1].view(num_blocks, -1)[ids[0], 3] += 1  # last layer, V, block 0
    changed = (layer_block_checksums(layers, ids) != got).nonzero().tolist()
    assert changed == [[num_layers - 1, n]]


def check_copy_checksums(num_layers, src_blocks, dst_blocks, bs, hkv, d, dtype, device, n):
    """The fused copy + checksum equals copy_blocks_layers + layer_block_checksums of the
    src blocks, on engine-shaped caches (one launch) and on per-layer tensors."""
    src = torch.randn((num_layers, 2, src_blocks, bs, hkv, d), device=device).to(dtype)
    src_layers = [(src[i, 0], src[i, 1]) for i in range(num_layers)]
    src_ids = torch.randperm(src_blocks, device=device)[:n]
    dst_ids = torch.randperm(dst_blocks, device=device)[:n]
    want_dst = torch.full((num_layers, 2, dst_blocks, bs, hkv, d), float("nan"),
                          device=device).to(dtype)
    want_sums = reference.copy_blocks_checksums(
        src_layers, src_ids, [(want_dst[i, 0], want_dst[i, 1]) for i in range(num_layers)],
        dst_ids)
    for shared in (True, False):
        if shared:
            dst = torch.full_like(want_dst, float("nan"))
            dst_layers = [(dst[i, 0], dst[i, 1]) for i in range(num_layers)]
        else:
            dst_layers = [(torch.full_like(want_dst[i, 0], float("nan")),
                           torch.full_like(want_dst[i, 1], float("nan")))
                          for i in range(num_layers)]
        sums = copy_blocks_checksums(src_layers, src_ids, dst_layers, dst_ids)
        assert torch.equal(sums, want_sums)
        assert torch.equal(sums, reference.layer_block_checksums(src_layers, src_ids))
        for i, (k, v) in enumerate(dst_layers):
            torch.testing.assert_close(k, want_dst[i, 0], rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(v, want_dst[i, 1], rtol=0, atol=0, equal_nan=True)


@interpreter
def test_layer_checksums_interpreter():
    check_layers(3, 7, 4, 2, 16, torch.float16, "cpu", n=4)


@interpreter
def test_copy_checksums_interpreter():
    check_copy_checksums(3, 9, 11, 4, 2, 16, torch.bfloat16, "cpu", n=5)


@interpreter
def test_extreme_words_interpreter():
    """Words at the int32 extremes (the split into 16-bit halves must stay exact)."""
    k = torch.tensor([-2**31, 2**31 - 1, -1, 0, 65535, -65536, 12345678, -7] * 8,
                     dtype=torch.int32).view(2, 4, 1, 8)
    v = torch.flip(k, [0])
    ids = torch.tensor([1, 0])
    assert torch.equal(block_checksums(k, v, ids), reference.block_checksums(k, v, ids))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_checksum_gpu(dtype):
    check(1024, 16, 8, 128, dtype, "cuda", n=256)
    check_layers(32, 512, 16, 8, 128, dtype, "cuda", n=256)
    check_copy_checksums(32, 600, 500, 16, 8, 128, dtype, "cuda", n=256)
