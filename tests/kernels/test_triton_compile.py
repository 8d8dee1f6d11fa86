"""Compile the Triton kernels for sm_90 (H100/H200) on the CPU: no GPU needed.

The interpreter runs only the branches a test reaches and loads bfloat16
wrongly, so a type error in a constexpr branch (seen once: an atomic on a
dummy bf16 pointer in the single-partition decode) or a bf16-only problem
would first show up on the GPU. Triton's own compiler and the ``ptxas`` in
its wheel catch those here. Runs in a subprocess, because this session's
kernels are decorated for the interpreter.
"""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

SCRIPT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pdserve.kernels import (triton_blocks, triton_checksum, triton_decode, triton_fused,
                             triton_gemv, triton_prefill, triton_store)

def compile_for_sm90(fn, types, consts, num_warps, num_stages):
    pdl = bool(consts.get("PDL", False))
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "i32")
            if sig[name].startswith("*") or name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, consts, attrs)
    triton.compile(src, target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps, "num_stages": num_stages, "launch_pdl": pdl})

def decode(dt, d, group, bs, split, fused, block_n, stages, warps=4, adaptive=False):
    gr = triton.next_power_of_2(group)
    scratch = "*fp32" if split else f"*{dt}"
    types = dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", tables_ptr="*i32",
                 ctx_ptr="*i32", out_ptr=f"*{dt}", ticket_ptr="*i32" if split else f"*{dt}",
                 ws_ptr=scratch, qk_scale="fp32")
    consts = dict(GROUP=group, BLOCK_G=max(16, gr), BLOCK_GR=gr, HEAD_DIM=d, BLOCK_D=d,
                  KV_BLOCK=bs, BLOCK_N=block_n, BLOCK_P=max(1, min(16, 8192 // (gr * d))),
                  SPLIT=split, FUSED_REDUCE=fused,
                  DOT_PRECISION="ieee" if dt == "fp32" else "tf32", PDL=dt != "fp32",
                  ADAPTIVE=adaptive)
    compile_for_sm90(triton_decode._decode_kernel, types, consts, warps, stages)
    if split and not fused:
        compile_for_sm90(triton_decode._decode_merge_kernel,
                         dict(out_ptr=f"*{dt}", ws_ptr="*fp32", ctx_ptr="*i32"),
                         dict(GROUP=group, BLOCK_GR=gr, HEAD_DIM=d, BLOCK_D=d,
                              BLOCK_P=consts["BLOCK_P"], BLOCK_N=block_n, ADAPTIVE=adaptive),
                         4, 1)

def prefill(dt, d, group, bs, tuning):
    types = dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", tables_ptr="*i32",
                 qsl_ptr="*i32", ctx_ptr="*i32", out_ptr=f"*{dt}", qk_scale="fp32")
    consts = dict(GROUP=group, HEAD_DIM=d, BLOCK_D=d, KV_BLOCK=bs, BLOCK_M=tuning.block_m,
                  BLOCK_N=tuning.block_n, DOT_PRECISION="ieee" if dt == "fp32" else "tf32")
    compile_for_sm90(triton_prefill._prefill_kernel, types, consts, tuning.num_warps,
                     tuning.num_stages)

def gemv(dt, c, has_bias, even_k, pdl=True, glu=False, pf=0):
    types = dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", bias_ptr=f"*{dt}", out_ptr=f"*{dt}",
                 ws_ptr="*fp32", tickets_ptr="*i32")
    consts = dict(BLOCK_N=c.block_n, BLOCK_K=c.block_k, HAS_BIAS=has_bias, EVEN_K=even_k,
                  SPLIT_K=c.split_k, PDL=pdl, GLU=glu, PF_BYTES=pf)
    compile_for_sm90(triton_gemv._gemv_kernel, types, consts, c.num_warps, c.num_stages)

case = sys.argv[1]
P = triton_prefill.PrefillTuning
if case == "decode":
    decode("bf16", 128, 4, 16, False, False, 64, 3)  # one partition
    decode("bf16", 128, 4, 16, True, True, 64, 3)  # split-K, merged by the last program
    decode("bf16", 128, 4, 16, True, False, 64, 3)  # split-K, merge kernel
    decode("fp32", 64, 3, 32, True, True, 64, 3)
    decode("bf16", 128, 4, 16, True, True, 32, 4, warps=2)  # the batch-1 sweep's small shapes
    decode("bf16", 128, 4, 16, True, True, 256, 1, warps=8)  # one tile per partition
    decode("bf16", 128, 4, 16, True, True, 64, 3, adaptive=True)  # partitions follow context
    decode("bf16", 128, 4, 16, True, True, 64, 3, warps=2, adaptive=True)  # batch-1 default
    decode("bf16", 128, 4, 16, True, False, 64, 3, adaptive=True)
