"""Sweep of the split-KV decode kernel's launch parameters (kernels/decode.py TUNE) on one GPU, timed
from a CUDA graph (GPU time) beside SDPA-cuDNN and SDPA-flash in the same process: one query token,
GQA 32/8, d128, bf16, batch 1 and 8, cache 32k (and 4k, 128k for the default and the best).

    python benchmarks/sweep_decode.py --out DIR     # writes sweep_decode.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hf_flashattn as fa  # noqa: E402
from hf_flashattn.kernels import decode  # noqa: E402


def graph_ms(f):
    f()
    return triton.testing.do_bench_cudagraph(f, rep=50, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    H, Hk, D = 32, 8, 128
    default = dict(decode.TUNE)
    rows = []

    def case(B, L, tune=None):
        q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16)
        kc = torch.randn(B, L, Hk, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        gb = 2 * B * L * Hk * D * 2 / 1e9
        out = dict(B=B, L=L)
        if tune is None:
            qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
            for name, be in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
                def run(be=be):
                    with sdpa_kernel(be):
                        return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
                out[name] = graph_ms(run)
        else:
            decode.set_tune(**tune)
            try:
                out.update(tune, ms=graph_ms(lambda: fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=L)))
                out["tb_s"] = gb / out["ms"]
            except Exception as e:
                out.update(tune, error=f"{type(e).__name__}: {str(e)[:100]}")
            finally:
                decode.set_tune(**default)
        print(json.dumps(out), flush=True)
        rows.append(out)
        return out

    for B in (1, 8):
        case(B, 32768)
        # the waves of the two-wave rule (one_wave off: with it on, batch 1 and 8 take one program an SM whatever
        # `waves` says)
        for bn, w, st, wv in itertools.product((64, 128), (4, 8), (2, 3, 4), (1, 2, 4)):
            case(B, 32768, dict(block_n=bn, num_warps=w, num_stages=st, waves=wv, one_wave=False))
    best = {}
    for B in (1, 8):
        ok = [r for r in rows if r["B"] == B and "ms" in r]
        best[B] = min(ok, key=lambda r: r["ms"])
        for L in (4096, 131072):
            case(B, L)
            case(B, L, {k: best[B].get(k, default[k]) for k in default})
            case(B, L, default)
    with open(os.path.join(args.out, "sweep_decode.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       commit=os.environ.get("COMMIT"), default=default, rows=rows,
                       best={str(b): r for b, r in best.items()}), f, indent=1)


if __name__ == "__main__":
    main()
