"""FlashAttention-2 backward in Triton (arXiv 2307.08691, Algorithm 2), deterministic.

Two passes, and Delta_i = rowsum(dO_i ∘ O_i) (like lse's layout):
  dQ: one program per (query block, head, sequence), looping over the visible key blocks:
     dQ += dS K. Below head dim 256 it runs first and computes Delta of its rows itself, storing it for the
     dK/dV pass (`DELTA_IN_DQ`): two launches.
  dK/dV: one program per (key block, kv head, sequence). It loops over the GROUP query heads
     that share the kv head (GQA/MQA accumulate in registers: no repeated K/V, no atomics) and over
     the visible query blocks, recomputing P = exp2(S - lse) and accumulating
     dV += Pᵀ dO,  dS = P ∘ (dP - Delta) with dP = dO Vᵀ,  dK += dSᵀ Q.
At head dim 256 (`MERGE`: `_bwd_kernel` runs the dK/dV programs, then the dQ programs, in one launch) and with
atomic dQ, a preprocess launch computes Delta first.
No program writes what another writes, so results are bitwise reproducible run to run (the price:
QKᵀ and dO Vᵀ are recomputed in the dQ pass, 7 matmuls instead of 5).
Scores are in log2 units (see _common.score_scales); dS is converted back to natural units by the
chain rule: d score / d(qk) = softmax_scale, times (1 - tanh²) under softcap.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._runtime import env_get, is_interpreting
from . import _common as C
from ._common import body_end, grouped_rank, load_tile_pair, log2_scores, seq_bounds, tile_range, visible
from .v2 import _site_key, prune_by_head_dim


@triton.jit(do_not_specialize=["seqlen_q"])
def _preprocess_kernel(O, DO, DELTA, CU_Q,
                       stride_ob, stride_om, stride_oh,
                       stride_dob, stride_dom, stride_doh,
                       stride_lb, stride_lh, seqlen_q,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       IS_VARLEN: tl.constexpr):
    # Grid: (cdiv(max_seqlen_q, BLOCK_M), nheads, batch). Delta for BLOCK_M rows of one head.
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q_start, _, Sq, _ = seq_bounds(CU_Q, CU_Q, b, seqlen_q, seqlen_q, IS_VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM)
    do = tl.load(DO + b * stride_dob + h * stride_doh + (q_start + offs_m[:, None]) * stride_dom
                 + offs_d[None, :], mask=mask, other=0.0)
    _write_delta(O, do, DELTA, b, h, q_start, offs_m, offs_d, mask, offs_m < Sq, stride_ob, stride_om, stride_oh,
                 stride_lb, stride_lh)


@triton.jit
def _write_delta(O, do, DELTA, b, h, q_start, offs_m, offs_d, mask, row_ok, stride_ob, stride_om, stride_oh,
                 stride_lb, stride_lh):
    """Delta = rowsum(dO ∘ O) in float32 of the rows offs_m of head h of sequence b (O's tile loaded here under mask,
    dO's given), stored to DELTA (lse's layout) where row_ok, and returned: the preprocess kernel's work and, with
    `DELTA_IN_DQ`, the dQ program's, the same arithmetic in both."""
    o = tl.load(O + b * stride_ob + h * stride_oh + (q_start + offs_m[:, None]) * stride_om + offs_d[None, :],
                mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * stride_lb + h * stride_lh + q_start + offs_m, delta, mask=row_ok)
    return delta


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, DQ_base, stride_qm, stride_dom, stride_dqm,
                start, end, offs_n, offs_m, offs_d, Sq, diag_t, left_t, right_t, qk_scale, cap_scale, ds_scale,
                Q_DESC, DO_DESC, bq, q_start, h32,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                DO_DK: tl.constexpr, DO_DV: tl.constexpr, KV_B: tl.constexpr, TMA: tl.constexpr,
                IS_VARLEN: tl.constexpr, LEFT: tl.constexpr = True):
    # Rows of this tile are keys (offs_n), columns are queries: everything is transposed.
    # DO_DK / DO_DV: which accumulators this program owns (both, or one of them in the split variant)
    # KV_B: the other orientation (queries x keys), in which K and V are the second operand of every product
    # they enter (shared memory for wgmma) and Pᵀ, dSᵀ are transposed in registers instead
    for start_m in range(start, end, BLOCK_M):
        dk, dv = _dkdv_block(dk, dv, k, v, Q_base, DO_base, L_base, D_base, DQ_base, stride_qm, stride_dom, stride_dqm,
                             start_m, offs_n, offs_m, offs_d, Sq, diag_t, left_t, right_t, qk_scale, cap_scale,
                             ds_scale, Q_DESC, DO_DESC, bq, q_start, h32, HEAD_DIM, BLOCK_D, BLOCK_M, MASKED, SOFTCAP,
                             DOT_PREC, ATOMIC_DQ, DO_DK, DO_DV, KV_B, TMA, IS_VARLEN, MASKED, LEFT)
    return dk, dv


@triton.jit
def _dkdv_block(dk, dv, k, v, Q_base, DO_base, L_base, D_base, DQ_base, stride_qm, stride_dom, stride_dqm, start_m,
                offs_n, offs_m, offs_d, Sq, diag_t, left_t, right_t, qk_scale, cap_scale, ds_scale, Q_DESC, DO_DESC,
                bq, q_start, h32, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                MASKED: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                DO_DK: tl.constexpr, DO_DV: tl.constexpr, KV_B: tl.constexpr, TMA: tl.constexpr,
                IS_VARLEN: tl.constexpr, MASK_P, LEFT: tl.constexpr = True):
    """One query block [start_m, start_m + BLOCK_M) of `_dkdv_inner` / `_dkdv_loop`: q, dO and lse loaded (MASKED:
    the query tail, rows past Sq with lse = +inf so that P = 0 there), then the step in the program's orientation
    (MASK_P: P masked by the window)."""
    rows_q = start_m + offs_m
    q, do = load_tile_pair(Q_DESC, DO_DESC, Q_base, DO_base, stride_qm, stride_dom, start_m, offs_m, Sq, offs_d,
                           bq, q_start, h32, HEAD_DIM, BLOCK_M, BLOCK_D, MASKED, TMA, IS_VARLEN)
    if MASKED:
        lse = tl.load(L_base + rows_q, mask=rows_q < Sq, other=float("inf"))
    else:
        lse = tl.load(L_base + rows_q)
    if KV_B:
        dk, dv = _dkdv_step_kv_b(dk, dv, k, v, q, do, lse, D_base, DQ_base, stride_dqm, rows_q, offs_n, offs_d,
                                 Sq, diag_t, left_t, right_t, qk_scale, cap_scale, ds_scale, HEAD_DIM, MASKED,
                                 SOFTCAP, DOT_PREC, ATOMIC_DQ, DO_DK, DO_DV, MASK_P, LEFT)
    else:
        dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse, D_base, DQ_base, stride_dqm, rows_q, offs_n, offs_d,
                            Sq, diag_t, left_t, right_t, qk_scale, cap_scale, ds_scale, HEAD_DIM, MASKED,
                            SOFTCAP, DOT_PREC, ATOMIC_DQ, DO_DK, DO_DV, MASK_P, LEFT)
    return dk, dv


