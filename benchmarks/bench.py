"""Attention benchmark grid on one GPU: our kernels against SDPA (flash, cuDNN) and FlexAttention,
measured in the same process, plus the two floors and the peak memory of fwd+bwd.

    python benchmarks/bench.py --out DIR [--versions v2,v1] [--quick]

FLOPs (one formula everywhere): fwd = 4·B·H·Sq·Sk·D, ×0.5 when causal; bwd = 2.5 × fwd.
Grid (design.md): 16k tokens per batch, headdim 64/128/256 (nheads = 2048 / headdim), seqlen
512…16k, causal and not; GQA 32/8 at 8k and 32k (d128). Points up to 2k tokens: best of 3 rounds (--rounds);
--interleave R: every point's implementations measured in turn for R rounds, medians kept.
Writes bench.json, bench.md, bench.png.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hf_flashattn as fa  # noqa: E402


def flops(B, H, Sq, Sk, D, causal, mode):
    f = 4 * B * H * Sq * Sk * D * (0.5 if causal else 1.0)
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def measure_floors():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda").random_(0, 255)
    y = torch.empty_like(x)
    ms_c = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return dict(matmul_tflops=2 * 8192**3 / ms / 1e9, copy_tb_s=2 * x.numel() / ms_c / 1e9)


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    torch._dynamo.config.cache_size_limit = 1000
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 1000
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def make_impls(versions):
    """name -> fn(q, k, v, causal) on (B, S, H, D) ours / (B, H, S, D) for the baselines."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    flex, create_block_mask = _flex()
    masks = {}

    def sdpa(backend):
        def run(q, k, v, causal):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
        return run

    def flex_run(q, k, v, causal):
        bm = None
        if causal:
            key = (q.shape[2], k.shape[2])
            if key not in masks:
                masks[key] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, q.shape[2], k.shape[2])
            bm = masks[key]
        return flex(q, k, v, block_mask=bm, enable_gqa=q.shape[1] != k.shape[1])

    def ours(ver, dq_mode=""):
        def run(q, k, v, c):
            # the backward reads HF_FLASHATTN_BWD_DQ when it runs, i.e. within this benchmarked call
            os.environ["HF_FLASHATTN_BWD_DQ"] = dq_mode
            return fa.flash_attn_func(q, k, v, causal=c, version=ver)
        return run

    impls = {f"ours-{v}": ours(v) for v in versions}
    if os.environ.get("BENCH_ATOMIC_DQ"):  # FA2-style single-pass backward (HF_FLASHATTN_BWD_DQ=atomic)
        impls["ours-v2-atomicdq"] = ours("v2", "atomic")
    impls.update({"sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
                  "flex": flex_run})
    return impls


def wanted(name, S, D):
    """Expensive or slow baselines on part of the grid only: FlexAttention compiles per shape, and v1
    (B x H programs, O in HBM) is slow by design."""
    if name == "flex":
        return S in (1024, 4096, 8192, 16384, 32768)
    if name == "ours-v1":
        return S in (1024, 4096) and D <= 128
    return True


def host_ms(f, n=20):
    """Host time a call (the calls queued, not waited for), the median of three runs of n: where it reaches the
    measured time, the point measured the host, not the GPU (the short points' spread between processes, NOTES,
    tenth session). None if it cannot be taken."""
    try:
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            times.append((time.perf_counter() - t0) * 1e3 / n)
            torch.cuda.synchronize()
        return sorted(times)[1]
    except Exception:  # noqa: BLE001 - a diagnostic, never the reason a point is lost
        return None


