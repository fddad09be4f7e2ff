"""The launch order of the one-program-a-tile forwards (v2's kernel and v3.py's), A/B in rounds in one process:
`_common.grouped_tile` with `_common.GROUP_TILES` (per kernel) = 1 (each head's row tiles in a row, heaviest first:
the order before the nineteenth session) against larger values (the (batch, head) pairs in groups of about
GROUP_TILES tiles, each group's heaviest tiles of all its heads first), beside SDPA's cuDNN and flash backends.

    python benchmarks/probe_tile_order.py --out DIR [--rounds 7] [--points d64-1k-causal,...] [--groups 1,1024]

Check first: for each point's implementation, out and lse bitwise equal between the orders (each tile's arithmetic
does not depend on which program runs it or when), and on awkward shapes (113 x 203, head dim 80, q_len != k_len,
GQA 32/8 and MQA, causal and windows; bf16 and fp16) every order within flash-attn's rule of a float32 reference.
Then rounds of forwards; per point and implementation the speed-up of each order over GROUP_TILES = 1 (median of the
per-round ratios) and ÷ cuDNN. --v2-fold-ab adds v2 at the last order without the scale folded into the exponent
(`v2.FOLD`, timed only: its rounding differs). Writes probe_tile_order.json and probe_tile_order.md.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fwd_rule import forward_rule  # noqa: E402
from rounds import (forward_points, median_speedup, probe_parser, run_meta, save_json, save_md,  # noqa: E402
                    sdpa_forward, switched, time_forwards)

# name -> (D, S, B, H, Hk, causal): 16k tokens a batch, H = 2048 / D (bench.py's grid), GQA 32/8
POINTS = {"d64-1k-causal": (64, 1024, 16, 32, 32, True), "d64-1k": (64, 1024, 16, 32, 32, False),
          "d64-4k-causal": (64, 4096, 4, 32, 32, True), "d64-8k-causal": (64, 8192, 2, 32, 32, True),
          "d64-512-causal": (64, 512, 32, 32, 32, True), "d128-512-causal": (128, 512, 32, 16, 16, True),
          "d128-1k-causal": (128, 1024, 16, 16, 16, True), "d128-4k-causal": (128, 4096, 4, 16, 16, True),
          "d256-1k-causal": (256, 1024, 16, 8, 8, True), "d256-4k-causal": (256, 4096, 4, 8, 8, True),
          "gqa-8k-causal": (128, 8192, 2, 32, 8, True), "d128-1k": (128, 1024, 16, 16, 16, False)}
# (B, Sq, Sk, H, Hk, D, window): check shapes
CHECK = [(2, 113, 203, 8, 2, 64, (-1, 0)), (1, 1000, 1000, 32, 8, 128, (-1, 0)), (2, 777, 1503, 4, 1, 80, (-1, 0)),
         (1, 3000, 3000, 8, 8, 64, (-1, 0)), (1, 1024, 1024, 8, 2, 256, (300, 0)), (3, 500, 500, 16, 16, 128, (-1, -1))]


def with_group(C, g, f):
    """f run with GROUP_TILES = g for every kernel (read by every launch)."""
    C.GROUP_TILES = dict.fromkeys(C.GROUP_TILES, g)
    return f()


def with_fold(fold, f):
    """f run with v2's forward folding the scale into the exponent or not (`v2.FOLD`), then the default back."""
    from hf_flashattn.kernels import v2
    with switched((v2, "FOLD", fold)):
        return f()


def impls_for(D, S, causal):
    """Our implementations whose kernel is one program a tile at this point: v2 always, v3 where the dispatch takes
    v3.py's kernel (not the Gluon one)."""
    from hf_flashattn.kernels import v3_gluon as G
    return ["v2"] + (["v3"] if G.plan(D, S, causal) is None or D not in G._PLANS else [])


def call(version, q, k, v, causal, window=(-1, -1)):
    from hf_flashattn import flash_attn_func
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, window_size=window, version=version, return_attn_probs=True)
    return out, lse


