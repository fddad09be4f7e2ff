"""FlashAttention-1 (Dao et al. 2022, arXiv 2205.14135), Algorithm 1 forward / Algorithm 4 backward.

What makes this v1 and not v2 is the loop order and where the softmax state lives:

    for each K/V block j (outer, sequential):            load K_j, V_j once
        for each Q block i that can see block j (inner):
            read O_i, m_i, l_i from HBM
            S_ij = Q_i K_jᵀ · scale;  m~ = rowmax(S_ij);  P~ = exp(S_ij - m~);  l~ = rowsum(P~)
            m_new = max(m_i, m~);  l_new = e^(m_i - m_new)·l_i + e^(m~ - m_new)·l~
            O_i = diag(l_new)⁻¹ (diag(l_i)·e^(m_i - m_new)·O_i + e^(m~ - m_new)·P~ V_j)
            write O_i, m_new, l_new back to HBM

O is kept *normalised* after every K/V block, exactly as in the paper (v2 defers the division to the
end); the epilogue only casts O to the output dtype and writes lse = m + log l. O, m and l live in
float32 scratch buffers in HBM, initialised as in Algorithm 1 line 2 (O = 0, l = 0, m = -inf).

Parallelism: one program per (query head, batch). A program must walk the K/V blocks in order:
two programs working on different K/V blocks of the same head would race on O, m and l.

Conventions shared by the forward and the backward (v1_bwd.py):
  * scores are kept in log2 units (s2 = S · log2(e)) so every exponential is an exp2;
  * masks are bottom-right aligned: query i sits at key position i + DIAG, DIAG = seqlen_k - seqlen_q,
    and sees keys j with i + DIAG - left <= j <= i + DIAG + right ("unbounded" is passed as a window
    larger than any sequence, so one formula covers causal, windows and no mask);
  * (Q block, K/V block) pairs with no visible entry are never visited; pairs that are entirely
    visible skip the mask; only partial pairs pay for it;
  * GQA / MQA: query head h reads K/V head h // GROUP through pointer arithmetic;
  * varlen: program (h, b) reads its sequence's start and length from cu_seqlens; the batch stride
    is 0 and the start row goes into the int64 base offset;
  * HEAD_DIM (a multiple of 8) is padded to BLOCK_D (a power of two >= 16) with masked loads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import is_interpreting
from ._common import LOG2E, dot_precision, scores_from_qk, seq_bounds, visible, window_args


# ----------------------------------------------------------------------------------------------
# Helpers shared with the backward kernel.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _q_block_range(n0, seqlen_q, seqlen_k, diag, window_left, window_right,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The Q rows [lo, hi) that see at least one key of K/V block [n0, n0 + BLOCK_N); lo is rounded
    down to a Q block boundary. Query i sees key j iff j - DIAG - right <= i <= j - DIAG + left."""
    n_last = tl.minimum(n0 + BLOCK_N, seqlen_k) - 1
    lo = tl.maximum(n0 - diag - window_right, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.minimum(n_last - diag + window_left + 1, seqlen_q)
    return lo, hi


@triton.jit
def _needs_mask(m0, n0, seqlen_k, diag, window_left, window_right,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """True unless every (query, key) of the pair (Q block m0, K/V block n0) is visible: the block
    sticks out past seqlen_k, or its corners cross the window's left / right diagonal. (Rows past
    seqlen_q need no mask: they are loaded as zeros and never stored.)"""
    past_end = n0 + BLOCK_N > seqlen_k
    cross_left = n0 < m0 + BLOCK_M - 1 + diag - window_left
    cross_right = n0 + BLOCK_N - 1 > m0 + diag + window_right
    return past_end | cross_left | cross_right


# ----------------------------------------------------------------------------------------------
# Forward.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _v1_fwd_update(k, v, m0, n0, q_base, oacc_base, ml_off, M, L,
                   stride_qm, stride_om,
                   seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, softcap_log2,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Algorithm 1, lines 8-13, for one (Q block m0, K/V block n0) pair: fold K_j, V_j into the
    O_i, m_i, l_i held in HBM."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=tile_ok, other=0.0)

    # -- S_ij = Q_i K_jᵀ, in log2 units (line 9) --
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s, _ = scores_from_qk(qk, qk_scale, softcap_log2, HAS_SOFTCAP)
    if _needs_mask(m0, n0, seqlen_k, diag, window_left, window_right, BLOCK_M, BLOCK_N):
        s = tl.where(visible(offs_m, offs_n, diag, window_left, window_right, seqlen_k), s,
                     float("-inf"))

    # -- block statistics m~, P~, l~ (line 10); a row that sees no key of this block has m~ = -inf --
    m_blk = tl.max(s, 1)
    p = tl.exp2(s - tl.where(m_blk == float("-inf"), 0.0, m_blk)[:, None])
    l_blk = tl.sum(p, 1)

    # -- read m_i, l_i and merge (line 8, line 11) --
    m_i = tl.load(M + ml_off + offs_m, mask=row_ok, other=float("-inf"))
    l_i = tl.load(L + ml_off + offs_m, mask=row_ok, other=0.0)
    m_new = tl.maximum(m_i, m_blk)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)     # rows with no key so far: no NaN
    alpha = tl.exp2(m_i - m_ref)                             # e^(m_i - m_new)
    beta = tl.exp2(m_blk - m_ref)                            # e^(m~ - m_new)
    l_new = alpha * l_i + beta * l_blk

    # -- O_i <- diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + e^(m~ - m_new) P~ V_j) (line 12) --
    pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    o_ptrs = oacc_base + offs_m[:, None] * stride_om + offs_d[None, :]
    o = tl.load(o_ptrs, mask=tile_ok, other=0.0)
    o = (o * (alpha * l_i)[:, None] + pv * beta[:, None]) / tl.where(l_new == 0.0, 1.0, l_new)[:, None]

    # -- write O_i, m_i, l_i back to HBM (line 13) --
    tl.store(o_ptrs, o, mask=tile_ok)
    tl.store(M + ml_off + offs_m, m_new, mask=row_ok)
    tl.store(L + ml_off + offs_m, l_new, mask=row_ok)


@triton.jit
def _v1_fwd_kernel(
    Q, K, V, O, LSE, O_ACC, M, L, CU_SEQLENS_Q, CU_SEQLENS_K,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,        # O and O_ACC (same shape, both made by us)
    stride_lb, stride_lh,                   # LSE, M and L (same shape, unit stride along queries)
    seqlen_q, seqlen_k, window_left, window_right, qk_scale, softcap_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Grid: (nheads, batch). One program computes the whole output of one (batch, query head):
    # it walks every K/V block in order (outer loop) and, for each, every Q block that can see it
    # (inner loop), updating O, m, l in HBM; then an epilogue writes O in the output dtype and
    # lse = m + log(l) (natural log; +inf and O = 0 for rows that see no key).
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16)      # tl.dot's minimum tile
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    q_start, k_start, seqlen_q, seqlen_k = seq_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, pid_b, seqlen_q, seqlen_k,
                                                      IS_VARLEN)
    diag = seqlen_k - seqlen_q
    b64 = pid_b.to(tl.int64)
    h64 = pid_h.to(tl.int64)
    kvh64 = (pid_h // GROUP).to(tl.int64)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm
    k_base = K + b64 * stride_kb + kvh64 * stride_kh + k_start * stride_kn
    v_base = V + b64 * stride_vb + kvh64 * stride_vh + k_start * stride_vn
    o_off = b64 * stride_ob + h64 * stride_oh + q_start * stride_om
    ml_off = b64 * stride_lb + h64 * stride_lh + q_start
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    # K/V blocks entirely left of query 0's window are seen by nobody.
    n_lo = (tl.maximum(diag - window_left, 0) // BLOCK_N) * BLOCK_N
    for n0 in range(n_lo, seqlen_k, BLOCK_N):
        # -- load K_j, V_j to SRAM (Algorithm 1, line 6) --
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < seqlen_k) & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        # -- every Q block that sees some key of this block (line 7) --
        m_lo, m_hi = _q_block_range(n0, seqlen_q, seqlen_k, diag, window_left, window_right,
                                    BLOCK_M, BLOCK_N)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            _v1_fwd_update(k, v, m0, n0, q_base, O_ACC + o_off, ml_off, M, L, stride_qm, stride_om,
                           seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, softcap_log2,
                           HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_SOFTCAP, DOT_PRECISION)
        # The next K/V block re-reads the O, m, l rows just written, possibly from other threads of
        # this program: make the writes visible first.
        tl.debug_barrier()

    # -- epilogue: O (already normalised) to the output dtype, lse = (m + log2 l) · ln 2 --
    for m0 in range(0, seqlen_q, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seqlen_q
        tile = o_off + offs_m[:, None] * stride_om + offs_d[None, :]
        tile_ok = row_ok[:, None] & d_ok[None, :]
        o = tl.load(O_ACC + tile, mask=tile_ok, other=0.0)
        m_i = tl.load(M + ml_off + offs_m, mask=row_ok, other=float("-inf"))
        l_i = tl.load(L + ml_off + offs_m, mask=row_ok, other=0.0)
        seen = l_i > 0.0                                     # l = 0: the row saw no key
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,  # ln 2
                       float("inf"))
        tl.store(O + tile, o.to(O.dtype.element_ty), mask=tile_ok)
        tl.store(LSE + ml_off + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Host side.
# ----------------------------------------------------------------------------------------------

def _fwd_config(head_dim: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). The interpreter gets 32 x 32 tiles (its cost is
    per tile visited, so 16 would be ~3x slower; 32 still gives several blocks per test sequence);
    on the GPU the tiles shrink as the head dim grows so that the
    fp32 O tile (BLOCK_M x BLOCK_D) and the K, V tiles fit in registers / shared memory."""
    if is_interpreting():
        return 32, 32, 1, 1
    if head_dim <= 64:
        return 64, 64, 4, 2
    if head_dim <= 128:
        return 64, 64, 8, 2
    return 32, 64, 8, 1


def _bwd_config(head_dim: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the backward: dK_j and dV_j (BLOCK_N x BLOCK_D,
    fp32) stay in registers across the whole inner loop, so tiles are smaller than the forward's."""
    if is_interpreting():
        return 32, 32, 1, 1
    if head_dim <= 64:
        return 64, 64, 4, 2
    if head_dim <= 128:
        return 32, 64, 8, 2
    return 32, 32, 8, 1


def _geometry(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """batch, nheads, nheads_k, head_dim and the kernel's seqlen arguments (per-program lengths
    come from cu_seqlens when varlen)."""
    if cu_seqlens_q is None:
        batch, seqlen_q, nheads, head_dim = q.shape
        return batch, nheads, k.shape[2], head_dim, seqlen_q, k.shape[1]
    return cu_seqlens_q.numel() - 1, q.shape[1], k.shape[1], q.shape[2], max_seqlen_q, max_seqlen_k


def _bhm_strides(t, varlen: bool):
    """(batch, head, row) strides; the batch stride is 0 for packed tensors."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(2), t.stride(1)


def _lse_strides(lse, varlen: bool):
    """(batch, head) strides of an lse-shaped tensor: (B, H, Sq) dense or (H, total_q) packed."""
    if varlen:
        return 0, lse.stride(0)
    return lse.stride(0), lse.stride(1)


def _score_args(softmax_scale: float, softcap: float):
    """(qk_scale, softcap_log2, HAS_SOFTCAP) for _common.scores_from_qk()."""
    if softcap > 0:
        return softmax_scale / softcap, softcap * LOG2E, True
    return softmax_scale * LOG2E, 0.0, False


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_size,
            softcap):
    """Backend contract (see interface.py): returns out like q (contiguous) and lse float32,
    (B, H, Sq) dense or (H, total_q) packed."""
    varlen = cu_seqlens_q is not None
    batch, nheads, nheads_k, head_dim, seqlen_q, seqlen_k = _geometry(q, k, cu_seqlens_q, max_seqlen_q,
                                                                      max_seqlen_k)
    out = (torch.zeros if varlen else torch.empty)(q.shape, dtype=q.dtype, device=q.device)
    lse_shape = (nheads, q.shape[0]) if varlen else (batch, nheads, seqlen_q)
    # Packed rows past cu_seqlens_q[-1] belong to no sequence: give them O = 0, lse = +inf.
    lse = (torch.full(lse_shape, float("inf"), dtype=torch.float32, device=q.device) if varlen else
           torch.empty(lse_shape, dtype=torch.float32, device=q.device))
    if out.numel() == 0 or batch == 0:
        return out, lse
    # HBM state of Algorithm 1, line 2: O = 0, l = 0, m = -inf.
    o_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    m = torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)
    l = torch.zeros(lse_shape, dtype=torch.float32, device=q.device)

    block_m, block_n, num_warps, num_stages = _fwd_config(head_dim)
    left, right = window_args(window_size, seqlen_q, seqlen_k)   # -1 -> wider than any sequence
    qk_scale, softcap_log2, has_softcap = _score_args(softmax_scale, softcap)
    cu_q = cu_seqlens_q if varlen else lse      # unused placeholders when dense
    cu_k = cu_seqlens_k if varlen else lse
    _v1_fwd_kernel[(nheads, batch)](
        q, k, v, out, lse, o_acc, m, l, cu_q, cu_k,
        *_bhm_strides(q, varlen), *_bhm_strides(k, varlen), *_bhm_strides(v, varlen),
        *_bhm_strides(out, varlen), *_lse_strides(lse, varlen),
        seqlen_q, seqlen_k, left, right, qk_scale, softcap_log2,
        GROUP=nheads // nheads_k, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, IS_VARLEN=varlen, HAS_SOFTCAP=has_softcap,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
             window_size, softcap, deterministic, grads=None):
    """Backend contract (see interface.py): Algorithm 4, in v1_bwd.py. Always deterministic."""
    from .v1_bwd import backward as _backward
    return _backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale, window_size, softcap, deterministic, grads)

