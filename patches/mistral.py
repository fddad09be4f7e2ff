"""Mistral: hf_flashattn kernels in MistralAttention, without attn_implementation.

    from hf_flashattn.patches import mistral
    mistral.apply()          # before building: every MistralAttention built afterwards (any attn_implementation)
    mistral.apply(model)     # a loaded model, PEFT-wrapped too: rebinds its live attention modules
    mistral.revert(model)    # restores what was there; mistral.revert() undoes everything

Sliding window: `config.sliding_window` on every layer (None or 0 = full attention), as
MistralModel's masks do: a query sees itself and the `sliding_window - 1` keys before it, i.e.
flash-attn window_size=(sliding_window - 1, 0).
"""
from __future__ import annotations

from ._common import Patcher, attention_forward


def _classes():
    from transformers.models.mistral.modeling_mistral import MistralAttention
    return (MistralAttention,)


def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, past_key_values=None,
            **kwargs):
    """MistralAttention.forward on hf_flashattn (cache: `cache` in Transformers 5.24, `past_key_values` in 5.17)."""
    return attention_forward(self, hidden_states, position_embeddings, attention_mask,
                             cache if cache is not None else past_key_values, kwargs,
                             sliding_window=getattr(self.config, "sliding_window", None) or None,
                             version=_PATCHER.options["version"])


_PATCHER = Patcher("mistral", forward, _classes)


def apply(model=None, *, version: str = "auto"):
    """Patch MistralAttention (model=None) or the attention modules of `model`. Idempotent.

    version: hf_flashattn kernel generation ("auto", "v1", "v2"), as in flash_attn_func(version=...).
    Returns `model`.
    """
    return _PATCHER.apply(model, version=version)


def revert(model=None):
    """Restore `model`'s attention modules, or (model=None) the class and every patched module."""
    return _PATCHER.revert(model)
