"""flash-attn's error rule for one forward, as the probes check it: the output's largest error against a float32
reference at most twice that of PyTorch's own low-precision path plus a rounding floor, lse within 1e-2."""
from __future__ import annotations

import torch

FLOOR = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def forward_rule(out, lse, q, k, v, **kw) -> dict:
    """err, torch_err (the low-precision path's error), lse_err and ok for a forward's (out, lse) of dense q, k, v;
    kw: attention_ref's arguments (causal, window_size, ...)."""
    from hf_flashattn.reference import attention_ref
    ref, ref_lse = attention_ref(q, k, v, compute_dtype=torch.float32, **kw)
    low, _ = attention_ref(q, k, v, compute_dtype=q.dtype, **kw)
    err = (out.float() - ref).abs().max().item()
    base = (low.float() - ref).abs().max().item()
    lse_err = (lse - ref_lse).abs().max().item()
    return dict(err=err, torch_err=base, lse_err=lse_err, ok=err <= 2 * base + FLOOR[q.dtype] and lse_err < 1e-2)
