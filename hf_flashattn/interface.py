"""Public functions with flash-attn's names, argument order and layout.

Layers, as in flash-attn: documented public function -> torch.autograd.Function -> torch.library
custom op (with a fake implementation, for torch.compile) -> the kernel backend
(`hf_flashattn.kernels.<version>`), whose contract is

    forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            softmax_scale, window_size, softcap) -> (out, lse)
    backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
             softmax_scale, window_size, softcap, deterministic) -> (dq, dk, dv)

with q (B, Sq, H, D) dense or (total_q, H, D) packed (cu_seqlens given), window_size already
resolved (causal -> right = 0), lse (B, H, Sq) dense or (H, total_q) packed, float32.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Optional, Tuple

import torch

from . import _validate as V
from ._runtime import env_get, is_hopper, is_interpreting

_VERSIONS = ("v1", "v2", "v3")
class _State(threading.local):
    """Per-thread settings; the class defaults make a read of an unset one a plain lookup (a missing
    attribute of a threading.local costs a caught AttributeError, ~1.5 us, on every decode layer)."""
    version = None
    fp8 = None


_state = _State()


def _env_default_version() -> str:
    v = env_get("HF_FLASHATTN_VERSION", "auto")
    if v not in ("auto",) + _VERSIONS:
        raise ValueError(f"HF_FLASHATTN_VERSION must be one of auto, v1, v2, v3; got {v!r}.")
    return v


def get_default_version() -> str:
    """The version used when a call passes version="auto": set_default_version()'s, else the
    HF_FLASHATTN_VERSION environment variable, else "auto" (best kernel for the device)."""
    return _state.version or _env_default_version()


def set_default_version(version: str) -> None:
    """Make version="auto" calls (including attn_implementation="flashattn_custom") use `version`.
    The setting is per thread (the thread that runs the forward pass); HF_FLASHATTN_VERSION sets the
    default for the whole process."""
    V._validate_options(0.0, None, (-1, -1), 0.0, None, version, "set_default_version")
    _state.version = None if version == "auto" else version


@contextlib.contextmanager
def use_version(version: str):
    """Context manager form of set_default_version()."""
    old = _state.version
    set_default_version(version)
    try:
        yield
    finally:
        _state.version = old


def _resolve_version(version: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_seqlen_k=None) -> str:
    if version == "auto":
        version = get_default_version()
    if version == "auto":   # _v3_by_default checks what the branch below checks for an explicit "v3"
        return "v3" if _v3_by_default(q, k, v, max_seqlen_k) else "v2"
    if version == "v3":
        if not (is_hopper(q.device) or is_interpreting()):
            raise NotImplementedError(f"version='v3' needs a Hopper GPU (sm90); q is on {q.device}. "
                                      "Use version='v2' or 'auto'.")
        from .kernels import v3
        why = v3.supports(q, k, v)
        if why is not None:
            raise NotImplementedError(f"version='v3': {why}. Use version='v2' or 'auto'.")
    return version


V3_FROM_KEYS = 2048
# ... and from fewer keys at the head dims the Gluon kernels cover. Measured on the H100 with bench.py, v2 and v3 in
# one process, 5 rounds (results/2026-11-27-h100-bench-v2-v3-short.md; twenty-second session): at 1k keys v3 is
# 1.01-1.15x v2 at d64 and 1.26-1.49x at d128 / d256, fwd and fwd+bwd, both masks; at 512 keys 1.01-1.47x at d128 /
# d256 but 0.88-1.08x at d64; at 128 keys 0.78-1.43x.
V3_FROM_KEYS_BY_DIM = {64: 1024, 128: 512, 256: 512}
# Head dims padded to a power of two run v3.py's forward and v2's backward under v3 (no Gluon plan). Measured the same
# way, 3 rounds (results/2026-11-27-h100-bench-v2-v3-other-dims.md): d80 / d96 at 1k v3 1.04-1.10x v2 forward and
# 1.00-1.02x fwd+bwd, at 2k 1.08-1.19x and 0.95-1.01x: from 1024 keys between 64 and 128 (V3_FROM_KEYS_PADDED_128);
# d192 at 1k-2k 0.85-0.95x forward, 0.96-0.99x fwd+bwd (v3.py's d256 plan on a 256-wide tile): never between 128 and
# 256. Other head dims (below 64) keep V3_FROM_KEYS.
V3_FROM_KEYS_PADDED_128 = 1024


def _v3_least_keys(d: int) -> int | None:
    """The keys from which version="auto" runs v3 on Hopper at head dim d (None: never; `_v3_by_default`)."""
    if d in V3_FROM_KEYS_BY_DIM:
        return V3_FROM_KEYS_BY_DIM[d]
    if 64 < d < 128:
        return V3_FROM_KEYS_PADDED_128
    if 128 < d < 256:
        return None
    return V3_FROM_KEYS


def _v3_by_default(q, k, v, max_seqlen_k=None) -> bool:
    """What version="auto" runs on a Hopper GPU: v3 for the inputs its descriptors can load (`v3.supports`) from
    `_v3_least_keys(head dim)` keys (packed: the longest sequence's, max_seqlen_k), v2 below that, at head dims
    between 128 and 256, for decode-like shapes (a few queries over many keys: v2's split-KV kernel) and off Hopper.
    V3_FROM_KEYS (2048, the head dims below 64) is the H200's first measurement (results/2026-11-26-h200-bench*.md, two
    runs: from 2k keys v3's forward 1.05-1.23x v2's; at 512-1k, where the host's launch work showed, 0.62-1.65x)."""
    if not is_hopper(q.device):
        return False
    least = _v3_least_keys(q.shape[-1])
    if least is None:
        return False
    from .kernels import v2, v3
    if q.dim() == 4 and (k.shape[1] < least or v2.splits_keys(q.shape[1], k.shape[1])):
        return False
    if q.dim() == 3 and (k.shape[0] if max_seqlen_k is None else max_seqlen_k) < least:
        return False
    return v3.supports(q, k, v) is None


def _kernels(version: str):
    if version == "v1":
        from .kernels import v1
        return v1
    if version == "v3":
        from .kernels import v3
        return v3
    from .kernels import v2
    return v2


# The launchers are torch.library custom ops with fake implementations, so torch.compile (and
# generate()'s auto-compile with a static cache) sees one opaque node instead of tracing Triton.
@torch.library.custom_op("hf_flashattn::attn_fwd", mutates_args=())
def _attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
              cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
              window_left: int, window_right: int, softcap: float, version: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernels(version).forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                     (window_left, window_right), softcap)


@_attn_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right,
      softcap, version):
    H = q.shape[-2]
    lse_shape = (H, q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], H, q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("hf_flashattn::attn_bwd", mutates_args=())
