"""The Gluon v3 forward on packed sequences, and where it should run at head dim 64 under a causal mask (the recipe's
case: one 32k document as a packed call).

1. check: flash_attn_varlen_func(version="v3") with HF_FLASHATTN_V3_GLUON=1 (the Gluon forward for every input in its
   scope), packed shapes of gpu_check (sequences of Sq, Sq - 37, ... tokens) and dense d64 causal ones, bf16 and fp16,
   causal / not / windows, against the float32 reference with gpu_check's rule;
2. time: d64, 32 query heads on 8 KV heads, causal, 8k/16k/32k tokens as one dense sequence, one packed sequence and
   four packed documents: forward and fwd+bwd with the Gluon forward (HF_FLASHATTN_V3_GLUON=1) and with v3.py's
   Triton kernel (=0) beside SDPA-cuDNN (dense, one sequence of the same length).

    python benchmarks/probe_packed_fwd.py --out DIR      (writes probe_packed_fwd.json and .md)
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
from hf_flashattn.kernels import v3  # noqa: E402

VARLEN_SHAPES = [(3, 300, 300, 8, 2, 128), (3, 200, 200, 4, 4, 64), (2, 1100, 1100, 8, 1, 128),
                 (2, 300, 300, 4, 4, 256), (5, 150, 150, 8, 2, 64), (2, 2100, 2100, 4, 1, 64)]
DENSE_SHAPES = [(2, 113, 203, 8, 2, 64), (1, 1023, 1024, 4, 4, 64), (1, 777, 4500, 8, 2, 64)]
MASKS = [dict(causal=False), dict(causal=True), dict(window_size=(128, 0)), dict(window_size=(64, 32))]


def check(t_end):
    import gpu_check
    os.environ["HF_FLASHATTN_V3_GLUON"] = "1"
    shapes = [(s, True) for s in VARLEN_SHAPES] + [(s, False) for s in DENSE_SHAPES]
    return gpu_check.run_cases([(dtype, shape, kw, varlen) for dtype in (torch.bfloat16, torch.float16)
                                for shape, varlen in shapes for kw in MASKS], t_end)


def timing(t_end):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    H, Hk, D = 32, 8, 64
    for S in (8192, 16384, 32768):
        for layout in ("dense", "packed-1", "packed-4"):
            if time.time() > t_end:
                return rows
            shp = (lambda h: (1, S, h, D)) if layout == "dense" else (lambda h: (S, h, D))
            q, k, v, do = (torch.randn(shp(h), device="cuda", dtype=torch.bfloat16, requires_grad=i < 3)
                           for i, h in enumerate((H, Hk, Hk, H)))
            docs = 1 if layout != "packed-4" else 4
            cu = torch.arange(docs + 1, device="cuda", dtype=torch.int32) * (S // docs)
            fl = 4 * H * D * (S // docs) ** 2 * docs * 0.5

            def call():
                if layout == "dense":
                    return fa.flash_attn_func(q, k, v, causal=True, version="v3")
                return fa.flash_attn_varlen_func(q, k, v, cu, cu, S // docs, S // docs, causal=True, version="v3")
            r = dict(S=S, layout=layout, H=H, Hk=Hk, D=D)
            for name, env in (("gluon", "1"), ("triton", "0")):
                os.environ["HF_FLASHATTN_V3_GLUON"] = env
                with torch.no_grad():
                    ms = triton.testing.do_bench(call, warmup=10, rep=60, return_mode="median")
                r[f"{name}_fwd"] = round(fl / ms / 1e9, 1)
                ms = triton.testing.do_bench(lambda: torch.autograd.grad(call(), (q, k, v), do), warmup=10, rep=60,
                                             return_mode="median")
                r[f"{name}_fwd_bwd"] = round(3.5 * fl / ms / 1e9, 1)
            if docs == 1:
                qt, kt, vt, dot = (x.detach().reshape(1, S, -1, D).transpose(1, 2).requires_grad_(i < 3)
                                   for i, x in enumerate((q, k, v, do)))

                def cudnn():
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
                with torch.no_grad():
                    ms = triton.testing.do_bench(cudnn, warmup=10, rep=60, return_mode="median")
                r["cudnn_fwd"] = round(fl / ms / 1e9, 1)
                ms = triton.testing.do_bench(lambda: torch.autograd.grad(cudnn(), (qt, kt, vt), dot), warmup=10,
                                             rep=60, return_mode="median")
                r["cudnn_fwd_bwd"] = round(3.5 * fl / ms / 1e9, 1)
            rows.append(r)
            print(json.dumps(r), flush=True)
    os.environ["HF_FLASHATTN_V3_GLUON"] = "auto"
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=240)
    args = ap.parse_args()
    t0 = time.time()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cudnn=torch.backends.cudnn.version(), commit=os.environ.get("COMMIT", "unknown"),
                date=time.strftime("%Y-%m-%d"))
    # the packed call must reach the Gluon forward when forced (its scope now includes packed sequences)
    x = torch.zeros(64, 2, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 64], device="cuda", dtype=torch.int32)
    os.environ["HF_FLASHATTN_V3_GLUON"] = "1"
    meta["packed_routes_to_gluon"] = v3._route(x, x, x, cu, 64, 0.125, (-1, 0), 0.0)[1] is not None
    checks = check(t0 + 0.55 * args.budget_s)
    times = timing(t0 + args.budget_s)
    out = dict(meta=meta, check=checks, timing=times)
    with open(os.path.join(args.out, "probe_packed_fwd.json"), "w") as f:
        json.dump(out, f, indent=1)
    n_ok = sum(r["ok"] for r in checks)
    lines = [f"# Gluon v3 forward on packed sequences; d64 causal placement — {meta['gpu']}", "",
             f"date {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"cuDNN {meta['cudnn']}", "",
             f"Check (HF_FLASHATTN_V3_GLUON=1, packed routed to Gluon: {meta['packed_routes_to_gluon']}): "
             f"{n_ok}/{len(checks)} pass (gpu_check's rule: out 2x, grads 3x torch's low-precision error + floor)", "",
             "TFLOP/s, bf16, d64, 32/8 heads, causal (packed-4: four documents of S/4)", "",
             "| S | layout | Gluon fwd | Triton fwd | cuDNN fwd | Gluon f+b | Triton f+b | cuDNN f+b | Gluon/Triton fwd | "
             "Gluon/cuDNN fwd |", "|" + "---|" * 10]
    for r in times:
        c = r.get("cudnn_fwd")
        lines.append(f"| {r['S']} | {r['layout']} | {r['gluon_fwd']} | {r['triton_fwd']} | {c or '–'} | "
                     f"{r['gluon_fwd_bwd']} | {r['triton_fwd_bwd']} | {r.get('cudnn_fwd_bwd') or '–'} | "
                     f"{r['gluon_fwd'] / r['triton_fwd']:.3f} | {(r['gluon_fwd'] / c) if c else float('nan'):.3f} |")
    with open(os.path.join(args.out, "probe_packed_fwd.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
