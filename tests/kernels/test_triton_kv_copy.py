"""Triton KV store and block pack/unpack against the torch references (bit-exact).

CPU: Triton's interpreter (conftest sets it up). GPU: real sizes, bf16 included.
"""


import pytest
import torch

from pdserve.kernels import reference

pytest.importorskip("triton")
from kernel_checks import INTERPRET, gpu, interpreter  # noqa: E402,F401

from pdserve.kernels.triton_blocks import (  # noqa: E402
    copy_blocks,
    copy_blocks_layers,
    pack_blocks,
    unpack_blocks,
)
from pdserve.kernels.triton_store import store_kv  # noqa: E402


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal bit for bit (NaN where the other has NaN)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def check_store(num_tokens, hkv, d, bs, src_dtype, cache_dtype, device, strided_src=False):
    num_blocks = (num_tokens + bs - 1) // bs + 4
    slots = torch.randperm(num_blocks * bs, device=device)[:num_tokens]
    if strided_src:  # key/value as slices of one fused [T, Hq + 2 Hkv, D] projection
        qkv = torch.randn(num_tokens, 4 + 2 * hkv, d, dtype=src_dtype, device=device)
        key, value = qkv[:, 4:4 + hkv], qkv[:, 4 + hkv:]
    else:
        key = torch.randn(num_tokens, hkv, d, dtype=src_dtype, device=device)
        value = torch.randn(num_tokens, hkv, d, dtype=src_dtype, device=device)
    shape = (num_blocks, bs, hkv, d)
    k_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.store_kv(key, value, k_ref, v_ref, slots)
    store_kv(key, value, k_cache, v_cache, slots)
    assert_same(k_cache, k_ref)
    assert_same(v_cache, v_ref)


