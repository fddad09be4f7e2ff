"""The host-side shortcuts of a call (kernels/_common.py, kernels/v3.py), on the CPU: what they keep between calls
and when they must not reuse it. The direct launches themselves run on the GPU only; there they are checked bitwise
against Triton's entry point (benchmarks/probe_host.py, results/2026-11-26-h100-probe-host*.md)."""
from __future__ import annotations

import pytest
import torch

from hf_flashattn.kernels import _common as C, v3


def _fields(d):
    return {k: v for k, v in d.__dict__.items() if k != "base"}


def test_descriptor_takes_each_new_base_and_keeps_the_rest():
    """C.descriptor builds a descriptor from the fields of the first one of its kind: the base must be the new
    tensor every time, the other fields those from_tensor would give."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    a = torch.randn(2, 64, 4, 32, dtype=torch.float16)
    b = torch.randn(2, 64, 4, 32, dtype=torch.float16)
    da = C.descriptor(TensorDescriptor, a, (1, 16, 1, 32))
    db = C.descriptor(TensorDescriptor, b, (1, 16, 1, 32))
    ref = TensorDescriptor.from_tensor(b, [1, 16, 1, 32])
    assert da.base is a and db.base is b and type(db) is TensorDescriptor
    assert _fields(db) == _fields(ref)
    # block, strides, shape and dtype each give another descriptor
    assert list(C.descriptor(TensorDescriptor, b, (1, 32, 1, 32)).block_shape) == [1, 32, 1, 32]
    t = b.transpose(1, 2).contiguous().transpose(1, 2)           # same shape, other strides
    assert tuple(C.descriptor(TensorDescriptor, t, (1, 16, 1, 32)).strides) == t.stride()
    c = torch.randn(2, 48, 4, 32, dtype=torch.float16)
    assert tuple(C.descriptor(TensorDescriptor, c, (1, 16, 1, 32)).shape) == (2, 48, 4, 32)


def test_descriptor_checks_alignment_again_for_an_unaligned_base():
    """The base's alignment is part of the key: an unaligned tensor of a known shape is checked by from_tensor (and
    refused) rather than given the fields of an aligned one."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    buf = torch.zeros(2 * 64 * 4 * 32 + 8, dtype=torch.float16)
    ok = buf[:-8].view(2, 64, 4, 32)
    odd = buf[4:-4].view(2, 64, 4, 32)                          # 8 bytes off
    C.descriptor(TensorDescriptor, ok, (1, 16, 1, 32))
    with pytest.raises(AssertionError, match="16-byte aligned"):
        C.descriptor(TensorDescriptor, odd, (1, 16, 1, 32))


