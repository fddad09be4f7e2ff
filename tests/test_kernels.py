"""Kernel grid on the CPU (Triton interpreter): every version against the float64 reference.

Error rule (flash-attn's): kernel error <= 2x the error of PyTorch's own path in the input dtype,
plus a rounding floor; gradients 3x (they go through two more matmuls and the dS rounding).
"""
from __future__ import annotations

import pytest
import torch

import hf_flashattn as fa
from _attn_testing import (MASKS, SHAPES, VERSIONS, assert_close_rule, check_kernel, kernel_inputs, max_lengths,
                           ref_grads, ref_kwargs, run_kernel, run_kernel_varlen, two_sequences)

# SHAPES (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim) and MASKS: `_attn_testing`'s, shared with
# test_kernels_v2_bwd.py (v2's backward variants)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_fp32_grid(version, shape, mask):
    q, k, v, do = kernel_inputs(shape, torch.float32)
    check_kernel(version, q, k, v, do, torch.float32, **mask)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[3]], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_fp16(version, shape, causal):
    q, k, v, do = kernel_inputs(shape, torch.float16, seed=1)
    check_kernel(version, q, k, v, do, torch.float16, causal=causal, softmax_scale=0.3)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_varlen(version, mask):
    # lengths include an empty sequence, a single token and q_len != k_len both ways
    lq, lk = [5, 0, 1, 40, 23], [9, 3, 1, 31, 23]
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(lq), 4, 24, generator=g)
    k, v = torch.randn(2, sum(lk), 2, 24, generator=g)
    do = torch.randn_like(q)
    check_kernel(version, q, k, v, do, torch.float32, cu=(cu_q, cu_k), **mask)


@pytest.mark.parametrize("version", ["v2", "v3"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[4]], ids=lambda s: "x".join(map(str, s)))
def test_right_only_window(version, shape):
    """A window with a right edge and no left one (masked scores skip the lower bound, `_common.visible`'s LEFT):
    against the reference, q_len > k_len (empty rows) and the awkward 113 x 203 (fp16: v3 takes no float32)."""
    q, k, v, do = kernel_inputs(shape, torch.float16, seed=8)
    check_kernel(version, q, k, v, do, torch.float16, window_size=(-1, 7))


@pytest.mark.parametrize("version", ["v2", "v3"])
@pytest.mark.parametrize("mask", [dict(causal=True), dict(window_size=(-1, 7)), dict(window_size=(6, 0))],
                         ids=["causal", "right-only", "left-edge"])
def test_skip_left_is_bitwise(version, mask, monkeypatch):
    """The masked scores' lower-bound test, skipped where the window has no left edge (`_common.SKIP_LEFT`), gives the
    same bits as testing it (dense and packed)."""
    from hf_flashattn.kernels import _common as C
    q, k, v, _ = kernel_inputs((1, 45, 70, 4, 2, 32), torch.float16, seed=9)
    cu = torch.tensor([0, 20, 45], dtype=torch.int32)
    runs = []
    for skip in (True, False):
        monkeypatch.setattr(C, "SKIP_LEFT", skip)
        runs.append((fa.flash_attn_func(q, k, v, version=version, **mask),
                     fa.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 25, 25, version=version, **mask)))
    assert runs[0][0].abs().sum() > 0
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape,mask", [((1, 113, 203, 4, 1, 40), dict(causal=True)),
                                        ((2, 70, 70, 4, 2, 32), dict(causal=False)),
                                        ((1, 64, 96, 4, 4, 16), dict(window_size=(20, 5))),
                                        ((1, 90, 50, 2, 2, 64), dict(causal=True)),
                                        ((1, 77, 77, 2, 2, 64), dict(window_size=(-1, 7))),
                                        ((1, 1, 97, 2, 1, 16), dict(causal=True))],
                         ids=["113x203-causal-mqa-d40", "70x70-gqa", "window", "q-longer-causal", "right-only",
                              "one-row"])