def bench_point(impls, B, H, Hk, S, D, causal, modes=("fwd", "fwd+bwd"), interleave=0):
    """One row per (implementation, mode) of a grid point. interleave = 0: each implementation measured in turn
    (do_bench, warmup 25 ms, 100 ms of calls). interleave = R > 0: every (implementation, mode) set up first, then R
    rounds in which each is measured once (do_bench, warmup 10 ms, 40 ms of calls) in the same order; its time is the
    median over rounds (every round's in `rounds_ms`), so that a drift of the card's clock within the point (the grid's
    ratios moved by up to 7% between processes) weighs on every implementation alike."""
    rows, timed = [], []
    for name, fn in impls.items():
        if not wanted(name, S, D):
            continue
        ours = name.startswith("ours")
        shp = lambda h: (B, S, h, D) if ours else (B, h, S, D)  # noqa: E731
        q = torch.randn(shp(H), device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(shp(Hk), device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(shp(Hk), device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn(shp(H), device="cuda", dtype=torch.bfloat16)
        for mode in modes:
            row = dict(impl=name, B=B, H=H, Hk=Hk, S=S, D=D, causal=causal, mode=mode)
            try:
                if mode == "fwd":
                    f = functools.partial(_fwd, fn, q, k, v, causal)
                else:
                    f = functools.partial(_fwd_bwd, fn, q, k, v, do, causal)
                f()
                if interleave:
                    timed.append((row, f))
                    continue
                ms = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
                _finish(row, f, ms)
            except Exception as e:  # a baseline that cannot run this shape is recorded, not fatal
                row.update(ms=None, tflops=None, error=f"{type(e).__name__}: {str(e)[:160]}")
            rows.append(row)
        if not interleave:
            del q, k, v, do
    for _ in range(interleave):
        for row, f in timed:
            try:
                row.setdefault("rounds_ms", []).append(triton.testing.do_bench(f, warmup=10, rep=40,
                                                                               return_mode="median"))
            except Exception as e:  # noqa: BLE001 - recorded, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
    for row, f in timed:
        if "error" in row:
            row.update(ms=None, tflops=None)
        else:
            _finish(row, f, statistics.median(row["rounds_ms"]))
        rows.append(row)
    timed.clear()
    torch.cuda.empty_cache()
    return rows


def _fwd(fn, q, k, v, causal):
    with torch.no_grad():
        return fn(q, k, v, causal)


def _fwd_bwd(fn, q, k, v, do, causal):
    o = fn(q, k, v, causal)
    torch.autograd.grad(o, (q, k, v), do)


def _finish(row, f, ms):
    row.update(ms=ms, tflops=flops(row["B"], row["H"], row["S"], row["S"], row["D"], row["causal"], row["mode"]) / ms
               / 1e9, host_ms=host_ms(f) if ms < 2.0 else None)   # host time only where the host could matter


def best_of_rounds(rounds):
    """One row per (implementation, mode): the round with the shortest time, with every round's time (`rounds_ms`)
    where there was more than one."""
    if len(rounds) == 1:
        return rounds[0]
    best = {}
    for rows in rounds:
        for r in rows:
            key = (r["impl"], r["mode"])
            times = best[key]["rounds_ms"] if key in best else []
            times.append(r["ms"])
            if key not in best or (r["ms"] is not None and (best[key]["ms"] is None or r["ms"] < best[key]["ms"])):
                best[key] = dict(r, rounds_ms=times)
    return list(best.values())


def peak_memory(impls, names, seqlens, H=16, D=128):
    """Peak memory of one fwd+bwd above what is allocated before it (the inputs and dO), batch 1, causal. A first call
    of the same shapes runs before the measured one, so that a compile or an autotuning pass (Triton's do_bench takes
    a 256 MB buffer to flush L2) is not counted; nothing of a previous call is alive while a call is measured."""
    rows = []
    for name in names:
        fn = impls[name]
        for S in seqlens:
            ours = name.startswith("ours")
            shp = (1, S, H, D) if ours else (1, H, S, D)
            q, k, v = (torch.randn(shp, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            do = torch.randn(shp, device="cuda", dtype=torch.bfloat16)
            extra = None
            try:
                for measured in (False, True):
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    grads = torch.autograd.grad(fn(q, k, v, True), (q, k, v), do)
                    torch.cuda.synchronize()
                    if measured:
                        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
                    del grads
            except Exception as e:
                print(f"peak memory {name} S={S}: {type(e).__name__}")
            rows.append(dict(impl=name, S=S, H=H, D=D, extra_peak_mib=extra, inputs_mib=4 * q.numel() * 2 / 2**20))
            del q, k, v, do
    return rows


def _ratio(point, ours, base, interleaved):
    """Cell "ours ÷ base" (speed) of a point's rows: measured in turns (interleaved), the median over rounds of each
    round's ratio, so that a drift of the clock between rounds cancels; else the ratio of the kept times."""
    a, b = point.get(ours), point.get(base)
    if not (a and b and a.get("tflops") and b.get("tflops")):
        return "–"
    ra, rb = a.get("rounds_ms"), b.get("rounds_ms")
    if interleaved and ra and rb and len(ra) == len(rb):
        return "%.2f" % statistics.median(y / x for x, y in zip(ra, rb))
    return "%.2f" % (a["tflops"] / b["tflops"])


def markdown(rows, floors, meta):
    lines = [f"# Attention benchmark — {meta['gpu']}", "",
             f"date {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"bf16; measured floors: matmul {floors['matmul_tflops']:.0f} TFLOP/s, copy {floors['copy_tb_s']:.2f} TB/s"
             + (f"; every point's implementations measured in turn, {meta['interleave']} rounds: TFLOP/s at the "
                "median time, ratios the median of each round's ratio" if meta.get("interleave") else ""),
             "", "TFLOP/s (ratio of ours-v2 to SDPA flash / cuDNN / Flex in brackets)", ""]
    impls = sorted({r["impl"] for r in rows}, key=lambda s: (not s.startswith("ours"), s))
    mine = [v for v in ("v2", "v3") if f"ours-{v}" in impls]   # ratio columns for our v2 and v3
    heads = [f"{v}/{b}" for v in mine for b in ("flash", "cuDNN", "flex")]
    lines[-2] = "TFLOP/s; then the ratios of " + " and ".join(f"ours-{v}" for v in mine) + " to SDPA flash / cuDNN / Flex"
    lines.append("| D | S | H/Hk | causal | mode | " + " | ".join(impls + heads) + " |")
    lines.append("|" + "---|" * (5 + len(impls) + len(heads)))
    keys = sorted({(r["D"], r["S"], r["H"], r["Hk"], r["causal"], r["mode"]) for r in rows})
    for key in keys:
        point = {r["impl"]: r for r in rows if (r["D"], r["S"], r["H"], r["Hk"], r["causal"], r["mode"]) == key}
        by = {i: r["tflops"] for i, r in point.items()}
        cells = ["%.0f" % by[i] if by.get(i) else "–" for i in impls]
        ratios = [_ratio(point, f"ours-{v}", b, meta.get("interleave")) for v in mine
                  for b in ("sdpa-flash", "sdpa-cudnn", "flex")]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]}/{key[3]} | {key[4]} | {key[5]} | " + " | ".join(cells + ratios)
                     + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 6, figsize=(30, 9))
    for i, mode in enumerate(("fwd", "fwd+bwd")):
        for j, (D, causal) in enumerate([(d, c) for d in (64, 128, 256) for c in (False, True)]):
            ax = axes[i][j]
            for impl in sorted({r["impl"] for r in rows}):
                pts = sorted((r["S"], r["tflops"]) for r in rows if r["impl"] == impl and r["D"] == D and
                             r["causal"] == causal and r["mode"] == mode and r["tflops"] and r["H"] == r["Hk"])
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode} d{D} {'causal' if causal else 'full'}")
            ax.set_xlabel("seqlen")
            ax.set_ylabel("TFLOP/s")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--versions", default="v2")
    ap.add_argument("--quick", action="store_true", help="a few points only")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new grid points after this")
    ap.add_argument("--dims", default="128,64,256")
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--no-gqa", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="the floors and the peak memory, no grid")
    ap.add_argument("--memory-seqlens", default="4096,16384,65536",
                    help="sequence lengths of the peak-memory table (batch 1, 16 heads, d128, causal)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="points up to --rounds-to tokens are measured this many times, every implementation once a "
                         "round, and each keeps its fastest round (their times recorded): those points are short "
                         "enough for the host's speed, which varies within and between processes, to show")
    ap.add_argument("--rounds-to", type=int, default=2048)
    ap.add_argument("--interleave", type=int, default=0,
                    help="R > 0: at every point, each (implementation, mode) measured once a round for R rounds in "
                         "turn, its median kept (`bench_point`); --rounds then does not apply")
    args = ap.parse_args()
    t0 = time.time()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=os.environ.get("COMMIT", "unknown"), date=time.strftime("%Y-%m-%d"), interleave=args.interleave,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    floors = measure_floors()
    print("floors", floors, flush=True)
    impls = make_impls(args.versions.split(","))
    seqlens = [1024, 4096, 16384] if args.quick else [int(x) for x in args.seqlens.split(",")]
    rows = []
    dims = [int(d) for d in args.dims.split(",")]
    points = [(16384 // S, 2048 // D, 2048 // D, S, D, c) for D in dims for S in seqlens for c in (False, True)]
    if 128 in dims and not args.no_gqa:
        points[12:12] = [(1, 32, 8, S, 128, c) for S in (8192, 32768) for c in (False, True)]  # GQA 32/8
    for B, H, Hk, S, D, causal in [] if args.memory_only else points:
        if time.time() - t0 > args.budget_s:
            print(f"time budget reached: skipped D={D} S={S} causal={causal} H={H}/{Hk}", flush=True)
            continue
        if args.interleave:
            new = bench_point(impls, B, H, Hk, S, D, causal, interleave=args.interleave)
        else:
            new = best_of_rounds([bench_point(impls, B, H, Hk, S, D, causal)
                                  for _ in range(args.rounds if S <= args.rounds_to else 1)])
        rows += new
        print(f"D={D} S={S} H={H}/{Hk} causal={causal} " + " ".join(
            f"{x['impl']}:{x['mode']}={x['tflops']:.0f}" if x["tflops"] else f"{x['impl']}:{x['mode']}=–"
            for x in new), flush=True)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(dict(meta=meta, floors=floors, rows=rows), f)
    print(f"grid done in {time.time() - t0:.0f}s", flush=True)
    # every version asked for but v1 (B x H programs: far too slow at 64k), then SDPA's two fused backends
    mem_impls = [n for n in impls if n.startswith("ours-") and n != "ours-v1"] + ["sdpa-flash", "sdpa-cudnn"]
    mem = [] if args.no_memory else peak_memory(impls, mem_impls, [int(x) for x in args.memory_seqlens.split(",")])
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(dict(meta=meta, floors=floors, rows=rows, peak_memory=mem), f, indent=1)
    md = markdown(rows, floors, meta)
    md += "\n## Peak memory of fwd+bwd above the inputs (MiB), B=1, H=16, d128, causal\n\n| impl | " + \
        " | ".join(str(s) for s in sorted({m["S"] for m in mem})) + " |\n|---|" + "---|" * len({m["S"] for m in mem}) + "\n"
    for name in dict.fromkeys(m["impl"] for m in mem):
        md += f"| {name} | " + " | ".join("%.0f" % m["extra_peak_mib"] if m["extra_peak_mib"] is not None else "OOM"
                                         for m in mem if m["impl"] == name) + " |\n"
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(md)
    if rows:
        plot(rows, os.path.join(args.out, "bench.png"))
    print(md)
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
