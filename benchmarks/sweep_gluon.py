"""The Gluon v3 forward (hf_flashattn/kernels/v3_gluon.py) on one GPU: correctness first, then its launch plans
beside the Triton-language v3 forward, SDPA-cuDNN and SDPA-flash, measured in the same process.

    python benchmarks/sweep_gluon.py --out DIR [--dims 128,64] [--seqlens 1024,4096,16384] [--budget-s 400]

Correctness: every plan, bf16 and fp16, awkward shapes (113 x 203, q_len != k_len both ways, q_len 1, GQA 32/8,
MQA), causal / not / windows, against the float32 reference with flash-attn's rule (|out - ref32| <= 2 x
|torch's own low-precision out - ref32| + floor); lse within 1e-2 (and +inf where a row sees no key).
Speed: TFLOP/s (4·B·H·S²·D, half under causal), B = 16384 / S, H = 2048 / D, ratio to SDPA-cuDNN.
Writes sweep_gluon.json and sweep_gluon.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLOOR = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# (BLOCK_M, BLOCK_N, warps, stages, consumer registers[, ping-pong[, Q slots]]) per head dim; the first is checked in
# fp16 too and alone with --check-plans default: v3_gluon's default at every head dim (d64's two Q slots since the
# sixteenth session, benchmarks/NOTES.md). BLOCK_M = 64 rows x consumer warpgroups; warps: the producer partition's.
# 64-row plans (one consumer) run two programs an SM.
PLANS = {128: [(128, 128, 4, 2, 240, False, 2), (64, 64, 4, 2, 232, False, 1)],
         64: [(192, 128, 4, 2, 160, False, 2), (192, 128, 4, 2, 160, False, 1), (128, 128, 4, 2, 240, False, 2)],
         256: [(128, 64, 4, 2, 240, False, 1)]}
# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim)
SHAPES = [(2, 113, 203, 8, 2, 128), (2, 203, 113, 8, 8, 64), (1, 1, 2048, 32, 8, 128), (1, 1023, 1024, 4, 4, 64),
          (1, 1024, 1023, 8, 1, 128), (1, 777, 4500, 32, 8, 128), (2, 333, 333, 32, 8, 64),
          (2, 113, 203, 8, 2, 256), (1, 1023, 1024, 4, 1, 256),
          # queries far past the keys: under a causal mask whole row tiles see no key (the kernel's early exit)
          (1, 700, 100, 4, 4, 128), (2, 450, 64, 4, 1, 64), (1, 500, 60, 4, 2, 256)]
MASKS = [dict(causal=False), dict(causal=True), dict(window_size=(128, 0)), dict(window_size=(64, 32))]


def check(plans, dtypes, t0, budget):
    from hf_flashattn.kernels import v3_gluon as G
    from hf_flashattn.reference import attention_ref
    rows = []
    for D in plans:
        for n, p in enumerate(plans[D]):
            for dtype in (dtypes if n == 0 else dtypes[:1]):   # fp16 for the first plan only
                for shape in SHAPES:
                    if shape[-1] != D:
                        continue
                    B, Sq, Sk, H, Hk, _ = shape
                    q = torch.randn(B, Sq, H, D, device="cuda", dtype=dtype)
                    k, v = (torch.randn(B, Sk, Hk, D, device="cuda", dtype=dtype) for _ in range(2))
                    for kw in MASKS:
                        if time.time() - t0 > budget:
                            return rows, False
                        win = kw.get("window_size", (-1, 0) if kw.get("causal") else (-1, -1))
                        row = dict(plan=list(p), dtype=str(dtype).split(".")[-1], shape=list(shape), window=list(win))
                        try:
                            out, lse = G.forward(q, k, v, Sq, Sk, D ** -0.5, win, _plan=p)
                            ref, ref_lse = attention_ref(q, k, v, compute_dtype=torch.float32, **kw)
                            low, _ = attention_ref(q, k, v, compute_dtype=dtype, **kw)
                            err = (out.float() - ref).abs().max().item()
                            base = (low.float() - ref).abs().max().item()
                            fin = torch.isfinite(ref_lse)
                            lse_err = (lse[fin] - ref_lse[fin]).abs().max().item() if fin.any() else 0.0
                            inf_ok = bool(torch.equal(torch.isinf(lse), ~fin))
                            ok = bool(torch.isfinite(out).all()) and err <= 2 * base + FLOOR[dtype] and \
                                lse_err < 1e-2 and inf_ok
                            row.update(err=err, torch_err=base, lse_err=lse_err, lse_inf_match=inf_ok, ok=ok)
                        except Exception as e:  # noqa: BLE001
                            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
                        rows.append(row)
                        if not row["ok"]:
                            print("FAIL", json.dumps(row), flush=True)
    return rows, True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--dims", default="128,64,256")
    ap.add_argument("--seqlens", default="4096,16384,1024")
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--check-plans", default="all", help="'all' or 'default'")
    ap.add_argument("--prev", default="", help="a module with an earlier version of v3_gluon (e.g. "
                    "hf_flashattn.kernels.v3_gluon_prev), timed with its default plan beside this one's plans")
    args = ap.parse_args()
    os.environ["HF_FLASHATTN_AUTOTUNE"] = "0"
    os.environ["HF_FLASHATTN_V3_GLUON"] = "0"   # "ours-v3" below is the Triton-language kernel
    t0 = time.time()
    import torch.nn.functional as Fn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hf_flashattn.kernels import v3
    from hf_flashattn.kernels import v3_gluon as G
    dims = [int(d) for d in args.dims.split(",")]
    prev = __import__(args.prev, fromlist=["forward"]) if args.prev else None
    plans = {D: PLANS[D] if args.check_plans == "all" else PLANS[D][:1] for D in dims}
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cudnn=torch.backends.cudnn.version(), commit=os.environ.get("COMMIT", "unknown"),
                date=time.strftime("%Y-%m-%d"))
    checks, complete = check(plans, (torch.bfloat16, torch.float16), t0, args.budget_s * 0.35)
    n_ok = sum(r["ok"] for r in checks)
    print(f"correctness: {n_ok}/{len(checks)} pass{'' if complete else ' (budget cut the grid)'} "
          f"in {time.time() - t0:.0f}s", flush=True)
    rows = []

    def save():
        with open(os.path.join(args.out, "sweep_gluon.json"), "w") as f:
            json.dump(dict(meta=meta, checks=checks, check_complete=complete, rows=rows), f, indent=1)

    save()
    for D in dims:
        for S in (int(s) for s in args.seqlens.split(",")):
            for causal in (False, True):
                if time.time() - t0 > args.budget_s:
                    print("time budget reached: skipped", D, S, causal, flush=True)
                    continue
                H, B = 2048 // D, 16384 // S
                q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                fl = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
                base = dict(D=D, S=S, B=B, H=H, causal=causal)
                win = (-1, 0) if causal else (-1, -1)
                qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

                def timed(impl, fn, **extra):
                    try:
                        ms = triton.testing.do_bench(fn, return_mode="median")
                        r = dict(base, impl=impl, ms=ms, tflops=fl / ms / 1e9, **extra)
                    except Exception as e:  # noqa: BLE001
                        r = dict(base, impl=impl, error=f"{type(e).__name__}: {str(e)[:200]}", **extra)
                    rows.append(r)
                    print(json.dumps(r), flush=True)

                for impl, be in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
                    with sdpa_kernel(be):
                        timed(impl, lambda: Fn.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
                timed("ours-v3", lambda: v3.forward(q, k, v, None, None, S, S, D ** -0.5, win, 0.0))
                ref = v3.forward(q, k, v, None, None, S, S, D ** -0.5, win, 0.0)[0].float()
                if prev is not None:
                    pp = prev._PLANS[D]
                    diff = (prev.forward(q, k, v, S, S, D ** -0.5, win, _plan=pp)[0].float() - ref).abs().max()
                    diff = diff.item()
                    timed("prev " + "x".join(map(str, pp)),
                          lambda: prev.forward(q, k, v, S, S, D ** -0.5, win, _plan=pp), max_diff_vs_v3=diff)
                for p in PLANS[D]:
                    try:
                        diff = (G.forward(q, k, v, S, S, D ** -0.5, win, _plan=p)[0].float() - ref).abs().max().item()
                    except Exception as e:  # noqa: BLE001
                        diff = f"{type(e).__name__}: {str(e)[:200]}"
                    timed("gluon " + "x".join(map(str, p)), lambda: G.forward(q, k, v, S, S, D ** -0.5, win, _plan=p),
                          max_diff_vs_v3=diff)
                save()
                del q, k, v, qt, kt, vt, ref
                torch.cuda.empty_cache()
    keys = sorted({(r["D"], r["S"], r["causal"]) for r in rows})
    cudnn = {(r["D"], r["S"], r["causal"]): r["tflops"] for r in rows if r["impl"] == "sdpa-cudnn" and "tflops" in r}
    md = [f"# Gluon v3 forward — {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"cuDNN {meta['cudnn']}, commit {meta['commit']}", "",
          f"Correctness: {n_ok}/{len(checks)} cases pass flash-attn's rule"
          f"{'' if complete else ' (the time budget cut the grid)'}.", "",
          "TFLOP/s (4·B·H·S²·D, half under causal); B = 16384 / S, H = 2048 / D; ratio to SDPA-cuDNN in brackets.", "",
          "| impl | " + " | ".join(f"d{d} {s // 1024}k{' c' if c else ''}" for d, s, c in keys) + " |",
          "|---|" + "---|" * len(keys)]
    for label in dict.fromkeys(r["impl"] for r in rows):
        cells = []
        for key in keys:
            hit = [r for r in rows if (r["D"], r["S"], r["causal"]) == key and r["impl"] == label]
            if hit and "tflops" in hit[0]:
                t = hit[0]["tflops"]
                cells.append(f"{t:.0f} ({t / cudnn[key]:.2f})" if key in cudnn else f"{t:.0f}")
            else:
                cells.append("err" if hit else "–")
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "sweep_gluon.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    save()
    print("\n".join(md))
    print(f"total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
