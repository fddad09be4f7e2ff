"""The Gluon forward at head dim 64 with part of the softmax's exponentials on the FMA units (v3_gluon._exp2:
EXP2_POLY 4 = one in four by a degree-4 polynomial through inline PTX, 2 = the odd columns by the polynomial in Gluon;
unmasked key blocks only), against the MUFU's exponential alone (0), in one process:

1. correctness: fwd+bwd through flash_attn_func with the Gluon forward forced (HF_FLASHATTN_V3_GLUON=1), each
   variant, flash-attn's rule against a float32 reference (gpu_check.run_case), d64 shapes, bf16 and fp16, unmasked,
   causal and a window;
2. speed: the forward alone (v3_gluon.forward, do_bench median, L2 flushed), d64, 1k/4k/16k keys, causal or not,
   B = 16384 / S, H = 32, each variant, beside v3's default route (v3.forward) and SDPA-cuDNN.

    python benchmarks/probe_exp2_poly.py --out DIR     (writes probe_exp2_poly.json, .md)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["HF_FLASHATTN_V3_GLUON"] = "1"
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check import run_cases  # noqa: E402
from hf_flashattn.kernels import v3, v3_gluon as G  # noqa: E402

VARIANTS = (0, 4, 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=240)
    args = ap.parse_args()
    t0 = time.time()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cudnn=torch.backends.cudnn.version(), commit=os.environ.get("COMMIT", "unknown"),
                date=time.strftime("%Y-%m-%d"))
    checks = []
    shapes = [(2, 113, 203, 8, 2, 64), (1, 1023, 1024, 4, 4, 64), (2, 333, 333, 32, 8, 64), (1, 4096, 4096, 4, 2, 64)]
    masks = [dict(causal=False), dict(causal=True), dict(window_size=(300, 0))]
    for poly in VARIANTS[1:]:
        G.EXP2_POLY[64] = poly
        cases = [(dt, sh, kw, False) for dt in (torch.bfloat16, torch.float16) for sh in shapes for kw in masks]
        for r in run_cases(cases, t0 + args.budget_s * 0.4):
            checks.append(dict(r, exp2_poly=poly))
    G.EXP2_POLY.pop(64, None)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    for S in (1024, 4096, 16384):
        B, H, D = 16384 // S, 32, 64
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        for causal in (False, True):
            if time.time() - t0 > args.budget_s:
                break
            win = (-1, 0) if causal else (-1, -1)
            fl = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
            r = dict(S=S, B=B, H=H, D=D, causal=causal)

            def timed(f):
                f()
                return triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")

            def cud():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            with torch.no_grad():
                r["cudnn"] = fl / timed(cud) / 1e9
                os.environ["HF_FLASHATTN_V3_GLUON"] = "auto"
                r["v3-default"] = fl / timed(lambda: v3.forward(q, k, v, None, None, S, S, D ** -0.5, win, 0.0)) / 1e9
                os.environ["HF_FLASHATTN_V3_GLUON"] = "1"
                for poly in VARIANTS:
                    G.EXP2_POLY[64] = poly
                    r[f"gluon-poly{poly}"] = fl / timed(lambda: G.forward(q, k, v, S, S, D ** -0.5, win)) / 1e9
                G.EXP2_POLY.pop(64, None)
            rows.append(r)
            print(json.dumps(r), flush=True)
        del q, k, v, qt, kt, vt
    with open(os.path.join(args.out, "probe_exp2_poly.json"), "w") as fh:
        json.dump(dict(meta=meta, checks=checks, rows=rows), fh, indent=1)
    n_ok = sum(c["ok"] for c in checks)
    md = [f"# Gluon forward, d64: exponentials partly on the FMA units — {meta['gpu']}", "",
          f"date {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"cuDNN {meta['cudnn']}, bf16", "", f"Correctness (flash-attn's rule, Gluon forward forced): {n_ok}/{len(checks)} "
          "pass", "", "Forward TFLOP/s (ratio to cuDNN); poly0 = MUFU only, poly4 = one in four by the polynomial "
          "(inline PTX), poly2 = every other column by the polynomial (Gluon)", "",
          "| S | causal | cuDNN | v3 default | gluon poly0 | gluon poly4 | gluon poly2 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]:.0f} ({r[k] / r['cudnn']:.2f})" for k in ("v3-default", "gluon-poly0", "gluon-poly4",
                                                                     "gluon-poly2")]
        md.append(f"| {r['S']} | {r['causal']} | {r['cudnn']:.0f} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "probe_exp2_poly.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
