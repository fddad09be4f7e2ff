"""Monkey-patch adapters per model family, installed as `hf_flashattn.patches`.

Registry keyed by `config.model_type`; the per-family adapters (llama, mistral, qwen2, qwen3) are
not written yet, so every model type is unsupported for now.
"""
from __future__ import annotations

ADAPTERS: dict = {}


def _lookup(model_or_model_type):
    model_type = model_or_model_type if isinstance(model_or_model_type, str) else \
        getattr(getattr(model_or_model_type, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS)) or "none yet"
        raise NotImplementedError(f"hf_flashattn.patches has no adapter for model_type={model_type!r}; "
                                  f"supported: {supported}. Use attn_implementation='flashattn_custom' instead.")
    return ADAPTERS[model_type]


def apply(model_or_model_type, **opts):
    return _lookup(model_or_model_type).apply(**opts)


def revert(model_or_model_type):
    return _lookup(model_or_model_type).revert()
