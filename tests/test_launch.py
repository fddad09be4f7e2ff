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
