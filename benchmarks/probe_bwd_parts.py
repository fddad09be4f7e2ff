"""Where a fwd+bwd's GPU time goes, kernel by kernel, for ours-v3 and the SDPA baselines at short sequences: the
1k points where v3's backward is the gap (benchmarks/NOTES.md, fourteenth session: d128 1k fwd+bwd 1.08 / 1.17x
FlexAttention, our backward 0.97 ms against cuDNN's 0.87).

    python benchmarks/probe_bwd_parts.py --out DIR [--dims 128,64] [--seqlens 1024,4096] [--iters 20]

Per (head dim, length, causal) and implementation: the median fwd+bwd time (do_bench, as bench.py times it), then
torch.profiler's device time of every kernel over `--iters` fwd+bwd calls, per call: the prep kernel, each pass, the
allocations' fills, the casts. Shapes as bench.py's grid: B = 16384 / S, H = 2048 / D, bf16. Implementation
"ours-v3-prepkernel": ours with v3_gluon_bwd.FUSED_PREP off (lse and Delta from `_prep_kernel`, as before the
fifteenth session), in the same process; "ours-v3-kv1": ours with one K/V slot in the dK/dV pass
(v3_gluon_bwd.MAX_KV_SLOTS = 1); "ours-v3-kvout0": one K/V slot and dK/dV by masked stores (MAX_KV_SLOTS = 1,
KV_OUT = 0: the dK/dV pass as before the sixteenth session).

--tile-cost: the Gluon backward's two passes (forced) at one head dim, unmasked, B = 16, H = 16, with the query length
growing at 1k keys and the key length growing at 1k queries: each pass's kernel time against its tiles and steps, so
that a pass's fixed cost a tile (K/V or Q/dO loads, the epilogue) separates from its cost a step; with the default
K/V slots and with one.
Writes probe_bwd_parts.json and probe_bwd_parts.md (a summary table first: each point's forward and backward device
time). --from-json PATH renders a run's JSON to --out again, no GPU needed.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def kernel_times(f, iters):
    """[(kernel name, calls a call of f, device us a call of f)] of `iters` calls of f under torch.profiler,
    longest first."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            f()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        if us is None:
            us = getattr(e, "cuda_time_total", 0.0)
        if us and us > 0:
            rows.append((e.key, e.count / iters, us / iters))
    return sorted(rows, key=lambda r: -r[2])


def measure(fn, shape, causal, iters):
    """{ms, kernels} of fn's fwd+bwd on bf16 inputs of `shape` (layout as fn takes them)."""
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def f():
        o = fn(q, k, v, causal)
        torch.autograd.grad(o, (q, k, v), do)
    f()
    ms = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
    return dict(ms=ms, kernels=[dict(name=n, calls=c, us=u) for n, c, u in kernel_times(f, iters)])