def _attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
              max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, window_left: int, window_right: int,
              softcap: float, deterministic: bool, version: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels(version).backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      softmax_scale, (window_left, window_right), softcap, deterministic)


@_attn_bwd.register_fake
def _(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
      window_right, softcap, deterministic, version):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _resolve_window(causal: bool, window_size) -> tuple[int, int]:
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    return left, right


def _fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window, softcap, version):
    """The custom op while torch.compile traces; a direct call otherwise (the op's Python dispatch costs
    tens of microseconds a call, which a decode step of a few microseconds of GPU time cannot hide)."""
    if torch.compiler.is_compiling():
        return _attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                         window[0], window[1], softcap, version)
    return _kernels(version).forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                     window, softcap)


class _FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                window, softcap, deterministic, version):
        out, lse = _fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window,
                        softcap, version)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, window, softcap, deterministic, version)
        ctx.mark_non_differentiable(lse)
        # lse takes no gradient: without this, autograd would make a zero-filled dlse (an allocation and a fill
        # kernel) for every backward. dout is always given: lse is not differentiable, so backward runs only when
        # out received a gradient
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, scale, window, softcap, deterministic, version = ctx.args
        if torch.compiler.is_compiling():
            dq, dk, dv = _attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, window[0], window[1],
                                   softcap, deterministic, version)
        else:
            dq, dk, dv = _kernels(version).backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, window,
                                                    softcap, deterministic)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