def test_v3_one_loop(shape, mask, monkeypatch):
    """v3.py's kernel with every key block in one pipelined loop (`v3.ONE_LOOP`, the mask in a branch on the block's
    position): within the rule against the reference, and bitwise equal to the three loops (the same products and
    masks in the same order), dense and packed (ragged lengths: the key-tail block after the loop)."""
    from hf_flashattn.kernels import v3
    q, k, v, _ = kernel_inputs(shape, torch.float16, seed=15)
    runs = []
    for one in (False, True):
        monkeypatch.setattr(v3, "ONE_LOOP", one)
        runs.append(fa.flash_attn_func(q, k, v, return_attn_probs=True, version="v3", **mask)[:2])
    (base, base_lse), (out, lse) = runs
    # descriptors made in-kernel (the host's need 16-byte aligned strides): the same bits
    window = mask.get("window_size", (-1, 0 if mask.get("causal") else -1))
    args = (None, None, shape[1], shape[2], shape[-1] ** -0.5, window, 0.0)
    inkernel = []
    for one in (False, True):
        monkeypatch.setattr(v3, "ONE_LOOP", one)
        inkernel.append(v3.forward(q, k, v, *args, _plan=((32, 16, 4, 1), False, False)))
    assert torch.equal(inkernel[0][0], inkernel[1][0]) and torch.equal(inkernel[0][1], inkernel[1][1])
    assert torch.equal(inkernel[1][0], out)
    ref = ref_grads(q, k, v, torch.zeros_like(q), **mask)
    low = ref_grads(q, k, v, torch.zeros_like(q), compute_dtype=None, **mask)
    assert_close_rule("out", out, ref[0], low[0], 2, torch.float16)
    fin = torch.isfinite(ref[1])
    assert torch.equal(torch.isinf(lse) & (lse > 0), ~fin)
    assert torch.equal(out, base) and torch.equal(lse, base_lse)
    cu = two_sequences(shape[1], shape[2])
    packed = []
    for one in (False, True):
        monkeypatch.setattr(v3, "ONE_LOOP", one)
        packed.append(fa.flash_attn_varlen_func(q[0], k[0], v[0], *cu, *max_lengths(cu), return_attn_probs=True,
                                                version="v3", **mask)[:2])
    assert torch.equal(packed[0][0], packed[1][0]) and torch.equal(packed[0][1], packed[1][1])


def test_v3_one_loop_kept_off_where_the_gpu_got_it_wrong(monkeypatch):
    """v3.ONE_LOOP on: the plans the H100 computed wrongly with one loop (Q reshaped after a host descriptor's load,
    64-key blocks, head-dim tile <= 64) keep the three loops; others take it
    (results/2026-11-27-h100-probe-one-loop.md)."""
    from hf_flashattn.kernels import v3
    assert not v3.one_loop_ok(True, 64, 64) and not v3.one_loop_ok(True, 64, 32)
    # Q from an in-kernel descriptor (not reshaped), or other block shapes: admitted
    assert v3.one_loop_ok(False, 64, 64) and v3.one_loop_ok(True, 32, 64) and v3.one_loop_ok(True, 128, 64)
    assert v3.one_loop_ok(True, 64, 128) and v3.one_loop_ok(True, 32, 256)


@pytest.mark.parametrize("shape,mask", [((1, 113, 203, 4, 1, 40), dict(causal=True)),
                                        ((2, 70, 70, 4, 2, 32), dict(causal=False)),
                                        ((1, 64, 96, 4, 4, 16), dict(window_size=(20, 5))),
                                        ((1, 90, 50, 2, 2, 64), dict(causal=True)),
                                        ((1, 77, 77, 2, 2, 64), dict(window_size=(-1, 7))),
                                        ((1, 45, 45, 2, 1, 32), dict(window_size=(9, 3), softcap=5.0)),
                                        ((1, 1, 97, 2, 1, 16), dict(causal=True))],
                         ids=["113x203-causal-mqa-d40", "70x70-gqa", "window", "q-longer-causal", "right-only",
                              "window-softcap", "one-row"])
def test_v2_one_loop(shape, mask, monkeypatch):
    """v2's forward and dQ pass with every key block in one loop (`v2.ONE_LOOP`, `v2_bwd.ONE_LOOP`: the mask in a
    branch on the block's position, the block across the key tail after the loop; the forward keeps three loops under
    softcap): within the rule against the reference, output, lse and gradients bitwise equal to the three loops, dense
    and packed (ragged lengths: a tail block in most sequences)."""
    from hf_flashattn.kernels import v2, v2_bwd
    q, k, v, do = kernel_inputs(shape, torch.float32, seed=16)
    cu = two_sequences(shape[1], shape[2])
    runs = []
    monkeypatch.setattr(v2, "ONE_LOOP_MASKED", True)   # the one loop under a mask too (off by default from Triton 3.9)
    for one in (False, True):
        monkeypatch.setattr(v2, "ONE_LOOP", one)
        monkeypatch.setattr(v2_bwd, "ONE_LOOP", one)
        runs.append((*run_kernel("v2", q, k, v, do, **mask),
                     *run_kernel_varlen("v2", q[0], k[0], v[0], do[0], cu, **mask)))
    ref = ref_grads(q, k, v, do, **ref_kwargs(mask))
    low = ref_grads(q, k, v, do, compute_dtype=torch.float32, **ref_kwargs(mask))
    for name, i, f in (("out", 0, 2), ("dq", 2, 3)):
        assert_close_rule(name, runs[1][i], ref[i], low[i], f, torch.float32)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("masked_one_loop", [False, True])
