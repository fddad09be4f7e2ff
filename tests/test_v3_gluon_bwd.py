"""The Gluon v3 backward (hf_flashattn/kernels/v3_gluon_bwd.py) on the CPU.

Gluon kernels do not run on Triton's interpreter: here both kernels (dK/dV, dQ) are compiled for sm_90a (Hopper),
dense and packed, and their PTX checked for the structure the design depends on; the plan rule, `supports` and the
dispatch in v3.backward are checked as rules. The padded lse/Delta preprocessing is a Triton-language kernel and
runs here. Numbers are checked on the GPU (benchmarks/sweep_gluon_bwd.py: results/2026-11-26-h100-sweep-gluon-bwd-*).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

from _attn_testing import ptxas_spills
from hf_flashattn.kernels import v3, v3_gluon_bwd as GB

pytestmark = pytest.mark.skipif(not GB.HAVE_GLUON, reason="this Triton has no Gluon")

_COMPILE = r"""
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from hf_flashattn.kernels import v3_gluon as G, v3_gluon_bwd as GB
which, D, rows, stages, regs, nc, extra, varlen, part = json.loads(sys.argv[1])
lay = repr(G.shared_layout())
row_lay = repr(gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2))
fn = GB._bwd_kernel if which == "dkdv" else GB._dq_kernel
sig = {}
for i, name in enumerate(fn.arg_names):
    if fn.params[i].is_constexpr:
        sig[name] = "constexpr"
    elif name in ("q_desc", "do_desc", "dq_desc", "o_desc"):
        sig[name] = f"tensordesc<bf16[1,{rows if which == 'dkdv' else 64},1,{D}],{lay}>"
    elif name in ("k_desc", "v_desc", "dk_desc", "dv_desc"):
        sig[name] = f"tensordesc<bf16[1,{64 if which == 'dkdv' else rows},1,{D}],{lay}>"
    elif name in ("l_desc", "d_desc") or (name == "dqa_desc" and extra[1] < 5):
        sig[name] = f"tensordesc<fp32[1,{rows}],{row_lay}>"
    elif name == "dqa_desc":
        sig[name] = f"tensordesc<fp32[1,{rows},1,64],{repr(GB._acc_layout())}>"
    elif name in ("DK", "DV", "O") or (name == "DQ" and which == "dq"):
        sig[name] = "*bf16"
    elif name in ("DQ", "LSE2", "DELTA", "LSE"):
        sig[name] = "*fp32"
    elif name in ("CU_Q", "CU_K"):
        sig[name] = "*i32"
    elif name in ("qk_scale", "ds_scale"):
        sig[name] = "fp32"
    else:
        sig[name] = "i32"
if which == "dkdv":
    do_dq = extra[1] if extra[1] != 4 else 0
    cx = dict(HEAD_DIM=D, BLOCK_M=rows, STAGES=stages, CONSUMER_REGS=regs, NC=nc, DO_DQ=do_dq,
              SHARED_DQ=extra[0] and extra[1] in (1, 2, 3, 5, 6), IS_VARLEN=varlen, PART=part,
              KV_SLOTS=extra[2] if len(extra) > 2 else GB.kv_slots_for(D, do_dq),
              KV_OUT=extra[3] if len(extra) > 3 else 0)
else:
    cx = dict(HEAD_DIM=D, BLOCK_N=rows, STAGES=stages, CONSUMER_REGS=regs, NC=nc, IS_VARLEN=varlen, PIPE=extra[0],
              DQ_BUF=D <= GB.DQ_BUF_MAX_D and not varlen,
              PREP=extra[1] if len(extra) > 1 else (2 if D <= 128 else 1) * GB.FUSED_PREP)
src = GluonASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in cx.items()})
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
open(sys.argv[2], "w").write(k.asm["ptx"])
print(k.metadata.shared)
"""


def _compile(spec, out):
    """PTX for sm_90a, compiled in a fresh process (this one runs Triton's interpreter, under which Triton's own
    library functions are not compilable), and ptxas's spill count."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(spec), out], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ptx, shared = open(out).read(), int(r.stdout.strip().splitlines()[-1])
    res = ptxas_spills(ptx)
    if res is None:
        pytest.fail("this Triton has no ptxas: cannot check spills")
    rc, err, spills = res
    assert rc == 0 and spills, err[-2000:]
    return ptx, shared, max(spills)