def test_fast_launch_generic_key_refuses_descriptor_arguments():
    """Triton specialises a kernel on a descriptor's block and layout, which FastLaunch's generic key does not see:
    such launches must give their own key (keyed), so the generic key refuses them by name."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    fl = v3._fwd_launch
    t = torch.zeros(1, 16, 1, 32, dtype=torch.float16)
    d = TensorDescriptor.from_tensor(t, [1, 16, 1, 32])
    with pytest.raises(TypeError, match="TensorDescriptor.*keyed"):
        fl._key((d, 3), {}, 0)


def test_keyed_launch_checks_the_argument_count():
    with pytest.raises(TypeError, match="runtime arguments"):
        v3._fwd_launch.keyed(("k",), (1, 1, 1), 1, 2)


def test_route_is_kept_per_input_signature(monkeypatch):
    """v3._route keeps supports()'s and _gluon_plan()'s answers per input signature: a misaligned tensor of a seen
    shape, another dtype or the HF_FLASHATTN_V3_GLUON switch each get their own answer."""
    q = torch.zeros(1, 64, 2, 64, dtype=torch.float16)
    assert v3._route(q, q, q, None, 64, 0.125, (-1, -1), 0.0) == (None, None)   # CPU: no Gluon plan
    buf = torch.zeros(q.numel() + 4, dtype=torch.float16)
    odd = buf[4:].view(1, 64, 2, 64)                                            # 8 bytes off
    why, _ = v3._route(odd, q, q, None, 64, 0.125, (-1, -1), 0.0)
    assert why is not None and "16-byte" in why
    why, _ = v3._route(q.float(), q.float(), q.float(), None, 64, 0.125, (-1, -1), 0.0)
    assert "float16/bfloat16" in why
    calls = []
    monkeypatch.setattr(v3, "_gluon_plan", lambda *a: calls.append(a) or "plan")
    monkeypatch.setenv("HF_FLASHATTN_V3_GLUON", "1")
    assert v3._route(q, q, q, None, 64, 0.125, (-1, -1), 0.0) == (None, "plan")
    assert v3._route(q, q, q, None, 64, 0.125, (-1, -1), 0.0) == (None, "plan") and len(calls) == 1


# A stand-in for Triton 3.6's launcher, in the form `C._Raw.of` accepts: a CudaLauncher-like object of a driver module
# with _BASE_ARGS_FORMAT, whose `launch` is wrap_handle_tensordesc's closure around the C function of a
# `__triton_launcher` module.
def _fake_compiled(monkeypatch, metas, module="__triton_launcher", scratch=0):
    import sys
    import types
    drv = types.ModuleType("fake_triton36_driver")
    drv._BASE_ARGS_FORMAT = "iiiKKppOOOOOO"
    drv.TMA_DTYPE_DEVICE_TO_HOST = {i: i for i in range(16)}
    drv.TMA_DTYPE_DEVICE_TO_HOST[8] = 10
    monkeypatch.setitem(sys.modules, drv.__name__, drv)
    calls = []

    def c_launch(*a):
        calls.append(a)
    c_launch.__module__ = module

    def wrap(launcher, tensordesc_meta, tensordesc_indices):
        def inner(*args):   # (the real one expands the descriptors: not called by the direct launch)
            assert tensordesc_meta is not None and tensordesc_indices is not None
            return launcher(*args)
        return inner

    CudaLauncher = type("CudaLauncher", (), {"__module__": drv.__name__})
    run = CudaLauncher()
    run.launch = wrap(c_launch, metas, set(range(len(metas))))
    run.global_scratch_size, run.profile_scratch_size = scratch, 0
    run.launch_cooperative_grid, run.launch_pdl = False, True
    compiled = types.SimpleNamespace(run=run, function=1234, packed_metadata=(4, 1, 0))
    return compiled, calls


def _meta(block, elem_type=8):
    return {"swizzle": 3, "elem_size": 2, "elem_type": elem_type, "block_size": list(block), "fp4_padded": False}


def test_raw_launch_expands_arguments_as_triton_36_does(monkeypatch):
    """The direct launch hands Triton 3.6's C launcher what its Python wrapper would: the 13 base arguments, each
    tensor as its address, each descriptor as [CUtensorMap, *shape, *strides] (the map encoded from the tensor's
    address, shape and strides with the kernel's dtype, block and swizzle), then the constexprs; a map is encoded
    once per (argument, address, shape, strides) and again for a new address or a new layout."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    fills = []
    monkeypatch.setattr(C, "_tma_fill", lambda: lambda *a: fills.append(a) or ("map", len(fills)))
    compiled, calls = _fake_compiled(monkeypatch, [_meta((1, 16, 1, 32)), _meta((1, 32, 1, 32))])
    q = torch.zeros(2, 64, 4, 32, dtype=torch.float16)
    k = torch.zeros(2, 48, 4, 32, dtype=torch.float16).transpose(1, 2).contiguous().transpose(1, 2)
    o = torch.zeros(3, dtype=torch.float32)

    def args(q, k):
        return [C.Tma(TensorDescriptor, q, (1, 16, 1, 32)), o, None, 7, 0.5, C.Tma(TensorDescriptor, k, (1, 32, 1, 32))]
    raw = C._Raw.of(compiled, args(q, k))
    assert raw is not None
    raw(5, 2, 1, 99, args(q, k), (64, True))
    head = (5, 2, 1, 99, 1234, False, True, None, None, (4, 1, 0), None, None, None)
    want = (*head, ("map", 1), *q.shape, *q.stride(), o.data_ptr(), None, 7, 0.5, ("map", 2), *k.shape, *k.stride(),
            64, True)
    assert calls[-1] == want
    assert fills == [(q.data_ptr(), 3, 2, 10, [1, 16, 1, 32], q.shape, q.stride(), 0),
                     (k.data_ptr(), 3, 2, 10, [1, 32, 1, 32], k.shape, k.stride(), 0)]
    raw(5, 2, 1, 99, args(q, k), (64, True))                    # same tensors: the kept maps
    assert len(fills) == 2 and calls[-1] == want
    q2 = torch.zeros_like(q)
    raw(5, 2, 1, 99, args(q2, k), (64, True))                   # a new address: a new map for that argument only
    assert len(fills) == 3 and fills[-1][0] == q2.data_ptr() and calls[-1][13] == ("map", 3)
    kt = k.contiguous()                                         # same address space, other strides
    raw(5, 2, 1, 99, args(q2, kt), (64, True))
    assert len(fills) == 4 and fills[-1][6] == kt.stride()


def test_raw_launch_declines_other_launcher_forms(monkeypatch):
    """`_Raw.of` answers None (the launch goes through CompiledKernel.run) for anything but the form it was written
    for: another launcher module (Triton 3.7+'s generic launch), global scratch, a descriptor given as an object
    rather than a Tma, descriptors without TMA metadata."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    monkeypatch.setattr(C, "_tma_fill", lambda: None)
    t = torch.zeros(1, 16, 1, 32, dtype=torch.float16)
    spec = C.Tma(TensorDescriptor, t, (1, 16, 1, 32))
    compiled, _ = _fake_compiled(monkeypatch, [_meta((1, 16, 1, 32))])
    assert C._Raw.of(compiled, [spec, 1]) is not None
    assert C._Raw.of(compiled, [spec.make(), 1]) is None
    assert C._Raw.of(_fake_compiled(monkeypatch, [_meta((1, 16, 1, 32))], module="cuda_utils")[0], [spec]) is None
    assert C._Raw.of(_fake_compiled(monkeypatch, [_meta((1, 16, 1, 32))], scratch=128)[0], [spec]) is None
    assert C._Raw.of(_fake_compiled(monkeypatch, [None])[0], [spec]) is None


def test_tma_argument_is_made_into_the_same_descriptor():
    """Where Triton's launcher needs the object (the first call, the interpreter, other launchers), a Tma becomes
    the descriptor C.descriptor makes."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    t = torch.zeros(2, 64, 4, 32, dtype=torch.float16)
    d = C._materialise([C.Tma(TensorDescriptor, t, (1, 16, 1, 32)), 3])[0]
    ref = TensorDescriptor.from_tensor(t, [1, 16, 1, 32])
    assert d.base is t and _fields(d) == _fields(ref)


def _record(monkeypatch, *launchers):
    calls = []
    for name, fl in launchers:
        monkeypatch.setattr(fl, "launch", lambda key, grid, args, meta, name=name, fl=fl:
                            calls.append((name, fl.n_runtime, key, grid, tuple(args), dict(meta))))
    return calls


def _tma_ok(a, t, block):
    """A Tma argument over t's memory (t itself or its packed (1, total, ...) view) with this block."""
    return (type(a) is C.Tma and a.t.data_ptr() == t.data_ptr() and a.block == block
            and tuple(a.t.shape[-t.dim():]) == tuple(t.shape))


@pytest.mark.parametrize("case", ["short", "single", "d256", "packed", "window", "out_unaligned"])
def test_gluon_backward_hands_each_launch_the_call_tensors_and_their_strides(monkeypatch, case):
    """v3_gluon_bwd.backward keeps everything but the tensors per call signature (`_Setup`); the kernels are GPU-only,
    so here each launch is recorded instead: its argument count must be the kernel's, every tensor argument the call's
    own (a second call with new tensors hands the new ones) and every stride the tensor's own, as reading them from
    the tensors would give. out_unaligned: an O that TMA cannot read (its address not 16-byte aligned) makes the dQ
    pass load O by pointers (PREP 1), with no descriptor over it."""
    from hf_flashattn.kernels import v3_gluon_bwd as GB
    if not GB.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    calls = _record(monkeypatch, ("prep", GB._prep_launch), ("bwd", GB._bwd_launch), ("dq", GB._dq_launch))
    D = {"d256": 256}.get(case, 128 if case != "single" else 64)
    S = 2048 if case == "single" else 192
    window = {"window": (40, 0), "packed": (-1, 0)}.get(case, (-1, -1))
    H, Hk = 4, 2
    lens = [50, 90, 52]
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        if case == "packed":
            mk = lambda h: torch.randn(sum(lens), h, D, generator=g, dtype=torch.float16)  # noqa: E731
            cu = torch.tensor([0, 50, 140, 192], dtype=torch.int32)
            B, Sq, Sk = 3, 90, 90
            lse = torch.randn(H, sum(lens))
        else:
            mk = lambda h: torch.randn(2, S, h, D, generator=g, dtype=torch.float16)  # noqa: E731
            cu = None
            B, Sq, Sk = 2, S, S
            lse = torch.randn(2, H, S)
        q, k, v, do, out = mk(H), mk(Hk), mk(Hk), mk(H), mk(H)
        if case == "out_unaligned":   # the same values 2 bytes further on
            out = torch.empty(out.numel() + 1, dtype=out.dtype)[1:].view(out.shape).copy_(out)
            assert out.data_ptr() % 16
        gplan = GB.plan(D, False, Sk, window)
        calls.clear()
        dq, dk, dv = GB.backward(do, q, k, v, out, lse, cu, cu, Sq, Sk, 0.125, window, _plan=gplan)
        names = [c[0] for c in calls]
        mode = gplan[5]
        kv = ["bwd", "bwd"] if D == 256 else ["bwd"]
        # two passes: the dQ pass first, working out lse and Delta itself (FUSED_PREP); the single pass: the prep
        # kernel, then dK/dV with dQ summed
        assert names == (["dq"] + kv if mode == 0 else ["prep"] + kv)
        for name, n_runtime, _, _, args, _ in calls:
            assert len(args) == n_runtime, name
        lay = lambda t: C.seq_layout(t, cu is not None)  # noqa: E731
        left, right = C.window_args(window, Sq, Sk)
        stride_l = (0, lse.stride(0)) if cu is not None else (lse.stride(0), lse.stride(1))
        if mode == 0:
            lse2, delta = calls[0][4][12], calls[0][4][13]   # after the six descriptors, dq and cu_seqlens
        else:   # prep: out, dO, lse in; lse2 and Delta out
            args = calls[0][4]
            lse2, delta = args[3], args[4]
            assert args[0] is out and args[1] is do and args[2] is lse and args[5] is cu
            assert args[6:] == (*lay(out), *lay(do), *stride_l, lse2.stride(0), lse2.stride(1), Sq)
        assert lse2.dtype == delta.dtype == torch.float32 and lse2.shape == delta.shape == (B, H, lse2.shape[-1])
        assert lse2.shape[-1] >= C.cdiv(Sq, 128) * 128   # every row of the dQ pass's 128-row tiles
        # dK/dV (and the single pass's dQ)
        args = calls[names.index("bwd")][4]
        bm = gplan[0]
        # dK's and dV's descriptors where they leave by TMA stores (KV_OUT), else K's again (not read)
        meta = calls[names.index("bwd")][5]
        assert meta["KV_OUT"] == GB.kv_out_for(D, gplan, meta["DO_DQ"], cu is not None, meta["KV_SLOTS"])
        if meta["KV_OUT"]:
            assert _tma_ok(args[7], dk, (1, 64, 1, D)) and _tma_ok(args[8], dv, (1, 64, 1, D))
        else:
            assert args[7] is args[1] and args[8] is args[1]
        args = args[:7] + args[9:]
        acc = args[7]
        assert args[8] is dk and args[9] is dv and args[10] is cu and args[11] is cu
        assert _tma_ok(args[0], q, (1, bm, 1, D)) and _tma_ok(args[1], k, (1, 64, 1, D))
        assert _tma_ok(args[2], v, (1, 64, 1, D)) and _tma_ok(args[3], do, (1, bm, 1, D))
        assert args[4].t.data_ptr() == lse2.data_ptr() and args[5].t.data_ptr() == delta.data_ptr()
        assert tuple(args[4].t.shape) == (B * H, lse2.shape[-1]) and args[4].block == (1, bm)
        if mode >= 5:
            assert _tma_ok(args[6], acc, (1, bm, 1, 64)) and acc.dtype == torch.float32
            assert torch.equal(dq, (acc[:, :Sq]).to(q.dtype))
        else:
            assert acc is dq
        assert args[12:21] == (*acc.stride()[:3], *lay(dk), *lay(dv))
        assert args[21:27] == (Sq, Sk, left, right, C.score_scales(0.125, 0.0)[0], 0.125)
        assert args[27:29] == (H // Hk, H)
        if mode == 0:   # the dQ pass: also reads out and the forward's lse (their strides) for lse2 and Delta
            args = calls[0][4]
            bn = GB._DQ_PLANS[D][0]
            assert _tma_ok(args[0], q, (1, 64, 1, D)) and _tma_ok(args[1], k, (1, bn, 1, D))
            assert _tma_ok(args[2], v, (1, bn, 1, D)) and _tma_ok(args[3], do, (1, 64, 1, D))
            assert _tma_ok(args[4], dq, (1, 64, 1, D))
            # O by TMA at d64/d128 (the dQ pass's PREP 2), by pointer loads at d256 and where TMA cannot read O
            # (the descriptor argument is then dO's and not read)
            by_tma = D <= 128 and case != "out_unaligned"
            assert _tma_ok(args[5], out if by_tma else do, (1, 64, 1, D))
            assert calls[0][5]["PREP"] == (2 if by_tma else 1)
            args = args[:5] + args[6:]
            assert args[5] is dq and args[6] is cu and args[7] is cu
            assert args[8:11] == lay(dq) and args[11] is lse2 and args[12] is delta
            assert args[13:15] == (lse2.stride(0), lse2.stride(1))
            assert args[15] is out and args[16] is lse and args[17:22] == (*lay(out), *stride_l)
            assert args[22:28] == (Sq, Sk, left, right, C.score_scales(0.125, 0.0)[0], 0.125)
    assert len(GB._SETUPS) >= 1


@pytest.mark.parametrize("packed", [False, True])
def test_gluon_forward_hands_the_launch_the_call_tensors_and_their_strides(monkeypatch, packed):
    """As the backward's test, for v3_gluon.forward's one launch."""
    from hf_flashattn.kernels import v3_gluon as G
    if not G.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    calls = _record(monkeypatch, ("fwd", G._fwd_launch))
    H, Hk, D = 4, 2, 128
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        if packed:
            q, k, v = (torch.randn(192, h, D, generator=g, dtype=torch.float16) for h in (H, Hk, Hk))
            cu = torch.tensor([0, 50, 140, 192], dtype=torch.int32)
            Sq = Sk = 90
        else:
            q, k, v = (torch.randn(2, s, h, D, generator=g, dtype=torch.float16)
                       for s, h in ((100, H), (160, Hk), (160, Hk)))
            cu, Sq, Sk = None, 100, 160
        calls.clear()
        out, lse = G.forward(q, k, v, Sq, Sk, 0.125, (-1, 0), cu_seqlens_q=cu, cu_seqlens_k=cu)
        (_, n_runtime, _, _, args, meta), = calls
        assert len(args) == n_runtime
        bn = G.plan(D, Sk, True, force=True)[1]
        assert _tma_ok(args[0], q, (1, 64, 1, D)) and _tma_ok(args[1], k, (1, bn, 1, D))
        assert _tma_ok(args[2], v, (1, bn, 1, D)) and _tma_ok(args[3], out, (1, 64, 1, D))
        assert args[4] is out and args[5] is lse and args[6] is cu and args[7] is cu
        stride_l = (0, lse.stride(0)) if packed else (lse.stride(0), lse.stride(1))
        left, right = C.window_args((-1, 0), Sq, Sk)
        assert args[8:17] == (*C.seq_layout(out, packed), *stride_l, Sq, Sk, left, right)
        assert args[18] == H // Hk and meta["IS_VARLEN"] == packed


@pytest.mark.parametrize("shape", [(2, 0, 4), (1, 3, 2), (0, 5), (2, 3, 1, 4), (7,)])
def test_contiguous_strides_are_torch_empty_s(shape):
    """The setups take the strides of tensors they have not made yet from C.contiguous_strides: they must be the
    strides torch.empty gives, size-0 and size-1 dimensions included; layout_of reads them as seq_layout does."""
    assert C.contiguous_strides(shape) == torch.empty(shape).stride()
    t = torch.empty(2, 5, 3, 4)
    assert C.layout_of(t.stride(), False) == C.seq_layout(t, False)
    assert C.layout_of(t[0].stride(), True) == C.seq_layout(t[0], True)


def test_tuned_direct_launch_goes_raw_for_plain_arguments(monkeypatch):
    """`Launcher._direct` (the autotuned kernels' direct launch, GPU only; here with a stand-in autotuner and Triton
    3.6's launcher form): the first call of a key goes through the autotuner; later calls of plain arguments
    (tensors, numbers, None) go to Triton's C launcher itself, each tensor as its address and the tuned config's
    constexprs after the arguments, with no pre-hook; with a descriptor among the arguments they go through
    CompiledKernel.run with the pre-hook called first."""
    import types
    from hf_flashattn.kernels import v2_bwd
    monkeypatch.setattr(C, "_raw_stream", lambda device: 77)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    kernel = v2_bwd._dq_kernel
    L = C.Launcher(kernel, v2_bwd._dq_launch.configs, v2_bwd.prune_by_head_dim, v2_bwd._KEY, v2_bwd._INTERP)
    L.direct = C.FastLaunch(types.SimpleNamespace(fn=kernel.fn, params=[]))
    cfg = v2_bwd._dq_launch.configs[0]
    hooks, tuned_calls, runs = [], [], []
    cfg = types.SimpleNamespace(kwargs=dict(cfg.kwargs), pre_hook=lambda nargs: hooks.append(sorted(nargs)))
    n = L.direct.n_runtime
    names = kernel.arg_names[:n]

    def make(descriptor_arg):
        compiled, calls = _fake_compiled(monkeypatch, [])
        compiled._init_handles = lambda: None
        if descriptor_arg:
            compiled.run = lambda *a: runs.append(a)
        L.tuned = type("Tuner", (), {"best_config": cfg,
                                     "__getitem__": lambda self, grid: lambda *a, **m: tuned_calls.append(a)
                                     or compiled})()
        return calls
    t = torch.zeros(8, dtype=torch.float16)
    args = [t if nm.isupper() else 64 for nm in names]
    for i, nm in enumerate(names):
        if nm in ("qk_scale", "cap_scale", "ds_scale"):
            args[i] = 0.5
        if nm in ("CU_Q", "CU_K"):
            args[i] = None
    meta = dict(HEAD_DIM=64, BLOCK_D=64, IS_VARLEN=False, SOFTCAP=False, DOT_PREC="ieee", TMA=False)
    grid = lambda m: (3, 2, 1)   # noqa: E731
    calls = make(False)
    L._direct(grid, args, meta, ("site", 1))
    L._direct(grid, args, meta, ("site", 1))
    assert len(tuned_calls) == 1 and not hooks and len(calls) == 1
    got = calls[0]
    assert got[:4] == (3, 2, 1, 77)
    sent = got[13:13 + n]
    assert all(s == (a.data_ptr() if isinstance(a, torch.Tensor) else a) for s, a in zip(sent, args))
    assert got[13 + n:][:2] == tuple(dict(meta, **cfg.kwargs).get(nm, d) for nm, d in L.direct.constexprs)[:2]
    # a descriptor argument: CompiledKernel.run, the hook first
    from triton.tools.tensor_descriptor import TensorDescriptor
    desc = TensorDescriptor.from_tensor(torch.zeros(4, 64, 2, 64, dtype=torch.float16), [1, 16, 1, 64])
    args2 = list(args)
    args2[names.index("K_DESC")] = desc
    make(True)
    L._direct(grid, args2, meta, ("site", 2))
    L._direct(grid, args2, meta, ("site", 2))
    assert len(tuned_calls) == 2 and len(hooks) == 1 and len(runs) == 1 and runs[0][:4] == (3, 2, 1, 77)
