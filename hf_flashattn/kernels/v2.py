"""TEMPORARY placeholder backed by reference.py (replaced by the Triton v2 kernels)."""
import torch
from ..reference import attention_ref, attention_varlen_ref


def _ref(q, k, v, cu_q, cu_k, scale, window, softcap):
    if cu_q is None:
        return attention_ref(q, k, v, scale, False, window, softcap, compute_dtype=torch.float32)
    return attention_varlen_ref(q, k, v, cu_q, cu_k, scale, False, window, softcap, compute_dtype=torch.float32)


def forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, window, softcap):
    out, lse = _ref(q, k, v, cu_q, cu_k, scale, window, softcap)
    return out.to(q.dtype), lse.float()


def backward(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, window, softcap, deterministic):
    with torch.enable_grad():
        q_, k_, v_ = (t.detach().float().requires_grad_() for t in (q, k, v))
        o, _ = _ref(q_, k_, v_, cu_q, cu_k, scale, window, softcap)
        dq, dk, dv = torch.autograd.grad(o, (q_, k_, v_), do.float())
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
