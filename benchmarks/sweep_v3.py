"""Sweep of v3's forward launch plans on one GPU: tile (BLOCK_M, BLOCK_N, warps, stages) x tile loads (host-made
or in-kernel descriptors) x warp specialisation x the scale folded into the exponent, beside our
v2 forward and SDPA-cuDNN / SDPA-flash measured in the same process, at 1k / 4k / 16k tokens, causal and not.

    python benchmarks/sweep_v3.py --out DIR [--dims 64,128,256] [--seqlens 1024,4096,16384] [--budget-s 400]

Every variant's output is compared with the default plan's (max |difference|; the same arithmetic gives 0, a
different tile order a few bf16 ulps). The plans are compiled first by a pool of worker processes on tiny
inputs of the same specialisation (Triton's on-disk cache is shared), then timed here.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (tile, host descriptors, warp specialisation, fold) per head-dim class; the first is the old default
# (in-kernel descriptors, warp-specialised, scale not folded) for the ratio of each variant to it.
T, F = True, False
# Second round (the first, 02dc544: results/2026-11-26-h200-sweep-v3.md): around the first round's winners,
# small 4-warp tiles with host descriptors (several programs an SM) and the 8-warp 128 x 128 tile at d128.
PLANS = {
    64: [((128, 128, 4, 3), F, F, F), ((64, 64, 4, 3), T, F, T), ((64, 64, 4, 4), T, F, T),
         ((64, 32, 4, 3), T, F, T), ((64, 32, 4, 4), T, F, T), ((128, 64, 4, 4), T, F, T),
         ((128, 32, 4, 3), T, F, T), ((64, 128, 4, 2), T, F, T)],
    128: [((128, 128, 8, 3), F, T, F), ((128, 128, 8, 3), T, F, T), ((128, 128, 8, 3), T, T, T),
          ((64, 64, 4, 3), T, F, T), ((64, 32, 4, 3), T, F, T), ((64, 32, 4, 4), T, F, T),
          ((128, 64, 8, 4), T, F, T), ((128, 32, 8, 3), T, F, T), ((64, 64, 4, 3), F, F, T)],
    256: [((128, 64, 8, 2), F, T, F), ((64, 32, 4, 3), T, F, T), ((64, 32, 4, 4), T, F, T),
          ((64, 32, 4, 2), T, F, T), ((64, 16, 4, 3), T, F, T), ((64, 16, 4, 4), T, F, T),
          ((128, 32, 8, 3), T, F, T), ((64, 32, 4, 3), F, F, T)],
}


def name(p):
    (bm, bn, w, st), host, ws, fold = p
    return f"{bm}x{bn}/{w}w/{st}s " + ("host" if host else "in-kernel") + (" ws" if ws else "") + ("" if fold else " nofold")


def inputs(B, H, S, D):
    return [torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]


def run(p, q, k, v, S, causal):
    from hf_flashattn.kernels import v3
    win = (-1, 0) if causal else (-1, -1)
    cfg, host, ws, fold = p
    return v3.forward(q, k, v, None, None, S, S, q.shape[-1] ** -0.5, win, 0.0, _plan=(cfg, host, ws), _fold=fold)


def _worker(job):
    p, D = job
    try:
        q, k, v = inputs(1, 2, 256, D)
        run(p, q, k, v, 256, False)
        torch.cuda.synchronize()
        return job, {}
    except Exception as e:  # noqa: BLE001
        return job, dict(error=f"{type(e).__name__}: {str(e)[:200]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--dims", default="128,256,64")
    ap.add_argument("--seqlens", default="4096,16384,1024")
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--only-default", action="store_true",
                    help="no plan list: only what version='auto' runs (v3's plan()), dense and packed, beside v2")
    args = ap.parse_args()
    if args.only_default:
        for d in PLANS:
            PLANS[d] = []
    os.environ["HF_FLASHATTN_AUTOTUNE"] = "0"
    t0 = time.time()
    import torch.nn.functional as Fn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import hf_flashattn as fa
    dims = [int(d) for d in args.dims.split(",")]
    jobs = [(p, D) for D in dims for p in PLANS[D]]
    info = {}
    with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as ex:
        for job, r in ex.map(_worker, jobs):
            info[(name(job[0]), job[1])] = r
            print("compiled", name(job[0]), job[1], r, flush=True)
    print(f"compiled {len(jobs)} plans in {time.time() - t0:.0f}s", flush=True)
    rows = []
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cudnn=torch.backends.cudnn.version(), commit=os.environ.get("COMMIT", "unknown"),
                date=time.strftime("%Y-%m-%d"))
    for D in dims:
        for S in (int(s) for s in args.seqlens.split(",")):
            for causal in (False, True):
                if time.time() - t0 > args.budget_s:
                    print("time budget reached: skipped", D, S, causal, flush=True)
                    continue
                H, B = 2048 // D, 16384 // S
                q, k, v = inputs(B, H, S, D)
                fl = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
                base = dict(D=D, S=S, B=B, H=H, causal=causal)
                qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                for impl, be in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
                    with sdpa_kernel(be):
                        ms = triton.testing.do_bench(lambda: Fn.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                                                     return_mode="median")
                    rows.append(dict(base, impl=impl, ms=ms, tflops=fl / ms / 1e9))
                ms = triton.testing.do_bench(lambda: fa.flash_attn_func(q, k, v, causal=causal, version="v2"),
                                             return_mode="median")
                rows.append(dict(base, impl="ours-v2", ms=ms, tflops=fl / ms / 1e9))
                # what version="auto" runs (v3 on Hopper, its plan() for this head dim and length), dense and
                # as a packed batch of B equal sequences (flash_attn_varlen_func)
                ms = triton.testing.do_bench(lambda: fa.flash_attn_func(q, k, v, causal=causal), return_mode="median")
                rows.append(dict(base, impl="ours-auto", ms=ms, tflops=fl / ms / 1e9))
                cu = torch.arange(0, (B + 1) * S, S, device="cuda", dtype=torch.int32)
                qp, kp, vp = (x.reshape(B * S, H, D) for x in (q, k, v))
                ms = triton.testing.do_bench(lambda: fa.flash_attn_varlen_func(qp, kp, vp, cu, cu, S, S, causal=causal),
                                             return_mode="median")
                rows.append(dict(base, impl="ours-auto-varlen", ms=ms, tflops=fl / ms / 1e9))
                for vname, fn in (("ours-v2-varlen", lambda: fa.flash_attn_varlen_func(qp, kp, vp, cu, cu, S, S,
                                                                                      causal=causal, version="v2")),):
                    ms = triton.testing.do_bench(fn, return_mode="median")
                    rows.append(dict(base, impl=vname, ms=ms, tflops=fl / ms / 1e9))
                ref = run(PLANS[D][0], q, k, v, S, causal)[0].float() if PLANS[D] else None
                for p in PLANS[D]:
                    r = dict(base, impl="ours-v3", plan=name(p), **info.get((name(p), D), {}))
                    if "error" not in r:
                        try:
                            diff = (run(p, q, k, v, S, causal)[0].float() - ref).abs().max().item()
                            ms = triton.testing.do_bench(lambda: run(p, q, k, v, S, causal), return_mode="median")
                            r.update(ms=ms, tflops=fl / ms / 1e9, max_diff_vs_first=diff)
                        except Exception as e:  # noqa: BLE001 (e.g. out of shared memory for a tile)
                            r.update(error=f"{type(e).__name__}: {str(e)[:200]}")
                    rows.append(r)
                    print(json.dumps(r), flush=True)
                with open(os.path.join(args.out, "sweep_v3.json"), "w") as f:
                    json.dump(dict(meta=meta, rows=rows), f, indent=1)
                del q, k, v, qt, kt, vt, ref, qp, kp, vp
                torch.cuda.empty_cache()
    md = [f"# v3 forward plans — {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"cuDNN {meta['cudnn']}, commit {meta['commit']}", "",
          "TFLOP/s (4·B·H·S²·D, half under causal); B = 16384 / S, H = 2048 / D; ratio to SDPA-cuDNN in brackets.", ""]
    keys = sorted({(r["D"], r["S"], r["causal"]) for r in rows})
    md += ["| plan | " + " | ".join(f"d{d} {s // 1024}k{' c' if c else ''}" for d, s, c in keys) + " |",
           "|---|" + "---|" * len(keys)]
    cudnn = {(r["D"], r["S"], r["causal"]): r["tflops"] for r in rows if r["impl"] == "sdpa-cudnn"}
    labels = ["sdpa-cudnn", "sdpa-flash", "ours-v2", "ours-auto", "ours-v2-varlen", "ours-auto-varlen"] + \
        [name(p) for D in dims for p in PLANS[D]]
    for label in dict.fromkeys(labels):
        cells, seen = [], False
        for key in keys:
            hit = [r for r in rows if (r["D"], r["S"], r["causal"]) == key and r.get("plan", r["impl"]) == label]
            if hit and "tflops" in hit[0]:
                seen = True
                cells.append(f"{hit[0]['tflops']:.0f} ({hit[0]['tflops'] / cudnn[key]:.2f})" if key in cudnn
                             else f"{hit[0]['tflops']:.0f}")
            else:
                cells.append("err" if hit else "–")
        if seen or any(c == "err" for c in cells):
            md.append(f"| {label} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "sweep_v3.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