@triton.jit
def _dkdv_loop(dk, dv, k, v, Q_base, DO_base, L_base, D_base, DQ_base, stride_qm, stride_dom, stride_dqm,
               lo, hi, full_lo, full_hi, offs_n, offs_m, offs_d, Sq, diag_t, left_t, right_t, qk_scale, cap_scale,
               ds_scale, Q_DESC, DO_DESC, bq, q_start, h32,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, SOFTCAP: tl.constexpr,
               DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr,
               KV_B: tl.constexpr, TMA: tl.constexpr, IS_VARLEN: tl.constexpr, LEFT: tl.constexpr = True):
    """`_dkdv_inner` over every query block [lo, hi) in one pipelined loop (the kernel's ONE_LOOP; v2.py's
    `_fwd_loop`): P of the blocks outside the band [full_lo, full_hi) masked in a branch on the block's position, the
    block across the query tail Sq (at most one) after the loop with masked loads."""
    body_hi = body_end(lo, hi, Sq, BLOCK_M)
    for start_m in range(lo, body_hi, BLOCK_M):
        dk, dv = _dkdv_block(dk, dv, k, v, Q_base, DO_base, L_base, D_base, DQ_base, stride_qm, stride_dom, stride_dqm,
                             start_m, offs_n, offs_m, offs_d, Sq, diag_t, left_t, right_t, qk_scale, cap_scale,
                             ds_scale, Q_DESC, DO_DESC, bq, q_start, h32, HEAD_DIM, BLOCK_D, BLOCK_M, False, SOFTCAP,
                             DOT_PREC, ATOMIC_DQ, DO_DK, DO_DV, KV_B, TMA, IS_VARLEN,
                             (start_m < full_lo) | (start_m >= full_hi), LEFT)
    if body_hi < hi:
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, DQ_base, stride_qm, stride_dom,
                             stride_dqm, body_hi, hi, offs_n, offs_m, offs_d, Sq, diag_t, left_t, right_t, qk_scale,
                             cap_scale, ds_scale, Q_DESC, DO_DESC, bq, q_start, h32, HEAD_DIM, BLOCK_D, BLOCK_M, True,
                             SOFTCAP, DOT_PREC, ATOMIC_DQ, DO_DK, DO_DV, KV_B, TMA, IS_VARLEN, LEFT)
    return dk, dv


@triton.jit
def _load_delta(D_base, rows_q, Sq, MASKED: tl.constexpr):
    """Delta = rowsum(dO ∘ O) of the query block (0 past Sq on edge blocks)."""
    if MASKED:
        delta = tl.load(D_base + rows_q, mask=rows_q < Sq, other=0.0)
    else:
        delta = tl.load(D_base + rows_q)
    return delta


@triton.jit
def _add_dq(dq, DQ_base, stride_dqm, rows_q, offs_d, Sq, HEAD_DIM: tl.constexpr):
    """dQ += dq, accumulated in float32 across the key-block programs (atomic dQ: the order varies)."""
    tl.atomic_add(DQ_base + rows_q[:, None] * stride_dqm + offs_d[None, :], dq,
                  mask=(rows_q[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")


@triton.jit
def _dkdv_step(dk, dv, k, v, q, do, lse, D_base, DQ_base, stride_dqm, rows_q, offs_n, offs_d, Sq, diag_t, left_t,
               right_t, qk_scale, cap_scale, ds_scale, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
               SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr, DO_DK: tl.constexpr,
               DO_DV: tl.constexpr, MASK_P, LEFT: tl.constexpr = True):
    """One query block against the key block, keys x queries (K and V the first operands). MASKED: the query tail
    (loads); MASK_P (MASKED, or a runtime flag in `_dkdv_loop`): P masked by the window."""
    # -- recompute Pᵀ = exp2(Sᵀ - lse) --
    sT, t = log2_scores(k, q, qk_scale, cap_scale, SOFTCAP, DOT_PREC)
    pT = tl.exp2(sT - lse[None, :] * 1.4426950408889634)
    if MASK_P:
        # transposed: the window's left edge is the upper bound here; without one (LEFT False) the bound left is
        # Sq - 1, which the rows past Sq meet through lse = +inf (P = 0), so no upper bound is tested
        pT = tl.where(visible(offs_n, rows_q, diag_t, left_t, right_t, Sq, True, LEFT), pT, 0.0)
    if DO_DV:
        # -- dV += Pᵀ dO --
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
    if DO_DK:
        delta = _load_delta(D_base, rows_q, Sq, MASKED)
        # -- dSᵀ = Pᵀ ∘ (dPᵀ - Delta), dK += dSᵀ Q --
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - t * t)
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    if ATOMIC_DQ and DO_DK:   # the split variant's dK program (the dV program has no dS)
        # -- dQ += dS K --
        dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=DOT_PREC)
        _add_dq(dq * ds_scale, DQ_base, stride_dqm, rows_q, offs_d, Sq, HEAD_DIM)
    return dk, dv


@triton.jit
def _dkdv_step_kv_b(dk, dv, k, v, q, do, lse, D_base, DQ_base, stride_dqm, rows_q, offs_n, offs_d, Sq, diag_t,
                    left_t, right_t, qk_scale, cap_scale, ds_scale, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                    SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr, DO_DK: tl.constexpr,
                    DO_DV: tl.constexpr, MASK_P, LEFT: tl.constexpr = True):
    """The same step, queries x keys: S = Q Kᵀ and dP = dO Vᵀ take K and V as second operands; dV and dK take
    Pᵀ and dSᵀ. Rows past Sq have lse = +inf (P = 0); the window is the untransposed band."""
    s, t = log2_scores(q, k, qk_scale, cap_scale, SOFTCAP, DOT_PREC)
    p = tl.exp2(s - lse[:, None] * 1.4426950408889634)
    if MASK_P:
        p = tl.where(visible(rows_q, offs_n, -diag_t, right_t, left_t, 2147483647, LEFT), p, 0.0)
    if DO_DV:
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PREC)
    if DO_DK:
        delta = _load_delta(D_base, rows_q, Sq, MASKED)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PREC)
    if ATOMIC_DQ and DO_DK:
        dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        _add_dq(dq * ds_scale, DQ_base, stride_dqm, rows_q, offs_d, Sq, HEAD_DIM)
    return dk, dv


