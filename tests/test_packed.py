"""flash-attn's packed variants: flash_attn_qkvpacked_func, flash_attn_kvpacked_func and their varlen forms.

Each is flash_attn_func / flash_attn_varlen_func on views of the packed tensor, so the spec is that call: outputs, lse
and gradients bitwise equal to it (fp32 through the interpreter), the views taken without a copy, flash-attn's
signatures, and errors that name the packed argument.
"""
from __future__ import annotations

import inspect

import pytest
import torch

import hf_flashattn as fa
from hf_flashattn import interface

COMMON = ["dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "deterministic",
          "return_attn_probs", "version"]


@pytest.mark.parametrize("fn, first", [
    (fa.flash_attn_qkvpacked_func, ["qkv"]),
    (fa.flash_attn_kvpacked_func, ["q", "kv"]),
    (fa.flash_attn_varlen_qkvpacked_func, ["qkv", "cu_seqlens", "max_seqlen"]),
    (fa.flash_attn_varlen_kvpacked_func, ["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"]),
])
def test_signature_matches_flash_attn(fn, first):
    params = inspect.signature(fn).parameters
    assert list(params) == first + COMMON
    assert params["version"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["window_size"].default == (-1, -1) and params["causal"].default is False
    assert "without a copy" in fn.__doc__


def _grads(out, lse, leaves, seed=3):
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, generator=g)
    return torch.autograd.grad((out * do).sum() + lse.sum(), leaves)


def _check(packed_call, plain_call, packed_leaves, plain_leaves, dim):
    """Outputs and lse bitwise equal; the packed leaves' gradients bitwise the plain call's, the stacked leaf's being
    the plain gradients of what it stacks (the last len(plain_leaves) - len(packed_leaves) + 1 of them)."""
    out, lse, _ = packed_call()
    ref, ref_lse, _ = plain_call()
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    *grads, stacked = _grads(out, lse, packed_leaves)
    ref_grads = _grads(ref, ref_lse, plain_leaves)
    n = len(grads)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads[:n]))
    assert torch.equal(stacked, torch.stack(ref_grads[n:], dim=dim))


def _leaf(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _parts(packed, dim):
    return [t.clone().requires_grad_() for t in packed.detach().unbind(dim)]


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(5, 2), softcap=4.0)], ids=["causal", "window"])
def test_qkvpacked_equals_flash_attn_func(kw):
    qkv = _leaf(2, 29, 3, 4, 40, seed=0)
    parts = _parts(qkv, 2)
    _check(lambda: fa.flash_attn_qkvpacked_func(qkv, return_attn_probs=True, **kw),
           lambda: fa.flash_attn_func(*parts, return_attn_probs=True, **kw), [qkv], parts, dim=2)


def test_kvpacked_equals_flash_attn_func_with_gqa_and_fewer_queries():
    q, kv = _leaf(2, 13, 4, 32, seed=1), _leaf(2, 29, 2, 2, 32, seed=2)   # 4 query heads on 2 key/value heads
    k, v = _parts(kv, 2)
    _check(lambda: fa.flash_attn_kvpacked_func(q, kv, causal=True, return_attn_probs=True),
           lambda: fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True), [q, kv], [q, k, v], dim=2)


def test_varlen_qkvpacked_equals_flash_attn_varlen_func():
    cu = torch.tensor([0, 5, 18, 29], dtype=torch.int32)
    qkv = _leaf(29, 3, 2, 24, seed=4)
    parts = _parts(qkv, 1)
    _check(lambda: fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 13, causal=True, return_attn_probs=True),
           lambda: fa.flash_attn_varlen_func(*parts, cu, cu, 13, 13, causal=True, return_attn_probs=True),
           [qkv], parts, dim=1)


def test_varlen_kvpacked_equals_flash_attn_varlen_func_with_mqa():
    cu_q, cu_k = torch.tensor([0, 1, 9], dtype=torch.int32), torch.tensor([0, 17, 23], dtype=torch.int32)
    q, kv = _leaf(9, 4, 16, seed=5), _leaf(23, 2, 1, 16, seed=6)        # MQA: one key/value head
    k, v = _parts(kv, 1)
    _check(lambda: fa.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 8, 17, window_size=(6, 0),
                                                      return_attn_probs=True),
           lambda: fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 8, 17, window_size=(6, 0), return_attn_probs=True),
           [q, kv], [q, k, v], dim=1)


def test_views_reach_the_kernels_without_a_copy_and_options_pass_through(monkeypatch):
    seen = {}

    def recording(q, k, v, *args):
        seen.update(ptrs=[t.data_ptr() for t in (q, k, v)], args=args)
        return q, None

    monkeypatch.setattr(interface, "_attention", recording)
    qkv = torch.randn(1, 6, 3, 2, 16)
    fa.flash_attn_qkvpacked_func(qkv, 0.0, 0.5, True, (3, 0), 2.0, None, True, True, version="v1")
    step = qkv.stride(2) * qkv.element_size()
    assert seen["ptrs"] == [qkv.data_ptr() + i * step for i in range(3)]
    # (cu_q, cu_k, max_q, max_k, scale, window (causal: right 0), softcap, deterministic, version, packed)
    assert seen["args"][:9] == (None, None, 6, 6, 0.5, (3, 0), 2.0, True, "v1")
    assert seen["args"][9][0] is qkv and seen["args"][9][1:] == (None, 2)


