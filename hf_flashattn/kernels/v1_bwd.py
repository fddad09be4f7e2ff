"""FlashAttention-1 backward (arXiv 2205.14135, Algorithm 4), without dropout.

    D_i = rowsum(dO_i ∘ O_i)                                  (stage 0, per query row)
    for each K/V block j (outer, sequential):                 dK_j = dV_j = 0 in registers
        for each query head of the K/V head's group, for each Q block i that sees block j (inner):
            S_ij = Q_i K_jᵀ · scale  (recomputed),  P_ij = exp(S_ij - lse_i)
            dV_j += P_ijᵀ dO_i
            dP_ij = dO_i V_jᵀ,  dS_ij = P_ij ∘ (dP_ij - D_i)
            dK_j += dS_ijᵀ Q_i · scale
            dQ_i += dS_ij K_j · scale           read-modify-write of an fp32 dQ buffer in HBM
        write dK_j, dV_j

The paper saves m and l; we save their combination lse = m + log l, which is all P needs. Algorithm 4
computes D_i inside the inner loop; it only depends on row i, so stage 0 computes it once per row
into a small fp32 buffer instead of re-reading O_i for every K/V block.

Parallelism and determinism: one program per (K/V head, batch). The program owns every query head of
its group (GQA: heads kvh·GROUP .. kvh·GROUP + GROUP - 1), so dK_j/dV_j sum the contributions of the
whole group in registers (K/V are never repeated), and no other program touches its dQ rows: dQ is
accumulated with plain loads and stores, no atomics, in a fixed order — bitwise reproducible.
Softcap: S = c·tanh(scale·qk / c), so dS/d(qk) = scale·(1 - tanh²), folded into dS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_precision, grad_maker, scores_from_qk, seq_bounds, visible, window_args
from .v1 import (_bhm_strides, _block_d, _bwd_config, _geometry, _lse_strides, _needs_mask, _q_block_range,
                 _score_args)


@triton.jit
def _v1_bwd_update(dk, dv, k, v, m0, n0, q_base, do_base, dqacc_base, lse_base, delta_base,
                   stride_qm, stride_dom, stride_dqm,
                   seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, softcap_log2,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Algorithm 4, lines 16-25, for one (Q block m0, K/V block n0) pair of one query head.
    Returns the updated dK_j, dV_j (unscaled by softmax_scale) and updates dQ_i in HBM."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=tile_ok, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=tile_ok, other=0.0)
    # Rows past seqlen_q get lse = +inf, hence P = 0 and no contribution.
    lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634  # log2(e)
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)

    # -- recompute S_ij (log2 units) and P_ij = exp(S_ij - lse_i) (lines 16-18) --
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s, t = scores_from_qk(qk, qk_scale, softcap_log2, HAS_SOFTCAP)
    if _needs_mask(m0, n0, seqlen_k, diag, window_left, window_right, BLOCK_M, BLOCK_N):
        s = tl.where(visible(offs_m, offs_n, diag, window_left, window_right, seqlen_k), s,
                     float("-inf"))
    p = tl.exp2(s - lse2[:, None])          # masked entries and rows without keys: exp2(-inf) = 0

    # -- dV_j += P_ijᵀ dO_i (line 19) --
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
    # -- dP_ij = dO_i V_jᵀ, dS_ij = P_ij ∘ (dP_ij - D_i) (lines 20-22) --
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    ds = ds.to(q.dtype)
    # -- dK_j += dS_ijᵀ Q_i (line 24) --
    dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
    # -- dQ_i += dS_ij K_j: read, update, write back to HBM (line 23) --
    dq_ptrs = dqacc_base + offs_m[:, None] * stride_dqm + offs_d[None, :]
    dq = tl.load(dq_ptrs, mask=tile_ok, other=0.0)
    dq += tl.dot(ds, k, input_precision=DOT_PRECISION)
    tl.store(dq_ptrs, dq, mask=tile_ok)
    return dk, dv


@triton.jit
def _v1_bwd_kernel(
    Q, K, V, O, DO, LSE, DQ, DK, DV, DQ_ACC, DELTA, CU_SEQLENS_Q, CU_SEQLENS_K,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,     # DQ and DQ_ACC (same shape, both made by us)
    stride_dkb, stride_dkh, stride_dkn,     # DK and DV (same shape, both made by us)
    stride_lb, stride_lh,                   # LSE and DELTA (same shape, unit stride along queries)
    seqlen_q, seqlen_k, window_left, window_right, qk_scale, softcap_log2, softmax_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Grid: (nheads_k, batch). One program computes, for one (batch, K/V head): dK and dV of all
    # its keys, and dQ of the GROUP query heads that read this K/V head. Stage 0 writes
    # D = rowsum(dO ∘ O) for those heads; stage 1 walks the K/V blocks in order (outer loop) and,
    # per query head of the group, the Q blocks that see each K/V block (inner loop), keeping
    # dK_j, dV_j in registers and dQ in an fp32 HBM buffer; stage 2 casts dQ to the output dtype.
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16)      # tl.dot's minimum tile
    pid_kvh = tl.program_id(0)
    pid_b = tl.program_id(1)
    q_start, k_start, seqlen_q, seqlen_k = seq_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, pid_b, seqlen_q, seqlen_k,
                                                      IS_VARLEN)
    diag = seqlen_k - seqlen_q
    b64 = pid_b.to(tl.int64)
    kvh64 = pid_kvh.to(tl.int64)
    h0 = kvh64 * GROUP                      # first query head of the group
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    # -- stage 0: D_i = rowsum(dO_i ∘ O_i) for every query row of the group --
    for g in range(GROUP):
        o_base = O + b64 * stride_ob + (h0 + g) * stride_oh + q_start * stride_om
        do_base = DO + b64 * stride_dob + (h0 + g) * stride_doh + q_start * stride_dom
        delta_base = DELTA + b64 * stride_lb + (h0 + g) * stride_lh + q_start
        for m0 in range(0, seqlen_q, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < seqlen_q
            tile_ok = row_ok[:, None] & d_ok[None, :]
            o = tl.load(o_base + offs_m[:, None] * stride_om + offs_d[None, :], mask=tile_ok, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=tile_ok,
                         other=0.0)
            tl.store(delta_base + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)
    tl.debug_barrier()                      # stage 1 reads D written by other threads

    # -- stage 1: outer loop over K/V blocks (Algorithm 4, line 6). It starts at key 0 even when a
    # window hides the first blocks, so that their dK, dV are written (as zeros). --
    k_base = K + b64 * stride_kb + kvh64 * stride_kh + k_start * stride_kn
    v_base = V + b64 * stride_vb + kvh64 * stride_vh + k_start * stride_vn
    dk_base = DK + b64 * stride_dkb + kvh64 * stride_dkh + k_start * stride_dkn
    dv_base = DV + b64 * stride_dkb + kvh64 * stride_dkh + k_start * stride_dkn
    for n0 in range(0, seqlen_k, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < seqlen_k) & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        m_lo, m_hi = _q_block_range(n0, seqlen_q, seqlen_k, diag, window_left, window_right,
                                    BLOCK_M, BLOCK_N)
        for g in range(GROUP):
            h = h0 + g
            q_base = Q + b64 * stride_qb + h * stride_qh + q_start * stride_qm
            do_base = DO + b64 * stride_dob + h * stride_doh + q_start * stride_dom
            dqacc_base = DQ_ACC + b64 * stride_dqb + h * stride_dqh + q_start * stride_dqm
            lse_off = b64 * stride_lb + h * stride_lh + q_start
            for m0 in range(m_lo, m_hi, BLOCK_M):
                dk, dv = _v1_bwd_update(dk, dv, k, v, m0, n0, q_base, do_base, dqacc_base,
                                        LSE + lse_off, DELTA + lse_off, stride_qm, stride_dom, stride_dqm,
                                        seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale,
                                        softcap_log2, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_SOFTCAP,
                                        DOT_PRECISION)
        # -- write dK_j, dV_j (line 27) --
        tile = offs_n[:, None] * stride_dkn + offs_d[None, :]
        tl.store(dk_base + tile, (dk * softmax_scale).to(DK.dtype.element_ty), mask=kv_ok)
        tl.store(dv_base + tile, dv.to(DV.dtype.element_ty), mask=kv_ok)
        # The next K/V block re-reads the dQ rows just written, possibly from other threads.
        tl.debug_barrier()

    # -- stage 2: dQ = softmax_scale · (accumulated dS K), in the output dtype --
    for g in range(GROUP):
        dq_off = b64 * stride_dqb + (h0 + g) * stride_dqh + q_start * stride_dqm
        for m0 in range(0, seqlen_q, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            tile = dq_off + offs_m[:, None] * stride_dqm + offs_d[None, :]
            tile_ok = (offs_m < seqlen_q)[:, None] & d_ok[None, :]
            dq = tl.load(DQ_ACC + tile, mask=tile_ok, other=0.0)
            tl.store(DQ + tile, (dq * softmax_scale).to(DQ.dtype.element_ty), mask=tile_ok)


def backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
             window_size, softcap, deterministic, grads=None):
    """Backend contract (see interface.py). `deterministic` is accepted and needs nothing: this
    backward has no atomics and is always bitwise reproducible. grads: (dq, dk, dv) to write into (dk and dv with
    the same strides: the kernel takes dK's for both), else made."""
    del deterministic
    varlen = cu_seqlens_q is not None
    batch, nheads, nheads_k, head_dim, seqlen_q, seqlen_k = _geometry(q, k, cu_seqlens_q, max_seqlen_q,
                                                                      max_seqlen_k)
    # Packed rows outside every sequence are never visited: zero them up front.
    new = grad_maker(grads, varlen)
    dq, dk, dv = new(0, q), new(1, k), new(2, v)
    if batch == 0 or (q.numel() == 0 and k.numel() == 0):
        return dq, dk, dv   # empty, or packed and zero-filled
    # the kernel takes dK's strides for dV too, and reads its float32 dQ accumulator (made contiguous) at dQ's
    # offsets: other given strides go through tensors of the strides it takes, copied into grads below
    if grads is not None and dv.stride() != dk.stride():
        dv = (torch.zeros_like if varlen else torch.empty_like)(dk)
    if grads is not None and not dq.is_contiguous():
        dq = (torch.zeros if varlen else torch.empty)(q.shape, dtype=q.dtype, device=q.device)
    if do.stride(-1) != 1:
        do = do.contiguous()
    lse = lse.contiguous()
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    delta = torch.empty_like(lse)       # D = rowsum(dO ∘ O), same layout as lse

    block_m, block_n, num_warps, num_stages = _bwd_config(head_dim)
    left, right = window_args(window_size, seqlen_q, seqlen_k)   # -1 -> wider than any sequence
    qk_scale, softcap_log2, has_softcap = _score_args(softmax_scale, softcap)
    cu_q = cu_seqlens_q if varlen else lse      # unused placeholders when dense
    cu_k = cu_seqlens_k if varlen else lse
    _v1_bwd_kernel[(nheads_k, batch)](
        q, k, v, out, do, lse, dq, dk, dv, dq_acc, delta, cu_q, cu_k,
        *_bhm_strides(q, varlen), *_bhm_strides(k, varlen), *_bhm_strides(v, varlen),
        *_bhm_strides(out, varlen), *_bhm_strides(do, varlen), *_bhm_strides(dq, varlen),
        *_bhm_strides(dk, varlen), *_lse_strides(lse, varlen),
        seqlen_q, seqlen_k, left, right, qk_scale, softcap_log2, softmax_scale,
        GROUP=nheads // nheads_k, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, IS_VARLEN=varlen, HAS_SOFTCAP=has_softcap,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    if grads is not None:
        dq, dv = (g if t is g else g.copy_(t) for t, g in ((dq, grads[0]), (dv, grads[2])))
    return dq, dk, dv
