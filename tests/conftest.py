"""Fixtures of the Transformers tests (test_transformers.py, test_registration.py): counting hf_flashattn's calls as
Transformers' flash path makes them, and pinning the kernel version, so that a silent fallback to another attention
fails a test. Transformers is imported only when a test asks for one of them."""
from __future__ import annotations

import functools

import pytest

import hf_flashattn  # before transformers: sets TRITON_INTERPRET on the CPU, installs the registration hook
from hf_flashattn import interface
from hf_flashattn.kernels import decode as decode_kernels


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of hf_flashattn's public functions as Transformers' flash path makes them."""
    from transformers import modeling_flash_attention_utils as fa_utils

    counts = {"flash_attn_func": 0, "flash_attn_varlen_func": 0, "decode_masked": 0, "decode_lean": 0}
    for fname in ("flash_attn_func", "flash_attn_varlen_func"):
        real = getattr(interface, fname)

        @functools.wraps(real)  # Transformers inspects the signature; wraps() keeps the real one visible
        def counting(*args, _real=real, _fname=fname, **kwargs):
            counts[_fname] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(interface, fname, counting)
    real_masked = interface._decode_with_padding_mask

    def counting_masked(*args, **kwargs):  # decode steps with a padding mask (None: left to the flash path)
        out = real_masked(*args, **kwargs)
        counts["decode_masked"] += out is not None
        return out

    monkeypatch.setattr(interface, "_decode_with_padding_mask", counting_masked)
    real_lean = decode_kernels.decode_bhsd

    def counting_lean(*args, **kwargs):  # plain decode steps (no mask) in Transformers' layout
        counts["decode_lean"] += 1
        return real_lean(*args, **kwargs)

    monkeypatch.setattr(decode_kernels, "decode_bhsd", counting_lean)
    # lazy_import_flash_attention caches the resolved functions by name: forget them, so that NAME
    # resolves again through the adapter and picks up the counting wrappers.
    fa_utils._loaded_implementation = None
    yield counts
    fa_utils._loaded_implementation = None


@pytest.fixture(params=["v2", "v1"])
def kernel_version(request, monkeypatch):
    """Runs a model test with hf_flashattn.use_version(<version>) (how flashattn_custom is switched to
    another kernel generation) and checks that exactly that version's kernels ran."""
    used = set()
    real = interface._kernels

    def recording(version):
        used.add(version)
        return real(version)

    monkeypatch.setattr(interface, "_kernels", recording)
    with hf_flashattn.use_version(request.param):
        yield request.param
    assert used == {request.param}, f"kernels used: {used}, expected {request.param}"