def _recording_backward(monkeypatch, version):
    """Record the gradients each backward call of `version`'s kernels is given to write into."""
    mod = interface._kernels(version)
    real, given = mod.backward, []

    def backward(*args):
        given.append(args[14] if len(args) > 14 else None)   # after the contract's 14 arguments: grads
        return real(*args)
    monkeypatch.setattr(mod, "backward", backward)
    return given


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_packed_backward_writes_into_one_gradient(monkeypatch, version):
    """The kernels get the views of the gradient autograd returns for the packed tensor (no stacking copy), and the
    results are bitwise the plain call's."""
    given = _recording_backward(monkeypatch, version)
    qkv = _leaf(2, 21, 3, 2, 32, seed=7)
    parts = _parts(qkv, 2)
    _check(lambda: fa.flash_attn_qkvpacked_func(qkv, causal=True, return_attn_probs=True, version=version),
           lambda: fa.flash_attn_func(*parts, causal=True, return_attn_probs=True, version=version),
           [qkv], parts, dim=2)
    dqkv = given[0]
    assert len(given) == 2 and given[1] is None     # the packed call wrote into views, the plain call made its own
    base = dqkv[0].data_ptr()
    step = dqkv[0].stride(1) // 3 * dqkv[0].element_size()   # the views of one (2, 21, 3, 2, 32) tensor
    assert [g.data_ptr() for g in dqkv] == [base, base + step, base + 2 * step]
    assert all(g.untyped_storage().data_ptr() == dqkv[0].untyped_storage().data_ptr() for g in dqkv)

    # kvpacked: dQ made on its own, dK and dV views of kv's gradient
    given.clear()
    q, kv = _leaf(1, 9, 4, 16, seed=8), _leaf(1, 17, 2, 2, 16, seed=9)
    out = fa.flash_attn_kvpacked_func(q, kv, causal=True, version=version)
    g_q, g_kv = torch.autograd.grad(out.sum(), (q, kv))
    dq, dk, dv = given[0]
    assert dq.data_ptr() == g_q.data_ptr() and dk.data_ptr() == g_kv.data_ptr()
    assert dv.data_ptr() == g_kv.data_ptr() + g_kv.stride(2) * g_kv.element_size()


def test_packed_function_compiles_and_matches_the_in_place_backward():
    """Under torch.compile the packed functions take the custom ops (autograd stacks the three gradients): one graph,
    and the same bits as the eager in-place backward."""
    qkv = _leaf(1, 24, 3, 2, 16, seed=12)

    def f(t):
        return fa.flash_attn_qkvpacked_func(t, causal=True, version="v2")
    (eager,) = torch.autograd.grad(f(qkv).sum(), qkv)
    (compiled,) = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(qkv).sum(), qkv)
    assert torch.equal(eager, compiled)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_varlen_packed_gradient_is_zero_outside_every_sequence(monkeypatch, version):
    """Rows past cu_seqlens[-1] get no program: the packed gradient (made with torch.empty_like) reads 0 there, and
    the rows of the sequences are bitwise the plain call's (the forward leaves the rows outside unwritten, as
    flash-attn's does, so only the sequences' rows of out are compared)."""
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: real(t, **kw).fill_(float("nan")))   # a used block
    cu = torch.tensor([0, 7, 19], dtype=torch.int32)
    qkv = _leaf(25, 3, 2, 16, seed=10)          # rows 19-24 belong to no sequence
    parts = _parts(qkv, 1)
    out = fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 12, causal=True, version=version)
    ref = fa.flash_attn_varlen_func(*parts, cu, cu, 12, 12, causal=True, version=version)
    assert torch.equal(out[:19], ref[:19])
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(11))
    do[19:] = 0.0
    (g,) = torch.autograd.grad(out, qkv, do)
    ref_g = torch.autograd.grad(ref, parts, do)
    assert torch.equal(g, torch.stack(ref_g, dim=1))
    assert torch.equal(g[19:], torch.zeros_like(g[19:]))


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: fa.flash_attn_qkvpacked_func(torch.randn(1, 6, 2, 2, 16)), ValueError,
     r"qkv must have shape \(batch, seqlen, 3, nheads, headdim\), got \(1, 6, 2, 2, 16\)\. Stack them with "
     r"torch\.stack\(\[q, k, v\], dim=2\)"),
    (lambda: fa.flash_attn_qkvpacked_func(torch.randn(6, 3, 2, 16)), ValueError, r"qkv must have shape \(batch, "),
    (lambda: fa.flash_attn_kvpacked_func(torch.randn(1, 6, 2, 16), torch.randn(1, 6, 3, 2, 16)), ValueError,
     r"kv must have shape \(batch, seqlen_k, 2, nheads_k, headdim\), got \(1, 6, 3, 2, 16\)"),
    (lambda: fa.flash_attn_varlen_qkvpacked_func(torch.randn(6, 3, 2, 32)[..., ::2], torch.tensor([0, 6]), 6),
     ValueError, r"qkv must be contiguous in its last \(headdim\) dimension.*qkv\.contiguous\(\)"),
    (lambda: fa.flash_attn_varlen_kvpacked_func(torch.randn(6, 2, 16), torch.randn(6, 2, 2, 16).double(),
                                                torch.tensor([0, 6]), torch.tensor([0, 6]), 6, 6),
     TypeError, r"kv has dtype torch\.float64.*kv\.to\(torch\.bfloat16\)"),
    (lambda: fa.flash_attn_qkvpacked_func([[1.0]]), TypeError, r"qkv must be a torch\.Tensor"),
    (lambda: fa.flash_attn_qkvpacked_func(torch.randn(1, 6, 3, 2, 16), dropout_p=0.1), NotImplementedError,
     r"dropout_p=0.1"),
])
def test_bad_packed_input_names_the_packed_argument(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()