def test_v2_one_loop_under_a_mask_is_a_switch(masked_one_loop, monkeypatch):
    """`v2.ONE_LOOP_MASKED` (False from Triton 3.9, which if-converts the one loop's mask branch): masked calls take
    the three loops, calls without a mask keep the one loop; the kernel gets that choice, and the outputs are bitwise
    those of the other choice."""
    from hf_flashattn.kernels import v2
    q, k, v, do = kernel_inputs((1, 70, 90, 2, 1, 32), torch.float32, seed=21)
    seen = []
    launch = v2._fwd_launch

    def recorder(grid_fn, args, meta, site_key=None):
        seen.append((meta["NO_MASK"], meta["ONE_LOOP"]))
        return launch(grid_fn, args, meta, site_key=site_key)

    monkeypatch.setattr(v2, "ONE_LOOP", True)
    monkeypatch.setattr(v2, "_fwd_launch", recorder)
    outs = {}
    for flag in (masked_one_loop, not masked_one_loop):
        monkeypatch.setattr(v2, "ONE_LOOP_MASKED", flag)
        outs[flag] = [run_kernel("v2", q, k, v, do, **mask)[0] for mask in ({}, {"causal": True})]
    assert seen[:2] == [(True, True), (False, masked_one_loop)], seen
    for a, b in zip(outs[False], outs[True]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("version", VERSIONS)
def test_varlen_matches_dense_per_sequence(version):
    """Packing must not leak attention across sequences: each packed sequence equals its dense run."""
    g = torch.Generator().manual_seed(4)
    lens = [7, 19, 2]
    cu = torch.tensor([0, 7, 26, 28], dtype=torch.int32)
    q, k, v = torch.randn(3, 28, 2, 16, generator=g)
    packed = fa.flash_attn_varlen_func(q, k, v, cu, cu, 19, 19, causal=True, version=version)
    for b, n in enumerate(lens):
        s = slice(int(cu[b]), int(cu[b + 1]))
        dense = fa.flash_attn_func(q[None, s], k[None, s], v[None, s], causal=True, version=version)
        torch.testing.assert_close(packed[s], dense[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("version", VERSIONS)
def test_hf_layout_strided_inputs(version):
    """Transformers hands over (B, H, S, D).transpose(1, 2) views: taken as they are, same result."""
    g = torch.Generator().manual_seed(5)
    qh, kh, vh = torch.randn(2, 4, 21, 32, generator=g), torch.randn(2, 2, 30, 32, generator=g), \
        torch.randn(2, 2, 30, 32, generator=g)
    q, k, v = qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)
    assert not q.is_contiguous()
    do = torch.randn(2, 21, 4, 32, generator=g)
    check_kernel(version, q, k, v, do, torch.float32, causal=True)
    got = fa.flash_attn_func(q, k, v, causal=True, version=version)
    want = fa.flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), causal=True, version=version)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("version", VERSIONS)
def test_deterministic_backward_is_bitwise(version):
    q, k, v, do = kernel_inputs((1, 45, 60, 4, 1, 32), torch.float32, seed=6)
    runs = [run_kernel(version, q, k, v, do, causal=True, deterministic=True) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("version", VERSIONS)
def test_empty_rows_give_zero_output(version):
    """Causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k queries see no key."""
    q, k, v, _ = kernel_inputs((1, 20, 6, 2, 2, 16), torch.float32, seed=7)
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True, version=version)
    assert torch.equal(out[:, :14], torch.zeros_like(out[:, :14]))
    assert torch.isinf(lse[..., :14]).all() and torch.isfinite(lse[..., 14:]).all()
    assert out[:, 14:].abs().sum() > 0


# v3 (TMA descriptors, warp-specialised loop; opt-in until measured on the H100): float16/bfloat16 only,
# so it is checked on the CPU in float16, over the same shapes and masks.
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_v3_fp16_grid(shape, mask):
    q, k, v, do = kernel_inputs(shape, torch.float16, seed=10)
    check_kernel("v3", q, k, v, do, torch.float16, **mask)


def test_v3_varlen_and_strided():
    lq = [5, 0, 1, 40, 23]
    cu = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(11)
    q, k, v, do = (torch.randn(4, sum(lq), 4, 24, generator=g).half())
    check_kernel("v3", q, k[:, :2], v[:, :2], do, torch.float16, cu=(cu, cu), causal=True)   # GQA 4/2, strided k, v
    qh = torch.randn(2, 4, 21, 32, generator=g).half()
    kh = torch.randn(2, 2, 30, 32, generator=g).half()
    check_kernel("v3", qh.transpose(1, 2), kh.transpose(1, 2), kh.transpose(1, 2), torch.randn(2, 21, 4, 32).half(),
           torch.float16, window_size=(7, 2))


# v3's launch variants (descriptors made on the host over the whole tensors, packed ones included, or in-kernel;
# the scale folded into the exponent or not) each against the float64 reference and against the other load
# path, over shapes whose tiles have a masked edge, a band and a tail (the interpreter's 32 x 16 tiles), GQA
# and MQA, a head dim padded to the tile.
@pytest.mark.parametrize("host,fold", [(True, True), (False, True), (True, False)],
                         ids=["host", "in-kernel", "host-nofold"])
