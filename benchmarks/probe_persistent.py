"""The persistent Gluon v3 forward and backward (one program an SM looping over units of tiles: pairs under a mask,
single tiles without one, v3_gluon._tile) against one program a unit.

1. check: flash_attn_func / flash_attn_varlen_func(version="v3") with HF_FLASHATTN_V3_GLUON=1 (the Gluon forward for
   every input in its scope), persistent, against the float32 reference with gpu_check's rule: dense head dims
   64/128/256 on awkward shapes, GQA 32/8 and MQA, q_len > k_len under a causal mask (tiles that see no key), a 4k
   case with many tiles a program, packed sequences; bf16 and fp16; causal / not / two windows. Each case is also
   run with one program a unit in all three kernels: out, lse, dq, dk and dv must be bitwise equal (the same
   arithmetic a tile; deterministic=True, the two-pass backward: the single pass's dQ sum varies run to run).
2. time (forward, bench.py's grid: 16k tokens, nheads = 2048 / D; GQA 32/8 at 8k): the Gluon kernel persistent
   and one program a unit, v3.py's Triton kernel (HF_FLASHATTN_V3_GLUON=0), SDPA-cuDNN, in one process; then
   forward+backward with the backward's passes persistent and one program a unit, and SDPA-cuDNN's.

    python benchmarks/probe_persistent.py --out DIR [--quick]     (writes probe_persistent.json and .md)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_flashattn as fa  # noqa: E402
from hf_flashattn.kernels import v3_gluon as G, v3_gluon_bwd as GB  # noqa: E402

DENSE = [(2, 113, 203, 8, 2, 64), (2, 113, 203, 8, 2, 128), (2, 113, 203, 8, 2, 256), (1, 1023, 1024, 32, 8, 128),
         (2, 300, 100, 4, 1, 128), (2, 777, 513, 4, 4, 256), (1, 4096, 4096, 16, 16, 128), (2, 2048, 2048, 8, 8, 64)]
VARLEN = [(3, 300, 300, 8, 2, 128), (5, 150, 150, 8, 2, 64), (2, 300, 300, 4, 4, 256), (2, 2100, 2100, 4, 1, 128)]
MASKS = [dict(causal=False), dict(causal=True), dict(window_size=(128, 0)), dict(window_size=(64, 32))]


def _same_both_ways(shape, dtype, kw, varlen):
    """out, lse and the gradients of the Gluon forward and backward persistent and one program a unit: bitwise
    equal? With deterministic=True: the default single-pass backward (d64/d128) sums dQ in an order that varies
    between runs, so the two passes are what can be compared bit for bit."""
    B, Sq, Sk, H, Hk, D = shape
    if varlen:
        lens = [Sq - 37 * i for i in range(B)]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        q = torch.randn(sum(lens), H, D, device="cuda", dtype=dtype, requires_grad=True)
        k, v = (torch.randn(sum(lens), Hk, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        call = lambda: fa.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), return_attn_probs=True,  # noqa
                                                 deterministic=True, version="v3", **kw)
    else:
        q = torch.randn(B, Sq, H, D, device="cuda", dtype=dtype, requires_grad=True)
        k, v = (torch.randn(B, Sk, Hk, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        call = lambda: fa.flash_attn_func(q, k, v, return_attn_probs=True, deterministic=True,  # noqa: E731
                                          version="v3", **kw)
    do = torch.randn(q.shape, device="cuda", dtype=dtype)
    res = []
    for persistent in (True, False):
        G.PERSISTENT = GB.PERSISTENT = persistent
        out, lse, _ = call()
        res.append((out, lse, *torch.autograd.grad(out, (q, k, v), do)))
    G.PERSISTENT = GB.PERSISTENT = True
    return all(torch.equal(a, b) for a, b in zip(*res))


QUICK_DENSE = [(2, 113, 203, 8, 2, 64), (2, 300, 100, 4, 1, 128), (2, 777, 513, 4, 4, 256)]
QUICK_VARLEN = [(3, 300, 300, 8, 2, 128)]
QUICK_MASKS = [dict(causal=False), dict(causal=True), dict(window_size=(64, 32))]
QUICK_POINTS = [(1, 32, 32, 16384, 64), (1, 32, 8, 32768, 128), (4, 32, 32, 4096, 64), (4, 16, 16, 4096, 128)]


def check(t_end, quick=False):
    import gpu_check
    dense, varlen_shapes, masks = (QUICK_DENSE, QUICK_VARLEN, QUICK_MASKS) if quick else (DENSE, VARLEN, MASKS)
    os.environ["HF_FLASHATTN_V3_GLUON"] = "1"
    G.PERSISTENT = True

    def same_as_grid(row, dtype, shape, kw, varlen):
        row["same_as_grid"] = _same_both_ways(shape, dtype, kw, varlen)
        row["ok"] &= row["same_as_grid"]
    return gpu_check.run_cases([(dtype, shape, kw, varlen)
                                for dtype in ((torch.bfloat16,) if quick else (torch.bfloat16, torch.float16))
                                for shape, varlen in [(s, False) for s in dense] + [(s, True) for s in varlen_shapes]
                                for kw in masks], t_end, extra=same_as_grid)


def timing(t_end, quick=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    points = [(16384 // S, 2048 // D, 2048 // D, S, D) for D in (128, 64, 256) for S in (1024, 4096, 16384)]
    points.insert(3, (2, 32, 8, 8192, 128))
    if quick:
        points = QUICK_POINTS
    for B, H, Hk, S, D in points:
        for causal in (False, True):
            if time.time() > t_end:
                return rows
            q = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(B, S, Hk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            fl = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
            r = dict(B=B, H=H, Hk=Hk, S=S, D=D, causal=causal)

            def ours():
                return fa.flash_attn_func(q, k, v, causal=causal, version="v3")

            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=H != Hk)
            for name, env, persistent, fn in (("persistent", "1", True, ours), ("grid", "1", False, ours),
                                              ("triton", "0", True, ours), ("cudnn", "auto", True, cudnn),
                                              ("persistent2", "1", True, ours)):
                os.environ["HF_FLASHATTN_V3_GLUON"] = env
                G.PERSISTENT = persistent
                with torch.no_grad():
                    ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
                r[name] = round(fl / ms / 1e9, 1)
            G.PERSISTENT = True
            os.environ["HF_FLASHATTN_V3_GLUON"] = "auto"
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            qtg, ktg, vtg = (x.transpose(1, 2) for x in (qg, kg, vg))
            do = torch.randn_like(q)

            def ours_fb():
                return torch.autograd.grad(fa.flash_attn_func(qg, kg, vg, causal=causal, version="v3"), (qg, kg, vg),
                                           do)

            def cudnn_fb():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    o = F.scaled_dot_product_attention(qtg, ktg, vtg, is_causal=causal, enable_gqa=H != Hk)
                return torch.autograd.grad(o, (qg, kg, vg), do.transpose(1, 2))
            for name, persistent, fn in (("fb_persistent", True, ours_fb), ("fb_bwd_grid", False, ours_fb),
                                         ("fb_cudnn", True, cudnn_fb), ("fb_persistent2", True, ours_fb)):
                GB.PERSISTENT = persistent
                ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
                r[name] = round(3.5 * fl / ms / 1e9, 1)
            GB.PERSISTENT = True
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--quick", action="store_true", help="a few check cases (bf16) and four timing points")
    args = ap.parse_args()
    t0 = time.time()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cudnn=torch.backends.cudnn.version(), commit=os.environ.get("COMMIT", "unknown"),
                date=time.strftime("%Y-%m-%d"), sms=torch.cuda.get_device_properties(0).multi_processor_count)
    checks = check(t0 + 0.45 * args.budget_s, args.quick)
    times = timing(t0 + args.budget_s, args.quick)
    out = dict(meta=meta, check=checks, timing=times)
    with open(os.path.join(args.out, "probe_persistent.json"), "w") as f:
        json.dump(out, f, indent=1)
    n_ok = sum(r["ok"] for r in checks)
    n_same = sum(bool(r.get("same_as_grid")) for r in checks)
    lines = [f"# Gluon v3 forward and backward: persistent against one program a unit — {meta['gpu']} "
             f"({meta['sms']} SMs)", "",
             f"date {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"cuDNN {meta['cudnn']}", "",
             f"Check (HF_FLASHATTN_V3_GLUON=1, persistent): {n_ok}/{len(checks)} pass (gpu_check's rule: out 2x, "
             f"grads 3x torch's low-precision error + floor; out, lse and grads bitwise equal to one program a unit: "
             f"{n_same}/{len(checks)})", "",
             "Forward TFLOP/s, bf16 (persistent2: the persistent kernel timed again last, the spread of a repeat)", "",
             "| D | S | H/Hk | causal | persistent | grid | v3.py Triton | cuDNN | persistent2 | pers/grid | "
             "pers/cuDNN | grid/cuDNN | Triton/cuDNN |", "|" + "---|" * 13]
    for r in times:
        c = r["cudnn"]
        lines.append(f"| {r['D']} | {r['S']} | {r['H']}/{r['Hk']} | {r['causal']} | {r['persistent']} | {r['grid']} | "
                     f"{r['triton']} | {c} | {r['persistent2']} | {r['persistent'] / r['grid']:.3f} | "
                     f"{r['persistent'] / c:.3f} | {r['grid'] / c:.3f} | {r['triton'] / c:.3f} |")
    lines += ["", "Forward+backward TFLOP/s (3.5x the forward's FLOPs), the forward persistent in both of ours "
              "(fb_persistent2: the persistent run repeated last)", "",
              "| D | S | H/Hk | causal | bwd persistent | bwd one program a unit | cuDNN | persistent2 | pers/unit | "
              "pers/cuDNN |", "|" + "---|" * 10]
    for r in times:
        if "fb_persistent" in r:
            lines.append(f"| {r['D']} | {r['S']} | {r['H']}/{r['Hk']} | {r['causal']} | {r['fb_persistent']} | "
                         f"{r['fb_bwd_grid']} | {r['fb_cudnn']} | {r['fb_persistent2']} | "
                         f"{r['fb_persistent'] / r['fb_bwd_grid']:.3f} | {r['fb_persistent'] / r['fb_cudnn']:.3f} |")
    with open(os.path.join(args.out, "probe_persistent.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
