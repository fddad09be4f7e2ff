"""FlashAttention-3-style forward for Hopper (arXiv 2407.08608): v2's algorithm with tensor-descriptor (TMA)
tile loads and stores.

Per program (one query block of one head of one sequence), as in v2: Q blocks outer, K/V blocks inner,
O / m / l in registers, normalised once. What changes is how tiles move: every Q, K, V tile comes through a
tensor descriptor (on sm90 one TMA bulk copy into shared memory instead of address math and a copy per
thread), by default made on the host over the whole (B, S, H, D) tensor, or the packed (total, H, D) one
(`plan()`, `_PLANS`); descriptors made in-kernel over one (sequence, head) remain as an option. The scale
folds into the exponent (one multiply-add a score). The unmasked band of key blocks can run warp-specialised
(`tl.range(..., warp_specialize=True)`: producer warps issue the copies), which the sweeps found no faster.

Measured (sixth session, results/2026-11-26-h{100,200}-*v3*): the plans that win use small 4-warp tiles at
d64/d256 and at d128 below 4k keys (several programs an SM, so one program's softmax overlaps another's
matmuls, the overlap FA3 gets from ping-pong scheduling), 128 x 128 with 8 warps at d128 from 4k. The forward
is 0.82-0.93x cuDNN at d128 from 4k on the H100. A loop skewed by one key block (q·kᵀ of the next block issued
before this block's softmax) was tried and removed: Triton waits for each wgmma right after issuing it, so
nothing overlapped and it spilled (0.15-0.78x). That overlap is written out in Gluon in v3_gluon.py
(warp-specialised: a TMA producer, consumer warpgroups with explicit wgmma waits), which `forward` runs instead
of this kernel on Hopper where it measured faster (`_gluon_plan`, `v3_gluon.plan`: 0.93-1.06x cuDNN from 4k
keys). The backward (`backward`) runs the Gluon kernels of v3_gluon_bwd.py on Hopper at head dims 64, 128 and 256
(`_gluon_bwd_plan`: at d64/d128 one pass summing dQ through the TMA reduce, else and with deterministic=True a dK/dV
pass and a dQ pass, bitwise reproducible) and v2's elsewhere. The Gluon kernels are persistent; this one is not.
Requirements checked by `supports()`: fp16/bf16, head dim a multiple of 8 up to 256, 16-byte aligned base pointers and
row strides (TMA's rule); otherwise callers use v2.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._runtime import env_get, is_hopper, is_interpreting
from . import _common as C
from ._common import (body_end, desc_rows, grouped_tile, normalise_rows, seq_bounds, softmax_tile, tile_range,
                      visible)


@triton.jit
def _load_k(k_desc, start_n, b, k_start, kvh, Sk, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HOST: tl.constexpr,
            IS_VARLEN: tl.constexpr, MASKED: tl.constexpr):
    """Key block [start_n, start_n + BLOCK_N) of this sequence and KV head, through a tensor descriptor: the
    caller's over the whole tensor when HOST (`desc_rows`: keys past Sk read as zeros, packed or not), else one
    made in-kernel over this (sequence, head)."""
    if HOST:
        return desc_rows(k_desc, b, k_start, start_n, kvh, Sk, BLOCK_N, BLOCK_D, IS_VARLEN, MASKED)
    else:
        return k_desc.load([start_n, 0])


@triton.jit
def _tile(acc, l_i, m_i, qk, v, offs_m, cols, Sk, diag, left, right, qk_scale, cap_scale,
          MASKED: tl.constexpr, SOFTCAP: tl.constexpr, FOLD: tl.constexpr, LEFT: tl.constexpr):
    """The online-softmax update with one key tile: qk = q·kᵀ (raw, float32), v the tile's values (FOLD: the
    scale folded into the exponent; qk_scale > 0 is the caller's condition for it; LEFT False: the window has no
    left edge, the mask's lower bound skipped)."""
    p, alpha, m_new, l_i = softmax_tile(qk, m_i, l_i, 1.0, qk_scale, cap_scale, offs_m, cols, Sk, diag, left, right,
                                        MASKED, SOFTCAP, FOLD, False, LEFT)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _fwd_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, start, end, offs_m, offs_n, Sk, diag, left, right,
                   qk_scale, cap_scale, b, k_start, kvh, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   MASKED: tl.constexpr, SOFTCAP: tl.constexpr, FOLD: tl.constexpr, HOST: tl.constexpr,
                   IS_VARLEN: tl.constexpr, WS: tl.constexpr, LEFT: tl.constexpr):
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WS):
        # K and V tiles through the descriptors (rows past the sequence read as 0)
        k = _load_k(k_desc, start_n, b, k_start, kvh, Sk, BLOCK_N, BLOCK_D, HOST, IS_VARLEN, MASKED)
        v = _load_k(v_desc, start_n, b, k_start, kvh, Sk, BLOCK_N, BLOCK_D, HOST, IS_VARLEN, MASKED)
        qk = tl.dot(q, tl.trans(k))
        acc, l_i, m_i = _tile(acc, l_i, m_i, qk, v, offs_m, start_n + offs_n, Sk, diag, left, right, qk_scale,
                              cap_scale, MASKED, SOFTCAP, FOLD, LEFT)
    return acc, l_i, m_i


