"""Qwen2 and Qwen2-MoE: hf_flashattn kernels in Qwen2Attention / Qwen2MoeAttention, without
attn_implementation.

    from hf_flashattn.patches import qwen2
    qwen2.apply()            # before building: both classes, for every model built afterwards
    qwen2.apply(model)       # a loaded model, PEFT-wrapped too: rebinds its live attention modules
    qwen2.revert(model)      # restores what was there; qwen2.revert() undoes everything

Sliding window, per layer: the config marks layers `layer_types[i] == "sliding_attention"` (Qwen2:
`use_sliding_window` and layers i >= `max_window_layers`; Qwen2-MoE: `use_sliding_window` and even
layers i < `max_window_layers`), and each such attention module carries `sliding_window`.

Qwen2-MoE, the difference this fixes: Qwen2MoeAttention sets `self.sliding_window` on its sliding
layers and Qwen2MoeModel builds sliding-window masks for them, but the attention call never passes
`sliding_window` to the attention function. Eager and SDPA honour the window through the mask;
Transformers' flash path (flash_attention_2, kernels, ...) gets a 2D padding mask and no window, so
sliding layers silently attend to the whole prefix once a sequence exceeds the window. The patched
forward applies the window (measured in tests/test_patches.py: stock flash path vs eager differs
by O(0.1) in the logits of a tiny model, patched vs eager by ~1e-6). `moe_sliding_window=False`
reproduces the stock flash behaviour.
"""
from __future__ import annotations

from ._common import Patcher, attention_forward


def _classes():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeAttention
    return (Qwen2Attention, Qwen2MoeAttention)


def _window(module):
    window = getattr(module, "sliding_window", None) or None  # Qwen2-MoE: absent on full layers, 0 when disabled
    if window and not _PATCHER.options["moe_sliding_window"] and type(module).__name__ == "Qwen2MoeAttention":
        return None
    return window


def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, past_key_values=None,
            **kwargs):
    """Qwen2(Moe)Attention.forward on hf_flashattn (cache: `cache` in Transformers 5.24, `past_key_values` in 5.17)."""
    return attention_forward(self, hidden_states, position_embeddings, attention_mask,
                             cache if cache is not None else past_key_values, kwargs,
                             sliding_window=_window(self), version=_PATCHER.options["version"])


_PATCHER = Patcher("qwen2", forward, _classes, moe_sliding_window=True)


def apply(model=None, *, version: str = "auto", moe_sliding_window: bool = True):
    """Patch Qwen2Attention and Qwen2MoeAttention (model=None) or the attention modules of `model`.
    Idempotent.

    version: hf_flashattn kernel generation ("auto", "v1", "v2"), as in flash_attn_func(version=...).
    moe_sliding_window: default True = apply Qwen2-MoE's sliding window on its sliding layers, as
        eager does; False = ignore it, as Transformers' flash path does.
    Returns `model`.
    """
    return _PATCHER.apply(model, version=version, moe_sliding_window=moe_sliding_window)


def revert(model=None):
    """Restore `model`'s attention modules, or (model=None) the classes and every patched module."""
    return _PATCHER.revert(model)