@pytest.mark.parametrize("shape,mask", [((1, 113, 203, 4, 1, 40), {"causal": True}),
                                        ((2, 70, 70, 4, 2, 32), {"causal": False}),
                                        ((1, 64, 96, 4, 4, 16), {"window_size": (20, 5)}),
                                        ((1, 1, 97, 2, 1, 16), {"causal": True})],
                         ids=["113x203-causal-mqa-d40", "70x70-gqa", "window", "one-row"])
def test_v3_launch_variants(host, fold, shape, mask):
    from hf_flashattn.kernels import v3
    _, Sq, Sk, _, _, D = shape
    q, k, v, _ = kernel_inputs(shape, torch.float16, seed=12)
    window = mask.get("window_size", (-1, 0 if mask.get("causal") else -1))
    args = (None, None, Sq, Sk, D ** -0.5, window, 0.0)
    other, other_lse = v3.forward(q, k, v, *args, _plan=((32, 16, 4, 1), not host, False))
    got, lse = v3.forward(q, k, v, *args, _plan=((32, 16, 4, 1), host, False), _fold=fold)
    ref = ref_grads(q, k, v, torch.zeros_like(q), **ref_kwargs(mask))
    low = ref_grads(q, k, v, torch.zeros_like(q), compute_dtype=None, **ref_kwargs(mask))
    assert_close_rule("out", got, ref[0], low[0], 2, torch.float16)
    fin = torch.isfinite(ref[1])
    assert torch.equal(torch.isinf(lse) & (lse > 0), ~fin)
    assert_close_rule("lse", lse[fin], ref[1][fin], low[1].float()[fin], 2, torch.float32)
    # the same arithmetic in the same order whichever way the tiles are loaded
    if fold:
        assert torch.equal(got, other) and torch.equal(lse, other_lse)


# `grouped_tile`'s launch order (v2's and v3's forward): the (batch, head) pairs in groups of g, the row tiles of a
# group heaviest first. On the interpreter GROUP_TILES is 4, so with 1-3 row tiles of 32 these shapes run g = 4, 2
# and 1 with a partial last group (5 and 3 pairs); GROUP_TILES is also set to 1 (one head's tiles in a row) and to
# 12 (g = 12 > 5 pairs: clamped to them). Every tile must be computed once, by the program the order gives it.
@pytest.mark.parametrize("version", ["v2", "v3"])
@pytest.mark.parametrize("group_tiles", [4, 1, 12])
@pytest.mark.parametrize("shape", [(1, 20, 20, 5, 5, 16), (1, 40, 50, 3, 1, 16), (1, 70, 70, 3, 3, 16)],
                         ids=["1tile-5pairs", "2tiles-3pairs-mqa", "3tiles"])
def test_grouped_tile_order(version, group_tiles, shape, monkeypatch):
    from hf_flashattn.kernels import _common as C
    monkeypatch.setattr(C, "group_tiles", lambda kernel: group_tiles)
    q, k, v, _ = kernel_inputs(shape, torch.float16, seed=14)
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True, version=version)
    ref = ref_grads(q, k, v, torch.zeros_like(q), causal=True)
    low = ref_grads(q, k, v, torch.zeros_like(q), compute_dtype=None, causal=True)
    assert_close_rule("out", out, ref[0], low[0], 2, torch.float16)
    fin = torch.isfinite(ref[1])
    assert torch.equal(torch.isinf(lse) & (lse > 0), ~fin)
    assert_close_rule("lse", lse[fin], ref[1][fin], low[1].float()[fin], 2, torch.float32)


@pytest.mark.parametrize("shape,mask", [((1, 113, 203, 4, 1, 40), dict(causal=True)),
                                        ((2, 70, 70, 4, 2, 32), dict(causal=False)),
                                        ((1, 64, 96, 4, 4, 16), dict(window_size=(20, 5))),
                                        ((1, 90, 50, 2, 2, 64), dict(causal=True)),
                                        ((1, 77, 77, 2, 2, 64), dict(window_size=(-1, 7))),
                                        ((1, 50, 81, 3, 3, 80), dict(window_size=(4, 0))),
                                        ((1, 1, 97, 2, 1, 16), dict(causal=True)),
                                        ((2, 128, 77, 2, 1, 40), dict(causal=False)),
                                        ((1, 128, 64, 2, 2, 32), dict(causal=False)),
                                        ((1, 256, 100, 2, 2, 16), dict(causal=True)),
                                        ((1, 128, 192, 4, 1, 16), dict(causal=False))],
                         ids=["113x203-causal-mqa-d40", "70x70-gqa", "window", "q-longer-causal", "right-only",
                              "narrow-left-window-d80", "one-row", "even-unmasked-tail-d40", "even-unmasked",
                              "even-q-longer-causal", "even-unmasked-no-tail-mqa"])