def _common_structure(ptx, shared):
    assert "cp.async.bulk.tensor" in ptx                       # TMA copies
    assert "wgmma.mma_async" in ptx
    assert "mbarrier.try_wait.parity" in ptx and "mbarrier.arrive" in ptx
    assert "setmaxnreg.inc" in ptx and "setmaxnreg.dec" in ptx
    assert "%nctaid.x" in ptx                                  # persistent: tiles stride by the number of programs
    assert shared <= 232448                                    # the H100's shared memory per block


# packed at d64/d128 (d256's packed kernels differ from its dense ones only where d128's do: left out for CI time)
@pytest.mark.parametrize("D, varlen", [(64, False), (64, True), (128, False), (128, True), (256, False)])
def test_deterministic_plans_compile_for_hopper_without_atomics(D, varlen):
    """Both kernels of the deterministic backward (every head dim's plan with deterministic=True) compile for sm_90a,
    dense and packed: TMA, wgmma, mbarriers between the producer and the consumers, register reallocation, (next to)
    no spills; and no atomic anywhere (dQ has a pass of its own, so results are bitwise reproducible). At d256 the dK/dV
    pass is two kernels, dV alone and dK alone."""
    bm, stages, regs, nc, shared, red = GB.plan(D, deterministic=True)
    assert red == 0
    bn, dq_stages, dq_regs, dq_nc, pipe = GB._DQ_PLANS[D]
    with tempfile.TemporaryDirectory() as tmp:
        for part in ((1, 2) if D == 256 else (0,)):
            ptx, smem, spill = _compile(["dkdv", D, bm, stages, regs, nc, [shared, red], varlen, part],
                                        os.path.join(tmp, "a"))
            _common_structure(ptx, smem)
            assert not re.search(r"\b(red|atom)\.global", ptx) and "cp.reduce" not in ptx
            # persistent (tenth session), d128: 208 bytes dense and 180 packed on triton 3.6, 308 and 232 on 3.9, all
            # of them tile-loop scalars stored and loaded between the key ranges (none inside a range's loop, where dK
            # and dV take 128 registers); d64: 0-32, d256: 8-172
            assert spill <= 384, spill
        ptx, smem, spill = _compile(["dq", D, bn, dq_stages, dq_regs, dq_nc, [pipe], varlen, 0], os.path.join(tmp, "b"))
        _common_structure(ptx, smem)
        # S waited while dP (and, pipelined, the previous block's dQ product) is still in flight
        assert re.search(r"wgmma\.wait_group\.sync\.aligned %d;" % (2 if pipe else 1), ptx)
        assert not re.search(r"\b(red|atom)\.global", ptx) and "cp.reduce" not in ptx
        # persistent (tenth session): triton 3.6 4-8 bytes (d128, d256), 3.9 12 (d128) and 116 (d256: scalars of the
        # tile loop, stored and loaded between the key ranges, none inside a range's loop); with the rows' lse and
        # Delta worked out here (FUSED_PREP, fifteenth session) 3.6 0 at every head dim, 3.9 0 (d64, d128), 152 (d256)
        assert spill <= 192, spill
        # dense dQ leaves through a TMA store, packed through a masked store (the next sequence's rows follow)
        assert ("cp.async.bulk.tensor.4d.global.shared" in ptx) != varlen