@triton.jit
def _dkdv_heads(k, v, Q, DO, LSE, DELTA, DQ_ACC, b, kvh, q_start, stride_qb, stride_qm, stride_qh,
                stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh,
                lo, full_lo, full_hi, hi, offs_n, offs_m, offs_d, Sq, diag_t, window_left, window_right,
                qk_scale, cap_scale, ds_scale, group, Q_DESC, DO_DESC,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                DO_DK: tl.constexpr, DO_DV: tl.constexpr, KV_B: tl.constexpr, TMA: tl.constexpr,
                IS_VARLEN: tl.constexpr, ONE_LOOP: tl.constexpr = False, LEFT: tl.constexpr = True):
    """dK and/or dV of one key block of one kv head, summed over the GROUP query heads that read it:
    the masked blocks before the band's full part, the full part unmasked, the masked blocks after (ONE_LOOP: in one
    loop, `_dkdv_loop`)."""
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    bq = b.to(tl.int32)   # descriptor coordinates are int32
    for g in range(group):
        h = kvh * group + g
        h32 = h.to(tl.int32)
        Q_base = Q + b * stride_qb + h * stride_qh + q_start * stride_qm
        DO_base = DO + b * stride_dob + h * stride_doh + q_start * stride_dom
        L_base = LSE + b * stride_lb + h * stride_lh + q_start
        D_base = DELTA + b * stride_lb + h * stride_lh + q_start
        if ATOMIC_DQ:
            DQ_base = DQ_ACC + b * stride_dqb + h * stride_dqh + q_start * stride_dqm
        else:
            DQ_base = DQ_ACC
        if ONE_LOOP:
            dk, dv = _dkdv_loop(dk, dv, k, v, Q_base, DO_base, L_base, D_base, DQ_base, stride_qm, stride_dom,
                                stride_dqm, lo, hi, full_lo, full_hi, offs_n, offs_m, offs_d, Sq, diag_t, window_right,
                                window_left, qk_scale, cap_scale, ds_scale, Q_DESC, DO_DESC, bq, q_start, h32,
                                HEAD_DIM, BLOCK_D, BLOCK_M, SOFTCAP, DOT_PREC, ATOMIC_DQ, DO_DK, DO_DV, KV_B, TMA,
                                IS_VARLEN, LEFT)
        else:
            # key j is seen by queries i with j - diag - right <= i <= j - diag + left: the same band,
            # transposed (diag -> -diag, left <-> right)
            dk, dv = _dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, DQ_base, stride_qm, stride_dom,
                                 stride_dqm, lo, full_lo, offs_n, offs_m, offs_d, Sq, diag_t, window_right,
                                 window_left, qk_scale, cap_scale, ds_scale, Q_DESC, DO_DESC, bq, q_start, h32,
                                 HEAD_DIM, BLOCK_D, BLOCK_M, True, SOFTCAP, DOT_PREC, ATOMIC_DQ, DO_DK, DO_DV, KV_B,
                                 TMA, IS_VARLEN, LEFT)
            dk, dv = _dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, DQ_base, stride_qm, stride_dom,
                                 stride_dqm, full_lo, full_hi, offs_n, offs_m, offs_d, Sq, diag_t, window_right,
                                 window_left, qk_scale, cap_scale, ds_scale, Q_DESC, DO_DESC, bq, q_start, h32,
                                 HEAD_DIM, BLOCK_D, BLOCK_M, False, SOFTCAP, DOT_PREC, ATOMIC_DQ, DO_DK, DO_DV, KV_B,
                                 TMA, IS_VARLEN)
            dk, dv = _dkdv_inner(dk, dv, k, v, Q_base, DO_base, L_base, D_base, DQ_base, stride_qm, stride_dom,
                                 stride_dqm, full_hi, hi, offs_n, offs_m, offs_d, Sq, diag_t, window_right,
                                 window_left, qk_scale, cap_scale, ds_scale, Q_DESC, DO_DESC, bq, q_start, h32,
                                 HEAD_DIM, BLOCK_D, BLOCK_M, True, SOFTCAP, DOT_PREC, ATOMIC_DQ, DO_DK, DO_DV, KV_B,
                                 TMA, IS_VARLEN, LEFT)
    # dS was taken w.r.t. the log2-unit score; ds_scale brings it back to q·k units
    return dk * ds_scale, dv