def test_v2_halves(shape, mask, monkeypatch):
    """v2's forward with a program owning two row tiles (`HALVES`, forced: 32 rows as two of 16): within the rule
    against the reference, and bitwise equal to the plain kernel on 16-row tiles, dense and packed (a half's rows that
    see nothing of a block the other half needs add exactly nothing; a half past the sequence's end writes nothing).
    The "even" shapes (dense, seqlen_q a multiple of 128, seqlen_k of 64) take the row loads and stores without masks,
    and without a mask the update and normalisation without the empty-row guard and no key-tail block (128 x 77 is
    not even: its tail block runs); under a causal mask with more queries than keys the rows that see nothing still
    get O = 0 and lse = +inf."""
    from hf_flashattn.kernels import v2
    q, k, v, do = kernel_inputs(shape, torch.float16, seed=17)
    cu = two_sequences(shape[1], shape[2])
    runs = []
    for cfg in (v2._fwd_config(0, 16, 16, 4, 1), v2._fwd_config(0, 32, 16, 4, 1, None, True)):
        monkeypatch.setattr(v2._fwd_launch, "force", cfg)
        runs.append([fa.flash_attn_func(q, k, v, return_attn_probs=True, version="v2", **mask)[:2],
                     fa.flash_attn_varlen_func(q[0], k[0], v[0], *cu, *max_lengths(cu), return_attn_probs=True,
                                               version="v2", **mask)[:2]])
    ref = ref_grads(q, k, v, do, **ref_kwargs(mask))
    low = ref_grads(q, k, v, do, compute_dtype=torch.float16, **ref_kwargs(mask))
    assert_close_rule("out", runs[1][0][0], ref[0], low[0], 2, torch.float16)
    for (a_out, a_lse), (b_out, b_lse) in zip(*runs):
        assert torch.equal(a_out, b_out) and torch.equal(a_lse, b_lse)


def test_tune_bucket_separates_grid_sizes(monkeypatch):
    """The autotuning key of v2's launches (their SEQ_BUCKET argument) holds the length's bucket and the class of the
    grid's work in waves of 128-row tiles over the SMs (4 on the CPU): a batch-1 call and a full batch of the same
    length tune apart. The forward and the backward pass it (the spy sees both, with heads x sequences)."""
    from hf_flashattn.kernels import _common as C
    cpu = torch.device("cpu")
    assert [C.pow2(n) for n in (1, 2, 3, 64, 65, 1000, 65536)] == [1, 2, 4, 64, 128, 1024, 65536]
    assert [C.tune_bucket(100, t, cpu) % 4 for t in (1, 3, 4, 7, 8, 15, 16, 1000)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [C.tune_bucket(300, t, cpu) % 4 for t in (1, 2, 3, 5, 6)] == [0, 1, 2, 2, 3]   # 3 tiles a pair
    assert C.tune_bucket(100, 16, cpu) // 4 == C.seq_bucket(100) == 128
    assert C.tune_bucket(100, 1, cpu) != C.tune_bucket(100, 16, cpu) != C.tune_bucket(300, 16, cpu)
    seen = []
    real = C.tune_bucket
    monkeypatch.setattr(C, "tune_bucket", lambda n, pairs, device: seen.append((n, pairs)) or real(n, pairs, device))
    q, k, v, do = kernel_inputs((2, 130, 70, 4, 2, 16), torch.float32, seed=3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    fa.flash_attn_func(q, k, v, causal=True, version="v2").backward(do)
    assert seen == [(130, 2 * 4), (130, 2 * 4)]


def test_v2_halves_need_the_folded_scale():
    """The HALVES configs are offered only where the scale is folded into the exponent without softcap (what their
    block update is written for); the other configs everywhere."""
    from hf_flashattn.kernels import v2
    cfgs = v2._fwd_configs()
    n_halves = sum(1 for c in v2._FWD_CONFIGS[128] if c[5:6] == (True,))
    on = v2.prune_fwd(cfgs, {}, BLOCK_D=128, FOLD=True, SOFTCAP=False)
    assert n_halves and sum(1 for c in on if c.kwargs.get("HALVES")) == n_halves
    for off in (v2.prune_fwd(cfgs, {}, BLOCK_D=128, FOLD=False, SOFTCAP=False),
                v2.prune_fwd(cfgs, {}, BLOCK_D=128, FOLD=True, SOFTCAP=True)):
        assert len(off) == len(on) - n_halves and not any(c.kwargs.get("HALVES") for c in off)


# v2's forward with the scale folded into the exponent (the default where there is no softcap and the scale is
# positive) and without (the scores scaled first): both within the rule, over masks with a masked edge and a tail.
@pytest.mark.parametrize("fold", [True, False], ids=["fold", "no-fold"])
@pytest.mark.parametrize("shape,mask", [((1, 113, 203, 4, 1, 40), {"causal": True}),
                                        ((2, 70, 70, 4, 2, 32), {"window_size": (20, 5)})], ids=["causal", "window"])
def test_v2_fold(fold, shape, mask, monkeypatch):
    from hf_flashattn.kernels import v2
    monkeypatch.setattr(v2, "FOLD", fold)
    q, k, v, do = kernel_inputs(shape, torch.float16, seed=15)
    check_kernel("v2", q, k, v, do, torch.float16, softmax_scale=0.3, **mask)


@pytest.mark.parametrize("host", [True, False], ids=["host", "in-kernel"])
def test_v3_varlen_load_paths(host):
    """Packed sequences through descriptors over the whole packed tensors: a tile that runs past its sequence
    reads the next one's rows (masked as keys past the end) and must not write them (masked store)."""
    from hf_flashattn.kernels import v3
    lens = [5, 0, 1, 40, 23, 33]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(sum(lens), h, 24, generator=g).half() for h in (4, 2, 2))
    for causal in (False, True):
        win = (-1, 0) if causal else (-1, -1)
        out, lse = v3.forward(q, k, v, cu, cu, max(lens), max(lens), 0.2, win, 0.0, _plan=((32, 16, 4, 1), host, False))
        for i, n in enumerate(lens):
            a, b = cu[i].item(), cu[i + 1].item()
            if n == 0:
                continue
            ref = ref_grads(q[None, a:b], k[None, a:b], v[None, a:b], torch.zeros_like(q[None, a:b]), causal=causal,
                            softmax_scale=0.2)
            low = ref_grads(q[None, a:b], k[None, a:b], v[None, a:b], torch.zeros_like(q[None, a:b]), causal=causal,
                            softmax_scale=0.2, compute_dtype=None)
            assert_close_rule(f"out[seq {i}]", out[None, a:b], ref[0], low[0], 2, torch.float16)
            assert_close_rule(f"lse[seq {i}]", lse[:, a:b][None], ref[1], low[1].float(), 2, torch.float32)


@pytest.mark.parametrize("shape,kw", [((1, 113, 203, 4, 1, 40), {"causal": True}),
                                      ((2, 45, 45, 4, 2, 32), {"window_size": (9, 3), "softcap": 5.0}),
                                      ((1, 29, 13, 2, 2, 16), {"causal": True})],
                         ids=["113x203-causal-mqa-d40", "gqa-window-softcap", "q-longer"])
def test_backward_descriptor_loads_equal_pointer_loads(shape, kw):
    """The backward's inner-loop tiles through host-made descriptors (Hopper's TMA path): bitwise the pointer
    loads' gradients (a tile running past the sequence brings zeros, or the next packed sequence's rows, which
    P = 0 multiplies away)."""
    from hf_flashattn.kernels import v2_bwd
    q, k, v, do = kernel_inputs(shape, torch.float16, seed=14)
    grads, before = {}, v2_bwd.TMA
    try:
        for tma in (False, True):
            v2_bwd.TMA = tma
            grads[tma] = run_kernel("v2", q, k, v, do, **kw)[2:]
    finally:
        v2_bwd.TMA = before
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)


