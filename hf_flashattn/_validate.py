"""Input checks at the door of the public functions. Each error names the argument, the value
received and the fix. Skipped under torch.compile tracing (see interface.py)."""
from __future__ import annotations

import weakref

import torch

from ._runtime import is_interpreting

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEADDIM = 256


def _check_dtype(t, name: str):
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported dtypes are float16, bfloat16 and float32 "
                        f"(cast with {name}.to(torch.bfloat16)).")


def _check_last_dim(t, name: str):
    if t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last (headdim) dimension; got strides "
                         f"{tuple(t.stride())}. Call {name}.contiguous() first.")


def _validate_tensors(q, k, v, varlen: bool, check_batch: bool = True, names=("q", "k", "v")):
    """names: the caller's names of its three tensors, for the messages (flash_attn_with_kvcache: k_cache and
    v_cache)."""
    qn, kn, vn = names
    want = 3 if varlen else 4
    layout = "(total_tokens, nheads, headdim)" if varlen else "(batch, seqlen, nheads, headdim)"
    for name, t in ((qn, q), (kn, k), (vn, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != want:
            raise ValueError(f"{name} must have {want} dimensions {layout}, got shape {tuple(t.shape)}.")
        _check_dtype(t, name)
        if t.dtype != q.dtype:
            raise TypeError(f"{qn}, {kn} and {vn} must share a dtype; got {qn} {q.dtype} and {name} {t.dtype}.")
        if t.device != q.device:
            raise ValueError(f"{qn}, {kn} and {vn} must be on one device; got {qn} on {q.device} and {name} on "
                             f"{t.device}.")
        _check_last_dim(t, name)
    if q.device.type == "cpu" and not is_interpreting():
        raise ValueError("q is on the CPU but the Triton kernels are compiled for the GPU. Move the tensors to "
                         "CUDA, or set TRITON_INTERPRET=1 before importing hf_flashattn to run on the CPU.")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q is on device {q.device}; hf_flashattn runs on CUDA GPUs (or on the CPU through "
                         "Triton's interpreter).")
    d = q.shape[-1]
    if d % 8 != 0 or not 8 <= d <= MAX_HEADDIM:
        raise ValueError(f"headdim must be a multiple of 8 between 8 and {MAX_HEADDIM}; got q.shape[-1]={d}.")
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"{qn}, {kn} and {vn} must have the same headdim; got {qn} {d}, {kn} {k.shape[-1]}, "
                         f"{vn} {v.shape[-1]}.")
    if k.shape != v.shape:
        raise ValueError(f"{kn} and {vn} must have the same shape; got {kn} {tuple(k.shape)} and {vn} "
                         f"{tuple(v.shape)}.")
    h, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or h % hk != 0:
        raise ValueError(f"the number of query heads must be a multiple of the number of key/value heads; got "
                         f"nheads={h} ({qn}.shape[-2]) and nheads_k={hk} ({kn}.shape[-2]).")
    if not varlen and check_batch and k.shape[0] != q.shape[0]:
        raise ValueError(f"{qn} and {kn} must have the same batch size; got {qn}.shape[0]={q.shape[0]} and "
                         f"{kn}.shape[0]={k.shape[0]}.")


def _validate_options(dropout_p, softmax_scale, window_size, softcap, alibi_slopes, version, what: str):
    if dropout_p != 0.0:
        raise NotImplementedError(f"{what}: dropout_p={dropout_p} is not implemented in hf_flashattn; pass "
                                  "dropout_p=0.0 (models in eval mode do).")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{what}: alibi_slopes is not implemented in hf_flashattn; pass alibi_slopes=None.")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive float or None; got {softmax_scale!r}.")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints (left, right); got {window_size!r}.")
    if window_size[0] < -1 or window_size[1] < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 means unbounded); got {tuple(window_size)}.")
    if not isinstance(softcap, (int, float)) or softcap < 0:
        raise ValueError(f"softcap must be a float >= 0 (0 disables it); got {softcap!r}.")
    if version not in ("auto", "v1", "v2", "v3"):
        raise ValueError(f"version must be one of 'auto', 'v1', 'v2', 'v3'; got {version!r}.")


# id(tensor) -> (weak reference, its version counter, its values): the GPU cu_seqlens tensors read back already.
# Transformers passes the same cu_seqlens tensor to every layer of a forward pass; reading a GPU tensor's values
# is a device sync, once per tensor instead of once per layer. An entry counts only for the same live object
# (the weak reference) not modified in place since (torch's version counter). Writes that bypass the counter
# (through `.data`, a NumPy view, a raw kernel) are not seen: such a tensor is checked with its old values,
# while the kernels read the new ones. CPU tensors (no sync to save) and inference-mode tensors (no version
# counter) are read every call.
_READ_BACK: dict = {}
_CACHE_CPU = False   # tests: cache CPU tensors too, to check the cache's logic without a GPU


