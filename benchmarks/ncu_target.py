"""One kernel of interest, launched a few times on realistic sizes, for Nsight Compute:

    ncu --clock-control none --set full -k regex:_fp8_fwd_kernel -s 2 -c 1 -o OUT python3 benchmarks/ncu_target.py fp8
    ncu --clock-control none --set full -k regex:_dkdv_kernel -s 2 -c 1 -o OUT python3 benchmarks/ncu_target.py dkdv

Targets: fp8 (the FP8 forward, d128, 16k, not causal, its default tile), dkdv (v2's dK/dV pass, d64, 16k, causal,
the 1B recipe's head dim, its default tile), gluon-fwd (v3's Gluon forward, d128, 4k, B = 4, H = 16, not causal: the
grid's point), cudnn-fwd (SDPA's cuDNN forward on the same inputs, its launches alone inside a profiler range: run ncu
with --profile-from-start off), v2-fwd128 / v2-fwd256c / flash-fwd128 (v2's forward at the grid's d128 512 unmasked
point with the autotuner's pick there, at d256 512 causal, and SDPA-flash at d128 512). device_session.sh's phase
`ncu` runs $NCU_TARGETS (default fp8 dkdv) and writes the details pages as text.
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
    elif target in ("gluon-fwd", "cudnn-fwd"):
        B, S, H, D = 4, 4096, 16, 128
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        if target == "gluon-fwd":
            for _ in range(4):
                fa.flash_attn_func(q, k, v, version="v3")
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)   # set up outside the range
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStart()
                for _ in range(4):
                    torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStop()
    elif target in ("v2-fwd128", "v2-fwd256c", "flash-fwd128"):
        # issue 2's 512-token forwards: d128 unmasked (the autotuner's pick there, 64 x 32 at 168 registers, forced)
        # and d256 causal (its default config is the pick), and SDPA-flash on the d128 point
        D, causal = (256, True) if target == "v2-fwd256c" else (128, False)
        B, S, H = 32, 512, 2048 // D
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        if target == "flash-fwd128":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                for _ in range(4):
                    torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
        else:
            from hf_flashattn.kernels import v2
            if D == 128:
                v2._fwd_launch.force = v2._fwd_config(0, 64, 32, 4, 3, 168)
            for _ in range(4):
                fa.flash_attn_func(q, k, v, causal=causal, version="v2")
    else:
        raise SystemExit(f"unknown target {target!r}: fp8, dkdv, gluon-fwd, cudnn-fwd, v2-fwd128, v2-fwd256c or "
                         "flash-fwd128")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1])
