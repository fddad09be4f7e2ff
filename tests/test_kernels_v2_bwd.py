"""v2's backward in its variants on the CPU (Triton interpreter): atomic dQ, split dK/dV programs, the queries x keys
orientation, both passes in one launch, Delta in the dQ pass, the one-loop dK/dV pass, the grouped launch order, the
left edge skipped, and every gradient row written. Each against the float64 reference by the flash-attn rule
(`_attn_testing.check_kernel`) and, where a variant computes the same tiles, bitwise against the default path.
"""
from __future__ import annotations

import pytest
import torch

import hf_flashattn as fa
from _attn_testing import (MASKS, SHAPES, assert_close_rule, check_kernel, kernel_inputs, ref_grads, run_kernel,
                           run_kernel_varlen, two_sequences)


@pytest.mark.parametrize("shape, mask", [(SHAPES[0], MASKS[1]), (SHAPES[1], MASKS[3]), (SHAPES[5], MASKS[0]),
                                         (SHAPES[4], MASKS[2])], ids=["gqa-causal", "window-softcap", "gqa32/8",
                                                                      "mqa-window"])
def test_v2_atomic_dq_backward(shape, mask, monkeypatch):
    """HF_FLASHATTN_BWD_DQ=atomic: FA2's single-pass backward (dQ by float32 atomics) meets the same rule."""
    monkeypatch.setenv("HF_FLASHATTN_BWD_DQ", "atomic")
    q, k, v, do = kernel_inputs(shape, torch.float32, seed=8)
    check_kernel("v2", q, k, v, do, torch.float32, **mask)


@pytest.mark.parametrize("shape, mask", [(SHAPES[0], MASKS[1]), (SHAPES[1], MASKS[3]), (SHAPES[5], MASKS[0]),
                                         (SHAPES[4], MASKS[2])], ids=["gqa-causal", "window-softcap", "gqa32/8",
                                                                      "mqa-window"])