@triton.jit
def _fwd_three_loops(acc, l_i, m_i, q, k_desc, v_desc, lo, full_lo, full_hi, hi, offs_m, offs_n, Sk, diag, left, right,
                     qk_scale, cap_scale, b, k_start, kvh, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     SOFTCAP: tl.constexpr, FOLD: tl.constexpr, HOST: tl.constexpr, IS_VARLEN: tl.constexpr,
                     WS: tl.constexpr, LEFT: tl.constexpr):
    """The key blocks of a tile in three pipelined loops: the masked left window edge (no block without one), the band
    every row sees (warp-specialised with WS), the masked diagonal and key tail. The left loop stays compiled when the
    window has none (LEFT False): leaving it out took ptxas from 128 to 142 registers at d64 (three programs an SM
    instead of four; SASS, Triton 3.6)."""
    acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, lo, full_lo, offs_m, offs_n, Sk, diag, left, right,
                                   qk_scale, cap_scale, b, k_start, kvh, BLOCK_N, BLOCK_D, True, SOFTCAP, FOLD, HOST,
                                   IS_VARLEN, False, LEFT)
    acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, full_lo, full_hi, offs_m, offs_n, Sk, diag, left,
                                   right, qk_scale, cap_scale, b, k_start, kvh, BLOCK_N, BLOCK_D, False, SOFTCAP, FOLD,
                                   HOST, IS_VARLEN, WS, LEFT)
    acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, full_hi, hi, offs_m, offs_n, Sk, diag, left,
                                   right, qk_scale, cap_scale, b, k_start, kvh, BLOCK_N, BLOCK_D, True, SOFTCAP, FOLD,
                                   HOST, IS_VARLEN, False, LEFT)
    return acc, l_i, m_i


