"""A/B of v2's fwd+bwd variants through flash_attn_func(version="v2") against v2 as it is, at the short lengths where
issue 2's bar is missed (512-1k), beside SDPA's flash backend, in rounds in one process (rounds.py). Variants (module
switches flipped during their calls): `v2-tma`, the backward's inner-loop tiles through tensor descriptors
(`v2_bwd.TMA`); `v2-oneloop`, the forward's and the dQ pass's key blocks in one loop (`v2.ONE_LOOP`, `v2_bwd.ONE_LOOP`;
on by default since the twenty-first session); `v2-threeloop`, both off (three loops a tile, as before); `v2-bwd3`, the
backward's off only; `v2-bwdleft`, the backward's masked blocks testing every window bound (`v2_bwd.SKIP_LEFT` off, as
before the twenty-first session); `v2-atomic`, FA2's single pass (dQ by float32 atomics from the dK/dV programs, split
ones included; `v2.BWD_DQ`, not bitwise equal); `v2-tma-oneloop`, TMA and one loop; `v2-order1`, the backward's programs
in their grids' own order (`_common.GROUP_TILES["v2_bwd"]` = 1, the order before the twenty-third session: each
(sequence, head) pair's tiles in a row); `v2-nomerge`, the two passes as two launches at every head dim
(`v2_bwd.MERGE`), `v2-merge`, as one launch at every head dim; `v2-order1-nomerge`, both as before; `v2-groupall`, the
groups at every length and mask (`v2_bwd.GROUP_RULE`; the session's first version); `-g32` ... `-g256`,
GROUP_TILES["v2_bwd"] = 32 ... 256 (smaller groups: g = min(L2 bound, GROUP_TILES // tiles a pair)); `v2-prep`, Delta
by the preprocess launch before the dK/dV pass, the dQ pass last (`v2_bwd.DELTA_IN_DQ` off, as before the twenty-fifth
session).

    python benchmarks/probe_bwd_tma.py --out DIR [--rounds 7] [--points d256-1k,...] [--variants v2-tma,v2-oneloop]

Check first: on awkward shapes (113 x 203 GQA causal d80, a window, packed sequences, bf16 and fp16) and at every timed
point, each variant's output and gradients bitwise equal to v2's (the same tiles and products, the loads or the loops
only differ). Writes probe_bwd_tma.json and probe_bwd_tma.md.
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

from rounds import forward_points, probe_parser, run_meta, save_json, save_md, switched, time_forwards  # noqa: E402

# name -> (D, S, B, H, Hk, causal): bench.py's shapes (16k tokens, 2048 / D heads)
POINTS = {f"d{D}-{S // 1024}k{'-causal' if c else ''}" if S >= 1024 else f"d{D}-{S}{'-causal' if c else ''}":
          (D, S, 16384 // S if S <= 16384 else 1, 2048 // D, 2048 // D, c)
          for D in (64, 128, 256) for S in (512, 1024, 4096, 16384) for c in (False, True)}
CHECK = [(80, 113, 203, 2, 8, 2, dict(causal=True)), (128, 300, 300, 1, 4, 4, dict(window_size=(64, 16))),
         (256, 257, 257, 2, 4, 1, dict(causal=False)), (64, 200, 200, 3, 4, 2, dict(causal=True, packed=True))]


def switches(variant: str):
    """(module, attribute, value) of the switches a variant name turns on (`v2`: none)."""
    from hf_flashattn.kernels import _common as C
    from hf_flashattn.kernels import v2, v2_bwd
    parts = variant.split("-")[1:]
    known = {"order1": [(C, "GROUP_TILES", dict(C.GROUP_TILES, v2_bwd=1))],
             "groupall": [(v2_bwd, "GROUP_RULE", dict.fromkeys(v2_bwd.GROUP_RULE, (0, 1 << 62, False)))],
             **{f"g{t}": [(C, "GROUP_TILES", dict(C.GROUP_TILES, v2_bwd=t))] for t in (32, 64, 128, 256)},
             "nomerge": [(v2_bwd, "MERGE", dict.fromkeys(v2_bwd.MERGE, False))],
             "merge": [(v2_bwd, "MERGE", dict.fromkeys(v2_bwd.MERGE, True))],
             "tma": [(v2_bwd, "TMA", True)], "oneloop": [(v2, "ONE_LOOP", True), (v2_bwd, "ONE_LOOP", True)],
             "threeloop": [(v2, "ONE_LOOP", False), (v2_bwd, "ONE_LOOP", False)],
             "bwd3": [(v2_bwd, "ONE_LOOP", False)], "bwdleft": [(v2_bwd, "SKIP_LEFT", False)],
             "atomic": [(v2, "BWD_DQ", "atomic")], "prep": [(v2_bwd, "DELTA_IN_DQ", False)]}
    if not variant.startswith("v2") or not all(x in known for x in parts):
        raise SystemExit(f"unknown variant {variant}")
    return [s for x in parts for s in known[x]]


def fwd_bwd(q, k, v, do, variant, cu=None, mx=None, **kw):
    """out and (dq, dk, dv) of v2's forward and backward with the variant's switches on."""
    from hf_flashattn import flash_attn_func, flash_attn_varlen_func
    with switched(*switches(variant)):
        if cu is None:
            out = flash_attn_func(q, k, v, version="v2", **kw)
        else:
            out = flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, version="v2", **kw)
        return (out, *torch.autograd.grad(out, (q, k, v), do))


def sdpa_fwd_bwd(q, k, v, do, causal):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return (out, *torch.autograd.grad(out, (q, k, v), do.transpose(1, 2)))


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def check(names):
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for D, Sq, Sk, B, H, Hk, kw in CHECK:
            kw = dict(kw)
            packed = kw.pop("packed", False)
            g = torch.Generator(device="cuda").manual_seed(D + Sq)
            mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g).requires_grad_()  # noqa: E731
            if packed:
                lens = [Sq - 37 * i for i in range(B)]
                cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
                T = int(cu[-1])
                q, k, v = mk(T, H, D), mk(T, Hk, D), mk(T, Hk, D)
                args = dict(cu=cu, mx=max(lens))
            else:
                q, k, v = mk(B, Sq, H, D), mk(B, Sk, Hk, D), mk(B, Sk, Hk, D)
                args = {}
            do = torch.randn_like(q)
            base = fwd_bwd(q, k, v, do, "v2", **args, **kw)
            for name in names:
                rows.append(dict(variant=name, dtype=str(dtype).split(".")[-1], shape=[D, Sq, Sk, B, H, Hk],
                                 packed=packed, bitwise=same(base, fwd_bwd(q, k, v, do, name, **args, **kw)),
                                 mask={k_: list(v_) if isinstance(v_, tuple) else v_ for k_, v_ in kw.items()}))
                if not rows[-1]["bitwise"]:
                    print("FAIL", json.dumps(rows[-1]), flush=True)
    return rows


def main():
    ap = probe_parser(POINTS, no_check=True)   # the timed points are compared bitwise with or without the check
    ap.add_argument("--variants", default="v2-tma")
    args = ap.parse_args()
    t0 = time.time()
    names = args.variants.split(",")
    for name in names:
        switches(name)
    meta = run_meta(rounds=args.rounds, iters=args.iters, variants=names)
    checks = [] if args.no_check else check(names)
    print(f"check: {sum(c['bitwise'] for c in checks)}/{len(checks)} bitwise ({time.time() - t0:.0f}s)", flush=True)
    results = []
    for p, (D, S, B, H, Hk, causal), (q, k, v), _, flops in forward_points(args.points, POINTS, t0, args.budget_s):
        for t in (q, k, v):
            t.requires_grad_()
        do = torch.randn_like(q)
        variants = {n: functools.partial(fwd_bwd, q, k, v, do, n, causal=causal) for n in ["v2"] + names}
        variants["sdpa-flash"] = functools.partial(sdpa_fwd_bwd, q, k, v, do, causal)
        base = variants["v2"]()
        runs = {n: variants[n]() for n in names}
        # and the largest difference of out, dq, dk, dv from v2's, relative to the largest magnitude of each (variants
        # that sum in another order, `atomic`)
        row = dict(point=p, D=D, S=S, B=B, H=H, Hk=Hk, causal=causal,
                   bitwise={n: same(base, r) for n, r in runs.items()},
                   rel_diff={n: max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
                                    for a, b in zip(r, base)) for n, r in runs.items()})
        del base, runs
        # fwd+bwd: the forward's FLOPs and 2.5 times them for the backward
        row["variants"] = time_forwards(variants, args.rounds, args.iters, 3.5 * flops)
        results.append(row)
        print(p, json.dumps({n: (round(r["tflops"]), round(r["median_ratio"], 4), round(r["of_flash"], 3))
                             for n, r in row["variants"].items()}), "bitwise", row["bitwise"], "rel_diff",
              row["rel_diff"], flush=True)
        del q, k, v, do, variants
    save_json(args.out, "probe_bwd_tma", meta, t0, checks=checks, results=results)
    lines = [f"# v2 fwd+bwd variants A/B — {meta['device']}, torch {meta['torch']}, triton "
             f"{meta['triton']}, commit {meta['commit']}", "",
             f"date {meta['date']}; bf16 fwd+bwd through flash_attn_func(version='v2'), {args.iters} calls a timing, "
             f"{args.rounds} rounds, v2, {', '.join(names)} (see the probe's docstring) and SDPA-flash in turns; "
             "ratio: to `v2` in the same round (median); ÷ flash: SDPA-flash's time over the variant's (median over "
             "rounds); TFLOP/s: 3.5x the forward's FLOPs", "",
             f"Check (each variant's output and gradients bitwise equal to v2's, bf16 and fp16, dense and packed): "
             f"{sum(c['bitwise'] for c in checks)}/{len(checks)}", "",
             "| point | variant | bitwise | median ms | TFLOP/s | ratio | ÷ flash |", "|---|---|---|---|---|---|---|"]
    for row in results:
        for name, r in row["variants"].items():
            bw = row["bitwise"].get(name, "")
            lines.append(f"| {row['point']} | {name} | {bw} | {r['median_ms']:.3f} | {r['tflops']:.0f} | "
                         f"{r['median_ratio']:.3f} | {r['of_flash']:.3f} |")
    save_md(args.out, "probe_bwd_tma", lines)


if __name__ == "__main__":
    main()
