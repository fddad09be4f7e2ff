"""Public API: flash-attn's signatures, documented arguments, version selection, validation errors."""
from __future__ import annotations

import inspect
import math
import re

import pytest
import torch

import hf_flashattn as fa
from hf_flashattn.reference import attention_ref, visible_mask

FLASH_ATTN_FUNC = ["q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes",
                   "deterministic", "return_attn_probs", "version"]
FLASH_ATTN_VARLEN = ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p",
                     "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "deterministic",
                     "return_attn_probs", "block_table", "version"]


FLASH_ATTN_KVCACHE = ["q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens",
                      "cache_batch_idx", "cache_leftpad", "block_table", "softmax_scale", "causal", "window_size",
                      "softcap", "rotary_interleaved", "alibi_slopes", "num_splits", "return_softmax_lse", "version"]


@pytest.mark.parametrize("fn, names", [(fa.flash_attn_func, FLASH_ATTN_FUNC),
                                       (fa.flash_attn_varlen_func, FLASH_ATTN_VARLEN),
                                       (fa.flash_attn_with_kvcache, FLASH_ATTN_KVCACHE)])
def test_signature_matches_flash_attn_and_docstring(fn, names):
    params = inspect.signature(fn).parameters
    assert list(params) == names
    assert params["version"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["window_size"].default == (-1, -1) and params["softcap"].default == 0.0
    arguments = fn.__doc__.split("Returns")[0]
    documented = set(re.findall(r"^\s{8}(\w+):", arguments, flags=re.M))
    # every argument is documented (the varlen docstring refers to flash_attn_func for the shared ones)
    shared = set(FLASH_ATTN_FUNC) if fn is fa.flash_attn_varlen_func else set()
    missing = set(names) - documented - shared
    assert not missing, f"undocumented arguments: {missing}"
    assert documented <= set(names), f"documented but not in the signature: {documented - set(names)}"


def test_reference_matches_sdpa_and_draws_bottom_right_causal():
    assert visible_mask(2, 5, causal=True).int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert visible_mask(3, 3, window_size=(1, 0)).int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 4, 16, generator=g, dtype=torch.float64) for _ in range(3))
    for causal in (False, True):
        out, lse = attention_ref(q, k, v, causal=causal)
        want = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
        torch.testing.assert_close(out, want)
        s = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / math.sqrt(16)
        if causal:
            s = s.masked_fill(~visible_mask(9, 9, True), float("-inf"))
        torch.testing.assert_close(lse, torch.logsumexp(s, -1))


def test_version_selection_and_unimplemented_versions():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(NotImplementedError, match="version='v3'"):
        fa.flash_attn_func(q, q, q, version="v3")   # float32: v3 is a float16/bfloat16 kernel
    with pytest.raises(ValueError, match="version must be one of"):
        fa.flash_attn_func(q, q, q, version="v4")
    assert fa.get_default_version() == "auto"
    with fa.use_version("v2"):
        assert fa.get_default_version() == "v2"
    assert fa.get_default_version() == "auto"


