"""A/B of the Gluon forward's launch plans in one process: each point's default plan (`v3_gluon._PLANS`) against
variants of it, with SDPA's cuDNN backend in the same rounds. Variant `pingpong`: the plan with FA3's warp-scheduler
barrier between the consumer warpgroups (`_turn_wait`: each issues its products only after the other has issued its
own), the lever left where ptxas waits for P·V before the exponentials (benchmarks/NOTES.md, eighteenth session).
Variant `D:BMxBN:STAGES:REGS[:PINGPONG[:Q_SLOTS[:PER_SM]]]`: another plan at head dim D (other tiles: e.g. one
consumer, two programs an SM, `64:64x128:3:232`), not run at other head dims; `v3py:D:BMxBN:WARPS:STAGES[:MAXNREG]`:
v3.py's kernel with that plan (host descriptors; `v3pyk:...` with descriptors made in-kernel); `v2`: v2's kernel,
its autotuner's pick; `v2:D:BMxBN:WARPS:STAGES[:MAXNREG]`: v2's kernel with that config forced; a name + `+left`: it
with masked scores testing the window's left edge too (`_common.SKIP_LEFT` off); + `+oneloop`: v3.py's and v2's
forwards with every key block in one loop (`v3.ONE_LOOP`, `v2.ONE_LOOP` on); + `+stLO_HI_NS_RAMP`: v2's programs of
launch order [LO, HI) x SMs started NS + RAMP x (place in the range) nanoseconds late (`v2.STAGGER`), `+nost`: none
(v2.STAGGER "off"; without either, v2's rule); any may follow a name. --flash:
SDPA's flash backend timed too (v2's bar).

    python benchmarks/probe_plan_ab.py --out DIR [--rounds 7] [--points d128-4k,...] [--variants base,pingpong]

Check first: on awkward shapes (dense and packed, causal, windows, GQA, bf16 and fp16) each variant with the
baseline's tiles bitwise equal to it (the same products in the same order, issued in another interleaving), the
baseline and every variant with other tiles within flash-attn's error rule of a float32 reference. Then rounds of
forwards through v3_gluon.forward with the plan the dispatch takes (d64 at 4k: the Gluon plan forced, v3.py's kernel
timed beside it, `v3py`; elsewhere `v3`: what flash_attn_func(version="v3") runs), each variant read as its ratio to
the baseline in the same round, median over rounds. Writes probe_plan_ab.json and probe_plan_ab.md.
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
from rounds import (forward_points, probe_parser, run_meta, save_json, save_md, sdpa_forward,  # noqa: E402
                    switched, time_forwards)



def variant_plan(G, name, D):
    """The plan tuple of variant `name` at head dim D: `base` (`_PLANS[D]`), `pingpong` / `no-pingpong` (it with
    ping-pong on / off), or an explicit plan `D:BMxBN:STAGES:REGS[:PINGPONG[:Q_SLOTS[:PER_SM]]]` (4 producer warps;
    at other head dims: None, the variant is not run there)."""
    if "+" in name:   # the same plan, with module switches flipped during its calls (see `variant_runner`)
        return variant_plan(G, name.split("+")[0], D)
    if name in ("base", "pingpong", "no-pingpong") and D not in G._PLANS:
        return None
    p = list(G._PLANS.get(D, ())) + [G.PINGPONG, G.Q_SLOTS][len(G._PLANS.get(D, ())) - 5:]
    if name in ("pingpong", "no-pingpong"):
        p[5] = name == "pingpong"
    elif name == "v2":   # v2's kernel with the config its autotuner picks (what version="v2" runs)
        return ("v2",)
    elif name.startswith(("v3py:", "v3pyk:", "v2:")):
        # v3py:D:BMxBN:WARPS:STAGES[:MAXNREG]: v3.py's kernel with that plan (host descriptors); v2:...: v2's kernel
        # with that config forced; MAXNREG: ptxas' register cap (more programs an SM)
        f = name.split(":")
        if int(f[1]) != D:
            return None
        bm, bn = (int(x) for x in f[2].split("x"))
        return (f[0], bm, bn, int(f[3]), int(f[4]), int(f[5]) if len(f) > 5 else None)
    elif ":" in name:
        f = name.split(":")
        if int(f[0]) != D:
            return None
        bm, bn = (int(x) for x in f[1].split("x"))
        p = [bm, bn, 4, int(f[2]), int(f[3]), bool(int(f[4])) if len(f) > 4 else G.PINGPONG,
             int(f[5]) if len(f) > 5 else G.Q_SLOTS] + ([int(f[6])] if len(f) > 6 else [])
    elif name != "base":
        raise SystemExit(f"unknown variant {name}")
    return tuple(p)


def variant_runner(G, name, pl, *a):
    """`runner` of variant `name`'s plan pl, with the switches its `+` suffixes name flipped during its calls: `+left`
    `_common.SKIP_LEFT` off (masked scores test the window's left edge too, as the kernels before the twentieth
    session), `+oneloop` `v3.ONE_LOOP` and `v2.ONE_LOOP` on (one pipelined loop a tile). Both give the same bits."""
    f = runner(G, pl, *a)
    flags = name.split("+")[1:]
    if not flags:
        return f
    from hf_flashattn.kernels import _common as C
    from hf_flashattn.kernels import v2, v3
    switches = {"left": [(C, "SKIP_LEFT", False)], "oneloop": [(v3, "ONE_LOOP", True), (v2, "ONE_LOOP", True)]}
    switches["nost"] = [(v2, "STAGGER", "off")]
    for x in flags:   # +stLO_HI_NS_RAMP: v2.STAGGER = (LO, HI, NS, RAMP), programs of the first waves started late
        if x.startswith("st"):
            lo, hi, ns, ramp = (float(y) for y in x[2:].split("_"))
            switches[x] = [(v2, "STAGGER", (lo, hi, ns, ramp))]
    unknown = [x for x in flags if x not in switches]
    if unknown:
        raise SystemExit(f"unknown variant suffix {unknown} in {name}")

    def flipped():
        with switched(*(s for x in flags for s in switches[x])):
            return f()
    return flipped


def runner(G, pl, q, k, v, Sq, Sk, scale, win, cu=None):
    """The forward of plan `pl` (`variant_plan`) on these inputs: the Gluon kernel, or v3.py's for a v3py plan."""
    if pl[0] in ("v3py", "v3pyk"):
        from hf_flashattn.kernels import v3
        return functools.partial(v3.forward, q, k, v, cu, cu, Sq, Sk, scale, win, 0.0,
                                 _plan=(tuple(pl[1:]), pl[0] == "v3py", False))
    if pl[0] == "v2":
        return functools.partial(v2_forward, pl[1:], q, k, v, cu, Sq, Sk, scale, win)
    if cu is None:
        return functools.partial(G.forward, q, k, v, Sq, Sk, scale, win, _plan=pl)
    return functools.partial(G.forward, q, k, v, Sq, Sk, scale, win, cu_seqlens_q=cu, cu_seqlens_k=cu, _plan=pl)