@triton.jit
def _fwd_loop_tma(acc, l_i, m_i, q, k_desc, v_desc, lo, hi, full_lo, full_hi, offs_m, offs_n, Sk, diag, left, right,
                  qk_scale, b, k_start, kvh, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HOST: tl.constexpr,
                  IS_VARLEN: tl.constexpr, LEFT: tl.constexpr):
    """Every key block of the tile, [lo, hi), in one pipelined loop (the scale folded, no softcap, no warp
    specialisation: the kernel's ONE_LOOP): the blocks outside the band [full_lo, full_hi) take the mask in a branch on
    the block's position, so that a tile sets up one software pipeline (its mbarriers, prologue copies and their
    teardown, ~143 instructions and ~16 CTA barriers in SASS, paid even by a loop that runs no block) instead of three.
    Packed (IS_VARLEN), the block across the key tail (at most one) comes after the loop, its rows past Sk zeroed
    (`desc_rows`); dense, the descriptor reads them as zeros."""
    if IS_VARLEN:
        body_hi = body_end(lo, hi, Sk, BLOCK_N)
    else:
        body_hi = hi
    for start_n in tl.range(lo, body_hi, BLOCK_N):
        k = _load_k(k_desc, start_n, b, k_start, kvh, Sk, BLOCK_N, BLOCK_D, HOST, IS_VARLEN, False)
        v = _load_k(v_desc, start_n, b, k_start, kvh, Sk, BLOCK_N, BLOCK_D, HOST, IS_VARLEN, False)
        qk = tl.dot(q, tl.trans(k))
        cols = start_n + offs_n
        if (start_n < full_lo) | (start_n >= full_hi):
            qk = tl.where(visible(offs_m, cols, diag, left, right, Sk, LEFT), qk, float("-inf"))
        acc, l_i, m_i = _tile(acc, l_i, m_i, qk, v, offs_m, cols, Sk, diag, left, right, qk_scale, 1.0, False, False,
                              True, LEFT)
    if IS_VARLEN:
        if body_hi < hi:
            k = _load_k(k_desc, body_hi, b, k_start, kvh, Sk, BLOCK_N, BLOCK_D, HOST, IS_VARLEN, True)
            v = _load_k(v_desc, body_hi, b, k_start, kvh, Sk, BLOCK_N, BLOCK_D, HOST, IS_VARLEN, True)
            acc, l_i, m_i = _tile(acc, l_i, m_i, tl.dot(q, tl.trans(k)), v, offs_m, body_hi + offs_n, Sk, diag, left,
                                  right, qk_scale, 1.0, True, False, True, LEFT)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window_left", "window_right", "group", "group_tiles"])