class _FlashAttnPackedFunc(torch.autograd.Function):
    """_FlashAttnFunc over packed inputs: qkv (q, k and v stacked along `dim`; kv None) or q and kv (k and v stacked).
    The backward makes one gradient of the stacked tensor and the kernels write dQ, dK and dV into its views, as
    flash-attn's packed backward does, where autograd would stack three separate gradients (a copy, and the three
    held beside the stacked one)."""

    @staticmethod
    def forward(ctx, first, kv, dim, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window,
                softcap, deterministic, version):
        q, k, v = first.unbind(dim) if kv is None else (first, *kv.unbind(dim))
        out, lse = _fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window,
                        softcap, version)
        ctx.save_for_backward(first, kv, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (dim, max_seqlen_q, max_seqlen_k, softmax_scale, window, softcap, deterministic, version)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)   # as _FlashAttnFunc
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        first, kv, out, lse, cu_q, cu_k = ctx.saved_tensors
        dim, max_q, max_k, scale, window, softcap, deterministic, version = ctx.args
        if kv is None:
            q, k, v = first.unbind(dim)
            d_first = torch.empty_like(first)   # first's strides where it is dense: its views' strides as q, k, v's
            d_kv = None
            grads = d_first.unbind(dim)
        else:
            q, (k, v) = first, kv.unbind(dim)
            d_first, d_kv = torch.empty_like(first), torch.empty_like(kv)
            grads = (d_first, *d_kv.unbind(dim))
        _kernels(version).backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, window, softcap,
                                   deterministic, grads)
        return d_first, d_kv, None, None, None, None, None, None, None, None, None, None