def test_backward_descriptor_loads_varlen():
    from hf_flashattn.kernels import v2_bwd
    lens = [5, 0, 1, 40, 23, 33]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(15)
    q, k, v, do = (torch.randn(sum(lens), h, 24, generator=g).half() for h in (4, 2, 2, 4))
    grads, before = {}, v2_bwd.TMA
    try:
        for tma in (False, True):
            v2_bwd.TMA = tma
            grads[tma] = run_kernel_varlen("v2", q, k, v, do, (cu, cu), causal=True)[2:]
    finally:
        v2_bwd.TMA = before
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)
    check_kernel("v2", q, k, v, do, torch.float16, cu=(cu, cu), causal=True)


def test_descriptor_loads_keep_packed_sequences_apart(monkeypatch):
    """Packed sequences through descriptors over the whole packed tensors (v3's forward, the backward with TMA):
    a tile that runs past its sequence reads the next one's rows or the padding after cu_seqlens[-1]. Here those
    rows hold inf and NaN: no sequence's output or gradient may see them, and the forward must not write past
    its sequence (the output's rows outside every sequence stay as allocated: NaN here)."""
    from hf_flashattn.kernels import v2_bwd, v3
    lens = [23, 40, 5]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    total = sum(lens) + 9                                     # 9 rows of padding after the last sequence
    g = torch.Generator().manual_seed(16)
    q, k, v, do = (torch.randn(total, h, 24, generator=g).half() for h in (4, 2, 2, 4))
    for t in (q, k, v, do):
        t[sum(lens):] = float("nan")
    k[cu[1]] = float("inf")                                   # the first row of sequence 1
    v[cu[1]] = float("inf")
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan")))
    out, lse = v3.forward(q, k, v, cu, cu, max(lens), max(lens), 0.2, (-1, 0), 0.0, _plan=((32, 16, 4, 1), True, False))
    monkeypatch.setattr(torch, "empty", empty)
    assert torch.isnan(out[sum(lens):]).all()                # never written
    assert torch.isfinite(out[:cu[1]]).all()                 # sequence 0 does not see sequence 1's inf
    before = v2_bwd.TMA
    try:
        v2_bwd.TMA = True
        dq, dk, dv = v2_bwd.backward(do, q, k, v, out, lse, cu, cu, max(lens), max(lens), 0.2, (-1, 0), 0.0)
    finally:
        v2_bwd.TMA = before
    for name, grad in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(grad[:cu[1]]).all(), name      # sequence 0
        assert torch.isfinite(grad[cu[2]:sum(lens)]).all(), name   # sequence 2, next to the NaN padding


