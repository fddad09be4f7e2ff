"""Llama: hf_flashattn kernels in LlamaAttention, without attn_implementation.

    from hf_flashattn.patches import llama
    llama.apply()            # before building: every LlamaAttention built afterwards (any attn_implementation)
    llama.apply(model)       # a loaded model, PEFT-wrapped too: rebinds its live attention modules
    llama.revert(model)      # restores what was there; llama.revert() undoes everything

Llama has no sliding window: every layer is full causal attention.
"""
from __future__ import annotations

from ._common import Patcher, attention_forward


def _classes():
    from transformers.models.llama.modeling_llama import LlamaAttention
    return (LlamaAttention,)


def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, past_key_values=None,
            **kwargs):
    """LlamaAttention.forward on hf_flashattn (Transformers 5.17 passes the cache as past_key_values,
    5.24 as cache)."""
    return attention_forward(self, hidden_states, position_embeddings, attention_mask,
                             cache if cache is not None else past_key_values, kwargs,
                             sliding_window=None, version=_PATCHER.options["version"])


_PATCHER = Patcher("llama", forward, _classes)


def apply(model=None, *, version: str = "auto"):
    """Patch LlamaAttention (model=None) or the attention modules of `model`. Idempotent.

    version: hf_flashattn kernel generation ("auto", "v1", "v2"), as in flash_attn_func(version=...).
    Returns `model`.
    """
    return _PATCHER.apply(model, version=version)


def revert(model=None):
    """Restore `model`'s attention modules, or (model=None) the class and every patched module."""
    return _PATCHER.revert(model)
