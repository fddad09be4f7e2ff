"""attn_implementation="flashattn_custom" for Hugging Face Transformers (5.17 and later).

Transformers treats every implementation name containing "flash" as a FlashAttention flavour
(`utils.generic.is_flash_attention_requested`): model construction calls
`modeling_flash_attention_utils.lazy_import_flash_attention(name)`, generate() keeps the all-ones
padding mask under a static cache, and so on. So "flashattn_custom" rides on Transformers' own
FlashAttention path, which unpads 2D masks into varlen calls, turns `position_ids` /
`cu_seq_lens_*` (DataCollatorWithFlattening) into packed calls, and maps `sliding_window` and
`softcap` onto flash-attn keywords after inspecting our functions' signatures. Three hooks:

  1. `_lazy_imports(implementation, attention_wrapper, allow_all_kernels)`, the module-level
     function that resolves a flash name to its functions, is wrapped so that "flashattn_custom"
     resolves to hf_flashattn's flash_attn_func / flash_attn_varlen_func. There is no public hook
     for this; the wrapper checks the signature and raises RuntimeError (naming the Transformers
     version) when the internals differ, rather than letting the model silently run something else.
  2. AttentionInterface: Transformers' `flash_attention_forward`, with `sliding_window` taken from
     `module.sliding_window` when the model does not pass it (Qwen2-MoE never does); a plain decode
     step (one token per sequence, no padding mask) goes straight to our kernel, skipping the flash
     path's per-layer host work (a device sync to rule out packing).
  3. AttentionMaskInterface: `flash_attention_mask` (None, or a 2D (batch, kv_len) padding mask).
"""
from __future__ import annotations

import inspect

import torch

from .._runtime import is_interpreting

NAME = "flashattn_custom"
_EXPECTED_PARAMS = ("implementation", "attention_wrapper", "allow_all_kernels")
_MARK = "__hf_flashattn_original__"  # set on our wrapper; holds the function it wraps


def _version() -> str:
    try:
        import transformers
        return transformers.__version__
    except Exception:  # noqa: BLE001  (only used in error messages)
        return "unknown"


def _incompatible(what: str) -> RuntimeError:
    return RuntimeError(
        f"hf_flashattn cannot register attn_implementation={NAME!r} with transformers {_version()}: {what}. "
        "hf_flashattn supports transformers 5.17 to 5.24; use one of those versions, or "
        "attn_implementation='sdpa' / 'eager' until hf_flashattn supports this release.")


def _import_internals():
    """Transformers' modules and objects this adapter relies on, checked; RuntimeError if any changed."""
    try:
        from transformers import modeling_flash_attention_utils as fa_utils
        from transformers.integrations.flash_attention import flash_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
        from transformers.modeling_utils import AttentionInterface
    except ImportError as e:
        raise _incompatible(f"an import failed ({e})") from e
    for attr in ("_lazy_imports", "lazy_import_flash_attention", "_loaded_implementation", "_pad_input",
                 "_unpad_input"):
        if not hasattr(fa_utils, attr):
            raise _incompatible(f"modeling_flash_attention_utils.{attr} no longer exists")
    for cls in (AttentionInterface, AttentionMaskInterface):
        if not isinstance(getattr(cls, "_global_mapping", None), dict) or not callable(getattr(cls, "register", None)):
            raise _incompatible(f"{cls.__name__} no longer has register() and _global_mapping")
    return fa_utils, flash_attention_forward, AttentionInterface, AttentionMaskInterface, flash_attention_mask


def _check_lazy_imports_signature(fn) -> None:
    try:
        params = tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError) as e:
        raise _incompatible(f"the signature of modeling_flash_attention_utils._lazy_imports cannot be read ({e})")
    if params != _EXPECTED_PARAMS:
        raise _incompatible(f"modeling_flash_attention_utils._lazy_imports takes {params}, expected "
                            f"{_EXPECTED_PARAMS}")