def test_single_pass_with_atomics_compiles_with_vector_reductions():
    """The single pass with red (dQ mode 2, an option) lowers its sum to red.global.add.v2.f32, the shared dQ tile to
    two wgmmas over both consumers' dS."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx, smem, spill = _compile(["dkdv", 128, 64, 2, 240, 2, [True, 2], False, 0], os.path.join(tmp, "a"))
    _common_structure(ptx, smem)
    assert "red.global.add.v2.f32" in ptx
    assert spill <= 768, spill   # 640 bytes on triton 3.9 since the persistent tile loop (an option, off by default)


@pytest.mark.parametrize("D, varlen", [(64, False), (128, False), (128, True)])
def test_default_plans_sum_dq_with_the_tma_reduce(D, varlen):
    """d64's and d128's default (non-deterministic) plans are the single pass whose dQ tiles go through the TMA unit's
    reduce (Triton 3.6 reaches it through the builder: `_tma_add`): a float32 tensor reduce-add from shared memory,
    two buffers a consumer (a wait that leaves one reduce in flight), no red/atom; the last reduce is waited for
    before the program ends (shared memory must outlive it). d64: the consumers take the shared tile in turn. Packed
    batches take it too (a (1, total, H, D) accumulator)."""
    bm, stages, regs, nc, shared, red = GB.plan(D)
    assert (shared, red) == (True, 6)
    with tempfile.TemporaryDirectory() as tmp:
        ptx, smem, spill = _compile(["dkdv", D, bm, stages, regs, nc, [shared, red], varlen, 0],
                                    os.path.join(tmp, "a"))
    _common_structure(ptx, smem)
    assert "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add" in ptx
    assert "cp.async.bulk.wait_group.read 	1;" in ptx and "cp.async.bulk.wait_group.read 	0;" in ptx
    assert not re.search(r"\b(red|atom)\.global", ptx)
    # d128: triton 3.6 252 bytes (packed 276), 3.9 692 (3.9: scalars of the tile and step loops, a few loads a step
    # between the wgmmas); d64: 0
    assert spill <= 768, spill


def test_plan_rule():
    """d64 and d128 run the single pass with the TMA reduce by default (measured faster than two passes on the H100,
    results/2026-11-27-h100-sweep-bwd-tma-2.md, -3.md), d256 two passes; with deterministic=True every head dim takes
    dQ's own pass (no atomics)."""
    for D in (64, 128, 256):
        bm, stages, regs, nc, shared, red = GB.plan(D)
        assert red == (0 if D == 256 else 6) and GB.plan(D, deterministic=True)[5] == 0
        assert regs * 128 * nc + 24 * 128 <= 65536            # the consumers' registers fit beside the producer
        assert GB.plan(D, deterministic=True)[:5] == (bm, stages, regs, nc, shared)


def test_short_sequences_take_the_two_passes():
    """The single pass only where a query row sees at least SINGLE_PASS_FROM_KEYS (2048) keys on average: its float32
    dQ accumulator costs per row and its saving per key (measured: two passes faster at 1k keys, level at 4k causal).
    Unmasked: every key; causal: about half; a window: about its width."""
    assert GB.SINGLE_PASS_FROM_KEYS == 2048
    assert GB.visible_keys(4096, (-1, -1)) == pytest.approx(4096, abs=1)
    assert GB.visible_keys(4096, (-1, 0)) == pytest.approx(2048.5, abs=1)
    assert GB.visible_keys(32768, (255, 0)) == pytest.approx(256, abs=2)
    assert GB.visible_keys(1024, (4096, 4096)) == pytest.approx(1024, abs=1)     # a window wider than the keys
    for D in (64, 128):
        single, two = GB.plan(D), GB.plan(D, deterministic=True)
        assert GB.plan(D, False, 1024) == two and GB.plan(D, False, 1024, (-1, 0)) == two
        assert GB.plan(D, False, 2048) == single and GB.plan(D, False, 2048, (-1, 0)) == two
        assert GB.plan(D, False, 4096, (-1, 0)) == single and GB.plan(D, False, 16384, (-1, 0)) == single
        assert GB.plan(D, False, 32768, (511, 0)) == two                          # a narrow sliding window
        assert GB.plan(D, False, 32768, (4095, 0)) == single
        assert GB.plan(D, True, 65536) == two                                     # deterministic: always two
    assert GB.plan(256, False, 65536) == GB.plan(256, True)