def test_v3_refuses_what_tma_cannot_load():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(NotImplementedError, match="float16/bfloat16 only"):
        fa.flash_attn_func(q, q, q, version="v3")
    base = torch.randn(1 * 8 * 2 * 16 + 1).half()
    misaligned = base[1:].view(1, 8, 2, 16)             # data pointer off by 2 bytes
    with pytest.raises(NotImplementedError, match="16-byte aligned q"):
        fa.flash_attn_func(misaligned, misaligned, misaligned, version="v3")


@pytest.mark.parametrize("split", ["1", "0"], ids=["split-kv", "main-kernel"])
def test_v2_decode_shapes_both_kernels(split, monkeypatch):
    """v2 sends decode-like shapes (seqlen_q <= 16, many keys) to the split-KV kernel; both kernels
    meet the rule, forward and backward (the backward only needs out and lse)."""
    monkeypatch.setenv("HF_FLASHATTN_SPLITKV", split)
    from hf_flashattn.kernels import v2
    q, k, v, do = kernel_inputs((2, 3, 90, 8, 2, 32), torch.float32, seed=12)
    assert v2.use_split_kv(q, k, False) == (split == "1")
    for mask in MASKS:
        check_kernel("v2", q, k, v, do, torch.float32, **mask)


_STAGGER_ON = dict(varlen=False, mask=0, one_loop=True, d=256, pairs=32 * 8, seqlen_q=512, seqlen_k=512, group=1)


@pytest.mark.parametrize("change,on", [
    ({}, True), ({"d": 192}, True), ({"seqlen_k": 256, "seqlen_q": 256, "pairs": 64 * 8}, True),
    ({"seqlen_k": 1024}, True),
    ({"d": 128}, False), ({"d": 64}, False), ({"mask": 1}, False), ({"mask": 2}, False), ({"varlen": True}, False),
    ({"one_loop": False}, False), ({"seqlen_k": 2048}, False), ({"seqlen_k": 128}, False),
    ({"pairs": 8}, False), ({"group": 4}, False), ({"hopper": False}, False)])
def test_v2_stagger_rule(change, on, monkeypatch):
    """`v2.STAGGER`'s rule (`_stagger_args`): the second wave's starts spread over a ramp of STAGGER_NS_PER_KEY ns a
    key only on Hopper, dense, unmasked, one-loop, without GQA, head-dim class 256, keys in STAGGER_KEYS and at least
    STAGGER_MIN_WAVES waves of 128-row tiles; (0, 0, 0, 0) (no delay, STAGGER constexpr off) anywhere else."""
    from hf_flashattn.kernels import _common as C
    from hf_flashattn.kernels import v2
    kw = dict(_STAGGER_ON, **{k: v for k, v in change.items() if k != "hopper"})
    monkeypatch.setattr(C, "_INTERPRETING", False)
    monkeypatch.setattr(C, "num_sms", lambda device: 132)
    monkeypatch.setattr(v2, "is_hopper", lambda device: change.get("hopper", True))
    got = v2._stagger_args(torch.device("cuda", 0), **kw)
    assert got == ((132, 264, 0, v2.STAGGER_NS_PER_KEY * kw["seqlen_k"]) if on else (0, 0, 0, 0))


def test_v2_stagger_switch(monkeypatch):
    """STAGGER "off" turns the rule off; a tuple (lo, hi, ns, ramp) is taken in units of SMs wherever the rule would
    not apply; on Triton's interpreter or a CPU tensor nothing is delayed (inline PTX only compiles for the GPU)."""
    from hf_flashattn.kernels import _common as C
    from hf_flashattn.kernels import v2
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(C, "_INTERPRETING", False)
    monkeypatch.setattr(C, "num_sms", lambda device: 100)
    monkeypatch.setattr(v2, "is_hopper", lambda device: True)
    monkeypatch.setattr(v2, "STAGGER", "off")
    assert v2._stagger_args(cuda, **_STAGGER_ON) == (0, 0, 0, 0)
    monkeypatch.setattr(v2, "STAGGER", (0.5, 2.0, 7000.0, 100.0))
    assert v2._stagger_args(cuda, True, 1, False, 64, 1, 16, 16) == (50, 200, 7000, 100)
    assert v2._stagger_args(torch.device("cpu"), **_STAGGER_ON) == (0, 0, 0, 0)
    monkeypatch.setattr(C, "_INTERPRETING", True)
    monkeypatch.setattr(v2, "STAGGER", None)
    assert v2._stagger_args(cuda, **_STAGGER_ON) == (0, 0, 0, 0)


