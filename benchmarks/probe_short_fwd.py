"""Short-sequence forward on one GPU: is a point host-bound? For each (head dim, causal) at 1k-2k tokens: the host
time a call (launches queued, no sync) beside the time a call with the GPU in the loop (do_bench), through
flash_attn_func(version="v3") and each v3 kernel directly, and SDPA-cuDNN. A call is host-bound when its host time
reaches its measured time.

    python benchmarks/probe_short_fwd.py --out DIR
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rounds import queued_ms  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    import torch.nn.functional as Fn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import hf_flashattn as fa
    from hf_flashattn.kernels import v3
    rows = []
    for D, S, causal in ((128, 1024, True), (128, 1024, False), (64, 1024, True), (128, 2048, True)):
        H, B = 2048 // D, 16384 // S
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        win = (-1, 0) if causal else (-1, -1)
        fl = 4 * B * H * S * S * D * (0.5 if causal else 1.0)

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return Fn.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        impls = {"sdpa-cudnn": cudnn,
                 "flash_attn_func v3": lambda: fa.flash_attn_func(q, k, v, causal=causal, version="v3"),
                 "v3.forward (auto plan)": lambda: v3.forward(q, k, v, None, None, S, S, D ** -0.5, win, 0.0),
                 "v3.forward Triton 64x64x4x3": lambda: v3.forward(q, k, v, None, None, S, S, D ** -0.5, win, 0.0,
                                                                  _plan=((64, 64, 4, 3), True, False)),
                 "v3.forward Triton 128x128x8x3": lambda: v3.forward(q, k, v, None, None, S, S, D ** -0.5, win, 0.0,
                                                                    _plan=((128, 128, 8, 3), True, False))}
        if D in (64, 128):
            from hf_flashattn.kernels import v3_gluon as G
            impls["v3_gluon.forward"] = lambda: G.forward(q, k, v, S, S, D ** -0.5, win, _plan=G._PLANS[D])
        for name, fn in impls.items():
            try:
                ms = triton.testing.do_bench(fn, return_mode="median")
                loop, h = queued_ms(fn, 200)
                r = dict(D=D, S=S, causal=causal, impl=name, ms=ms, tflops=fl / ms / 1e9, host_ms=h, loop_ms=loop)
            except Exception as e:  # noqa: BLE001
                r = dict(D=D, S=S, causal=causal, impl=name, error=f"{type(e).__name__}: {str(e)[:200]}")
            rows.append(r)
            print(json.dumps(r), flush=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=os.environ.get("COMMIT", "unknown"), date=time.strftime("%Y-%m-%d"))
    with open(os.path.join(args.out, "probe_short_fwd.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