def _make_lazy_imports(original, fa_utils):
    """Wrap Transformers' `_lazy_imports` so that NAME resolves to hf_flashattn's functions."""

    def _lazy_imports(implementation, attention_wrapper=None, allow_all_kernels=False):
        if implementation == NAME:
            from .. import interface  # looked up per call, so monkeypatched functions are picked up
            # (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, pad_input, unpad_input)
            return (interface.flash_attn_func, interface.flash_attn_varlen_func, None, fa_utils._pad_input,
                    fa_utils._unpad_input)
        return original(implementation, attention_wrapper, allow_all_kernels=allow_all_kernels)

    _lazy_imports.__doc__ = original.__doc__
    setattr(_lazy_imports, _MARK, original)
    return _lazy_imports


def _install_lazy_imports_adapter(fa_utils) -> None:
    current = fa_utils._lazy_imports
    if not hasattr(current, _MARK):
        _check_lazy_imports_signature(current)
        fa_utils._lazy_imports = _make_lazy_imports(current, fa_utils)
    # `lazy_import_flash_attention` caches the last resolved name in `_loaded_implementation`. Forget a
    # cached NAME so that the next call resolves through the adapter: transformers 5.17 sets the cache
    # *before* resolving, so a model built with NAME before registration left NAME cached with the
    # previous implementation's functions.
    if fa_utils._loaded_implementation == NAME:
        fa_utils._loaded_implementation = None


_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# the keywords that can take a decode step off the lean path (`_lean_step`)
_RARE_KWARGS = frozenset(("output_attentions", "s_aux") + _VARLEN_KWARGS)


def _is_plain_decode_step(module, query, key, value, attention_mask, kwargs) -> bool:
    """One new token per sequence, no padding mask, nothing packed: the case the fast path takes.
    query/key/value are Transformers' (batch, heads, seq, dim)."""
    plain_mask = attention_mask is None or (attention_mask.dim() == 2 and attention_mask.shape[0] == query.shape[0]
                                            and 0 < attention_mask.shape[1] <= key.shape[2])
    return (query.shape[2] == 1 and plain_mask and query.shape[0] > 0
            and key.dtype == query.dtype and value.dtype == query.dtype
            and value.shape[-1] == query.shape[-1]
            and all(kwargs.get(k) is None for k in _VARLEN_KWARGS)
            and kwargs.get("s_aux") is None and not kwargs.get("output_attentions", False)
            and not kwargs.get("dropout", 0.0) and _keeps_dtype(query, module))


def _keeps_dtype(query, module) -> bool:
    """Transformers' flash path casts float32 inputs to the autocast / weight dtype first; the fast path
    only takes inputs it would leave as they are."""
    if query.dtype in (torch.float16, torch.bfloat16):
        return True
    if query.dtype != torch.float32 or torch.is_autocast_enabled(query.device.type) or \
            hasattr(module.config, "_is_quantized"):
        return False
    linear = next((m for m in module.modules() if isinstance(m, torch.nn.Linear)), None)
    return linear is not None and linear.weight.dtype == torch.float32


def _decode_step(module, query, key, value, attention_mask, sliding_window, kwargs):
    """What Transformers' flash path computes for a plain decode step, without its per-layer work:
    `_is_packed_sequence` reads a tensor back to the host (a device sync in every layer of every step)
    although one token per sequence cannot be packed, and a 2D padding mask (left-padded batches, a
    static cache) is unpadded into a varlen call (more syncs). Same keywords (window of `sliding_window`
    keys when the cache is longer, softcap, scaling). A mask covers the first L keys (Transformers'
    flash path drops the rest too); the split-KV kernel applies it per key. Returns (batch, 1, heads,
    dim), or None to leave the step to Transformers' path (a kernel version without that kernel).
    (A step without a mask that the split-KV kernel takes as it is has already gone to `_lean_step`.)"""
    from .. import interface
    window = (-1, -1)
    if sliding_window is not None and key.shape[2] > sliding_window:
        window = (sliding_window - 1, sliding_window - 1)
    softcap = kwargs.get("softcap")
    softcap = 0.0 if softcap is None else softcap
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if attention_mask is not None:
        k, v = k[:, :attention_mask.shape[1]], v[:, :attention_mask.shape[1]]
        return interface._decode_with_padding_mask(q, k, v, attention_mask, kwargs.get("scaling"),
                                                   (window[0], 0), softcap)
    return interface.flash_attn_func(q, k, v, softmax_scale=kwargs.get("scaling"), causal=True, window_size=window,
                                     softcap=softcap)


