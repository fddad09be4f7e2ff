"""Monkey-patch adapters per model family, installed as `hf_flashattn.patches`.

    import hf_flashattn.patches as patches
    patches.apply(model)                  # by model.config.model_type; PEFT-wrapped models too
    patches.apply("qwen2_moe", version="v2")   # before building: patches the family's classes
    patches.revert(model)

One module per family (llama, mistral, qwen2 for Qwen2 and Qwen2-MoE, qwen3 for Qwen3 and Qwen3-MoE),
each with `apply(model=None, **opts)` and `revert(model=None)`: see their docstrings. Options are
passed on to the adapters that accept them (for example `moe_sliding_window` only to qwen2), so one
call site can serve every family; an option no adapter knows raises TypeError.
"""
from __future__ import annotations

import importlib
import inspect

# config.model_type -> adapter module (in this package)
ADAPTERS: dict = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen2_moe": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3",
}


def _model_type(model_or_model_type):
    if isinstance(model_or_model_type, str):
        return model_or_model_type
    return getattr(getattr(model_or_model_type, "config", None), "model_type", None)


def adapter_for(model_or_model_type):
    """The adapter module for a model (by `config.model_type`) or a model type string."""
    model_type = _model_type(model_or_model_type)
    if model_type not in ADAPTERS:
        raise NotImplementedError(f"hf_flashattn.patches has no adapter for model_type={model_type!r}; "
                                  f"supported: {', '.join(sorted(ADAPTERS))}. Use "
                                  "attn_implementation='flashattn_custom' instead.")
    return importlib.import_module(f"{__name__}.{ADAPTERS[model_type]}")


def _options(adapter, opts):
    known = set()
    for name in set(ADAPTERS.values()):
        known |= set(inspect.signature(importlib.import_module(f"{__name__}.{name}").apply).parameters)
    unknown = sorted((set(opts) - known) | ({"model"} & set(opts)))
    if unknown:
        raise TypeError(f"hf_flashattn.patches.apply: unknown option(s) {', '.join(unknown)}; the adapters accept "
                        f"{', '.join(sorted(known - {'model'}))}.")
    accepted = inspect.signature(adapter.apply).parameters
    return {k: v for k, v in opts.items() if k in accepted}


def apply(model_or_model_type, **opts):
    """Patch a model (its live attention modules) or, given a model type string, the family's
    attention classes. Options an adapter does not take are dropped. Returns the model (or None)."""
    adapter = adapter_for(model_or_model_type)
    model = None if isinstance(model_or_model_type, str) else model_or_model_type
    return adapter.apply(model, **_options(adapter, opts))


def revert(model_or_model_type):
    """Undo apply(): for a model, its attention modules; for a model type string, the family's
    classes and every module the family patched."""
    model = None if isinstance(model_or_model_type, str) else model_or_model_type
    return adapter_for(model_or_model_type).revert(model)