def _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window, softcap,
               deterministic, version, packed=None):
    """The autograd Function when a gradient can flow (or torch.compile traces); the forward alone
    otherwise (inference, generate()), without the Function's bookkeeping; inside
    hf_flashattn.fp8.fp8_attention(), dense prefill-sized calls in FP8. packed: (first, kv, dim) when q, k, v are views
    of packed tensors (`_FlashAttnPackedFunc`: qkv, None, dim or q, kv, dim)."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and
                                         (q.requires_grad or k.requires_grad or v.requires_grad)):
        if packed is not None and not torch.compiler.is_compiling():
            first, kv, dim = packed
            return _FlashAttnPackedFunc.apply(first, kv, dim, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                              softmax_scale, window, softcap, deterministic, version)
        return _FlashAttnFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                    window, softcap, deterministic, version)
    fp8 = _state.fp8
    if fp8 is not None and cu_seqlens_q is None and q.shape[1] > 16 and q.dtype in (torch.float16, torch.bfloat16):
        from . import fp8 as F8
        return F8._attention(q, k, v, softmax_scale, False, window, softcap, **fp8)
    return _fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window, softcap,
                version)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                    version="auto"):
    """Exact attention softmax(q kᵀ · softmax_scale) v, computed tile by tile (FlashAttention).

    Arguments:
        q: (batch, seqlen_q, nheads, headdim), float16 / bfloat16 / float32 (float32 is for CPU tests;
            on the GPU it runs with IEEE float32 products).
        k: (batch, seqlen_k, nheads_k, headdim), same dtype and device; nheads must be a multiple of
            nheads_k (GQA/MQA: query head h reads key/value head h // (nheads // nheads_k)).
        v: (batch, seqlen_k, nheads_k, headdim).
            Any strides are accepted as long as the last dimension is contiguous. headdim: a multiple
            of 8 up to 256.
        dropout_p: float, default 0.0. Only 0.0 is supported (NotImplementedError otherwise).
        softmax_scale: float or None, default None = 1 / sqrt(headdim).
        causal: bool, default False. Causal mask aligned bottom-right when seqlen_q != seqlen_k:
            query i sees keys j <= i + seqlen_k - seqlen_q. For seqlen_q = 2, seqlen_k = 5:
                1 1 1 1 0
                1 1 1 1 1
        window_size: (left, right), default (-1, -1) = unbounded. Query i sees keys j with
            i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right.
        softcap: float, default 0.0 (off). Scores become softcap · tanh(scores / softcap).
        alibi_slopes: None only (NotImplementedError otherwise).
        deterministic: bool, default False. With True the backward uses no atomics and is bitwise
            reproducible. With False, v3 on Hopper at head dim 64 and 128 sums dQ across key blocks
            with the TMA unit's float32 reduce (faster, not bitwise reproducible between runs, as
            flash-attn's default); v1/v2 stay bitwise reproducible unless HF_FLASHATTN_BWD_DQ=atomic.
        return_attn_probs: bool, default False. If True, also return softmax_lse and None.
        version: keyword-only, "auto" (default), "v1", "v2" or "v3". "auto" follows
            set_default_version() / HF_FLASHATTN_VERSION, else the best kernel for the device.

    Returns:
        out: (batch, seqlen_q, nheads, headdim), q's dtype. Rows that see no key are 0.
        softmax_lse (only if return_attn_probs): (batch, nheads, seqlen_q), float32; +inf on rows
            that see no key.
        None (only if return_attn_probs), in place of flash-attn's debug attention probabilities.
    """
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs, version)


def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
           return_attn_probs, version, packed=None):
    """flash_attn_func's body; packed: `_attention`'s (the packed functions' views)."""
    if not torch.compiler.is_compiling():
        V._validate_tensors(q, k, v, varlen=False)
        V._validate_options(dropout_p, softmax_scale, window_size, softcap, alibi_slopes, version,
                            "flash_attn_func")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    version = _resolve_version(version, q, k, v)
    out, lse = _attention(q, k, v, None, None, q.shape[1], k.shape[1], float(softmax_scale),
                          _resolve_window(causal, window_size), float(softcap), deterministic, version, packed)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None,
                           *, version="auto"):
    """flash_attn_func for packed sequences: sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
    of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k and v; sequences never attend to each other.

    Arguments (besides those of flash_attn_func, which mean the same per sequence):
        q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim).
        cu_seqlens_q: (batch + 1,) int32, starting at 0, non-decreasing.
        cu_seqlens_k: (batch + 1,) int32, same.
        max_seqlen_q: int or 0-d tensor, the longest query sequence (not smaller than the longest
            one in cu_seqlens_q).
        max_seqlen_k: int or 0-d tensor, the same for the keys.
        block_table: None only (paged KV caches are not implemented).

    Returns out (total_q, nheads, headdim); with return_attn_probs also softmax_lse
    (nheads, total_q) float32 and None.
    """
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table, version)


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table, version, packed=None):
    """flash_attn_varlen_func's body; packed: `_attention`'s (the packed functions' views)."""
    max_seqlen_q = V._as_int(max_seqlen_q, "max_seqlen_q")
    max_seqlen_k = V._as_int(max_seqlen_k, "max_seqlen_k")
    if not torch.compiler.is_compiling():
        V._validate_tensors(q, k, v, varlen=True)
        V._validate_options(dropout_p, softmax_scale, window_size, softcap, alibi_slopes, version,
                            "flash_attn_varlen_func")
        if block_table is not None:
            raise NotImplementedError("flash_attn_varlen_func: block_table (paged KV cache) is not implemented; "
                                      "pass block_table=None.")
        cq = V._validate_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], q.device)
        ck = V._validate_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], q.device)
        if len(cq) != len(ck):
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1); got "
                             f"{len(cq)} and {len(ck)}.")
        for name, cu, given in (("max_seqlen_q", cq, max_seqlen_q), ("max_seqlen_k", ck, max_seqlen_k)):
            longest = max(b - a for a, b in zip(cu, cu[1:]))
            if given < longest:
                raise ValueError(f"{name}={given} is smaller than the longest sequence ({longest}); pass "
                                 f"{name}={longest}.")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    version = _resolve_version(version, q, k, v, max_seqlen_k)
    out, lse = _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(softmax_scale),
                          _resolve_window(causal, window_size), float(softcap), deterministic, version, packed)
    return (out, lse, None) if return_attn_probs else out


