"""GPU check of the one-loop kernels (`v3.ONE_LOOP`, `v2.ONE_LOOP`, `v2_bwd.ONE_LOOP`: every key / query block of a
tile in one pipelined loop) against the three loops they replace, config by config: the same products and masks in
the same order, so the outputs (and gradients) must be bitwise equal. The twenty-first session's first call found
v3.py's kernel wrong at head dim 64 with it on (dense, errors 0.4-0.96 against the reference; d128 / d256 and packed
d64 within the rule), which the CPU interpreter does not show; this probe narrows which plans, head dims and
descriptor kinds go wrong, and checks v2's forward (each of its configs forced) and backward (each dQ and dK/dV config
forced) the same way.

    python benchmarks/probe_one_loop.py --out DIR [--budget-s 200] [--parts v3,v2,v2bwd]

Writes probe_one_loop.json and probe_one_loop.md: one row per (kernel, D, config, shape), bitwise or not, the largest
difference, and for a mismatch the query tiles (of 64 rows) that differ.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hf_flashattn  # noqa: E402,F401  (before triton)
from rounds import run_meta, save_json, save_md, switched  # noqa: E402

# (B, Sq, Sk, H, Hk, window, packed)
SHAPES = [(2, 1024, 1024, 8, 8, (-1, 0), False), (1, 777, 1503, 16, 16, (-1, -1), False),
          (2, 1024, 1024, 8, 8, (-1, -1), False), (1, 1000, 1000, 8, 8, (300, 0), False),
          (2, 113, 203, 8, 2, (-1, 0), False), (1, 1500, 1500, 8, 1, (-1, 0), True)]
# v3.py's plans per head dim: ((BLOCK_M, BLOCK_N, warps, stages), host descriptors)
V3_PLANS = {64: [((64, 64, 4, 3), True), ((64, 64, 4, 3), False), ((64, 64, 4, 2), True), ((128, 64, 8, 3), True),
                 ((64, 32, 4, 3), True), ((64, 128, 4, 3), True)],
            128: [((64, 64, 4, 3), True), ((64, 64, 4, 3), False), ((128, 128, 8, 3), True)],
            256: [((64, 32, 4, 3), True)]}


DEV, DTYPE = "cuda", torch.bfloat16


def inputs(D, B, Sq, Sk, H, Hk, packed, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, Sq, H, D, device=DEV, dtype=DTYPE, generator=g)
    k = torch.randn(B, Sk, Hk, D, device=DEV, dtype=DTYPE, generator=g)
    v = torch.randn(B, Sk, Hk, D, device=DEV, dtype=DTYPE, generator=g)
    cu = None
    if packed:   # three sequences of ragged lengths in one row
        a, b = Sq // 3 + 5, 2 * Sq // 3 - 7
        cu = torch.tensor([0, a, b, Sq], dtype=torch.int32, device=DEV)
        q, k, v = q[0], k[0], v[0]
    return q, k, v, cu


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def diff(a, b):
    """(bitwise, largest |a - b|, the 64-row query tiles that differ (first 8))."""
    if torch.equal(a, b):
        return True, 0.0, []
    d = (a.float() - b.float()).abs().nan_to_num(float("inf"))
    # per query position: (B, S, H, D) dense, (total, H, D) packed, (B, H, S) / (H, total) for lse
    rows = d.amax(dim=(0, 2, 3)) if d.dim() == 4 else d.amax(dim=(1, 2)) if d.dim() == 3 else d.amax(dim=0)
    tiles = sorted({int(i) // 64 for i in torch.nonzero(rows > 0).flatten().tolist()})
    return False, float(d.max()), tiles[:8]


def shapes(D, deadline):
    """Each of SHAPES as (shape record, q, k, v, cu, max query length, max key length), until the deadline."""
    for B, Sq, Sk, H, Hk, win, packed in SHAPES:
        if time.time() > deadline:
            return
        q, k, v, cu = inputs(D, B, Sq, Sk, H, Hk, packed)
        mq = Sq if cu is None else int((cu[1:] - cu[:-1]).max())
        yield [B, Sq, Sk, H, Hk, list(win), packed], win, q, k, v, cu, mq, mq if packed else Sk


def record_forward(rec, kernel, D, config, shape, runs):
    """The three loops' (out, lse) against one loop's, as a row of `rec`."""
    sync()
    ok, err, tiles = diff(runs[0][0], runs[1][0])
    rec.append(dict(kernel=kernel, D=D, config=config, shape=shape, bitwise=ok and torch.equal(runs[0][1], runs[1][1]),
                    err=err, tiles=tiles))
    print(rec[-1], flush=True)


def v3_cases(rec, deadline):
    from hf_flashattn.kernels import v3
    for D, plans in V3_PLANS.items():
        for plan, host in plans:
            for shape, win, q, k, v, cu, mq, mk in shapes(D, deadline):
                runs = []
                for one in (False, True):
                    with switched((v3, "ONE_LOOP", one)):
                        runs.append(v3.forward(q, k, v, cu, cu, mq, mk, D ** -0.5, win, 0.0, _plan=(plan, host, False)))
                record_forward(rec, "v3py", D, f"{plan} host={host}", shape, runs)


def v2_fwd_cases(rec, deadline):
    from hf_flashattn.kernels import _common as C
    from hf_flashattn.kernels import v2
    for D in (64, 80, 128, 256):
        cls = C.head_dim_class(D)
        for c in v2._FWD_CONFIGS[cls]:
            cfg = v2._fwd_config(cls, *c)
            for shape, win, q, k, v, cu, mq, mk in shapes(D, deadline):
                runs = []
                v2._fwd_launch.force = cfg
                try:
                    for one in (False, True):
                        with switched((v2, "ONE_LOOP", one)):
                            runs.append(v2.forward(q, k, v, cu, cu, mq, mk, D ** -0.5, win, 0.0))
                finally:
                    v2._fwd_launch.force = None
                record_forward(rec, "v2-fwd", D, str(c), shape, runs)


def v2_bwd_cases(rec, deadline):
    from hf_flashattn.kernels import _common as C
    from hf_flashattn.kernels import v2, v2_bwd
    for D in (64, 80, 128, 256):
        cls = C.head_dim_class(D)
        n = max(len(v2_bwd._DKDV_CONFIGS[cls]), len(v2_bwd._DQ_CONFIGS[cls]))
        for i in range(n):
            dk_c = v2_bwd._DKDV_CONFIGS[cls][min(i, len(v2_bwd._DKDV_CONFIGS[cls]) - 1)]
            dq_c = v2_bwd._DQ_CONFIGS[cls][min(i, len(v2_bwd._DQ_CONFIGS[cls]) - 1)]
            for shape, win, q, k, v, cu, mq, mk in shapes(D, deadline):
                do = torch.randn_like(q)
                out, lse = v2.forward(q, k, v, cu, cu, mq, mk, D ** -0.5, win, 0.0)
                runs = []
                v2_bwd._dkdv_launch.force = v2_bwd._config(cls, *dk_c)
                v2_bwd._dq_launch.force = v2_bwd._config(cls, *dq_c)
                try:
                    for one in (False, True):
                        with switched((v2_bwd, "ONE_LOOP", one)):
                            runs.append(v2.backward(do, q, k, v, out, lse, cu, cu, mq, mk, D ** -0.5, win, 0.0,
                                                    False))
                finally:
                    v2_bwd._dkdv_launch.force = v2_bwd._dq_launch.force = None
                sync()
                res = [diff(a, b) for a, b in zip(runs[0][:3], runs[1][:3])]
                rec.append(dict(kernel="v2-bwd", D=D, config=f"dkdv {dk_c} dq {dq_c}", shape=shape,
                                bitwise=all(r[0] for r in res),
                                err=max(r[1] for r in res), tiles={n: r[2] for n, r in zip("qkv", res) if not r[0]}))
                print(rec[-1], flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--parts", default="v3,v2,v2bwd")
    ap.add_argument("--smoke", action="store_true", help="CPU (Triton's interpreter), fp16, two tiny shapes")
    a = ap.parse_args()
    if a.smoke:
        global DEV, DTYPE, SHAPES
        DEV, DTYPE = "cpu", torch.float16
        SHAPES = [(1, 40, 70, 2, 1, (-1, 0), False), (1, 90, 90, 2, 2, (20, 0), True)]
    t0 = time.time()
    parts = a.parts.split(",")
    share = (a.budget_s - 5) / len(parts)
    rec = []
    for i, p in enumerate(parts):
        {"v3": v3_cases, "v2": v2_fwd_cases, "v2bwd": v2_bwd_cases}[p](rec, t0 + share * (i + 1))
    meta = run_meta(script="probe_one_loop.py", parts=parts) if DEV == "cuda" else dict(device="cpu", commit="")
    save_json(a.out, "probe_one_loop", meta, t0, cases=rec)
    bad = [r for r in rec if not r["bitwise"]]
    lines = [f"# One loop a tile against three, bitwise — {meta.get('device', '')}, commit {meta.get('commit', '')}",
             "",
             f"{len(rec) - len(bad)}/{len(rec)} cases bitwise equal (bf16; shapes (B, Sq, Sk, H, Hk, window, packed))",
             "", "| kernel | D | config | shape | bitwise | max diff | differing 64-row tiles |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['D']} | {r['config']} | {r['shape']} | {r['bitwise']} | {r['err']:.3g} | "
              f"{r['tiles']} |" for r in rec]
    save_md(a.out, "probe_one_loop", lines)
    print(f"{len(rec) - len(bad)}/{len(rec)} bitwise", flush=True)


if __name__ == "__main__":
    main()