def _fwd_kernel_tma(Q, K, V, O, O_PTR, LSE, CU_Q, CU_K,
                    stride_qb, stride_qm, stride_qh,
                    stride_kb, stride_kn, stride_kh,
                    stride_vb, stride_vn, stride_vh,
                    stride_ob, stride_om, stride_oh,
                    stride_lb, stride_lh,
                    seqlen_q, seqlen_k, window_left, window_right, qk_scale, cap_scale, group, group_tiles,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    IS_VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, WS: tl.constexpr, HOST: tl.constexpr = False,
                    FOLD: tl.constexpr = False, LEFT: tl.constexpr = True, ONE_LOOP: tl.constexpr = False):
    # Grid: (cdiv(max_seqlen_q, BLOCK_M), nheads, batch). One program: BLOCK_M rows of O and lse, in the order of
    # `grouped_tile` (group_tiles 1: each head's tiles in a row, heaviest first).
    # HOST: Q, K, V, O are the caller's tensor descriptors over (B, S, H, D), or over the packed (total, H, D)
    # when IS_VARLEN (no descriptor written and fenced per program); else descriptors are made here over one
    # (sequence, head), which stop exactly at the sequence's end.
    pid_m, h, b32 = grouped_tile(seqlen_k, group_tiles, HEAD_DIM)
    b = b32.to(tl.int64)
    q_start, k_start, Sq, Sk = seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= Sq:
        return
    kvh = (h // group).to(tl.int64)
    h64 = h.to(tl.int64)
    if HOST:
        k_desc = K
        v_desc = V
        # packed: rows past Sq are the next sequence's; they only reach rows that are not stored
        q = desc_rows(Q, b32, q_start, m0, h, Sq, BLOCK_M, BLOCK_D, IS_VARLEN, False)
    else:
        q = tl.make_tensor_descriptor(Q + b * stride_qb + h64 * stride_qh + q_start * stride_qm,
                                      shape=[Sq, HEAD_DIM], strides=[stride_qm, 1],
                                      block_shape=[BLOCK_M, BLOCK_D]).load([m0, 0])
        k_desc = tl.make_tensor_descriptor(K + b * stride_kb + kvh * stride_kh + k_start * stride_kn,
                                           shape=[Sk, HEAD_DIM], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(V + b * stride_vb + kvh * stride_vh + k_start * stride_vn,
                                           shape=[Sk, HEAD_DIM], strides=[stride_vn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = Sk - Sq
    lo, full_lo, full_hi, hi = tile_range(m0, BLOCK_M, diag, window_left, window_right, Sk, BLOCK_N)
    bk = b32
    kh = h // group
    if ONE_LOOP:   # folded, no softcap, no warp specialisation: one loop (`_fwd_loop_tma`)
        acc, l_i, m_i = _fwd_loop_tma(acc, l_i, m_i, q, k_desc, v_desc, lo, hi, full_lo, full_hi, offs_m, offs_n, Sk,
                                      diag, window_left, window_right, qk_scale, bk, k_start, kh, BLOCK_N, BLOCK_D,
                                      HOST, IS_VARLEN, LEFT)
    else:
        acc, l_i, m_i = _fwd_three_loops(acc, l_i, m_i, q, k_desc, v_desc, lo, full_lo, full_hi, hi, offs_m, offs_n,
                                         Sk, diag, window_left, window_right, qk_scale, cap_scale, bk, k_start, kh,
                                         BLOCK_N, BLOCK_D, SOFTCAP, FOLD, HOST, IS_VARLEN, WS, LEFT)
    # epilogue, as v2
    acc, lse = normalise_rows(acc, l_i, m_i, float("inf"))
    tl.store(LSE + b * stride_lb + h64 * stride_lh + q_start + offs_m, lse, mask=offs_m < Sq)
    if HOST and not IS_VARLEN:   # rows past the sequence are past the tensor: the copy drops them
        O.store([b32, m0, h, 0], acc.to(O.dtype).reshape(1, BLOCK_M, 1, BLOCK_D))
    elif HOST:   # packed: rows past this sequence belong to the next one, so a masked store
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(O_PTR + (q_start + offs_m[:, None]) * stride_om + h64 * stride_oh + offs_d[None, :],
                 acc.to(O_PTR.dtype.element_ty), mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM))
    else:
        tl.make_tensor_descriptor(O + b * stride_ob + h64 * stride_oh + q_start * stride_om,
                                  shape=[Sq, HEAD_DIM], strides=[stride_om, 1],
                                  block_shape=[BLOCK_M, BLOCK_D]).store([m0, 0], acc.to(O.dtype.element_ty))


# Launch plan per head-dim class: (BLOCK_M, BLOCK_N, num_warps, num_stages), whether the tiles come through
# descriptors made on the host (over the whole tensors) or in-kernel, and whether the unmasked band is
# warp-specialised. From the sixth session's sweeps (benchmarks/sweep_v3.py; results/2026-11-26-h200-sweep-v3*.md,
# 1k-16k tokens, causal and not): host descriptors win everywhere; small 4-warp tiles, several programs an SM,
# win at d64 and d256 and at d128 below 4k keys (`_PLANS_SHORT`); warp specialisation gains nothing on top.
_PLANS = {64: ((64, 64, 4, 3), True, False), 128: ((128, 128, 8, 3), True, False),
          256: ((64, 32, 4, 3), True, False)}
_PLANS_SHORT = {64: _PLANS[64], 128: ((64, 64, 4, 3), True, False), 256: _PLANS[256]}
SHORT_KEYS = 4096   # max_seqlen_k below this takes _PLANS_SHORT
_allocator_set = False


def _set_allocator():
    """In-kernel tensor descriptors need a global-memory scratch allocator (Triton's rule)."""
    global _allocator_set
    if not _allocator_set:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                     device="cuda" if torch.cuda.is_available()
                                                                     else "cpu"))
        _allocator_set = True


def supports(q, k, v) -> str | None:
    """None if v3 can run these inputs, else the reason (the caller then raises or uses v2)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"v3 runs float16/bfloat16 only (got {q.dtype})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        row = t.stride(-3) if t.dim() == 3 else t.stride(1)
        if t.data_ptr() % 16 or (row * t.element_size()) % 16 or (t.stride(-2) * t.element_size()) % 16:
            return f"v3's TMA loads need 16-byte aligned {name} (base pointer, row and head strides)"
    return None


def _gluon_plan(q, k, v, cu_seqlens_q, max_seqlen_k, softmax_scale, window_size, softcap):
    """The Gluon kernel's launch plan for these inputs (v3_gluon.py), or None for this file's kernel: on a Hopper
    GPU, for inputs in its scope (`v3_gluon.supports`) where it measured faster (`v3_gluon.plan`).
    HF_FLASHATTN_V3_GLUON=0 turns it off; =1 takes it for every input in its scope."""
    mode = env_get("HF_FLASHATTN_V3_GLUON", "auto")
    if mode == "0" or is_interpreting() or not is_hopper(q.device):
        return None
    from . import v3_gluon
    if v3_gluon.supports(q, k, v, cu_seqlens_q, softmax_scale, softcap) is not None:
        return None
    return v3_gluon.plan(q.shape[-1], max_seqlen_k, tuple(window_size) != (-1, -1), force=mode == "1")


_ROUTES: dict = {}


def _route(q, k, v, cu_seqlens_q, max_seqlen_k, softmax_scale, window_size, softcap):
    """(`supports()`'s answer, `_gluon_plan()`'s) for these inputs, kept per everything the two read (shapes,
    strides, dtype, base alignment, packed or not, longest key sequence, window, scale's sign, softcap, device, the
    HF_FLASHATTN_V3_GLUON switch): the checks cost ~15 us a call, a look-up ~3."""
    key = (q.shape, k.shape, q.stride(), k.stride(), v.stride(), q.dtype, v.dtype,
           (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15, cu_seqlens_q is None, max_seqlen_k, tuple(window_size),
           softmax_scale > 0, softcap, q.get_device(), env_get("HF_FLASHATTN_V3_GLUON", "auto"))
    hit = _ROUTES.get(key)
    if hit is None:
        why = supports(q, k, v)
        hit = C.keep(_ROUTES, key, (why, None if why is not None else
                                    _gluon_plan(q, k, v, cu_seqlens_q, max_seqlen_k, softmax_scale, window_size,
                                                softcap)))
    return hit


def plan(D: int, max_seqlen_k: int):
    """The launch plan (see `_PLANS`) for head dim D and the longest key sequence."""
    return (_PLANS_SHORT if max_seqlen_k < SHORT_KEYS else _PLANS)[C.head_dim_class(D)]


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_size, softcap,
            _plan=None, _fold=None):
    """_plan overrides `plan()` (benchmarks/sweep_v3.py): ((BLOCK_M, BLOCK_N, num_warps, num_stages), host
    descriptors, warp specialisation); _fold False scales the scores before the softmax instead of folding the
    scale into the exponent (the kernel before the sixth session)."""
    why, gplan = _route(q, k, v, cu_seqlens_q, max_seqlen_k, softmax_scale, window_size, softcap)
    if why is not None:
        raise NotImplementedError(why + "; use version='v2'.")
    if _plan is not None:
        gplan = None
    if gplan is not None:
        from . import v3_gluon
        return v3_gluon.forward(q, k, v, max_seqlen_q, max_seqlen_k, softmax_scale, window_size, _plan=gplan,
                                cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    varlen = cu_seqlens_q is not None
    H, D = q.shape[-2], q.shape[-1]
    Hk = k.shape[-2]
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((H, q.shape[0]) if varlen else (batch, H, q.shape[1]), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or batch == 0:
        return out.zero_(), lse.fill_(float("inf"))
    left, right = C.window_args(window_size, max_seqlen_q, max_seqlen_k)
    qk_scale, cap_scale = C.score_scales(softmax_scale, softcap)
    stride_l = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    BLOCK_D = max(C.pow2(D), 16)
    (bm, bn, warps, stages, *cap), host, ws = _plan or plan(D, max_seqlen_k)
    # a 5th element of the tiles (benchmarks' plans only): ptxas' register cap, for more programs an SM
    opts = dict(maxnreg=cap[0]) if cap and cap[0] else {}
    if is_interpreting():
        bm, bn, warps, stages, opts = 32, 16, 4, 1, {}
    # triton 3.6's warp-specialisation pass asserts (TaskIdPropagation, "PassManager::run failed") on the
    # head-dim-64 tiles (benchmarks/results/2026-11-26-v3-h100-correctness-ws.md): those run pipelined only.
    ws = ws and os.environ.get("HF_FLASHATTN_V3_WS", "1") != "0" and not is_interpreting() and BLOCK_D > 64
    # descriptors over the whole tensors: every stride 16-byte aligned (a batch stride too), no empty key dim
    host = host and C.descriptors_ok(q, k, v)
    fold = softcap == 0 and softmax_scale > 0 and (_fold is None or _fold)
    one_loop = ONE_LOOP and fold and not ws and one_loop_ok(host, bn, BLOCK_D)
    q_arg, k_arg, v_arg, o_arg = q, k, v, out
    if host:   # (B, S, H, D) or packed (total, H, D): a tile is BLOCK rows of one head
        q_arg, o_arg = (C.host_descriptor(t, bm, BLOCK_D, varlen, tma=True) for t in (q, out))
        k_arg, v_arg = (C.host_descriptor(t, bn, BLOCK_D, varlen, tma=True) for t in (k, v))
    else:
        _set_allocator()
    grid = (C.cdiv(max_seqlen_q, bm), H, batch)
    # what Triton specialises on (`C.FastLaunch.keyed`): the pointers' dtype and alignment (q, k, v given; out, lse
    # fresh; cu_seqlens given or None), the strides (q, k, v given; out's and lse's follow from the shapes), the
    # descriptors' blocks (the plan, D), the group size, the 32/64-bit type of the unspecialised lengths and window
    align = (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15
    if varlen:
        align = (align, (cu_seqlens_q.data_ptr() | cu_seqlens_k.data_ptr()) & 15)
    key = (q.shape, k.shape, q.stride(), k.stride(), v.stride(), q.dtype, align, varlen, softcap > 0, bm, bn, warps,
           stages, ws, host, fold, (max_seqlen_q | max_seqlen_k | left | right) >> 31, tuple(opts.items()),
           C.left_edge(window_size), one_loop)
    _fwd_launch.keyed(key, grid, q_arg, k_arg, v_arg, o_arg, out, lse, cu_seqlens_q, cu_seqlens_k,
                      *C.seq_layout(q, varlen), *C.seq_layout(k, varlen), *C.seq_layout(v, varlen),
                      *C.seq_layout(out, varlen), *stride_l,
                      max_seqlen_q, max_seqlen_k, left, right, qk_scale, cap_scale, H // Hk, C.group_tiles("v3"),
                      HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=bm, BLOCK_N=bn, IS_VARLEN=varlen, SOFTCAP=softcap > 0,
                      WS=ws, HOST=host, FOLD=fold, LEFT=C.left_edge(window_size), ONE_LOOP=one_loop,
                      num_warps=warps, num_stages=stages, **opts)
    return out, lse


_fwd_launch = C.FastLaunch(_fwd_kernel_tma)


def one_loop_ok(q_reshaped: bool, block_n: int, block_d: int) -> bool:
    """Whether a plan may take the one-loop kernel (`ONE_LOOP`): not with Q's tile reshaped after its load (host
    descriptors over (B, S, H, D), which put Q in registers), 64-key blocks and a head-dim tile of 64 or less, where
    the H100 gave wrong results (the note at `ONE_LOOP`)."""
    return not (q_reshaped and block_n == 64 and block_d <= 64)


# The kernel's key blocks in one pipelined loop (`_fwd_loop_tma`; the scale folded, no warp specialisation)
# instead of three (left edge, band, diagonal/tail), each of which sets up and tears down its software pipeline per
# tile even when it runs no block. SASS at d64 (64 x 64, 4 warps, 3 stages, Triton 3.6, sm_90a): the kernel 2,096 ->
# 1,136 instructions, CTA barriers 55 -> 23, registers 128 -> 109; an unmasked block 298 -> 301 instructions a warp
# (the branch around the mask), a masked one 376 -> 380; ~143 instructions and ~16 barriers a tile fewer per loop left
# out. Predicted from those counts: ~8% fewer instructions a tile at d64 1k causal, ~4% unmasked, ~1% at 4k.
# Measured on the H100 (twenty-first session): **wrong at head dim 64 with 64-key blocks and host descriptors** (the
# default d64 plan): every tile of more than one key block differs, max error 0.46-0.96 against the reference, the same
# at 64 x 64 / 3 or 2 stages and 128 x 64 / 8 warps; bitwise equal to the three loops with 32- or 128-key blocks, with
# in-kernel descriptors, at d128 / d256 and packed (results/2026-11-27-h100-probe-one-loop.md). The cause is in the
# SASS (Triton 3.6's ptxas 12.8; 12.9's does the same on that PTX): Q's register fragment is loaded once before the
# loop (LDSM into R88-R103) and the loop's P fragment for the P·V wgmma is packed into the same registers (F2FP ...
# R100), so the next block's QK reads P as Q. The PTX keeps them in distinct virtual registers; with 64-key blocks and
# D = 64 the two fragments have the same shape, and the one loop's latch block (exp2, P·V) is laid out before its
# header. A ptxas fault, then; `one_loop_ok` keeps those plans on three loops. Timed at that plan (its results
# wrong), it read 0.9% / 3.4% faster at d64 1k unmasked / causal, 1.1% slower / 0.7% faster at 4k
# (results/2026-11-27-h100-plan-ab-one-loop.md): off.
# The workaround tried for those plans, Q through a 2-D host descriptor over the (B·S, H·D) view so that Q stays in
# shared memory (twenty-second session), was correct (results/2026-11-27-h100-probe-one-loop-q2d.md) but 6.7-9.5%
# slower than the three loops at d64 1k / 4k (results/2026-11-27-h100-plan-ab-d64-q2d.md): removed.
# HF_FLASHATTN_ONE_LOOP=1 at import turns it on (with v2's and its backward's, which are on by default).
ONE_LOOP = env_get("HF_FLASHATTN_ONE_LOOP", "0") == "1"


def _gluon_bwd_plan(q, k, v, softmax_scale, softcap, deterministic, max_seqlen_k=None, window_size=(-1, -1)):
    """The Gluon backward's launch plan (v3_gluon_bwd.py) for these inputs, or None for v2's backward: on a Hopper
    GPU, for inputs in its scope; with deterministic=True, or where a query row sees few keys (`v3_gluon_bwd.plan`),
    one whose dQ has a pass of its own (no atomics). HF_FLASHATTN_V3_GLUON_BWD=0 turns it off."""
    if env_get("HF_FLASHATTN_V3_GLUON_BWD", "auto") == "0" or is_interpreting() or not is_hopper(q.device):
        return None
    from . import v3_gluon_bwd
    if v3_gluon_bwd.supports(q, k, v, softmax_scale, softcap) is not None:
        return None
    return v3_gluon_bwd.plan(q.shape[-1], deterministic, max_seqlen_k, window_size)


_BWD_ROUTES: dict = {}


def backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
             window_size, softcap, deterministic, grads=None):
    """grads: (dq, dk, dv) to write into (the views of a packed tensor's gradient), else made. The Gluon backward
    takes them where TMA can store to them, else v2's backward runs."""
    # `_gluon_bwd_plan`'s answer and whether dO needs a copy, kept per everything the two read (as `_route`)
    key = (q.shape, k.shape, q.stride(), k.stride(), v.stride(), do.stride(), q.dtype,
           (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15, do.data_ptr() & 15, softmax_scale > 0, softcap,
           deterministic, q.get_device(), env_get("HF_FLASHATTN_V3_GLUON_BWD", "auto"), max_seqlen_k,
           tuple(window_size), C.grads_key(grads))
    hit = _BWD_ROUTES.get(key)
    if hit is None:
        gplan = _gluon_bwd_plan(q, k, v, softmax_scale, softcap, deterministic, max_seqlen_k, window_size)
        if gplan is not None and grads is not None and not C.descriptors_ok(*grads):
            gplan = None
        # e.g. the expanded gradient of a sum: TMA needs real strides
        hit = C.keep(_BWD_ROUTES, key, (gplan, gplan is not None and not C.descriptors_ok(do)))
    gplan, copy_do = hit
    if gplan is not None:
        from . import v3_gluon_bwd
        if copy_do:
            do = do.contiguous()
        return v3_gluon_bwd.backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     softmax_scale, window_size, _plan=gplan, grads=grads)
    from . import v2
    return v2.backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       softmax_scale, window_size, softcap, deterministic, grads)
