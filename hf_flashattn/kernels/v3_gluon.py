"""v3's forward in Gluon (`triton.experimental.gluon`) for Hopper: FA3's intra-warpgroup overlap, written out.

Why Gluon: in Triton's high-level language the compiler waits on each wgmma right after issuing it (only a dot
whose result feeds the next iteration's accumulator stays in flight), so the softmax of one key block never
runs under a matmul of the same program (sixth session, benchmarks/NOTES.md). Here the waits are explicit.

The kernel (`_fwd_kernel_ws`, warp-specialised, persistent): one program an SM (two with one consumer, NC = 1: its
registers capped at half the file), each looping over tiles of 64·NC query rows of one head of one sequence (NC = 1, 2
or 3), in the static order of `_tile` (under a mask, pairs of row tiles j and n - 1 - j, even work). A producer
partition (4 warps, 24 registers) copies Q once and K and V block by block through host-made TMA descriptors over the
whole (B, S, H, D) tensors into a ring of STAGES shared-memory slots, each with a `ready` mbarrier (the copy's byte
count) and an `empty` one (one arrive per consumer). NC consumer partitions (4 warps, one warpgroup, 64 rows each,
`setmaxnreg` up to 240, 232 or 160 registers) run, for key block j:

    S_j   = Q · K_jᵀ                      (wgmma, issued, not waited)
    O    += P_{j-1} · V_{j-1}             (wgmma on the registers of P, issued, not waited)
    wait for S_j only (wgmma groups retire in order: one left in flight); release K_j's slot
    softmax of S_j -> P_j, the row max and sum, alpha_j   <- runs while the tensor cores do P_{j-1} · V_{j-1}
    wait for O; release V_{j-1}'s slot; O *= alpha_j

O after block j is alpha_j · (O + P_{j-1} V_{j-1}), the same online softmax as v2 (design.md) with the product
for a block one step late. The key blocks come as v2's three ranges (`tile_range`): a masked left-window edge,
the band every row sees (no mask), the masked diagonal/tail; the first block is peeled (masked when it is an edge)
and the last block's product follows the loop. A masked score is compared with its row's bounds, worked out once a
tile (`_row_bounds`). The scale folds into the exponent. Each consumer
writes its rows of O through a shared buffer of its own and one TMA store left in flight (d256: through its slice
of Q's buffer, waited), and its lse by a masked store. Across tiles the ring's count runs on and the consumers
hand Q's buffer back (`q_empty`) after a tile's last q·kᵀ, so the next tile's Q and first key blocks load under
this tile's last product and store (tenth session: 1.06-1.12x one program a tile at d128 1k-4k unmasked); with two Q
slots (`Q_SLOTS`) the next tile's Q loads as soon as this tile's last key block is asked for.

Measured on the H100 (benchmarks/NOTES.md, seventh session; results/2026-11-26-h100-*gluon*): 0.93-1.06x
cuDNN's forward from 4k keys where `plan()` picks it, against 0.80-0.90x for v3.py's kernel at d128/d256.
A first version in one partition, without specialisation (commit c2aee03), was slower than v3.py's kernel
everywhere and is gone. Ping-pong of the consumers (`PINGPONG`) measured no gain at first; measured again in rounds in
one process (eighteenth session) it is 3-4% faster at d64 (on there), 1.6-3.5% slower at d128 and d256 (off).
ptxas places each block's wait for P·V before the exponentials (after the row max) in the d64 and d128 plans,
whatever the PTX's order, so the softmax overlaps the other consumers' products, not its own (benchmarks/NOTES.md).

Scope (`supports`): dense (B, S, H, D) or packed (total, H, D) with cu_seqlens, fp16/bf16, head dim 64, 128 or 256
exactly, no softcap, a positive scale, TMA-aligned strides. Packed sequences load through descriptors over
(1, total, H, D) from each sequence's first row (`_bounds`); rows of the next sequence that a tile reaches enter only
masked scores (P = 0), and O is written by masked stores. Everything else runs the Triton-language v3 kernel
(v3.py). Gluon kernels do not run on Triton's interpreter; the CPU tests compile this kernel for sm_90a instead
(tests/test_v3_gluon.py).
"""
from __future__ import annotations

import functools

import torch

try:   # Gluon ships with Triton >= 3.4 (the GPU image has 3.6); absent -> v3.py's kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - older Triton
    HAVE_GLUON = False

from .._runtime import env_get
from . import _common as C