def v2_forward(cfg, q, k, v, cu, Sq, Sk, scale, win):
    """v2's forward with config cfg = (BLOCK_M, BLOCK_N, warps, stages, maxnreg) forced, or () for its autotuner's
    pick."""
    from hf_flashattn.kernels import v2
    L = v2._fwd_launch
    if cfg:
        L.force = v2._fwd_config(0, *cfg)
    try:
        return v2.forward(q, k, v, cu, cu, Sq, Sk, scale, win, 0.0)
    finally:
        L.force = None


def v2_picks():
    """The configs v2's autotuner has picked so far, as text (the probe's record of what `v2` ran)."""
    from hf_flashattn.kernels import v2
    t = v2._fwd_launch.tuned
    return {str(k): str(c) for k, c in getattr(t, "cache", {}).items()} if t is not None else {}


def same_tiles(a, b):
    """Whether plans a and b sum the same products in the same order (same kernel, row and key tiles, warps):
    bitwise equal. v2's autotuned pick (`v2`) is taken as another tiling than any forced one, and as the same as
    itself."""
    if a == ("v2",) or b == ("v2",):   # two runs of the autotuned pick (a variant's switches do not change it)
        return a == b
    kernel = {"v3pyk": "v3py"}   # the same kernel and products, the descriptors made elsewhere
    n = 4 if {a[0], b[0]} & {"v3py", "v3pyk", "v2"} else 2
    return (kernel.get(a[0], a[0]),) + tuple(a[1:n]) == (kernel.get(b[0], b[0]),) + tuple(b[1:n])