_HALF = (torch.float16, torch.bfloat16)
_mods = None   # hf_flashattn.interface, kernels.decode, kernels.v2: imported on the first decode step (Triton)


def _lean_step(module, query, key, value, sliding_window, kwargs):
    """A decode step without a mask, the common case of generate() with a dynamic cache, where the host
    time of every layer shows in the tokens/s: one new token per sequence, nothing packed, inputs the
    split-KV decode kernel takes as they are (Transformers' (batch, heads, seq, dim) layout, last dims
    contiguous, same dtype and device, heads a multiple of kv heads, head dim a multiple of 8 up to 256),
    no gradient wanted, the v2 kernels active and the key length one that flash_attn_func would also send
    to the split-KV kernel (`kernels.v2.splits_keys`). Then `kernels.decode.decode_bhsd` computes it: one
    launch, no lse. Anything else returns None and takes `_decode_step` / Transformers' path, with
    flash_attn_func's checks and errors. The tests are written for speed (no imports, no generator
    expressions, `is` on dtypes): this function runs for every layer of every step."""
    global _mods
    if kwargs.get("dropout"):
        return None
    if not _RARE_KWARGS.isdisjoint(kwargs):   # one C-level pass; the keywords themselves only when present
        g = kwargs.get
        if g("output_attentions") or g("s_aux") is not None:
            return None
        for name in _VARLEN_KWARGS:
            if g(name) is not None:
                return None
    dt = query.dtype
    if key.dtype is not dt or value.dtype is not dt or (dt not in _HALF and not _keeps_dtype(query, module)):
        return None
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    B, H, _, D = query.shape
    kshape = key.shape
    Hk, L = kshape[1], kshape[2]
    if (value.shape != kshape or kshape[0] != B or kshape[3] != D or B == 0 or Hk == 0 or H % Hk or D % 8
            or D > 256 or query.stride(3) != 1 or key.stride(3) != 1 or value.stride(3) != 1):
        return None
    dev = query.get_device()
    if key.get_device() != dev or value.get_device() != dev or not (dev >= 0 or is_interpreting()):
        return None
    if _mods is None:
        import types
        from .. import interface
        from ..kernels import decode, v2
        _mods = types.SimpleNamespace(interface=interface, decode=decode, v2=v2)
    if _mods.interface.get_default_version() not in ("auto", "v2") or not _mods.v2.splits_keys(1, L):
        return None
    window_left = sliding_window - 1 if sliding_window is not None and L > sliding_window else -1
    softcap, scale = kwargs.get("softcap"), kwargs.get("scaling")
    return _mods.decode.decode_bhsd(query, key, value, D ** -0.5 if scale is None else float(scale),
                                    (window_left, 0), 0.0 if softcap is None else float(softcap))


def _module_sliding_window(module):
    """`getattr(module, "sliding_window", None)` without nn.Module.__getattr__'s slow miss (Llama's
    attention has no such attribute, and this runs for every layer of every step): an instance attribute,
    else a class attribute or property; parameters, buffers and submodules cannot be windows."""
    d = module.__dict__
    if "sliding_window" in d:
        return d["sliding_window"]
    return getattr(module, "sliding_window", None) if hasattr(type(module), "sliding_window") else None