def test_dq_mode_rule():
    """Which dQ mode a launch runs: d64/d128 sum dQ with the TMA reduce (mode 6), dense or packed; deterministic plans,
    d256 and packed calls of red's modes run dQ's own pass (0); plans the kernels cannot run are refused by name."""
    for varlen in (False, True):
        assert GB.dq_mode(128, GB.plan(128), varlen) == 6
        assert GB.dq_mode(64, GB.plan(64), varlen) == 6
        assert GB.dq_mode(256, GB.plan(256), varlen) == 0
        for D in (64, 128, 256):
            assert GB.dq_mode(D, GB.plan(D, deterministic=True), varlen) == 0
    red = (64, 2, 240, 2, True, 2)
    assert GB.dq_mode(128, red, False) == 2 and GB.dq_mode(128, red, True) == 0   # red: dense pointers only
    assert GB.dq_mode(128, GB.plan(128), True, dq=4) == 4                          # the dK/dV-only diagnostic
    with pytest.raises(ValueError, match="head dim 256"):
        GB.dq_mode(256, (32, 2, 240, 2, False, 6), False)
    with pytest.raises(ValueError, match="shared dQ"):
        GB.dq_mode(64, (64, 2, 240, 2, True, 2), False)
    with pytest.raises(ValueError, match="two consumer warpgroups"):
        GB.dq_mode(128, (64, 2, 160, 3, True, 6), False)


def test_supports_names_what_it_leaves_to_v2():
    x = torch.zeros(1, 64, 2, 128, dtype=torch.bfloat16)
    assert GB.supports(x, x, x, 0.1, 0.0) is None
    assert "softcap" in GB.supports(x, x, x, 0.1, 30.0)
    assert "scale" in GB.supports(x, x, x, 0.0, 0.0)
    assert "float32" in GB.supports(x.float(), x.float(), x.float(), 0.1, 0.0)
    y = torch.zeros(1, 64, 2, 80, dtype=torch.bfloat16)
    assert "head dim 80" in GB.supports(y, y, y, 0.1, 0.0)
    z = torch.zeros(1, 64, 2, 256, dtype=torch.bfloat16)
    assert GB.supports(z, z, z, 0.1, 0.0) is None          # d256: dV and dK in separate launches
    odd = torch.zeros(1 * 64 * 2 * 128 + 1, dtype=torch.bfloat16)[1:].view(1, 64, 2, 128)
    assert "TMA" in GB.supports(x, odd, odd, 0.1, 0.0)


def test_dispatch_off_the_gpu_and_when_turned_off(monkeypatch):
    """v3.backward takes the Gluon backward only for CUDA tensors on a Hopper GPU (never on the interpreter or the
    CPU), unless HF_FLASHATTN_V3_GLUON_BWD=0."""
    x = torch.zeros(1, 256, 2, 128, dtype=torch.bfloat16)
    assert v3._gluon_bwd_plan(x, x, x, 0.1, 0.0, False) is None          # CPU tensors
    monkeypatch.setenv("HF_FLASHATTN_V3_GLUON_BWD", "0")
    assert v3._gluon_bwd_plan(x, x, x, 0.1, 0.0, False) is None


