"""Attention against a KV cache (flash_attn_with_kvcache): in-place append, split-KV ("flash-decoding")
attention with packed GQA, and the exact combine of the splits.

Split-KV: with a short query (decode) there are too few (query block, head, sequence) programs to fill
the GPU, so the key range of each is cut into `num_splits` pieces, one program each. A piece writes its
normalised partial output O_s (float32) and lse_s; the combine computes, per row,
    lse = log Σ_s exp(lse_s),   O = Σ_s exp(lse_s - lse) · O_s
(exact: it is the online-softmax merge), in a second kernel. Packed GQA: the `group` query heads that
share a kv head are stacked along the rows of one tile (row r = query position r // group, head
r % group), so each K/V block is read once per kv head instead of once per query head.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._runtime import is_hopper, is_interpreting
from . import _common as C
from .v2 import _fwd_inner, kv_block


@triton.jit
def _cache_entry(BIDX, b, HAS_BIDX: tl.constexpr):
    """The cache entry sequence b uses: cache_batch_idx[b], or b."""
    if HAS_BIDX:
        return tl.load(BIDX + b).to(tl.int64)
    else:
        return b


@triton.jit
def _append_kernel(KNEW, VNEW, KC, VC, SEQLENS, BIDX,
                   stride_knb, stride_knn, stride_knh,
                   stride_vnb, stride_vnn, stride_vnh,
                   stride_kcb, stride_kcn, stride_kch,
                   stride_vcb, stride_vcn, stride_vch,
                   seqlen_new, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_BIDX: tl.constexpr):
    # Grid: (cdiv(seqlen_new, BLOCK_N), nheads_k, batch). Copies BLOCK_N new key/value rows of one head
    # into the cache at rows cache_seqlens[b] + j of cache entry cache_batch_idx[b].
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    cb = _cache_entry(BIDX, b, HAS_BIDX)
    pos = tl.load(SEQLENS + b).to(tl.int64) + n
    d = tl.arange(0, BLOCK_D)
    mask = (n[:, None] < seqlen_new) & (d[None, :] < HEAD_DIM)
    k = tl.load(KNEW + b * stride_knb + h * stride_knh + n[:, None] * stride_knn + d[None, :], mask=mask)
    v = tl.load(VNEW + b * stride_vnb + h * stride_vnh + n[:, None] * stride_vnn + d[None, :], mask=mask)
    tl.store(KC + cb * stride_kcb + h * stride_kch + pos[:, None] * stride_kcn + d[None, :], k, mask=mask)
    tl.store(VC + cb * stride_vcb + h * stride_vch + pos[:, None] * stride_vcn + d[None, :], v, mask=mask)


@triton.jit
def _decode_inner_tma(acc, l_i, m_i, q, K, V, cb, kvh, start, end, pos, offs_n, Sk, diag, left, right, qk_scale,
                      cap_scale, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr,
                      DOT_PREC: tl.constexpr, KMASK_base, HAS_KMASK: tl.constexpr):
    """_fwd_inner's loop (the same block update, v2.kv_block) with the K and V blocks through the caller's tensor
    descriptors over the cache, ordered (cache entry, row, kv head, head dim), block (1, BLOCK_N, 1, BLOCK_D): one TMA
    bulk copy a block instead of a copy per thread. Rows past the cache and head-dim padding read as zeros; cache rows
    past the keys in use (slots not yet written, which may hold inf or NaN) are zeroed in V (P = 0 does not cancel
    inf · 0) and masked in the scores."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k = K.load([cb, start_n, kvh, 0]).reshape(BLOCK_N, BLOCK_D)
        v = V.load([cb, start_n, kvh, 0]).reshape(BLOCK_N, BLOCK_D)
        v = tl.where((cols < Sk)[:, None], v, tl.zeros_like(v))
        acc, l_i, m_i = kv_block(acc, l_i, m_i, q, k, v, pos, cols, Sk, diag, left, right, qk_scale, cap_scale, True,
                                 SOFTCAP, DOT_PREC, KMASK_base, HAS_KMASK)
    return acc, l_i, m_i