@pytest.mark.parametrize("text,want", [("", None), (" ", None), ("0", "off"), ("1,2,0,14000", (1.0, 2.0, 0.0, 14000.0)),
                                       ("0.5, 1, 7000, 0", (0.5, 1.0, 7000.0, 0.0)), ("1,2", ValueError),
                                       ("abc", ValueError), ("1,2,3,4,5", ValueError), ("2,1,0,0", ValueError),
                                       ("1,2,-5,0", ValueError)])
def test_v2_stagger_env(text, want):
    """HF_FLASHATTN_V2_STAGGER's parse (`v2.parse_stagger`): unset -> the rule, 0 -> off, four numbers -> the override;
    anything else a ValueError naming the variable and the accepted forms, not an unpack error at the first call."""
    from hf_flashattn.kernels import v2
    if want is ValueError:
        with pytest.raises(ValueError, match=r"HF_FLASHATTN_V2_STAGGER=.*set it to 0.*LO,HI,NS,RAMP"):
            v2.parse_stagger(text)
    else:
        assert v2.parse_stagger(text) == want


_COMPILE_V2 = r"""
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hf_flashattn.kernels import v2
fn = v2._fwd_kernel
spec = json.loads(sys.argv[1])
ptr = "*" + spec["dtype"]
sig = {}
for i, name in enumerate(fn.arg_names):
    if fn.params[i].is_constexpr:
        sig[name] = "constexpr"
    else:
        sig[name] = {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "LSE": "*fp32", "CU_Q": "*i32",
                     "CU_K": "*i32", "qk_scale": "fp32", "cap_scale": "fp32"}.get(name, "i32")
cx = dict(IS_VARLEN=False, SOFTCAP=False, DOT_PREC="tf32", FOLD=True, LEFT=False, ONE_LOOP=True, **spec["cx"])
src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in cx.items()})
asm = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                     options=dict(num_warps=spec["warps"], num_stages=spec["stages"])).asm
print(json.dumps({"ptx": asm["ptx"], "ttir": asm["ttir"], "kept": bool(v2.EDGE_BRANCH_KEPT)}))
"""


def _compile_v2_fwd(cx, warps, stages, dtype):
    """v2's `_fwd_kernel` compiled for sm_90a with the constexprs `cx` (over a dense, folded, one-loop default) in a
    fresh process (this one runs Triton's interpreter): its PTX and TTIR, and `v2.EDGE_BRANCH_KEPT` there."""
    import json
    import os
    import subprocess
    import sys
    spec = json.dumps(dict(cx=cx, warps=warps, stages=stages, dtype=dtype))
    r = subprocess.run([sys.executable, "-c", _COMPILE_V2, spec], capture_output=True, text=True,
                       env=dict(os.environ, TRITON_INTERPRET="0"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_v2_stagger_compiles_for_hopper():
    """v2's forward with STAGGER compiles for sm_90a as the rule launches it (d256, 128 x 64, 8 warps): its PTX naps
    (`nanosleep`) and reads the global timer; without STAGGER it does neither."""
    ptx = {on: _compile_v2_fwd(dict(HEAD_DIM=256, BLOCK_D=256, BLOCK_M=128, BLOCK_N=64, D_CLASS=256, STAGGER=on), 8, 2,
                               "bf16")["ptx"] for on in (True, False)}
    assert "nanosleep.u32" in ptx[True] and "%globaltimer" in ptx[True]
    assert "nanosleep" not in ptx[False] and "globaltimer" not in ptx[False]
    assert ptx[True].count("wgmma.mma_async") == ptx[False].count("wgmma.mma_async") > 0


def _loop_bodies(ttir):
    """The text of each `scf.for` region in a TTIR listing (brace-matched)."""
    bodies = []
    pos = ttir.find("scf.for")
    while pos >= 0:
        start = ttir.index("{", pos)
        depth, i = 0, start
        while True:
            depth += {"{": 1, "}": -1}.get(ttir[i], 0)
            if depth == 0:
                break
            i += 1
        bodies.append(ttir[start:i + 1])
        pos = ttir.find("scf.for", start)
    return bodies


def test_v2_one_loop_edge_branch_by_triton_release():
    """The one loop's mask branch (`_fwd_loop`'s EDGE) is compiled into the loop under a mask always, and without a mask
    only where `v2.EDGE_BRANCH_KEPT` (Triton <= 3.8, which keeps it a branch; 3.9 if-converts it, so the unmasked loop
    would compute the mask on every block): the TTIR of the kernel's loop holds an `scf.if` exactly then."""
    got = {no_mask: _compile_v2_fwd(dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_M=64, BLOCK_N=64, D_CLASS=64, NO_MASK=no_mask,
                                         EVEN=True), 4, 2, "fp16") for no_mask in (True, False)}
    for no_mask, res in got.items():
        bodies = _loop_bodies(res["ttir"])
        assert bodies, "no loop in the kernel's TTIR"
        branch = any("scf.if" in b for b in bodies)
        assert branch == (not no_mask or res["kept"]), (no_mask, res["kept"], [b.count("scf.if") for b in bodies])