elif case == "prefill":
    prefill("bf16", 128, 4, 16, P())  # the default tiles
    prefill("bf16", 64, 3, 32, P(64, 64, 4, 3))  # small batches
    prefill("fp32", 128, 1, 16, P(64, 32, 4, 2))
elif case == "gemv":
    for c in dict.fromkeys(triton_gemv.CONFIGS + tuple(triton_gemv.SM90_PICKS.values())):
        gemv("bf16", c, True, True)  # every autotuned variant and sm_90 pick, once
    gemv("fp16", triton_gemv.CONFIGS[0], True, False, pdl=False)  # K tail masked, no PDL
    gemv("fp16", triton_gemv.CONFIGS[-1], False, False)
    gemv("bf16", triton_gemv.SM90_PICKS[(28672, 4096)], False, True, glu=True)  # gate/up
    gemv("bf16", triton_gemv.GemvConfig(32, 128, 4, 6, 4), False, True, glu=True)  # split
    gemv("bf16", triton_gemv.SM90_PICKS[(4096, 14336)], False, True, pf=1024)  # L2 prefetch
    gemv("bf16", triton_gemv.SM90_PICKS[(28672, 4096)], False, True, glu=True, pf=2048)
elif case == "fused":  # the decode step's small kernels, launched with PDL on the GPU
    for pdl in (False, True):
        compile_for_sm90(triton_fused._rms_norm_kernel,
                         dict(x_ptr="*bf16", res_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16",
                              eps="fp32"), dict(HAS_RESIDUAL=True, BLOCK=4096, PDL=pdl), 8, 1)
        compile_for_sm90(triton_fused._silu_mul_kernel, dict(x_ptr="*bf16", out_ptr="*bf16"),
                         dict(BLOCK=1024, PDL=pdl), 4, 1)
        compile_for_sm90(triton_fused._rope_store_kernel,
                         dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", pos_ptr="*i64",
                              cos_ptr="*fp32", sin_ptr="*fp32", kc_ptr="*bf16", vc_ptr="*bf16",
                              slot_ptr="*i64"),
                         dict(NUM_Q=32, NUM_KV=8, BLOCK_H=32, HALF=64, BLOCK_HALF=64,
                              KV_BLOCK=16, PDL=pdl), 4, 1)
else:
    compile_for_sm90(triton_store._store_kv_kernel,
                     dict(key_ptr="*fp32", value_ptr="*fp32", k_cache_ptr="*bf16",
                          v_cache_ptr="*bf16", slot_ptr="*i64"),
                     dict(NUM_HEADS=3, BLOCK_H=4, HEAD_DIM=128, BLOCK_D=128, KV_BLOCK=16,
                          BLOCK_T=16), 4, 1)
    for src_by_id, dst_by_id in ((True, False), (False, True), (True, True)):
        compile_for_sm90(triton_blocks._copy_blocks_kernel,
                         dict(src_k_ptr="*i16", src_v_ptr="*i16", dst_k_ptr="*i16",
                              dst_v_ptr="*i16", src_ids_ptr="*i64", dst_ids_ptr="*i64"),
                         dict(BLOCK_NUMEL=16384, CHUNK=4096, SRC_BY_ID=src_by_id,
                              DST_BY_ID=dst_by_id), 4, 1)
    for copy in (False, True):
        compile_for_sm90(triton_checksum._checksum_kernel,
                         dict(k_ptr="*i32", v_ptr="*i32", ids_ptr="*i64", out_ptr="*i64",
                              dst_k_ptr="*i32", dst_v_ptr="*i32", dst_ids_ptr="*i64"),
                         dict(P=(1 << 31) - 1, CHUNK=8192, TILE=2048,
                              W_MUL=triton_checksum._W_MUL, W_ADD=triton_checksum._W_ADD,
                              W_MOD=triton_checksum._W_MOD, COPY=copy), 4, 1)
print("compiled", case)
'''


def _ptxas_present() -> bool:
    nvidia = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia")
    return os.path.exists(os.path.join(nvidia, "bin", "ptxas"))


@pytest.mark.skipif(not _ptxas_present(), reason="Triton's NVIDIA backend (ptxas) not installed")
@pytest.mark.parametrize("case", ["decode", "prefill", "copies", "gemv", "fused"])
def test_kernels_compile_for_sm90(case):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, case], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"compiled {case}" in proc.stdout
