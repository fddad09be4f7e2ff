"""FP8 (e4m3) attention forward with per-block scales (FlashAttention-3's FP8 path, in Triton).

Q, K, V arrive quantised to float8_e4m3fn in blocks of QUANT_BLOCK rows per (sequence, head), each
block with a float32 descale (x ≈ x8 · descale). One program: BLOCK_M query rows (inside one Q block),
walking key blocks of BLOCK_N rows (inside one K/V block), so every tile has a single descale:
    s = (q8 · k8ᵀ) · q_descale · k_descale            (FP8 product, float32 accumulator)
    p = exp2(s · scale · log2 e − m)  ∈ [0, 1]      (float32, online softmax as in v2)
    acc = acc · α + (fp8(p) · v8) · v_descale         (P quantised to e4m3 as FA3 does)
The row sum l is taken over the float32 p. Causal (bottom-right), sliding window, softcap and GQA as
in v2; no varlen, no backward (forward-only, for inference).

The loop is bound by instruction issue rather than by the FP8 tensor cores (per tile, the exponentials
and the float32 softmax work take as long as the two products), so the kernel spends few instructions
per score: the tile's scales fold into the exponent's multiply-add, and on Hopper the tiles come in
through TMA tensor descriptors (one copy instruction a tile; `_PLANS` picks pointer loads, descriptors
made in-kernel, or descriptors made on the host per head dim and causal). V is transposed once per call
(`transpose_v`) because FP8 wgmma reads both operands of P·V key-major.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import is_interpreting
from . import _common as C
from ._common import normalise_rows, softmax_tile, tile_range

QUANT_BLOCK = 128  # rows per quantisation block of Q, K and V (per sequence and head)


@triton.jit
def _round_to_e4m3_grid(x):
    """Round x >= 0 to the nearest e4m3 value (3 mantissa bits, subnormal step 2^-9), so that the cast
    to float8 that follows is exact. Only on Triton's interpreter, whose float32 -> float8 cast truncates
    (biased, unlike the GPU's round-to-nearest): without this the CPU tests would check a different
    rounding than the GPU runs."""
    e = tl.maximum(tl.floor(tl.log2(tl.maximum(x, 1e-30))), -6.0)
    step = tl.exp2(e - 3.0)
    return tl.floor(x / step + 0.5) * step


@triton.jit
def _fp8_tile(acc, l_i, m_i, vd_cur, q, k, vt, qd, kd, vd, cols, offs_m, Sk, diag, left, right, qk_scale, cap_scale,
              MASKED: tl.constexpr, SOFTCAP: tl.constexpr, RN_P: tl.constexpr, PV_MODE: tl.constexpr,
              FOLD: tl.constexpr):
    """One key tile of the FP8 forward: k (BLOCK_N, BLOCK_D) and vt (BLOCK_D, BLOCK_N) e4m3, kd / vd their
    descales; returns the updated (acc, l_i, m_i, vd_cur)."""
    qk = tl.dot(q, tl.trans(k))
    # the tile's one scale qd · kd folded into the exponent's multiply-add (FOLD), where the instruction issue
    # (not the FP8 tensor cores) bounds the loop
    p, alpha, m_new, l_i = softmax_tile(qk, m_i, l_i, qd * kd, qk_scale, cap_scale, offs_m, cols, Sk, diag, left,
                                        right, MASKED, SOFTCAP, FOLD, True)
    # acc is kept in units of the current V block's descale, so the product accumulates in place (no
    # second BLOCK_M x D float32 tile): rescale by alpha and by the ratio of the old and new descales
    vd = tl.maximum(vd, 1e-30)
    acc = acc * (alpha * (vd_cur / vd))[:, None]
    if PV_MODE == 0:
        if RN_P:
            p8 = _round_to_e4m3_grid(p).to(vt.dtype)
        else:
            p8 = p.to(vt.dtype)
        acc = tl.dot(p8, tl.trans(vt), acc)
    elif PV_MODE == 1:  # diagnostic: P·V in bf16 (V tile widened), to time the FP8 P path against it
        acc = tl.dot(p.to(tl.bfloat16), tl.trans(vt.to(tl.bfloat16)), acc)
    return acc, l_i, m_new, vd


@triton.jit
def _fp8_inner(acc, l_i, m_i, vd_cur, q, qd, K_base, VT_base, KD_base, VD_base, stride_kn, stride_vd, start, end,
               offs_m, offs_n, offs_d, Sk, diag, left, right, qk_scale, cap_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, QB: tl.constexpr,
               MASKED: tl.constexpr, SOFTCAP: tl.constexpr, RN_P: tl.constexpr, PV_MODE: tl.constexpr,
               FOLD: tl.constexpr, k_desc, vt_desc, b, kvh, TMA: tl.constexpr, WS: tl.constexpr):
    # TMA (1: descriptors made in-kernel over this (sequence, head); 2: the caller's (B, S, Hk, D) and
    # (B, Hk, D, S) descriptors, indexed by b and kvh): the K and V^T tiles come through k_desc / vt_desc
    # (bulk copies into shared memory; keys past the sequence and head-dim padding read as zeros, so no load
    # masks), and WS warp-specialises the loop (producer warps issue the copies) as v3's forward does.
    # V arrives transposed (D, keys; keys contiguous): the P·V product's reduction dim is the keys, and
    # FP8 wgmma reads both operands K-major, so the tile goes to shared memory as loaded (no transpose
    # through registers, which would also keep the loop from being pipelined).
    # Every loop that runs starts on a multiple of BLOCK_N (tile_range aligns lo, full_lo and full_hi; a
    # bound it could not align is hi itself, and the loops from it are empty). Saying so lets the compiler
    # read the transposed V tile, whose contiguous dim is the keys, in 16-byte vectors and pipeline it:
    # without it the tile was loaded a byte per instruction, not asynchronously (ncu: 88% of the
    # global-load sectors wasted, results/2026-11-26-h100-ncu.md).
    # (A multiple_of hint on start does not survive to the axis analysis; a product by BLOCK_N does, and the
    # loop's induction variable inherits it. An unaligned start only comes with an empty loop, kept empty.)
    aligned = (start // BLOCK_N) * BLOCK_N
    end = tl.where(start < end, end, aligned)
    for start_n in tl.range(aligned, end, BLOCK_N, warp_specialize=WS):
        cols = start_n + offs_n
        if TMA == 2:
            k = k_desc.load([b, start_n, kvh, 0]).reshape(BLOCK_N, BLOCK_D)
            vt = vt_desc.load([b, kvh, 0, start_n]).reshape(BLOCK_D, BLOCK_N)
        elif TMA == 1:
            k = k_desc.load([start_n, 0])
            vt = vt_desc.load([0, start_n])
        else:
            k_ptrs = K_base + cols[:, None] * stride_kn + offs_d[None, :]
            vt_ptrs = VT_base + offs_d[:, None] * stride_vd + cols[None, :]
            if MASKED:   # key tail (edge blocks only) and head-dim padding
                k = tl.load(k_ptrs, mask=(cols[:, None] < Sk) & (offs_d[None, :] < HEAD_DIM), other=0.0)
                vt = tl.load(vt_ptrs, mask=(cols[None, :] < Sk) & (offs_d[:, None] < HEAD_DIM), other=0.0)
            elif BLOCK_D != HEAD_DIM:
                k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
                vt = tl.load(vt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            else:
                k = tl.load(k_ptrs)
                vt = tl.load(vt_ptrs)
        kd = tl.load(KD_base + start_n // QB)
        vd = tl.load(VD_base + start_n // QB)
        acc, l_i, m_i, vd_cur = _fp8_tile(acc, l_i, m_i, vd_cur, q, k, vt, qd, kd, vd, cols, offs_m, Sk, diag, left,
                                          right, qk_scale, cap_scale, MASKED, SOFTCAP, RN_P, PV_MODE, FOLD)
    return acc, l_i, m_i, vd_cur


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window_left", "window_right", "group"])
def _fp8_fwd_kernel(Q, K, VT, QD, KD, VD, O, LSE,
                    stride_qb, stride_qm, stride_qh,
                    stride_kb, stride_kn, stride_kh,
                    stride_vb, stride_vh, stride_vd,
                    stride_qdb, stride_qdh, stride_kdb, stride_kdh, stride_vdb, stride_vdh,
                    stride_ob, stride_om, stride_oh,
                    stride_lb, stride_lh,
                    seqlen_q, seqlen_k, window_left, window_right, qk_scale, cap_scale, group,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    QB: tl.constexpr, SOFTCAP: tl.constexpr, RN_P: tl.constexpr, PV_MODE: tl.constexpr = 0,
                    FOLD: tl.constexpr = True, TMA: tl.constexpr = 0, WS: tl.constexpr = False):
    # Grid: (cdiv(seqlen_q, BLOCK_M), nheads, batch), as v2's forward. TMA 1: Q, K and V^T tiles through
    # tensor descriptors made in-kernel (base pointers and strides 16-byte aligned: the caller checks); 2:
    # Q, K, VT are the caller's descriptors over (B, Sq, H, D), (B, Sk, Hk, D), (B, Hk, D, Sk) (no
    # descriptor written to memory per program); the band of unmasked key blocks warp-specialised when WS.
    tl.static_assert(QB % BLOCK_M == 0)
    tl.static_assert(QB % BLOCK_N == 0)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    m0 = pid_m * BLOCK_M
    kvh = (h // group).to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    KD_base = KD + b * stride_kdb + kvh * stride_kdh
    VD_base = VD + b * stride_vdb + kvh * stride_vdh
    if TMA == 2:   # placeholders for the pointer bases, which this path never reads
        K_base = KD_base
        VT_base = VD_base
        k_desc = K
        vt_desc = VT
        q = Q.load([tl.program_id(2), m0, h, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        K_base = K + b * stride_kb + kvh * stride_kh
        VT_base = VT + b * stride_vb + kvh * stride_vh
    if TMA == 1:
        k_desc = tl.make_tensor_descriptor(K_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        vt_desc = tl.make_tensor_descriptor(VT_base, shape=[HEAD_DIM, seqlen_k], strides=[stride_vd, 1],
                                            block_shape=[BLOCK_D, BLOCK_N])
        q = tl.make_tensor_descriptor(Q + b * stride_qb + h64 * stride_qh, shape=[seqlen_q, HEAD_DIM],
                                      strides=[stride_qm, 1], block_shape=[BLOCK_M, BLOCK_D]).load([m0, 0])
    elif TMA == 0:   # placeholders: the pointer path never reads them
        k_desc = K_base
        vt_desc = VT_base
        q = tl.load(Q + b * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    qd = tl.load(QD + b * stride_qdb + h64 * stride_qdh + m0 // QB)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    vd_cur = tl.full([], 1.0, dtype=tl.float32)
    diag = seqlen_k - seqlen_q
    lo, full_lo, full_hi, hi = tile_range(m0, BLOCK_M, diag, window_left, window_right, seqlen_k, BLOCK_N)
    acc, l_i, m_i, vd_cur = _fp8_inner(acc, l_i, m_i, vd_cur, q, qd, K_base, VT_base, KD_base, VD_base,
                                       stride_kn, stride_vd, lo, full_lo, offs_m, offs_n, offs_d, seqlen_k, diag,
                                       window_left, window_right,
                                       qk_scale, cap_scale, HEAD_DIM, BLOCK_D, BLOCK_N, QB, True, SOFTCAP, RN_P,
                                       PV_MODE, FOLD, k_desc, vt_desc, tl.program_id(2), h // group, TMA, False)
    acc, l_i, m_i, vd_cur = _fp8_inner(acc, l_i, m_i, vd_cur, q, qd, K_base, VT_base, KD_base, VD_base,
                                       stride_kn, stride_vd, full_lo, full_hi, offs_m, offs_n, offs_d, seqlen_k, diag,
                                       window_left, window_right,
                                       qk_scale, cap_scale, HEAD_DIM, BLOCK_D, BLOCK_N, QB, False, SOFTCAP, RN_P,
                                       PV_MODE, FOLD, k_desc, vt_desc, tl.program_id(2), h // group, TMA, WS)
    acc, l_i, m_i, vd_cur = _fp8_inner(acc, l_i, m_i, vd_cur, q, qd, K_base, VT_base, KD_base, VD_base,
                                       stride_kn, stride_vd, full_hi, hi, offs_m, offs_n, offs_d, seqlen_k, diag,
                                       window_left, window_right,
                                       qk_scale, cap_scale, HEAD_DIM, BLOCK_D, BLOCK_N, QB, True, SOFTCAP, RN_P,
                                       PV_MODE, FOLD, k_desc, vt_desc, tl.program_id(2), h // group, TMA, False)
    acc, lse = normalise_rows(acc * vd_cur, l_i, m_i, float("inf"))
    tl.store(LSE + b * stride_lb + h64 * stride_lh + offs_m, lse, mask=row_ok)
    tl.store(O + b * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _transpose_v_kernel(V, VT, stride_vb, stride_vs, stride_vh, stride_tb, stride_th, stride_td, seqlen,
                        HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # Grid: (cdiv(seqlen, BLOCK_S), nheads_k, batch). V (B, S, Hk, D) -> VT (B, Hk, D, S), bytes as uint8:
    # a tile read along D and written along S, both coalesced (the transpose goes through shared memory).
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    tile = tl.load(V + b * stride_vb + h * stride_vh + s[:, None] * stride_vs + d[None, :],
                   mask=(s[:, None] < seqlen) & (d[None, :] < HEAD_DIM))
    tl.store(VT + b * stride_tb + h * stride_th + d[:, None] * stride_td + s[None, :], tl.trans(tile),
             mask=(d[:, None] < HEAD_DIM) & (s[None, :] < seqlen))


def transpose_v(v8):
    """v8 (B, S, Hk, D), last dim contiguous -> (B, Hk, D, S) with keys contiguous, rows padded to a multiple
    of 16 keys (TMA's 16-byte stride rule); one pass at copy speed (PyTorch's copy of the permuted view
    reads a byte per key at stride Hk·D)."""
    B, S, Hk, D = v8.shape
    S_pad = -(-S // 16) * 16
    vt = torch.empty((B, Hk, D, S_pad), dtype=v8.dtype, device=v8.device)[..., :S]
    if vt.numel():
        BLOCK_S = 64
        src, dst = v8.view(torch.uint8), vt.view(torch.uint8)
        _transpose_v_kernel[(C.cdiv(S, BLOCK_S), Hk, B)](
            src, dst, src.stride(0), src.stride(1), src.stride(2), dst.stride(0), dst.stride(1), dst.stride(2), S,
            HEAD_DIM=D, BLOCK_S=BLOCK_S, BLOCK_D=max(triton.next_power_of_2(D), 16))
    return vt


# Launch plan per (head-dim class, causal): (BLOCK_M, BLOCK_N, num_warps, num_stages) and how the tiles are
# loaded (0: pointer loads; 1: tensor descriptors made in-kernel over one (sequence, head); 2: descriptors made
# by the caller over the whole tensors), where the inputs allow descriptors (`C.descriptors_ok`). From the H100
# diagnostics of the fifth session (results/2026-11-26-h100-fp8-diagnose-{3,4,5,6}.md, 4k to 16k tokens):
# d128 (64, 128, 4, 3) host descriptors (4k: 706 TFLOP/s, 8k causal: 667, against 674 / 614 for (128, 64,
# 4, 3) with in-kernel descriptors, which beat pointer loads 720 to 656 at 16k); d256 (64, 64, 4, 3) host
# descriptors (16k: 868 against 808 in-kernel and 654 with pointer loads). Warp specialisation gained
# nothing on the 8-warp tiles; d64 is unmeasured (pointer loads, as before).
_PLANS = {(64, False): ((128, 64, 4, 3), 0), (64, True): ((128, 64, 4, 3), 0),
          (128, False): ((64, 128, 4, 3), 2), (128, True): ((64, 128, 4, 3), 2),
          (256, False): ((64, 64, 4, 3), 2), (256, True): ((64, 64, 4, 3), 2)}


def forward(q8, k8, v8, q_descale, k_descale, v_descale, softmax_scale, window_size, softcap, out_dtype,
            _pv_mode=0, _config=None, _fold=True, _tma=None, _ws=True):
    """q8 (B, Sq, H, D), k8/v8 (B, Sk, Hk, D) float8_e4m3fn, last dim contiguous; descales float32
    (B, H, cdiv(Sq, QUANT_BLOCK)) and (B, Hk, cdiv(Sk, QUANT_BLOCK)). Returns out (B, Sq, H, D) in
    out_dtype and lse (B, H, Sq) float32. _pv_mode (diagnostics for benchmarks/bench_fp8.py --diagnose, which
    times variants that leave one stage out): 0 = the FP8 kernel, 1 = P·V in bf16, 2 = no P·V; _config
    overrides (BLOCK_M, BLOCK_N, num_warps, num_stages); _fold False scales the score tile before the softmax
    instead of folding the scales into it (the kernel before the fifth session, for the benchmark); _tma
    0 / 1 / 2 forces the tile loads (pointers, in-kernel descriptors, host descriptors; None: `_PLANS`), where
    `C.descriptors_ok`; _ws False keeps the descriptor paths from warp-specialising."""
    B, Sq, H, D = q8.shape
    Sk, Hk = k8.shape[1], k8.shape[2]
    out = torch.empty((B, Sq, H, D), dtype=out_dtype, device=q8.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q8.device)
    if out.numel() == 0:
        return out.zero_(), lse.fill_(float("inf"))
    left, right = C.window_args(window_size, Sq, Sk)
    qk_scale, cap_scale = C.score_scales(softmax_scale, softcap)
    BLOCK_D = max(triton.next_power_of_2(D), 32)
    plan_cfg, plan_tma = _PLANS[(C.head_dim_class(BLOCK_D), window_size[1] == 0)]
    if is_interpreting():
        bm, bn, meta = 32, 16, {}
    else:
        bm, bn, w, st = _config or plan_cfg
        meta = dict(num_warps=w, num_stages=st)
    grid = (C.cdiv(Sq, bm), H, B)
    # V transposed once to (B, Hk, D, Sk), keys contiguous (see _fp8_inner): one pass over V's bytes
    vt = transpose_v(v8)
    tma = int(plan_tma if _tma is None else _tma) if C.descriptors_ok(q8, k8, vt) else 0
    q_arg, k_arg, vt_arg = q8, k8, vt
    if tma == 2:
        from triton.tools.tensor_descriptor import TensorDescriptor
        q_arg, k_arg = C.host_descriptor(q8, bm, BLOCK_D, False), C.host_descriptor(k8, bn, BLOCK_D, False)
        vt_arg = TensorDescriptor.from_tensor(vt, [1, 1, BLOCK_D, bn])   # (B, Hk, D, S): BLOCK_D rows of BLOCK_N keys
    elif tma == 1:
        from .v3 import _set_allocator
        _set_allocator()
    # Triton 3.6's warp-specialisation pass fails on head-dim-64 tiles (see v3.forward): pipelined only there
    # and on 4-warp tiles (one consumer warpgroup: the pass fails to partition them, Triton 3.9 locally)
    ws = tma > 0 and _ws and not is_interpreting() and BLOCK_D > 64 and meta.get("num_warps", 4) >= 8
    _fp8_fwd_kernel[grid](q_arg, k_arg, vt_arg, q_descale, k_descale, v_descale, out, lse,
                          q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
                          vt.stride(0), vt.stride(1), vt.stride(2),
                          q_descale.stride(0), q_descale.stride(1), k_descale.stride(0), k_descale.stride(1),
                          v_descale.stride(0), v_descale.stride(1),
                          out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
                          Sq, Sk, left, right, qk_scale, cap_scale, H // Hk,
                          HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=bm, BLOCK_N=bn, QB=QUANT_BLOCK, SOFTCAP=softcap > 0,
                          RN_P=is_interpreting(), PV_MODE=_pv_mode, FOLD=_fold, TMA=tma, WS=ws, **meta)
    return out, lse