def _unpack(t, name: str, layout: str, dim: int, parts: int, fix: str):
    """The views of a packed tensor along `dim` (no copy): qkv -> q, k, v; kv -> k, v. Checks what the views' own
    checks would report under other names: a tensor, its layout, a dtype the kernels take, the last dim contiguous."""
    if not torch.compiler.is_compiling():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}.")
        if t.dim() != len(layout.split(",")) or t.shape[dim] != parts:
            raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}. {fix}")
        V._check_dtype(t, name)
        V._check_last_dim(t, name)
    return t.unbind(dim)


_PACKED_NOTE = """
    The views of the packed tensor go to the kernels without a copy, and the backward writes dQ, dK and dV into the
    views of one gradient of the packed tensor (as flash-attn's packed backward does; under torch.compile autograd
    stacks three gradients instead)."""


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              version="auto"):
    """flash_attn_func on q, k, v stacked in one tensor, qkv (batch, seqlen, 3, nheads, headdim): q = qkv[:, :, 0],
    k = qkv[:, :, 1], v = qkv[:, :, 2]. The other arguments and the returns are flash_attn_func's. For GQA/MQA use
    flash_attn_kvpacked_func or flash_attn_func."""
    q, k, v = _unpack(qkv, "qkv", "(batch, seqlen, 3, nheads, headdim)", 2, 3,
                      "Stack them with torch.stack([q, k, v], dim=2), or call flash_attn_func(q, k, v).")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs, version, packed=(qkv, None, 2))


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             version="auto"):
    """flash_attn_func with k and v stacked in one tensor, kv (batch, seqlen_k, 2, nheads_k, headdim): k = kv[:, :, 0],
    v = kv[:, :, 1]. q is (batch, seqlen_q, nheads, headdim), nheads a multiple of nheads_k. The other arguments and
    the returns are flash_attn_func's."""
    k, v = _unpack(kv, "kv", "(batch, seqlen_k, 2, nheads_k, headdim)", 2, 2,
                   "Stack them with torch.stack([k, v], dim=2), or call flash_attn_func(q, k, v).")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs, version, packed=(q, kv, 2))


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, version="auto"):
    """flash_attn_varlen_func on packed sequences whose q, k, v are stacked in one tensor, qkv (total_tokens, 3,
    nheads, headdim); cu_seqlens and max_seqlen serve queries and keys alike. The other arguments and the returns are
    flash_attn_varlen_func's."""
    q, k, v = _unpack(qkv, "qkv", "(total_tokens, 3, nheads, headdim)", 1, 3,
                      "Stack them with torch.stack([q, k, v], dim=1), or call flash_attn_varlen_func(q, k, v, ...).")
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs, None, version,
                   packed=(qkv, None, 1))


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    version="auto"):
    """flash_attn_varlen_func with k and v stacked in one tensor, kv (total_k, 2, nheads_k, headdim). The other
    arguments and the returns are flash_attn_varlen_func's."""
    k, v = _unpack(kv, "kv", "(total_k, 2, nheads_k, headdim)", 1, 2,
                   "Stack them with torch.stack([k, v], dim=1), or call flash_attn_varlen_func(q, k, v, ...).")
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs, None, version,
                   packed=(q, kv, 1))


for _packed in (flash_attn_qkvpacked_func, flash_attn_kvpacked_func, flash_attn_varlen_qkvpacked_func,
                flash_attn_varlen_kvpacked_func):
    if _packed.__doc__:  # None under python -OO
        _packed.__doc__ += "\n" + _PACKED_NOTE


