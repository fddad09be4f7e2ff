"""The Gluon v3 backward (hf_flashattn/kernels/v3_gluon_bwd.py) on one GPU: correctness first, then its speed beside
v2's backward (the one it replaces), SDPA-cuDNN, SDPA-flash and FlexAttention, measured in the same process.

    python benchmarks/sweep_gluon_bwd.py --out DIR [--dims 128,64] [--seqlens 1024,4096,16384] [--budget-s 400]

Correctness: through flash_attn_func(version="v3") (forward, then the Gluon backward) with gpu_check.py's rule:
|x - ref32| <= 2x (out) or 3x (dq, dk, dv) |torch's own low-precision x - ref32| + floor; bf16 and fp16; shapes
113 x 203 GQA, q_len != k_len both ways, q_len 1, MQA, keys no query sees (the kernel's early exit), causal / not /
windows. Speed: TFLOP/s with 4·B·H·S²·D per forward (half under causal), 2.5x that for the backward, 3.5x for
forward+backward; B = 16384 / S, H = 2048 / D (GQA 32/8 at d128 where --gqa). Rows: fwd+bwd of each
implementation; the backward alone of ours (Gluon, Gluon without dQ: a diagnostic of what the atomics cost, v2).
Writes sweep_gluon_bwd.json and sweep_gluon_bwd.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim)
SHAPES = [(2, 113, 203, 8, 2, 128), (2, 203, 113, 8, 8, 64), (1, 1, 2048, 32, 8, 128), (1, 1023, 1024, 4, 4, 64),
          (1, 1024, 1023, 8, 1, 128), (1, 777, 4500, 8, 2, 128), (2, 333, 333, 32, 8, 64),
          (1, 100, 700, 4, 4, 128), (2, 64, 450, 4, 1, 64),   # keys that no query sees under windows / causal
          (2, 113, 203, 8, 2, 256), (1, 1023, 1024, 4, 1, 256), (1, 100, 700, 4, 4, 256)]
# packed (gpu_check: B sequences of Sq, Sq - 37, ... tokens, q_len = k_len)
VARLEN_SHAPES = [(3, 300, 300, 8, 2, 128), (3, 200, 200, 4, 4, 64), (2, 1100, 1100, 8, 1, 128),
                 (2, 300, 300, 4, 4, 256)]
MASKS = [dict(causal=False), dict(causal=True), dict(window_size=(128, 0)), dict(window_size=(64, 32))]
# (label, plan, dQ mode, dQ pass plan) beside the default plans: v3_gluon_bwd._PLANS' and _DQ_PLANS' fields; dQ mode
# 4 (backward's _dq, a timing diagnostic: dq garbage) skips dQ
VARIANTS = {128: [("gluon bwd, two passes", (64, 2, 240, 2, True, 0), None, None),
                  ("gluon bwd, single pass, shared dQ, TMA reduce", (64, 2, 240, 2, True, 5), None, None),
                  ("gluon bwd, single pass, shared dQ, TMA reduce, 2 buffers", (64, 2, 240, 2, True, 6), None, None),
                  ("gluon bwd, dK/dV only (diagnostic)", (64, 2, 240, 2, True, 0), 4, None)],
            64: [("gluon bwd, two passes", (64, 2, 240, 2, False, 0), None, None),
                 ("gluon bwd, single pass, shared dQ in turn, TMA reduce, 2 buffers", (64, 2, 240, 2, True, 6), None,
                  None),
                 ("gluon bwd, single pass, TMA reduce, 2 buffers", (64, 2, 240, 2, False, 6), None, None),
                 ("gluon bwd, dK/dV only (diagnostic)", (64, 2, 240, 2, False, 0), 4, None)]}


def check(dtypes, t0, budget):
    """gpu_check's cases (`run_cases`) over every shape, mask and dtype until the budget ends: (rows, complete)."""
    import gpu_check
    cases = [(dtype, shape, kw, varlen) for dtype in dtypes
             for shape, varlen in [(shape, False) for shape in SHAPES] + [(shape, True) for shape in VARLEN_SHAPES]
             for kw in MASKS]
    rows = gpu_check.run_cases(cases, t0 + budget)
    return rows, len(rows) == len(cases)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--dims", default="128,64,256")
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--gqa", action="store_true", help="d128 with 32 query heads on 8 kv heads")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--check-budget-s", type=float, default=None, help="default: 0.3 x --budget-s")
    ap.add_argument("--plan", action="append", default=[],
                    help="D=bm,stages,regs,nc,shared,mode: replaces v3_gluon_bwd._PLANS[D] for the whole run (the "
                         "correctness grid, flash_attn_func's rows and 'gluon bwd')")
    args = ap.parse_args()
    os.environ["HF_FLASHATTN_AUTOTUNE"] = "0"
    t0 = time.time()
    import torch.nn.functional as Fn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import hf_flashattn as fa
    from hf_flashattn.kernels import v2, v3
    from hf_flashattn.kernels import v3_gluon_bwd as GB
    for spec in args.plan:
        d, fields = spec.split("=")
        f = [int(x) for x in fields.split(",")]
        GB._PLANS[int(d)] = (f[0], f[1], f[2], f[3], bool(f[4]), f[5])
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cudnn=torch.backends.cudnn.version(), commit=os.environ.get("COMMIT", "unknown"),
                date=time.strftime("%Y-%m-%d"), plans={str(k): v for k, v in GB._PLANS.items()})
    checks, complete = check((torch.bfloat16, torch.float16), t0,
                             args.check_budget_s if args.check_budget_s is not None else args.budget_s * 0.3)
    n_ok = sum(r["ok"] for r in checks)
    print(f"correctness: {n_ok}/{len(checks)} pass{'' if complete else ' (budget cut the grid)'} "
          f"in {time.time() - t0:.0f}s", flush=True)
    rows = []

    def save():
        with open(os.path.join(args.out, "sweep_gluon_bwd.json"), "w") as f:
            json.dump(dict(meta=meta, checks=checks, check_complete=complete, rows=rows), f, indent=1)

    save()
    flex = None
    if not args.no_flex:
        import bench
        flex, create_block_mask = bench._flex()
    dims = [int(d) for d in args.dims.split(",")]
    for D in dims:
        for S in (int(s) for s in args.seqlens.split(",")):
            for causal in (False, True):
                if time.time() - t0 > args.budget_s:
                    print("time budget reached: skipped", D, S, causal, flush=True)
                    continue
                H, B = 2048 // D, max(1, 16384 // S)
                Hk = 8 if (args.gqa and D == 128) else H
                if args.gqa and D == 128:
                    H = 32
                mk = lambda h: torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16)  # noqa: E731
                q, k, v = mk(H), mk(Hk), mk(Hk)
                do = torch.randn_like(q)
                fl = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
                base = dict(D=D, S=S, B=B, H=H, Hk=Hk, causal=causal)
                win = (-1, 0) if causal else (-1, -1)

                def timed(impl, mode, fn, **extra):
                    try:
                        ms = triton.testing.do_bench(fn, return_mode="median")
                        mult = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
                        r = dict(base, impl=impl, mode=mode, ms=ms, tflops=mult * fl / ms / 1e9, **extra)
                    except Exception as e:  # noqa: BLE001
                        r = dict(base, impl=impl, mode=mode, error=f"{type(e).__name__}: {str(e)[:200]}", **extra)
                    rows.append(r)
                    print(json.dumps(r), flush=True)

                qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
                qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
                dot = do.transpose(1, 2)

                def fb(fn, leaves, grad):
                    def run():
                        for x in leaves:
                            x.grad = None
                        fn().backward(grad)
                    return run

                for impl, be in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
                    def sd(be=be):
                        with sdpa_kernel(be):
                            return Fn.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=H != Hk)
                    timed(impl, "fwd", sd)
                    timed(impl, "fwd+bwd", fb(sd, (qt, kt, vt), dot))
                if flex is not None and S <= 16384:
                    bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S) if causal else None
                    timed("flex", "fwd+bwd", fb(lambda: flex(qt, kt, vt, block_mask=bm, enable_gqa=H != Hk),
                                                (qt, kt, vt), dot))
                ours = lambda: fa.flash_attn_func(qg, kg, vg, causal=causal, version="v3")  # noqa: E731
                timed("ours-v3", "fwd", lambda: fa.flash_attn_func(q, k, v, causal=causal, version="v3"))
                os.environ["HF_FLASHATTN_V3_GLUON_BWD"] = "auto"
                timed("ours-v3 (gluon bwd)", "fwd+bwd", fb(ours, (qg, kg, vg), do))
                os.environ["HF_FLASHATTN_V3_GLUON_BWD"] = "0"
                timed("ours-v3 (v2 bwd)", "fwd+bwd", fb(ours, (qg, kg, vg), do))
                os.environ["HF_FLASHATTN_V3_GLUON_BWD"] = "auto"
                out, lse = v3.forward(q, k, v, None, None, S, S, D ** -0.5, win, 0.0)
                args_b = (do, q, k, v, out, lse, None, None, S, S, D ** -0.5, win)
                ref = v2.backward(do, q, k, v, out, lse, None, None, S, S, D ** -0.5, win, 0.0, True)

                def rel(got, ref):
                    return [((g.float() - r.float()).abs().max() / r.float().abs().max()).item() for g, r in zip(got, ref)]
                timed("gluon bwd", "bwd", lambda: GB.backward(*args_b), rel_diff_vs_v2=rel(GB.backward(*args_b), ref))
                for label, p_, dq_, dqp in VARIANTS.get(D, []):
                    fn = (lambda p_=p_, dq_=dq_, dqp=dqp: GB.backward(*args_b, _plan=p_, _dq=dq_, _dq_plan=dqp))
                    diff = rel(fn(), ref) if dq_ is None else None
                    timed(label, "bwd", fn, plan=p_, rel_diff_vs_v2=diff)
                timed("v2 bwd", "bwd", lambda: v2.backward(do, q, k, v, out, lse, None, None, S, S, D ** -0.5, win,
                                                           0.0, False))
                save()
                del q, k, v, do, qg, kg, vg, qt, kt, vt, dot, out, lse, ref
                torch.cuda.empty_cache()
    keys = sorted({(r["D"], r["S"], r["causal"], r["Hk"]) for r in rows})
    cud = {(r["D"], r["S"], r["causal"], r["Hk"], r["mode"]): r["tflops"] for r in rows
           if r["impl"] == "sdpa-cudnn" and "tflops" in r}
    for (d, s, c, hk) in keys:   # cuDNN's backward alone: its fwd+bwd time less its fwd time
        f = [r for r in rows if (r["D"], r["S"], r["causal"], r["Hk"]) == (d, s, c, hk)
                  and r["impl"] == "sdpa-cudnn" and "ms" in r]
        t = {r["mode"]: r for r in f}
        if "fwd" in t and "fwd+bwd" in t:
            ms = t["fwd+bwd"]["ms"] - t["fwd"]["ms"]
            cud[(d, s, c, hk, "bwd")] = t["fwd"]["tflops"] * t["fwd"]["ms"] * 2.5 / ms
    md = [f"# Gluon v3 backward — {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"cuDNN {meta['cudnn']}, commit {meta['commit']}", "",
          f"Correctness: {n_ok}/{len(checks)} cases pass gpu_check's rule"
          f"{'' if complete else ' (the time budget cut the grid)'}.", "",
          "TFLOP/s (forward 4·B·H·S²·D, half under causal; backward 2.5x, fwd+bwd 3.5x); B = 16384 / S, H = 2048 / D "
          "(H/Hk shown); ratio to SDPA-cuDNN's same mode in brackets (cuDNN's backward alone = its fwd+bwd time less "
          "its fwd time).", "",
          "| impl | mode | " + " | ".join(f"d{d} {s // 1024}k{' c' if c else ''}" + (f" {32}/{hk}" if hk != 2048 // d
                                                                                     else "")
                                         for d, s, c, hk in keys) + " |",
          "|---|---|" + "---|" * len(keys)]
    for label, mode in dict.fromkeys((r["impl"], r["mode"]) for r in rows):
        cells = []
        for key in keys:
            hit = [r for r in rows if (r["D"], r["S"], r["causal"], r["Hk"]) == key and r["impl"] == label
                   and r["mode"] == mode]
            if hit and "tflops" in hit[0]:
                t = hit[0]["tflops"]
                c = cud.get(key + (mode,))
                cells.append(f"{t:.0f} ({t / c:.2f})" if c else f"{t:.0f}")
            else:
                cells.append("err" if hit else "–")
        md.append(f"| {label} | {mode} | " + " | ".join(cells) + " |")
    md.append("")
    md.append("cuDNN backward alone (derived): " + ", ".join(
        f"d{d} {s // 1024}k{' c' if c else ''}: {cud[(d, s, c, hk, 'bwd')]:.0f}" for d, s, c, hk in keys
        if (d, s, c, hk, "bwd") in cud))
    with open(os.path.join(args.out, "sweep_gluon_bwd.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    save()
    print("\n".join(md))
    print(f"total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