def test_auto_runs_v3_on_hopper_by_keys_and_head_dim(monkeypatch):
    """version="auto" on a Hopper GPU (pretended here): v3 for inputs its descriptors can load from 2048 keys
    (packed: in all; at head dims 64 / 128 / 256 from 1024 / 512 / 512, between 64 and 128 from 1024, between 128 and
    256 never), v2 for shorter inputs, decode-like shapes (v2's split-KV kernel), float32, misaligned inputs, and off
    Hopper."""
    from hf_flashattn import interface as I
    mk = lambda *s, dtype=torch.float16: torch.zeros(*s, dtype=dtype)  # noqa: E731
    monkeypatch.setattr(I, "is_hopper", lambda device: True)
    q, k = mk(1, 2048, 4, 16), mk(1, 2048, 2, 16)
    assert I._resolve_version("auto", q, k, k) == "v3"
    assert I._resolve_version("auto", mk(1, 2047, 4, 16), mk(1, 2047, 2, 16), mk(1, 2047, 2, 16)) == "v2"
    assert I._resolve_version("auto", mk(1, 1, 4, 16), k, k) == "v2"             # a decode step
    q32, k32 = mk(1, 2048, 4, 16, dtype=torch.float32), mk(1, 2048, 2, 16, dtype=torch.float32)
    assert I._resolve_version("auto", q32, k32, k32) == "v2"
    packed = (mk(4096, 4, 16), mk(4096, 2, 16), mk(4096, 2, 16))
    assert I._resolve_version("auto", *packed, max_seqlen_k=4096) == "v3"
    assert I._resolve_version("auto", *packed, max_seqlen_k=16) == "v2"        # 256 sequences of 16 tokens
    assert I._resolve_version("auto", mk(100, 4, 16), mk(100, 2, 16), mk(100, 2, 16)) == "v2"
    odd = mk(1 * 2048 * 2 * 16 + 1)[1:].view(1, 2048, 2, 16)                       # 2 bytes off: TMA cannot
    assert I._resolve_version("auto", q, odd, odd) == "v2"
    with fa.use_version("v2"):
        assert I._resolve_version("auto", q, k, k) == "v2"
    for d, least in ((64, 1024), (128, 512), (256, 512), (80, 1024), (40, 2048)):   # per head dim (_v3_least_keys)
        at = [mk(2, least, 4, d), mk(2, least, 2, d), mk(2, least, 2, d)]
        below = [mk(2, least - 1, 4, d), mk(2, least - 1, 2, d), mk(2, least - 1, 2, d)]
        assert I._resolve_version("auto", *at) == "v3" and I._resolve_version("auto", *below) == "v2", d
        flat = [x.flatten(0, 1) for x in at]
        assert I._resolve_version("auto", *flat, max_seqlen_k=least) == "v3"
        assert I._resolve_version("auto", *flat, max_seqlen_k=least - 1) == "v2"
    d192 = [mk(1, 8192, 4, 192), mk(1, 8192, 2, 192), mk(1, 8192, 2, 192)]
    assert I._resolve_version("auto", *d192) == "v2"                             # between 128 and 256: v2 always
    monkeypatch.setattr(I, "is_hopper", lambda device: False)
    assert I._resolve_version("auto", q, k, k) == "v2"


def test_env_default_version(monkeypatch):
    monkeypatch.setenv("HF_FLASHATTN_VERSION", "v1")
    assert fa.get_default_version() == "v1"
    monkeypatch.setenv("HF_FLASHATTN_VERSION", "fast")
    with pytest.raises(ValueError, match="HF_FLASHATTN_VERSION"):
        fa.get_default_version()


def _qkv(B=1, S=8, H=2, Hk=2, D=16, dtype=torch.float32):
    return torch.randn(B, S, H, D, dtype=dtype), torch.randn(B, S, Hk, D, dtype=dtype), \
        torch.randn(B, S, Hk, D, dtype=dtype)