@triton.jit
def _dkdv_program(lin, n_m, n_h, n_bh, Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, Q_DESC, DO_DESC, CU_Q, CU_K,
                  stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                  stride_dob, stride_dom, stride_doh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn,
                  stride_dvh, stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh,
                  seqlen_q, seqlen_k, window_left, window_right, qk_scale, cap_scale, ds_scale, group, l2_pairs,
                  group_tiles, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
                  ATOMIC_DQ: tl.constexpr, SPLIT: tl.constexpr, KV_B: tl.constexpr, TMA: tl.constexpr,
                  ONE_LOOP: tl.constexpr, LEFT: tl.constexpr, DV_BLOCK_M: tl.constexpr = 0):
    """The lin-th program of a dK/dV launch of n_m tiles (key blocks, x2 if SPLIT) x n_h kv heads x n_bh / n_h
    sequences: BLOCK_N rows of dK and dV for one kv head, summed over the GROUP query heads that read it. SPLIT: two
    programs per key block, one for dV (2 matmuls) and one for dK (3 matmuls; QKᵀ is recomputed): one float32
    accumulator each instead of two, for large head dims whose registers would otherwise spill. DV_BLOCK_M (SPLIT; 0:
    BLOCK_M): the dV programs' query-tile height, which may differ from the dK programs' (a dV program holds K but not
    V in shared memory, so a taller query tile fits there with the same stages). Programs take their
    tiles in `grouped_rank`'s order: the (sequence, kv head) pairs in groups, within a group the key blocks from the
    first (seen by the most queries under a causal mask), each pair's in turn."""
    # descriptor loads (TMA) take Q and dO tiles of the blocks `_size_descriptors` gives them: BLOCK_M rows
    tl.static_assert(not TMA or DV_BLOCK_M == 0 or DV_BLOCK_M == BLOCK_M,
                     "DV_BLOCK_M != BLOCK_M is not supported with descriptor loads (TMA): drop the seventh field")
    pid0, pair = grouped_rank(lin, n_m, n_bh, l2_pairs, group_tiles)
    if SPLIT:
        pid_n = pid0 // 2
    else:
        pid_n = pid0
    kvh = (pair % n_h).to(tl.int64)
    b = (pair // n_h).to(tl.int64)
    q_start, k_start, Sq, Sk = seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 < Sk:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if not SPLIT:
            offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        kv_mask = (offs_n[:, None] < Sk) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + b * stride_kb + kvh * stride_kh + (k_start + offs_n[:, None]) * stride_kn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if not SPLIT:
            v = tl.load(V + b * stride_vb + kvh * stride_vh + (k_start + offs_n[:, None]) * stride_vn
                        + offs_d[None, :], mask=kv_mask, other=0.0)
        diag_t = Sq - Sk
        if not SPLIT:
            lo, full_lo, full_hi, hi = tile_range(n0, BLOCK_N, diag_t, window_right, window_left, Sq, BLOCK_M)
        dk_ptrs = DK + b * stride_dkb + kvh * stride_dkh + (k_start + offs_n[:, None]) * stride_dkn + offs_d[None, :]
        dv_ptrs = DV + b * stride_dvb + kvh * stride_dvh + (k_start + offs_n[:, None]) * stride_dvn + offs_d[None, :]
        if SPLIT:
            if pid0 % 2 == 0:
                # the dV program: V is not read (K stands in for it in the call); its query tiles are DV_BLOCK_M rows
                # high, or BLOCK_M where DV_BLOCK_M is 0 (constexpr arithmetic)
                _, dv = _dkdv_split_program(k, k, Q, DO, LSE, DELTA, DQ_ACC, b, kvh, q_start, stride_qb, stride_qm,
                                            stride_qh, stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm,
                                            stride_dqh, stride_lb, stride_lh, n0, offs_n, offs_d, Sq, diag_t,
                                            window_left, window_right, qk_scale, cap_scale, ds_scale, group, Q_DESC,
                                            DO_DESC, HEAD_DIM, BLOCK_D, DV_BLOCK_M + (DV_BLOCK_M == 0) * BLOCK_M,
                                            BLOCK_N, SOFTCAP, DOT_PREC, ATOMIC_DQ, KV_B, TMA, IS_VARLEN, ONE_LOOP,
                                            LEFT, False)
                tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)
            else:
                # the dK program: V loaded here only
                v = tl.load(V + b * stride_vb + kvh * stride_vh + (k_start + offs_n[:, None]) * stride_vn
                            + offs_d[None, :], mask=kv_mask, other=0.0)
                dk, _ = _dkdv_split_program(k, v, Q, DO, LSE, DELTA, DQ_ACC, b, kvh, q_start, stride_qb, stride_qm,
                                            stride_qh, stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm,
                                            stride_dqh, stride_lb, stride_lh, n0, offs_n, offs_d, Sq, diag_t,
                                            window_left, window_right, qk_scale, cap_scale, ds_scale, group, Q_DESC,
                                            DO_DESC, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, SOFTCAP, DOT_PREC,
                                            ATOMIC_DQ, KV_B, TMA, IS_VARLEN, ONE_LOOP, LEFT, True)
                tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
        else:
            dk, dv = _dkdv_heads(k, v, Q, DO, LSE, DELTA, DQ_ACC, b, kvh, q_start, stride_qb, stride_qm, stride_qh,
                                 stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh, stride_lb,
                                 stride_lh, lo, full_lo, full_hi, hi, offs_n, offs_m, offs_d, Sq, diag_t, window_left,
                                 window_right, qk_scale, cap_scale, ds_scale, group, Q_DESC, DO_DESC, HEAD_DIM, BLOCK_D,
                                 BLOCK_M, BLOCK_N, SOFTCAP, DOT_PREC, ATOMIC_DQ, True, True, KV_B, TMA, IS_VARLEN,
                                 ONE_LOOP, LEFT)
            tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
            tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dkdv_split_program(k, v, Q, DO, LSE, DELTA, DQ_ACC, b, kvh, q_start, stride_qb, stride_qm, stride_qh, stride_dob,
                        stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh, n0, offs_n,
                        offs_d, Sq, diag_t, window_left, window_right, qk_scale, cap_scale, ds_scale, group, Q_DESC,
                        DO_DESC, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                        KV_B: tl.constexpr, TMA: tl.constexpr, IS_VARLEN: tl.constexpr, ONE_LOOP: tl.constexpr,
                        LEFT: tl.constexpr, DO_DK: tl.constexpr):
    """One program of a split pair over query tiles of BLOCK_M rows (the dV program's may be `DV_BLOCK_M`): dK
    (DO_DK) or dV, the other accumulator left at zero. The dV program passes K for V, which it does not read."""
    offs_m = tl.arange(0, BLOCK_M)
    lo, full_lo, full_hi, hi = tile_range(n0, BLOCK_N, diag_t, window_right, window_left, Sq, BLOCK_M)
    return _dkdv_heads(k, v, Q, DO, LSE, DELTA, DQ_ACC, b, kvh, q_start, stride_qb, stride_qm, stride_qh, stride_dob,
                       stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh, lo, full_lo,
                       full_hi, hi, offs_n, offs_m, offs_d, Sq, diag_t, window_left, window_right, qk_scale, cap_scale,
                       ds_scale, group, Q_DESC, DO_DESC, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, SOFTCAP, DOT_PREC,
                       ATOMIC_DQ, DO_DK, not DO_DK, KV_B, TMA, IS_VARLEN, ONE_LOOP, LEFT)


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window_left", "window_right", "SEQ_BUCKET",
                             "MASK_KIND", "group", "l2_pairs", "group_tiles"])
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, Q_DESC, DO_DESC, CU_Q, CU_K,
                 stride_qb, stride_qm, stride_qh,
                 stride_kb, stride_kn, stride_kh,
                 stride_vb, stride_vn, stride_vh,
                 stride_dob, stride_dom, stride_doh,
                 stride_dkb, stride_dkn, stride_dkh,
                 stride_dvb, stride_dvn, stride_dvh,
                 stride_dqb, stride_dqm, stride_dqh,
                 stride_lb, stride_lh,
                 seqlen_q, seqlen_k, window_left, window_right, qk_scale, cap_scale, ds_scale, SEQ_BUCKET, MASK_KIND,
                 group, l2_pairs, group_tiles, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr,
                 SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, D_CLASS: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                 SPLIT: tl.constexpr = False, KV_B: tl.constexpr = False, TMA: tl.constexpr = False,
                 ONE_LOOP: tl.constexpr = False, LEFT: tl.constexpr = True, DV_BLOCK_M: tl.constexpr = 0):
    # Grid: (cdiv(max_seqlen_k, BLOCK_N) (x2 if SPLIT), nheads_k, batch); `_dkdv_program`.
    n_m = tl.num_programs(0)
    n_h = tl.num_programs(1)
    lin = C.launch_index()
    _dkdv_program(lin, n_m, n_h, n_h * tl.num_programs(2), Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, Q_DESC, DO_DESC,
                  CU_Q, CU_K, stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
                  stride_vh, stride_dob, stride_dom, stride_doh, stride_dkb, stride_dkn, stride_dkh, stride_dvb,
                  stride_dvn, stride_dvh, stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh, seqlen_q, seqlen_k,
                  window_left, window_right, qk_scale, cap_scale, ds_scale, group, l2_pairs, group_tiles, HEAD_DIM,
                  BLOCK_D, BLOCK_M, BLOCK_N, IS_VARLEN, SOFTCAP, DOT_PREC, ATOMIC_DQ, SPLIT, KV_B, TMA, ONE_LOOP,
                  LEFT, DV_BLOCK_M)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K_base, V_base, stride_kn, stride_vn, start, end, offs_m, offs_n, offs_d,
              Sk, diag, left, right, qk_scale, cap_scale, K_DESC, V_DESC, bq, k_start, kvh32,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr, IS_VARLEN: tl.constexpr,
              LEFT: tl.constexpr = True):
    for start_n in range(start, end, BLOCK_N):
        # keys past Sk are masked out of P on the masked blocks
        k, v = load_tile_pair(K_DESC, V_DESC, K_base, V_base, stride_kn, stride_vn, start_n, offs_n, Sk, offs_d, bq,
                              k_start, kvh32, HEAD_DIM, BLOCK_N, BLOCK_D, MASKED, TMA, IS_VARLEN)
        dq = _dq_block(dq, q, do, lse, delta, k, v, start_n + offs_n, offs_m, Sk, diag, left, right, qk_scale,
                       cap_scale, MASKED, SOFTCAP, DOT_PREC, LEFT)
    return dq


@triton.jit
def _dq_block(dq, q, do, lse, delta, k, v, cols, offs_m, Sk, diag, left, right, qk_scale, cap_scale,
              MASKED, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, LEFT: tl.constexpr = True):
    """dQ += dS K for one key block (columns cols) once k and v are loaded; MASKED (a constexpr, or a runtime flag in
    `_dq_loop`): P masked by the window and the key tail."""
    # -- recompute P --
    s, t = log2_scores(q, k, qk_scale, cap_scale, SOFTCAP, DOT_PREC)
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(visible(offs_m, cols, diag, left, right, Sk, LEFT), p, 0.0)
    # -- dS = P ∘ (dO Vᵀ - Delta), dQ += dS K --
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)