def _decode_masked_impl(q, k, v, key_mask, softmax_scale, window_left, window_right, softcap):
    from .kernels import decode
    _kernels("v2")  # the split-KV decode kernel is v2's inner loop (and version bookkeeping sees it)
    return decode.forward_dense(q, k, v, softmax_scale, (window_left, window_right), softcap, key_mask)[0]


@torch.library.custom_op("hf_flashattn::decode_masked_fwd", mutates_args=())
def _decode_masked_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                       softmax_scale: float, window_left: int, window_right: int, softcap: float) -> torch.Tensor:
    return _decode_masked_impl(q, k, v, key_mask, softmax_scale, window_left, window_right, softcap)


@_decode_masked_fwd.register_fake
def _(q, k, v, key_mask, softmax_scale, window_left, window_right, softcap):
    return q.new_empty(q.shape)


def _decode_with_padding_mask(q, k, v, key_mask, softmax_scale, window, softcap):
    """Decode step(s) of q (B, Sq <= 16, H, D) over k, v (B, L, Hk, D) where key j of sequence b is
    attended only if key_mask[b, j] (B, L) is nonzero (a left-padded batch, a static cache's empty
    slots): the split-KV kernel with the mask applied per key block, no unpadding and no device sync.
    Queries sit at the last positions (bottom-right). Returns None when the active version is not v2
    (the caller then takes the generic path), else out (B, Sq, H, D)."""
    # the split-KV kernel is what "auto" and "v2" run for decode steps (`_v3_by_default`)
    if get_default_version() not in ("auto", "v2") or q.requires_grad and torch.is_grad_enabled():
        return None
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    op = _decode_masked_fwd if torch.compiler.is_compiling() else _decode_masked_impl
    return op(q, k, v, key_mask, float(softmax_scale), int(window[0]), int(window[1]), float(softcap))


def _kvcache_impl(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, softmax_scale, window_left, window_right,
                  softcap, num_splits):
    """cache_seqlens: an int32 (batch,) tensor, or (eager calls) an int that every sequence shares: then the attention
    reads no lengths tensor (every sequence sees cache_seqlens + seqlen_new keys: no fill and add kernels a call, and
    the split count follows the keys in use, not the cache's size); the append still takes its rows from a tensor."""
    from .kernels import decode
    s_new = 0 if k is None else k.shape[1]
    if isinstance(cache_seqlens, int):
        if k is not None:
            decode.append(k, v, k_cache, v_cache,
                          torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device), cache_batch_idx)
        seqlens_k, max_k = None, cache_seqlens + s_new
    else:
        seqlens_k, max_k = cache_seqlens, k_cache.shape[1]
        if k is not None:
            decode.append(k, v, k_cache, v_cache, cache_seqlens, cache_batch_idx)
            seqlens_k = cache_seqlens + s_new
    out, lse, _ = decode.forward(q, k_cache, v_cache, seqlens_k, cache_batch_idx, max_k, softmax_scale,
                                 (window_left, window_right), softcap, num_splits)
    return out, lse


@torch.library.custom_op("hf_flashattn::kvcache_fwd", mutates_args=("k_cache", "v_cache"))
def _kvcache_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: Optional[torch.Tensor],
                 v: Optional[torch.Tensor], cache_seqlens: torch.Tensor, cache_batch_idx: Optional[torch.Tensor],
                 softmax_scale: float, window_left: int, window_right: int, softcap: float,
                 num_splits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kvcache_impl(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, softmax_scale, window_left,
                         window_right, softcap, num_splits)