@triton.jit
def _merge_row(OP, LP, stride_os, stride_ls, n_splits, s, d, HEAD_DIM: tl.constexpr):
    """The exact merge of the n_splits partial rows O_s = OP + s * stride_os (float32, HEAD_DIM wide) with
    lse_s = LP[s * stride_ls]: (O, lse) as float32; a row no split saw gets O = 0, lse = +inf. s: arange
    over the splits (padded to a power of two), d: arange over the head dim (padded)."""
    lse_s = tl.load(LP + s * stride_ls, mask=s < n_splits, other=float("-inf"), cache_modifier=".cg")
    top = tl.max(lse_s, 0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse_s - top_safe)                       # 0 for empty splits and padding
    total = tl.sum(w, 0)
    o_s = tl.load(OP + s[:, None] * stride_os + d[None, :], mask=(s[:, None] < n_splits) & (d[None, :] < HEAD_DIM),
                  other=0.0, cache_modifier=".cg")
    out = tl.sum(o_s * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    lse = tl.where(total > 0, top_safe + tl.log(tl.where(total > 0, total, 1.0)), float("inf"))
    return out, lse


@triton.jit(do_not_specialize=["seqlen_q", "window_left", "window_right", "group", "n_splits", "max_seqlen_k",
                             "lse_off"])
def _decode_kernel(Q, K, V, O, LSE, SEQLENS_K, BIDX, KMASK, stride_mb,
                   stride_qb, stride_qm, stride_qh,
                   stride_kb, stride_kn, stride_kh,
                   stride_vb, stride_vn, stride_vh,
                   seqlen_q, window_left, window_right, qk_scale, cap_scale, group, n_splits, max_seqlen_k, lse_off,
                   OF, LOCKS,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_BIDX: tl.constexpr, SPLIT: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
                   HAS_KMASK: tl.constexpr, HAS_SEQLENS: tl.constexpr = True, STORE_LSE: tl.constexpr = True,
                   FUSED: tl.constexpr = False, SPLITS: tl.constexpr = 2, MERGE_ROWS: tl.constexpr = 0,
                   TMA: tl.constexpr = False):
    # Grid: (cdiv(seqlen_q * group, BLOCK_M) * n_splits, nheads_k, batch). One program: BLOCK_M packed
    # rows (query position, head of the group) against one split of the visible keys of its sequence.
    # KMASK (HAS_KMASK): (batch, cache rows) padding mask, nonzero = attend (Transformers' 2D mask).
    # O: contiguous (n_splits, batch, seqlen_q, nheads, HEAD_DIM) float32 partials with SPLIT, else the
    # contiguous (batch, seqlen_q, nheads, HEAD_DIM) output; LSE + lse_off: contiguous ((n_splits,) batch,
    # nheads, seqlen_q); with splits it shares one workspace with O (lse_off elements after it); without
    # splits and STORE_LSE off (a caller that only wants O) not written. Their strides follow from the grid.
    # FUSED (with SPLIT, STORE_LSE off): no combine launch; the split that finishes last for its row tile
    # merges the partials into OF (contiguous (batch, seqlen_q, nheads, HEAD_DIM)), counting finished
    # splits in LOCKS (one zeroed int32 per (row tile, kv head, sequence), left at zero again). SPLITS:
    # n_splits rounded up to a power of two (>= 2), the width of the merge. MERGE_ROWS (FUSED, > 0): merge the
    # tile's rows all at once, MERGE_ROWS of them (a power of two >= the rows; TUNE["merge_rows"]).
    # TMA: K and V are tensor descriptors over the caches, (cache entry, row, kv head, head dim) ordered, block
    # (1, BLOCK_N, 1, BLOCK_D) (`_decode_inner_tma`); their stride arguments are then not read.
    split = tl.program_id(0) % n_splits
    r0 = (tl.program_id(0) // n_splits) * BLOCK_M
    kvh = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    cb = _cache_entry(BIDX, b, HAS_BIDX)
    if HAS_SEQLENS:
        Sk = tl.load(SEQLENS_K + b)
    else:                                     # every sequence sees all max_seqlen_k keys (flash_attn_func)
        Sk = max_seqlen_k
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q * group
    pos = rows // group                       # query position of each packed row
    h = kvh * group + (rows % group)          # its query head
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * stride_qb + pos[:, None] * stride_qm + h[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    # -- the keys any row of the tile sees, then this program's split of them --
    diag = Sk - seqlen_q
    p_lo = r0 // group
    p_hi = tl.minimum((r0 + BLOCK_M - 1) // group, seqlen_q - 1)
    lo = tl.maximum(p_lo + diag - window_left, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.maximum(tl.minimum(p_hi + diag + window_right + 1, Sk), lo)
    per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), n_splits) * BLOCK_N
    s_lo = tl.minimum(lo + split * per_split, hi)
    s_hi = tl.minimum(s_lo + per_split, hi)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if TMA:
        acc, l_i, m_i = _decode_inner_tma(acc, l_i, m_i, q, K, V, cb.to(tl.int32), kvh.to(tl.int32), s_lo, s_hi, pos,
                                          offs_n, Sk, diag, window_left, window_right, qk_scale, cap_scale, BLOCK_D,
                                          BLOCK_N, SOFTCAP, DOT_PREC, KMASK + b * stride_mb, HAS_KMASK)
    else:
        K_base = K + cb * stride_kb + kvh * stride_kh
        V_base = V + cb * stride_vb + kvh * stride_vh
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, s_lo, s_hi,
                                   pos, offs_n, offs_d, Sk, diag, window_left, window_right, qk_scale, cap_scale,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, True, SOFTCAP, DOT_PREC, KMASK + b * stride_mb,
                                   HAS_KMASK)
    # epilogue: a split that saw nothing gets lse = -inf (it adds nothing in the combine); without
    # splits, a row that saw nothing gets lse = +inf and O = 0, as everywhere else
    acc, lse = C.normalise_rows(acc, l_i, m_i, float("-inf") if SPLIT else float("inf"))
    n_heads = tl.num_programs(1).to(tl.int64) * group
    stride_lh = seqlen_q
    stride_lb = n_heads * seqlen_q
    stride_ls = tl.num_programs(2).to(tl.int64) * stride_lb
    stride_oh = HEAD_DIM
    stride_om = n_heads * HEAD_DIM
    stride_ob = seqlen_q * stride_om
    stride_os = tl.num_programs(2).to(tl.int64) * stride_ob
    if SPLIT or STORE_LSE:
        tl.store(LSE + lse_off + split * stride_ls + b * stride_lb + h * stride_lh + pos, lse, mask=row_ok)
    tl.store(O + split * stride_os + b * stride_ob + pos[:, None] * stride_om + h[:, None] * stride_oh
             + offs_d[None, :], acc.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    if FUSED:
        # The barrier orders every thread's partial stores before the counter's release (gpu scope); the
        # acquire of the program that brings the counter to n_splits makes the other splits' stores visible
        # to it, and the merge reads them past L1 (.cg). That program resets the counter for the next call.
        tl.debug_barrier()
        tile = tl.program_id(0) // n_splits
        lock = LOCKS + (b * tl.num_programs(1) + kvh) * (tl.num_programs(0) // n_splits) + tile
        done = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
        if done == n_splits - 1:
            s = tl.arange(0, SPLITS)
            if MERGE_ROWS > 0:
                # all rows of the tile (MERGE_ROWS >= them) merged before anything is stored: the row merges
                # have no store between their loads, so the loads of every row can be in flight at once
                # (the loop below waits for one row's loads per iteration: the tail of the last split)
                rr = tl.arange(0, MERGE_ROWS)
                merged = tl.zeros([MERGE_ROWS, BLOCK_D], dtype=tl.float32)
                for i in tl.static_range(MERGE_ROWS):
                    r = r0 + i
                    pr = r // group
                    hr = kvh * group + r % group
                    n_r = tl.where(r < seqlen_q * group, n_splits, 0)     # a row past the end loads nothing
                    o_r, _ = _merge_row(O + b * stride_ob + pr * stride_om + hr * stride_oh,
                                        LSE + lse_off + b * stride_lb + hr * stride_lh + pr,
                                        stride_os, stride_ls, n_r, s, offs_d, HEAD_DIM)
                    merged = tl.where(rr[:, None] == i, o_r[None, :], merged)
                rows_m = r0 + rr
                tl.store(OF + b * stride_ob + (rows_m // group)[:, None] * stride_om
                         + (kvh * group + rows_m % group)[:, None] * stride_oh + offs_d[None, :],
                         merged.to(OF.dtype.element_ty),
                         mask=(rows_m < seqlen_q * group)[:, None] & (offs_d[None, :] < HEAD_DIM))
            else:
                for i in range(tl.minimum(BLOCK_M, seqlen_q * group - r0)):
                    r = r0 + i
                    pr = r // group
                    hr = kvh * group + r % group
                    o_row = b * stride_ob + pr * stride_om + hr * stride_oh
                    o_r, _ = _merge_row(O + o_row, LSE + lse_off + b * stride_lb + hr * stride_lh + pr,
                                        stride_os, stride_ls, n_splits, s, offs_d, HEAD_DIM)
                    tl.store(OF + o_row + offs_d, o_r.to(OF.dtype.element_ty), mask=offs_d < HEAD_DIM)
            tl.atomic_xchg(lock, 0, sem="relaxed", scope="gpu")


@triton.jit
def _combine_kernel(OP, O, LSE, n_splits, lp_off,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, STORE_LSE: tl.constexpr):
    # Grid: (seqlen_q, nheads, batch). Merges the n_splits partial rows of one (position, head, sequence).
    # OP: contiguous (n_splits, batch, seqlen_q, nheads, HEAD_DIM) partial outputs, and lp_off elements
    # after them in the same workspace the (n_splits, batch, nheads, seqlen_q) partial lse; O and LSE:
    # contiguous (batch, seqlen_q, nheads, HEAD_DIM) and (batch, nheads, seqlen_q).
    LP = OP + lp_off
    m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    Sq = tl.num_programs(0).to(tl.int64)
    H = tl.num_programs(1).to(tl.int64)
    B = tl.num_programs(2).to(tl.int64)
    stride_oh = HEAD_DIM
    stride_om = H * HEAD_DIM
    stride_ob = Sq * stride_om
    stride_ph, stride_pm, stride_pb, stride_ps = stride_oh, stride_om, stride_ob, B * stride_ob
    stride_lh = Sq
    stride_lb = H * Sq
    stride_qh, stride_qb, stride_qs = stride_lh, stride_lb, B * stride_lb
    d = tl.arange(0, BLOCK_D)
    out, lse = _merge_row(OP + b * stride_pb + m * stride_pm + h * stride_ph, LP + b * stride_qb + h * stride_qh + m,
                          stride_ps, stride_qs, n_splits, tl.arange(0, SPLITS), d, HEAD_DIM)
    tl.store(O + b * stride_ob + m * stride_om + h * stride_oh + d, out.to(O.dtype.element_ty), mask=d < HEAD_DIM)
    if STORE_LSE:
        tl.store(LSE + b * stride_lb + h * stride_lh + m, lse)


# Launch parameters of the GPU decode kernel (module-level so that benchmarks/sweep_decode.py can vary
# them): key block for head dim <= 128 (32 above), warps, pipeline stages, waves of programs per SM.
# num_stages None: `_stages` (with two waves of programs, 3 stages at >= 16 splits, batch 1: 54 vs 55 us at 32k, else
# 2, batch 8: 356 vs 376 us at 32k, 1.40 vs 1.47 ms at 128k -- benchmarks/results/2026-11-26-h100-sweep-decode.json).
# merge_rows: the in-kernel merge takes a tile's rows all at once when they are at most 16 (decode: the GQA
# group); off until timed on a GPU (compiled and CPU-tested only, fifth session).
# (The combine as a programmatic dependent launch of the split kernel, griddepcontrol: tried twice, no difference from a
# CUDA graph, results/2026-11-26-h100-decode-6.md and 2026-11-27-h100-decode-pdl.md; not kept.)
# tma: K and V blocks through tensor descriptors made on the host over the caches (`_decode_inner_tma`; Hopper, or
# Triton's interpreter), launched through Triton's entry point. Measured 0.7-1.3% slower than the pointer loads'
# cp.async pipeline at batch 1 and 8, 32k and 128k (results/2026-11-27-h100-probe-decode.md): off, kept as an option.
# one_wave: when the (row tile, kv head, sequence) units fit the SMs, the split count gives each program an SM of its
# own (num_sms // units programs a unit, not `waves` times the SMs) and 3 stages: batch 1, 32k 16 splits 49.1 us
# against 32 splits 51.7 (cuDNN 51.1); batch 8 2 splits with 3 stages 347 against 5 with 2 stages 356 (SDPA-flash 349)
# (results/2026-11-27-h100-probe-decode-2.md).
TUNE = {"block_n": 64, "num_warps": 4, "num_stages": None, "waves": 2, "merge_rows": False, "tma": False,
        "one_wave": True}


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def choose_num_splits(batch, nheads_k, row_tiles, max_seqlen_k, block_n, num_sms, waves=2, one_wave=True) -> int:
    """The split count of a call (`_splits_wanted`), each split at least 2 key blocks."""
    return _capped_splits(_splits_wanted(batch * nheads_k * row_tiles, num_sms, waves, one_wave), max_seqlen_k,
                          block_n)


def _splits_wanted(units: int, num_sms: int, waves: int, one_wave: bool) -> int:
    """Splits a (row tile, kv head, sequence) unit before the key-length cap: with one_wave and no more units than SMs,
    as many as keep every program on an SM of its own (num_sms // units); else enough programs to fill the GPU `waves`
    times over."""
    if one_wave and units <= num_sms:
        return num_sms // units
    return C.cdiv(waves * num_sms, units)


def _stages(num_splits: int, programs: int, num_sms: int) -> int:
    """TUNE["num_stages"], or the rule: 3 when every program has an SM of its own or the keys are cut into >= 16
    splits, else 2 (several programs an SM: a third stage's shared memory costs occupancy)."""
    return TUNE["num_stages"] or (3 if programs <= num_sms or num_splits >= 16 else 2)


def _capped_splits(wanted: int, max_seqlen_k: int, block_n: int) -> int:
    """choose_num_splits' cap: at least 2 key blocks a split, at most 128 splits, at least 1; then no more splits than
    the key blocks fill (the kernel gives every split the same whole number of blocks: 512 blocks in 33 splits are
    32 of 16 and an empty one, a program and a partial row per head for nothing)."""
    blocks = C.cdiv(max(max_seqlen_k, 1), block_n)
    n = max(1, min(wanted, blocks // 2, 128))
    return C.cdiv(blocks, C.cdiv(blocks, n))


def append(k, v, k_cache, v_cache, cache_seqlens, cache_batch_idx):
    B, Snew, Hk, D = k.shape
    BLOCK_N = 16
    grid = (C.cdiv(Snew, BLOCK_N), Hk, B)
    _append_kernel[grid](k, v, k_cache, v_cache, cache_seqlens, cache_batch_idx,
                         k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                         k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                         v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), Snew,
                         HEAD_DIM=D, BLOCK_D=max(_pow2(D), 16), BLOCK_N=BLOCK_N,
                         HAS_BIDX=cache_batch_idx is not None)


def forward_dense(q, k, v, softmax_scale, window_size, softcap, key_mask=None):
    """forward() for q (B, Sq, H, D) over every row of k, v (B, Sk, Hk, D) (flash_attn_func's decode-like
    shapes; with key_mask, Transformers' padded decode steps). Returns out, lse."""
    out, lse, _ = forward(q, k, v, None, None, k.shape[1], softmax_scale, window_size, softcap, 0, key_mask)
    return out, lse


def forward(q, k_cache, v_cache, seqlens_k, cache_batch_idx, max_seqlen_k, softmax_scale, window_size, softcap,
            num_splits, key_mask=None):
    """q (B, Sq, H, D); k_cache/v_cache (B_cache, S_cache, Hk, D); seqlens_k (B,) int32 valid keys per
    sequence (after any append), or None when every sequence has max_seqlen_k; key_mask None or
    (B, >= max key) bool/int, nonzero = attend, contiguous last dim. Returns out (B, Sq, H, D) and
    lse (B, H, Sq) float32."""
    B, Sq, H, D = q.shape
    return _run(q, q.stride()[:3], k_cache, k_cache.stride()[:3], v_cache, v_cache.stride()[:3],
                B, Sq, H, D, k_cache.shape[2], seqlens_k, cache_batch_idx, max_seqlen_k, softmax_scale,
                window_size, softcap, num_splits, key_mask, True)


def decode_bhsd(query, key, value, softmax_scale, window_size, softcap):
    """One decode step in Transformers' layout, without going through flash_attn_func: query (B, H, 1, D),
    key/value (B, Hk, L, D) (every key visible to the query but for the window), last dims contiguous,
    same dtype, H a multiple of Hk, D a multiple of 8 up to 256 (the caller checks). Returns out
    (B, 1, H, D), contiguous, as Transformers' flash path returns it. The strides are passed as they
    are (no transposed views) and the lse is not kept: this is the per-layer host path of generate()
    with a dynamic cache, where every microsecond of Python shows in the tokens/s. For the same reason the
    splits are merged by the split kernel itself (one launch, a cached workspace; `_workspace`), except
    while a CUDA graph is captured or torch.compile traces, where the combine kernel merges them."""
    B, H, Sq, D = query.shape
    qs, ks, vs = query.stride(), key.stride(), value.stride()
    fused = FUSED_MERGE and not (torch.compiler.is_compiling()
                                 or (query.is_cuda and torch.cuda.is_current_stream_capturing()))
    if fused and query.is_cuda:
        out = _direct(query, key, value, B, H, Sq, D, qs, ks, vs, softmax_scale, window_size, softcap)
        if out is not None:
            return out
    out, _, _ = _run(query, (qs[0], qs[2], qs[1]), key, (ks[0], ks[2], ks[1]), value, (vs[0], vs[2], vs[1]),
                     B, Sq, H, D, key.shape[1], None, None, key.shape[2], softmax_scale, window_size, softcap, 0,
                     None, False, fused)
    return out


# Set to False to merge decode_bhsd's splits with the combine kernel too (benchmarks compare the two).
FUSED_MERGE = True

# (device index, stream) -> [float32 workspace, int32 counters] of the fused merge. Per stream, so that
# calls on two streams never share partials or a counter; on one stream the calls are ordered, and every
# call leaves the counters at zero again. Grown on demand, never shrunk.
_WORKSPACES: dict = {}


class _Workspace(NamedTuple):
    floats: torch.Tensor     # partial outputs, then partial lse
    counters: torch.Tensor   # int32, zero between calls
    n_floats: int
    n_counters: int
    floats_ptr: int
    counters_ptr: int


def _workspace(device, n_floats: int, n_counters: int, stream=None) -> _Workspace:
    index = device.index
    if stream is None:
        stream = C._raw_stream(index) if device.type == "cuda" else 0
    key = (index, stream)
    ws = _WORKSPACES.get(key)
    if ws is None or ws.n_floats < n_floats or ws.n_counters < n_counters:
        n_floats = max(n_floats, ws.n_floats if ws is not None else 0)
        n_counters = max(n_counters, ws.n_counters if ws is not None else 0, 256)
        floats = torch.empty(n_floats, dtype=torch.float32, device=device)
        counters = torch.zeros(n_counters, dtype=torch.int32, device=device)
        ws = _WORKSPACES[key] = _Workspace(floats, counters, n_floats, n_counters, floats.data_ptr(),
                                           counters.data_ptr())
    return ws


def _direct(q, k, v, B, H, Sq, D, qs, ks, vs, softmax_scale, window_size, softcap):
    """decode_bhsd's one-launch call on a GPU with the least host work: the compiled kernel of the call's
    shape is kept per (shape, dtype, device, softcap on, split count) and launched with every pointer
    passed as an int (Triton's launcher then neither calls data_ptr() nor asks the driver about each
    pointer), without FastLaunch's generic key. Returns None, for `_run` to do it, unless every pointer
    is 16-byte aligned, every stride a multiple of 16 and every int within 32 bits: then Triton
    specialises every call of one entry identically (divisible by 16, none equal to 1, 32-bit ints), so
    reusing the entry's kernel is exact. Also None for one split (no merge) and with FastLaunch off or a
    launch hook installed. The first call of an entry goes through FastLaunch (compiling or loading the
    kernel) with the same arguments as tensors."""
    if not C.FAST_LAUNCH or C._launch_hooks():
        return None
    Hk, L = k.shape[1], k.shape[2]
    qp, kp, vp = q.data_ptr(), k.data_ptr(), v.data_ptr()
    strides = qs[0] | qs[1] | qs[2] | ks[0] | ks[1] | ks[2] | vs[0] | vs[1] | vs[2]
    if (qp | kp | vp | strides) & 15 or (strides | L) >> 31:
        return None
    dev = q.get_device()
    pkey = (B, H, Hk, D, Sq, dev, q.dtype, softcap > 0)
    plan = _DIRECT.get(pkey)
    if plan is None:
        if len(_DIRECT) > 4096:
            _DIRECT.clear()
        tiles = _tiles(Sq, H, Hk, D, q.device)
        base = _splits_wanted(B * Hk * tiles.row_tiles, tiles.num_sms, TUNE["waves"], TUNE["one_wave"])
        plan = _DIRECT[pkey] = (tiles, base, {})
    tiles, base, kernels = plan
    n_splits = _capped_splits(base, L, tiles.block_n)           # choose_num_splits, its first part cached
    lse_off = n_splits * B * Sq * H * D
    if n_splits < 2 or lse_off >> 31:
        return None
    row_tiles = tiles.row_tiles
    n_floats = lse_off + n_splits * B * H * Sq
    stream = C._raw_stream(dev)
    ws = _workspace(q.device, n_floats, B * Hk * row_tiles, stream)
    out = q.new_empty((B, Sq, H, D))
    left, right = C.window_args(window_size, Sq, max(L, 1))
    qk_scale, cap_scale = C.score_scales(softmax_scale, softcap)
    entry = kernels.get(n_splits)
    op = out.data_ptr()
    if entry is None or op & 15:
        meta = _meta(tiles, n_splits, q.dtype, False, False, softcap > 0, False, False, True,
                     _stages(n_splits, B * Hk * row_tiles * n_splits, tiles.num_sms))
        compiled = _decode_launch(
            (row_tiles * n_splits, Hk, B), q, k, v, ws.floats, ws.floats, q, None, q, 0,
            qs[0], qs[2], qs[1], ks[0], ks[2], ks[1], vs[0], vs[2], vs[1],
            Sq, left, right, qk_scale, cap_scale, tiles.group, n_splits, L, lse_off, out, ws.counters, **meta)
        if not op & 15:
            kernels[n_splits] = (compiled, tuple(meta.get(n, d) for n, d in _decode_launch.constexprs))
        return out
    compiled, tail = entry
    compiled.run(row_tiles * n_splits, Hk, B, stream, compiled.function, compiled.packed_metadata, None, None, None,
                 qp, kp, vp, ws.floats_ptr, ws.floats_ptr, qp, None, qp, 0,
                 qs[0], qs[2], qs[1], ks[0], ks[2], ks[1], vs[0], vs[2], vs[1],
                 Sq, left, right, qk_scale, cap_scale, tiles.group, n_splits, L, lse_off, op, ws.counters_ptr, *tail)
    return out


def _run(q, qs, k_cache, ks, v_cache, vs, B, Sq, H, D, Hk, seqlens_k, cache_batch_idx, max_seqlen_k, softmax_scale,
         window_size, softcap, num_splits, key_mask, want_lse, fused=False):
    """forward() with the (batch, seq, head) strides of q, k_cache and v_cache given (qs, ks, vs), so that
    any layout is read in place. want_lse False: lse is neither stored nor returned (None). fused (only
    with want_lse False): the split kernel merges the splits itself, in a cached workspace."""
    dev = q.device
    tiles = _TILES.get((Sq, H, Hk, D, dev))
    if tiles is None:
        tiles = _TILES[(Sq, H, Hk, D, dev)] = _tiles(Sq, H, Hk, D, dev)
    row_tiles = tiles.row_tiles
    if num_splits <= 0:
        num_splits = choose_num_splits(B, Hk, row_tiles, max_seqlen_k, tiles.block_n, tiles.num_sms, TUNE["waves"],
                                       TUNE["one_wave"])
    split = num_splits > 1
    fused = fused and split and not want_lse
    mkey = (tiles, num_splits, q.dtype, cache_batch_idx is not None, key_mask is not None, softcap > 0,
            seqlens_k is not None, want_lse, fused, _stages(num_splits, B * Hk * row_tiles * num_splits, tiles.num_sms))
    meta = _METAS.get(mkey)
    if meta is None:
        meta = _METAS[mkey] = _meta(*mkey)
    left, right = C.window_args(window_size, Sq, max(max_seqlen_k, 1))
    qk_scale, cap_scale = C.score_scales(softmax_scale, softcap)
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=dev)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=dev) if want_lse else None
    counters = q   # never read unless fused
    if split:
        # one float32 workspace: partial outputs (num_splits, B, Sq, H, D), then partial lse (num_splits, B, H, Sq)
        lse_off = num_splits * B * Sq * H * D
        if fused:
            o_part, counters = _workspace(dev, lse_off + num_splits * B * H * Sq, B * Hk * row_tiles)[:2]
        else:
            o_part = torch.empty(lse_off + num_splits * B * H * Sq, dtype=torch.float32, device=dev)
        l_part = o_part
    else:
        o_part, lse_off = out, 0
        l_part = lse if want_lse else out
    if key_mask is not None and key_mask.dtype == torch.bool:
        key_mask = key_mask.view(torch.uint8)
    if TUNE["tma"] and _tma_ok(q, k_cache, ks, v_cache, vs, D):
        kd, vd = (_cache_descriptor(t, st, max_seqlen_k, Hk, D, tiles) for t, st in ((k_cache, ks), (v_cache, vs)))
        _decode_kernel[(row_tiles * num_splits, Hk, B)](
            q, kd, vd, o_part, l_part, q if seqlens_k is None else seqlens_k, cache_batch_idx,
            q if key_mask is None else key_mask, 0 if key_mask is None else key_mask.stride(0),
            *qs, *ks, *vs, Sq, left, right, qk_scale, cap_scale, tiles.group, num_splits, max_seqlen_k, lse_off,
            out, counters, **{**meta, "TMA": True})
    else:
        _decode_launch(
            (row_tiles * num_splits, Hk, B),
            q, k_cache, v_cache, o_part, l_part, q if seqlens_k is None else seqlens_k, cache_batch_idx,
            q if key_mask is None else key_mask, 0 if key_mask is None else key_mask.stride(0),  # never read without
            *qs, *ks, *vs, Sq, left, right, qk_scale, cap_scale, tiles.group, num_splits, max_seqlen_k, lse_off,
            out, counters, **meta)
    if split and not fused:
        _combine_launch((Sq, H, B), o_part, out, out if lse is None else lse, num_splits, lse_off,
                        HEAD_DIM=D, BLOCK_D=tiles.block_d, SPLITS=max(_pow2(num_splits), 2), STORE_LSE=want_lse)
    return out, lse, num_splits


def _tma_ok(q, k_cache, ks, v_cache, vs, D) -> bool:
    """Whether the caches can be read through tensor descriptors (TUNE["tma"]): Hopper or Triton's interpreter, and
    TMA's rule (16-byte aligned bases and strides but the last, a contiguous head dim)."""
    if not (is_interpreting() or is_hopper(q.device)):
        return False
    es = k_cache.element_size()
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(x * es % 16 == 0 for x in st) and t.numel() > 0
               for t, st in ((k_cache, ks), (v_cache, vs)))


def _cache_descriptor(t, st, rows, Hk, D, tiles):
    """A tensor descriptor over cache t ordered (cache entry, row, kv head, head dim) with its (entry, row, head)
    strides st, block (1, BLOCK_N, 1, BLOCK_D), over its first `rows` rows (the most keys any sequence uses; those
    past it read as zeros)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(t, [t.shape[0], rows, Hk, D], [st[0], st[1], st[2], 1],
                            [1, tiles.block_n, 1, tiles.block_d])


# Per-shape launch plans, computed once (a decode step calls _run for every layer of every step):
# (Sq, H, Hk, D, device) -> tiles and SM count; (tiles, splits, dtype, flags...) -> the decode kernel's meta-parameters.
# They follow TUNE: whoever changes TUNE calls set_tune (benchmarks/sweep_decode.py).
_TILES: dict = {}
_METAS: dict = {}
# decode_bhsd's direct launches: (B, H, Hk, D, Sq, device, dtype, softcap on) -> (tiles, splits before the
# key-length cap, {split count: (CompiledKernel, constexpr values)})
_DIRECT: dict = {}


def set_tune(**tune) -> None:
    """Change the decode kernel's launch parameters (TUNE's keys) and forget the plans made with the old."""
    unknown = set(tune) - set(TUNE)
    if unknown:
        raise KeyError(f"set_tune: unknown parameters {sorted(unknown)}; TUNE has {sorted(TUNE)}")
    TUNE.update(tune)
    _TILES.clear()
    _METAS.clear()
    _DIRECT.clear()


class _Tiles(NamedTuple):
    block_d: int
    block_m: int
    block_n: int
    row_tiles: int
    group: int
    head_dim: int
    num_sms: int
    rows: int = 0          # packed rows of the call (query positions x GQA group)


def _tiles(Sq, H, Hk, D, device) -> _Tiles:
    """The tile sizes, row tiles, GQA group and SM count of a call's shape."""
    group = H // Hk
    interp = is_interpreting()
    BLOCK_M = 16 if interp else max(16, min(64, _pow2(Sq * group)))
    BLOCK_N = 32 if interp else (TUNE["block_n"] if D <= 128 else 32)
    return _Tiles(max(_pow2(D), 16), BLOCK_M, BLOCK_N, C.cdiv(Sq * group, BLOCK_M), group, D, C.num_sms(device),
                  Sq * group)


def _meta(tiles, num_splits, dtype, has_bidx, has_kmask, softcap, has_seqlens, want_lse, fused, num_stages=3):
    meta = dict(HEAD_DIM=tiles.head_dim, BLOCK_D=tiles.block_d, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                HAS_BIDX=has_bidx,
                HAS_KMASK=has_kmask, SPLIT=num_splits > 1, SOFTCAP=softcap, DOT_PREC=C.dot_precision(dtype),
                HAS_SEQLENS=has_seqlens, STORE_LSE=want_lse, FUSED=fused,
                SPLITS=max(_pow2(num_splits), 2) if fused else 2,
                MERGE_ROWS=_pow2(min(tiles.rows, tiles.block_m)) if fused and TUNE["merge_rows"] and tiles.rows <= 16
                else 0, TMA=False)   # every constexpr, defaults too: torch.compile's launch of a user kernel needs them
    if not is_interpreting():
        meta.update(num_warps=TUNE["num_warps"], num_stages=num_stages)
    if len(_METAS) > 4096:   # a long run over many shapes: start over rather than grow
        _METAS.clear()
    return meta


_decode_launch = C.FastLaunch(_decode_kernel)
_combine_launch = C.FastLaunch(_combine_kernel)
