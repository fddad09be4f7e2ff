"""GQA 32/8, d128, 32k, causal fwd+bwd timed the two ways the benchmarks time it, in one process (NOTES, twelfth
session, item 3: 0.89-0.91x cuDNN in every bench.py process, 0.99x in sweep_gluon_bwd.py's):

- "grad": bench.py's way: leaves made by torch.randn(requires_grad=True), torch.autograd.grad(o, (q, k, v), do);
- "backward": sweep_gluon_bwd.py's way: leaves cloned from plain tensors, .grad reset, o.backward(do);
- bench.py's way with deterministic=True (dQ in a pass of its own: no float32 accumulator, no TMA reduce);
- the backward alone (v3.backward) and the forward alone;
- SDPA-cuDNN with (B, H, S, D) contiguous inputs (bench.py) and with transposed views of (B, S, H, D) (the sweep);
each measured twice (ABAB order), triton.testing.do_bench median, L2 flushed before each call.

    python benchmarks/probe_gqa_ab.py --out DIR      (writes probe_gqa_ab.json, .md)
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
import hf_flashattn as fa  # noqa: E402
from hf_flashattn.kernels import v3  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--seqlen", type=int, default=32768)
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cudnn=torch.backends.cudnn.version(), commit=os.environ.get("COMMIT", "unknown"),
                date=time.strftime("%Y-%m-%d"))
    B, S, H, Hk, D = 1, args.seqlen, 32, 8, 128
    fl = 4 * B * H * S * S * D * 0.5
    torch.manual_seed(0)
    # bench.py's tensors
    q = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, S, Hk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, S, Hk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    # the sweep's
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    qc, kc, vc = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    doc = do.transpose(1, 2).contiguous()
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    dot = do.transpose(1, 2)
    with torch.no_grad():
        out, lse = v3.forward(q, k, v, None, None, S, S, D ** -0.5, (-1, 0), 0.0)

    def grad_way():
        o = fa.flash_attn_func(q, k, v, causal=True, version="v3")
        torch.autograd.grad(o, (q, k, v), do)

    def grad_two_passes():
        o = fa.flash_attn_func(q, k, v, causal=True, deterministic=True, version="v3")
        torch.autograd.grad(o, (q, k, v), do)

    def backward_way():
        for x in (qg, kg, vg):
            x.grad = None
        fa.flash_attn_func(qg, kg, vg, causal=True, version="v3").backward(do)

    def bwd_alone():
        v3.backward(do, q, k, v, out, lse, None, None, S, S, D ** -0.5, (-1, 0), 0.0, False)

    def fwd_alone():
        with torch.no_grad():
            fa.flash_attn_func(q, k, v, causal=True, version="v3")

    def cudnn(qq, kk, vv, g):
        def f():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
            torch.autograd.grad(o, (qq, kk, vv), g)
        return f
    ways = {"ours fwd+bwd, autograd.grad (bench.py)": (grad_way, 3.5),
            "ours fwd+bwd, .backward (sweep)": (backward_way, 3.5),
            "ours fwd+bwd, autograd.grad, two passes (deterministic=True)": (grad_two_passes, 3.5),
            "ours bwd alone (v3.backward)": (bwd_alone, 2.5),
            "ours fwd alone": (fwd_alone, 1.0),
            "cuDNN fwd+bwd, (B,H,S,D) contiguous (bench.py)": (cudnn(qc, kc, vc, doc), 3.5),
            "cuDNN fwd+bwd, transposed views (sweep)": (cudnn(qt, kt, vt, dot), 3.5)}
    rows = []
    for rnd in (1, 2):
        for name, (f, mult) in ways.items():
            f()
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
            rows.append(dict(way=name, round=rnd, ms=ms, tflops=mult * fl / ms / 1e9,
                             mem_reserved_gb=torch.cuda.memory_reserved() / 2 ** 30))
            print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "probe_gqa_ab.json"), "w") as fh:
        json.dump(dict(meta=meta, B=B, S=S, H=H, Hk=Hk, D=D, rows=rows), fh, indent=1)
    md = [f"# GQA {H}/{Hk} d{D} {S} causal: two ways of timing fwd+bwd, one process — {meta['gpu']}", "",
          f"date {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"cuDNN {meta['cudnn']}, bf16; do_bench median ms (TFLOP/s), rounds 1 / 2", "",
          "| way | round 1 | round 2 |", "|---|---|---|"]
    for name in ways:
        cells = [next(f"{r['ms']:.2f} ({r['tflops']:.0f})" for r in rows if r["way"] == name and r["round"] == rnd)
                 for rnd in (1, 2)]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "probe_gqa_ab.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