# (D, Sq, Sk, B, H, Hk, window, packed): check shapes
CHECK = [(128, 1000, 1000, 2, 8, 2, (-1, 0), False), (128, 777, 1503, 1, 16, 16, (-1, -1), False),
         (64, 1111, 1111, 1, 8, 1, (-1, -1), False), (256, 513, 1025, 1, 8, 2, (-1, -1), False),
         (128, 1000, 1000, 1, 8, 8, (300, 0), False), (128, 3000, 3000, 1, 8, 2, (-1, 0), True),
         (64, 3000, 3000, 1, 24, 24, (-1, 0), False), (64, 2000, 2000, 1, 8, 8, (-1, 0), True),
         (64, 113, 203, 2, 8, 2, (-1, 0), False), (64, 1024, 1024, 2, 8, 8, (-1, 0), False),
         (64, 1000, 1000, 1, 8, 8, (300, 0), False), (64, 777, 1503, 1, 16, 16, (-1, -1), False)]
# name -> (D, S, B, H, Hk, causal): the grid's forward points (bench.py's shapes)
POINTS = {"d128-4k": (128, 4096, 4, 16, 16, False), "d128-16k": (128, 16384, 1, 16, 16, False),
          "d64-4k": (64, 4096, 4, 32, 32, False), "d256-4k": (256, 4096, 4, 8, 8, False),
          "gqa-32k": (128, 32768, 1, 32, 8, False), "d128-1k": (128, 1024, 16, 16, 16, False),
          "d64-8k": (64, 8192, 2, 32, 32, False), "d64-16k": (64, 16384, 1, 32, 32, False),
          "d64-16k-causal": (64, 16384, 1, 32, 32, True), "d64-32k-causal-gqa": (64, 32768, 1, 32, 8, True),
          "d64-1k": (64, 1024, 16, 32, 32, False), "d64-1k-causal": (64, 1024, 16, 32, 32, True),
          "d64-4k-causal": (64, 4096, 4, 32, 32, True), "d64-8k-causal": (64, 8192, 2, 32, 32, True),
          "d128-4k-causal": (128, 4096, 4, 16, 16, True), "d128-16k-causal": (128, 16384, 1, 16, 16, True),
          "d128-1k-causal": (128, 1024, 16, 16, 16, True), "d256-4k-causal": (256, 4096, 4, 8, 8, True),
          "d256-16k": (256, 16384, 1, 8, 8, False), "d256-16k-causal": (256, 16384, 1, 8, 8, True),
          "d256-1k": (256, 1024, 16, 8, 8, False), "d256-1k-causal": (256, 1024, 16, 8, 8, True),
          "gqa-8k": (128, 8192, 2, 32, 8, False), "gqa-8k-causal": (128, 8192, 2, 32, 8, True),
          "gqa-32k-causal": (128, 32768, 1, 32, 8, True),
          "d64-512": (64, 512, 32, 32, 32, False), "d64-512-causal": (64, 512, 32, 32, 32, True),
          "d128-512": (128, 512, 32, 16, 16, False), "d128-512-causal": (128, 512, 32, 16, 16, True),
          "d256-512": (256, 512, 32, 8, 8, False), "d256-512-causal": (256, 512, 32, 8, 8, True),
          "d256-256": (256, 256, 64, 8, 8, False), "d256-2k": (256, 2048, 8, 8, 8, False),
          "d192-512": (192, 512, 32, 10, 10, False), "d256-512-gqa": (256, 512, 32, 8, 2, False),
          "d256-768": (256, 768, 21, 8, 8, False)}


