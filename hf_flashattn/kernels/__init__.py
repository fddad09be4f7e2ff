"""Triton kernels, one module per FlashAttention generation (see interface.py for the contract)."""