def _read_back(cu):
    if cu.is_inference() or not (cu.is_cuda or _CACHE_CPU):
        return cu.tolist()
    hit = _READ_BACK.get(id(cu))
    if hit is not None and hit[0]() is cu and hit[1] == cu._version:
        return hit[2]
    vals = cu.tolist()
    if len(_READ_BACK) >= 64:
        _READ_BACK.clear()
    _READ_BACK[id(cu)] = (weakref.ref(cu), cu._version, vals)
    return vals


def _validate_cu_seqlens(cu, name: str, total: int, device):
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor, got {type(cu).__name__}.")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32; got {cu.dtype}. Use {name}.to(torch.int32).")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 entries; got shape {tuple(cu.shape)}.")
    if cu.device != device:
        raise ValueError(f"{name} must be on the same device as q ({device}); got {cu.device}.")
    vals = _read_back(cu)
    if vals[0] != 0 or any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must start at 0 and never decrease (cumulative sequence lengths); got {vals}.")
    if vals[-1] > total:
        raise ValueError(f"{name}[-1]={vals[-1]} exceeds the number of packed tokens ({total}).")
    return vals


def _as_int(x, name: str) -> int:
    if torch.compiler.is_compiling():  # a data-dependent SymInt (e.g. from .item() in the unpad path): no checks
        return int(x.item()) if isinstance(x, torch.Tensor) else x
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be an int or a 0-d tensor; got a tensor of shape {tuple(x.shape)}.")
        x = int(x.item())
    if not isinstance(x, int) or x < 0:
        raise ValueError(f"{name} must be a non-negative int; got {x!r}.")
    return x


def _validate_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, num_splits, seqlens_checked=False):
    """seqlens_checked: cache_seqlens came from an int already checked on the host. Otherwise its values
    (and cache_batch_idx's) are read back, a device sync, except while a CUDA graph is being captured."""
    _validate_tensors(q, k_cache, v_cache, varlen=False, check_batch=False,   # batch: see cache_batch_idx below
                      names=("q", "k_cache", "v_cache"))
    B, Sc = q.shape[0], k_cache.shape[1]
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new keys and values to append), or both be None.")
    s_new = 0
    if k is not None:
        want = (B, k.shape[1], k_cache.shape[2], k_cache.shape[3])
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want or t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{name} must be a {q.dtype} tensor on {q.device} of shape (batch, seqlen_new, "
                                 f"nheads_k, headdim) = {want}; got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}.")
            if t.stride(-1) != 1:
                raise ValueError(f"{name} must be contiguous in its last dimension; call {name}.contiguous().")
        s_new = k.shape[1]
    if seqlens_checked and isinstance(cache_seqlens, int):
        pass   # an int the caller checked on the host (flash_attn_with_kvcache)
    elif not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32 or \
            tuple(cache_seqlens.shape) != (B,) or cache_seqlens.device != q.device:
        raise TypeError(f"cache_seqlens must be an int or an int32 tensor of shape ({B},) on {q.device}; got "
                        f"{cache_seqlens.dtype if isinstance(cache_seqlens, torch.Tensor) else type(cache_seqlens)}"
                        f"{'' if not isinstance(cache_seqlens, torch.Tensor) else ' ' + str(tuple(cache_seqlens.shape))}.")
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    lens = [0] if seqlens_checked or capturing else cache_seqlens.tolist()   # an int: checked by the caller
    if min(lens) < 0 or max(lens) + s_new > Sc:
        raise ValueError(f"cache_seqlens + seqlen_new must lie in [0, seqlen_cache={Sc}]; got cache_seqlens={lens} "
                         f"and seqlen_new={s_new}. Allocate a longer cache.")
    if cache_batch_idx is None:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache has {k_cache.shape[0]} entries but q has batch {B}; pass cache_batch_idx "
                             "to pick the entries.")
    else:
        if not isinstance(cache_batch_idx, torch.Tensor) or cache_batch_idx.dtype != torch.int32 or \
                tuple(cache_batch_idx.shape) != (B,):
            raise TypeError(f"cache_batch_idx must be an int32 tensor of shape ({B},).")
        idx = [0] if capturing else cache_batch_idx.tolist()
        if min(idx) < 0 or max(idx) >= k_cache.shape[0]:
            raise ValueError(f"cache_batch_idx values must lie in [0, {k_cache.shape[0]}); got {idx}.")
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = automatic); got {num_splits!r}.")
