"""The Gluon v3 forward (hf_flashattn/kernels/v3_gluon.py) on the CPU.

Gluon kernels do not run on Triton's interpreter, so here: the kernel is compiled for sm_90a (Hopper) and its
PTX checked for the structure the design depends on; the choice of kernel (`plan`, `supports`, the dispatch in
v3.forward) is checked as a rule. Its numbers are checked on the GPU (benchmarks/sweep_gluon.py, gpu_check.py:
results/2026-11-26-h100-sweep-gluon-*.md and -correctness-gluon.log).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest
import torch

from _attn_testing import ptxas_spills
from hf_flashattn.kernels import v3, v3_gluon as G

pytestmark = pytest.mark.skipif(not G.HAVE_GLUON, reason="this Triton has no Gluon")


_COMPILE = r"""
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from hf_flashattn.kernels import v3_gluon as G
D, block_n, stages, regs, nc, varlen, left, q_slots, maxnreg, tail, pingpong = json.loads(sys.argv[1])
fn = G._fwd_kernel_ws
lay = repr(G.shared_layout())
sig = {}
for i, name in enumerate(fn.arg_names):
    if fn.params[i].is_constexpr:
        sig[name] = "constexpr"
    elif name in ("q_desc", "o_desc"):
        sig[name] = f"tensordesc<bf16[1,64,1,{D}],{lay}>"
    elif name in ("k_desc", "v_desc"):
        sig[name] = f"tensordesc<bf16[1,{block_n},1,{D}],{lay}>"
    else:
        sig[name] = {"LSE": "*fp32", "O": "*bf16", "CU_Q": "*i32", "CU_K": "*i32", "qk_scale": "fp32"}.get(name, "i32")
cx = dict(HEAD_DIM=D, BLOCK_N=block_n, STAGES=stages, CONSUMER_REGS=regs, NC=nc, PINGPONG=pingpong,
          IS_VARLEN=varlen, O_BUF=not varlen and D <= G.O_BUF_MAX_D, LEFT=left, Q_SLOTS=q_slots, TAIL=tail)
src = GluonASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in cx.items()})
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=maxnreg))
open(sys.argv[2], "w").write(k.asm["ptx"])
print(k.metadata.shared)
"""


def _compile(D, block_n, stages, regs, nc, out, varlen=False, left=True, q_slots=1, maxnreg=None, tail=False,
             pingpong=False):
    """PTX of the warp-specialised kernel for sm_90a, compiled in a fresh process: this one runs Triton's
    interpreter (TRITON_INTERPRET=1), under which Triton's own library functions are not compilable."""
    import json
    import sys
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", _COMPILE,
                        json.dumps([D, block_n, stages, regs, nc, varlen, left, q_slots, maxnreg, tail, pingpong]),
                        out],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return open(out).read(), int(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("D,varlen,keys", [(64, False, 1 << 20), (128, False, 1 << 20), (256, False, 1 << 20),
                                            (64, True, 1 << 20), (128, False, 1024), (128, True, 1024)])
def test_compiles_for_hopper_with_the_overlap(D, varlen, keys):
    """Each head dim's causal plan (at `keys` keys) compiles for sm_90a as `forward` launches it, with: TMA tile
    copies, wgmma, a wait that leaves one wgmma group in flight (the softmax of block j under P·V of block j-1),
    mbarrier waits and arrives between the producer and the consumers, register reallocation between the partitions,
    a tile loop over the grid's stride (persistent), and (next to) no spills. Packed (varlen): the bounds read from
    cu_seqlens and O written by masked stores, not TMA stores. The one-consumer plan (d128 under a mask below 2048
    keys): registers capped at half the file and under half the shared memory, two programs an SM."""
    p = G.plan(D, keys, True, force=keys > 4096)
    q = torch.empty(1, 1, 2, D, dtype=torch.bfloat16).expand(1, keys, 2, D)   # the shapes only
    st = G._Setup(q, q[:, :, :1], None, keys, keys, 0.1, (-1, 0), p, ())
    m = st.meta
    with tempfile.TemporaryDirectory() as tmp:
        ptx, shared = _compile(D, m["BLOCK_N"], m["STAGES"], m["CONSUMER_REGS"], m["NC"], os.path.join(tmp, "k.ptx"),
                               varlen, m["LEFT"], m["Q_SLOTS"], m.get("maxnreg"), False, m["PINGPONG"])
    assert "cp.async.bulk.tensor" in ptx                      # TMA loads (and, dense, stores)
    assert ("cp.async.bulk.tensor.4d.global.shared" in ptx) != varlen   # TMA stores of O only when dense
    assert "wgmma.mma_async" in ptx
    assert re.search(r"wgmma\.wait_group\.sync\.aligned 1;", ptx)   # one group left in flight
    assert "mbarrier.try_wait.parity" in ptx and "mbarrier.arrive" in ptx
    assert "setmaxnreg.inc" in ptx and "setmaxnreg.dec" in ptx
    assert "%nctaid.x" in ptx                       # persistent: a program's tiles stride by the number of programs
    assert shared <= 232448                         # fits the H100's shared memory per block
    if m["NC"] == 1:                                # two programs an SM: registers and shared memory for both
        assert "maxnreg" in m and re.search(r"\.maxnreg 128\b", ptx) and 2 * (shared + 1024) <= 233472
    _assert_spills_within_allowance(ptx)


def _assert_spills_within_allowance(ptx):
    """ptxas assembles the PTX, and no kernel spills more than 32 bytes: Triton 3.6 (the GPU image) spills nothing on
    any plan; 3.9 spills 20 bytes at d256 since the persistent tile loop (tenth session; before it 12 in d64's
    3-consumer plan and 544 packed, none now)."""
    res = ptxas_spills(ptx)
    if res is None:
        pytest.fail("this Triton has no ptxas: cannot check spills")
    rc, err, spills = res
    assert rc == 0, err[-2000:]
    assert spills and max(spills) <= 32, err[-2000:]


@pytest.mark.parametrize("D", [64, 128])
def test_tail_schedule_compiles_without_spills(D):
    """The plans `tail_pairs` gives a tail (d64 16k causal, d128 GQA 32k causal) compile for sm_90a with the tail's
    index math (TAIL) as they do without it: TMA, wgmma, persistent, and no more than the plans' spill allowance."""
    p = G.plan(D, 1 << 15, True)
    nc = p[0] // 64
    with tempfile.TemporaryDirectory() as tmp:
        ptx, shared = _compile(D, p[1], p[3], p[4], nc, os.path.join(tmp, "k.ptx"), False, p[0] > 128 or False,
                               p[6] if len(p) > 6 else G.Q_SLOTS, None, True, p[5] if len(p) > 5 else G.PINGPONG)
    assert "cp.async.bulk.tensor" in ptx and "wgmma.mma_async" in ptx and "%nctaid.x" in ptx
    assert shared <= 232448
    _assert_spills_within_allowance(ptx)


def test_plan_programs_per_sm():
    """A plan's 8th element sets the programs an SM (nineteenth session: two two-consumer d64 programs an SM, measured
    slower, no default plan uses it): the persistent grid is that many programs an SM, the registers are capped at each
    program's share of the file (consumers' registers x 128 x NC + the producer's 24 x 128 within it), the tail is off
    (its makespan model counts one program an SM), and the kernel compiles for sm_90a within the spill allowance with
    shared memory for two programs."""
    keys = 1024
    q = torch.empty(1, 1, 1, 64, dtype=torch.bfloat16).expand(16, keys, 32, 64)
    st = G._Setup(q, q[:, :, :1], None, keys, keys, 0.1, (-1, 0), (128, 64, 4, 3, 112, False, 1, 2), ())
    m = st.meta
    assert st.grid == (2 * 4,)   # 2 programs x the stand-in's 4 SMs (plenty of units)
    assert m["maxnreg"] == 65536 // 2 // (32 * 12) and 112 * 128 * 2 + 24 * 128 <= m["maxnreg"] * 32 * 12
    assert st.tail == 0 and not m["TAIL"]
    one = G._Setup(q, q[:, :, :1], None, keys, keys, 0.1, (-1, 0), (128, 64, 4, 3, 112, False, 1), ())
    assert one.grid == (4,) and "maxnreg" not in one.meta
    with tempfile.TemporaryDirectory() as tmp:
        ptx, shared = _compile(64, m["BLOCK_N"], m["STAGES"], m["CONSUMER_REGS"], m["NC"], os.path.join(tmp, "k.ptx"),
                               False, m["LEFT"], m["Q_SLOTS"], m["maxnreg"], False, m["PINGPONG"])
    assert re.search(r"\.maxnreg 85\b", ptx) and re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+112;", ptx)
    assert 2 * (shared + 1024) <= 233472
    _assert_spills_within_allowance(ptx)


def test_plan_rule():
    """Where the Gluon kernel runs by default (measured faster on the H100, results/2026-11-26-h100-sweep-gluon-3)."""
    assert G.plan(256, 512, True) == G._PLANS[256]             # d256: everywhere
    assert G.plan(128, 1024, False) == G._PLANS[128]           # d128 without a mask: everywhere
    assert G.plan(128, 1024, True) == G._PLAN_128_SHORT_MASKED   # d128 masked below 2048 keys: one consumer
    assert G.plan(128, 2048, True) == G._PLANS[128]
    assert G.plan(64, 4096, False) == G._PLANS[64]             # d64: unmasked from 4096 keys,
    assert G.plan(64, 4095, False) is None and G.plan(64, 16383, True) is None
    assert G.plan(64, 16384, True) == G._PLANS[64]             # masked from 16384 (probe-packed-fwd)
    assert G.plan(64, 16, True, force=True) == G._PLANS[64]
    assert G._PLANS[64][6] == 2 and G._PLANS[128][6] == 2      # two Q slots (d64: sixteenth session)
    assert G._PLANS[64][5] and not G._PLANS[128][5]            # ping-pong at d64 only (eighteenth session)
    for bm, bn, warps, stages, regs, *_ in (*G._PLANS.values(), G._PLAN_128_SHORT_MASKED):   # the kernel's shape rules
        assert bm in (64, 128, 192) and warps == 4 and regs * 128 * (bm // 64) + 24 * 128 <= 65536 // (2 if bm == 64
                                                                                                       else 1)


def test_supports_names_what_it_leaves_to_v3py():
    x = torch.zeros(1, 64, 2, 128, dtype=torch.bfloat16)
    assert G.supports(x, x, x, None, 0.1, 0.0) is None
    assert G.supports(x[0], x[0], x[0], torch.zeros(2, dtype=torch.int32), 0.1, 0.0) is None   # packed
    assert "softcap" in G.supports(x, x, x, None, 0.1, 30.0)
    assert "scale" in G.supports(x, x, x, None, 0.0, 0.0)
    assert "float32" in G.supports(x.float(), x.float(), x.float(), None, 0.1, 0.0)
    y = torch.zeros(1, 64, 2, 80, dtype=torch.bfloat16)
    assert "head dim 80" in G.supports(y, y, y, None, 0.1, 0.0)
    odd = torch.zeros(1 * 64 * 2 * 128 + 1, dtype=torch.bfloat16)[1:].view(1, 64, 2, 128)
    assert "TMA" in G.supports(x, odd, odd, None, 0.1, 0.0)


def test_dispatch_off_the_gpu_and_when_turned_off(monkeypatch):
    """v3.forward takes the Gluon kernel only for CUDA tensors on a Hopper GPU (never on the interpreter or the
    CPU), unless HF_FLASHATTN_V3_GLUON=0."""
    x = torch.zeros(1, 4096, 2, 128, dtype=torch.bfloat16)
    assert v3._gluon_plan(x, x, x, None, 4096, 0.1, (-1, -1), 0.0) is None         # CPU tensors
    monkeypatch.setenv("HF_FLASHATTN_V3_GLUON", "0")
    assert v3._gluon_plan(x, x, x, None, 4096, 0.1, (-1, -1), 0.0) is None


def test_persistent_switch(monkeypatch):
    """The Gluon forward and both backward passes run persistent by default; HF_FLASHATTN_V3_PERSISTENT=0 gives one
    program a unit (read on every call), and so does the module switch."""
    from hf_flashattn.kernels import v3_gluon_bwd as GB
    monkeypatch.delenv("HF_FLASHATTN_V3_PERSISTENT", raising=False)
    # the backward's passes ask `schedule` with their module's switch, GB.PERSISTENT
    assert G.persistent_on() and G.persistent_on(GB.PERSISTENT)
    monkeypatch.setenv("HF_FLASHATTN_V3_PERSISTENT", "0")
    assert not G.persistent_on() and not G.persistent_on(GB.PERSISTENT)
    monkeypatch.setenv("HF_FLASHATTN_V3_PERSISTENT", "1")
    monkeypatch.setattr(G, "PERSISTENT", False)
    assert not G.persistent_on() and G.persistent_on(GB.PERSISTENT)


def test_schedule_units_and_programs(monkeypatch):
    """`schedule`: pairs of tiles a unit under a mask (an odd count leaves a single), single tiles without one; one
    program an SM (4 off the GPU; `per_sm` of them if asked) when persistent, one a unit otherwise."""
    monkeypatch.delenv("HF_FLASHATTN_V3_PERSISTENT", raising=False)
    cpu = torch.device("cpu")
    assert G.schedule(5, 2, 3, True, cpu) == (2, 18, 4)       # ceil(5 / 2) units a (batch, head)
    assert G.schedule(5, 2, 3, False, cpu) == (1, 30, 4)
    assert G.schedule(1, 1, 2, False, cpu) == (1, 2, 2)        # fewer units than SMs: a program each
    assert G.schedule(5, 2, 3, True, cpu, switch=False) == (2, 18, 18)
    assert G.schedule(5, 2, 3, True, cpu, per_sm=2) == (2, 18, 8)   # the one-consumer plan: two programs an SM
    assert G.schedule(5, 2, 3, True, cpu, switch=False, per_sm=2) == (2, 18, 18)
    monkeypatch.setenv("HF_FLASHATTN_V3_PERSISTENT", "0")
    assert G.schedule(5, 2, 3, False, cpu) == (1, 30, 30)


def test_tile_order_covers_every_tile_once_with_a_tail():
    """`tile_order` (the host's copy of the kernel's `_n_items` / `_tile`): with any tail, pairs or singles, every row
    tile of every (batch, head) is taken exactly once, odd tile counts and fewer units than programs included; the tail
    tiles are the most even pairs' (the middle rows), taken after every pair."""
    for n_mt, n_bh, programs in ((86, 32, 132), (7, 3, 4), (8, 5, 4), (3, 1, 4), (256, 4, 16), (5, 2, 8), (2, 1, 3)):
        n_per = (n_mt + 1) // 2
        for tail in range(0, min(4, n_per - 1) + 1):
            order = G.tile_order(n_mt, n_bh, programs, tail)
            seen = sorted(t for tiles in order for t in tiles)
            assert seen == [(bh, m) for bh in range(n_bh) for m in range(n_mt)], (n_mt, n_bh, programs, tail)
            middle = {m for j in range(n_per - tail, n_per) for m in (j, n_mt - 1 - j)}
            for tiles in order:   # a program's tail tiles come after its pairs
                flags = [m in middle for _, m in tiles]
                assert flags == sorted(flags) or tail == 0, (n_mt, n_bh, programs, tail)
    # the rule: where the last round of pairs is short, a tail that ends it in half-pair steps
    assert G.tail_pairs(86, 32, 132) == 2 and G.tail_pairs(256, 32, 132) == 1
    assert G.tail_pairs(128, 16, 132) == 0 and G.tail_pairs(64, 64, 132) == 0
    ms = [max(sum(m + 1 for _, m in t) for t in G.tile_order(86, 32, 132, tail)) for tail in (0, 2)]
    assert ms[1] < 0.96 * ms[0]


def test_setup_takes_the_tail_under_a_square_causal_mask_only(monkeypatch):
    """`_Setup` passes `tail_pairs`' tail as the kernel's last integer for a dense square causal call of a plan with two
    or three consumers; 0 with a window, with one consumer, unmasked, with TAIL_SPLIT off."""
    monkeypatch.delenv("HF_FLASHATTN_V3_PERSISTENT", raising=False)
    monkeypatch.setattr(G.C, "num_sms", lambda device: 132)   # the H100's count, for the d64 16k causal grid point
    S, H = 1 << 14, 32
    q = torch.empty(1, 1, H, 64, dtype=torch.bfloat16).expand(1, S, H, 64)   # the shapes only
    p = G.plan(64, S, True)
    st = G._Setup(q, q, None, S, S, 0.1, (-1, 0), p, ())
    n_mt = -(-S // p[0])
    assert st.grid == (132,) and st.ints[-1] == st.tail == G.tail_pairs(n_mt, H, 132) == 2 and st.ints[-2] == 2
    assert G._Setup(q, q, None, S, S, 0.1, (1000, 0), p, ()).tail == 0
    assert G._Setup(q, q, None, S, S, 0.1, (-1, -1), G.plan(64, S, False), ()).tail == 0
    monkeypatch.setattr(G, "TAIL_SPLIT", False)
    assert G._Setup(q, q, None, S, S, 0.1, (-1, 0), p, ()).tail == 0
