"""v3's backward in Gluon for Hopper: warp-specialised, persistent; at d64 and d128 one pass summing dQ through the TMA
unit's reduce (dense or packed), at d256 (and with deterministic=True everywhere) two passes (dK/dV, then dQ), bitwise
reproducible.

Why: v2's backward (Triton's language, two passes) ran at 0.63-0.81x cuDNN's backward on the H100, so a forward
that matches cuDNN still left forward+backward at 0.67-0.84x (benchmarks/NOTES.md, seventh session).

dK/dV pass (`_bwd_kernel`): one program per (64·NC keys, kv head, sequence), NC = 2. A producer partition (4 warps)
copies the program's K and V once (a 64-row slice per consumer) and then, for every query head of the kv head's
group (GQA/MQA summed in registers, no repeated K/V) and every query block that sees the keys, Q, dO and the
block's lse (log2 units) and Delta through host-made TMA descriptors into a ring of STAGES slots (`ready`/`empty`
mbarriers, one arrive per consumer). Each consumer (one warpgroup, 64 keys, `setmaxnreg`) works keys x queries,
so that K and V are A operands from shared memory and Pᵀ, dSᵀ A operands from registers, and lse/Delta are
per-column vectors read from shared memory when used:

    Sᵀ = K Qᵀ,  dPᵀ = V dOᵀ                  (two wgmmas in flight; Pᵀ's exponent under the second)
    Pᵀ = exp2(Sᵀ·c - lse),  dSᵀ = Pᵀ ∘ (dPᵀ - Delta)
    dV += Pᵀ dO,  dK += dSᵀ Q                  (registers as A), then the slot is released

and stores dK (times the scale) and dV once, by TMA stores through shared memory (`KV_OUT`: buffers of their own,
or the consumer's K/V buffers; sixteenth session: the masked stores from registers they replace cost the pass 10-20%
at 1k keys). dQ pass (`_dq_kernel`): one program per (128 query rows, head,
sequence), shaped like the forward (v3_gluon.py): a producer copies Q and dO once and streams K and V; each consumer
(64 rows) computes S = Q Kᵀ and dP = dO Vᵀ together, dS = P ∘ (dP - Delta) as a register A operand, dQ += dS K,
and stores dQ once. No program writes what another writes: bitwise reproducible, so `deterministic=True` runs it
too. Both passes are persistent, as the forward (v3_gluon.py: one program an SM over `_tile`'s units, the ring's
count running on across tiles; the dK/dV pass hands K and V back after a tile's last step, the dQ pass Q and dO
after its last block; tenth session: 0.97-1.07x one program a unit, about 1.02 on average).
Both passes take v2's three ranges of blocks (masked edge, unmasked band, masked diagonal/tail); Delta and lse (log2
units) are padded per sequence to whole blocks (+inf, 0) so that the dK/dV pass's loads need no mask: with two passes
the dQ pass works them out for its rows and runs first (`FUSED_PREP`, fifteenth session), the single pass reads them
from `_prep_kernel`. Packed
batches (cu_seqlens) use descriptors over (1, total, H, D) and per-sequence bounds; rows that run into the next
sequence are masked out of P and out of the stores.

FA3's single pass (`_PLANS`' dQ modes): dQ = dS K in the dK/dV pass, summed across programs into a float32
accumulator (B, S, H, D), then cast. At d128 (the default there) the two consumers' dSᵀ meet in shared memory and
consumer W computes head-dim columns [64 W, 64 W + 64) of the program's dQ tile over all 128 keys, stores it to one of
two shared tiles and hands it to the TMA unit's reduce-add (`_tma_add`), waited for only before that tile's next use:
0.94-1.05x cuDNN's backward against 0.84-0.96x for the two passes (NOTES, eleventh session). At d64 the tile is one
64-column part, taken by the consumers in turn, a step each (0.93-1.08x against 0.88-0.96x). Summing with `red`
instruction by instruction instead (modes 1, 2, kept as options) ran at 0.77-0.83x: the atomics' traffic (eighth
session). The sum's order varies between runs, so deterministic=True takes the two passes. Packed batches sum into a
(1, total, H, D) accumulator: a tile's query rows past its sequence belong to the next one and add exact zeros there
(their lse is +inf); a sequence's last key tile masks every step, as its keys past Sk are the next sequence's.

At head dim 256 dK and dV together would take every register of a consumer: the dK/dV pass runs twice (`PART` 1:
dV alone, 2: dK alone), with 32-query steps (and 32-key steps in the dQ pass) to fit shared memory.

Scope (`supports`): (B, S, H, D) or packed fp16/bf16, head dim 64, 128 or 256, no softcap, a positive scale,
TMA-aligned strides. Everything else runs v2's backward.
Gluon kernels do not run on Triton's interpreter: the CPU tests compile these for sm_90a (tests/test_v3_gluon_bwd.py).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import seq_bounds
from .v3_gluon import HAVE_GLUON, persistent_on, schedule

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from .v3_gluon import _store_rows, _store_zero_rows, _tile, _tma_load, _tma_store, _visible

    # shared memory seen as another dtype and shape: `reinterpret` from Triton 3.7, `_reinterpret` on 3.6
    _NEW_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))

    @gluon.jit
    def _kv_tile(i, pid, nprog, per, n_kt, n_kv_heads, CU_Q, CU_K, seqlen_q, seqlen_k, left, right,
                 BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, IS_VARLEN: gl.constexpr):
        """The i-th key tile of program pid (the forward's `_tile` with queries and keys exchanged: under a mask, units
        of key tiles j and n_kt - 1 - j, even work under a causal mask): (valid, b, kvh, n0, bq, q0, k0, Sq, Sk, lo,
        full_lo, full_hi, hi), the query blocks [lo, hi) that see the keys, [full_lo, full_hi) seen by all of them."""
        ok, b, kvh, _, n0, bq, k0, q0, Sk, Sq, _, lo, full_lo, full_hi, hi = _tile(i, pid, nprog, per, n_kt,
                                                                                   n_kv_heads, 1, CU_K, CU_Q, seqlen_k,
                                                                                   seqlen_q, right, left, 0, 0,
                                                                                   BLOCK_N, BLOCK_M, IS_VARLEN)
        return ok, b, kvh, n0, bq, q0, k0, Sq, Sk, lo, full_lo, full_hi, hi

    @gluon.jit
    def _load_tile_pair(a_desc, b_desc, bq, row, head, bar, free_bar, t, a_smem, b_smem, a0, HEAD_DIM: gl.constexpr,
                        NC: gl.constexpr, c_desc=None, c_smem=None):
        """A producer's once-a-tile load of two tensors' rows [row, row + 64·NC) of head `head` (a 64-row slice per
        consumer, buffers a0 ... a0 + NC - 1), after the consumers have released the slot's previous use, its t-th
        (`free_bar`): K and V in the dK/dV pass, Q and dO in the dQ pass (and a third, c, on the same barrier: O when
        the dQ pass works out Delta, `PREP` 2)."""
        mbarrier.wait(free_bar, (t & 1) ^ 1)   # a fresh barrier's parity 1 is done
        mbarrier.expect(bar, (2 if c_desc is None else 3) * NC * 64 * HEAD_DIM * 2)
        for w in gl.static_range(NC):
            _tma_load(a_desc, [bq, row + w * 64, head, 0], bar, a_smem.index(a0 + w))
            _tma_load(b_desc, [bq, row + w * 64, head, 0], bar, b_smem.index(a0 + w))
            if c_desc is not None:
                _tma_load(c_desc, [bq, row + w * 64, head, 0], bar, c_smem.index(a0 + w))

    @gluon.jit
    def _producer(q_desc, do_desc, k_desc, v_desc, l_desc, d_desc, q_smem, do_smem, k_smem, v_smem, l_smem, d_smem,
                  kv_bar, kv_empty, ready, empty, CU_Q, CU_K, seqlen_q, seqlen_k, left, right, group, nheads, n_kt,
                  n_units, per, pid, nprog, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                  NC: gl.constexpr, IS_VARLEN: gl.constexpr, KV_SLOTS: gl.constexpr):
        """For each key tile of this program that some query sees: K and V (a 64-row slice per consumer) into slot
        tk % KV_SLOTS once the consumers have released that slot's previous tile (`kv_empty`), then Q, dO, lse and
        Delta of every (head, query block) into a ring whose count runs on across tiles. With two slots the next
        tile's K and V load while this tile's last steps run, not after them."""
        base = 0
        tk = 0
        for t in range(per * gl.cdiv(n_units - pid, nprog)):
            ok, b, kvh, n0, bq, q0, k0, _, _, lo, _, _, hi = _kv_tile(t, pid, nprog, per, n_kt, nheads // group, CU_Q,
                                                                     CU_K, seqlen_q, seqlen_k, left, right, NC * 64,
                                                                     BLOCK_M, IS_VARLEN)
            if ok & (lo < hi):
                slot = tk % KV_SLOTS
                _load_tile_pair(k_desc, v_desc, bq, k0 + n0, kvh, kv_bar.index(slot), kv_empty.index(slot),
                                tk // KV_SLOTS, k_smem, v_smem, slot * NC, HEAD_DIM, NC)
                n = gl.cdiv(hi - lo, BLOCK_M)
                for g in range(group):
                    h = kvh * group + g
                    for i in range(n):
                        it = base + g * n + i
                        s = it % STAGES
                        mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                        mbarrier.expect(ready.index(s), 2 * BLOCK_M * HEAD_DIM * 2 + 2 * BLOCK_M * 4)
                        m0 = lo + i * BLOCK_M
                        _tma_load(q_desc, [bq, q0 + m0, h, 0], ready.index(s), q_smem.index(s))
                        _tma_load(do_desc, [bq, q0 + m0, h, 0], ready.index(s), do_smem.index(s))
                        _tma_load(l_desc, [b * nheads + h, m0], ready.index(s), l_smem.index(s))
                        _tma_load(d_desc, [b * nheads + h, m0], ready.index(s), d_smem.index(s))
                base += group * n
                tk += 1

    @gluon.jit
    def _red_add(ptrs, x):
        """dst += x with `red.global.add.v4.f32` (sm_90), four consecutive float32 a thread: Gluon's atomic_add
        lowers to one returning `atom` an element in Triton 3.6."""
        gl.inline_asm_elementwise("red.global.add.v4.f32 [$4], {$8, $9, $10, $11}; mov.b32 $0, 0; mov.b32 $1, 0; "
                                  "mov.b32 $2, 0; mov.b32 $3, 0;", "=r,=r,=r,=r,l,l,l,l,r,r,r,r",
                                  [ptrs.to(gl.int64, bitcast=True), x.to(gl.int32, bitcast=True)], dtype=gl.int32,
                                  is_pure=False, pack=4)

    @gluon.jit
    def _red_add2(ptrs, x):
        """dst += x with `red.global.add.v2.f32` (sm_90), two consecutive float32 a thread."""
        gl.inline_asm_elementwise("red.global.add.v2.f32 [$2], {$4, $5}; mov.b32 $0, 0; mov.b32 $1, 0;",
                                  "=r,=r,l,l,r,r", [ptrs.to(gl.int64, bitcast=True), x.to(gl.int32, bitcast=True)],
                                  dtype=gl.int32, is_pure=False, pack=2)

    if hasattr(tma, "async_atomic_add"):   # Triton 3.7+: the TMA reduce has a name in Gluon
        _tma_add = tma.async_atomic_add
    else:   # Triton 3.6: its IR (ttng.async_tma_reduce) and builder call exist, Gluon's Python has no name for them
        from triton._C.libtriton import ir as _ir
        from triton.experimental.gluon.language._core import builtin as _builtin

        @_builtin
        def _tma_add(tensor_desc, coord, src, _semantic=None):
            """global[coord ...] += src (shared memory) through the TMA unit (`cp.reduce.async.bulk.tensor ... add`),
            asynchronous as a TMA store: `tma.store_wait` before src is written again."""
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                      src.handle)

    @gluon.jit
    def _red_rows(DQ_h, stride_dqm, m0, col0, buf, BLOCK_M: gl.constexpr, DH: gl.constexpr):
        """DQ[m0 + r, col0 + c] += buf[r, c], eight rows at a time (the swizzle period of buf)."""
        CH: gl.constexpr = 8
        red_layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (DH // 4), DH // 4], [4, 1], [1, 0])
        rr = gl.arange(0, CH, layout=gl.SliceLayout(1, red_layout))
        cc = gl.expand_dims(col0 + gl.arange(0, DH, layout=gl.SliceLayout(0, red_layout)), 0)
        for c0 in gl.static_range(0, BLOCK_M, CH):
            x = buf.slice(c0, CH, dim=0).load(red_layout)
            _red_add(DQ_h + gl.expand_dims(m0 + c0 + rr, 1) * stride_dqm + cc, x)

    @gluon.jit
    def _reduce(DQ_h, stride_dqm, m0, col0, x, buf, dqa_desc, b, q0, h, BLOCK_M: gl.constexpr, DH: gl.constexpr,
                x_layout: gl.constexpr, MODE: gl.constexpr):
        """DQ[m0 + r, col0 + c] += x[r, c] (x in the wgmma layout): MODE 1 through shared memory (`buf`) into rows of
        four consecutive float32 a thread, red.v4; MODE 2 straight from the registers, red.v2; MODE 5 through `buf`
        (dqa_desc's layout) and one TMA reduce of the tile (b, q0 + m0, h, col0), left in flight until buf's next use;
        MODE 6 as 5 with two buffers a consumer; MODE 3 nothing (a timing diagnostic)."""
        if MODE >= 5:
            tma.store_wait(MODE - 5)   # the reduce that last read buf is done (6: two buffers, one may be in flight)
            buf.reshape([BLOCK_M, DH]).store(x)
            fence_async_shared()
            _tma_add(dqa_desc, [b, q0 + m0, h, col0], buf)
        elif MODE == 1:
            buf.store(x)
            _red_rows(DQ_h, stride_dqm, m0, col0, buf, BLOCK_M, DH)
        elif MODE == 2:
            rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_layout))
            cols = col0 + gl.arange(0, DH, layout=gl.SliceLayout(0, x_layout))
            _red_add2(DQ_h + gl.expand_dims(rows, 1) * stride_dqm + gl.expand_dims(cols, 0), x)

    @gluon.jit
    def _visible_t(pt, offs_k, offs_q, Sk, diag, left, right, MASKED: gl.constexpr):
        """Pᵀ (keys x queries) with the keys a query does not see set to 0 (masked blocks only; queries past Sq have
        lse = +inf, so P = 0 there already)."""
        if MASKED:
            r = gl.expand_dims(offs_k, 1)
            c = gl.expand_dims(offs_q, 0)
            pt = gl.where((r >= c + diag - left) & (r <= c + diag + right) & (r < Sk), pt, 0.0)
        return pt

    @gluon.jit
    def _p_ds_t(kw, vw, qs, dos, lse_s, delta_s, zero, offs_k, offs_q, Sk, diag, left, right, qk_scale,
                st_layout: gl.constexpr, MASKED: gl.constexpr):
        """Pᵀ and dSᵀ = Pᵀ ∘ (dPᵀ - Delta) (float32, keys x queries) of one query block: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ
        in flight together, Pᵀ's exponent under the second; lse_s, delta_s the block's (1, BLOCK_M) slots."""
        st = warpgroup_mma(kw, qs.permute((1, 0)), zero, use_acc=False, is_async=True)
        dpt = warpgroup_mma(vw, dos.permute((1, 0)), zero, use_acc=False, is_async=True)
        lse = gl.max(lse_s.load(st_layout), 0)   # (1, BLOCK_M) -> the columns' vector (max: exact)
        st = warpgroup_mma_wait(1, deps=[st])
        pt = _visible_t(gl.exp2(st * qk_scale - gl.expand_dims(lse, 0)), offs_k, offs_q, Sk, diag, left, right,
                        MASKED)
        delta = gl.max(delta_s.load(st_layout), 0)
        dpt = warpgroup_mma_wait(0, deps=[dpt])
        return pt, pt * (dpt - gl.expand_dims(delta, 0))

    @gluon.jit
    def _step(it, m0, dk, dv, k_smem, kv0, kw, vw, ds_smem, dsw, dq_smem, q_smem, do_smem, l_smem, d_smem, ready, empty,
              ds_full, ds_free, DQ_h, stride_dqm, dqa_desc, b, q0, h, offs_k, Sk, diag, left, right, qk_scale, ds_scale,
              BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, st_layout: gl.constexpr,
              acc_layout: gl.constexpr, a_layout: gl.constexpr, MASKED: gl.constexpr, DO_DQ: gl.constexpr,
              SHARED_DQ: gl.constexpr, W: gl.constexpr, NC: gl.constexpr, PART: gl.constexpr):
        """Query block m0 against this consumer's 64 keys (module docstring). lse (log2 units) and Delta are padded
        to whole query blocks (+inf and 0), and so is dQ's accumulator: no load or store here needs a mask.
        PART 1: dV alone (Sᵀ, then Pᵀ dO); PART 2: dK alone (Sᵀ, dPᵀ, then dSᵀ Q); 0: both."""
        s = it % STAGES
        offs_q = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, st_layout))
        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
        qs = q_smem.index(s).reshape([BLOCK_M, HEAD_DIM])
        dos = do_smem.index(s).reshape([BLOCK_M, HEAD_DIM])
        zero = gl.zeros([64, BLOCK_M], gl.float32, st_layout)
        dtype: gl.constexpr = kw.dtype
        if PART == 1:
            st = warpgroup_mma(kw, qs.permute((1, 0)), zero, use_acc=False, is_async=True)
            lse = gl.max(l_smem.index(s).load(st_layout), 0)
            st = warpgroup_mma_wait(0, deps=[st])
            pt = _visible_t(gl.exp2(st * qk_scale - gl.expand_dims(lse, 0)), offs_k, offs_q, Sk, diag, left, right,
                            MASKED)
            p_op = gl.convert_layout(pt.to(dtype), a_layout)
            dv_tok = warpgroup_mma(p_op, dos, dv, is_async=True)
            dv, p_op = warpgroup_mma_wait(0, deps=[dv_tok, p_op])
            mbarrier.arrive(empty.index(s), count=1)
        elif PART == 2:
            pt, dst = _p_ds_t(kw, vw, qs, dos, l_smem.index(s), d_smem.index(s), zero, offs_k, offs_q, Sk, diag, left,
                              right, qk_scale, st_layout, MASKED)
            ds_op = gl.convert_layout(dst.to(dtype), a_layout)
            dk_tok = warpgroup_mma(ds_op, qs, dk, is_async=True)
            dk, ds_op = warpgroup_mma_wait(0, deps=[dk_tok, ds_op])
            mbarrier.arrive(empty.index(s), count=1)
        else:
            pt, dst = _p_ds_t(kw, vw, qs, dos, l_smem.index(s), d_smem.index(s), zero, offs_k, offs_q, Sk, diag, left,
                              right, qk_scale, st_layout, MASKED)
            p_op = gl.convert_layout(pt.to(dtype), a_layout)
            dv_tok = warpgroup_mma(p_op, dos, dv, is_async=True)
            ds16 = dst.to(dtype)
            ds_op = gl.convert_layout(ds16, a_layout)
            dk_tok = warpgroup_mma(ds_op, qs, dk, is_async=True)
            if DO_DQ > 0:
                if SHARED_DQ & (HEAD_DIM == 64) & (DO_DQ == 6):   # a tile every other step, two buffers in turn
                    dqa = dq_smem.index(2 * W + ((it >> 1) & 1))
                    dqb = dqa
                elif (DO_DQ == 6) & (SHARED_DQ | (HEAD_DIM == 64)):   # one tile a step, two buffers in turn
                    dqa = dq_smem.index(2 * W + (it & 1))
                    dqb = dqa
                else:
                    dqa = dq_smem.index(W if SHARED_DQ else 2 * W)
                    dqb = dq_smem.index(W if SHARED_DQ else 2 * W + 1)
                if SHARED_DQ:   # the previous step's readers of every consumer's dS are done (a fresh barrier passes)
                    mbarrier.wait(ds_free, (it & 1) ^ 1)
                dsw.store(ds16)
                fence_async_shared()
                dsq = dsw.permute((1, 0))   # dS, queries x keys
                # dQ += scale · dS K, at d128 in two halves of the head dim (32 registers a thread each, not 64): each
                # part through shared memory into rows of four consecutive float32 a thread, then vector reductions
                DH: gl.constexpr = 64
                dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                                    instr_shape=[16, DH, 16])
                if SHARED_DQ & (HEAD_DIM == 64):
                    # as below, but the tile has one 64-column part: consumer W takes it on steps where it & 1 == W
                    mbarrier.arrive(ds_full, count=1)
                    mbarrier.wait(ds_full, it & 1)
                    if (it & 1) == W:
                        dq0 = gl.zeros([BLOCK_M, DH], gl.float32, dq_layout)
                        for j in gl.static_range(NC):
                            dq0 = warpgroup_mma(ds_smem.index(j).permute((1, 0)),
                                                k_smem.index(kv0 + j).reshape([64, DH]),
                                                dq0, use_acc=j > 0, is_async=True)
                        dq0 = warpgroup_mma_wait(0, deps=[dq0])
                        mbarrier.arrive(ds_free, count=1)
                        _reduce(DQ_h, stride_dqm, m0, 0, dq0 * ds_scale, dqa, dqa_desc, b, q0, h, BLOCK_M, DH,
                                dq_layout, DO_DQ)
                    else:
                        mbarrier.arrive(ds_free, count=1)   # this consumer reads no dS this step
                    dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, p_op, ds_op])
                    mbarrier.arrive(empty.index(s), count=1)
                elif SHARED_DQ:
                    # the program's dQ tile summed over all its keys before the atomics (half the traffic of a tile a
                    # consumer): every consumer's dSᵀ in shared memory (`ds_full`), then consumer W takes head-dim
                    # columns [64 W, 64 W + 64) of dS K over all 64·NC keys; `ds_free` once every reader is done
                    mbarrier.arrive(ds_full, count=1)
                    mbarrier.wait(ds_full, it & 1)
                    dq0 = gl.zeros([BLOCK_M, DH], gl.float32, dq_layout)
                    for j in gl.static_range(NC):
                        kj = k_smem.index(kv0 + j).reshape([64, HEAD_DIM]).slice(W * DH, DH, dim=1)
                        dq0 = warpgroup_mma(ds_smem.index(j).permute((1, 0)), kj, dq0, use_acc=j > 0, is_async=True)
                    dv, dk, dq0, p_op, ds_op = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, dq0, p_op, ds_op])
                    mbarrier.arrive(ds_free, count=1)
                    mbarrier.arrive(empty.index(s), count=1)
                    _reduce(DQ_h, stride_dqm, m0, W * DH, dq0 * ds_scale, dqa, dqa_desc, b, q0, h, BLOCK_M, DH,
                            dq_layout, DO_DQ)
                elif HEAD_DIM == 64:
                    dq0 = warpgroup_mma(dsq, kw, gl.zeros([BLOCK_M, DH], gl.float32, dq_layout), use_acc=False,
                                        is_async=True)
                    dv, dk, dq0, p_op, ds_op = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, dq0, p_op, ds_op])
                    mbarrier.arrive(empty.index(s), count=1)
                    _reduce(DQ_h, stride_dqm, m0, 0, dq0 * ds_scale, dqa, dqa_desc, b, q0, h, BLOCK_M, DH,
                            dq_layout, DO_DQ)
                else:
                    dq0 = warpgroup_mma(dsq, kw.slice(0, DH, dim=1), gl.zeros([BLOCK_M, DH], gl.float32, dq_layout),
                                        use_acc=False, is_async=True)
                    dv, dk, dq0, p_op, ds_op = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, dq0, p_op, ds_op])
                    dq1 = warpgroup_mma(dsq, kw.slice(DH, DH, dim=1), gl.zeros([BLOCK_M, DH], gl.float32, dq_layout),
                                        use_acc=False, is_async=True)
                    _reduce(DQ_h, stride_dqm, m0, 0, dq0 * ds_scale, dqa, dqa_desc, b, q0, h, BLOCK_M, DH,
                            dq_layout, DO_DQ)
                    dq1 = warpgroup_mma_wait(0, deps=[dq1])
                    mbarrier.arrive(empty.index(s), count=1)
                    _reduce(DQ_h, stride_dqm, m0, DH, dq1 * ds_scale, dqb, dqa_desc, b, q0, h, BLOCK_M, DH,
                            dq_layout, DO_DQ)
            else:   # dQ in a pass of its own (`_dq_kernel`, the default), or skipped (`backward`'s _dq=4)
                dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, p_op, ds_op])
                mbarrier.arrive(empty.index(s), count=1)
        return dk, dv

    @gluon.jit
    def _kv_consume_tile(W: gl.constexpr, k_smem, v_smem, ds_smem, dq_smem, q_smem, do_smem, l_smem, d_smem, kv_bar,
                         kv_empty, ready, empty, ds_full, ds_free, DQ, dqa_desc, dk_desc, dv_desc, kvo_smem, DK, DV,
                         stride_dqb, stride_dqm,
                         stride_dqh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, tbase, tk,
                         b, bq, q0, k0, kvh, n0, lo, full_lo, full_hi, hi, group, Sk, diag, left, right, qk_scale,
                         ds_scale, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                         DO_DQ: gl.constexpr, SHARED_DQ: gl.constexpr, NC: gl.constexpr, PART: gl.constexpr,
                         IS_VARLEN: gl.constexpr, KV_SLOTS: gl.constexpr, KV_OUT: gl.constexpr):
        """Consumer warpgroup W on one key tile: keys n0 + 64·W ... of the tile (in K/V slot tk % KV_SLOTS), summed
        over the group's heads, then dK and dV stored (`KV_OUT`: 0 masked stores from registers, after K and V go back
        to the producer on `kv_empty`; 1 TMA stores through buffers of their own, likewise; 2 TMA stores through this
        consumer's K and V buffers, which go back once the stores have read them). `tbase`: the ring's count at the
        tile's first step."""
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        kw0 = n0 + W * 64   # this consumer's first key, within the sequence
        offs_k = kw0 + gl.arange(0, 64, layout=gl.SliceLayout(1, st_layout))
        slot = tk % KV_SLOTS
        kv0 = slot * NC
        kw = k_smem.index(kv0 + W).reshape([64, HEAD_DIM])
        vw = v_smem.index(kv0 + W).reshape([64, HEAD_DIM])
        dsw = ds_smem.index(W)
        dk = gl.zeros([64, HEAD_DIM], gl.float32, acc_layout)
        dv = gl.zeros([64, HEAD_DIM], gl.float32, acc_layout)
        n = gl.cdiv(hi - lo, BLOCK_M)
        if IS_VARLEN & (DO_DQ >= 5):
            # packed, the sequence's last key tile: its keys past Sk are the next sequence's, which dQ = dS K would take
            # in (dense: zeros past the tensor), so every step masks them
            if n0 + NC * 64 > Sk:
                full_lo = hi
                full_hi = hi
        mbarrier.wait(kv_bar.index(slot), (tk // KV_SLOTS) & 1)
        b64 = b.to(gl.int64)
        for g in range(group):
            hq = kvh * group + g
            DQ_h = DQ + b64 * stride_dqb + hq.to(gl.int64) * stride_dqh
            base = tbase + g * n - lo // BLOCK_M
            for m0 in range(lo, full_lo, BLOCK_M):
                dk, dv = _step(base + m0 // BLOCK_M, m0, dk, dv, k_smem, kv0, kw, vw, ds_smem, dsw, dq_smem, q_smem,
                               do_smem, l_smem, d_smem, ready, empty, ds_full, ds_free, DQ_h, stride_dqm, dqa_desc,
                               bq, q0, hq, offs_k, Sk, diag, left, right, qk_scale, ds_scale, BLOCK_M, HEAD_DIM,
                               STAGES, st_layout, acc_layout, a_layout, True, DO_DQ, SHARED_DQ, W, NC, PART)
            for m0 in range(full_lo, full_hi, BLOCK_M):
                dk, dv = _step(base + m0 // BLOCK_M, m0, dk, dv, k_smem, kv0, kw, vw, ds_smem, dsw, dq_smem, q_smem,
                               do_smem, l_smem, d_smem, ready, empty, ds_full, ds_free, DQ_h, stride_dqm, dqa_desc,
                               bq, q0, hq, offs_k, Sk, diag, left, right, qk_scale, ds_scale, BLOCK_M, HEAD_DIM,
                               STAGES, st_layout, acc_layout, a_layout, False, DO_DQ, SHARED_DQ, W, NC, PART)
            for m0 in range(full_hi, hi, BLOCK_M):
                dk, dv = _step(base + m0 // BLOCK_M, m0, dk, dv, k_smem, kv0, kw, vw, ds_smem, dsw, dq_smem, q_smem,
                               do_smem, l_smem, d_smem, ready, empty, ds_full, ds_free, DQ_h, stride_dqm, dqa_desc,
                               bq, q0, hq, offs_k, Sk, diag, left, right, qk_scale, ds_scale, BLOCK_M, HEAD_DIM,
                               STAGES, st_layout, acc_layout, a_layout, True, DO_DQ, SHARED_DQ, W, NC, PART)
        if KV_OUT == 0:
            mbarrier.arrive(kv_empty.index(slot), count=1)   # every product reading K and V has been waited for
            _store_kv_rows(DK, DV, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, bq, kvh, k0,
                           kw0, Sk, dk * ds_scale, dv, acc_layout, HEAD_DIM, PART)
        elif IS_VARLEN:   # (one runtime condition joined to KV_OUT's fails to lower on Triton 3.6: two calls)
            if kw0 + 64 > Sk:   # packed: this consumer's keys past the sequence are the next one's: masked stores
                mbarrier.arrive(kv_empty.index(slot), count=1)
                _store_kv_rows(DK, DV, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, bq,
                               kvh, k0, kw0, Sk, dk * ds_scale, dv, acc_layout, HEAD_DIM, PART)
            else:
                _kv_out_tma(W, k_smem, v_smem, kvo_smem, kv0, kv_empty.index(slot), ds_free, tbase + group * n - 1,
                            dk_desc, dv_desc, bq, k0 + kw0, kvh, dk * ds_scale, dv, HEAD_DIM, DO_DQ, SHARED_DQ, PART,
                            KV_OUT)
        else:
            _kv_out_tma(W, k_smem, v_smem, kvo_smem, kv0, kv_empty.index(slot), ds_free, tbase + group * n - 1,
                        dk_desc, dv_desc, bq, k0 + kw0, kvh, dk * ds_scale, dv, HEAD_DIM, DO_DQ, SHARED_DQ, PART,
                        KV_OUT)

    @gluon.jit
    def _kv_out_tma(W: gl.constexpr, k_smem, v_smem, kvo_smem, kv0, kv_free, ds_free, last_it, dk_desc, dv_desc, bq,
                    row, kvh, dk, dv, HEAD_DIM: gl.constexpr, DO_DQ: gl.constexpr, SHARED_DQ: gl.constexpr,
                    PART: gl.constexpr, KV_OUT: gl.constexpr):
        """A tile's dK and dV by TMA stores and the K/V slot handed back (`kv_free`): KV_OUT 2 through this consumer's
        K and V buffers, once every product reading them has been waited for (with a shared dQ tile the other
        consumer's last dS K reads them too: `ds_free` of the tile's last step, `last_it`), handed back once the
        stores have read them; KV_OUT 1 through buffers of their own, the slot handed back first; KV_OUT 3 (the
        single pass) through this consumer's two dQ tiles, once its last reduces have read them, and waited for
        before its next tile writes dQ tiles there."""
        if KV_OUT == 2:
            if SHARED_DQ & (DO_DQ > 0):
                mbarrier.wait(ds_free, last_it & 1)
            _store_kv_tma(dk_desc, dv_desc, k_smem.index(kv0 + W), v_smem.index(kv0 + W), bq, row, kvh, dk, dv,
                          HEAD_DIM, PART)
            tma.store_wait(0)   # the stores have read the buffers: the producer may load the next K and V there
            mbarrier.arrive(kv_free, count=1)
        else:
            mbarrier.arrive(kv_free, count=1)
            tma.store_wait(0)   # the previous tile's stores (KV_OUT 3: this tile's dQ reduces) have read the buffers
            _store_kv_tma(dk_desc, dv_desc, kvo_smem.index(2 * W), kvo_smem.index(2 * W + 1), bq, row, kvh, dk, dv,
                          HEAD_DIM, PART)
            if KV_OUT == 3:
                tma.store_wait(0)   # the next tile's first dQ tiles are written where dK and dV were

    @gluon.jit
    def _store_kv_tma(dk_desc, dv_desc, ko, vo, bq, row, kvh, dk, dv, HEAD_DIM: gl.constexpr, PART: gl.constexpr):
        """dK and dV (64 x HEAD_DIM float32 registers; PART 1: dV alone, 2: dK alone) of keys row ... row + 63 by TMA
        stores through the shared buffers ko and vo, left in flight (dense: TMA clips the rows past the tensor's
        keys; packed: only a consumer's keys wholly inside the sequence come here)."""
        if PART != 1:
            ko.reshape([64, HEAD_DIM]).store(dk.to(dk_desc.dtype))
        if PART != 2:
            vo.reshape([64, HEAD_DIM]).store(dv.to(dv_desc.dtype))
        fence_async_shared()
        if PART != 1:
            _tma_store(dk_desc, [bq, row, kvh, 0], ko)
        if PART != 2:
            _tma_store(dv_desc, [bq, row, kvh, 0], vo)

    @gluon.jit
    def _store_kv_rows(DK, DV, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, bq, kvh, k0, kw0,
                       Sk, dk, dv, layout: gl.constexpr, HEAD_DIM: gl.constexpr, PART: gl.constexpr):
        """dK and dV (64 x HEAD_DIM, in `layout`) of keys kw0 ... of the sequence, by masked stores (keys past Sk are
        the next sequence's, packed, or nothing); PART 1 stores dV alone, 2 dK alone."""
        rows = kw0 + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
        cols = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout)), 0)
        ok = gl.expand_dims(rows, 1) < Sk
        r64 = gl.expand_dims(rows.to(gl.int64) + k0, 1)
        kv64 = kvh.to(gl.int64)
        b64 = bq.to(gl.int64)
        if PART != 1:
            gl.store(DK + b64 * stride_dkb + kv64 * stride_dkh + r64 * stride_dkn + cols, dk.to(DK.dtype.element_ty),
                     mask=ok)
        if PART != 2:
            gl.store(DV + b64 * stride_dvb + kv64 * stride_dvh + r64 * stride_dvn + cols, dv.to(DV.dtype.element_ty),
                     mask=ok)

    @gluon.jit
    def _consumer(W: gl.constexpr, k_smem, v_smem, ds_smem, dq_smem, q_smem, do_smem, l_smem, d_smem, kv_bar, kv_empty,
                  ready, empty, ds_full, ds_free, DQ, dqa_desc, dk_desc, dv_desc, kvo_smem, DK, DV, stride_dqb,
                  stride_dqm, stride_dqh,
                  stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, CU_Q, CU_K, seqlen_q,
                  seqlen_k, left, right, group, nheads, n_kt, n_units, per, pid, nprog, qk_scale, ds_scale,
                  BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, DO_DQ: gl.constexpr,
                  SHARED_DQ: gl.constexpr, NC: gl.constexpr, PART: gl.constexpr, IS_VARLEN: gl.constexpr,
                  KV_SLOTS: gl.constexpr, KV_OUT: gl.constexpr):
        """Consumer warpgroup W over this program's key tiles (the producer's order and ring count); keys no query
        sees get dK = dV = 0."""
        tbase = 0
        tk = 0
        for t in range(per * gl.cdiv(n_units - pid, nprog)):
            ok, b, kvh, n0, bq, q0, k0, Sq, Sk, lo, full_lo, full_hi, hi = _kv_tile(t, pid, nprog, per, n_kt,
                                                                                   nheads // group, CU_Q, CU_K,
                                                                                   seqlen_q, seqlen_k, left, right,
                                                                                   NC * 64, BLOCK_M, IS_VARLEN)
            if ok:
                if lo < hi:
                    _kv_consume_tile(W, k_smem, v_smem, ds_smem, dq_smem, q_smem, do_smem, l_smem, d_smem, kv_bar,
                                     kv_empty, ready, empty, ds_full, ds_free, DQ, dqa_desc, dk_desc, dv_desc,
                                     kvo_smem, DK, DV, stride_dqb, stride_dqm, stride_dqh, stride_dkb, stride_dkn,
                                     stride_dkh, stride_dvb, stride_dvn, stride_dvh, tbase, tk, b, bq, q0, k0, kvh, n0,
                                     lo, full_lo, full_hi, hi, group, Sk, Sk - Sq, left, right, qk_scale, ds_scale,
                                     BLOCK_M, HEAD_DIM, STAGES, DO_DQ, SHARED_DQ, NC, PART, IS_VARLEN, KV_SLOTS,
                                     KV_OUT)
                    tbase += group * gl.cdiv(hi - lo, BLOCK_M)
                    tk += 1
                else:   # no query sees these keys: dK = dV = 0
                    z_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
                    zero = gl.zeros([64, HEAD_DIM], DK.dtype.element_ty, z_layout)
                    _store_kv_rows(DK, DV, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, bq,
                                   kvh, k0, n0 + W * 64, Sk, zero, zero, z_layout, HEAD_DIM, PART)
        if (DO_DQ >= 5) | (KV_OUT > 0):
            tma.store_wait(0)   # the last reduce or store reads shared memory, which must outlive it

    @gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window_left", "window_right", "group", "nheads", "n_kt",
                                  "n_units", "per"])
    def _bwd_kernel(q_desc, k_desc, v_desc, do_desc, l_desc, d_desc, dqa_desc, dk_desc, dv_desc, DQ, DK, DV, CU_Q,
                    CU_K, stride_dqb,
                    stride_dqm, stride_dqh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
                    seqlen_q, seqlen_k, window_left, window_right, qk_scale, ds_scale, group, nheads, n_kt, n_units,
                    per,
                    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                    NC: gl.constexpr, DO_DQ: gl.constexpr, SHARED_DQ: gl.constexpr, IS_VARLEN: gl.constexpr,
                    PART: gl.constexpr = 0, KV_SLOTS: gl.constexpr = 1, KV_OUT: gl.constexpr = 0):
        # Grid: (programs,), persistent or one program a unit of `per` key tiles of 64·NC keys (`_kv_tile`). Warps: the
        # producer (num_warps=4) + NC 4-warp consumers.
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, 1, HEAD_DIM], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, 1, HEAD_DIM], do_desc.layout)
        # K/V_SLOTS slots of the tile's keys, NC 64-row buffers each (two: the next tile's load under this one)
        k_smem = gl.allocate_shared_memory(dtype, [KV_SLOTS * NC, 1, 64, 1, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [KV_SLOTS * NC, 1, 64, 1, HEAD_DIM], v_desc.layout)
        DS_SWIZZLE: gl.constexpr = 128 if BLOCK_M >= 64 else 2 * BLOCK_M   # a row of dSᵀ is BLOCK_M 16-bit values
        ds_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=DS_SWIZZLE, element_bitwidth=16, rank=2)
        ds_smem = gl.allocate_shared_memory(dtype, [NC, 64, BLOCK_M], ds_layout)
        if DO_DQ >= 5:   # tiles for the TMA reduce, in its descriptor's layout
            dq_smem = gl.allocate_shared_memory(gl.float32, [NC if SHARED_DQ and DO_DQ == 5 else 2 * NC, 1, BLOCK_M,
                                                             1, 64], dqa_desc.layout)
        elif DO_DQ == 0:   # no dQ here (its own pass): no buffer (`_step` reads none)
            dq_smem = ds_smem
        else:
            dq_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0])
            dq_smem = gl.allocate_shared_memory(gl.float32, [NC if SHARED_DQ else 2 * NC, BLOCK_M, 64], dq_layout)
        if KV_OUT == 1:   # dK's and dV's own buffers for their TMA stores, two a consumer
            kvo_smem = gl.allocate_shared_memory(dtype, [2 * NC, 1, 64, 1, HEAD_DIM], dk_desc.layout)
        elif KV_OUT == 3:   # the same bytes as the dQ tiles (consumer W's two: 2 W, 2 W + 1), free at a tile's end
            if _NEW_REINTERPRET:
                kvo_smem = dq_smem.reinterpret(dtype, [2 * NC, 1, 64, 1, HEAD_DIM], dk_desc.layout)
            else:
                kvo_smem = dq_smem._reinterpret(dtype, [2 * NC, 1, 64, 1, HEAD_DIM], dk_desc.layout)
        else:
            kvo_smem = k_smem   # not written (KV_OUT 2 stores through the consumer's K and V slices)
        l_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BLOCK_M], l_desc.layout)
        d_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BLOCK_M], d_desc.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [KV_SLOTS, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [KV_SLOTS, 1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ds_full = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ds_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(KV_SLOTS):
            mbarrier.init(kv_bar.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=NC)
        mbarrier.init(ds_full, count=NC)
        mbarrier.init(ds_free, count=NC)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=NC)   # one arrive per consumer warpgroup
        left = window_left
        right = window_right
        # two consumers (the plans' NC; a third would leave each too few registers for dK and dV)
        gl.warp_specialize([
            (_producer, (q_desc, do_desc, k_desc, v_desc, l_desc, d_desc, q_smem, do_smem, k_smem, v_smem, l_smem,
                         d_smem, kv_bar, kv_empty, ready, empty, CU_Q, CU_K, seqlen_q, seqlen_k, left, right, group,
                         nheads, n_kt, n_units, per, pid, nprog, BLOCK_M, HEAD_DIM, STAGES, NC, IS_VARLEN, KV_SLOTS)),
            (_consumer, (0, k_smem, v_smem, ds_smem, dq_smem, q_smem, do_smem, l_smem, d_smem, kv_bar, kv_empty, ready,
                         empty, ds_full, ds_free, DQ, dqa_desc, dk_desc, dv_desc, kvo_smem, DK, DV, stride_dqb,
                         stride_dqm, stride_dqh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
                         CU_Q, CU_K, seqlen_q, seqlen_k, left, right, group, nheads, n_kt, n_units, per, pid, nprog,
                         qk_scale, ds_scale, BLOCK_M, HEAD_DIM, STAGES, DO_DQ, SHARED_DQ, NC, PART, IS_VARLEN,
                         KV_SLOTS, KV_OUT)),
            (_consumer, (1, k_smem, v_smem, ds_smem, dq_smem, q_smem, do_smem, l_smem, d_smem, kv_bar, kv_empty, ready,
                         empty, ds_full, ds_free, DQ, dqa_desc, dk_desc, dv_desc, kvo_smem, DK, DV, stride_dqb,
                         stride_dqm, stride_dqh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
                         CU_Q, CU_K, seqlen_q, seqlen_k, left, right, group, nheads, n_kt, n_units, per, pid, nprog,
                         qk_scale, ds_scale, BLOCK_M, HEAD_DIM, STAGES, DO_DQ, SHARED_DQ, NC, PART, IS_VARLEN,
                         KV_SLOTS, KV_OUT)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])

    # ---- dQ in a pass of its own (deterministic): one program per 64·NC query rows, K and V streamed ----

    @gluon.jit
    def _dq_producer(q_desc, do_desc, o_desc, k_desc, v_desc, q_smem, do_smem, o_smem, k_smem, v_smem, q_bar, q_empty,
                     ready, empty, CU_Q, CU_K, seqlen_q, seqlen_k, left, right, group, n_mt, n_heads, n_units, per,
                     pid, nprog, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                     NC: gl.constexpr, IS_VARLEN: gl.constexpr, PREP: gl.constexpr):
        """For each tile of this program (the forward's `_tile` order) that sees a key: Q and dO (and, PREP 2, O) once
        (a 64-row slice per consumer) after the consumers have released the previous tile's (`q_empty`), then K and V
        block by block into a ring whose count runs on across tiles."""
        base = 0
        tq = 0
        for i in range(per * gl.cdiv(n_units - pid, nprog)):
            ok, _, h, kvh, m0, bq, q0, k0, _, _, _, lo, _, _, hi = _tile(i, pid, nprog, per, n_mt, n_heads, group, CU_Q,
                                                                         CU_K, seqlen_q, seqlen_k, left, right, 0, 0,
                                                                         NC * 64, BLOCK_N, IS_VARLEN)
            if ok & (lo < hi):
                if PREP == 2:   # O too, on the same barrier
                    _load_tile_pair(q_desc, do_desc, bq, q0 + m0, h, q_bar, q_empty, tq, q_smem, do_smem, 0, HEAD_DIM,
                                    NC, o_desc, o_smem)
                else:
                    _load_tile_pair(q_desc, do_desc, bq, q0 + m0, h, q_bar, q_empty, tq, q_smem, do_smem, 0, HEAD_DIM,
                                    NC)
                n = gl.cdiv(hi - lo, BLOCK_N)
                for it in range(n):
                    g = base + it
                    s = g % STAGES
                    mbarrier.wait(empty.index(s), ((g // STAGES) & 1) ^ 1)
                    mbarrier.expect(ready.index(s), 2 * BLOCK_N * HEAD_DIM * 2)
                    start = lo + it * BLOCK_N
                    _tma_load(k_desc, [bq, k0 + start, kvh, 0], ready.index(s), k_smem.index(s))
                    _tma_load(v_desc, [bq, k0 + start, kvh, 0], ready.index(s), v_smem.index(s))
                base += n
                tq += 1

    @gluon.jit
    def _dq_step(start_n, lo, base, dq, qw, dow, k_smem, v_smem, ready, empty, lse, delta, offs_m, offs_n, Sk, diag,
                 left, right, qk_scale, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                 s_layout: gl.constexpr, a_layout: gl.constexpr, MASKED: gl.constexpr):
        """dQ += dS_j K_j for key block start_n: S = Q K_jᵀ and dP = dO V_jᵀ in flight together, P's exponent under
        the second, dS = P ∘ (dP - Delta) as the A operand from registers; the slot is released once dQ's product
        is done. `base`: the ring's count at the tile's first block."""
        it = base + (start_n - lo) // BLOCK_N
        s = it % STAGES
        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
        ks = k_smem.index(s).reshape([BLOCK_N, HEAD_DIM])
        vs = v_smem.index(s).reshape([BLOCK_N, HEAD_DIM])
        zero = gl.zeros([64, BLOCK_N], gl.float32, s_layout)
        s_tok = warpgroup_mma(qw, ks.permute((1, 0)), zero, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(dow, vs.permute((1, 0)), zero, use_acc=False, is_async=True)
        qk = warpgroup_mma_wait(1, deps=[s_tok])
        p = gl.exp2(qk * qk_scale - gl.expand_dims(lse, 1))
        if MASKED:
            p = gl.where(_visible(offs_m, start_n + offs_n, diag, left, right, Sk), p, 0.0)
        dp = warpgroup_mma_wait(0, deps=[dp_tok])
        ds = gl.convert_layout((p * (dp - gl.expand_dims(delta, 1))).to(qw.dtype), a_layout)
        dq_tok = warpgroup_mma(ds, ks, dq, is_async=True)
        dq, ds = warpgroup_mma_wait(0, deps=[dq_tok, ds])
        mbarrier.arrive(empty.index(s), count=1)
        return dq

    @gluon.jit
    def _dq_step_pipe(start_n, lo, base, dq, ds_prev, qw, dow, k_smem, v_smem, ready, empty, lse, delta, offs_m, offs_n,
                      Sk, diag, left, right, qk_scale, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                      STAGES: gl.constexpr, s_layout: gl.constexpr, a_layout: gl.constexpr, MASKED: gl.constexpr):
        """Key block start_n (not the first) with the previous block's dQ product one step late: S_j and dP_j are
        issued, then dQ += dS_{j-1} K_{j-1}; P_j's exponent and dS_j run while the tensor cores do dP_j and that
        product; the previous slot is released once it is done (the forward's overlap, v3_gluon.py)."""
        it = base + (start_n - lo) // BLOCK_N
        s = it % STAGES
        sp = (it - 1) % STAGES
        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
        ks = k_smem.index(s).reshape([BLOCK_N, HEAD_DIM])
        vs = v_smem.index(s).reshape([BLOCK_N, HEAD_DIM])
        zero = gl.zeros([64, BLOCK_N], gl.float32, s_layout)
        s_tok = warpgroup_mma(qw, ks.permute((1, 0)), zero, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(dow, vs.permute((1, 0)), zero, use_acc=False, is_async=True)
        dq_tok = warpgroup_mma(ds_prev, k_smem.index(sp).reshape([BLOCK_N, HEAD_DIM]), dq, is_async=True)
        qk = warpgroup_mma_wait(2, deps=[s_tok])
        p = gl.exp2(qk * qk_scale - gl.expand_dims(lse, 1))
        if MASKED:
            p = gl.where(_visible(offs_m, start_n + offs_n, diag, left, right, Sk), p, 0.0)
        dp = warpgroup_mma_wait(1, deps=[dp_tok])
        ds = (p * (dp - gl.expand_dims(delta, 1))).to(qw.dtype)
        dq, ds_prev = warpgroup_mma_wait(0, deps=[dq_tok, ds_prev])
        mbarrier.arrive(empty.index(sp), count=1)
        return dq, gl.convert_layout(ds, a_layout)

    @gluon.jit
    def _prep_rows(O, LSE, LSE2, DELTA, pbase, stride_ob, stride_om, stride_oh, stride_lb, stride_lh, b, q0, h, r0, Sq,
                   dow, ow, q_bar, tq, row_layout: gl.constexpr, HEAD_DIM: gl.constexpr, PREP: gl.constexpr):
        """`_prep_kernel`'s work for rows r0 ... r0 + 63 of one (sequence, head), in the dQ pass (which then runs
        before the dK/dV pass): lse in log2 units and Delta = rowsum(O ∘ dO), dO from the tile's shared buffer once
        Q and dO have landed (`q_bar`, waited here), O from shared memory too (PREP 2: `ow`, loaded with them) or
        from memory (PREP 1: loads issued before the wait; at d256 half after it), lse from memory; both written to
        the padded rows the dK/dV pass reads (+inf and 0 past the sequence). Returns (lse, Delta) in `row_layout`."""
        o_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        rows = r0 + gl.arange(0, 64, layout=row_layout)
        lse = gl.load(LSE + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + q0 + rows, mask=rows < Sq,
                      other=float("inf")) * 1.4426950408889634
        ro = r0 + gl.arange(0, 64, layout=gl.SliceLayout(1, o_layout))
        if PREP == 2:
            mbarrier.wait(q_bar, tq & 1)
            acc = gl.zeros([64], gl.float32, gl.SliceLayout(1, o_layout))
            for c in gl.static_range(HEAD_DIM // 64):
                acc += gl.sum(ow.slice(c * 64, 64, dim=1).load(o_layout).to(gl.float32)
                              * dow.slice(c * 64, 64, dim=1).load(o_layout).to(gl.float32), 1)
            acc = gl.where(ro < Sq, acc, 0.0)   # packed: the rows past the sequence are the next one's
        else:
            optr = (O + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
                    + gl.expand_dims((q0 + ro).to(gl.int64) * stride_om, 1)
                    + gl.expand_dims(gl.arange(0, 64, layout=gl.SliceLayout(0, o_layout)), 0))
            ok = gl.expand_dims(ro < Sq, 1)   # packed: the rows past the sequence are the next one's (dO's too)
            o0 = gl.load(optr, mask=ok, other=0.0)
            if HEAD_DIM >= 128:
                o1 = gl.load(optr + 64, mask=ok, other=0.0)
            mbarrier.wait(q_bar, tq & 1)
            acc = gl.sum(o0.to(gl.float32) * dow.slice(0, 64, dim=1).load(o_layout).to(gl.float32), 1)
            if HEAD_DIM >= 128:
                acc += gl.sum(o1.to(gl.float32) * dow.slice(64, 64, dim=1).load(o_layout).to(gl.float32), 1)
            if HEAD_DIM == 256:   # the last two 64-column parts after the wait: dQ's 128 registers a thread are live
                for c in gl.static_range(2, 4):
                    oc = gl.load(optr + c * 64, mask=ok, other=0.0)
                    acc += gl.sum(oc.to(gl.float32) * dow.slice(c * 64, 64, dim=1).load(o_layout).to(gl.float32), 1)
        delta = gl.convert_layout(acc, row_layout)
        gl.store(LSE2 + pbase + rows, lse)
        gl.store(DELTA + pbase + rows, delta)
        return lse, delta

    @gluon.jit
    def _prep_none(LSE2, DELTA, pbase, r0, row_layout: gl.constexpr):
        """Rows r0 ... r0 + 63 of a tile that sees no key, for the dK/dV pass: lse +inf and Delta 0 (P = 0), as
        `_prep_kernel` writes them."""
        rows = r0 + gl.arange(0, 64, layout=row_layout)
        gl.store(LSE2 + pbase + rows, gl.full([64], float("inf"), gl.float32, row_layout))
        gl.store(DELTA + pbase + rows, gl.zeros([64], gl.float32, row_layout))

    @gluon.jit
    def _dq_tile(W: gl.constexpr, dq_desc, dq_buf, DQ, stride_qm, stride_qh, q_smem, do_smem, o_smem, k_smem, v_smem,
                 q_bar, q_empty, ready, empty, LSE2, DELTA, stride_pb, stride_ph, O, LSE, stride_ob, stride_om,
                 stride_oh, stride_lb, stride_lh, base, tq, b, bq, q0, h, m0, lo, full_lo, full_hi, hi, Sq, Sk, diag,
                 left, right, qk_scale, ds_scale, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                 IS_VARLEN: gl.constexpr, PIPE: gl.constexpr, DQ_BUF: gl.constexpr, PREP: gl.constexpr):
        """Consumer warpgroup W on one tile that sees a key: dQ of rows m0 + 64·W ... over v2's three key ranges,
        stored once. PIPE: each block's dQ product one step late (`_dq_step_pipe`), the first block peeled (always
        masked: it may be an edge). Q's and dO's buffers go back to the producer after the last block, unless dQ
        leaves through Q's (dense without DQ_BUF: after the store). PREP: the rows' lse and Delta are worked out
        here (`_prep_rows`) and written for the dK/dV pass that follows, instead of read from `_prep_kernel`'s."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        r0 = m0 + W * 64
        offs_m = r0 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        pbase = b.to(gl.int64) * stride_pb + h.to(gl.int64) * stride_ph
        qw = q_smem.index(W).reshape([64, HEAD_DIM])
        dow = do_smem.index(W).reshape([64, HEAD_DIM])
        if PREP > 0:
            lse, delta = _prep_rows(O, LSE, LSE2, DELTA, pbase, stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
                                    b, q0, h, r0, Sq, dow, o_smem.index(W).reshape([64, HEAD_DIM]), q_bar, tq,
                                    gl.SliceLayout(1, s_layout), HEAD_DIM, PREP)
        else:
            lse = gl.load(LSE2 + pbase + offs_m)     # padded: +inf and 0 past the sequence
            delta = gl.load(DELTA + pbase + offs_m)
            mbarrier.wait(q_bar, tq & 1)
        dq = gl.zeros([64, HEAD_DIM], gl.float32, acc_layout)
        if PIPE:
            s0 = base % STAGES
            mbarrier.wait(ready.index(s0), (base // STAGES) & 1)
            zero = gl.zeros([64, BLOCK_N], gl.float32, s_layout)
            ks = k_smem.index(s0).reshape([BLOCK_N, HEAD_DIM])
            s_tok = warpgroup_mma(qw, ks.permute((1, 0)), zero, use_acc=False, is_async=True)
            dp_tok = warpgroup_mma(dow, v_smem.index(s0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zero,
                                   use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(1, deps=[s_tok])
            p = gl.where(_visible(offs_m, lo + offs_n, diag, left, right, Sk),
                         gl.exp2(qk * qk_scale - gl.expand_dims(lse, 1)), 0.0)
            dp = warpgroup_mma_wait(0, deps=[dp_tok])
            ds_prev = gl.convert_layout((p * (dp - gl.expand_dims(delta, 1))).to(qw.dtype), a_layout)
            nxt = lo + BLOCK_N
            for start_n in range(nxt, gl.maximum(full_lo, nxt), BLOCK_N):
                dq, ds_prev = _dq_step_pipe(start_n, lo, base, dq, ds_prev, qw, dow, k_smem, v_smem, ready, empty,
                                            lse, delta, offs_m, offs_n, Sk, diag, left, right, qk_scale, BLOCK_N,
                                            HEAD_DIM, STAGES, s_layout, a_layout, True)
            for start_n in range(gl.maximum(full_lo, nxt), gl.maximum(full_hi, nxt), BLOCK_N):
                dq, ds_prev = _dq_step_pipe(start_n, lo, base, dq, ds_prev, qw, dow, k_smem, v_smem, ready, empty,
                                            lse, delta, offs_m, offs_n, Sk, diag, left, right, qk_scale, BLOCK_N,
                                            HEAD_DIM, STAGES, s_layout, a_layout, False)
            for start_n in range(gl.maximum(full_hi, nxt), hi, BLOCK_N):
                dq, ds_prev = _dq_step_pipe(start_n, lo, base, dq, ds_prev, qw, dow, k_smem, v_smem, ready, empty,
                                            lse, delta, offs_m, offs_n, Sk, diag, left, right, qk_scale, BLOCK_N,
                                            HEAD_DIM, STAGES, s_layout, a_layout, True)
            if DQ_BUF or IS_VARLEN:   # every product reading Q and dO has been waited for
                mbarrier.arrive(q_empty, count=1)
            last = base + (hi - 1 - lo) // BLOCK_N
            sl = last % STAGES
            dq_tok = warpgroup_mma(ds_prev, k_smem.index(sl).reshape([BLOCK_N, HEAD_DIM]), dq, is_async=True)
            dq, ds_prev = warpgroup_mma_wait(0, deps=[dq_tok, ds_prev])
            mbarrier.arrive(empty.index(sl), count=1)
        else:
            for start_n in range(lo, full_lo, BLOCK_N):
                dq = _dq_step(start_n, lo, base, dq, qw, dow, k_smem, v_smem, ready, empty, lse, delta, offs_m, offs_n,
                              Sk, diag, left, right, qk_scale, BLOCK_N, HEAD_DIM, STAGES, s_layout, a_layout, True)
            for start_n in range(full_lo, full_hi, BLOCK_N):
                dq = _dq_step(start_n, lo, base, dq, qw, dow, k_smem, v_smem, ready, empty, lse, delta, offs_m, offs_n,
                              Sk, diag, left, right, qk_scale, BLOCK_N, HEAD_DIM, STAGES, s_layout, a_layout, False)
            for start_n in range(full_hi, hi, BLOCK_N):
                dq = _dq_step(start_n, lo, base, dq, qw, dow, k_smem, v_smem, ready, empty, lse, delta, offs_m, offs_n,
                              Sk, diag, left, right, qk_scale, BLOCK_N, HEAD_DIM, STAGES, s_layout, a_layout, True)
            if DQ_BUF or IS_VARLEN:
                mbarrier.arrive(q_empty, count=1)
        dq = (dq * ds_scale).to(qw.dtype)
        _store_rows(dq, W, dq_desc, dq_buf, q_smem, W, q_empty, DQ, stride_qm, stride_qh, bq, q0, h, r0, Sq,
                    acc_layout, 64, HEAD_DIM, IS_VARLEN, DQ_BUF)

    @gluon.jit
    def _dq_consumer(W: gl.constexpr, dq_desc, dq_buf, DQ, stride_qb, stride_qm, stride_qh, q_smem, do_smem, o_smem,
                     k_smem, v_smem, q_bar, q_empty, ready, empty, LSE2, DELTA, stride_pb, stride_ph, O, LSE, stride_ob,
                     stride_om, stride_oh, stride_lb, stride_lh, CU_Q, CU_K, seqlen_q, seqlen_k, left, right, group,
                     n_mt, n_heads, n_units, per, pid, nprog, qk_scale, ds_scale, BLOCK_N: gl.constexpr,
                     HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, NC: gl.constexpr, IS_VARLEN: gl.constexpr,
                     PIPE: gl.constexpr, DQ_BUF: gl.constexpr, PREP: gl.constexpr):
        """Consumer warpgroup W over this program's tiles (the producer's order and ring count); a tile that sees no
        key gets dQ = 0 by masked stores (and, with PREP, lse +inf and Delta 0)."""
        base = 0
        tq = 0
        for i in range(per * gl.cdiv(n_units - pid, nprog)):
            ok, b, h, _, m0, bq, q0, _, Sq, Sk, diag, lo, full_lo, full_hi, hi = _tile(i, pid, nprog, per, n_mt,
                                                                                       n_heads, group, CU_Q, CU_K,
                                                                                       seqlen_q, seqlen_k, left, right,
                                                                                       0, 0, NC * 64, BLOCK_N,
                                                                                       IS_VARLEN)
            if ok:
                if lo < hi:
                    _dq_tile(W, dq_desc, dq_buf, DQ, stride_qm, stride_qh, q_smem, do_smem, o_smem, k_smem, v_smem,
                             q_bar, q_empty, ready, empty, LSE2, DELTA, stride_pb, stride_ph, O, LSE, stride_ob,
                             stride_om, stride_oh, stride_lb, stride_lh, base, tq, b, bq, q0, h, m0, lo, full_lo,
                             full_hi, hi, Sq, Sk, diag, left, right, qk_scale, ds_scale, BLOCK_N, HEAD_DIM, STAGES,
                             IS_VARLEN, PIPE, DQ_BUF, PREP)
                    base += gl.cdiv(hi - lo, BLOCK_N)
                    tq += 1
                else:   # no key visible from any row of this tile: dQ = 0
                    _store_zero_rows(DQ, stride_qb, stride_qm, stride_qh, b, q0, h, m0 + W * 64, Sq, 64, HEAD_DIM)
                    if PREP > 0:
                        _prep_none(LSE2, DELTA, b.to(gl.int64) * stride_pb + h.to(gl.int64) * stride_ph,
                                   m0 + W * 64, gl.BlockedLayout([1], [32], [4], [0]))
        if DQ_BUF:
            tma.store_wait(0)   # the last tile's store reads the buffer: shared memory must outlive it

    @gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window_left", "window_right", "group", "n_mt", "n_units",
                                  "per"])
    def _dq_kernel(q_desc, k_desc, v_desc, do_desc, dq_desc, o_desc, DQ, CU_Q, CU_K, stride_qb, stride_qm, stride_qh,
                   LSE2, DELTA, stride_pb, stride_ph, O, LSE, stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
                   seqlen_q, seqlen_k, window_left, window_right, qk_scale, ds_scale, group, n_mt, n_heads, n_units,
                   per, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   CONSUMER_REGS: gl.constexpr, NC: gl.constexpr, IS_VARLEN: gl.constexpr, PIPE: gl.constexpr = False,
                   DQ_BUF: gl.constexpr = False, PREP: gl.constexpr = 0):
        # Grid: (programs,), persistent or one program a unit of `per` row tiles, as the forward's (v3_gluon._tile).
        # Warps: the producer (num_warps=4) + NC 4-warp consumers of 64 query rows each. DQ_BUF: dense dQ leaves
        # through a shared buffer of its own, so that the next tile's Q and dO load under this one's last product.
        # PREP: lse (log2 units) and Delta are worked out from O, dO and the forward's LSE here and written to LSE2
        # and DELTA for the dK/dV pass, which then runs second (no `_prep_kernel`); 2: O loaded by the producer with Q
        # and dO (o_desc), 1: by the consumers' loads (d256: no room in shared memory); 0: read from LSE2 and DELTA.
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [NC, 1, 64, 1, HEAD_DIM], q_desc.layout)
        if DQ_BUF:
            dq_buf = gl.allocate_shared_memory(dtype, [NC, 1, 64, 1, HEAD_DIM], dq_desc.layout)
        else:
            dq_buf = q_smem
        do_smem = gl.allocate_shared_memory(dtype, [NC, 1, 64, 1, HEAD_DIM], do_desc.layout)
        if PREP == 2:
            o_smem = gl.allocate_shared_memory(dtype, [NC, 1, 64, 1, HEAD_DIM], o_desc.layout)
        else:
            o_smem = do_smem   # not read
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, 1, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, 1, HEAD_DIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(q_empty, count=NC)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=NC)
        left = window_left
        right = window_right
        # two consumers (three, at 160 registers, measured within noise: results/2026-11-26-h100-sweep-gluon-bwd-6)
        gl.warp_specialize([
            (_dq_producer, (q_desc, do_desc, o_desc, k_desc, v_desc, q_smem, do_smem, o_smem, k_smem, v_smem, q_bar,
                            q_empty, ready, empty, CU_Q, CU_K, seqlen_q, seqlen_k, left, right, group, n_mt, n_heads,
                            n_units, per, pid, nprog, BLOCK_N, HEAD_DIM, STAGES, NC, IS_VARLEN, PREP)),
            (_dq_consumer, (0, dq_desc, dq_buf, DQ, stride_qb, stride_qm, stride_qh, q_smem, do_smem, o_smem,
                            k_smem, v_smem, q_bar, q_empty, ready, empty, LSE2, DELTA, stride_pb, stride_ph, O, LSE,
                            stride_ob, stride_om, stride_oh, stride_lb, stride_lh, CU_Q, CU_K, seqlen_q, seqlen_k, left,
                            right, group, n_mt, n_heads, n_units, per, pid, nprog, qk_scale, ds_scale, BLOCK_N,
                            HEAD_DIM, STAGES, NC, IS_VARLEN, PIPE, DQ_BUF, PREP)),
            (_dq_consumer, (1, dq_desc, dq_buf, DQ, stride_qb, stride_qm, stride_qh, q_smem, do_smem, o_smem,
                            k_smem, v_smem, q_bar, q_empty, ready, empty, LSE2, DELTA, stride_pb, stride_ph, O, LSE,
                            stride_ob, stride_om, stride_oh, stride_lb, stride_lh, CU_Q, CU_K, seqlen_q, seqlen_k, left,
                            right, group, n_mt, n_heads, n_units, per, pid, nprog, qk_scale, ds_scale, BLOCK_N,
                            HEAD_DIM, STAGES, NC, IS_VARLEN, PIPE, DQ_BUF, PREP)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])

# Launch plans of the dK/dV kernel: (BLOCK_M query rows per step, STAGES of the Q/dO ring, consumer registers, NC
# consumers of 64 keys, shared dQ, dQ mode). dQ mode (`backward`'s _dq): 0 a pass of its own (`_dq_kernel`, plan
# `_DQ_PLANS`: deterministic); in the same pass, summed into a float32 accumulator across programs: 1 red.v4 through
# shared memory, 2 red.v2 from the wgmma registers, 5 the TMA unit's reduce from a shared tile, 6 the same from two
# tiles a consumer in turn. Shared dQ: the program's dQ tile summed over its 64·NC keys in shared memory first,
# consumer W taking head-dim columns [64 W, 64 W + 64) (needs HEAD_DIM = 64·NC); else each consumer adds its own 64
# keys' part. Measured on the H100 (benchmarks/sweep_gluon_bwd.py): with red, the atomics' traffic bounded the single
# pass at 0.77-0.81x cuDNN's backward at d128, below the two passes (results/2026-11-26-h100-sweep-gluon-bwd-3.md);
# with the TMA reduce and a shared tile (mode 6) it ran at 0.94-1.04x, the two passes at 0.88-0.92x in the same
# processes (results/2026-11-27-h100-sweep-bwd-tma-2.md); own tiles a consumer (twice the traffic) 0.79-0.82x. At d64
# the tile has one 64-column part, which the consumers take in turn (a step each): 0.93-1.08x against the two
# passes' 0.88-0.96x (own tiles: 0.83-0.93x; results/2026-11-27-h100-sweep-bwd-tma-3.md). d256 runs two passes.
_PLANS = {64: (64, 2, 240, 2, True, 6), 128: (64, 2, 240, 2, True, 6), 256: (32, 2, 240, 2, False, 0)}
# the dQ pass: (BLOCK_N keys per step, STAGES of the K/V ring, consumer registers, NC consumers of 64 query rows,
# PIPE: each block's dQ product one step late, under the next block's exponent; measured within noise, -9% to +5%
# against without, results/2026-11-26-h100-sweep-gluon-bwd-8.md: off)
# (both kernels run NC = 2: the plan field says so)
_DQ_PLANS = {64: (128, 2, 240, 2, False), 128: (64, 3, 240, 2, False), 256: (32, 2, 240, 2, False)}
# Persistent passes (the forward's schedule, v3_gluon.schedule, which also reads HF_FLASHATTN_V3_PERSISTENT): one
# program an SM over units of tiles; False: one program a unit. dQ leaves the dQ pass through a shared buffer of its
# own up to head dim DQ_BUF_MAX_D (d256: through Q's, shared memory holds no other).
PERSISTENT = True
DQ_BUF_MAX_D = 128
# Two passes (dQ mode 0): the dQ pass runs first and works out each row's lse (log2 units) and Delta = rowsum(O ∘ dO)
# itself (O by TMA with Q and dO at d64/d128, PREP 2), writing them for the dK/dV pass, instead of `_prep_kernel`
# reading O and dO in a launch of its own before both (50 us of a 937 us backward at d128 1k on the H100, where cuDNN's
# own dO·O kernel takes 93: results/2026-11-27-h100-bwd-parts.md). Measured against the prep kernel in one process
# (results/2026-11-27-h100-bwd-parts-prep-tma.md, 1k): the dQ pass + prep 334 / 232 us against 379 / 256 at d128
# (unmasked / causal), 404 / 296 against 438 / 314 at d64, 400 / 265 against 419 / 282 at d256 (pointer loads of O,
# PREP 1). False: the prep kernel, then dK/dV, then dQ.
FUSED_PREP = True
# The dK/dV pass's K/V slots (`_bwd_kernel`'s KV_SLOTS; two: the next tile's K and V load under this tile's last
# steps, where shared memory holds them) and how it stores dK and dV (KV_OUT; packed batches take masked stores for a
# sequence's last keys): 0 masked stores from the registers; 1 TMA stores through buffers of their own (where shared
# memory holds them, else 2); 2 TMA stores through the consumer's own K and V buffers, handed back to the producer once
# the stores have read them (no shared memory of their own).
# Why: the fifteenth session's tile-cost probe (results/2026-11-27-h100-bwd-parts-fused-prep.md) fitted the dK/dV pass
# at 1k-4k queries a tile to 8-10 us a tile beside 1.6 us a step at d128, the dQ pass to 3.7 us a tile; the dK/dV pass
# wrote twice the dQ pass's rows a tile by 64 scattered 4-byte stores a thread, the dQ pass by a TMA store. Two slots
# alone measured -5% to +7.5% (results/2026-11-27-h100-bwd-parts-kv-slots.md). Measured in one process, `_bwd_kernel`'s
# median device time over 7 rounds against one slot and masked stores (results/2026-11-27-h100-kv-out.md):
#   two passes, d128 1k: one slot + own buffers 0.887 / 0.793 (unmasked / causal), 2k causal 0.877; two slots +
#     through K/V 0.937 / 0.897; two slots alone 1.027 / 1.003;
#   two passes, d64 1k: two slots + through K/V 0.883 / 0.859; one slot + own buffers 0.941 / 0.993;
#   single pass, 4k: d64 own buffers 0.983, two slots 1.050; d128 (no room for own buffers) through K/V 1.025, own
#     slot and masked stores kept;
#   d256 (two passes, dV and dK in launches of their own; no room for own buffers) through K/V 0.927 / 0.901 at 1k;
#   packed, 16 sequences of 1024, 987, ... tokens: d128 0.882 / 0.865, d64 causal 0.875 (results/2026-11-27-h100-
#     kv-out-2.md);
#   d128's single pass through its dQ tiles (KV_OUT 3, waits for the tile's last reduces and for the stores' reads
#     exposed): 1.045 at 4k, 1.011 4k causal, 1.056 16k causal, packed 4k 1.037 (kv-out-4.md): an option, off.
# (head dim, dQ in its own pass) -> (K/V slots, KV_OUT); packed batches as dense ones
_KV_PLANS = {(64, True): (2, 2), (128, True): (1, 1), (64, False): (1, 1), (128, False): (1, 0), (256, True): (1, 2)}
MAX_KV_SLOTS = None   # None: _KV_PLANS'; 1 or 2 forces the count where shared memory holds it (probes)
KV_OUT = None         # None: _KV_PLANS'; 0, 1 or 2 forces it where the kernel can take it (probes)
_SMEM_LIMIT = 232448 - 1024   # the H100's shared memory per block, less the barriers' and alignment's share


def kv_slots_for(D: int, do_dq: int) -> int:
    """K/V slots of the dK/dV pass (`_bwd_kernel`'s KV_SLOTS): `_KV_PLANS`' (or MAX_KV_SLOTS), two only where shared
    memory holds them: d64 (every dQ mode: 176 KB with the single pass's dQ tiles) and d128 with dQ in its own pass
    (209 KB; the single pass's 64 KB of dQ tiles would take it to 273 KB, past the 227 KB a block may have)."""
    n = _KV_PLANS.get((D, do_dq == 0), (1, 0))[0] if MAX_KV_SLOTS is None else MAX_KV_SLOTS
    return min(n, 2 if D == 64 or (D == 128 and do_dq == 0) else 1)


def bwd_smem(D: int, bm: int, stages: int, nc: int, do_dq: int, shared: bool, kv_slots: int, kv_out: int) -> int:
    """Bytes of shared memory `_bwd_kernel` allocates at most for a plan (16-bit inputs), barriers aside."""
    n = 2 * stages * bm * D * 2 + 2 * kv_slots * nc * 64 * D * 2 + nc * 64 * bm * 2 + 2 * stages * bm * 4
    if do_dq in _SUMMED:
        n += (nc if shared and do_dq == 5 else 2 * nc) * bm * 64 * 4
    if kv_out == 1:
        n += 2 * nc * 64 * D * 2
    return n


def kv_out_for(D: int, plan_: tuple, do_dq: int, varlen: bool, kv_slots: int) -> int:
    """`_bwd_kernel`'s KV_OUT for a launch: `_KV_PLANS`' (or KV_OUT); own buffers (1) only where shared memory holds
    them, else through the K/V buffers (2); through the dQ tiles (3) only with the TMA reduce's two tiles a consumer
    (as many bytes as its dK and dV at d128, 64-row steps), else 2. Packed batches too: a consumer's keys that reach
    past the sequence take masked stores (`_kv_consume_tile`)."""
    want = _KV_PLANS.get((D, do_dq == 0), (1, 0))[1] if KV_OUT is None else KV_OUT
    bm, stages, _, nc, shared, _ = plan_
    if want == 1 and bwd_smem(D, bm, stages, nc, do_dq, shared, kv_slots, 1) > _SMEM_LIMIT:
        return 2
    two_tiles = do_dq == 6 or (do_dq == 5 and not shared)   # the TMA reduce's tiles: two a consumer
    if want == 3 and not (two_tiles and bm * 64 * 4 >= 64 * D * 2):
        return 2
    return want


# The single pass from this many keys visible to a query row on average (`visible_keys`); below, the two passes. The
# single pass's float32 dQ accumulator (zero fill, the reduce's traffic, the cast) costs per query row, its saved
# matmuls per visible key. Measured on the H100, ÷ cuDNN's backward, two passes against single: 1k d128 0.95-0.97
# against 0.90-0.94 unmasked, 0.94 against 0.82-0.86 causal, d64 within noise (results/2026-11-27-h100-sweep-bwd-1k.md,
# -1k-2.md); 2k the single pass ahead (d64 1.01 against 0.95, causal 1.03 against 1.01; d128 0.95 against 0.93:
# -2k.md); 4k causal (2k visible) level, 4k unmasked the single pass ahead (-sweep-bwd-tma-3.md).
SINGLE_PASS_FROM_KEYS = 2048


def visible_keys(seqlen_k: int, window_size) -> float:
    """Keys a query row sees on average, q_len = k_len: f(left) + f(right) + 1 with f(x) = mean over rows i of
    min(i, x) (x = seqlen_k for an unbounded side): seqlen_k unmasked, about half of it under causal."""
    n = max(int(seqlen_k), 1)

    def f(x):
        x = n if x < 0 else min(x, n)
        return x - x * (x + 1) / (2 * n)
    left, right = window_size
    return f(left) + f(right) + 1


def plan(D: int, deterministic: bool = False, seqlen_k: int | None = None, window_size=(-1, -1)):
    """The dK/dV kernel's plan for head dim D (64, 128 or 256); deterministic: dQ in its own pass (no atomics); with
    seqlen_k, also the two passes where a query row sees fewer than SINGLE_PASS_FROM_KEYS keys on average."""
    p = _PLANS[D]
    if deterministic or (seqlen_k is not None and visible_keys(seqlen_k, window_size) < SINGLE_PASS_FROM_KEYS):
        return p[:5] + (0,)
    return p


# dQ modes that sum dQ across programs into a float32 accumulator (the single pass; 3 computes without summing)
_SUMMED = (1, 2, 3, 5, 6)


def dq_mode(D: int, plan_: tuple, varlen: bool, dq: int | None = None) -> int:
    """The dQ mode a launch runs (`_PLANS`' last field): the plan's, or `dq` (`backward`'s _dq). Packed batches run
    red's modes (1-3: dense pointer arithmetic) as 0, the TMA reduce's (5, 6) as they are. ValueError for what the
    kernels cannot run: other than two consumers, a summed dQ at d256, a shared dQ tile whose head dim is not 64 per
    consumer (d64 shares one tile in turn, mode 6 only)."""
    _, _, _, nc, shared, red = plan_
    if nc != 2:
        raise ValueError(f"the Gluon backward's kernels run two consumer warpgroups, got a plan with {nc}")
    mode = red if dq is None else dq
    if varlen and mode not in (4, 5, 6):
        mode = 0
    if D == 256 and mode in _SUMMED:
        raise ValueError("head dim 256 runs dQ in a pass of its own (dQ mode 0)")
    if shared and mode in _SUMMED and D != 64 * nc and not (D == 64 and mode == 6):
        raise ValueError(f"a shared dQ needs head dim 64 x {nc} consumers (or 64 with dQ mode 6), got {D}")
    return mode


def supports(q, k, v, softmax_scale, softcap) -> str | None:
    """None if this kernel runs the inputs, else why not (the caller then runs v2's backward). dO is the caller's
    to make TMA-loadable (v3.backward: a contiguous copy where `C.descriptors_ok` fails)."""
    if not HAVE_GLUON:
        return "this Triton has no Gluon"
    if softcap > 0:
        return "softcap runs v2's backward"
    if not softmax_scale > 0:
        return "a scale <= 0 runs v2's backward"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"{q.dtype} runs v2's backward"
    if q.shape[-1] not in _PLANS:
        return f"head dim {q.shape[-1]} runs v2's backward"
    if not C.descriptors_ok(q, k, v):
        return "TMA needs 16-byte aligned pointers and strides"
    return None


@triton.jit
def _prep_kernel(O, DO, LSE, LSE2, DELTA, CU_Q, stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh,
                 stride_lb, stride_lh, stride_pb, stride_ph, seqlen_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 IS_VARLEN: tl.constexpr):
    # Grid: (padded rows / BLOCK_M, nheads, batch). Delta = rowsum(dO ∘ O) and lse in log2 units, padded to whole
    # query blocks: rows past the sequence get Delta = 0 and lse = +inf (P = 0), so the kernels' loads need no mask.
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q0, _, Sq, _ = seq_bounds(CU_Q, CU_Q, b, seqlen_q, seqlen_q, IS_VARLEN)
    d = tl.arange(0, HEAD_DIM)
    ok = m < Sq
    rows = q0 + m
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + d[None, :], mask=ok[:, None],
                 other=0.0)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + rows, mask=ok, other=float("inf"))
    tl.store(DELTA + b * stride_pb + h * stride_ph + m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1))
    tl.store(LSE2 + b * stride_pb + h * stride_ph + m, lse * 1.4426950408889634)


def backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
             window_size, _plan=None, _dq=None, _dq_plan=None, grads=None):
    """(B, S, H, D) or packed (total, H, D) with cu_seqlens: (dq, dk, dv). `supports()` must have passed and do be
    TMA-loadable (`C.descriptors_ok`). _plan, _dq_plan override `plan()` and `_DQ_PLANS`; _dq overrides the plan's dQ
    mode (see `_PLANS`; packed sequences take mode 0 for modes 1-3), and takes two timing diagnostics whose dq is
    garbage: 3 computes dQ's products in the single pass without summing them, 4 skips dQ altogether. grads: (dq, dk,
    dv) to write into (TMA-storable: `C.descriptors_ok`), else made.

    Everything but the tensors is worked out once per call signature (`_Setup`) and kept."""
    varlen = cu_seqlens_q is not None
    # the signature: what the setup reads (shapes, dtype, lengths, window, scale, plans, device) and what Triton
    # specialises on in the three launches besides (dO's and lse's strides and dO's alignment; every other tensor's
    # strides follow from the shapes: they are made here or by the forward; cu_seqlens' alignment)
    key = (q.shape, k.shape, q.dtype, None if not varlen else
           ((cu_seqlens_q.data_ptr() | cu_seqlens_k.data_ptr()) & 15, cu_seqlens_q.numel(), max_seqlen_q, max_seqlen_k),
           tuple(window_size), do.stride(), do.data_ptr() & 15, out.stride(), out.data_ptr() & 15, lse.stride(),
           softmax_scale, _plan, _dq,
           _dq_plan, q.device, persistent_on(PERSISTENT), FUSED_PREP, MAX_KV_SLOTS, KV_OUT, C.grads_key(grads))
    st = _SETUPS.get(key)
    if st is None:
        st = C.keep(_SETUPS, key, _Setup(q, k, do, out, lse, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale,
                                         window_size, _plan, _dq, _dq_plan, key, grads))
    new = C.grad_maker(grads, varlen)   # packed rows outside every sequence read as 0
    dev = q.device
    dk = new(1, k)
    dv = new(2, v)
    if st.empty:
        return new(0, q).zero_(), dk.zero_(), dv.zero_()
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as TD
    lse2, delta = torch.empty(st.lse_shape, dtype=torch.float32, device=dev)   # one allocation
    if not st.prep:
        _prep_launch.launch(st.prep_key, st.prep_grid, (out, do, lse, lse2, delta, cu_seqlens_q) + st.prep_ints,
                            st.prep_meta)
    dq = torch.zeros(st.acc_shape, dtype=torch.float32, device=dev) if st.atomic else new(0, q)
    if varlen:   # descriptors over (1, total, H, D)
        q, k, v, do = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), do.unsqueeze(0)
    layout, bm, D = st.layout, st.bm, st.D
    if st.mode == 0:   # the dQ pass: first when it works out lse and Delta for the dK/dV pass (`prep`)
        bn = st.dq_bn
        dq4, out4 = (dq.unsqueeze(0), out.unsqueeze(0)) if varlen else (dq, out)
        dq_args = ((C.Tma(TD, q, (1, 64, 1, D), layout), C.Tma(TD, k, (1, bn, 1, D), layout),
                    C.Tma(TD, v, (1, bn, 1, D), layout), C.Tma(TD, do, (1, 64, 1, D), layout),
                    C.Tma(TD, dq4, (1, 64, 1, D), layout),
                    C.Tma(TD, out4 if st.prep == 2 else do, (1, 64, 1, D), layout),   # O (else not read)
                    dq, cu_seqlens_q, cu_seqlens_k) + st.dq_strides
                   + (lse2, delta) + st.dq_pad_strides + (out, lse) + st.dq_ints)
        if st.prep:
            _dq_launch.launch(st.dq_key, st.dq_grid, dq_args, st.dq_meta)
    ld = C.Tma(TD, lse2.view(st.rows_2d), (1, bm), st.row_layout)
    dqad = C.Tma(TD, dq, (1, bm, 1, 64), st.acc_layout) if st.mode >= 5 else ld
    args = (C.Tma(TD, q, (1, bm, 1, D), layout), C.Tma(TD, k, (1, 64, 1, D), layout),
            C.Tma(TD, v, (1, 64, 1, D), layout), C.Tma(TD, do, (1, bm, 1, D), layout), ld,
            C.Tma(TD, delta.view(st.rows_2d), (1, bm), st.row_layout), dqad)
    kd = args[1]   # K's again where dK and dV take masked stores (not read)
    dk4, dv4 = (dk.unsqueeze(0), dv.unsqueeze(0)) if varlen else (dk, dv)
    args += ((C.Tma(TD, dk4, (1, 64, 1, D), layout), C.Tma(TD, dv4, (1, 64, 1, D), layout)) if st.kv_out else (kd, kd))
    args += (dq, dk, dv, cu_seqlens_q, cu_seqlens_k) + st.bwd_ints
    for part_key, meta in st.bwd_parts:
        _bwd_launch.launch(part_key, st.bwd_grid, args, meta)
    if st.atomic:
        acc = dq[0] if varlen else dq[:, :st.Sq]
        return (acc.to(st.dtype) if grads is None else grads[0].copy_(acc)), dk, dv
    if st.mode == 0 and not st.prep:
        _dq_launch.launch(st.dq_key, st.dq_grid, dq_args, st.dq_meta)
    return dq, dk, dv


_SETUPS: dict = {}


class _Setup:
    """What `backward` works out from a call's signature, kept per signature: allocation shapes, the dQ mode, the
    launches' grids, keys, integer arguments and meta-parameters. The d256 plan's two dK/dV launches are `bwd_parts`."""

    def __init__(self, q, k, do, out, lse, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale, window_size,
                 _plan, _dq, _dq_plan, key, grads=None):
        from .v3_gluon import shared_layout
        varlen = cu_seqlens_q is not None
        H, D = q.shape[-2], q.shape[-1]
        Hk = k.shape[-2]
        B = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
        Sq, Sk = (max_seqlen_q, max_seqlen_k) if varlen else (q.shape[1], k.shape[1])
        self.D, self.Sq, self.dtype = D, Sq, q.dtype
        self.empty = q.numel() == 0 or k.numel() == 0 or B == 0
        if self.empty:
            return
        bm, stages, regs, nc, shared, red = _plan or plan(D)
        self.bm = bm
        self.mode = mode = dq_mode(D, (bm, stages, regs, nc, shared, red), varlen, _dq)
        # lse (log2 units), Delta and dQ's float32 accumulator padded to whole query blocks (module docstring)
        pad = C.cdiv(Sq, 64) * 64 + 128   # whole 64-row blocks, and the dQ pass's tiles of up to 192 rows
        self.lse_shape = (2, B, H, pad)
        self.rows_2d = (B * H, pad)
        lse_pb, lse_ph = C.contiguous_strides(self.lse_shape[1:])[:2]   # lse2's and Delta's (B, H, pad) strides
        stride_l = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
        self.prep_key = key
        self.prep_grid = (pad // 64, H, B)
        self.prep_ints = C.seq_layout(out, varlen) + C.seq_layout(do, varlen) + stride_l + (lse_pb, lse_ph, Sq)
        self.prep_meta = dict(HEAD_DIM=D, BLOCK_M=64, IS_VARLEN=varlen)
        left, right = C.window_args(window_size, Sq, Sk)
        qk_scale, _ = C.score_scales(softmax_scale, 0.0)
        self.atomic = atomic = mode in _SUMMED
        # two passes (FUSED_PREP): the dQ pass works out lse and Delta itself and runs first, no `_prep_kernel`. Its
        # PREP: 2 O loaded by TMA with Q and dO (d64, d128: 32 KB more shared memory at d128, 229,984 bytes in all),
        # 1 by the consumers' loads (d256, or an O that TMA cannot read), 0 not there (the prep kernel runs)
        self.prep = 0 if not (mode == 0 and FUSED_PREP) else 2 if D <= 128 and C.descriptors_ok(out) else 1
        # dQ's float32 accumulator: dense (B, Sq, H, D) for the TMA reduce (modes 5, 6: it clips rows past the
        # tensor), (B, pad, H, D) for red's (their pointers reach the padded rows); packed (1, total, H, D), where a
        # tile's rows past its sequence add exact zeros (their lse is +inf) and rows past the last are outside the
        # descriptor
        self.acc_shape = acc_shape = (1, q.shape[0], H, D) if varlen else (B, Sq if mode >= 5 else pad, H, D)
        self.layout, self.row_layout, self.acc_layout = shared_layout(), _row_layout(), _acc_layout()
        # dQ's (the accumulator, or the gradient made here or given), dK's and dV's (made here: contiguous)
        dq_strides = C.contiguous_strides(acc_shape) if atomic else \
            C.contiguous_strides(q.shape) if grads is None else grads[0].stride()
        dk_l, dv_l = (C.layout_of(C.contiguous_strides(k.shape), varlen),) * 2 if grads is None else \
            (C.seq_layout(grads[1], varlen), C.seq_layout(grads[2], varlen))
        # d256: dV and dK in separate launches (both accumulators would take every register of a consumer)
        masked = tuple(window_size) != (-1, -1)
        n_kt = C.cdiv(Sk, 64 * nc)
        per, n_kv_units, programs = schedule(n_kt, Hk, B, masked, q.device, PERSISTENT)
        self.bwd_grid = (programs,)
        self.bwd_ints = dq_strides[:3] + dk_l + dv_l + (Sq, Sk, left, right, qk_scale, softmax_scale, H // Hk, H, n_kt,
                                                     n_kv_units, per)
        do_dq = mode if atomic else 0
        kv_slots = kv_slots_for(D, do_dq)
        self.kv_out = kv_out = kv_out_for(D, (bm, stages, regs, nc, shared and atomic, red), do_dq, varlen, kv_slots)
        self.bwd_parts = tuple((key + (part,), dict(HEAD_DIM=D, BLOCK_M=bm, STAGES=stages, CONSUMER_REGS=regs, NC=nc,
                                                    DO_DQ=do_dq, SHARED_DQ=shared and atomic, IS_VARLEN=varlen,
                                                    PART=part, KV_SLOTS=kv_slots, KV_OUT=kv_out, num_warps=4))
                               for part in ((1, 2) if D == 256 else (0,)))
        if mode == 0:
            bn, dq_stages, dq_regs, dq_nc, pipe = _dq_plan or _DQ_PLANS[D]
            if dq_nc != 2:
                raise ValueError(f"the dQ pass runs two consumer warpgroups, got a plan with {dq_nc}")
            self.dq_bn = bn
            n_mt = C.cdiv(Sq, 64 * dq_nc)
            _, n_units, programs = schedule(n_mt, H, B, masked, q.device, PERSISTENT)
            dq_buf = D <= DQ_BUF_MAX_D and not varlen
            self.dq_key = key + (dq_buf,)
            self.dq_grid = (programs,)
            self.dq_strides = C.layout_of(dq_strides, varlen)
            self.dq_pad_strides = (lse_pb, lse_ph)
            # O's and lse's strides (read by the dQ pass with FUSED_PREP), then the integers
            self.dq_ints = C.seq_layout(out, varlen) + stride_l + (Sq, Sk, left, right, qk_scale, softmax_scale,
                                                                   H // Hk, n_mt, H, n_units, per)
            self.dq_meta = dict(HEAD_DIM=D, BLOCK_N=bn, STAGES=dq_stages, CONSUMER_REGS=dq_regs, NC=dq_nc,
                                IS_VARLEN=varlen, PIPE=pipe, DQ_BUF=dq_buf,
                                PREP=self.prep, num_warps=4)


@functools.lru_cache(maxsize=None)
def _acc_layout():
    """The shared layout of dQ's float32 accumulator tiles (1, rows, 1, 64) for the TMA reduce: a 128-byte swizzle."""
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=4)


@functools.lru_cache(maxsize=None)
def _row_layout():
    """The shared layout of the lse and Delta rows (float32, unswizzled); one object, as `v3_gluon.shared_layout`."""
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


_prep_launch = C.FastLaunch(_prep_kernel)
if HAVE_GLUON:
    _bwd_launch = C.FastLaunch(_bwd_kernel)
    _dq_launch = C.FastLaunch(_dq_kernel)