@pytest.mark.parametrize("varlen", [False, True])
def test_preprocessing_pads_lse_and_delta(varlen):
    """The padded inputs of both kernels (interpreter): Delta = rowsum(dO ∘ O) and lse·log2(e) per sequence, +inf and
    0 past each sequence's end, so that no load in the kernels needs a mask."""
    import triton
    torch.manual_seed(0)
    H, D = 2, 64
    lens = [37, 5] if varlen else [29, 29]
    B, pad = len(lens), triton.cdiv(max(lens), 64) * 64 + 128
    if varlen:
        total = sum(lens)
        o, do = torch.randn(total, H, D), torch.randn(total, H, D)
        lse = torch.randn(H, total)
        cu = torch.tensor([0, lens[0], total], dtype=torch.int32)
        stride_l = (0, lse.stride(0))
    else:
        o, do = torch.randn(B, lens[0], H, D), torch.randn(B, lens[0], H, D)
        lse = torch.randn(B, H, lens[0])
        cu = None
        stride_l = (lse.stride(0), lse.stride(1))
    from hf_flashattn.kernels import _common as C
    lse2 = torch.full((B, H, pad), -1.0)
    delta = torch.full((B, H, pad), -1.0)
    GB._prep_kernel[(pad // 64, H, B)](o, do, lse, lse2, delta, cu, *C.seq_layout(o, varlen),
                                       *C.seq_layout(do, varlen), *stride_l, lse2.stride(0), lse2.stride(1),
                                       max(lens), HEAD_DIM=D, BLOCK_M=64, IS_VARLEN=varlen)
    for b, n in enumerate(lens):
        if varlen:
            s0 = sum(lens[:b])
            ob, dob, lb = o[s0:s0 + n].transpose(0, 1), do[s0:s0 + n].transpose(0, 1), lse[:, s0:s0 + n]
        else:
            ob, dob, lb = o[b].transpose(0, 1), do[b].transpose(0, 1), lse[b]
        torch.testing.assert_close(delta[b, :, :n], (ob * dob).sum(-1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lse2[b, :, :n], lb * 1.4426950408889634, atol=1e-5, rtol=1e-5)
        assert torch.all(delta[b, :, n:] == 0) and torch.all(torch.isinf(lse2[b, :, n:]))


@pytest.mark.parametrize("prep", [0, 2])
def test_pipelined_dq_pass_compiles_with_its_product_one_step_late(prep):
    """The dQ pass's PIPE option (off by default: measured within noise) compiles with the previous block's dQ
    product left in flight behind the next block's S and dP (a wait that leaves two groups), with lse and Delta read
    from the prep kernel's rows (PREP 0, FUSED_PREP off) or worked out here (2: O loaded by TMA with Q and dO, one
    more TMA load a tile)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx, smem, spill = _compile(["dq", 128, 64, 3, 240, 2, [True, prep], False, 0], os.path.join(tmp, "a"))
    _common_structure(ptx, smem)
    assert re.search(r"wgmma\.wait_group\.sync\.aligned 2;", ptx)
    assert spill <= 64, spill
    loads = len(re.findall(r"cp\.async\.bulk\.tensor\.4d\.shared::\w+\.global", ptx))
    assert loads == (8 if prep == 2 else 6), loads   # Q, dO (and O) a tile, a load per consumer; K, V a block


def test_two_kv_slots_compile_and_take_a_second_slot_of_shared_memory(monkeypatch):
    """The dK/dV pass's K/V slots: at d128 with dQ in its own pass a second slot (128 keys of K and V at d128,
    65,536 bytes) fits beside the ring, no dQ buffers are allocated there, and the rule gives two slots only where
    shared memory holds them (d64's two passes take two by default, `_KV_PLANS`)."""
    bm, stages, regs, nc, shared, _ = GB._PLANS[128]
    with tempfile.TemporaryDirectory() as tmp:
        _, smem1, _ = _compile(["dkdv", 128, bm, stages, regs, nc, [shared, 0, 1], False, 0], os.path.join(tmp, "a"))
        ptx, smem2, spill = _compile(["dkdv", 128, bm, stages, regs, nc, [shared, 0, 2], False, 0],
                                     os.path.join(tmp, "b"))
    _common_structure(ptx, smem2)
    assert 0 <= smem2 - smem1 - 2 * nc * 64 * 128 * 2 <= 64   # and two mbarriers
    assert smem1 < 160 * 1024   # no float32 dQ tiles (64 KB) when dQ has a pass of its own
    assert spill <= 384, spill
    assert GB.MAX_KV_SLOTS is None
    assert [GB.kv_slots_for(64, 0), GB.kv_slots_for(64, 6), GB.kv_slots_for(128, 0), GB.kv_slots_for(128, 6),
            GB.kv_slots_for(256, 0)] == [2, 1, 1, 1, 1]
    monkeypatch.setattr(GB, "MAX_KV_SLOTS", 2)
    assert [GB.kv_slots_for(64, 6), GB.kv_slots_for(64, 0), GB.kv_slots_for(128, 0)] == [2, 2, 2]
    assert [GB.kv_slots_for(128, 6), GB.kv_slots_for(256, 0)] == [1, 1]


@pytest.mark.parametrize("D, do_dq, varlen", [(128, 0, False), (64, 0, False), (64, 6, False), (128, 0, True),
                                               (256, 0, False)])
def test_dk_dv_leave_by_tma_stores(D, do_dq, varlen):
    """dK and dV leave the dK/dV pass by TMA stores (`KV_OUT`, sixteenth session: the masked stores from registers
    cost the pass 10-20% at 1k keys): d128's two passes through buffers of their own (1), d64's through the
    consumer's K/V buffers with two K/V slots (2), d64's single pass through its own, d256's two launches (dV alone,
    then dK alone) through the K/V buffers; each consumer stores dK and dV (two 4-D TMA stores; d256 one a launch)
    and waits for them to read shared memory (before its next tile's stores, or before handing K and V back) and
    before the program ends. d128's single pass keeps masked stores (no room for own buffers, through K/V measured
    slower). Packed batches take the TMA stores where a consumer's keys lie wholly inside the sequence, masked stores
    where they reach into the next one."""
    bm, stages, regs, nc, shared, _ = GB._PLANS[D]
    plan_ = (bm, stages, regs, nc, shared and do_dq > 0, do_dq)
    slots = GB.kv_slots_for(D, do_dq)
    kv_out = GB.kv_out_for(D, plan_, do_dq, False, slots)
    assert (slots, kv_out) == {(128, 0): (1, 1), (64, 0): (2, 2), (64, 6): (1, 1), (256, 0): (1, 2)}[(D, do_dq)]
    assert GB.kv_out_for(128, GB._PLANS[128], 6, False, 1) == 0
    assert GB.kv_out_for(D, plan_, do_dq, True, slots) == kv_out
    assert GB.bwd_smem(D, bm, stages, nc, do_dq, plan_[4], slots, kv_out) <= GB._SMEM_LIMIT
    with tempfile.TemporaryDirectory() as tmp:
        ptx, smem, spill = _compile(["dkdv", D, bm, stages, regs, nc, [shared, do_dq, slots, kv_out], varlen,
                                     2 if D == 256 else 0], os.path.join(tmp, "a"))
    _common_structure(ptx, smem)
    stores = len(re.findall(r"cp\.async\.bulk\.tensor\.4d\.global\.shared::cta\.bulk_group \[", ptx))
    assert stores == (2 if D == 256 else 4), stores   # dK and dV in each consumer's code (dQ's reduce is cp.reduce)
    assert re.search(r"cp\.async\.bulk\.wait_group\.read\s+0;", ptx)
    # the masked stores remain only for the tiles that no query sees (zeros) and, packed, a sequence's last keys
    assert ptx.count("st.global") <= (128 if D == 64 else 256) * (2 if varlen else 1)
    # triton 3.6: 0 at d64, 116 at d128 (196 packed), 16 at d256 (dK); 3.9: 8 at d64's single pass
    assert spill <= (64 if D == 64 else 384), spill


def test_dk_dv_through_the_dq_tiles_compile(monkeypatch):
    """KV_OUT 3 (an option): the single pass's dK and dV leave by TMA stores through the consumer's two float32 dQ
    tiles (the same 32 KB at d128), once its last reduces have read them, waited for before the next tile's dQ tiles
    are written there: no shared memory of its own (d128's single pass has no room for own buffers). Where the tiles
    are fewer (mode 5 with a shared tile) the rule falls back to the K/V buffers."""
    bm, stages, regs, nc, shared, red = GB._PLANS[128]
    monkeypatch.setattr(GB, "KV_OUT", 3)
    assert GB.kv_out_for(128, GB._PLANS[128], 6, False, 1) == 3
    assert GB.kv_out_for(128, (bm, stages, regs, nc, True, 5), 5, False, 1) == 2
    assert GB.kv_out_for(128, GB._PLANS[128], 0, False, 1) == 2   # two passes: no dQ tiles
    with tempfile.TemporaryDirectory() as tmp:
        _, smem0, _ = _compile(["dkdv", 128, bm, stages, regs, nc, [shared, red, 1, 0], False, 0],
                               os.path.join(tmp, "a"))
        ptx, smem, spill = _compile(["dkdv", 128, bm, stages, regs, nc, [shared, red, 1, 3], False, 0],
                                    os.path.join(tmp, "b"))
    _common_structure(ptx, smem)
    assert smem0 <= smem <= smem0 + 64, (smem, smem0)   # no buffer of its own (alignment's bytes aside)
    stores = len(re.findall(r"cp\.async\.bulk\.tensor\.4d\.global\.shared::cta\.bulk_group \[", ptx))
    assert stores == 4, stores
    assert "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add" in ptx
    assert spill <= 768, spill   # triton 3.6: 228 bytes (252 with masked stores), 3.9: 716 (692)
