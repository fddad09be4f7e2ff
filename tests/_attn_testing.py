"""Shared helpers for the kernel tests: the grid's shapes and masks, a kernel's outputs and gradients and their check
against the reference by the flash-attn error rule, reference gradients, ptxas spill counts."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch

import hf_flashattn as fa
from hf_flashattn.reference import attention_ref, attention_varlen_ref

# Kernel versions under test; the CPU grid can be narrowed with HF_FLASHATTN_TEST_VERSIONS=v2.
ALL_VERSIONS = ("v1", "v2")
VERSIONS = tuple(os.environ.get("HF_FLASHATTN_TEST_VERSIONS", ",".join(ALL_VERSIONS)).split(","))

FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def ref_grads(q, k, v, do, cu=None, compute_dtype=torch.float64, **kw):
    """(out, lse, dq, dk, dv) of the reference, computed in compute_dtype (None = input dtype)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if compute_dtype is not None:
        leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
    if cu is None:
        out, lse = attention_ref(*leaves, compute_dtype=compute_dtype, **kw)
    else:
        out, lse = attention_varlen_ref(*leaves, cu[0], cu[1], compute_dtype=compute_dtype, **kw)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    return (out.detach(), lse.detach(), *grads)


def assert_close_rule(name, got, ref64, ref_low, factor, dtype):
    """flash-attn's rule: |got - ref| <= factor * |ref_low - ref| + floor, in max-abs norm."""
    err = (got.double() - ref64.double()).abs().max().item()
    base = (ref_low.double() - ref64.double()).abs().max().item()
    bound = factor * base + FLOOR[dtype]
    print(f"{name}: max err {err:.3e}  (torch low-precision {base:.3e}, bound {bound:.3e})")
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert err <= bound, f"{name}: max error {err:.3e} exceeds {bound:.3e}"


def left_padded(lengths, vocab_size, pad, device, seed=1):
    """input_ids (B, max(lengths)) of random tokens in [3, vocab_size), `pad` on the left, and the
    matching 2D attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab_size, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids.to(device), mask.to(device)


def ptxas_spills(ptx: str):
    """(returncode, stderr, spill-store bytes per function) of Triton's bundled ptxas compiling `ptx` for sm_90a;
    None when this Triton has no ptxas. Its ptxas may be older than the PTX ISA version Triton writes: the version
    line is lowered (the instructions are sm_90a's either way)."""
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return None
    src = re.sub(r"^\.version \d+\.\d+", ".version 8.7", ptx, flags=re.M)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(src)
    try:
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True,
                             timeout=300)
    finally:
        os.unlink(f.name)
    return out.returncode, out.stderr, [int(n) for n in re.findall(r"(\d+) bytes spill stores", out.stderr)]


# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim)
SHAPES = [
    (2, 13, 29, 4, 2, 16),     # q_len < k_len, GQA
    (2, 29, 13, 4, 2, 40),     # q_len > k_len (causal leaves rows empty), headdim 40
    (1, 77, 77, 2, 2, 64),     # ragged square, MHA
    (1, 1, 97, 4, 1, 80),      # decode-like: one query, long keys, MQA, headdim 80
    (1, 113, 203, 2, 1, 32),   # the awkward 113 x 203, MQA
    (1, 17, 33, 32, 8, 16),    # GQA 32/8
]
MASKS = [dict(causal=False), dict(causal=True), dict(window_size=(8, 0)), dict(window_size=(5, 3), softcap=5.0)]


def kernel_inputs(shape, dtype, seed=0):
    B, Sq, Sk, H, Hk, D = shape
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return mk(B, Sq, H, D), mk(B, Sk, Hk, D), mk(B, Sk, Hk, D), mk(B, Sq, H, D)


def run_kernel(version, q, k, v, do, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse, none = fa.flash_attn_func(q, k, v, return_attn_probs=True, version=version, **kw)
    assert none is None
    grads = torch.autograd.grad(out, (q, k, v), do)
    return (out, lse, *grads)


def check_kernel(version, q, k, v, do, dtype, cu=None, **kw):
    if cu is None:
        got = run_kernel(version, q, k, v, do, **kw)
    else:
        got = run_kernel_varlen(version, q, k, v, do, cu, **kw)
    ref = ref_grads(q, k, v, do, cu=cu, **ref_kwargs(kw))
    low = ref_grads(q, k, v, do, cu=cu, compute_dtype=None if dtype != torch.float32 else torch.float32,
                    **ref_kwargs(kw))
    assert got[0].dtype == dtype and got[0].shape == q.shape
    assert got[1].dtype == torch.float32
    # lse: +inf exactly where the reference row sees no key; close elsewhere
    fin = torch.isfinite(ref[1])
    assert torch.equal(torch.isinf(got[1]) & (got[1] > 0), ~fin), "lse=+inf rows differ from the reference"
    if fin.any():
        assert_close_rule("lse", got[1][fin], ref[1][fin], low[1].float()[fin], 2, torch.float32)
    for name, i, f in (("out", 0, 2), ("dq", 2, 3), ("dk", 3, 3), ("dv", 4, 3)):
        assert_close_rule(name, got[i], ref[i], low[i], f, dtype)


def ref_kwargs(kw):
    return {k: v for k, v in kw.items() if k in ("causal", "window_size", "softcap", "softmax_scale")}


def two_sequences(Sq: int, Sk: int):
    """cu_seqlens (q, k) cutting Sq queries and Sk keys into two packed sequences of ragged lengths (Sq // 3 queries
    and Sk // 2 + 1 keys first), the kernel tests' packed case."""
    return (torch.tensor([0, Sq // 3, Sq], dtype=torch.int32), torch.tensor([0, Sk // 2 + 1, Sk], dtype=torch.int32))


def max_lengths(cu):
    """(max_seqlen_q, max_seqlen_k) of cu_seqlens (q, k)."""
    return tuple(int((c[1:] - c[:-1]).max()) for c in cu)


def run_kernel_varlen(version, q, k, v, do, cu, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu[0], cu[1], *max_lengths(cu), return_attn_probs=True,
                                            version=version, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return (out, lse, *grads)