def _make_attention_forward(flash_attention_forward):
    def flashattn_custom_forward(module, query, key, value, attention_mask, sliding_window=None, **kwargs):
        """Transformers' flash_attention_forward (the contract is in design.md, "Transformers
        integration"), taking sliding_window from `module.sliding_window` when the model does not
        pass it: Qwen2-MoE sets it on its sliding layers but never forwards it, unlike eager's mask.
        A plain decode step (one token, no padding) calls the kernel directly: `_lean_step` (no mask, the
        common generate() step, one launch), else `_decode_step` (a padding mask, or inputs the lean call
        does not take). While torch.compile traces (a static cache's compiled step), never `_lean_step`: it
        launches the kernel itself, which Dynamo would trace into (a graph break at the launcher, then Inductor
        recompiling the kernel with float64 scales, which Triton rejects); `_decode_step` reaches the same
        kernel through the custom ops, opaque to the compiler."""
        if sliding_window is None:
            sliding_window = _module_sliding_window(module)
        if attention_mask is None and query.shape[2] == 1 and not torch.compiler.is_compiling():
            out = _lean_step(module, query, key, value, sliding_window, kwargs)
            if out is not None:
                return out, None
        if kwargs.get("s_aux") is not None:  # Transformers would drop it silently: our functions take no sinks
            raise NotImplementedError(f"{type(module).__name__} uses attention sinks (s_aux), which hf_flashattn does "
                                      "not implement; build the model with attn_implementation='eager' or 'sdpa'.")
        if _is_plain_decode_step(module, query, key, value, attention_mask, kwargs):
            out = _decode_step(module, query, key, value, attention_mask, sliding_window, kwargs)
            if out is not None:
                return out, None
        return flash_attention_forward(module, query, key, value, attention_mask, sliding_window=sliding_window,
                                       **kwargs)

    return flashattn_custom_forward


def is_registered() -> bool:
    """True when NAME is registered and Transformers' flash loader resolves it to hf_flashattn."""
    import sys
    fa_utils = sys.modules.get("transformers.modeling_flash_attention_utils")
    masking = sys.modules.get("transformers.masking_utils")
    modeling = sys.modules.get("transformers.modeling_utils")
    return (fa_utils is not None and masking is not None and modeling is not None
            and hasattr(getattr(fa_utils, "_lazy_imports", None), _MARK)
            and NAME in modeling.AttentionInterface._global_mapping
            and NAME in masking.AttentionMaskInterface._global_mapping)


def _make_mask_function(flash_attention_mask):
    """Transformers' `flash_attention_mask`, except that a padding mask shorter than the key length is
    padded on the right with zeros (cache slots not yet written) to exactly `kv_length` on decode steps
    (one query token; a longer query is aligned with the mask's last columns by the unpadding path, so
    its mask keeps Transformers' length).

    Why: with a static cache, generate() builds the mask outside the compiled forward from a 2D mask that
    grows by one column a step, and `flash_attention_mask` returns it unchanged. The compiled forward then
    sees a new input size every step, and CUDA-graph trees record a new graph for each (the 2026-11-26
    static-cache generate() ran at 45 tokens/s against sdpa's 273, `results/2026-11-26-h100-decode-static.md`).
    Padded, the mask has the static cache's size on every step, and the masked decode kernel skips the
    unwritten slots. Under compile the all-ones check (a data-dependent branch) is skipped."""
    def mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, **kwargs):
        if (q_length == 1 and attention_mask is not None and attention_mask.ndim == 2
                and attention_mask.shape[1] < kv_length):
            attention_mask = torch.nn.functional.pad(attention_mask, (0, kv_length - attention_mask.shape[1]), value=0)
            return attention_mask
        if attention_mask is not None and torch.compiler.is_compiling():
            return attention_mask[:, -kv_length:]
        if mask_function is not None:
            kwargs["mask_function"] = mask_function
        return flash_attention_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                                    attention_mask=attention_mask, **kwargs)
    mask_function.__hf_flashattn__ = True
    return mask_function


def register() -> None:
    """Register attn_implementation="flashattn_custom" with Transformers. Idempotent.

    Raises RuntimeError, naming the installed Transformers version, when Transformers' internals
    differ from what this adapter was written against.
    """
    fa_utils, flash_attention_forward, AttentionInterface, AttentionMaskInterface, flash_attention_mask = \
        _import_internals()
    _install_lazy_imports_adapter(fa_utils)
    if not getattr(AttentionInterface._global_mapping.get(NAME), "__hf_flashattn__", False):
        fn = _make_attention_forward(flash_attention_forward)
        fn.__hf_flashattn__ = True
        AttentionInterface.register(NAME, fn)  # classmethods: item assignment is instance-local
    AttentionMaskInterface.register(NAME, _make_mask_function(flash_attention_mask))
