"""Plain-PyTorch attention: the specification every kernel is tested against.

Implements every argument of the public API (`flash_attn_func` / `flash_attn_varlen_func`) with
flash-attn's conventions, written for clarity rather than speed:

    S = softmax_scale · Q Kᵀ                         (B, H, Sq, Sk)
    S = softcap · tanh(S / softcap)                  if softcap > 0
    S[i, j] = -inf where key j is outside query i's window (below)
    P = softmax(S, dim=-1);  O = P V;  lse = logsumexp(S, dim=-1)

Mask alignment is bottom-right (flash-attn >= 2.1): query i sits at key position i + Sk - Sq, and
key j is visible from query i iff  i + Sk - Sq - left <= j <= i + Sk - Sq + right,
where window_size = (left, right), -1 meaning unbounded, and causal=True means right = 0.

A query row that sees no key at all (causal with Sq > Sk, or a narrow window) gets O = 0 and
lse = +inf, as flash-attn returns.

Shapes: q (B, Sq, H, D); k, v (B, Sk, Hk, D) with H a multiple of Hk (GQA/MQA: query head h reads
kv head h // (H // Hk)); out (B, Sq, H, D); lse (B, H, Sq) float32 (float64 when computed in float64).
"""
from __future__ import annotations

import math

import torch


def visible_mask(seqlen_q: int, seqlen_k: int, causal: bool = False, window_size=(-1, -1),
                 device=None) -> torch.Tensor:
    """Bool (seqlen_q, seqlen_k): True where query i may attend to key j (bottom-right aligned)."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    ok = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def attention_ref(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                  compute_dtype=torch.float64):
    """Dense reference. Returns (out, lse); out in q's dtype unless compute_dtype is given, in which
    case out and lse are in compute_dtype. compute_dtype=None computes in the input dtype (the
    "PyTorch low-precision path" whose error sets the tolerance of the kernel tests)."""
    out_dtype = q.dtype if compute_dtype is None else compute_dtype
    cd = q.dtype if compute_dtype is None else compute_dtype
    B, Sq, H, D = q.shape
    Hk = k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    g = H // Hk
    qh = q.to(cd).transpose(1, 2)                                   # (B, H, Sq, D)
    kh = k.to(cd).transpose(1, 2).repeat_interleave(g, dim=1)       # (B, H, Sk, D)
    vh = v.to(cd).transpose(1, 2).repeat_interleave(g, dim=1)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * softmax_scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    ok = visible_mask(Sq, k.shape[1], causal, window_size, device=q.device)
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s.float() if cd in (torch.float16, torch.bfloat16) else s, dim=-1)
    empty = ~ok.any(-1)                                              # rows that see no key
    p = torch.softmax(s, dim=-1).masked_fill(empty[:, None], 0.0)
    out = torch.matmul(p.to(vh.dtype), vh).transpose(1, 2)
    lse = lse.masked_fill(empty, float("inf"))
    return out.to(out_dtype), lse


def attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False,
                         window_size=(-1, -1), softcap=0.0, compute_dtype=torch.float64):
    """Packed reference: q (total_q, H, D), k/v (total_k, Hk, D), cu_seqlens int32 (batch + 1).
    Each sequence is attended independently. Returns out (total_q, H, D) and lse (H, total_q)."""
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        o, l = attention_ref(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                             softmax_scale, causal, window_size, softcap, compute_dtype)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(lses, -1)
