"""The FlashAttention-1 kernels (hf_flashattn/kernels/v1.py, v1_bwd.py) against reference.py.

Runs through Triton's interpreter on the CPU (float32 and float16; the interpreter's bf16 dot is
wrong). Tolerances:
  * float32: max error <= 1e-4 · max|reference| (+1e-6), against the float64 reference;
  * float16 (flash-attn's rule): kernel error vs float64 <= 2 × the error of the reference computed
    in float16 (compute_dtype=None) + a floor of 1e-3 · max|reference| for the forward; 3 × for the
    gradients, which go through more roundings (P and dS are cast to fp16 before the matmuls).
Sizes are small on purpose: every tile visited costs Python time in the interpreter.
"""
from __future__ import annotations

import pytest
import torch

import hf_flashattn
import hf_flashattn.kernels.v1 as v1
from hf_flashattn.reference import attention_ref, attention_varlen_ref


def _inputs(b, sq, sk, h, hk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g).to(dtype)
    k = torch.randn(b, sk, hk, d, generator=g).to(dtype)
    v = torch.randn(b, sk, hk, d, generator=g).to(dtype)
    do = torch.randn(b, sq, h, d, generator=g).to(dtype)
    return q, k, v, do


def _kernel(fn, q, k, v, do, *args, **kw):
    """out, lse, dq, dk, dv from the public API with version="v1"."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse, _ = fn(q, k, v, *args, return_attn_probs=True, version="v1", **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), lse, dq, dk, dv


def _reference(ref_fn, q, k, v, do, *args, compute_dtype=torch.float64, **kw):
    """out, lse, dq, dk, dv of reference.py (autograd), in float64 or (None) the input dtype."""
    if compute_dtype is not None:
        q, k, v, do = (t.to(compute_dtype) for t in (q, k, v, do))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = ref_fn(q, k, v, *args, compute_dtype=compute_dtype, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), lse, dq, dk, dv


def _max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def _check(got, ref, low=None, dtype=torch.float32):
    """Compare (out, lse, dq, dk, dv) of the kernel with the float64 reference (and, for fp16, with
    the error of the fp16 reference `low`)."""
    names = ("out", "lse", "dq", "dk", "dv")
    lse_k, lse_r = got[1], ref[1]
    assert torch.equal(torch.isinf(lse_k), torch.isinf(lse_r)), "rows that see no key differ"
    assert not torch.isnan(lse_k).any()
    finite = torch.isfinite(lse_r)
    for i, name in enumerate(names):
        g, r = got[i], ref[i]
        if name == "lse":
            g, r = g[finite], r[finite]
            lo = low[1][finite] if low is not None else None
        else:
            lo = low[i] if low is not None else None
        assert g.shape == r.shape, (name, g.shape, r.shape)
        assert not torch.isnan(g).any(), f"{name} has NaN"
        err = _max_err(g, r)
        scale = max(r.abs().max().item(), 1.0) if r.numel() else 1.0
        mean = (g.double() - r.double()).abs().mean().item() if g.numel() else 0.0
        if dtype == torch.float32:
            tol = 1e-4 * scale + 1e-6
            print(f"{name}: max err {err:.3g} mean {mean:.3g} tol {tol:.3g}")
        else:
            low_err = _max_err(lo, r)
            factor = 2.0 if name in ("out", "lse") else 3.0
            tol = factor * low_err + 1e-3 * scale
            print(f"{name}: max err {err:.3g} mean {mean:.3g} (fp16 reference {low_err:.3g}) tol {tol:.3g}")
        assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g}"


# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal, window_size, softcap)
CASES_FP32 = [
    pytest.param(2, 13, 29, 2, 2, 40, False, (-1, -1), 0.0, id="13x29-mha-d40"),
    pytest.param(1, 29, 13, 4, 2, 64, True, (-1, -1), 0.0, id="29x13-gqa-d64-causal-emptyrows"),
    pytest.param(1, 77, 77, 4, 1, 80, True, (-1, -1), 0.0, id="77x77-mqa-d80-causal"),
    pytest.param(1, 77, 77, 2, 2, 16, False, (-1, -1), 0.0, id="77x77-mha-d16"),
    pytest.param(1, 1, 97, 4, 2, 64, True, (-1, -1), 0.0, id="q1xk97-gqa-d64-causal"),
    pytest.param(1, 77, 77, 4, 2, 16, True, (8, 0), 0.0, id="77x77-gqa-d16-window8,0"),
    pytest.param(1, 29, 70, 2, 1, 40, False, (5, 3), 0.0, id="29x70-mqa-d40-window5,3"),
    pytest.param(1, 70, 29, 2, 2, 16, False, (5, 3), 0.0, id="70x29-mha-d16-window5,3-emptyrows"),
    pytest.param(1, 77, 77, 2, 1, 40, True, (-1, -1), 5.0, id="77x77-mqa-d40-causal-softcap"),
]


@pytest.mark.parametrize("b,sq,sk,h,hk,d,causal,window,softcap", CASES_FP32)
def test_dense_fp32(b, sq, sk, h, hk, d, causal, window, softcap):
    q, k, v, do = _inputs(b, sq, sk, h, hk, d, torch.float32)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    got = _kernel(hf_flashattn.flash_attn_func, q, k, v, do, **kw)
    ref = _reference(attention_ref, q, k, v, do, **kw)
    _check(got, ref)


CASES_FP16 = [
    pytest.param(1, 77, 77, 4, 2, 64, True, (-1, -1), 0.0, id="77x77-gqa-d64-causal"),
    pytest.param(1, 13, 29, 2, 1, 80, False, (5, 3), 5.0, id="13x29-mqa-d80-window-softcap"),
    pytest.param(2, 1, 97, 2, 2, 40, False, (-1, -1), 0.0, id="q1xk97-mha-d40"),
]


@pytest.mark.parametrize("b,sq,sk,h,hk,d,causal,window,softcap", CASES_FP16)
def test_dense_fp16(b, sq, sk, h, hk, d, causal, window, softcap):
    q, k, v, do = _inputs(b, sq, sk, h, hk, d, torch.float16, seed=1)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    got = _kernel(hf_flashattn.flash_attn_func, q, k, v, do, **kw)
    ref = _reference(attention_ref, q, k, v, do, **kw)
    low = _reference(attention_ref, q, k, v, do, compute_dtype=None, **kw)
    _check(got, ref, low, torch.float16)


@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16)])
def test_block_edges(monkeypatch, block_m, block_n):
    """Off-by-one traps in the block skipping and the partial-mask test, with BLOCK_M != BLOCK_N.
    seqlen_k = 95 = 3·32 - 1 (the last K/V block lacks exactly one key), diag = 95 - 79 = 16.
    Window (1, 1): the last query that sees a K/V block is the first row of a Q block, and query 0's
    first key is the last key of a K/V block. Windows (14, -1) and (-1, 14): a window edge passes
    exactly one entry beyond a block corner of an otherwise fully visible block pair."""
    monkeypatch.setattr(v1, "_fwd_config", lambda d: (block_m, block_n, 1, 1))
    monkeypatch.setattr(v1, "_bwd_config", lambda d: (block_m, block_n, 1, 1))
    q, k, v, do = _inputs(1, 79, 95, 2, 1, 16, torch.float32, seed=2)
    for kw in (dict(), dict(causal=True), dict(window_size=(1, 1)),
               dict(window_size=(14, -1), softcap=5.0), dict(window_size=(-1, 14))):
        print(kw)
        got = _kernel(hf_flashattn.flash_attn_func, q, k, v, do, **kw)
        _check(got, _reference(attention_ref, q, k, v, do, **kw))


def _packed(seqlens_q, seqlens_k, h, hk, d, dtype, pad_q=0, seed=3):
    """Packed q (total_q + pad_q, h, d), k, v, do and int32 cu_seqlens; pad_q trailing rows belong to
    no sequence."""
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(seqlens_q), sum(seqlens_k)
    q = torch.randn(tq + pad_q, h, d, generator=g).to(dtype)
    k = torch.randn(tk, hk, d, generator=g).to(dtype)
    v = torch.randn(tk, hk, d, generator=g).to(dtype)
    do = torch.randn(tq + pad_q, h, d, generator=g).to(dtype)
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, do, cu(seqlens_q), cu(seqlens_k)


# Lengths: a long one, a length-1 query, an empty sequence, and one with queries but no keys.
SEQLENS_Q = [37, 1, 0, 20, 3]
SEQLENS_K = [45, 9, 0, 20, 0]


@pytest.mark.parametrize("causal,window,softcap,hk", [
    pytest.param(False, (-1, -1), 0.0, 2, id="mha"),
    pytest.param(True, (-1, -1), 0.0, 1, id="mqa-causal"),
    pytest.param(False, (8, 0), 5.0, 2, id="mha-window-softcap"),
])
def test_varlen_fp32(causal, window, softcap, hk):
    q, k, v, do, cu_q, cu_k = _packed(SEQLENS_Q, SEQLENS_K, 2, hk, 40, torch.float32, pad_q=2)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    got = _kernel(hf_flashattn.flash_attn_varlen_func, q, k, v, do, cu_q, cu_k, max(SEQLENS_Q),
                  max(SEQLENS_K), **kw)
    n = int(cu_q[-1])
    ref = _reference(attention_varlen_ref, q[:n], k, v, do[:n], cu_q, cu_k, **kw)
    # Rows past cu_seqlens_q[-1] belong to no sequence: out and dq are 0 there, lse is +inf.
    assert torch.equal(got[0][n:], torch.zeros_like(got[0][n:]))
    assert torch.equal(got[2][n:], torch.zeros_like(got[2][n:]))
    assert torch.isinf(got[1][:, n:]).all()
    _check((got[0][:n], got[1][:, :n], got[2][:n], got[3], got[4]), ref)


def test_varlen_fp16_gqa():
    lens_q, lens_k = [50, 1, 0, 17], [33, 1, 0, 60]
    q, k, v, do, cu_q, cu_k = _packed(lens_q, lens_k, 4, 2, 64, torch.float16)
    kw = dict(causal=True)
    args = (cu_q, cu_k)
    got = _kernel(hf_flashattn.flash_attn_varlen_func, q, k, v, do, *args, max(lens_q), max(lens_k), **kw)
    ref = _reference(attention_varlen_ref, q, k, v, do, *args, **kw)
    low = _reference(attention_varlen_ref, q, k, v, do, *args, compute_dtype=None, **kw)
    _check(got, ref, low, torch.float16)


def test_non_contiguous_inputs():
    """Transposed / sliced views with a contiguous last dim are read in place (no copies)."""
    g = torch.Generator().manual_seed(4)
    b, sq, sk, h, hk, d = 2, 29, 40, 4, 2, 40
    q = torch.randn(b, h, sq, d, generator=g).transpose(1, 2)              # (b, sq, h, d), HF layout
    k = torch.randn(b, sk, 2 * hk, d, generator=g)[:, :, ::2]               # every other head
    v = torch.randn(b, sk, hk, 2 * d, generator=g)[..., d:]                 # padded rows
    do = torch.randn(b, h, sq, d, generator=g).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or do.is_contiguous())
    kw = dict(causal=True, window_size=(10, -1))
    got = _kernel(hf_flashattn.flash_attn_func, q, k, v, do, **kw)
    _check(got, _reference(attention_ref, q, k, v, do, **kw))

    # Packed: a strided view of a wider buffer.
    qp = torch.randn(30, h, 2 * d, generator=g)[..., :d]
    kp = torch.randn(35, hk, 2 * d, generator=g)[..., d:]
    vp = torch.randn(35, hk, d, generator=g)
    dop = torch.randn(30, h, 2 * d, generator=g)[..., :d]
    cu_q = torch.tensor([0, 12, 30], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 35], dtype=torch.int32)
    got = _kernel(hf_flashattn.flash_attn_varlen_func, qp, kp, vp, dop, cu_q, cu_k, 18, 20, causal=True)
    _check(got, _reference(attention_varlen_ref, qp, kp, vp, dop, cu_q, cu_k, causal=True))


def test_backward_bitwise_deterministic():
    q, k, v, do = _inputs(2, 45, 61, 4, 1, 40, torch.float16, seed=5)
    kw = dict(causal=True, softcap=5.0, deterministic=True)
    first = _kernel(hf_flashattn.flash_attn_func, q, k, v, do, **kw)
    second = _kernel(hf_flashattn.flash_attn_func, q, k, v, do, **kw)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    qp, kp, vp, dop, cu_q, cu_k = _packed([20, 1, 33], [20, 7, 40], 4, 2, 16, torch.float32)
    runs = [_kernel(hf_flashattn.flash_attn_varlen_func, qp, kp, vp, dop, cu_q, cu_k, 33, 40)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_empty_inputs():
    """Zero-length sequences do not launch anything invalid."""
    q, k, v, do = _inputs(1, 0, 5, 2, 2, 16, torch.float32)
    out, lse, dq, dk, dv = _kernel(hf_flashattn.flash_attn_func, q, k, v, do)
    assert out.shape == q.shape and lse.shape == (1, 2, 0)
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))