@triton.jit
def _dq_loop(dq, q, do, lse, delta, K_base, V_base, stride_kn, stride_vn, lo, hi, full_lo, full_hi, offs_m, offs_n,
             offs_d, Sk, diag, left, right, qk_scale, cap_scale, K_DESC, V_DESC, bq, k_start, kvh32,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr,
             DOT_PREC: tl.constexpr, TMA: tl.constexpr, IS_VARLEN: tl.constexpr, LEFT: tl.constexpr = True):
    """The dQ pass's key blocks [lo, hi) in one pipelined loop (the kernel's ONE_LOOP; v2.py's `_fwd_loop`): P of the
    blocks outside the band [full_lo, full_hi) masked in a branch on the block's position, the block across the key
    tail (at most one) after the loop with masked loads."""
    body_hi = body_end(lo, hi, Sk, BLOCK_N)
    for start_n in range(lo, body_hi, BLOCK_N):
        k, v = load_tile_pair(K_DESC, V_DESC, K_base, V_base, stride_kn, stride_vn, start_n, offs_n, Sk, offs_d, bq,
                              k_start, kvh32, HEAD_DIM, BLOCK_N, BLOCK_D, False, TMA, IS_VARLEN)
        dq = _dq_block(dq, q, do, lse, delta, k, v, start_n + offs_n, offs_m, Sk, diag, left, right, qk_scale,
                       cap_scale, (start_n < full_lo) | (start_n >= full_hi), SOFTCAP, DOT_PREC, LEFT)
    if body_hi < hi:
        k, v = load_tile_pair(K_DESC, V_DESC, K_base, V_base, stride_kn, stride_vn, body_hi, offs_n, Sk, offs_d, bq,
                              k_start, kvh32, HEAD_DIM, BLOCK_N, BLOCK_D, True, TMA, IS_VARLEN)
        dq = _dq_block(dq, q, do, lse, delta, k, v, body_hi + offs_n, offs_m, Sk, diag, left, right, qk_scale,
                       cap_scale, True, SOFTCAP, DOT_PREC, LEFT)
    return dq


@triton.jit
def _dq_program(lin, n_m, n_h, n_bh, Q, K, V, DO, LSE, DELTA, DQ, K_DESC, V_DESC, CU_Q, CU_K,
                stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh,
                seqlen_q, seqlen_k, window_left, window_right, qk_scale, cap_scale, ds_scale, group, l2_pairs,
                group_tiles, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
                TMA: tl.constexpr, ONE_LOOP: tl.constexpr, LEFT: tl.constexpr, O=None, stride_ob=0, stride_om=0,
                stride_oh=0, DELTA_HERE: tl.constexpr = False):
    """The lin-th program of a dQ launch of n_m query blocks x n_h heads x n_bh / n_h sequences: BLOCK_M rows of dQ.
    Programs take their tiles in `grouped_rank`'s order, the last query block (the heaviest under a causal mask)
    first. DELTA_HERE: Delta = rowsum(dO ∘ O) of the rows computed here from O's tile and stored to DELTA (the
    preprocess launch's work, for a dK/dV pass that runs after this one: `DELTA_IN_DQ`), instead of read from it."""
    rank, pair = grouped_rank(lin, n_m, n_bh, l2_pairs, group_tiles)
    pid_m = n_m - 1 - rank
    h = pair % n_h
    bq = pair // n_h
    b = bq.to(tl.int64)
    q_start, k_start, Sq, Sk = seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 < Sq:
        kvh = (h // group).to(tl.int64)
        kvh32 = h // group
        h64 = h.to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < Sq
        qmask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(Q + b * stride_qb + h64 * stride_qh + (q_start + offs_m[:, None]) * stride_qm + offs_d[None, :],
                    mask=qmask, other=0.0)
        do = tl.load(DO + b * stride_dob + h64 * stride_doh + (q_start + offs_m[:, None]) * stride_dom
                     + offs_d[None, :], mask=qmask, other=0.0)
        lse = tl.load(LSE + b * stride_lb + h64 * stride_lh + q_start + offs_m, mask=row_ok, other=float("inf"))
        lse = lse * 1.4426950408889634     # natural log -> log2 units
        if DELTA_HERE:
            delta = _write_delta(O, do, DELTA, b, h64, q_start, offs_m, offs_d, qmask, row_ok, stride_ob, stride_om,
                                 stride_oh, stride_lb, stride_lh)
        else:
            delta = tl.load(DELTA + b * stride_lb + h64 * stride_lh + q_start + offs_m, mask=row_ok, other=0.0)
        K_base = K + b * stride_kb + kvh * stride_kh + k_start * stride_kn
        V_base = V + b * stride_vb + kvh * stride_vh + k_start * stride_vn
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        diag = Sk - Sq
        lo, full_lo, full_hi, hi = tile_range(m0, BLOCK_M, diag, window_left, window_right, Sk, BLOCK_N)
        if ONE_LOOP:
            dq = _dq_loop(dq, q, do, lse, delta, K_base, V_base, stride_kn, stride_vn, lo, hi, full_lo, full_hi, offs_m,
                          offs_n, offs_d, Sk, diag, window_left, window_right, qk_scale, cap_scale, K_DESC, V_DESC, bq,
                          k_start, kvh32, HEAD_DIM, BLOCK_D, BLOCK_N, SOFTCAP, DOT_PREC, TMA, IS_VARLEN, LEFT)
        else:
            dq = _dq_inner(dq, q, do, lse, delta, K_base, V_base, stride_kn, stride_vn, lo, full_lo, offs_m, offs_n,
                           offs_d, Sk, diag, window_left, window_right, qk_scale, cap_scale, K_DESC, V_DESC, bq,
                           k_start, kvh32, HEAD_DIM, BLOCK_D, BLOCK_N, True, SOFTCAP, DOT_PREC, TMA, IS_VARLEN, LEFT)
            dq = _dq_inner(dq, q, do, lse, delta, K_base, V_base, stride_kn, stride_vn, full_lo, full_hi, offs_m,
                           offs_n, offs_d, Sk, diag, window_left, window_right, qk_scale, cap_scale, K_DESC, V_DESC, bq,
                           k_start, kvh32, HEAD_DIM, BLOCK_D, BLOCK_N, False, SOFTCAP, DOT_PREC, TMA, IS_VARLEN, LEFT)
            dq = _dq_inner(dq, q, do, lse, delta, K_base, V_base, stride_kn, stride_vn, full_hi, hi, offs_m, offs_n,
                           offs_d, Sk, diag, window_left, window_right, qk_scale, cap_scale, K_DESC, V_DESC, bq,
                           k_start, kvh32, HEAD_DIM, BLOCK_D, BLOCK_N, True, SOFTCAP, DOT_PREC, TMA, IS_VARLEN, LEFT)
        dq = dq * ds_scale
        tl.store(DQ + b * stride_dqb + h64 * stride_dqh + (q_start + offs_m[:, None]) * stride_dqm + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=qmask)


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window_left", "window_right", "SEQ_BUCKET",
                             "MASK_KIND", "group", "l2_pairs", "group_tiles"])
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, K_DESC, V_DESC, CU_Q, CU_K, O,
               stride_qb, stride_qm, stride_qh,
               stride_kb, stride_kn, stride_kh,
               stride_vb, stride_vn, stride_vh,
               stride_dob, stride_dom, stride_doh,
               stride_dqb, stride_dqm, stride_dqh,
               stride_ob, stride_om, stride_oh,
               stride_lb, stride_lh,
               seqlen_q, seqlen_k, window_left, window_right, qk_scale, cap_scale, ds_scale, SEQ_BUCKET, MASK_KIND,
               group, l2_pairs, group_tiles, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr,
               SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, D_CLASS: tl.constexpr, TMA: tl.constexpr = False,
               ONE_LOOP: tl.constexpr = False, LEFT: tl.constexpr = True, DELTA_HERE: tl.constexpr = False):
    # Grid: (cdiv(max_seqlen_q, BLOCK_M), nheads, batch); `_dq_program`.
    n_m = tl.num_programs(0)
    n_h = tl.num_programs(1)
    lin = C.launch_index()
    _dq_program(lin, n_m, n_h, n_h * tl.num_programs(2), Q, K, V, DO, LSE, DELTA, DQ, K_DESC, V_DESC, CU_Q, CU_K,
                stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh,
                seqlen_q, seqlen_k, window_left, window_right, qk_scale, cap_scale, ds_scale, group, l2_pairs,
                group_tiles, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, IS_VARLEN, SOFTCAP, DOT_PREC, TMA, ONE_LOOP, LEFT,
                O, stride_ob, stride_om, stride_oh, DELTA_HERE)


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window_left", "window_right", "SEQ_BUCKET",
                             "MASK_KIND", "group", "l2_kv", "l2_q", "group_tiles", "batch", "nheads_k"])