if HAVE_GLUON:
    # TMA copies: `async_load`/`async_store` from Triton 3.7 on (the old names raise there), the old names in 3.6
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

    @gluon.jit
    def _key_range(m0, BLOCK_M: gl.constexpr, diag, left, right, Sk, BLOCK_N: gl.constexpr):
        """(lo, full_lo, full_hi, hi): the key blocks of the row tile [m0, m0 + BLOCK_M), as _common.tile_range
        (a Triton-language function, which Gluon code cannot call): [lo, full_lo) and [full_hi, hi) masked,
        [full_lo, full_hi) seen by every row."""
        lo = gl.maximum(m0 + diag - left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        hi = gl.minimum(m0 + BLOCK_M + diag + right, Sk)
        hi = gl.maximum(hi, lo)
        full_lo = gl.maximum(m0 + BLOCK_M - 1 + diag - left, 0)
        full_lo = gl.minimum(gl.cdiv(full_lo, BLOCK_N) * BLOCK_N, hi)
        full_hi = gl.minimum(m0 + diag + right + 1, Sk)
        full_hi = gl.maximum((full_hi // BLOCK_N) * BLOCK_N, full_lo)
        return lo, full_lo, full_hi, hi

    @gluon.jit
    def _bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN: gl.constexpr):
        """(bq, q0, k0, Sq, Sk) of sequence b: the descriptors' batch coordinate, the first query and key rows and the
        lengths; packed (IS_VARLEN: descriptors over (1, total, H, D)) from cu_seqlens, else (b, 0, 0, seqlen_q,
        seqlen_k)."""
        if IS_VARLEN:
            q0 = gl.load(CU_Q + b)
            k0 = gl.load(CU_K + b)
            Sq = gl.load(CU_Q + b + 1) - q0
            Sk = gl.load(CU_K + b + 1) - k0
            bq = b * 0
        else:
            q0 = b * 0
            k0 = b * 0
            Sq = seqlen_q
            Sk = seqlen_k
            bq = b
        return bq, q0, k0, Sq, Sk

    @gluon.jit
    def _visible(offs_m, cols, diag, left, right, Sk):
        """Bool (rows x cols) tile: key column cols[j] is visible from query row offs_m[i] (_common.visible's rule)."""
        r = gl.expand_dims(offs_m, 1) + diag
        c = gl.expand_dims(cols, 0)
        return (c >= r - left) & (c <= r + right) & (c < Sk)

    @gluon.jit
    def _row_bounds(offs_m, diag, left, right, Sk):
        """(row_lo, row_hi) of query rows offs_m: row r sees the key columns c with row_lo[r] <= c <= row_hi[r]
        (_visible's rule with the `c < Sk` bound folded into row_hi), worked out once a tile, so that a masked score
        costs one or two compares (`_softmax`) instead of three."""
        r = offs_m + diag
        return r - left, gl.minimum(r + right, Sk - 1)

    @gluon.jit
    def _softmax(s, m_i, l_i, qk_scale, cols, row_lo, row_hi, MASKED: gl.constexpr, LEFT: gl.constexpr):
        """Online-softmax step of raw scores s = q·kᵀ (float32), the scale c = qk_scale folded into the
        exponent: (p, alpha, m_new, l_new); a row that has seen nothing keeps m = -inf, shifted by 0. MASKED: column
        cols[j] counts for row i when cols[j] <= row_hi[i] and, with a left window edge (LEFT), cols[j] >= row_lo[i]
        (`_row_bounds`; without one row_lo is below every column)."""
        if MASKED:
            c = gl.expand_dims(cols, 0)
            keep = c <= gl.expand_dims(row_hi, 1)
            if LEFT:
                keep = keep & (c >= gl.expand_dims(row_lo, 1))
            s = gl.where(keep, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_shift, 1))
        alpha = gl.exp2(m_i - m_shift)
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit
    def _n_items(pid, nprog, per, n_mt, n_units, tail, TAIL: gl.constexpr):
        """How many row tiles program pid takes (`_tile`): `per` for each of its pair units, one for each of its tail
        tiles (TAIL)."""
        if TAIL:
            n_per = (n_mt + per - 1) // per
            n_main = (n_units // n_per) * (n_per - tail)
            rot = (pid - n_main % nprog + nprog) % nprog
            return per * gl.cdiv(n_main - pid, nprog) + gl.cdiv(2 * (n_units // n_per) * tail - rot, nprog)
        else:
            return per * gl.cdiv(n_units - pid, nprog)

    @gluon.jit
    def _tile(i, pid, nprog, per, n_mt, n_heads, group, CU_Q, CU_K, seqlen_q, seqlen_k, left, right, n_units, tail,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, IS_VARLEN: gl.constexpr, TAIL: gl.constexpr = False):
        """The i-th tile of program pid: (valid, b, h, kvh, m0, bq, q0, k0, Sq, Sk, diag, lo, full_lo, full_hi, hi) with
        `_bounds`' coordinates and `_key_range`'s key blocks. A program takes the units pid, pid + nprog, ... of `per`
        row tiles each, units head by head (programs running together share a head's K/V in L2). per = 1: a unit is
        a row tile, the last rows first. per = 2 (under a mask): a unit is the pair of row tiles j and n_mt - 1 - j,
        the last rows first: under a causal mask the pair costs n_mt + 1 key blocks whatever j, so the units are even
        work for a static schedule (the middle tile of an odd n_mt is a unit alone: `valid` is false for its second
        half). Unmasked tiles cost the same and stay single: finer units round the work up less.
        tail (per = 2): the `tail` most even pairs of every (batch, head) (j = n_per - 1, n_per - 2, ...: two tiles of
        about half a pair each) come after all the others, as single tiles, the programs with fewer pair units taking
        the first of them: the last round of pairs, when it is short (d64 16k causal: 1,376 pairs on 132 SMs, 10.4
        rounds run as 11), ends in half-pair steps instead (`tail_pairs`). The tail's index math is compiled in only
        with TAIL (its loop invariants cost registers: the d256 plan spilled 64 bytes with them on Triton 3.9); without
        it, n_units and tail are not read."""
        n_per = (n_mt + per - 1) // per
        if TAIL:
            n_bh = n_units // n_per
            n_main = n_bh * (n_per - tail)
            c_main = gl.cdiv(n_main - pid, nprog)
            if i < per * c_main:
                unit = pid + (i // per) * nprog
                half = i % per
                j = unit % (n_per - tail)
                bh = unit // (n_per - tail)
            else:
                t = (pid - n_main % nprog + nprog) % nprog + (i - per * c_main) * nprog
                half = t % 2
                bh = (t // 2) % n_bh
                j = n_per - 1 - (t // 2) // n_bh
        else:
            unit = pid + (i // per) * nprog
            half = i % per
            j = unit % n_per
            bh = unit // n_per
        h = bh % n_heads
        b = bh // n_heads
        pid_m = n_mt - 1 - j - half * (n_mt - 1 - 2 * j)
        valid = (half == 0) | (2 * j != n_mt - 1)
        m0 = pid_m * BLOCK_M
        bq, q0, k0, Sq, Sk = _bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
        diag = Sk - Sq
        lo, full_lo, full_hi, hi = _key_range(m0, BLOCK_M, diag, left, right, Sk, BLOCK_N)
        return valid & (m0 < Sq), b, h, h // group, m0, bq, q0, k0, Sq, Sk, diag, lo, full_lo, full_hi, hi

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty,
                  CU_Q, CU_K, seqlen_q, seqlen_k, left, right, group, n_mt, n_heads, n_units, per, tail, pid, nprog,
                  BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, WG_ROWS: gl.constexpr,
                  NC: gl.constexpr, IS_VARLEN: gl.constexpr, Q_SLOTS: gl.constexpr, TAIL: gl.constexpr):
        """For each tile of this program that sees a key: Q (one 64-row slice per consumer) into slot tq % Q_SLOTS of
        Q's buffer once the consumers have released the tile's before it in that slot (`q_empty`), then K and V block
        by block into a ring of STAGES slots: a slot is refilled once all NC consumers have released it (their
        arrives on its `empty` barrier). The ring's count (`base`) runs on across tiles, so a tile's first blocks load
        while the consumers finish the one before; with two Q slots its Q loads as soon as the previous tile's last
        key block is asked for, not after that tile's last q·kᵀ."""
        base = 0
        tq = 0
        for i in range(_n_items(pid, nprog, per, n_mt, n_units, tail, TAIL)):
            ok, _, h, kvh, m0, bq, q0, k0, _, _, _, lo, _, _, hi = _tile(i, pid, nprog, per, n_mt, n_heads, group, CU_Q,
                                                                         CU_K, seqlen_q, seqlen_k, left, right, n_units,
                                                                         tail, NC * WG_ROWS, BLOCK_N, IS_VARLEN, TAIL)
            if ok & (lo < hi):
                # a slot's first tile waits for nothing (parity 1 of a fresh barrier counts as done)
                slot = tq % Q_SLOTS
                mbarrier.wait(q_empty.index(slot), ((tq // Q_SLOTS) & 1) ^ 1)
                mbarrier.expect(q_bar.index(slot), NC * WG_ROWS * HEAD_DIM * 2)
                for w in gl.static_range(NC):
                    _tma_load(q_desc, [bq, q0 + m0 + w * WG_ROWS, h, 0], q_bar.index(slot), q_smem.index(slot * NC + w))
                n = gl.cdiv(hi - lo, BLOCK_N)
                for it in range(n):
                    g = base + it
                    s = g % STAGES
                    ph = ((g // STAGES) & 1) ^ 1
                    start = lo + it * BLOCK_N
                    mbarrier.wait(k_empty.index(s), ph)
                    mbarrier.expect(k_ready.index(s), BLOCK_N * HEAD_DIM * 2)
                    _tma_load(k_desc, [bq, k0 + start, kvh, 0], k_ready.index(s), k_smem.index(s))
                    mbarrier.wait(v_empty.index(s), ph)
                    mbarrier.expect(v_ready.index(s), BLOCK_N * HEAD_DIM * 2)
                    _tma_load(v_desc, [bq, k0 + start, kvh, 0], v_ready.index(s), v_smem.index(s))
                base += n
                tq += 1

    @gluon.jit
    def _turn_wait(turn_bars, W: gl.constexpr, t, PINGPONG: gl.constexpr):
        """Ping-pong (FA3's warp-scheduler barrier): consumer W issues its wgmmas of turn t only after consumer
        W - 1 has issued its own of turn t (consumer 0: after the last consumer's turn t - 1), so the tensor cores
        take the warpgroups' products in turn and each one's softmax runs under the others' products."""
        if PINGPONG:
            if W == 0:
                mbarrier.wait(turn_bars.index(0), (t - 1) & 1, pred=t > 0)
            else:
                mbarrier.wait(turn_bars.index(W), t & 1)

    @gluon.jit
    def _turn_pass(turn_bars, W: gl.constexpr, NC: gl.constexpr, PINGPONG: gl.constexpr):
        if PINGPONG:
            mbarrier.arrive(turn_bars.index((W + 1) % NC), count=1)

    @gluon.jit
    def _ws_block(start_n, o, m_i, l_i, p_prev, qw, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, turn_bars,
                  lo, base, turn0, offs_n, row_lo, row_hi, qk_scale,
                  ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                  s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr, MASKED: gl.constexpr,
                  W: gl.constexpr, NC: gl.constexpr, PINGPONG: gl.constexpr, LEFT: gl.constexpr):
        """Key block `start_n` (not the first) for consumer W: its q·kᵀ and the previous block's P·V in flight
        together, this block's softmax under the latter (module docstring); ring slots are released to the
        producer by mbarrier arrives. `base`: the ring's count at this tile's first block; `turn0`: the ping-pong
        turn of that block."""
        j = (start_n - lo) // BLOCK_N
        it = base + j
        s = it % STAGES
        mbarrier.wait(k_ready.index(s), (it // STAGES) & 1)
        kt = k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        prev = it - 1
        sp = prev % STAGES
        mbarrier.wait(v_ready.index(sp), (prev // STAGES) & 1)
        _turn_wait(turn_bars, W, turn0 + j, PINGPONG)
        s_tok = warpgroup_mma(qw, kt, gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False,
                              is_async=True)
        o_tok = warpgroup_mma(p_prev, v_smem.index(sp).reshape([BLOCK_N, HEAD_DIM]), o, is_async=True)
        _turn_pass(turn_bars, W, NC, PINGPONG)
        qk = warpgroup_mma_wait(1, deps=[s_tok])
        mbarrier.arrive(k_empty.index(s), count=1)
        p, alpha, m_i, l_i = _softmax(qk, m_i, l_i, qk_scale, start_n + offs_n, row_lo, row_hi, MASKED, LEFT)
        o = warpgroup_mma_wait(0, deps=[o_tok])
        mbarrier.arrive(v_empty.index(sp), count=1)
        o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        p_prev = gl.convert_layout(p.to(qw.dtype), p_layout)
        return o, m_i, l_i, p_prev

    @gluon.jit
    def _consume_tile(W: gl.constexpr, o_desc, o_smem, O, stride_om, stride_oh, LSE, stride_lb, stride_lh, q_smem,
                      k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn_bars, base, tq, b, bq,
                      q0, h, m0, lo, full_lo, full_hi, hi, Sq, Sk, diag, left, right, qk_scale, ROWS: gl.constexpr,
                      BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, NC: gl.constexpr,
                      PINGPONG: gl.constexpr, IS_VARLEN: gl.constexpr, O_BUF: gl.constexpr, LEFT: gl.constexpr,
                      Q_SLOTS: gl.constexpr):
        """Consumer warpgroup W on one tile that sees a key: rows m0 + W·ROWS ...; the first key block peeled (masked
        only when it is an edge of v2's ranges), then v2's three key ranges, then the last block's product, then O and
        lse. The tile's Q is in slot tq % Q_SLOTS of Q's buffer; the slot goes back to the producer as soon as the
        last q·kᵀ is done, unless O leaves through it (dense without O_BUF: after the store)."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        r0 = m0 + W * ROWS
        offs_m = r0 + gl.arange(0, ROWS, layout=row_s)
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        row_lo, row_hi = _row_bounds(offs_m, diag, left, right, Sk)
        slot = tq % Q_SLOTS
        qi = slot * NC + W
        qw = q_smem.index(qi).reshape([ROWS, HEAD_DIM])
        q_free = q_empty.index(slot)
        dtype: gl.constexpr = qw.dtype
        turn0 = base + tq   # ping-pong turns: n + 1 a tile (n blocks' q·kᵀ, the last P·V)

        mbarrier.wait(q_bar.index(slot), (tq // Q_SLOTS) & 1)
        s0 = base % STAGES
        mbarrier.wait(k_ready.index(s0), (base // STAGES) & 1)
        _turn_wait(turn_bars, W, turn0, PINGPONG)
        qk = warpgroup_mma(qw, k_smem.index(s0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                           gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        _turn_pass(turn_bars, W, NC, PINGPONG)
        qk = warpgroup_mma_wait(0, deps=[qk])
        mbarrier.arrive(k_empty.index(s0), count=1)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([ROWS], gl.float32, row_s)
        if (lo < full_lo) | (lo >= full_hi):   # an edge (the left window's, the diagonal, the keys' end)
            p, _, m_i, l_i = _softmax(qk, m_i, l_i, qk_scale, lo + offs_n, row_lo, row_hi, True, LEFT)
        else:                                  # in the band every row sees whole
            p, _, m_i, l_i = _softmax(qk, m_i, l_i, qk_scale, lo + offs_n, row_lo, row_hi, False, LEFT)
        p_prev = gl.convert_layout(p.to(dtype), p_layout)
        o = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        nxt = lo + BLOCK_N
        for start_n in range(nxt, gl.maximum(full_lo, nxt), BLOCK_N):
            o, m_i, l_i, p_prev = _ws_block(start_n, o, m_i, l_i, p_prev, qw, k_smem, v_smem, k_ready, v_ready,
                                            k_empty, v_empty, turn_bars, lo, base, turn0, offs_n, row_lo, row_hi,
                                            qk_scale, ROWS, BLOCK_N, HEAD_DIM, STAGES, s_layout, o_layout, p_layout,
                                            True, W, NC, PINGPONG, LEFT)
        for start_n in range(gl.maximum(full_lo, nxt), gl.maximum(full_hi, nxt), BLOCK_N):
            o, m_i, l_i, p_prev = _ws_block(start_n, o, m_i, l_i, p_prev, qw, k_smem, v_smem, k_ready, v_ready,
                                            k_empty, v_empty, turn_bars, lo, base, turn0, offs_n, row_lo, row_hi,
                                            qk_scale, ROWS, BLOCK_N, HEAD_DIM, STAGES, s_layout, o_layout, p_layout,
                                            False, W, NC, PINGPONG, LEFT)
        for start_n in range(gl.maximum(full_hi, nxt), hi, BLOCK_N):
            o, m_i, l_i, p_prev = _ws_block(start_n, o, m_i, l_i, p_prev, qw, k_smem, v_smem, k_ready, v_ready,
                                            k_empty, v_empty, turn_bars, lo, base, turn0, offs_n, row_lo, row_hi,
                                            qk_scale, ROWS, BLOCK_N, HEAD_DIM, STAGES, s_layout, o_layout, p_layout,
                                            True, W, NC, PINGPONG, LEFT)
        if O_BUF or IS_VARLEN:   # every q·kᵀ of the tile has been waited for: Q's slot is free
            mbarrier.arrive(q_free, count=1)
        n_last = (hi - 1 - lo) // BLOCK_N
        last = base + n_last
        sl = last % STAGES
        mbarrier.wait(v_ready.index(sl), (last // STAGES) & 1)
        _turn_wait(turn_bars, W, turn0 + n_last + 1, PINGPONG)
        o = warpgroup_mma(p_prev, v_smem.index(sl).reshape([BLOCK_N, HEAD_DIM]), o, is_async=True)
        _turn_pass(turn_bars, W, NC, PINGPONG)
        o = warpgroup_mma_wait(0, deps=[o])
        mbarrier.arrive(v_empty.index(sl), count=1)

        l_o = gl.convert_layout(l_i, row_o)
        m_o = gl.convert_layout(m_i, row_o)
        seen = l_o > 0.0
        l_safe = gl.where(seen, l_o, 1.0)
        o = o / gl.expand_dims(l_safe, 1)
        lse = gl.where(seen, (m_o + gl.log2(l_safe)) * 0.6931471805599453, float("inf"))
        offs_lse = r0 + gl.arange(0, ROWS, layout=row_o)
        gl.store(LSE + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + q0 + offs_lse, lse,
                 mask=offs_lse < Sq)
        _store_rows(o.to(dtype), W, o_desc, o_smem, q_smem, qi, q_free, O, stride_om, stride_oh, bq, q0, h, r0, Sq,
                    o_layout, ROWS, HEAD_DIM, IS_VARLEN, O_BUF)

    @gluon.jit
    def _store_rows(x, W: gl.constexpr, desc, own_smem, q_smem, qi, q_empty, PTR, stride_m, stride_h, bq, q0, h, r0,
                    Sq, layout: gl.constexpr, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, IS_VARLEN: gl.constexpr,
                    OWN_BUF: gl.constexpr):
        """Consumer W's rows r0 ... of a tile's output x (in the output dtype, `layout`): packed, by a masked store
        (rows past the sequence are the next one's); dense, by a TMA store through W's slice of a shared buffer of its
        own (OWN_BUF: the previous tile's store from it waited for first, this one left in flight) or of Q's buffer,
        slice qi (the store waited for, then Q's buffer handed back to the producer on `q_empty`). The forward's O and
        the dQ pass's dQ (v3_gluon_bwd.py)."""
        if IS_VARLEN:
            rows = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
            cols = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout)), 0)
            ptrs = PTR + gl.expand_dims((q0 + rows).to(gl.int64), 1) * stride_m + h.to(gl.int64) * stride_h + cols
            gl.store(ptrs, x, mask=gl.expand_dims(rows, 1) < Sq)
        elif OWN_BUF:
            w = own_smem.index(W)
            tma.store_wait(0)
            w.reshape([ROWS, HEAD_DIM]).store(x)
            fence_async_shared()
            _tma_store(desc, [bq, q0 + r0, h, 0], w)
        else:
            q_smem.index(qi).reshape([ROWS, HEAD_DIM]).store(x)
            fence_async_shared()
            _tma_store(desc, [bq, q0 + r0, h, 0], q_smem.index(qi))
            tma.store_wait(0)
            mbarrier.arrive(q_empty, count=1)

    @gluon.jit
    def _store_zero_rows(PTR, stride_b, stride_m, stride_h, b, q0, h, r0, Sq, ROWS: gl.constexpr,
                         HEAD_DIM: gl.constexpr):
        """Rows r0 ... r0 + ROWS (of sequence b, head h) set to 0 by a masked store: past Sq are the next sequence's
        rows (packed) or nothing (dense). The forward's O and the dQ pass's dQ of tiles that see no key."""
        z_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        cols = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, z_layout)), 0)
        rows = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, z_layout))
        gl.store(PTR + b.to(gl.int64) * stride_b + gl.expand_dims((q0 + rows).to(gl.int64), 1) * stride_m
                 + h.to(gl.int64) * stride_h + cols, gl.zeros([ROWS, HEAD_DIM], PTR.dtype.element_ty, z_layout),
                 mask=gl.expand_dims(rows, 1) < Sq)

    @gluon.jit
    def _zero_rows(W: gl.constexpr, O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, b, q0, h, m0, Sq,
                   ROWS: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Rows m0 + W·ROWS ... of a tile that sees no key: O = 0 and lse = +inf, by masked stores (past the sequence
        are the next one's rows, packed, or nothing, dense)."""
        _store_zero_rows(O, stride_ob, stride_om, stride_oh, b, q0, h, m0 + W * ROWS, Sq, ROWS, HEAD_DIM)
        r_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        offs = m0 + W * ROWS + gl.arange(0, ROWS, layout=r_layout)
        gl.store(LSE + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + q0 + offs,
                 gl.full([ROWS], float("inf"), gl.float32, r_layout), mask=offs < Sq)

    @gluon.jit
    def _consumer(W: gl.constexpr, o_desc, o_smem, O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh,
                  q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn_bars, CU_Q, CU_K,
                  seqlen_q, seqlen_k, left, right, group, n_mt, n_heads, n_units, per, tail, pid, nprog, qk_scale,
                  ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                  NC: gl.constexpr, PINGPONG: gl.constexpr, IS_VARLEN: gl.constexpr, O_BUF: gl.constexpr,
                  LEFT: gl.constexpr, Q_SLOTS: gl.constexpr, TAIL: gl.constexpr):
        """Consumer warpgroup W over this program's tiles (the producer's order, with the same ring count)."""
        base = 0
        tq = 0
        for i in range(_n_items(pid, nprog, per, n_mt, n_units, tail, TAIL)):
            ok, b, h, _, m0, bq, q0, _, Sq, Sk, diag, lo, full_lo, full_hi, hi = _tile(i, pid, nprog, per, n_mt,
                                                                                       n_heads, group, CU_Q, CU_K,
                                                                                       seqlen_q, seqlen_k, left, right,
                                                                                       n_units, tail, NC * ROWS,
                                                                                       BLOCK_N, IS_VARLEN, TAIL)
            if ok:
                if lo < hi:
                    _consume_tile(W, o_desc, o_smem, O, stride_om, stride_oh, LSE, stride_lb, stride_lh, q_smem,
                                  k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn_bars, base,
                                  tq, b, bq, q0, h, m0, lo, full_lo, full_hi, hi, Sq, Sk, diag, left, right, qk_scale,
                                  ROWS, BLOCK_N, HEAD_DIM, STAGES, NC, PINGPONG, IS_VARLEN, O_BUF, LEFT, Q_SLOTS)
                    base += gl.cdiv(hi - lo, BLOCK_N)
                    tq += 1
                else:
                    _zero_rows(W, O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, b, q0, h, m0, Sq,
                               ROWS, HEAD_DIM)
        if O_BUF:
            tma.store_wait(0)   # the last tile's store reads the buffer: shared memory must outlive it

    @gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window_left", "window_right", "group", "n_mt", "n_units",
                                  "per", "tail"])
    def _fwd_kernel_ws(q_desc, k_desc, v_desc, o_desc, O, LSE, CU_Q, CU_K, stride_ob, stride_om, stride_oh, stride_lb,
                       stride_lh, seqlen_q, seqlen_k, window_left, window_right, qk_scale, group, n_mt, n_heads,
                       n_units, per, tail, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                       CONSUMER_REGS: gl.constexpr, NC: gl.constexpr, PINGPONG: gl.constexpr,
                       IS_VARLEN: gl.constexpr = False, O_BUF: gl.constexpr = False, LEFT: gl.constexpr = True,
                       Q_SLOTS: gl.constexpr = 1, TAIL: gl.constexpr = False):
        # Grid: (programs,), each taking units pid, pid + programs, ... of the n_units = ceil(n_mt / per) · H · B
        # (`_tile`: a unit is `per` row tiles): persistent with one program an SM, or one program a unit. Warps: this
        # region's (num_warps=4: the producer partition) + NC (2 or 3) 4-warp consumer partitions, each with 64 rows
        # of the 64·NC-row tile.
        # IS_VARLEN: packed sequences, descriptors over (1, total, H, D), bounds from cu_seqlens, O by masked stores
        # (O and its strides: also the rows of tiles that see no key). O_BUF: dense O leaves through a shared buffer
        # of its own, so that the next tile's Q loads under this one's last product and store. LEFT: the window has a
        # left edge (else masked blocks compare each score against one bound, `_softmax`; on for the 3-consumer plans,
        # where ptxas 3.6 spills 432 bytes at 160 registers without it). Q_SLOTS (1 or 2): tiles
        # whose Q is in Q's buffer at once (2: the next tile's Q loads while this one runs, `_producer`).
        ROWS: gl.constexpr = 64
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [Q_SLOTS * NC, 1, ROWS, 1, HEAD_DIM], q_desc.layout)
        if O_BUF:
            o_smem = gl.allocate_shared_memory(dtype, [NC, 1, ROWS, 1, HEAD_DIM], o_desc.layout)
        else:
            o_smem = q_smem
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, 1, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, 1, HEAD_DIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [Q_SLOTS, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [Q_SLOTS, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn_bars = gl.allocate_shared_memory(gl.int64, [NC, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(Q_SLOTS):
            mbarrier.init(q_bar.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=NC)   # one arrive per consumer warpgroup
        for i in gl.static_range(NC):
            mbarrier.init(turn_bars.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=NC)
            mbarrier.init(v_empty.index(i), count=NC)
        left = window_left
        right = window_right
        # (the partition lists are written out: a JIT function cannot be held in a variable)
        if NC == 3:
            gl.warp_specialize([
                (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty,
                             v_empty, CU_Q, CU_K, seqlen_q, seqlen_k, left, right, group, n_mt, n_heads, n_units, per,
                             tail, pid, nprog, BLOCK_N, HEAD_DIM, STAGES, ROWS, NC, IS_VARLEN, Q_SLOTS, TAIL)),
                (_consumer, (0, o_desc, o_smem, O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, q_smem,
                             k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn_bars, CU_Q, CU_K,
                             seqlen_q, seqlen_k, left, right, group, n_mt, n_heads, n_units, per, tail, pid, nprog,
                             qk_scale, ROWS, BLOCK_N, HEAD_DIM, STAGES, NC, PINGPONG, IS_VARLEN, O_BUF, LEFT, Q_SLOTS,
                             TAIL)),
                (_consumer, (1, o_desc, o_smem, O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, q_smem,
                             k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn_bars, CU_Q, CU_K,
                             seqlen_q, seqlen_k, left, right, group, n_mt, n_heads, n_units, per, tail, pid, nprog,
                             qk_scale, ROWS, BLOCK_N, HEAD_DIM, STAGES, NC, PINGPONG, IS_VARLEN, O_BUF, LEFT, Q_SLOTS,
                             TAIL)),
                (_consumer, (2, o_desc, o_smem, O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, q_smem,
                             k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn_bars, CU_Q, CU_K,
                             seqlen_q, seqlen_k, left, right, group, n_mt, n_heads, n_units, per, tail, pid, nprog,
                             qk_scale, ROWS, BLOCK_N, HEAD_DIM, STAGES, NC, PINGPONG, IS_VARLEN, O_BUF, LEFT, Q_SLOTS,
                             TAIL)),
            ], [4, 4, 4], [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS])
        elif NC == 1:
            gl.warp_specialize([
                (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty,
                             v_empty, CU_Q, CU_K, seqlen_q, seqlen_k, left, right, group, n_mt, n_heads, n_units, per,
                             tail, pid, nprog, BLOCK_N, HEAD_DIM, STAGES, ROWS, NC, IS_VARLEN, Q_SLOTS, TAIL)),
                (_consumer, (0, o_desc, o_smem, O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, q_smem,
                             k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn_bars, CU_Q, CU_K,
                             seqlen_q, seqlen_k, left, right, group, n_mt, n_heads, n_units, per, tail, pid, nprog,
                             qk_scale, ROWS, BLOCK_N, HEAD_DIM, STAGES, NC, PINGPONG, IS_VARLEN, O_BUF, LEFT, Q_SLOTS,
                             TAIL)),
            ], [4], [CONSUMER_REGS])
        else:
            gl.warp_specialize([
                (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty,
                             v_empty, CU_Q, CU_K, seqlen_q, seqlen_k, left, right, group, n_mt, n_heads, n_units, per,
                             tail, pid, nprog, BLOCK_N, HEAD_DIM, STAGES, ROWS, NC, IS_VARLEN, Q_SLOTS, TAIL)),
                (_consumer, (0, o_desc, o_smem, O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, q_smem,
                             k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn_bars, CU_Q, CU_K,
                             seqlen_q, seqlen_k, left, right, group, n_mt, n_heads, n_units, per, tail, pid, nprog,
                             qk_scale, ROWS, BLOCK_N, HEAD_DIM, STAGES, NC, PINGPONG, IS_VARLEN, O_BUF, LEFT, Q_SLOTS,
                             TAIL)),
                (_consumer, (1, o_desc, o_smem, O, stride_ob, stride_om, stride_oh, LSE, stride_lb, stride_lh, q_smem,
                             k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn_bars, CU_Q, CU_K,
                             seqlen_q, seqlen_k, left, right, group, n_mt, n_heads, n_units, per, tail, pid, nprog,
                             qk_scale, ROWS, BLOCK_N, HEAD_DIM, STAGES, NC, PINGPONG, IS_VARLEN, O_BUF, LEFT, Q_SLOTS,
                             TAIL)),
            ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


# Launch plans: (BLOCK_M, BLOCK_N, num_warps, STAGES, consumer registers[, ping-pong[, Q slots[, programs an SM]]]):
# BLOCK_M = 64 rows x NC consumer warpgroups, num_warps the producer partition's (the region outside
# `gl.warp_specialize`); programs an SM 2 with one consumer, else 1, unless given (with more than one, the registers
# are capped at the file's share of each: consumer registers x 128 x NC + 24 x 32 x num_warps within it; two
# two-consumer d64 programs an SM at 112 registers measured 0.74-0.82x cuDNN at 1k-4k, against 0.93-1.03 for v3.py's
# kernel, results/2026-11-27-h100-plan-ab-d64-two-per-sm.md: no plan uses it).
# From benchmarks/sweep_gluon.py on the H100 (results/2026-11-26-h100-sweep-gluon*.md), against v3.py's kernel:
# d128 faster from 4k keys (1.01-1.04x cuDNN at 16k) and at 1k without a mask; d256 faster everywhere (0.93-1.18x
# cuDNN); d64 only without a mask from 4k keys with three consumers (192 rows). Fourteenth session
# (results/2026-11-27-h100-sweep-gluon-{mask-qslots,one-consumer}.md): d128 with two Q slots (0.97-1.04x cuDNN at
# 1k-16k, 1.00-1.05 under a mask from 4k), and under a mask below 2048 keys one consumer, two programs an SM
# (`_PLAN_128_SHORT_MASKED`: 1k causal 386 TFLOP/s, 0.90x cuDNN, against 346-356 with two consumers and 348 for
# v3.py's kernel; 0.90x against 1.04x at 4k causal).
PINGPONG = False   # the consumers' products taken in turn (`_turn_wait`); a plan's 6th element overrides
Q_SLOTS = 1        # tiles whose Q is in shared memory at once (`_producer`); a plan's 7th element overrides
# Persistent: one program an SM looping over units of row tiles (`_tile`), so a tile's Q and first key blocks load
# under the previous tile's last product and store (results/2026-11-26-h100-probe-persistent*.md: 1.00-1.08x one
# program a unit, d256 16k unmasked 0.96-0.99x). False: one program a unit. Dense O leaves through a buffer of its own
# up to head dim O_BUF_MAX_D (where shared memory holds one), else through Q's (the next Q then waits for the store).
PERSISTENT = True
O_BUF_MAX_D = 128


def persistent_on(switch: bool | None = None) -> bool:
    """Whether a Gluon kernel (this forward, v3_gluon_bwd's passes) runs persistent: its module's switch (`switch`;
    None: this module's `PERSISTENT`), unless HF_FLASHATTN_V3_PERSISTENT=0 (one program a unit: the hardware's
    scheduler then spreads the units, which may suit a GPU shared with kernels running beside it, e.g. collectives)."""
    return (PERSISTENT if switch is None else switch) and env_get("HF_FLASHATTN_V3_PERSISTENT", "1") != "0"


def schedule(n_tiles: int, heads: int, batch: int, masked: bool, device, switch: bool | None = None, per_sm: int = 1):
    """(per, n_units, programs) of a launch over n_tiles tiles of each (batch, head) in `_tile`'s order: per = 2 tiles
    a unit under a mask (pairs of even work), else 1; per_sm programs an SM if `persistent_on(switch)`, else one a
    unit."""
    per = 2 if masked else 1
    n_units = (n_tiles + per - 1) // per * heads * batch
    return per, n_units, (min(n_units, per_sm * C.num_sms(device)) if persistent_on(switch) else n_units)


def tile_order(n_mt: int, n_bh: int, programs: int, tail: int, per: int = 2) -> list:
    """`_n_items` and `_tile` on the host: for each program, its row tiles in order as (batch·head, row tile), the
    invalid second half of an odd middle pair left out. `tail_pairs` weighs it; the tests check that it covers every
    tile once."""
    n_per = (n_mt + per - 1) // per
    n_main = n_bh * (n_per - tail)
    n_single = 2 * n_bh * tail
    order = []
    for pid in range(programs):
        c_main = -(-(n_main - pid) // programs) if n_main > pid else 0
        rot = (pid - n_main % programs + programs) % programs
        items = per * c_main + (-(-(n_single - rot) // programs) if n_single > rot else 0)
        tiles = []
        for i in range(items):
            if tail == 0 or i < per * c_main:
                unit = pid + (i // per) * programs
                half, j, bh = i % per, unit % (n_per - tail), unit // (n_per - tail)
            else:
                t = rot + (i - per * c_main) * programs
                half, bh, j = t % 2, (t // 2) % n_bh, n_per - 1 - (t // 2) // n_bh
            if half == 0 or 2 * j != n_mt - 1:
                tiles.append((bh, n_mt - 1 - j - half * (n_mt - 1 - 2 * j)))
        order.append(tiles)
    return order


def tail_pairs(n_mt: int, n_bh: int, programs: int, max_tail: int = 4) -> int:
    """`_tile`'s tail under a square causal mask: how many of every (batch, head)'s most even pairs of row tiles run
    last as single tiles, chosen by the makespan of the static schedule (`tile_order`) with a row tile's cost taken as
    its key blocks (row tile m sees m + 1 tiles' keys): 0 unless that is more than 0.5% shorter, or when the pairs make
    more than 64 rounds (the last one is then at most 1.6% of the work). d64 16k causal (86 tiles of 192 rows, 32 heads,
    132 programs): 2, makespan 915 against 957 (-4.4%); GQA 32/8 32k causal at d128: 1 (-1.6%); the grid's other
    points: 0."""
    n_per = (n_mt + 1) // 2
    if n_per < 2 or n_bh <= 0 or n_bh * n_per > 64 * programs:
        return 0
    best, best_tail = None, 0
    for tail in range(min(max_tail, n_per - 1) + 1):
        ms = max(sum(m + 1 for _, m in tiles) for tiles in tile_order(n_mt, n_bh, programs, tail))
        if best is None or ms < best * 0.995:
            best, best_tail = ms, tail
    return best_tail


# Split the last round of pairs into single tiles where `tail_pairs` finds it shorter (square causal masks, dense,
# persistent). False: pairs only (benchmarks compare the two; read when a call signature is first set up).
TAIL_SPLIT = True

# d64: two Q slots (sixteenth session, results/2026-11-27-h100-sweep-gluon-d64-16k.md, one process: 16k causal 443
# TFLOP/s, 0.99x cuDNN, against 410 with one slot and 421 for v3.py's kernel; 16k unmasked 480 against 473; 4k
# unmasked 433 against 428 and v3.py's 426; correct 32/32 there and in the fifteenth session's run)
# d64: ping-pong of the three consumers (eighteenth session, results/2026-11-27-h100-plan-ab-pingpong{,-d64}.md,
# variants in rounds in one process, bitwise equal output): 3.0-4.1% faster at 4k, 8k and 16k unmasked and 16k causal
# (1.000-1.052x cuDNN against 0.961-1.004x), GQA 32k causal within noise (+1.0%); at d128 1.6-3.5% slower (1k-32k),
# d256 1.6% slower
_PLANS = {64: (192, 128, 4, 2, 160, True, 2), 128: (128, 128, 4, 2, 240, False, 2), 256: (128, 64, 4, 2, 240)}
_PLAN_128_SHORT_MASKED = (64, 64, 4, 2, 232)   # d128 under a mask below MASKED_SHORT_KEYS keys
MASKED_SHORT_KEYS = 2048
# (d64 without a mask at 2k-4k keys measured 446 TFLOP/s with two Q slots against 428-432 with one and 434-436 for
# v3.py's kernel, results/2026-11-27-h100-sweep-gluon-2k.md; 435 / 433 / 437 at 2k / 4k / 8k against v3.py's 436 /
# 485 / 439 in the next process, results/2026-11-27-h100-sweep-gluon-d64-qslots.md. At 4k the probes' 10-call rounds
# favour v3.py's 64 x 64 plan, 1.236 ms against 1.270-1.277 (results/2026-11-27-h100-plan-ab-d64-{one-loop-plans,
# q2d}.md), but bench.py's grid (do_bench, the bar's method) does not: 444 / 458 TFLOP/s with Gluon in two processes
# (bench-eighteenth, bench-v3-d64-twentieth) against 428 with v3.py's kernel (bench-v3-twenty-second-d64-d128), cuDNN
# 454-459 in all three; the twenty-second session's A/B in that method: results/2026-11-27-h100-bench-d64-gluon-ab*.
# v3.py's kernel keeps d64 below 4096 keys unmasked (D64_UNMASKED_FROM_KEYS), 16384 masked)
# d64 under a mask: the 192-row diagonal tiles cost less as the sequence grows; against v3.py's kernel (causal, 32/8
# heads, results/2026-11-26-h100-probe-packed-fwd.md) 0.89-0.91x at 8k keys, 1.01-1.07x at 16k, 1.06-1.15x at 32k
D64_MASKED_FROM_KEYS = 16384
D64_UNMASKED_FROM_KEYS = 4096


def plan(D: int, max_seqlen_k: int, masked: bool, force: bool = False):
    """The plan for head dim D (64, 128 or 256), the longest key sequence and whether a causal/window mask applies;
    None where v3.py's kernel measured faster (unless force, which gives _PLANS[D])."""
    if force or D == 256:
        return _PLANS[D]
    if D == 128:
        return _PLAN_128_SHORT_MASKED if masked and max_seqlen_k < MASKED_SHORT_KEYS else _PLANS[128]
    return _PLANS[64] if max_seqlen_k >= (D64_MASKED_FROM_KEYS if masked else D64_UNMASKED_FROM_KEYS) else None


def supports(q, k, v, cu_seqlens_q, softmax_scale, softcap) -> str | None:
    """None if this kernel runs the inputs, else why not (the caller then runs v3.py's kernel)."""
    if not HAVE_GLUON:
        return "this Triton has no Gluon"
    if softcap > 0:
        return "softcap runs v3.py's kernel"
    if not softmax_scale > 0:   # the fold takes the row max on raw q·k, which needs a positive scale
        return "a scale <= 0 runs v3.py's kernel"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"{q.dtype} runs elsewhere"
    if q.shape[-1] not in _PLANS:
        return f"head dim {q.shape[-1]} runs v3.py's kernel"
    if not C.descriptors_ok(q, k, v):
        return "TMA needs 16-byte aligned pointers and strides"
    return None


@functools.lru_cache(maxsize=None)
def shared_layout():
    """The NVMMA shared-memory layout of a (1, rows, 1, head_dim) 16-bit tile: a 128-byte swizzle (every head dim in
    scope, 64/128/256, has rows of at least 128 bytes). One object, made once (~6 us each) and kept: the
    descriptors' cached fields (`C.descriptor`) are keyed on it."""
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)


def forward(q, k, v, max_seqlen_q, max_seqlen_k, softmax_scale, window_size, _plan=None, cu_seqlens_q=None,
            cu_seqlens_k=None):
    """Dense (B, S, H, D), or packed (total, H, D) with cu_seqlens: (out, lse (B, H, Sq) or (H, total) float32).
    `supports()` must have passed. Everything but the tensors is worked out once per call signature (`_Setup`)."""
    varlen = cu_seqlens_q is not None
    key = (q.shape, k.shape, q.dtype, None if not varlen else
           ((cu_seqlens_q.data_ptr() | cu_seqlens_k.data_ptr()) & 15, cu_seqlens_q.numel(), max_seqlen_q, max_seqlen_k),
           tuple(window_size), softmax_scale, _plan, q.device, persistent_on(), PINGPONG, TAIL_SPLIT)
    st = _SETUPS.get(key)
    if st is None:
        st = C.keep(_SETUPS, key, _Setup(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, window_size,
                                         _plan, key))
    dev = q.device
    out = torch.empty(q.shape, dtype=q.dtype, device=dev)
    lse = torch.empty(st.lse_shape, dtype=torch.float32, device=dev)
    if st.empty:
        return out.zero_(), lse.fill_(float("inf"))
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as TD
    o4 = out
    if varlen:   # packed: descriptors over (1, total, H, D), rows addressed from each sequence's start
        q, k, v, o4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), out.unsqueeze(0)
    layout, D, bn = st.layout, st.D, st.bn
    # Q and O move in 64-row slices, one per consumer warpgroup
    _fwd_launch.launch(st.key, st.grid, (C.Tma(TD, q, (1, 64, 1, D), layout), C.Tma(TD, k, (1, bn, 1, D), layout),
                                         C.Tma(TD, v, (1, bn, 1, D), layout), C.Tma(TD, o4, (1, 64, 1, D), layout),
                                         out, lse, cu_seqlens_q, cu_seqlens_k) + st.ints, st.meta)
    return out, lse


_SETUPS: dict = {}


class _Setup:
    """What `forward` works out from a call's signature, kept per signature: lse's shape, the plan, the grid, the
    launch's key, integer arguments and meta-parameters."""

    def __init__(self, q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, window_size, _plan, key):
        varlen = cu_seqlens_q is not None
        H, D = q.shape[-2], q.shape[-1]
        Hk = k.shape[-2]
        B = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
        Sq, Sk = (max_seqlen_q, max_seqlen_k) if varlen else (q.shape[1], k.shape[1])
        self.D = D
        self.lse_shape = (H, q.shape[0]) if varlen else (B, H, Sq)
        self.empty = q.numel() == 0 or k.numel() == 0 or B == 0
        if self.empty:
            return
        masked = tuple(window_size) != (-1, -1)
        p = _plan or plan(D, Sk, masked, force=True)
        bm, bn, warps, stages, regs = p[:5]
        self.bn = bn
        pingpong = p[5] if len(p) > 5 else PINGPONG
        q_slots = p[6] if len(p) > 6 else Q_SLOTS
        left, right = C.window_args(window_size, Sq, Sk)
        qk_scale, _ = C.score_scales(softmax_scale, 0.0)
        self.layout = shared_layout()
        # lse and out are made here (contiguous): their strides follow from the shapes
        ls = C.contiguous_strides(self.lse_shape)
        stride_l = (0, ls[0]) if varlen else ls[:2]
        stride_o = C.layout_of(C.contiguous_strides(q.shape), varlen)
        n_mt = C.cdiv(Sq, bm)
        nc = bm // 64
        # one consumer: two programs an SM (registers capped at half the file, shared memory under half), so that one
        # program's tile ends and starts run under the other's products; a plan's 8th element overrides
        per_sm = p[7] if len(p) > 7 else (2 if nc == 1 else 1)
        per, n_units, programs = schedule(n_mt, H, B, masked, q.device, per_sm=per_sm)
        self.grid = (programs,)
        o_buf = D <= O_BUF_MAX_D and not varlen
        # what Triton specialises on besides the signature: the lengths, window and tile counts only by their 32/64-bit
        # type (the descriptors' dtype and blocks, lse's and out's strides and the group size follow from the key)
        # the tail: under a causal mask only (a window's tiles cost the same, pairs or not), dense, persistent, one
        # program an SM (with two, the makespan model's programs are not the SMs)
        square_causal = tuple(window_size) == (-1, 0) and Sq == Sk and not varlen
        tail = (tail_pairs(n_mt, H * B, programs) if TAIL_SPLIT and square_causal and per == 2 and per_sm == 1
                and persistent_on() else 0)
        self.tail = tail
        self.key = key + ((left | right | Sq | Sk | n_units) >> 31,)
        self.ints = stride_o + stride_l + (Sq, Sk, left, right, qk_scale, H // Hk, n_mt, H, n_units, per, tail)
        self.meta = dict(HEAD_DIM=D, BLOCK_N=bn, STAGES=stages, CONSUMER_REGS=regs, NC=nc, PINGPONG=pingpong,
                         IS_VARLEN=varlen, O_BUF=o_buf, LEFT=window_size[0] >= 0 or bm > 128, Q_SLOTS=q_slots,
                         TAIL=tail > 0, num_warps=warps)
        if per_sm > 1:
            self.meta["maxnreg"] = 65536 // per_sm // (32 * (warps + 4 * nc))


if HAVE_GLUON:
    _fwd_launch = C.FastLaunch(_fwd_kernel_ws)
