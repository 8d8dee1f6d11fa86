"""What one layer's KV movement costs on the GPU, kernel by kernel, against a plain copy.

    python -m pdserve.bench.fabric_micro [--blocks 256] [--layers 32]

One layer of a 4,096-token Llama-3-8B prompt: 256 blocks of K and of V, 32 KiB
each (16 MiB). Times (``triton.testing.do_bench``, L2 flushed before each call):
a contiguous device-to-device copy of the same bytes (the ceiling), ``copy_blocks``
(the cuda_ipc path's copy, ascending and shuffled ids), ``pack_blocks``,
``block_checksums`` (the WSUM digest); then the same over every layer of
engine-shaped caches at once (``copy_blocks_layers``, ``layer_block_checksums``, and
the cuda_ipc receiver's check at FINISH with its one host sync) against one copy of
all those bytes. Each as GB/s and as a ratio to the copy. Writes
``fabric_micro_h200.json`` under $OUT or bench/results.
"""

import argparse

import torch

from pdserve.bench.common import write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=256)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--pool", type=int, default=4096, help="blocks per layer in the caches")
    args = ap.parse_args()
    from triton.testing import do_bench

    from pdserve.kernels import copy_blocks, pack_blocks
    from pdserve.kernels.ops import (
        block_checksums,
        copy_blocks_checksums,
        copy_blocks_layers,
        layer_block_checksums,
    )

    dev = torch.device("cuda")
    shape = (args.pool, 16, 8, 128)
    src = [(torch.randn(shape, device=dev, dtype=torch.bfloat16),
            torch.randn(shape, device=dev, dtype=torch.bfloat16)) for _ in range(2)]
    dst_k, dst_v = torch.empty_like(src[0][0]), torch.empty_like(src[0][1])
    n = args.blocks
    ids = torch.arange(n, device=dev) + 7
    shuffled = torch.randperm(args.pool, device=dev)[:n]
    layer_bytes = 2 * n * src[0][0][0].numel() * 2  # K and V, bf16
    flat_a = torch.empty(layer_bytes, dtype=torch.uint8, device=dev)
    flat_b = torch.empty_like(flat_a)
    k, v = src[0]
    cases = {
        "d2d_copy": lambda: flat_b.copy_(flat_a),
        "copy_blocks_ascending": lambda: copy_blocks(k, v, ids, dst_k, dst_v, ids + 100),
        "copy_blocks_shuffled": lambda: copy_blocks(k, v, shuffled, dst_k, dst_v, ids),
        "pack_blocks": lambda: pack_blocks(k, v, ids),
        "block_checksums": lambda: block_checksums(k, v, ids),
    }
    out: dict = {"layer_bytes": layer_bytes, "blocks": n, "cases": {}}
    for name, fn in cases.items():
        ms = do_bench(fn, warmup=20, rep=200)
        out["cases"][name] = {"us": ms * 1e3, "gb_s": layer_bytes / (ms * 1e-3) / 1e9}
    copy_gbs = out["cases"]["d2d_copy"]["gb_s"]
    for name, row in out["cases"].items():
        row["ratio_to_copy"] = row["gb_s"] / copy_gbs
        print(f"{name:24s} {row['us']:8.1f} us {row['gb_s']:8.1f} GB/s  "
              f"{row['ratio_to_copy']:.2f}x copy", flush=True)
    # every layer at once, engine-shaped caches [L, 2, NB, ...] on both sides
    shape_all = (args.layers, 2, args.blocks + 64) + shape[1:]
    store_a = torch.randn(shape_all, device=dev, dtype=torch.bfloat16)
    store_b = torch.empty_like(store_a)
    la = [(store_a[i, 0], store_a[i, 1]) for i in range(args.layers)]
    lb = [(store_b[i, 0], store_b[i, 1]) for i in range(args.layers)]
    all_ids = torch.arange(n, device=dev)
    total = args.layers * layer_bytes
    big_a = torch.empty(total, dtype=torch.uint8, device=dev)
    big_b = torch.empty_like(big_a)

    def verify():  # what a cuda_ipc receiver does at FINISH: checksums, compare, one sync
        want = torch.zeros((args.layers, 2 * n), dtype=torch.int64).to(dev)
        return bool((layer_block_checksums(la, all_ids) != want).any())

    out["all_layers"] = {"layers": args.layers, "bytes": total, "cases": {}}
    for name, fn in {"d2d_copy": lambda: big_b.copy_(big_a),
                     "copy_blocks_layers": lambda: copy_blocks_layers(la, all_ids, lb, all_ids),
                     "layer_block_checksums": lambda: layer_block_checksums(la, all_ids),
                     "copy_blocks_checksums": lambda: copy_blocks_checksums(la, all_ids, lb,
                                                                            all_ids),
                     "verify_at_finish": verify}.items():
        ms = do_bench(fn, warmup=5, rep=100)
        out["all_layers"]["cases"][name] = {"us": ms * 1e3, "gb_s": total / (ms * 1e-3) / 1e9}
    copy_gbs = out["all_layers"]["cases"]["d2d_copy"]["gb_s"]
    for name, row in out["all_layers"]["cases"].items():
        row["ratio_to_copy"] = row["gb_s"] / copy_gbs
        print(f"all {args.layers} layers {name:22s} {row['us']:8.1f} us {row['gb_s']:8.1f} GB/s"
              f"  {row['ratio_to_copy']:.2f}x copy", flush=True)
    print(f"wrote {write_result('fabric_micro_h200', out)}")


if __name__ == "__main__":
    main()
