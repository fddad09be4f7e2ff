"""Which tensor-core instruction Triton picks for a 128-row tile's scores when the tile is written as two 64-row halves
(a 3-D, batched `tl.dot`) instead of one 2-D product: compiled for sm_90a without a GPU (Triton's bundled ptxas).

    python benchmarks/check_batched_dot_sm90.py [--dim 256] [--block-n 64] [--warps 8]

Prints, per form, how many wgmma and `mma.sync` instructions its PTX holds, with ptxas' registers
(`compile_sm90.compile_one`).
The question behind it (NOTES, twenty-sixth session, item 3): a causal 128-row tile could skip the diagonal square's
quarter that no row sees only if its two halves were separate products.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_sm90 import compile_one  # noqa: E402  (sets TRITON_INTERPRET=0: compile, do not interpret)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _one_tile(Q, K, S, D: tl.constexpr, BN: tl.constexpr):
    r = tl.arange(0, 128)
    d = tl.arange(0, D)
    n = tl.arange(0, BN)
    q = tl.load(Q + r[:, None] * D + d[None, :])
    kt = tl.load(K + n[None, :] * D + d[:, None])
    tl.store(S + r[:, None] * BN + n[None, :], tl.dot(q, kt))


@triton.jit
def _two_halves(Q, K, S, D: tl.constexpr, BN: tl.constexpr):
    r = tl.arange(0, 64)
    d = tl.arange(0, D)
    n = tl.arange(0, BN)
    h = tl.arange(0, 2)
    q = tl.load(Q + (h[:, None, None] * 64 + r[None, :, None]) * D + d[None, None, :])
    kt = tl.load(K + n[None, :] * D + d[:, None])
    s = tl.dot(q, tl.broadcast_to(kt[None, :, :], (2, D, BN)))
    tl.store(S + (h[:, None, None] * 64 + r[None, :, None]) * BN + n[None, None, :], s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--warps", type=int, default=8)
    a = ap.parse_args()
    print(f"triton {triton.__version__}, sm_90a, D={a.dim}, BN={a.block_n}, {a.warps} warps")
    for fn in (_one_tile, _two_halves):
        r = compile_one(fn, {"D": a.dim, "BN": a.block_n}, a.warps, 1)
        print(f"{fn.__name__:>11}: wgmma {r['wgmma']}, mma.sync {r['mma_sync']}, {r['regs']} registers")


if __name__ == "__main__":
    main()