@_kvcache_fwd.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, softmax_scale, window_left, window_right, softcap,
      num_splits):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
                            *, version="auto"):
    """Attention of q against a KV cache, optionally appending new keys/values to it first (decoding).

    Arguments:
        q: (batch, seqlen_q, nheads, headdim); seqlen_q is usually 1 (decode) or a few (speculation).
        k_cache: (batch_cache, seqlen_cache, nheads_k, headdim), same dtype and device; updated in place
            when k is given.
        v_cache: (batch_cache, seqlen_cache, nheads_k, headdim).
        k: None or (batch, seqlen_new, nheads_k, headdim): new keys, written into k_cache at rows
            cache_seqlens[b] ... cache_seqlens[b] + seqlen_new - 1 (in-kernel) before attending.
        v: None or (batch, seqlen_new, nheads_k, headdim), with k.
        rotary_cos: None only (rotary in the kernel is not implemented; apply it before the call).
        rotary_sin: None only.
        cache_seqlens: int, (batch,) int32 tensor, or None (= every cache row is valid): the number of
            valid cache rows per sequence before the append. A tensor's values are checked by reading
            them back (a device sync), except under torch.compile or CUDA-graph capture; an int is
            checked on the host (no sync).
        cache_batch_idx: None or (batch,) int32: which cache entry each sequence uses (default b).
        cache_leftpad: None only (not implemented).
        block_table: None only (paged caches are not implemented).
        softmax_scale: float or None (1 / sqrt(headdim)).
        causal: bool. Bottom-right aligned: query i sits at key position
            cache_seqlens + seqlen_new - seqlen_q + i.
        window_size: (left, right), -1 = unbounded, as in flash_attn_func.
        softcap: float, 0 = off.
        rotary_interleaved: ignored unless rotary_cos is given (it must be None).
        alibi_slopes: None only.
        num_splits: int, 0 = chosen from the shapes (split-KV when few programs would run); 1 = no split;
            n > 1 = split every sequence's keys into n pieces merged exactly afterwards.
        return_softmax_lse: bool; if True also return lse (batch, nheads, seqlen_q) float32.
        version: "auto" or "v2" (the decode kernel is v2's inner loop); "v1"/"v3" raise NotImplementedError.

    Returns out (batch, seqlen_q, nheads, headdim), and lse if return_softmax_lse. No backward.
    """
    if version not in ("auto", "v2"):
        V._validate_options(0.0, None, (-1, -1), 0.0, None, version, "flash_attn_with_kvcache")
        raise NotImplementedError(f"flash_attn_with_kvcache: version={version!r} is not implemented; the decode "
                                  "kernel is v2's. Use version='auto' or 'v2'.")
    for name, val in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin), ("cache_leftpad", cache_leftpad),
                      ("block_table", block_table)):
        if val is not None:
            raise NotImplementedError(f"flash_attn_with_kvcache: {name} is not implemented; pass {name}=None.")
    B = q.shape[0]
    compiling = torch.compiler.is_compiling()
    cache_rows = k_cache.shape[1] if isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4 else None
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("flash_attn_with_kvcache: cache_seqlens is required when k/v are appended (where "
                             "should they go?); pass the number of valid cache rows per sequence.")
        cache_seqlens = cache_rows       # every cache row is valid: the int path below
    seqlens_checked = isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool)
    if seqlens_checked:  # checked here on the host: no device sync to read the values back
        s_new = k.shape[1] if isinstance(k, torch.Tensor) and k.dim() == 4 else 0
        # (a malformed k_cache, cache_rows None, is _validate_kvcache's to name, below)
        if cache_rows is not None and not 0 <= cache_seqlens <= cache_rows - s_new:
            raise ValueError(f"flash_attn_with_kvcache: cache_seqlens + seqlen_new must lie in [0, seqlen_cache="
                             f"{cache_rows}]; got cache_seqlens={cache_seqlens} and seqlen_new={s_new}. "
                             "Allocate a longer cache.")
        if compiling:   # the custom op takes a tensor; eager calls keep the int (`_kvcache_impl`)
            cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    if not compiling:
        V._validate_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, num_splits, seqlens_checked)
        V._validate_options(0.0, softmax_scale, window_size, softcap, alibi_slopes, "auto",
                            "flash_attn_with_kvcache")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    left, right = _resolve_window(causal, window_size)
    op = _kvcache_fwd if torch.compiler.is_compiling() else _kvcache_impl  # the op's dispatch only where traced
    out, lse = op(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, float(softmax_scale), left, right,
                  float(softcap), int(num_splits))
    return (out, lse) if return_softmax_lse else out