def _bwd_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, CU_Q, CU_K,
                stride_qb, stride_qm, stride_qh,
                stride_kb, stride_kn, stride_kh,
                stride_vb, stride_vn, stride_vh,
                stride_dob, stride_dom, stride_doh,
                stride_dkb, stride_dkn, stride_dkh,
                stride_dvb, stride_dvn, stride_dvh,
                stride_dqb, stride_dqm, stride_dqh,
                stride_lb, stride_lh,
                seqlen_q, seqlen_k, window_left, window_right, qk_scale, cap_scale, ds_scale, SEQ_BUCKET, MASK_KIND,
                group, l2_kv, l2_q, group_tiles, batch, nheads_k, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQ_BLOCK_M: tl.constexpr, DQ_BLOCK_N: tl.constexpr,
                IS_VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, D_CLASS: tl.constexpr,
                SPLIT: tl.constexpr = False, KV_B: tl.constexpr = False, ONE_LOOP: tl.constexpr = False,
                LEFT: tl.constexpr = True, DV_BLOCK_M: tl.constexpr = 0):
    # Both passes in one launch (`MERGE`). Grid: (n_kv + n_q,): the programs of `_dkdv_kernel`'s launch (BLOCK_M x
    # BLOCK_N tiles, in its order) first, then those of `_dq_kernel`'s (DQ_BLOCK_M x DQ_BLOCK_N): the two passes read
    # the same inputs and write different outputs, so dQ programs start on the SMs that the dK/dV programs' last wave
    # leaves idle instead of after it. Each program's arithmetic is its pass's: the gradients are bitwise those of
    # the two launches.
    n_kv_m = tl.cdiv(seqlen_k, BLOCK_N)
    if SPLIT:
        n_kv_m = n_kv_m * 2
    n_kv = n_kv_m * nheads_k * batch
    lin = tl.program_id(0)
    if lin < n_kv:
        _dkdv_program(lin, n_kv_m, nheads_k, nheads_k * batch, Q, K, V, DO, LSE, DELTA, DK, DV, DQ, Q, DO, CU_Q, CU_K,
                      stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
                      stride_vh, stride_dob, stride_dom, stride_doh, stride_dkb, stride_dkn, stride_dkh, stride_dvb,
                      stride_dvn, stride_dvh, stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh, seqlen_q,
                      seqlen_k, window_left, window_right, qk_scale, cap_scale, ds_scale, group, l2_kv, group_tiles,
                      HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, IS_VARLEN, SOFTCAP, DOT_PREC, False, SPLIT, KV_B, False,
                      ONE_LOOP, LEFT, DV_BLOCK_M)
    else:
        nheads = nheads_k * group
        _dq_program(lin - n_kv, tl.cdiv(seqlen_q, DQ_BLOCK_M), nheads, nheads * batch, Q, K, V, DO, LSE, DELTA, DQ,
                    K, V, CU_Q, CU_K, stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb,
                    stride_vn, stride_vh, stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh,
                    stride_lb, stride_lh, seqlen_q, seqlen_k, window_left, window_right, qk_scale, cap_scale,
                    ds_scale, group, l2_q, group_tiles, HEAD_DIM, BLOCK_D, DQ_BLOCK_M, DQ_BLOCK_N, IS_VARLEN,
                    SOFTCAP, DOT_PREC, False, ONE_LOOP, LEFT)


# ----------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages[, split]), best first: the winners of the H100 sweep
# (benchmarks/sweep_bwd.py, results/2026-11-26-h100-sweep-bwd.md; autotuning picks among them). The dK/dV
# pass keeps a tall key tile and walks narrow query tiles, the dQ pass the reverse. At head dim 256 every
# fused dK/dV tile spills; the split variant (dV and dK in separate programs) is the fastest there. At head
# dim 64 the queries x keys orientation (KV_B, the sixth field) with 64 x 64 tiles is the best or within 1% of it
# at every point of the second sweep (results/2026-11-26-h100-sweep-bwd-d64-kvb.md: +1-7% at 4k-16k, +14% at
# 1k causal), as is the 64 x 64 dQ tile.
_DKDV_CONFIGS = {64: [(64, 64, 4, 3, False, True), (32, 128, 4, 3), (32, 128, 4, 5)],
                 128: [(32, 64, 4, 3), (32, 128, 8, 2), (64, 128, 8, 2)],
                 256: [(32, 128, 8, 2, True), (16, 64, 4, 2, True), (64, 64, 8, 2)]}
_DQ_CONFIGS = {64: [(64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3)],
               128: [(128, 64, 8, 3), (64, 32, 4, 3), (128, 64, 8, 2)],
               256: [(128, 32, 8, 2), (64, 16, 4, 2), (64, 64, 8, 2)]}


# The merged launch's (dK/dV config, dQ config) pairs: one kernel has one warp count and one stage count, so each
# pair joins configs of _DKDV_CONFIGS and _DQ_CONFIGS that share them, the winners first. A dK/dV config's seventh
# field is the split dV programs' query-tile height (`DV_BLOCK_M`): at d256 a dV program holds K but not V, so 64-row
# query tiles fit two stages beside it (196,864 B of shared memory, as the 32-row dK programs), and its Sᵀ = K Qᵀ
# product reads K from shared memory once every 64 queries instead of 32. On the H200 (results/2026-11-28-h200-sweep-
# bwd-d256-dvbm.md, the backward alone, the pair against the same pair without it): 4k 1.05x / 1.02x (unmasked /
# causal), 16k 1.02x / 1.06x; the next best pair took 1.11-1.14x the old one's time
# (2026-11-28-h200-sweep-bwd-d256.md); the d192 / d256 cases of gpu_check pass with it (-correctness-v2-d256-dvbm).
_MERGED_CONFIGS = {64: [((64, 64, 4, 3, False, True), (64, 64, 4, 3)), ((32, 128, 4, 3), (64, 32, 4, 3))],
                   128: [((32, 64, 4, 3), (64, 32, 4, 3)), ((32, 128, 8, 2), (128, 64, 8, 2))],
                   256: [((32, 128, 8, 2, True, False, 64), (128, 32, 8, 2)), ((32, 128, 8, 2, True), (128, 32, 8, 2)),
                         ((16, 64, 4, 2, True), (64, 16, 4, 2)), ((64, 64, 8, 2), (64, 64, 8, 2))]}


def _merged_config(d_class, kv, dq):
    c = _config(d_class, *kv)
    assert (c.num_warps, c.num_stages) == (dq[2], dq[3]), (kv, dq)
    c.kwargs.update(DQ_BLOCK_M=dq[0], DQ_BLOCK_N=dq[1])
    return c


def _config(d_class, bm, bn, w, s, split=False, kv_b=False, dv_bm=0):
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "D_CLASS": d_class}
    if split:
        kw["SPLIT"] = True
    if kv_b:
        kw["KV_B"] = True
    if dv_bm:
        assert split, "DV_BLOCK_M is the split dV programs' query tile"
        kw["DV_BLOCK_M"] = dv_bm
    return triton.Config(kw, num_warps=w, num_stages=s)


