"""Where a v2 forward+backward's host time sits against its GPU time, at the short points whose fwd+bwd reading moves
between processes (d128 512 causal: 1.13-1.50x SDPA-flash in four processes, benchmarks/NOTES.md).

1. Host segments of flash_attn_func(version="v2") fwd+bwd at a tiny shape (B=1, S=128, H=2, d128, bf16: the GPU idles),
   median over calls, microseconds: the call to the forward kernel's launch, that launch to the call's return, the
   return to the backward's first launch (autograd's engine and our backward's Python), the first to the second
   launch, the second launch to .backward()'s return. The launches are timed at the entry of `_common.Launcher`'s
   and `_common.FastLaunch.keyed`'s calls (the launch's own cost falls in the next segment).
2. The point itself (bench.py's shape), ours-v2 and SDPA-flash, fwd+bwd (first checked: the first call, a second call
   and one with FAST_LAUNCH off give the same bits): (a) bench.py's method (do_bench, L2 flushed
   before each call, per-call events, median of 40 ms of calls), in rounds; (b) 50 calls queued back to back and one
   synchronize, so that the host runs ahead of the GPU and the time a call is the GPU's whenever the host is faster;
   (c) host time a call (the calls queued, timed on the host). Where (a) exceeds (b), the GPU waited for the host.

    python benchmarks/probe_host_v2.py --out DIR [--rounds 7] [--points d128-512-causal,d256-512-causal]
Writes probe_host_v2.json and probe_host_v2.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_flashattn as fa  # noqa: E402
from hf_flashattn.kernels import _common as C  # noqa: E402
from rounds import host_us, identity_fwd_bwd, queued_ms, switched, write_profile  # noqa: E402

# name -> (D, S, B, H, causal): bench.py's shapes (B = 16384 / S, H = 2048 / D)
POINTS = {"d128-512-causal": (128, 512, 32, 16, True), "d128-512": (128, 512, 32, 16, False),
          "d256-512-causal": (256, 512, 32, 8, True), "d64-512-causal": (64, 512, 32, 32, True),
          "d128-1k-causal": (128, 1024, 16, 16, True)}


def segments(n=600):
    """Median microseconds of each host segment of a tiny fwd+bwd (see the module's docstring, item 1)."""
    marks = []
    real_call, real_keyed = C.Launcher.__call__, C.FastLaunch.keyed

    def call(self, *a, **k):
        marks.append(time.perf_counter())
        return real_call(self, *a, **k)

    def keyed(self, *a, **k):
        marks.append(time.perf_counter())
        return real_keyed(self, *a, **k)
    B, S, H, D = 1, 128, 2, 128
    out = {}
    for causal in (False, True):
        q, k, v, do = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        rows = []
        C.Launcher.__call__, C.FastLaunch.keyed = call, keyed
        try:
            for i in range(n):
                for x in (q, k, v):
                    x.grad = None
                marks.clear()
                t0 = time.perf_counter()
                o = fa.flash_attn_func(q, k, v, causal=causal, version="v2")
                t1 = time.perf_counter()
                o.backward(do)
                t2 = time.perf_counter()
                if i >= 50 and len(marks) >= 3:
                    rows.append((marks[0] - t0, t1 - marks[0], marks[1] - t1, marks[2] - marks[1], t2 - marks[2],
                                 t2 - t0))
                if i % 100 == 0:
                    torch.cuda.synchronize()
        finally:
            C.Launcher.__call__, C.FastLaunch.keyed = real_call, real_keyed
        torch.cuda.synchronize()
        names = ["call -> fwd launch", "fwd launch -> return", "return -> bwd 1st launch", "1st -> 2nd launch",
                 "2nd launch -> done", "whole fwd+bwd"]
        out["causal" if causal else "not causal"] = {nm: round(statistics.median(r[j] for r in rows) * 1e6, 1)
                                                     for j, nm in enumerate(names)}
        print(json.dumps(out), flush=True)
    return out


def pieces(out_dir, n=300):
    """Host microseconds a call of the fwd+bwd's parts at the tiny shape (causal; calls queued, one synchronize a
    repeat, median of 5): v2.forward, v2_bwd.backward, flash_attn_func without grad, the fwd+bwd, a trivial Python
    autograd.Function's fwd+bwd, a torch.empty; then a cProfile of 300 fwd+bwd calls (top 40 by own and by cumulative
    time) into probe_host_v2_profile.txt."""
    from hf_flashattn.kernels import v2, v2_bwd
    B, S, H, D = 1, 128, 2, 128
    q, k, v, do = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = v2.forward(q, k, v, None, None, S, S, D ** -0.5, (-1, 0), 0.0)

    def fb():
        for x in (qg, kg, vg):
            x.grad = None
        fa.flash_attn_func(qg, kg, vg, causal=True, version="v2").backward(do)

    def ident():
        identity_fwd_bwd(qg, do)
    parts = {"v2.forward": lambda: v2.forward(q, k, v, None, None, S, S, D ** -0.5, (-1, 0), 0.0),
             "v2_bwd.backward": lambda: v2_bwd.backward(do, q, k, v, out, lse, None, None, S, S, D ** -0.5, (-1, 0),
                                                        0.0),
             "flash_attn_func, no grad": lambda: fa.flash_attn_func(q, k, v, causal=True, version="v2"),
             "fwd+bwd": fb, "a Python autograd.Function fwd+bwd": ident,
             "torch.empty": lambda: torch.empty(B, S, H, D, device="cuda")}
    res = {name: round(host_us(f, n), 1) for name, f in parts.items()}
    print(json.dumps(res), flush=True)
    os.makedirs(out_dir, exist_ok=True)
    write_profile(os.path.join(out_dir, "probe_host_v2_profile.txt"), fb, n)
    return res


def time_point(p, rounds):
    """Item 2 of the module's docstring at point p: ours-v2 and SDPA-flash fwd+bwd, `rounds` rounds of (a), (b), (c)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    D, S, B, H, causal = POINTS[p]

    q, k, v, do = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    dot = do.transpose(1, 2)

    def ours():
        for x in (qg, kg, vg):
            x.grad = None
        fa.flash_attn_func(qg, kg, vg, causal=causal, version="v2").backward(do)

    def flash():
        for x in (qt, kt, vt):
            x.grad = None
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).backward(dot)
    impls = {"ours-v2": ours, "sdpa-flash": flash}

    def result():
        ours()
        return [t.detach().clone() for t in (qg.grad, kg.grad, vg.grad)] + [
            fa.flash_attn_func(q, k, v, causal=causal, version="v2")]
    first = result()            # the first call of this shape: through the autotuner (Triton's entry point)
    again = result()            # the direct launch (kernels._common.Launcher._direct)
    with switched((C, "FAST_LAUNCH", False)):
        entry = result()        # every launch through Triton's entry point
    same = all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, again, entry))
    print(f"{p}: direct launch bitwise equal to Triton's entry point (dq, dk, dv, out): {same}", flush=True)
    for f in impls.values():   # compile and tune first
        f()
    rec = {n: dict(do_bench_ms=[], queued_ms=[], host_ms=[]) for n in impls}
    for _ in range(rounds):
        for n, f in impls.items():
            rec[n]["do_bench_ms"].append(triton.testing.do_bench(f, warmup=10, rep=40, return_mode="median"))
            qd, hd = queued_ms(f)
            rec[n]["queued_ms"].append(qd)
            rec[n]["host_ms"].append(hd)
    row = dict(point=p, D=D, S=S, B=B, H=H, causal=causal, direct_bitwise=same,
               impls={n: {k: [round(x, 4) for x in v] for k, v in r.items()} for n, r in rec.items()})
    for n in impls:
        row["impls"][n].update({f"median_{k}": round(statistics.median(v), 4) for k, v in rec[n].items()})
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--points", default="d128-512-causal,d256-512-causal,d128-512")
    args = ap.parse_args()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cudnn=torch.backends.cudnn.version(), commit=os.environ.get("COMMIT", "unknown"),
                date=time.strftime("%Y-%m-%d"), rounds=args.rounds)
    seg = segments()
    parts = pieces(args.out)
    points = [time_point(p, args.rounds) for p in args.points.split(",")]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_host_v2.json"), "w") as f:
        json.dump(dict(meta=meta, segments=seg, pieces=parts, points=points), f, indent=1)
    md = [f"# v2 fwd+bwd: host time against GPU time — {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"cuDNN {meta['cudnn']}, commit {meta['commit']}", "", f"date {meta['date']}", "",
          "## Host segments of a tiny fwd+bwd (B=1, S=128, H=2, d128, bf16; the GPU idles), median us", "",
          "| segment | not causal | causal |", "|---|---|---|"]
    for nm in seg["causal"]:
        md.append(f"| {nm} | {seg['not causal'][nm]} | {seg['causal'][nm]} |")
    md += ["", "## Parts at the same shape, causal, host us a call (queued calls; profile: probe_host_v2_profile.txt)",
           "", "| part | us |", "|---|---|"] + [f"| {k} | {v} |" for k, v in parts.items()]
    md += ["", f"## fwd+bwd at bench.py's shapes, {args.rounds} rounds, medians (ms)", "",
           "(a) do_bench as bench.py (L2 flushed, per-call events); (b) 50 calls queued, one synchronize; (c) host "
           "time a call of (b). ours-v2 ÷ flash by (a) and by (b)", "",
           "| point | impl | (a) do_bench | (b) queued | (c) host | flash ÷ ours (a) | flash ÷ ours (b) |",
           "|---|---|---|---|---|---|---|"]
    md_bits = [f"{row['point']}: {row['direct_bitwise']}" for row in points]
    for row in points:
        o, fl = row["impls"]["ours-v2"], row["impls"]["sdpa-flash"]
        for n, r in row["impls"].items():
            ra = fl["median_do_bench_ms"] / o["median_do_bench_ms"] if n == "ours-v2" else None
            rb = fl["median_queued_ms"] / o["median_queued_ms"] if n == "ours-v2" else None
            md.append(f"| {row['point']} | {n} | {r['median_do_bench_ms']:.3f} | {r['median_queued_ms']:.3f} | "
                      f"{r['median_host_ms']:.3f} | {'' if ra is None else f'{ra:.2f}'} | "
                      f"{'' if rb is None else f'{rb:.2f}'} |")
    md += ["", "Direct launches bitwise equal to Triton's entry point (dq, dk, dv, out; first call, second call, "
           "FAST_LAUNCH off): " + ", ".join(md_bits)]
    with open(os.path.join(args.out, "probe_host_v2.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