def tile_cost(D, iters):
    """[{Sq, Sk, kernels}] of the Gluon backward's two passes (plan forced to dQ mode 0) at (Sq, Sk) in (1k..4k, 1k) and
    (1k, 1k..4k), unmasked, B = H = 16, bf16."""
    from hf_flashattn.kernels import v3, v3_gluon_bwd as GB
    rows = []
    p0 = GB.plan(D)[:5] + (0,)
    slots0 = GB.MAX_KV_SLOTS
    for slots, Sq, Sk in [(s_, a, b) for s_ in dict.fromkeys((GB.kv_slots_for(D, 0), 1))
                          for a, b in ((1024, 1024), (2048, 1024), (4096, 1024), (1024, 2048), (1024, 4096))]:
        GB.MAX_KV_SLOTS = slots
        B, H = 16, 16
        q = torch.randn(B, Sq, H, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, Sk, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        do = torch.randn_like(q)
        out, lse = v3.forward(q, k, v, None, None, Sq, Sk, D ** -0.5, (-1, -1), 0.0)

        f = functools.partial(GB.backward, do, q, k, v, out, lse, None, None, Sq, Sk, D ** -0.5, (-1, -1), _plan=p0)
        f()
        ms = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
        kern = [dict(name=n, calls=c, us=u) for n, c, u in kernel_times(f, iters)]
        row = dict(D=D, Sq=Sq, Sk=Sk, B=B, H=H, kv_slots=GB.kv_slots_for(D, 0), ms=ms, kernels=kern)
        rows.append(row)
        print(json.dumps(dict(D=D, Sq=Sq, Sk=Sk, kv_slots=row["kv_slots"], ms=ms,
                              kernels={r["name"]: round(r["us"], 1) for r in kern})), flush=True)
        del q, k, v, do, out, lse
        torch.cuda.empty_cache()
    GB.MAX_KV_SLOTS = slots0
    return rows


def is_forward(name: str) -> bool:
    """Whether a kernel (torch.profiler's name) is a forward: ours' `_fwd_kernel*`, cuDNN's fprop, flash's fwd."""
    return "_fwd_kernel" in name or "fprop" in name or "flash_fwd" in name


def render(meta, points, tiles):
    """The Markdown report: a summary (a fwd+bwd's do_bench time, its forward kernel's device time and the sum of the
    rest, the backward's), then each point's kernels, then the tile-cost table."""
    md = [f"# fwd+bwd kernel by kernel — {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"cuDNN {meta['cudnn']}, commit {meta['commit']}", "",
          f"bf16, B = 16384 / S, H = 2048 / D; `ms`: do_bench median of a fwd+bwd; kernels: torch.profiler's device "
          f"time over {meta['iters']} fwd+bwd calls, per call.", "",
          "## Summary: device time a call, us (backward: every kernel but the forward's)", "",
          "| impl | D | S | mask | do_bench | forward | backward | backward's kernels |",
          "|---|---|---|---|---|---|---|---|"]
    for p in points:
        if "error" in p:
            continue
        fwd = sum(r["us"] for r in p["kernels"] if is_forward(r["name"]))
        bwd = [r for r in p["kernels"] if not is_forward(r["name"])]
        md.append(f"| {p['impl']} | {p['D']} | {p['S']} | {'causal' if p['causal'] else 'unmasked'} | "
                  f"{p['ms'] * 1e3:.0f} | {fwd:.0f} | {sum(r['us'] for r in bwd):.0f} | "
                  + ", ".join(f"{short(r['name'], 28)} {r['us']:.0f}" for r in bwd) + " |")
    md.append("")
    for p in points:
        head = f"## {p['impl']}, d{p['D']}, S {p['S']}, {'causal' if p['causal'] else 'unmasked'}"
        if "error" in p:
            md += [head, "", f"error: {p['error']}", ""]
            continue
        total = sum(r["us"] for r in p["kernels"])
        md += [head, "", f"do_bench {p['ms'] * 1e3:.0f} us a fwd+bwd; kernels' sum {total:.0f} us", "",
               "| kernel | calls | us | share |", "|---|---|---|---|"]
        md += [f"| {short(r['name'])} | {r['calls']:.1f} | {r['us']:.1f} | {r['us'] / max(total, 1e-9):.0%} |"
               for r in p["kernels"]]
        md.append("")
    if tiles:
        names_t = sorted({r["name"] for t in tiles for r in t["kernels"]})
        md += ["## The two passes' time against their tiles and steps (unmasked, B = H = 16, two passes forced)", "",
               "| D | K/V slots | Sq | Sk | do_bench us | " + " | ".join(short(n, 30) for n in names_t) + " |",
               "|---|---|---|---|---|" + "---|" * len(names_t)]
        for t in tiles:
            us = {r["name"]: r["us"] for r in t["kernels"]}
            md.append(f"| {t['D']} | {t.get('kv_slots', 1)} | {t['Sq']} | {t['Sk']} | {t['ms'] * 1e3:.0f} | "
                      + " | ".join(f"{us[n]:.1f}" if n in us else "" for n in names_t) + " |")
        md.append("")
    return md


def short(name: str, width: int = 70) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--seqlens", default="1024,4096")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--impls", default="ours-v3,sdpa-cudnn,sdpa-flash")
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--tile-cost", default="", help="head dims for the tile-cost section (e.g. 128), none by default")
    ap.add_argument("--from-json", default="", help="render a run's probe_bwd_parts.json again (no GPU) to --out")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as fh:
            run = json.load(fh)
        with open(os.path.join(args.out, "probe_bwd_parts.md"), "w") as fh:
            fh.write("\n".join(render(run["meta"], run["points"], run.get("tile_cost", []))) + "\n")
        return
    from bench import make_impls

    from hf_flashattn.kernels import v3_gluon_bwd as GB
    fused0, slots0, out0 = GB.FUSED_PREP, GB.MAX_KV_SLOTS, GB.KV_OUT
    impls = make_impls(["v3"])
    names = args.impls.split(",")
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cudnn=torch.backends.cudnn.version(), commit=os.environ.get("COMMIT", "unknown"),
                date=time.strftime("%Y-%m-%d"), iters=args.iters)
    t0 = time.time()
    points = []
    for D in (int(d) for d in args.dims.split(",")):
        for S in (int(s) for s in args.seqlens.split(",")):
            for causal in (False, True):
                if time.time() - t0 > args.budget_s:
                    print("time budget reached: skipped", D, S, causal, flush=True)
                    continue
                B, H = 16384 // S, 2048 // D
                for name in names:
                    point = dict(impl=name, D=D, S=S, B=B, H=H, causal=causal)
                    shp = (B, S, H, D) if name.startswith("ours") else (B, H, S, D)
                    variant = name in ("ours-v3-prepkernel", "ours-v3-kv1", "ours-v3-kvout0")
                    GB.FUSED_PREP = name != "ours-v3-prepkernel"
                    GB.MAX_KV_SLOTS = 1 if name in ("ours-v3-kv1", "ours-v3-kvout0") else slots0
                    GB.KV_OUT = 0 if name == "ours-v3-kvout0" else out0
                    try:
                        point.update(measure(impls["ours-v3" if variant else name], shp, causal, args.iters))
                    except Exception as e:  # noqa: BLE001 - a baseline that cannot run is recorded
                        point["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    GB.FUSED_PREP, GB.MAX_KV_SLOTS, GB.KV_OUT = fused0, slots0, out0
                    points.append(point)
                    print(json.dumps({k: point[k] for k in point if k != "kernels"}), flush=True)
                    torch.cuda.empty_cache()
                with open(os.path.join(args.out, "probe_bwd_parts.json"), "w") as fh:
                    json.dump(dict(meta=meta, points=points), fh, indent=1)
    tiles = []
    for D in (int(d) for d in args.tile_cost.split(",") if d):
        if time.time() - t0 > args.budget_s:
            print("time budget reached: skipped the tile cost at", D, flush=True)
            continue
        tiles += tile_cost(D, args.iters)
        with open(os.path.join(args.out, "probe_bwd_parts.json"), "w") as fh:
            json.dump(dict(meta=meta, points=points, tile_cost=tiles), fh, indent=1)
    md = render(meta, points, tiles)
    with open(os.path.join(args.out, "probe_bwd_parts.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
