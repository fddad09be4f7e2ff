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
