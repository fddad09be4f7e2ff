"""One kernel of interest, launched a few times on realistic sizes, for Nsight Compute:

    ncu --clock-control none --set full -k regex:_fp8_fwd_kernel -s 2 -c 1 -o OUT python3 benchmarks/ncu_target.py fp8
    ncu --clock-control none --set full -k regex:_dkdv_kernel -s 2 -c 1 -o OUT python3 benchmarks/ncu_target.py dkdv

Targets: fp8 (the FP8 forward, d128, 16k, not causal, its default tile), dkdv (v2's dK/dV pass, d64, 16k, causal,
the 1B recipe's head dim, its default tile). device_session.sh's phase `ncu` runs both and writes the
details pages as text.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_FLASHATTN_AUTOTUNE", "0")   # one compile, the default config: what is profiled
import hf_flashattn as fa  # noqa: E402
import hf_flashattn.fp8 as F8  # noqa: E402
from hf_flashattn.kernels import fp8 as K  # noqa: E402


def main(target):
    torch.manual_seed(0)
    if target == "fp8":
        D, S, H = 128, 16384, 16
        q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        (q8, qd), (k8, kd), (v8, vd) = (F8.quantize_fp8(t) for t in (q, k, v))
        for _ in range(4):
            K.forward(q8, k8, v8, qd, kd, vd, D ** -0.5, (-1, -1), 0.0, torch.bfloat16)
    elif target == "dkdv":
        D, S, H = 64, 16384, 32
        q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        for _ in range(4):
            out = fa.flash_attn_func(q, k, v, causal=True, version="v2")
            torch.autograd.grad(out, (q, k, v), do)
    else:
        raise SystemExit(f"unknown target {target!r}: fp8 or dkdv")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1])