def packed(B, S, H, Hk, D, dtype, g):
    lens = [S - 37 * i for i in range(B + 2)]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device="cuda", dtype=torch.int32)
    T = int(cu[-1])
    q = torch.randn(T, H, D, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(T, Hk, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    return q, k, v, cu, max(lens)


def check(G, names):
    rows = []
    # fp16: a few shapes (compile time)
    for dtype, shapes in ((torch.bfloat16, CHECK), (torch.float16, CHECK[:2] + CHECK[-3:-2])):
        for D, Sq, Sk, B, H, Hk, win, pk in shapes:
            g = torch.Generator(device="cuda").manual_seed(D + Sq + H)
            scale = D ** -0.5
            if pk:
                q, k, v, cu, mx = packed(B, Sq, H, Hk, D, dtype, g)
                lens = (mx, mx)
            else:
                q = torch.randn(B, Sq, H, D, device="cuda", dtype=dtype, generator=g)
                k, v = (torch.randn(B, Sk, Hk, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
                cu, lens = None, (Sq, Sk)
            plans = {n: variant_plan(G, n, D) for n in names}
            plans = {n: pl for n, pl in plans.items() if pl is not None}
            if names[0] not in plans:   # the baseline is a plan of another head dim
                continue
            res = {n: variant_runner(G, n, pl, q, k, v, *lens, scale, win, cu)() for n, pl in plans.items()}
            base = res[names[0]]
            causal = win == (-1, 0)
            kw = dict(causal=causal) if causal or win == (-1, -1) else dict(window_size=win)
            if pk:
                kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu)
            # the rule on the baseline and on every variant with other tiles (those are not bitwise equal to it)
            rules = {n: forward_rule(*res[n], q, k, v, **kw) for n in plans
                     if n == names[0] or not same_tiles(plans[n], plans[names[0]])}
            rule = rules[names[0]]
            ok_ref = all(r["ok"] for r in rules.values())
            row = dict(dtype=str(dtype).split(".")[-1], shape=[D, Sq, Sk, B, H, Hk, list(win), pk], err=rule["err"],
                       torch_err=rule["torch_err"], lse_err=rule["lse_err"], ok_ref=ok_ref,
                       variant_err={n: r["err"] for n, r in rules.items() if n != names[0]},
                       bitwise={n: bool(torch.equal(res[n][0], base[0]) and torch.equal(res[n][1], base[1]))
                                for n in plans if n != names[0] and same_tiles(plans[n], plans[names[0]])})
            row["ok"] = bool(ok_ref and all(row["bitwise"].values()))
            rows.append(row)
            if not row["ok"]:
                print("FAIL", json.dumps(row), flush=True)
    return rows


def v3py(q, k, v, causal):
    from hf_flashattn import flash_attn_func
    return flash_attn_func(q, k, v, causal=causal, version="v3")


def main():
    ap = probe_parser(POINTS, no_check=True)
    ap.add_argument("--variants", default="base,pingpong")
    ap.add_argument("--flash", action="store_true", help="time SDPA's flash backend too (v2's bar), its ratio added")
    args = ap.parse_args()
    t0 = time.time()
    from hf_flashattn.kernels import v3_gluon as G
    names = args.variants.split(",")
    meta = run_meta(rounds=args.rounds, iters=args.iters, variants=names)
    checks = [] if args.no_check else check(G, names)
    bad = [c for c in checks if not c["ok"]]
    print(f"check: {len(checks) - len(bad)}/{len(checks)} ({time.time() - t0:.0f}s)", flush=True)
    results = []
    for p, (D, S, B, H, Hk, causal), (q, k, v), (qt, kt, vt), flops in forward_points(args.points, POINTS, t0,
                                                                                       args.budget_s):
        win = (-1, 0) if causal else (-1, -1)
        plans = {n: variant_plan(G, n, D) for n in names}
        variants = {n: variant_runner(G, n, pl, q, k, v, S, S, D ** -0.5, win) for n, pl in plans.items()
                    if pl is not None}
        variants["sdpa-cudnn"] = functools.partial(sdpa_forward, "cudnn", qt, kt, vt, causal, H != Hk)
        if args.flash:
            variants["sdpa-flash"] = functools.partial(sdpa_forward, "flash", qt, kt, vt, causal, H != Hk)
        # what version="v3" runs here (v3.py's kernel where `plan` says None, a Gluon plan other than _PLANS[D] at
        # d128 under a mask below MASKED_SHORT_KEYS): timed too, through flash_attn_func
        variants["v3py" if G.plan(D, S, causal) is None else "v3"] = functools.partial(v3py, q, k, v, causal)
        run = [n for n in names if plans[n] is not None]
        outs = {n: variants[n]() for n in run}
        base = run[0]   # the first variant run at this head dim (a variant of another head dim's is not)
        row = dict(point=p, D=D, S=S, B=B, H=H, Hk=Hk, causal=causal,
                   bitwise={n: bool(torch.equal(outs[n][0], outs[base][0])
                                    and torch.equal(outs[n][1], outs[base][1])) for n in run[1:]
                            if same_tiles(plans[n], plans[base])})
        del outs
        row["variants"] = time_forwards(variants, args.rounds, args.iters, flops)
        row["v2_picks"] = v2_picks()
        results.append(row)
        print(p, json.dumps({n: (round(r["tflops"]), round(r["median_ratio"], 4), round(r["of_cudnn"], 3))
                             + ((round(r["of_flash"], 3),) if args.flash else ())
                             for n, r in row["variants"].items()}), "bitwise", row["bitwise"], flush=True)
        del q, k, v, qt, kt, vt, variants   # the point's tensors, freed before the next point's (forward_points)
    save_json(args.out, "probe_plan_ab", meta, t0, checks=checks, results=results)
    lines = [f"# Gluon forward: launch plans A/B — {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"cuDNN {meta['cudnn']}, commit {meta['commit']}", "",
             f"date {meta['date']}; bf16 forwards through v3_gluon.forward, {args.iters} calls a timing, "
             f"{args.rounds} rounds, the variants {meta['variants']} and SDPA-cuDNN in turns; ratio: to `{names[0]}` "
             "in the same round (median); ÷ cuDNN: cuDNN's time over the variant's (median over rounds)", "",
             f"Check (variants with `{names[0]}`'s tiles against it bitwise; it and variants with other tiles against "
             f"a float32 reference with flash-attn's rule, dense and packed; bf16, fp16 on three shapes): "
             f"{len(checks) - len(bad)}/{len(checks)}", "",
             "| point | variant | bitwise | median ms | TFLOP/s | ratio | ÷ cuDNN |"
             + (" ÷ flash |" if args.flash else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if args.flash else "")]
    for row in results:
        for name, r in row["variants"].items():
            lines.append(f"| {row['point']} | {name} | {row['bitwise'].get(name, '')} | {r['median_ms']:.3f} | "
                         f"{r['tflops']:.0f} | {r['median_ratio']:.3f} | {r['of_cudnn']:.3f} |"
                         + (f" {r['of_flash']:.3f} |" if args.flash else ""))
    save_md(args.out, "probe_plan_ab", lines)


if __name__ == "__main__":
    main()
