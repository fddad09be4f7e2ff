"""Qwen3 and Qwen3-MoE: hf_flashattn kernels in Qwen3Attention / Qwen3MoeAttention, without
attn_implementation.

    from hf_flashattn.patches import qwen3
    qwen3.apply()            # before building: both classes, for every model built afterwards
    qwen3.apply(model)       # a loaded model, PEFT-wrapped too: rebinds its live attention modules
    qwen3.revert(model)      # restores what was there; qwen3.revert() undoes everything

The model's own q_norm / k_norm (RMSNorm over head_dim) run on the (batch, seq, heads, head_dim)
projections before rotary, as in Transformers. Sliding window, per layer, from each module's
`sliding_window`: Qwen3 sets it on layers with `layer_types[i] == "sliding_attention"`
(`use_sliding_window` and i >= `max_window_layers`); Qwen3-MoE on every layer when
`use_sliding_window` (config.sliding_window is None otherwise), matching the masks each model builds.
"""
from __future__ import annotations

from ._common import Patcher, attention_forward


def _classes():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention
    return (Qwen3Attention, Qwen3MoeAttention)


def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, past_key_values=None,
            **kwargs):
    """Qwen3(Moe)Attention.forward on hf_flashattn (cache: `cache` in Transformers 5.24, `past_key_values` in 5.17)."""
    return attention_forward(self, hidden_states, position_embeddings, attention_mask,
                             cache if cache is not None else past_key_values, kwargs,
                             sliding_window=getattr(self, "sliding_window", None) or None, qk_norm=True,
                             version=_PATCHER.options["version"])


_PATCHER = Patcher("qwen3", forward, _classes)


def apply(model=None, *, version: str = "auto"):
    """Patch Qwen3Attention and Qwen3MoeAttention (model=None) or the attention modules of `model`.
    Idempotent.

    version: hf_flashattn kernel generation ("auto", "v1", "v2"), as in flash_attn_func(version=...).
    Returns `model`.
    """
    return _PATCHER.apply(model, version=version)


def revert(model=None):
    """Restore `model`'s attention modules, or (model=None) the classes and every patched module."""
    return _PATCHER.revert(model)
