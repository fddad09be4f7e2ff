"""FlashAttention-2 forward in Triton (arXiv 2307.08691, Algorithm 1), plus the backend entry points.

Q blocks outer (one program each), K/V blocks inner; the output accumulator, running row max m and
row sum l stay in registers and O is normalised once at the end (deferred rescale); only the
logsumexp is written for the backward pass. Causal and windowed blocks that no row can see are never
visited, and only the partially visible blocks on the band's edges are masked. GQA/MQA: query head
h reads key/value head h // GROUP by pointer arithmetic. Packed sequences (varlen) read their
offsets from cu_seqlens. The backward kernels live in v2_bwd.py.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._runtime import env_get, is_hopper
from . import _common as C
from ._common import (body_end, grouped_tile, load_rows_pair, log2_scores, normalise_rows, seq_bounds, softmax_step,
                      softmax_tile, tile_range, visible)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, start, end,
               offs_m, offs_n, offs_d, Sk, diag, left, right, qk_scale, cap_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
               KMASK_base=None, HAS_KMASK: tl.constexpr = False, FOLD: tl.constexpr = False,
               LEFT: tl.constexpr = True):
    # KMASK_base (decode only): a per-key padding mask (nonzero = attend), applied on top of the window
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = K_base + cols[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = V_base + cols[:, None] * stride_vn + offs_d[None, :]
        # -- load k, v (the d-padding and, on the edge blocks, the key tail are masked) --
        k, v = load_rows_pair(k_ptrs, v_ptrs, cols, Sk, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        acc, l_i, m_i = kv_block(acc, l_i, m_i, q, k, v, offs_m, cols, Sk, diag, left, right, qk_scale, cap_scale,
                                 MASKED, SOFTCAP, DOT_PREC, KMASK_base, HAS_KMASK, FOLD, LEFT)
    return acc, l_i, m_i


@triton.jit
def _fwd_loop(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, lo, hi, full_lo, full_hi, offs_m, offs_n, offs_d,
              Sk, diag, left, right, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_PREC: tl.constexpr, LEFT: tl.constexpr, EDGE: tl.constexpr = True):
    """Every key block of the tile, [lo, hi), in one pipelined loop (the scale folded, no softcap: the kernel's
    ONE_LOOP), so that a tile sets up one software pipeline instead of three (`_fwd_inner`'s): the scores of the
    blocks outside the band [full_lo, full_hi) masked in a branch on the block's position; the block that crosses the
    key tail Sk (at most one) after the loop, its loads masked, so that the loop's loads need no mask."""
    body_hi = body_end(lo, hi, Sk, BLOCK_N)
    for start_n in range(lo, body_hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = K_base + cols[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = V_base + cols[:, None] * stride_vn + offs_d[None, :]
        k, v = load_rows_pair(k_ptrs, v_ptrs, cols, Sk, offs_d, HEAD_DIM, BLOCK_D, False)
        acc, l_i, m_i = kv_block(acc, l_i, m_i, q, k, v, offs_m, cols, Sk, diag, left, right, qk_scale, 1.0, False,
                                 False, DOT_PREC, None, False, True, LEFT, (start_n < full_lo) | (start_n >= full_hi),
                                 EDGE)
    if body_hi < hi:
        cols = body_hi + offs_n
        k, v = load_rows_pair(K_base + cols[:, None] * stride_kn + offs_d[None, :],
                              V_base + cols[:, None] * stride_vn + offs_d[None, :], cols, Sk, offs_d, HEAD_DIM,
                              BLOCK_D, True)
        acc, l_i, m_i = kv_block(acc, l_i, m_i, q, k, v, offs_m, cols, Sk, diag, left, right, qk_scale, 1.0, True,
                                 False, DOT_PREC, None, False, True, LEFT)
    return acc, l_i, m_i


@triton.jit
def kv_block(acc, l_i, m_i, q, k, v, offs_m, cols, Sk, diag, left, right, qk_scale, cap_scale, MASKED: tl.constexpr,
             SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, KMASK_base, HAS_KMASK: tl.constexpr,
             FOLD: tl.constexpr = False, LEFT: tl.constexpr = True, edge=False, EDGE: tl.constexpr = False):
    """One key block of `_fwd_inner`'s loop once k and v are loaded (columns `cols`): the scores in log2 units, the
    mask (MASKED: the window and the key tail; HAS_KMASK: the per-key padding mask), the online-softmax update of m_i
    and l_i (a row that has seen nothing yet keeps m = -inf and is shifted by 0) and of the accumulator. FOLD (no
    softcap, no per-key mask, a positive scale: the caller's condition): the scale folded into the exponent
    (`softmax_tile`), as v3's kernels; with EDGE (and MASKED False) the mask is taken in a branch when the run-time
    `edge` is true (`_fwd_loop`'s blocks off the band). LEFT False: the window has no left edge (`visible`'s). Also the
    decode kernel's loop over descriptor-loaded blocks (decode._decode_inner_tma)."""
    if FOLD:
        acc, l_i, m_new = fold_update(acc, l_i, m_i, tl.dot(q, tl.trans(k), input_precision=DOT_PREC), v, offs_m,
                                      cols, Sk, diag, left, right, qk_scale, cap_scale, MASKED, SOFTCAP, DOT_PREC,
                                      LEFT, edge, EDGE)
    else:
        s, _ = log2_scores(q, k, qk_scale, cap_scale, SOFTCAP, DOT_PREC)
        if MASKED:
            s = tl.where(visible(offs_m, cols, diag, left, right, Sk, LEFT), s, float("-inf"))
        if HAS_KMASK:
            keep = tl.load(KMASK_base + cols, mask=cols < Sk, other=0)
            s = tl.where(keep[None, :] != 0, s, float("-inf"))
        p, alpha, m_new, l_i = softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def fold_update(acc, l_i, m_i, qk, v, offs_m, cols, Sk, diag, left, right, qk_scale, cap_scale, MASKED: tl.constexpr,
                SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, LEFT: tl.constexpr, edge, EDGE: tl.constexpr,
                SEEN: tl.constexpr = False):
    """`kv_block`'s FOLD step once the raw scores qk = q·kᵀ of the block are computed: the mask (MASKED always; EDGE:
    in a branch when the run-time `edge` is true), the online-softmax update with the scale folded into the exponent,
    and P·V into the accumulator. SEEN (no window, no softcap): every row sees a key of the block (its running max is
    finite after it), so the update needs no guard for a row that has seen nothing."""
    if SEEN:
        if MASKED:   # the key tail only: the window's bounds cannot cut a row here
            qk = tl.where(cols[None, :] < Sk, qk, float("-inf"))
        p, alpha, m_new, l_i = softmax_tile(qk, m_i, l_i, 1.0, qk_scale, cap_scale, offs_m, cols, Sk, diag, left,
                                            right, False, SOFTCAP, True, False, LEFT, True)
    else:
        if EDGE:
            if edge:
                qk = tl.where(visible(offs_m, cols, diag, left, right, Sk, LEFT), qk, float("-inf"))
        p, alpha, m_new, l_i = softmax_tile(qk, m_i, l_i, 1.0, qk_scale, cap_scale, offs_m, cols, Sk, diag, left,
                                            right, MASKED, SOFTCAP, True, False, LEFT)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _halves_range(acc0, l0, m0, q0, rows0, acc1, l1, m1, q1, rows1, K_base, V_base, stride_kn, stride_vn, start, end,
                  offs_n, offs_d, Sk, diag, left, right, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr, LEFT: tl.constexpr,
                  SEEN: tl.constexpr = False):
    """The key blocks [start, end) of a program that owns two row tiles (the kernel's HALVES), as `_fwd_inner`'s loop:
    each key and value block loaded once, both halves' scores computed first, then each half's softmax and P·V. Two
    independent chains a warpgroup: Triton issues a half's P·V asynchronously, and it runs on the tensor cores under
    the other half's exponentials. The loop body has no branch (MASKED is a compile-time choice, as in the three-loop
    kernel): a branch in it makes Triton wait for every product before it, which takes the overlap away (a one-loop
    form with the mask in a branch ran d128 512 at 0.88x SDPA-flash, the branch-free loops at 1.03x and the probe's
    kernel at 1.28x: results/2026-11-28-h100-probe-two-halves-{2,3}.md). A row of one half that sees nothing of a
    block the other half needs gets p = 0 there (alpha 1, or 0 while the row has seen nothing)."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k, v = load_rows_pair(K_base + cols[:, None] * stride_kn + offs_d[None, :],
                              V_base + cols[:, None] * stride_vn + offs_d[None, :], cols, Sk, offs_d, HEAD_DIM,
                              BLOCK_D, MASKED)
        acc0, l0, m0, acc1, l1, m1 = _halves_block(acc0, l0, m0, q0, rows0, acc1, l1, m1, q1, rows1, k, v, cols, Sk,
                                                   diag, left, right, qk_scale, DOT_PREC, LEFT, MASKED, SEEN)
    return acc0, l0, m0, acc1, l1, m1


@triton.jit
def _halves_block(acc0, l0, m0, q0, rows0, acc1, l1, m1, q1, rows1, k, v, cols, Sk, diag, left, right, qk_scale,
                  DOT_PREC: tl.constexpr, LEFT: tl.constexpr, MASKED: tl.constexpr, SEEN: tl.constexpr = False):
    """One key block of `_halves_range`: both halves' scores, then each half's `fold_update`."""
    kt = tl.trans(k)
    qk0 = tl.dot(q0, kt, input_precision=DOT_PREC)
    qk1 = tl.dot(q1, kt, input_precision=DOT_PREC)
    acc0, l0, m0 = fold_update(acc0, l0, m0, qk0, v, rows0, cols, Sk, diag, left, right, qk_scale, 1.0, MASKED, False,
                               DOT_PREC, LEFT, False, False, SEEN)
    acc1, l1, m1 = fold_update(acc1, l1, m1, qk1, v, rows1, cols, Sk, diag, left, right, qk_scale, 1.0, MASKED, False,
                               DOT_PREC, LEFT, False, False, SEEN)
    return acc0, l0, m0, acc1, l1, m1


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window_left", "window_right", "SEQ_BUCKET",
                             "MASK_KIND", "group", "group_tiles", "stagger_lo", "stagger_hi", "stagger_ns",
                             "stagger_ramp"])
def _fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K,
                stride_qb, stride_qm, stride_qh,
                stride_kb, stride_kn, stride_kh,
                stride_vb, stride_vn, stride_vh,
                stride_ob, stride_om, stride_oh,
                stride_lb, stride_lh,
                seqlen_q, seqlen_k, window_left, window_right, qk_scale, cap_scale, SEQ_BUCKET, MASK_KIND,
                group, group_tiles, stagger_lo, stagger_hi, stagger_ns, stagger_ramp,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr,
                SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, D_CLASS: tl.constexpr, FOLD: tl.constexpr = False,
                LEFT: tl.constexpr = True, ONE_LOOP: tl.constexpr = False, STAGGER: tl.constexpr = False,
                HALVES: tl.constexpr = False, NO_MASK: tl.constexpr = False, EVEN: tl.constexpr = False):
    # Grid: (cdiv(max_seqlen_q, BLOCK_M), nheads, batch). One program computes the BLOCK_M rows of O and lse of one
    # (query block, head, sequence), walking the visible key blocks; programs take their tiles in `grouped_tile`'s
    # order. HALVES (with FOLD, without softcap): the BLOCK_M rows as two tiles of BLOCK_M / 2, separate products and
    # softmaxes over each key block loaded once (`_halves_range`). NO_MASK: no causal mask and no window (every tile's
    # blocks are the band and at most one block across the key tail): HALVES then takes its tiles in the grid's own
    # order (equal tiles: `grouped_tile`'s heaviest-first order buys nothing, and its start cost and head groups
    # measured 5% at d128 512, results/2026-11-28-h100-probe-two-halves-bisect.md). EVEN (dense, seqlen_q a multiple of
    # 128, seqlen_k a positive multiple of 64): HALVES' row loads and stores need no row mask, and with NO_MASK every
    # row sees a key and there is no key-tail block (compiled in, that block changed ptxas' code for the band loop: the
    # loop's addresses left the uniform datapath, and 128 x 64 spilled 40 bytes; sm_90a, Triton 3.6).
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(not (HALVES and EVEN) or 64 % BLOCK_N == 0, "EVEN's seqlen_k is a multiple of 64, not BLOCK_N")
    if STAGGER:   # the second wave's starts spread (`STAGGER` below)
        C.stagger(C.launch_index(), stagger_lo, stagger_hi, stagger_ns, stagger_ramp)
    if HALVES and NO_MASK:
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
    else:
        pid_m, h, b = grouped_tile(seqlen_k, group_tiles, HEAD_DIM)   # heaviest (last, under causal) blocks first
    b = b.to(tl.int64)
    q_start, k_start, Sq, Sk = seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    # a packed batch's grid covers its longest sequence; a dense call's tiles all lie in the sequence (HALVES leaves the
    # test out there: its early return had ptxas spill 48 bytes around the band loop of 128 x 64, none without it)
    if IS_VARLEN or not HALVES:
        if m0 >= Sq:
            return
    kvh = (h // group).to(tl.int64)
    h64 = h.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    Q_base = Q + b * stride_qb + h64 * stride_qh + q_start * stride_qm
    K_base = K + b * stride_kb + kvh * stride_kh + k_start * stride_kn
    V_base = V + b * stride_vb + kvh * stride_vh + k_start * stride_vn
    O_base = O + b * stride_ob + h64 * stride_oh + q_start * stride_om
    LSE_base = LSE + b * stride_lb + h64 * stride_lh + q_start
    diag = Sk - Sq
    lo, full_lo, full_hi, hi = tile_range(m0, BLOCK_M, diag, window_left, window_right, Sk, BLOCK_N)
    if HALVES:
        tl.static_assert(FOLD and not SOFTCAP, "HALVES is written for the folded scale without softcap (`prune_fwd`)")
        rows0 = m0 + tl.arange(0, BLOCK_M // 2)
        rows1 = rows0 + BLOCK_M // 2
        q0 = _load_rows(Q_base, rows0, Sq, stride_qm, offs_d, HEAD_DIM, BLOCK_D, EVEN)
        q1 = _load_rows(Q_base, rows1, Sq, stride_qm, offs_d, HEAD_DIM, BLOCK_D, EVEN)
        m0_i = tl.full([BLOCK_M // 2], float("-inf"), dtype=tl.float32)
        l0_i = tl.zeros([BLOCK_M // 2], dtype=tl.float32)
        acc0 = tl.zeros([BLOCK_M // 2, BLOCK_D], dtype=tl.float32)
        m1_i = tl.full([BLOCK_M // 2], float("-inf"), dtype=tl.float32)
        l1_i = tl.zeros([BLOCK_M // 2], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_M // 2, BLOCK_D], dtype=tl.float32)
        if not NO_MASK:   # the window's left edge (masked)
            acc0, l0_i, m0_i, acc1, l1_i, m1_i = _halves_range(
                acc0, l0_i, m0_i, q0, rows0, acc1, l1_i, m1_i, q1, rows1, K_base, V_base, stride_kn, stride_vn, lo,
                full_lo, offs_n, offs_d, Sk, diag, window_left, window_right, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N,
                True, DOT_PREC, LEFT)
        # the band both halves see whole (without a mask: every block below the key tail)
        acc0, l0_i, m0_i, acc1, l1_i, m1_i = _halves_range(
            acc0, l0_i, m0_i, q0, rows0, acc1, l1_i, m1_i, q1, rows1, K_base, V_base, stride_kn, stride_vn, full_lo,
            full_hi, offs_n, offs_d, Sk, diag, window_left, window_right, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False,
            DOT_PREC, LEFT, NO_MASK)
        if not NO_MASK:   # the diagonal / right edge and the key tail (masked)
            acc0, l0_i, m0_i, acc1, l1_i, m1_i = _halves_range(
                acc0, l0_i, m0_i, q0, rows0, acc1, l1_i, m1_i, q1, rows1, K_base, V_base, stride_kn, stride_vn,
                full_hi, hi, offs_n, offs_d, Sk, diag, window_left, window_right, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N,
                True, DOT_PREC, LEFT)
        elif not EVEN:   # the block across the key tail, if any: one block, not a loop (EVEN: none)
            if full_hi < hi:
                cols = full_hi + offs_n
                k, v = load_rows_pair(K_base + cols[:, None] * stride_kn + offs_d[None, :],
                                      V_base + cols[:, None] * stride_vn + offs_d[None, :], cols, Sk, offs_d, HEAD_DIM,
                                      BLOCK_D, True)
                acc0, l0_i, m0_i, acc1, l1_i, m1_i = _halves_block(
                    acc0, l0_i, m0_i, q0, rows0, acc1, l1_i, m1_i, q1, rows1, k, v, cols, Sk, diag, window_left,
                    window_right, qk_scale, DOT_PREC, LEFT, True, True)
        # every row has seen a key where there is no mask and every sequence has keys (EVEN's seqlen_k >= 1)
        _store_rows(O_base, LSE_base, acc0, l0_i, m0_i, rows0, Sq, stride_om, offs_d, HEAD_DIM, BLOCK_D, EVEN,
                    EVEN and NO_MASK)
        _store_rows(O_base, LSE_base, acc1, l1_i, m1_i, rows1, Sq, stride_om, offs_d, HEAD_DIM, BLOCK_D, EVEN,
                    EVEN and NO_MASK)
    else:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _load_rows(Q_base, offs_m, Sq, stride_qm, offs_d, HEAD_DIM, BLOCK_D)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if ONE_LOOP:   # the scale folded, no softcap: every block in one loop (`_fwd_loop`)
            acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, lo, hi, full_lo,
                                      full_hi, offs_m, offs_n, offs_d, Sk, diag, window_left, window_right, qk_scale,
                                      HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC, LEFT,
                                      EDGE_BRANCH_KEPT or not NO_MASK)
        else:
            # left edge of a sliding window (masked), the band every row sees (unmasked), the diagonal /
            # right edge and the key tail (masked)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, lo, full_lo,
                                       offs_m, offs_n, offs_d, Sk, diag, window_left, window_right, qk_scale,
                                       cap_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, SOFTCAP, DOT_PREC,
                                       FOLD=FOLD, LEFT=LEFT)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, full_lo, full_hi,
                                       offs_m, offs_n, offs_d, Sk, diag, window_left, window_right, qk_scale,
                                       cap_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, SOFTCAP, DOT_PREC,
                                       FOLD=FOLD, LEFT=LEFT)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, full_hi, hi,
                                       offs_m, offs_n, offs_d, Sk, diag, window_left, window_right, qk_scale,
                                       cap_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, SOFTCAP, DOT_PREC,
                                       FOLD=FOLD, LEFT=LEFT)
        _store_rows(O_base, LSE_base, acc, l_i, m_i, offs_m, Sq, stride_om, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _load_rows(Q_base, rows, Sq, stride_qm, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               EVEN: tl.constexpr = False):
    """The query rows `rows` (those from Sq on, and the head dim's padding, read as 0; EVEN: every row exists)."""
    if EVEN:
        ptrs = Q_base + rows[:, None] * stride_qm + offs_d[None, :]
        if BLOCK_D == HEAD_DIM:
            q = tl.load(ptrs)
        else:
            q = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        q = tl.load(Q_base + rows[:, None] * stride_qm + offs_d[None, :],
                    mask=(rows < Sq)[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return q


@triton.jit
def _store_rows(O_base, LSE_base, acc, l_i, m_i, rows, Sq, stride_om, offs_d, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, EVEN: tl.constexpr = False, SEEN: tl.constexpr = False):
    """The forward's epilogue for rows `rows`: normalise once; rows that saw no key get O = 0 and lse = +inf (as
    flash-attn; SEEN: every row has seen a key, no guard); rows from Sq on are not written (EVEN: every row exists)."""
    if EVEN:
        if SEEN:
            acc = acc / l_i[:, None]
            lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
        else:
            acc, lse = normalise_rows(acc, l_i, m_i, float("inf"))
        tl.store(LSE_base + rows, lse)
        ptrs = O_base + rows[:, None] * stride_om + offs_d[None, :]
        if BLOCK_D == HEAD_DIM:
            tl.store(ptrs, acc.to(O_base.dtype.element_ty))
        else:
            tl.store(ptrs, acc.to(O_base.dtype.element_ty), mask=offs_d[None, :] < HEAD_DIM)
    else:   # (SEEN is only passed with EVEN)
        row_ok = rows < Sq
        acc, lse = normalise_rows(acc, l_i, m_i, float("inf"))
        tl.store(LSE_base + rows, lse, mask=row_ok)
        tl.store(O_base + rows[:, None] * stride_om + offs_d[None, :], acc.to(O_base.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------
# launch configuration: data, with a named prune function (GPU); fixed small tiles on the interpreter
# (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]), best guess first. Few on purpose: each costs a compile.
# maxnreg: ptxas' register cap, so that more programs share an SM (Triton leaves ptxas free to take 255 registers
# a thread). Measured on the H100 against the autotuner's pick without caps (results/2026-11-27-h100-plan-ab-v2-
# caps.md, same process): d64 64 x 64 at 128 registers (four programs an SM, no spills) 6-9% faster at 512-1k;
# d128 128 x 64 / 8 warps at 128 (two programs an SM, 312 bytes of spills) 5-6% faster at 512-1k unmasked, 5-7%
# slower causal; d128 64 x 32 at 168 (three programs an SM) 6% faster at 512 causal.
# HALVES (a 6th element True): a four-warp program owns two 64-row tiles, separate products over each key block loaded
# once (`_halves_range`); d64 and d128 only (at d256 two 64 x 256 float32 accumulators alone fill a warpgroup's
# registers). On the H100 the grid's 512-1k forwards with them (results/2026-11-28-h100-bench-v2-short-halves.md,
# against -twenty-fifth-short.md): d128 unmasked 1.11 / 1.21x -> 1.19 / 1.31x SDPA-flash at 512 / 1k, d64 unmasked
# 1.30 / 1.34x -> 1.35 / 1.47x, the causal forwards within noise. How it got there: benchmarks/NOTES.md, thirtieth
# session. Without the key-tail block and the early-exit test on EVEN calls (thirty-first session), on the H200: d128
# unmasked 1.20 -> 1.28x at 512, 1.33 -> 1.44x at 1k (results/2026-11-28-h200-bench-v2-{short,512-even,1k-4k-even}.md).
_FWD_CONFIGS = {64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3, 128), (128, 64, 4, 3, None, True)],
                128: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2, 128), (64, 32, 4, 3, 168),
                      (128, 64, 4, 2, None, True), (128, 32, 4, 3, None, True)],
                256: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2)]}


def _fwd_config(d_class, bm, bn, w, s, maxnreg=None, halves=False):
    """One forward config: (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg[, halves]]) of head-dim class d_class
    (also what the benchmarks force, `_fwd_launch.force`); halves: the kernel's HALVES (BLOCK_M rows a program as two
    tiles of BLOCK_M / 2)."""
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "D_CLASS": d_class}
    if halves:
        kw["HALVES"] = True
    return triton.Config(kw, num_warps=w, num_stages=s, maxnreg=maxnreg)


def _fwd_configs():
    return [_fwd_config(d, *c) for d, cfgs in _FWD_CONFIGS.items() for c in cfgs]


def prune_by_head_dim(configs, named_args, **kwargs):
    """Keep the configs written for this head-dim class (<= 64, <= 128, <= 256)."""
    cls = C.head_dim_class(kwargs.get("BLOCK_D", named_args.get("BLOCK_D")))
    return [c for c in configs if c.kwargs["D_CLASS"] == cls]


def prune_fwd(configs, named_args, **kwargs):
    """The forward's configs of this head-dim class; the HALVES configs only where the scale is folded into the
    exponent and there is no softcap (what `_halves_block` is written for)."""
    keep = prune_by_head_dim(configs, named_args, **kwargs)
    return [c for c in keep if (kwargs.get("FOLD") and not kwargs.get("SOFTCAP")) or not c.kwargs.get("HALVES")]


_fwd_launch = C.Launcher(_fwd_kernel, _fwd_configs(), prune_fwd,
                         key=["BLOCK_D", "IS_VARLEN", "SOFTCAP", "DOT_PREC", "SEQ_BUCKET", "MASK_KIND"],
                         interp_meta={"BLOCK_M": 32, "BLOCK_N": 16, "D_CLASS": 0})


# The forward's scale folded into the exponent (`kv_block`'s FOLD) where it applies; False: the scores scaled first (the
# kernel before the nineteenth session; benchmarks compare the two). On the H100 (results/2026-11-27-h100-probe-tile-
# order-fold.md, rounds in one process): 1.01-1.03x at most points, 1.10x at d64 8k causal, 0.98x at d256 1k causal.
FOLD = True

# Every key block in one pipelined loop (`_fwd_loop`, with FOLD) instead of three (`_fwd_inner`'s left edge, band,
# diagonal/tail), each of which sets up its software pipeline per tile even when it runs no block; the loads are then
# masked at the key tail on every block. SASS in benchmarks/NOTES.md (twentieth session). On the H100
# (results/2026-11-27-h100-plan-ab2-one-loop.md, rounds in one process, autotuned picks): 1.2-8.5% faster at d64-d256
# 512-1k, most under a causal mask; bitwise equal to the three loops, config by config
# (results/2026-11-27-h100-probe-one-loop.md). HF_FLASHATTN_ONE_LOOP=0 at import turns it off (and v2_bwd's), =1 turns
# v3.py's on too.
ONE_LOOP = env_get("HF_FLASHATTN_ONE_LOOP", "1") == "1"
# ONE_LOOP under a mask (causal, window): the mask is taken in a branch on the block's position. Up to Triton 3.8 the
# branch stays a branch; Triton 3.9 if-converts it, so every block computes the mask and selects its scores (sm_90a,
# d256 128 x 64: 706 instructions in the loop against 595 on 3.6, and 248 bytes of spills, 46 local loads a block;
# benchmarks/NOTES.md, thirty-fifth session). From 3.9 the masked calls take the three loops, whose band loop has no
# mask; calls without a mask keep the one loop, compiled without the branch (`_fwd_loop`'s EDGE).
ONE_LOOP_MASKED = C.TRITON_VERSION < (3, 9)
# Whether the one loop without a mask still compiles the (never taken) mask branch: kept where the branch stays a branch
# (up to 3.8), so that the kernels measured there are unchanged (on 3.6 dropping it spilled 24 bytes outside the loop
# at d256, and the d256 512 forward measured 1.266x against 1.276x SDPA-flash in another process: no gain shown).
EDGE_BRANCH_KEPT = tl.constexpr(C.TRITON_VERSION < (3, 9))


# The second wave's starts spread over half a tile's time (`_stagger_args`, `_common.stagger`): where every tile takes
# the same time and one program fills an SM (head-dim class 256, no mask, dense), the SMs run in step, every one
# loading its Q tile and storing its O tile at the same moments as the others, and HBM is contended there while the
# tensor cores idle. Delaying the programs of the second wave by 0 .. half a tile's time, in launch order, puts the
# SMs out of step for the rest of the launch, at the price of that idle start. On the H100 (rounds in one process,
# bitwise equal results; benchmarks/NOTES.md, twenty-fourth session): 0.95x the time at 512 keys (four probes), 0.95x
# at 768 and 1k, 0.97x at 256, 0.97x at d192 512, nothing at 2k; slower under a causal mask (its tiles differ and are
# out of step already), with GQA 8/2 (less HBM traffic to contend for) and at d128 (two or three programs an SM). On an
# H200: 0.97x at 512-1k, 0.98x at 256 (results/2026-11-27-h200-probe-stagger-rule.md). The ramp, in nanoseconds a key
# of the tile's key range, and the keys where it applies:
STAGGER_NS_PER_KEY = 27
STAGGER_KEYS = (256, 1024)
STAGGER_MIN_WAVES = 4   # so that the idle start is a small part of the launch (the grid's points have 7.8 waves)
# None: that rule. "off", or HF_FLASHATTN_V2_STAGGER=0 at import: never. A tuple (lo, hi, ns, ramp) (a diagnostic, the
# benchmarks' variants, or HF_FLASHATTN_V2_STAGGER="LO,HI,NS,RAMP"): the programs of launch order [lo * SMs, hi * SMs)
# of every launch delayed by ns + ramp * (their place in that range) nanoseconds.


def parse_stagger(text: str):
    """HF_FLASHATTN_V2_STAGGER's value as `STAGGER`: "" -> None (the rule), "0" -> "off", "LO,HI,NS,RAMP" -> a tuple of
    four non-negative numbers with LO <= HI; anything else a ValueError naming the variable, the value and the fix."""
    text = text.strip()
    if not text:
        return None
    if text == "0":
        return "off"
    try:
        value = tuple(float(x) for x in text.split(","))
    except ValueError:
        value = ()
    if len(value) != 4 or min(value) < 0 or value[0] > value[1]:
        raise ValueError(f"HF_FLASHATTN_V2_STAGGER={text!r} is not understood: set it to 0 (no delay), leave it "
                         "unset (the rule), or give LO,HI,NS,RAMP (four non-negative numbers, LO <= HI: the programs "
                         "of launch order [LO x SMs, HI x SMs) delayed NS + RAMP x their place in that range "
                         "nanoseconds)")
    return value


STAGGER = parse_stagger(env_get("HF_FLASHATTN_V2_STAGGER", ""))


def use_split_kv(q, k, varlen: bool) -> bool:
    """Decode-like shapes (a few queries, many keys) go to the split-KV kernel of decode.py: the same
    exact result (out and lse, so the backward is unchanged), but the key range is spread over many
    programs instead of one per (query block, head)."""
    return not varlen and q.numel() > 0 and splits_keys(q.shape[1], k.shape[1])


def splits_keys(seqlen_q: int, seqlen_k: int) -> bool:
    """The sequence lengths use_split_kv sends to the split-KV kernel (also Transformers' decode fast
    path, which has them without (B, S, H, D) tensors). HF_FLASHATTN_SPLITKV=0 turns this off."""
    return seqlen_q <= 16 and seqlen_k >= 8 * seqlen_q and env_get("HF_FLASHATTN_SPLITKV", "1") != "0"


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_size,
            softcap):
    varlen = cu_seqlens_q is not None
    if use_split_kv(q, k, varlen):
        from . import decode
        return decode.forward_dense(q, k, v, softmax_scale, window_size, softcap)
    H, D = q.shape[-2], q.shape[-1]
    Hk = k.shape[-2]
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((H, q.shape[0]) if varlen else (batch, H, q.shape[1]), dtype=torch.float32,
                      device=q.device)
    if q.numel() == 0 or batch == 0:
        return out.zero_(), lse.fill_(float("inf"))
    left, right = C.window_args(window_size, max_seqlen_q, max_seqlen_k)
    qk_scale, cap_scale = C.score_scales(softmax_scale, softcap)
    stride_l = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    mask = C.mask_kind(window_size)
    args = (q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
            *C.seq_layout(q, varlen), *C.seq_layout(k, varlen), *C.seq_layout(v, varlen),
            *C.seq_layout(out, varlen), *stride_l,
            max_seqlen_q, max_seqlen_k, left, right, qk_scale, cap_scale,
            C.tune_bucket(max_seqlen_q, batch * H, q.device), mask, H // Hk, C.group_tiles("v2"))
    fold = FOLD and softcap == 0 and softmax_scale > 0
    one_loop = ONE_LOOP and fold and (mask == 0 or ONE_LOOP_MASKED)
    stagger = _stagger_args(q.device, varlen, mask, one_loop, D, H * batch, max_seqlen_q, max_seqlen_k,
                            H // Hk)
    meta = dict(HEAD_DIM=D, BLOCK_D=max(C.pow2(D), 16), IS_VARLEN=varlen,
                SOFTCAP=softcap > 0, DOT_PREC=C.dot_precision(q.dtype), FOLD=fold, LEFT=C.left_edge(window_size),
                ONE_LOOP=one_loop, STAGGER=stagger[1] > stagger[0], NO_MASK=mask == 0,
                EVEN=not varlen and max_seqlen_q % 128 == 0 and max_seqlen_k > 0 and max_seqlen_k % 64 == 0)
    _fwd_launch(lambda m: (C.cdiv(max_seqlen_q, m["BLOCK_M"]), H, batch), args + stagger, meta,
                site_key=_site_key(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, left, right, fold,
                                   meta["LEFT"], meta["ONE_LOOP"], meta["STAGGER"], meta["NO_MASK"], meta["EVEN"]))
    return out, lse


def _stagger_args(device, varlen: bool, mask: int, one_loop: bool, d: int, pairs: int, seqlen_q: int,
                  seqlen_k: int, group: int = 1) -> tuple:
    """The kernel's (stagger_lo, stagger_hi, stagger_ns, stagger_ramp): `STAGGER`'s rule or its override; (0, 0, 0, 0)
    where no program is delayed. The rule: Hopper, dense, no mask, the one-loop kernel (no softcap), head-dim class
    256 (one program an SM in every config, so the second wave is the launch's programs [SMs, 2 * SMs)), keys in
    STAGGER_KEYS, at least STAGGER_MIN_WAVES waves of 128-row tiles (pairs: heads x sequences), one query head a key
    head (group 1: with GQA 8/2 at 512 keys it measured 1.3% slower, its keys and values a quarter of the traffic)."""
    if STAGGER == "off" or C._INTERPRETING or device.type != "cuda":
        return 0, 0, 0, 0
    if STAGGER is not None:
        n = C.num_sms(device)
        lo, hi, ns, ramp = STAGGER
        return int(lo * n), int(hi * n), int(ns), int(ramp)
    if (varlen or mask != 0 or not one_loop or group != 1 or C.head_dim_class(d) != 256
            or not STAGGER_KEYS[0] <= seqlen_k <= STAGGER_KEYS[1]):   # most calls leave here
        return 0, 0, 0, 0
    n = C.num_sms(device)
    if C.cdiv(seqlen_q, 128) * pairs < STAGGER_MIN_WAVES * n or not is_hopper(device):
        return 0, 0, 0, 0
    return n, 2 * n, 0, STAGGER_NS_PER_KEY * seqlen_k


def _site_key(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, left, right, *more):
    """What Triton specialises on in a launch of v2's kernels over these inputs, for their direct launch
    (`C.Launcher`'s site_key): the given tensors' shapes, strides, dtype and base alignment (the outputs are made
    fresh, their strides follow from the shapes), cu_seqlens' alignment or absence, the 32/64-bit type of the
    unspecialised lengths and window; `more`: the caller's other inputs (dO's strides and alignment, options)."""
    align = (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15
    if cu_seqlens_q is not None:
        align = (align, (cu_seqlens_q.data_ptr() | cu_seqlens_k.data_ptr()) & 15)
    return (q.shape, k.shape, q.stride(), k.stride(), v.stride(), q.dtype, align,
            (max_seqlen_q | max_seqlen_k | left | right) >> 31) + more


# "atomic": as HF_FLASHATTN_BWD_DQ=atomic (benchmarks/probe_bwd_tma.py's `atomic` variant sets it); None: the variable
BWD_DQ = None


def backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
             window_size, softcap, deterministic, grads=None):
    """grads: (dq, dk, dv) to write into (`v2_bwd.backward`), else made."""
    from .v2_bwd import backward as _bwd
    # HF_FLASHATTN_BWD_DQ=atomic: FA2's single-pass backward with float32 atomics for dQ (fewer matmuls,
    # not bitwise reproducible); never with deterministic=True. Opt-in: on the H100 it measured 1.6-1.9x the fwd+bwd
    # time at d256 and 1.13-1.28x at d64 / d128 512 (results/2026-11-27-h100-bwd-atomic-split-ab.md).
    atomic = not deterministic and (BWD_DQ or os.environ.get("HF_FLASHATTN_BWD_DQ", "")) == "atomic"
    return _bwd(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                softmax_scale, window_size, softcap, atomic_dq=atomic, grads=grads)