@pytest.mark.parametrize("make, exc, pattern", [
    (lambda: (*_qkv(dtype=torch.float64),), TypeError, r"q has dtype torch.float64"),
    (lambda: (_qkv()[0], _qkv()[1].half(), _qkv()[2]), TypeError, r"share a dtype.*k torch.float16"),
    (lambda: _qkv(D=264), ValueError, r"headdim must be a multiple of 8.*got q.shape\[-1\]=264"),
    (lambda: _qkv(D=20), ValueError, r"headdim must be a multiple of 8.*20"),
    (lambda: _qkv(H=6, Hk=4), ValueError, r"nheads=6.*nheads_k=4"),
    (lambda: (_qkv(B=2)[0], *_qkv(B=3)[1:]), ValueError, r"same batch size.*q.shape\[0\]=2.*k.shape\[0\]=3"),
    (lambda: (torch.randn(1, 8, 2, 32)[..., ::2], *_qkv()[1:]), ValueError, r"contiguous in its last"),
    (lambda: (torch.randn(8, 2, 16), *_qkv()[1:]), ValueError, r"q must have 4 dimensions"),
    (lambda: ([1.0], *_qkv()[1:]), TypeError, r"q must be a torch.Tensor"),
    (lambda: (_qkv()[0], _qkv(D=32)[1], _qkv()[2]), ValueError, r"same headdim"),
])
def test_bad_tensors(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fa.flash_attn_func(*make())


@pytest.mark.parametrize("kw, exc, pattern", [
    (dict(window_size=(-2, 0)), ValueError, r"window_size entries must be >= -1.*\(-2, 0\)"),
    (dict(window_size=(3,)), ValueError, r"pair of ints"),
    (dict(softcap=-1.0), ValueError, r"softcap must be a float >= 0.*-1.0"),
    (dict(softmax_scale=0.0), ValueError, r"softmax_scale must be a positive"),
    (dict(dropout_p=0.1), NotImplementedError, r"dropout_p=0.1"),
    (dict(alibi_slopes=torch.ones(2)), NotImplementedError, r"alibi_slopes"),
])
def test_bad_options(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fa.flash_attn_func(*_qkv(), **kw)


def _varlen(cu_q, cu_k=None, max_q=8, max_k=8):
    q = torch.randn(8, 2, 16)
    cu_k = cu_q if cu_k is None else cu_k
    return fa.flash_attn_varlen_func(q, q, q, cu_q, cu_k, max_q, max_k)


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: _varlen(torch.tensor([0, 3, 8])), TypeError, r"cu_seqlens_q must have dtype torch.int32; got torch.int64"),
    (lambda: _varlen(torch.tensor([0, 5, 3, 8], dtype=torch.int32)), ValueError, r"never decrease.*\[0, 5, 3, 8\]"),
    (lambda: _varlen(torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, r"start at 0"),
    (lambda: _varlen(torch.tensor([0, 3, 9], dtype=torch.int32)), ValueError, r"exceeds the number of packed"),
    (lambda: _varlen(torch.tensor([0, 3, 8], dtype=torch.int32), max_q=4), ValueError, r"max_seqlen_q=4 is smaller"),
    (lambda: _varlen(torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 8], dtype=torch.int32)),
     ValueError, r"same length"),
    (lambda: _varlen([0, 3, 8]), TypeError, r"cu_seqlens_q must be an int32 torch.Tensor"),
])
def test_bad_varlen(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_cu_seqlens_read_back_once_but_checked_after_a_change(monkeypatch):
    """cu_seqlens values are read back (on a GPU a device sync) once per tensor, not once per layer; a tensor
    changed in place since, or a new tensor, is read and checked again. (GPU tensors only: _CACHE_CPU lets the
    CPU run the same logic.)"""
    from hf_flashattn import _validate as V
    monkeypatch.setattr(V, "_CACHE_CPU", True)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    _varlen(cu)
    reads = []
    real = torch.Tensor.tolist
    try:
        torch.Tensor.tolist = lambda t: reads.append(1) or real(t)
        _varlen(cu)
        assert reads == []                      # the same tensor, unchanged: no read
        cu[1] = 9                               # in place: [0, 9, 8] decreases
        with pytest.raises(ValueError, match=r"never decrease.*\[0, 9, 8\]"):
            _varlen(cu)
        assert reads
        reads.clear()
        with pytest.raises(ValueError, match=r"never decrease.*\[0, 9, 8\]"):
            _varlen(cu.clone())                 # another tensor: read again
        assert reads
    finally:
        torch.Tensor.tolist = real
        V._READ_BACK.clear()


def test_varlen_under_inference_mode(monkeypatch):
    """Inference-mode tensors have no version counter: their cu_seqlens are read (and checked) every call."""
    from hf_flashattn import _validate as V
    monkeypatch.setattr(V, "_CACHE_CPU", True)
    with torch.inference_mode():
        cu = torch.tensor([0, 3, 8], dtype=torch.int32)
        a = _varlen(cu)
        cu[1] = 9
        with pytest.raises(ValueError, match=r"never decrease"):
            _varlen(cu)
    assert a.shape == (8, 2, 16)


def test_varlen_accepts_0d_tensor_max_seqlen():
    q = torch.randn(8, 2, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    a = fa.flash_attn_varlen_func(q, q, q, cu, cu, torch.tensor(5, dtype=torch.int32), 5, causal=True)
    b = fa.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, causal=True)
    assert torch.equal(a, b)


def test_interpreter_problem_names_the_versions_and_the_fix():
    """Triton 3.6's interpreter with NumPy 2.4 fails on every loop of a kernel (measured: 3.6.0 with NumPy 2.4.6
    fails, with 2.3.5 runs; 3.7.1 with 2.4.6 runs); import warns with the fix there and only there."""
    import numpy
    import triton

    from hf_flashattn._runtime import _release, interpreter_problem, is_interpreting
    msg = interpreter_problem("3.6.0", "2.4.6")
    assert msg is not None and "3.6.0" in msg and "2.4.6" in msg and "numpy<2.4" in msg and "triton>=3.7" in msg
    assert interpreter_problem("3.6.1+git1234", "2.5.0rc1") is not None
    for ok in (("3.7.1", "2.4.6"), ("3.6.0", "2.3.5"), ("3.9.0", "2.4.6"), ("4.0.0", "3.0.0")):
        assert interpreter_problem(*ok) is None, ok
    assert _release("3.10.2") == (3, 10) and _release("2.4.0rc1") == (2, 4) and _release("dev") == (0, 0)
    if is_interpreting():   # the kernels run in this process through the interpreter: the versions must allow it
        assert interpreter_problem(triton.__version__, numpy.__version__) is None