def test_v2_split_dkdv_backward(shape, mask, monkeypatch):
    """The split dK/dV variant (one program for dV, one for dK per key block; an autotune choice for large
    head dims) forced on the interpreter: the same rule, and the same dq as the fused variant."""
    from hf_flashattn.kernels import v2_bwd
    q, k, v, do = kernel_inputs(shape, torch.float32, seed=11)
    fused = run_kernel("v2", q, k, v, do, **mask)
    monkeypatch.setattr(v2_bwd._dkdv_launch, "force", v2_bwd._config(0, 16, 32, 4, 1, True))
    check_kernel("v2", q, k, v, do, torch.float32, **mask)
    split = run_kernel("v2", q, k, v, do, **mask)
    torch.testing.assert_close(split[2], fused[2], rtol=0, atol=0)   # dq pass untouched
    torch.testing.assert_close(split[3], fused[3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split[4], fused[4], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merge", [False, True], ids=["two-launches", "merged"])
@pytest.mark.parametrize("shape, mask", [((1, 70, 90, 4, 2, 16), MASKS[1]), (SHAPES[1], MASKS[3]),
                                         (SHAPES[4], MASKS[2]), ((1, 90, 70, 2, 1, 16), dict(window_size=(40, 20)))],
                         ids=["gqa-causal", "window-softcap", "mqa-window", "wide-window"])
def test_v2_split_dv_block_m(shape, mask, merge, monkeypatch):
    """Split dK/dV programs with the dV programs on taller query tiles than the dK programs (`DV_BLOCK_M`; the dV
    program holds K but not V): the same rule; dK bitwise that of the split with one tile height (the dK programs are
    untouched), dV within float32 rounding of it (its sums over query tiles are grouped differently); dense and
    packed, in the two launches and the merged one."""
    from hf_flashattn.kernels import v2_bwd
    monkeypatch.setattr(v2_bwd, "MERGE", dict.fromkeys(v2_bwd.MERGE, merge))
    q, k, v, do = kernel_inputs(shape, torch.float32, seed=23)
    runs = []
    for dv_bm in (0, 32):
        monkeypatch.setattr(v2_bwd._dkdv_launch, "force", v2_bwd._config(0, 16, 32, 4, 1, True, False, dv_bm))
        monkeypatch.setattr(v2_bwd._merged_launch, "force",
                            v2_bwd._merged_config(0, (16, 32, 4, 1, True, False, dv_bm), (16, 32, 4, 1)))
        runs.append(run_kernel("v2", q, k, v, do, **mask))
    assert v2_bwd._merged_launch.force.kwargs["DV_BLOCK_M"] == 32
    check_kernel("v2", q, k, v, do, torch.float32, **mask)
    torch.testing.assert_close(runs[1][2], runs[0][2], rtol=0, atol=0)   # dq
    torch.testing.assert_close(runs[1][3], runs[0][3], rtol=0, atol=0)   # dk
    torch.testing.assert_close(runs[1][4], runs[0][4], rtol=1e-5, atol=1e-5)
    assert not torch.equal(runs[1][4], runs[0][4]), "dV did not take the taller tiles"
    check_kernel("v2", q[0], k[0], v[0], do[0], torch.float32, cu=two_sequences(shape[1], shape[2]), **mask)


def test_v2_split_dv_block_m_refused_with_descriptor_loads(monkeypatch):
    """Descriptor loads (`v2_bwd.TMA`) size Q's and dO's blocks to BLOCK_M rows, so a config with another dV tile height
    is refused at compile time by name instead of loading tiles of the wrong height."""
    from hf_flashattn.kernels import v2_bwd
    monkeypatch.setattr(v2_bwd, "TMA", True)
    monkeypatch.setattr(v2_bwd._dkdv_launch, "force", v2_bwd._config(0, 16, 32, 4, 1, True, False, 32))
    q, k, v, do = kernel_inputs((1, 40, 40, 2, 2, 16), torch.float16, seed=3)
    with pytest.raises(Exception, match="DV_BLOCK_M != BLOCK_M is not supported with descriptor loads"):
        run_kernel("v2", q, k, v, do, causal=True)


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
@pytest.mark.parametrize("shape, mask", [(SHAPES[0], MASKS[1]), (SHAPES[1], MASKS[3]), (SHAPES[5], MASKS[0]),
                                         (SHAPES[4], MASKS[2])], ids=["gqa-causal", "window-softcap", "gqa32/8",
                                                                      "mqa-window"])
def test_v2_kv_b_orientation_backward(shape, mask, split, monkeypatch):
    """The dK/dV pass in the queries x keys orientation (K and V as second operands; a tuning candidate
    for the sweep) forced on the interpreter: the same rule, and the same grads as the default."""
    from hf_flashattn.kernels import v2_bwd
    q, k, v, do = kernel_inputs(shape, torch.float32, seed=13)
    ref = run_kernel("v2", q, k, v, do, **mask)
    monkeypatch.setattr(v2_bwd._dkdv_launch, "force", v2_bwd._config(0, 16, 32, 4, 1, split, True))
    check_kernel("v2", q, k, v, do, torch.float32, **mask)
    got = run_kernel("v2", q, k, v, do, **mask)
    for a, b in zip(got[3:], ref[3:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keys, mask, grouped", [(40, dict(causal=True), True), (40, dict(causal=False), False),
                                                 (24, dict(causal=True), False), (40, dict(window_size=(8, 0)), True)],
                         ids=["causal", "unmasked", "short", "window"])
def test_v2_bwd_group_rule(keys, mask, grouped, monkeypatch):
    """`v2_bwd.GROUP_RULE` picks the backward's launch order per head-dim class: (from keys, below keys, only under a
    mask). With d64's rule at (32, 2^62, True), a masked 40-key call takes grouped_rank's groups (group_tiles, 4 on the
    interpreter), an unmasked or 24-key one the grids' own order (1)."""
    from hf_flashattn.kernels import v2_bwd
    monkeypatch.setattr(v2_bwd, "GROUP_RULE", {**v2_bwd.GROUP_RULE, 64: (32, 1 << 62, True)})
    seen = []
    for name in ("_dkdv_launch", "_dq_launch"):
        real = getattr(v2_bwd, name)
        monkeypatch.setattr(v2_bwd, name, lambda grid, args, meta, site_key=None, real=real:
                            (seen.append(args[-1]), real(grid, args, meta, site_key=site_key))[1])
    q, k, v, do = kernel_inputs((1, 30, keys, 2, 1, 16), torch.float32, seed=21)
    run_kernel("v2", q, k, v, do, **mask)
    assert seen == [4, 4] if grouped else seen == [1, 1]


@pytest.mark.parametrize("split,kv_b", [(False, False), (True, False), (False, True)], ids=["fused", "split", "kv_b"])
def test_v2_merged_backward(split, kv_b, monkeypatch):
    """Both backward passes in one launch (`v2_bwd.MERGE`, `_bwd_kernel`: the dK/dV programs first, then the dQ
    programs): dense (causal, window with softcap, GQA, q_len != k_len) and packed with ragged lengths, bitwise equal
    to the two launches with the same tiles, and within the rule; the one-loop and three-loop forms both."""
    from hf_flashattn.kernels import v2_bwd
    monkeypatch.setattr(v2_bwd._dkdv_launch, "force", v2_bwd._config(0, 16, 32, 4, 1, split, kv_b))
    monkeypatch.setattr(v2_bwd._merged_launch, "force",
                        v2_bwd._merged_config(0, (16, 32, 4, 1, split, kv_b), (16, 32, 4, 1)))
    q, k, v, do = kernel_inputs((2, 45, 61, 4, 2, 24), torch.float32, seed=19)
    cu = (torch.tensor([0, 19, 45], dtype=torch.int32), torch.tensor([0, 30, 61], dtype=torch.int32))
    for one in (True, False):
        monkeypatch.setattr(v2_bwd, "ONE_LOOP", one)
        runs = []
        for merge in (False, True):
            monkeypatch.setattr(v2_bwd, "MERGE", dict.fromkeys(v2_bwd.MERGE, merge))
            runs.append((*run_kernel("v2", q, k, v, do, causal=True),
                         *run_kernel("v2", q, k, v, do, window_size=(9, 3), softcap=4.0),
                         *run_kernel("v2", q[:, :29], k, v, do[:, :29]),
                         *run_kernel_varlen("v2", q[0], k[0], v[0], do[0], cu, causal=True)))
        for a, b in zip(*runs):
            assert torch.equal(a, b)
    check_kernel("v2", q, k, v, do, torch.float32, causal=True)
    check_kernel("v2", q[:, :29], k, v, do[:, :29], torch.float32, window_size=(9, 3), softcap=4.0)


def test_v2_delta_in_dq_pass(monkeypatch):
    """The two-launch backward with Delta computed by the dQ pass (`v2_bwd.DELTA_IN_DQ`: dQ first, storing Delta for the
    dK/dV pass; no preprocess launch): the dQ pass launched before the dK/dV pass and the preprocess not at all, and the
    gradients bitwise equal to the preprocess path (dense causal, window with softcap, GQA, q_len != k_len, packed with
    ragged lengths), within the rule. Delta left unwritten (torch.empty) would make dK wrong."""
    from hf_flashattn.kernels import v2_bwd
    order = []
    for name in ("_dkdv_launch", "_dq_launch"):
        real = getattr(v2_bwd, name)
        monkeypatch.setattr(v2_bwd, name, lambda grid, args, meta, site_key=None, real=real, name=name:
                            (order.append(name), real(grid, args, meta, site_key=site_key))[1])
    real_pre = v2_bwd._preprocess_launch.keyed
    monkeypatch.setattr(v2_bwd._preprocess_launch, "keyed", lambda *a, **kw: (order.append("pre"), real_pre(*a, **kw)))
    q, k, v, do = kernel_inputs((2, 45, 61, 4, 2, 24), torch.float32, seed=23)
    cu = (torch.tensor([0, 19, 45], dtype=torch.int32), torch.tensor([0, 30, 61], dtype=torch.int32))
    runs = []
    for here in (False, True):
        monkeypatch.setattr(v2_bwd, "DELTA_IN_DQ", here)
        order.clear()
        runs.append((*run_kernel("v2", q, k, v, do, causal=True),
                     *run_kernel("v2", q, k, v, do, window_size=(9, 3), softcap=4.0),
                     *run_kernel("v2", q[:, :29], k, v, do[:, :29]),
                     *run_kernel_varlen("v2", q[0], k[0], v[0], do[0], cu, causal=True)))
        want = ["_dq_launch", "_dkdv_launch"] if here else ["pre", "_dkdv_launch", "_dq_launch"]
        assert order == want * 4
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    check_kernel("v2", q, k, v, do, torch.float32, causal=True)
    check_kernel("v2", q[:, :29], k, v, do[:, :29], torch.float32, window_size=(9, 3), softcap=4.0)


@pytest.mark.parametrize("split,kv_b,atomic", [(True, False, False), (False, True, False), (True, True, False),
                                               (False, True, True), (True, False, True), (True, True, True)],
                         ids=["split", "kv_b", "split-kv_b", "kv_b-atomic", "split-atomic", "split-kv_b-atomic"])
def test_v2_one_loop_dkdv_variants(split, kv_b, atomic, monkeypatch):
    """The dK/dV pass in one loop (`v2_bwd.ONE_LOOP`) in its other forms (split programs, queries x keys, atomic dQ),
    dense and packed with ragged lengths (a query tail block): bitwise equal to the three loops, within the rule."""
    from hf_flashattn.kernels import v2_bwd
    if atomic:
        monkeypatch.setenv("HF_FLASHATTN_BWD_DQ", "atomic")
    launch = v2_bwd._dkdv_atomic_launch if atomic else v2_bwd._dkdv_launch
    monkeypatch.setattr(launch, "force", v2_bwd._config(0, 16, 32, 4, 1, split, kv_b))
    q, k, v, do = kernel_inputs((1, 45, 61, 4, 2, 24), torch.float32, seed=17)
    cu = (torch.tensor([0, 19, 45], dtype=torch.int32), torch.tensor([0, 30, 61], dtype=torch.int32))
    runs = []
    for one in (False, True):
        monkeypatch.setattr(v2_bwd, "ONE_LOOP", one)
        runs.append((*run_kernel("v2", q, k, v, do, causal=True), *run_kernel("v2", q, k, v, do, window_size=(9, 3)),
                     *run_kernel_varlen("v2", q[0], k[0], v[0], do[0], cu, causal=True)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    check_kernel("v2", q, k, v, do, torch.float32, causal=True)


@pytest.mark.parametrize("kv_b", [False, True], ids=["keys-x-queries", "queries-x-keys"])
@pytest.mark.parametrize("mask", [dict(causal=True), dict(window_size=(-1, 7)), dict(window_size=(6, 0))],
                         ids=["causal", "right-only", "left-edge"])
def test_v2_bwd_skip_left_is_bitwise(kv_b, mask, monkeypatch):
    """The backward's masked blocks without the bound a window without a left edge cannot fail (`v2_bwd`'s LEFT: the
    dQ pass and the queries x keys dK/dV tiles skip the lower bound, the keys x queries tiles the upper one, whose
    rows past Sq have P = 0 through lse = +inf): the same bits as testing every bound, q_len < k_len and > k_len,
    dense and packed (query tails), both dK/dV orientations; within the rule against the reference."""
    from hf_flashattn.kernels import _common as C
    from hf_flashattn.kernels import v2_bwd
    monkeypatch.setattr(v2_bwd._dkdv_launch, "force", v2_bwd._config(0, 16, 32, 4, 1, False, kv_b))
    q, k, v, do = kernel_inputs((1, 45, 61, 4, 2, 24), torch.float32, seed=19)
    q2, k2, v2_, do2 = kernel_inputs((1, 61, 45, 4, 2, 24), torch.float32, seed=20)
    cu = (torch.tensor([0, 19, 45], dtype=torch.int32), torch.tensor([0, 30, 61], dtype=torch.int32))
    runs = []
    for skip in (True, False):
        monkeypatch.setattr(C, "SKIP_LEFT", skip)
        runs.append((*run_kernel("v2", q, k, v, do, **mask), *run_kernel("v2", q2, k2, v2_, do2, **mask),
                     *run_kernel_varlen("v2", q[0], k[0], v[0], do[0], cu, **mask)))
    assert all(t.abs().sum() > 0 for t in runs[0][-3:])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    monkeypatch.setattr(C, "SKIP_LEFT", True)
    check_kernel("v2", q2, k2, v2_, do2, torch.float32, **mask)


def test_v2_kv_b_atomic_dq(monkeypatch):
    from hf_flashattn.kernels import v2_bwd
    monkeypatch.setenv("HF_FLASHATTN_BWD_DQ", "atomic")
    monkeypatch.setattr(v2_bwd._dkdv_atomic_launch, "force", v2_bwd._config(0, 16, 32, 4, 1, False, True))
    q, k, v, do = kernel_inputs(SHAPES[1], torch.float32, seed=14)
    check_kernel("v2", q, k, v, do, torch.float32, **MASKS[3])


def test_v2_split_dkdv_varlen(monkeypatch):
    from hf_flashattn.kernels import v2_bwd
    monkeypatch.setattr(v2_bwd._dkdv_launch, "force", v2_bwd._config(0, 16, 32, 4, 1, True))
    lq = [5, 0, 1, 40, 23]
    cu = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(12)
    q, k, v, do = torch.randn(4, sum(lq), 4, 24, generator=g)
    check_kernel("v2", q, k, v, do, torch.float32, cu=(cu, cu), causal=True)


def test_v2_atomic_dq_varlen_and_deterministic_flag(monkeypatch):
    monkeypatch.setenv("HF_FLASHATTN_BWD_DQ", "atomic")
    lq = [5, 0, 1, 40, 23]
    cu = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(9)
    q, k, v, do = torch.randn(4, sum(lq), 4, 24, generator=g)
    check_kernel("v2", q, k, v, do, torch.float32, cu=(cu, cu), causal=True)
    # deterministic=True never takes the atomic path: the dQ pass runs (its kernel is launched)
    from hf_flashattn.kernels import v2_bwd
    launched = []
    real = v2_bwd._dq_launch
    monkeypatch.setattr(v2_bwd, "_dq_launch", lambda *a, **kw: (launched.append(1), real(*a, **kw)))
    run_kernel("v2", q[None], k[None], v[None], do[None], causal=True, deterministic=True)
    assert launched
    launched.clear()
    run_kernel("v2", q[None], k[None], v[None], do[None], causal=True, deterministic=False)
    assert not launched


# The same order for v2's backward passes (`grouped_rank`): the dK/dV programs walk (sequence, kv head) pairs in groups,
# key blocks first-to-last, the dQ programs (sequence, head) pairs, query blocks last-to-first. Every dK/dV/dQ tile must
# be computed once, by the program the order gives it, and its arithmetic does not depend on which program that is:
# the gradients are within the rule and bitwise equal to those of one pair's tiles in a row (group_tiles 1). The
# split dK/dV variant (two programs a key block) is forced for one of the runs.
@pytest.mark.parametrize("group_tiles", [4, 12])
@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
@pytest.mark.parametrize("shape", [(1, 20, 20, 5, 5, 16), (1, 40, 70, 3, 1, 16), (2, 70, 70, 3, 3, 16)],
                         ids=["1tile-5pairs", "2x3tiles-3pairs-mqa", "3tiles-2seqs"])
def test_grouped_bwd_order(group_tiles, split, shape, monkeypatch):
    from hf_flashattn.kernels import _common as C
    from hf_flashattn.kernels import v2_bwd
    if split:
        monkeypatch.setattr(v2_bwd._dkdv_launch, "force", v2_bwd._config(0, 16, 32, 4, 1, True))
    monkeypatch.setattr(v2_bwd, "GROUP_RULE", dict.fromkeys(v2_bwd.GROUP_RULE, (0, 1 << 62, True)))
    q, k, v, do = kernel_inputs(shape, torch.float16, seed=15)
    grads = {}
    for g in (1, group_tiles):
        monkeypatch.setattr(C, "group_tiles", lambda kernel, g=g: g if kernel == "v2_bwd" else 4)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fa.flash_attn_func(*leaves, causal=True, version="v2")
        grads[g] = torch.autograd.grad(out, leaves, do)
    ref = ref_grads(q, k, v, do, causal=True)
    low = ref_grads(q, k, v, do, compute_dtype=None, causal=True)
    for name, got, r, lo in zip(("dq", "dk", "dv"), grads[group_tiles], ref[2:], low[2:]):
        assert_close_rule(name, got, r, lo, 3, torch.float16)
    for a, b in zip(grads[1], grads[group_tiles]):
        assert torch.equal(a, b)


class _NaNEmpty:
    """Stands in for `torch` inside v2_bwd: every torch.empty comes back filled with NaN, so a gradient row that no
    program writes shows up (the dense backward allocates dK, dV, dQ without a fill)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*shape, **kw):
        return torch.full(shape[0] if len(shape) == 1 else shape, float("nan"), **kw)


@pytest.mark.parametrize("shape,kw", [((2, 29, 13, 4, 2, 40), dict(causal=True)),      # rows that see no key
                                      ((1, 13, 45, 2, 1, 16), dict(window_size=(4, 0))),   # keys no query sees
                                      ((1, 64, 64, 2, 2, 32), dict(causal=False))])
def test_v2_dense_backward_writes_every_gradient_row(monkeypatch, shape, kw):
    """The dense backward does not zero-fill dK, dV, dQ (every row is written by a program, keys no query sees and
    queries that see no key included): with every unfilled allocation NaN, the gradients still match the
    reference."""
    from hf_flashattn.kernels import v2_bwd
    monkeypatch.setattr(v2_bwd, "torch", _NaNEmpty())
    q, k, v, do = kernel_inputs(shape, torch.float32, seed=5)
    check_kernel("v2", q, k, v, do, torch.float32, **kw)
