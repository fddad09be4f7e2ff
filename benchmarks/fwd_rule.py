"""flash-attn's error rule for one forward, as the probes check it: the output's largest error against a float32
reference at most twice that of PyTorch's own low-precision path plus a rounding floor, lse within 1e-2."""
from __future__ import annotations

import functools

import torch

FLOOR = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def forward_rule(out, lse, q, k, v, **kw) -> dict:
    """err, torch_err (the low-precision path's error), lse_err and ok for a forward's (out, lse) of dense q, k, v,
    or packed ones when kw has cu_seqlens_q and cu_seqlens_k (lse then (H, total)); kw: attention_ref's arguments
    (causal, window_size, ...)."""
    from hf_flashattn.reference import attention_ref, attention_varlen_ref
    if "cu_seqlens_q" in kw:
        ref_fn = functools.partial(attention_varlen_ref, cu_seqlens_q=kw.pop("cu_seqlens_q"),
                                   cu_seqlens_k=kw.pop("cu_seqlens_k"))
    else:
        ref_fn = attention_ref
    ref, ref_lse = ref_fn(q, k, v, compute_dtype=torch.float32, **kw)
    low, _ = ref_fn(q, k, v, compute_dtype=q.dtype, **kw)
    err = (out.float() - ref).abs().max().item()
    base = (low.float() - ref).abs().max().item()
    lse_err = (lse - ref_lse).abs().max().item()
    return dict(err=err, torch_err=base, lse_err=lse_err, ok=err <= 2 * base + FLOOR[q.dtype] and lse_err < 1e-2)
