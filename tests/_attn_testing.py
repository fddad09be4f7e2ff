"""Shared helpers for the kernel tests: the flash-attn error rule, reference gradients, ptxas spill counts."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch

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