def check_pack_unpack(num_blocks, n, bs, hkv, d, dtype, device, layout):
    shape = (num_blocks, bs, hkv, d)
    if layout == "interleaved":  # [NB, 2, B, H, D] with K and V views: strided blocks
        kv = torch.randn((num_blocks, 2) + shape[1:], device=device).to(dtype)
        k_cache, v_cache = kv[:, 0], kv[:, 1]
    elif layout == "head_sliced":  # blocks not contiguous: falls back to torch
        k_cache = torch.randn(shape[:2] + (hkv + 1, d), device=device).to(dtype)[:, :, 1:]
        v_cache = torch.randn(shape[:2] + (hkv + 1, d), device=device).to(dtype)[:, :, 1:]
    else:
        k_cache = torch.randn(shape, device=device).to(dtype)
        v_cache = torch.randn(shape, device=device).to(dtype)
    ids = torch.randperm(num_blocks, device=device)[:n]

    out = torch.full((2, n) + shape[1:], float("nan"), device=device).to(dtype)
    got = pack_blocks(k_cache, v_cache, ids, out)
    assert got is out
    assert_same(out, reference.pack_blocks(k_cache, v_cache, ids))
    assert_same(pack_blocks(k_cache, v_cache, ids), out)

    buf = torch.randn((2, n) + shape[1:], device=device).to(dtype)
    k_cache.fill_(float("nan"))
    v_cache.fill_(float("nan"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.unpack_blocks(buf, k_ref, v_ref, ids)
    unpack_blocks(buf, k_cache, v_cache, ids)
    assert_same(k_cache, k_ref)
    assert_same(v_cache, v_ref)


def check_copy_blocks(src_blocks, dst_blocks, n, bs, hkv, d, dtype, device):
    """Blocks move from random src ids to random dst ids of another cache; nothing else of
    the dst cache changes (it stays NaN), bit-exact against the reference."""
    src_k = torch.randn((src_blocks, bs, hkv, d), device=device).to(dtype)
    src_v = torch.randn((src_blocks, bs, hkv, d), device=device).to(dtype)
    src_ids = torch.randperm(src_blocks, device=device)[:n]
    dst_ids = torch.randperm(dst_blocks, device=device)[:n]
    dst_k = torch.full((dst_blocks, bs, hkv, d), float("nan"), device=device).to(dtype)
    dst_v = torch.full_like(dst_k, float("nan"))
    k_ref, v_ref = dst_k.clone(), dst_v.clone()
    reference.copy_blocks(src_k, src_v, src_ids, k_ref, v_ref, dst_ids)
    copy_blocks(src_k, src_v, src_ids, dst_k, dst_v, dst_ids)
    assert_same(dst_k, k_ref)
    assert_same(dst_v, v_ref)
    assert_same(dst_k[dst_ids.long()], src_k[src_ids.long()])
    untouched = torch.ones(dst_blocks, dtype=torch.bool, device=device)
    untouched[dst_ids.long()] = False
    assert bool(dst_k[untouched].isnan().all()) and bool(dst_v[untouched].isnan().all())


def check_copy_layers(num_layers, src_blocks, dst_blocks, n, bs, hkv, d, dtype, device):
    """Engine-shaped caches [L, 2, NB, ...] on both sides (one launch), and per-layer
    tensors (one launch per layer): both equal the reference; nothing else changes."""
    src = torch.randn((num_layers, 2, src_blocks, bs, hkv, d), device=device).to(dtype)
    dst = torch.full((num_layers, 2, dst_blocks, bs, hkv, d), float("nan"),
                     device=device).to(dtype)
    src_layers = [(src[i, 0], src[i, 1]) for i in range(num_layers)]
    src_ids = torch.randperm(src_blocks, device=device)[:n]
    dst_ids = torch.randperm(dst_blocks, device=device)[:n]
    want = dst.clone()
    reference.copy_blocks_layers(src_layers, src_ids, [(want[i, 0], want[i, 1])
                                                       for i in range(num_layers)], dst_ids)
    copy_blocks_layers(src_layers, src_ids, [(dst[i, 0], dst[i, 1])
                                             for i in range(num_layers)], dst_ids)
    assert_same(dst, want)
    assert_same(dst[:, :, dst_ids.long()], src[:, :, src_ids.long()])
    apart = [(torch.full_like(src[0, 0, :1].expand(dst_blocks, -1, -1, -1), float("nan")),
              torch.full_like(src[0, 0, :1].expand(dst_blocks, -1, -1, -1), float("nan")))
             for _ in range(num_layers)]
    copy_blocks_layers(src_layers, src_ids, apart, dst_ids)
    for i, (k, v) in enumerate(apart):
        assert_same(k, want[i, 0])
        assert_same(v, want[i, 1])


@interpreter
def test_copy_blocks_layers_interpreter():
    check_copy_layers(3, 9, 12, 5, 16, 2, 32, torch.bfloat16, "cpu")


@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_copy_blocks_interpreter(dtype):
    check_copy_blocks(11, 17, 6, 16, 3, 64, dtype, "cpu")


@interpreter
@pytest.mark.parametrize("src_dtype,cache_dtype", [(torch.float16, torch.float16),
                                                   (torch.float32, torch.float32),
                                                   (torch.float32, torch.float16)])
@pytest.mark.parametrize("hkv,d,bs", [(2, 64, 16), (3, 64, 32), (1, 128, 16)])
def test_store_kv_interpreter(src_dtype, cache_dtype, hkv, d, bs):
    check_store(37, hkv, d, bs, src_dtype, cache_dtype, "cpu")


@interpreter
def test_store_kv_interpreter_strided_source():
    check_store(21, 2, 64, 16, torch.float16, torch.float16, "cpu", strided_src=True)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "interleaved", "head_sliced"])
def test_pack_unpack_interpreter(dtype, layout):
    check_pack_unpack(13, 7, 16, 3, 64, dtype, "cpu", layout)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_store_kv_gpu(dtype):
    check_store(5000, 8, 128, 16, dtype, dtype, "cuda")
    check_store(777, 8, 128, 32, dtype, dtype, "cuda", strided_src=True)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
def test_pack_unpack_gpu(dtype, layout):
    check_pack_unpack(3000, 1000, 16, 8, 128, dtype, "cuda", layout)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_copy_blocks_gpu(dtype):
    check_copy_blocks(3000, 2500, 1000, 16, 8, 128, dtype, "cuda")
    check_copy_layers(32, 600, 500, 256, 16, 8, 128, dtype, "cuda")