def _configs(table):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages[, split[, kv_b]]) tuples per head-dim class -> triton.Configs (the
    atomic-dQ launch takes the split ones too: the dK program adds dQ, the dV program has no dS)."""
    return [_config(d, *c) for d, cfgs in table.items() for c in cfgs]


def dkdv_grid(max_seqlen_k, Hk, batch):
    return lambda m: (C.cdiv(max_seqlen_k, m["BLOCK_N"]) * (2 if m.get("SPLIT", False) else 1), Hk, batch)


def _size_descriptors(nargs):
    """Blocks of the host-made descriptors (TMA launches) sized to the launch's tiles: Q and dO tiles of BLOCK_M
    rows in the dK/dV pass, K and V tiles of BLOCK_N rows in the dQ pass."""
    for name, rows in (("Q_DESC", "BLOCK_M"), ("DO_DESC", "BLOCK_M"), ("K_DESC", "BLOCK_N"), ("V_DESC", "BLOCK_N")):
        d = nargs.get(name)
        if d is not None and hasattr(d, "block_shape"):
            d.block_shape = ([1] if len(d.shape) == 4 else []) + [nargs[rows], 1, nargs["BLOCK_D"]]


_KEY = ["BLOCK_D", "IS_VARLEN", "SOFTCAP", "DOT_PREC", "SEQ_BUCKET", "MASK_KIND", "TMA"]
_INTERP = {"BLOCK_M": 16, "BLOCK_N": 32, "D_CLASS": 0}
_dkdv_launch = C.Launcher(_dkdv_kernel, _configs(_DKDV_CONFIGS), prune_by_head_dim, _KEY, _INTERP,
                          pre_hook=_size_descriptors)
_dkdv_atomic_launch = C.Launcher(_dkdv_kernel, _configs(_DKDV_CONFIGS), prune_by_head_dim,
                                 _KEY, _INTERP, reset_to_zero=["DQ_ACC"], pre_hook=_size_descriptors)
_dq_launch = C.Launcher(_dq_kernel, _configs(_DQ_CONFIGS), prune_by_head_dim, _KEY, _INTERP,
                        pre_hook=_size_descriptors)
_merged_launch = C.Launcher(_bwd_kernel, [_merged_config(d, kv, dq) for d, pairs in _MERGED_CONFIGS.items()
                                          for kv, dq in pairs], prune_by_head_dim, _KEY[:-1],
                            dict(_INTERP, DQ_BLOCK_M=_INTERP["BLOCK_M"], DQ_BLOCK_N=_INTERP["BLOCK_N"]))

# Tile loads of the backward's inner loops (Q and dO in the dK/dV pass, K and V in the dQ pass) through tensor
# descriptors made on the host over the whole tensors (TMA on Hopper): off by default (None), on where the tensors
# allow it (`C.descriptors_ok`) with True or HF_FLASHATTN_BWD_TMA=1. Measured on the H200: the passes alone are
# +3-8% at 1k tokens, within ±3% at 4k, -1 to -5% at 16k (results/2026-11-26-h200-sweep-bwd-tma.md), but fwd+bwd
# with it at 512-1k tokens, where the host's launch work shows, lost 25-45% (four descriptors made and converted a
# call; results/2026-11-26-h200-bench-2.md), so no default takes it. TMA_BELOW bounds it when on.
TMA = {"0": False, "1": True}.get(env_get("HF_FLASHATTN_BWD_TMA", ""))
TMA_BELOW = 4096
# The dQ pass's key blocks (`_dq_loop`) and the dK/dV pass's query blocks (`_dkdv_loop`) in one loop each instead of
# three, as v2's forward (`v2.ONE_LOOP`). On the H100 (results/2026-11-27-h100-bwd-one-loop.md, fwd+bwd with v2's
# forward one-loop too, rounds in one process): 3.4-10.9% faster at d64-d256 512-1k; bitwise equal to the three loops
# (there, and config by config in results/2026-11-27-h100-probe-one-loop.md). HF_FLASHATTN_ONE_LOOP=0 at import
# turns it off (v2.ONE_LOOP's note).
ONE_LOOP = env_get("HF_FLASHATTN_ONE_LOOP", "1") == "1"
# The masked blocks skip the window bound that cannot fail when the window has no left edge (`visible`'s LEFT / RIGHT:
# the dQ pass and the queries x keys dK/dV tiles the lower bound, the keys x queries tiles the upper one), as the
# forward does since the twentieth session (`_common.SKIP_LEFT`, which turns both off). False: every bound tested in
# the backward only (benchmarks/probe_bwd_tma.py's `bwdleft`). Bitwise equal either way (tests/test_kernels.py).
SKIP_LEFT = True
# Where the passes take `grouped_rank`'s groups (GROUP_TILES["v2_bwd"] tiles a group) rather than their grids' own
# order (each pair's tiles in a row), per head-dim class: (from keys, below keys, only under a mask). A list-scheduling
# model of d256's tiles predicted 6-8% of the backward under a causal mask at 512-4k and nothing without one. Measured
# on the H100 (results/2026-11-27-h100-probe-bwd-order-{1,2,3,4,5}.md, fwd+bwd in rounds in one process, bitwise equal),
# grouped over the grids' order: d64 causal 4k 1.05-1.08x, 16k 1.05x; d128 causal 4k 1.01-1.02x; but d64 / d128 at
# 512-1k 0.97-0.98x with or without a mask (within that method's noise there: up to 6% between identical variants,
# probe-bwd-order-5), d64 16k unmasked 0.99x. d256 (merged launch): 1k 1.025-1.04x unmasked (three probes), 1.03x
# causal, 512 and 4k-16k 0.98-1.01x. Hence: d64 / d128 under a mask from 4k keys, d256 at 1k-2k keys.
GROUP_RULE = {64: (4096, 1 << 62, True), 128: (4096, 1 << 62, True), 256: (1024, 4096, False)}
# Head-dim classes whose two passes run as one launch (`_bwd_kernel`; not with TMA or atomic dQ): the dQ programs fill
# the SMs the dK/dV pass's last wave leaves idle. Predicted from a list-scheduling model of d256's tiles (one program
# an SM, a tile's cost its matmuls): 2% of the backward unmasked, 1-3% more under a causal mask at 512-4k. Measured on
# the H100 (results/2026-11-27-h100-probe-bwd-order-{1,2,3}.md, fwd+bwd in rounds in one process): d256 1.6% at 512,
# 2-6% at 1k-16k; d128 0-4% at 512-4k but 1-2% slower at 16k; d64 6-15% slower (one kernel has the larger register
# count of its two programs: d64's dQ programs, 161 registers alone, three an SM, get the dK/dV programs' 255, two an
# SM): d256 only.
# HF_FLASHATTN_BWD_MERGE (read at import): the classes as a comma list ("" none, "64,128,256" all).
MERGE = {c: str(c) in env_get("HF_FLASHATTN_BWD_MERGE", "256").split(",") for c in (64, 128, 256)}
# Where the passes are two launches (not `MERGE`, not atomic dQ): the dQ pass runs first and computes Delta =
# rowsum(dO ∘ O) of its rows itself (`_dq_program`'s DELTA_HERE: O's tile one more load a program, dO's already
# there), storing it for the dK/dV pass that follows, instead of a preprocess launch reading O and dO once more.
# False: the preprocess launch, then dK/dV, then dQ (the order before the twenty-fifth session; benchmarks compare).
DELTA_IN_DQ = True


def backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
             window_size, softcap, atomic_dq=False, grads=None):
    """atomic_dq=False: the deterministic two-pass backward (dK/dV pass, then dQ pass). atomic_dq=True:
    FA2's single pass, dQ accumulated with float32 atomics from the dK/dV programs (5 matmuls instead
    of 7; summation order varies run to run). grads: (dq, dk, dv) to write into (q's, k's and v's shapes and dtype,
    any strides with the last dim contiguous: the views of a packed tensor's gradient, `interface`'s packed
    functions), else made here."""
    varlen = cu_seqlens_q is not None
    H, D = q.shape[-2], q.shape[-1]
    Hk = k.shape[-2]
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    # packed: zero-filled, as rows outside every sequence get no program and must read as 0; dense: every row is
    # written by a program (the dK/dV programs store even when no query sees their keys), so no fill (three memsets
    # of the gradients' size a call, ~7% of a fwd+bwd at 1k tokens)
    new = C.grad_maker(grads, varlen)
    dk = new(1, k)
    dv = new(2, v)
    if q.numel() == 0 or k.numel() == 0 or batch == 0:
        return new(0, q).zero_(), dk.zero_(), dv.zero_()
    if do.stride(-1) != 1:
        do = do.contiguous()
    BLOCK_D = max(C.pow2(D), 16)
    d_class = C.head_dim_class(D)
    stride_l = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    delta = torch.empty_like(lse)
    pre_bm = 64 if not is_interpreting() else 32
    left, right = C.window_args(window_size, max_seqlen_q, max_seqlen_k)
    # the direct launches' key (`v2._site_key`): dO and lse are given (strides, alignment); out is the forward's
    site = _site_key(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, left, right, do.stride(),
                     do.data_ptr() & 15, out.stride(), lse.stride(), softcap > 0, atomic_dq, C.grads_key(grads))
    tma = bool(TMA) and max(max_seqlen_q, max_seqlen_k) < TMA_BELOW and q.dtype in (torch.float16, torch.bfloat16) \
        and C.descriptors_ok(q, k, v, do)
    merged = MERGE[d_class] and not atomic_dq and not tma
    # the two launches' dQ pass first, computing Delta itself (`DELTA_IN_DQ`); else the preprocess launch
    delta_in_dq = DELTA_IN_DQ and not merged and not atomic_dq
    if not delta_in_dq:
        _preprocess_launch.keyed(site, (C.cdiv(max_seqlen_q, pre_bm), H, batch),
                                 out, do, delta, cu_seqlens_q, *C.seq_layout(out, varlen), *C.seq_layout(do, varlen),
                                 *stride_l, max_seqlen_q, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=pre_bm,
                                 IS_VARLEN=varlen)
    qk_scale, cap_scale = C.score_scales(softmax_scale, softcap)
    # d(score in log2 units)/d(qk) = qk_scale * cap_scale (with softcap, times 1 - tanh², in-kernel);
    # the kernels' dS is w.r.t. the natural-log score, i.e. dS_log2 / log2(e).
    ds_scale = qk_scale * cap_scale / C.LOG2E
    common = (max_seqlen_q, max_seqlen_k, left, right, qk_scale, cap_scale, ds_scale,
              C.tune_bucket(max(max_seqlen_q, max_seqlen_k), batch * H, q.device), C.mask_kind(window_size), H // Hk)
    # `grouped_rank`'s L2 bound, pairs (sequence, head) a group: the dK/dV programs of a kv head stream the Q and dO of
    # its group's heads, the dQ programs of a head its K and V
    l2 = C.GROUP_L2_ELEMS.value
    from_keys, below_keys, masked_only = GROUP_RULE[d_class]
    grouped = from_keys <= max_seqlen_k < below_keys and (C.mask_kind(window_size) > 0 or not masked_only)
    tiles = C.group_tiles("v2_bwd") if grouped else 1
    order_dkdv = (max(1, l2 // (2 * D * (H // Hk) * max(max_seqlen_q, 1))), tiles)
    order_dq = (max(1, l2 // (2 * D * max(max_seqlen_k, 1))), tiles)
    meta = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, IS_VARLEN=varlen, SOFTCAP=softcap > 0,
                DOT_PREC=C.dot_precision(q.dtype), LEFT=C.left_edge(window_size) or not SKIP_LEFT)
    lay = [C.seq_layout(t, varlen) for t in (q, k, v, do)]
    # placeholders when not TMA (pointer arguments the kernels do not read); the blocks are sized per launch
    descs = [C.host_descriptor(t, 16, BLOCK_D, varlen) if tma else t for t in (q, do, k, v)]
    meta["TMA"] = tma
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic_dq else None
    dq_strides = C.seq_layout(dq_acc, varlen) if atomic_dq else (0, 0, 0)
    if merged:
        dq = new(0, q)
        _merged_launch(lambda m: (math.prod(dkdv_grid(max_seqlen_k, Hk, batch)(m))
                                  + C.cdiv(max_seqlen_q, m["DQ_BLOCK_M"]) * H * batch,),
                       (q, k, v, do, lse, delta, dk, dv, dq, cu_seqlens_q, cu_seqlens_k, *lay[0], *lay[1], *lay[2],
                        *lay[3], *C.seq_layout(dk, varlen), *C.seq_layout(dv, varlen), *C.seq_layout(dq, varlen),
                        *stride_l, *common, order_dkdv[0], *order_dq, batch, Hk),
                       dict({n: x for n, x in meta.items() if n != "TMA"}, ONE_LOOP=ONE_LOOP),
                       site_key=site + ("merged", ONE_LOOP, meta["LEFT"]))
        return dq, dk, dv
    def dq_pass():
        out_dq = new(0, q)
        _dq_launch(lambda m: (C.cdiv(max_seqlen_q, m["BLOCK_M"]), H, batch),
                   (q, k, v, do, lse, delta, out_dq, descs[2], descs[3], cu_seqlens_q, cu_seqlens_k, out, *lay[0],
                    *lay[1], *lay[2], *lay[3], *C.seq_layout(out_dq, varlen), *C.seq_layout(out, varlen), *stride_l,
                    *common, *order_dq), dict(meta, ONE_LOOP=ONE_LOOP, DELTA_HERE=delta_in_dq),
                   site_key=site + (tma, ONE_LOOP, meta["LEFT"], delta_in_dq))
        return out_dq
    dq = dq_pass() if delta_in_dq else None   # Delta is then the dQ pass's output too, read by the dK/dV pass
    launch = _dkdv_atomic_launch if atomic_dq else _dkdv_launch
    launch(dkdv_grid(max_seqlen_k, Hk, batch),
           (q, k, v, do, lse, delta, dk, dv, dq_acc, descs[0], descs[1], cu_seqlens_q, cu_seqlens_k, *lay[0], *lay[1],
            *lay[2], *lay[3],
            *C.seq_layout(dk, varlen), *C.seq_layout(dv, varlen), *dq_strides, *stride_l, *common, *order_dkdv),
           dict(meta, ATOMIC_DQ=atomic_dq, ONE_LOOP=ONE_LOOP), site_key=site + (tma, ONE_LOOP, meta["LEFT"]))
    if atomic_dq:
        return (dq_acc.to(q.dtype) if grads is None else grads[0].copy_(dq_acc)), dk, dv
    return (dq if delta_in_dq else dq_pass()), dk, dv


_preprocess_launch = C.FastLaunch(_preprocess_kernel)