def check(C, groups):
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for B, Sq, Sk, H, Hk, D, win in (CHECK if dtype == torch.bfloat16 else CHECK[:3]):
            g = torch.Generator(device="cuda").manual_seed(B + Sq + D)
            q = torch.randn(B, Sq, H, D, device="cuda", dtype=dtype, generator=g)
            k, v = (torch.randn(B, Sk, Hk, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
            causal = win == (-1, 0)
            kw = dict(causal=True) if causal else dict(window_size=win)
            for version in ("v2", "v3"):
                res = {gt: with_group(C, gt, functools.partial(call, version, q, k, v, causal,
                                                                (-1, -1) if causal else win)) for gt in groups}
                rule = forward_rule(*res[groups[-1]], q, k, v, **kw)
                bitwise = {gt: bool(torch.equal(res[gt][0], res[groups[0]][0])
                                    and torch.equal(res[gt][1], res[groups[0]][1])) for gt in groups[1:]}
                row = dict(dtype=str(dtype).split(".")[-1], version=version, shape=[B, Sq, Sk, H, Hk, D, list(win)],
                           err=rule["err"], torch_err=rule["torch_err"], lse_err=rule["lse_err"], bitwise=bitwise,
                           ok=bool(rule["ok"] and all(bitwise.values())))
                rows.append(row)
                if not row["ok"]:
                    print("FAIL", json.dumps(row), flush=True)
    return rows


def main():
    ap = probe_parser(POINTS, no_check=True)
    ap.add_argument("--groups", default="1,1024")
    ap.add_argument("--v2-fold-ab", action="store_true", help="also v2 without the scale folded into the exponent")
    args = ap.parse_args()
    t0 = time.time()
    from hf_flashattn.kernels import _common as C
    groups = [int(x) for x in args.groups.split(",")]
    meta = run_meta(rounds=args.rounds, iters=args.iters, groups=groups, default_group=dict(C.GROUP_TILES))
    default = dict(C.GROUP_TILES)
    checks = [] if args.no_check else check(C, groups)
    bad = [c for c in checks if not c["ok"]]
    print(f"check: {len(checks) - len(bad)}/{len(checks)} ({time.time() - t0:.0f}s)", flush=True)

    results = []
    for p, (D, S, B, H, Hk, causal), (q, k, v), (qt, kt, vt), flops in forward_points(args.points, POINTS, t0,
                                                                                       args.budget_s):
        variants = {f"sdpa-{b}": functools.partial(sdpa_forward, b, qt, kt, vt, causal, H != Hk)
                    for b in ("cudnn", "flash")}
        impls = impls_for(D, S, causal)
        for version in impls:
            for gt in groups:
                variants[f"{version}-g{gt}"] = functools.partial(with_group, C, gt,
                                                                 functools.partial(call, version, q, k, v, causal))
        if args.v2_fold_ab:   # v2 at the last order with the scale not folded (the scores scaled first)
            variants[f"v2-g{groups[-1]}-nofold"] = functools.partial(
                with_fold, False, functools.partial(with_group, C, groups[-1],
                                                    functools.partial(call, "v2", q, k, v, causal)))
        outs = {n: f() for n, f in variants.items() if not n.startswith("sdpa") and not n.endswith("nofold")}
        bitwise = {n: bool(torch.equal(o[0], outs[n.rsplit("-g", 1)[0] + f"-g{groups[0]}"][0])
                           and torch.equal(o[1], outs[n.rsplit("-g", 1)[0] + f"-g{groups[0]}"][1]))
                   for n, o in outs.items()}
        del outs
        rec = time_forwards(variants, args.rounds, args.iters, flops)
        for name, r in rec.items():
            if name.startswith("sdpa"):
                continue
            r["speedup_vs_g1"] = median_speedup(rec, name.split("-g")[0] + f"-g{groups[0]}", name, "ms")
        results.append(dict(point=p, D=D, S=S, B=B, H=H, Hk=Hk, causal=causal, bitwise=bitwise, variants=rec))
        print(p, json.dumps({n: (round(r["tflops"]), round(r.get("speedup_vs_g1", 0), 4), round(r["of_cudnn"], 3))
                             for n, r in rec.items()}), "bitwise", bitwise, flush=True)
        del q, k, v, qt, kt, vt, variants   # the point's tensors, freed before the next point's (forward_points)
    C.GROUP_TILES = default
    save_json(args.out, "probe_tile_order", meta, t0, checks=checks, results=results)
    lines = [f"# One-program-a-tile forwards: launch order A/B — {meta['device']}, torch {meta['torch']}, triton "
             f"{meta['triton']}, cuDNN {meta['cudnn']}, commit {meta['commit']}", "",
             f"date {meta['date']}; bf16 forwards through flash_attn_func, {args.iters} calls a timing, {args.rounds} "
             f"rounds, every variant and SDPA's cuDNN and flash backends in turns. `vN-gT`: version N with "
             f"GROUP_TILES = T (1: each head's tiles in a row, the order before); speed-up: the median of the "
             f"per-round ratio of `vN-g{groups[0]}`'s time to this one's; ÷ cuDNN, ÷ flash likewise (above 1: "
             "faster)", "",
             f"Check (every order bitwise equal to GROUP_TILES = {groups[0]}, and within flash-attn's rule of a "
             f"float32 reference; v2 and v3, bf16 on {len(CHECK)} shapes, fp16 on 3): "
             f"{len(checks) - len(bad)}/{len(checks)}",
             "", "| point | variant | bitwise | median ms | TFLOP/s | speed-up | ÷ cuDNN | ÷ flash |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results:
        for name, r in row["variants"].items():
            lines.append(f"| {row['point']} | {name} | {row['bitwise'].get(name, '')} | {r['median_ms']:.3f} | "
                         f"{r['tflops']:.0f} | {r.get('speedup_vs_g1', float('nan')):.3f} | {r['of_cudnn']:.3f} | "
                         f"{r.get('of_flash', float('nan')):.3f} |")
    save_md(args.out, "probe_tile_order", lines)


if __name__ == "__main__":
    main()
