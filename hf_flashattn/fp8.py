"""FP8 attention (issue 5): e4m3 forward with per-block scales and incoherent processing.

    from hf_flashattn.fp8 import flash_attn_fp8_func
    out = flash_attn_fp8_func(q, k, v, causal=True)             # bf16/fp16 in: quantised here
    out = flash_attn_fp8_func(q8, k8, v8, q_descale=qs, k_descale=ks, v_descale=vs)   # already e4m3

Incoherent processing (FlashAttention-3, §3.3): Q and K are multiplied by the same random-sign Hadamard
matrix M (orthogonal, so (QM)(KM)ᵀ = QKᵀ) before quantisation; outliers spread over the head dimension
and the per-block scales lose less. On by default for bf16/fp16 inputs whose head dim is a power of 2.

Forward only (inference). Needs a GPU with FP8 tensor cores (compute capability 8.9 or newer, e.g. the
H100); the kernel itself also runs through Triton's interpreter for the CPU tests (`_attention`).
Measured on the H100: 1.40-1.73x our bf16 v3 forward at d128/d256 from 4k tokens, up to 854 TFLOP/s
(benchmarks/results/2026-11-26-h100-fp8-5.md).
"""
from __future__ import annotations

import contextlib
import math

import torch

from .kernels.fp8 import QUANT_BLOCK

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def random_hadamard(head_dim: int, seed: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """An orthogonal (head_dim, head_dim) matrix H · diag(signs) / sqrt(head_dim): Sylvester's Hadamard
    matrix with random column signs (seeded). head_dim must be a power of 2."""
    if head_dim < 1 or head_dim & (head_dim - 1):
        raise ValueError(f"incoherent processing needs a power-of-2 head dim (Hadamard matrix); got {head_dim}. "
                         "Pass incoherent=False.")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < head_dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (head_dim,), generator=g, dtype=torch.float64) * 2 - 1
    return (h * signs / math.sqrt(head_dim)).to(device=device, dtype=dtype)


def quantize_fp8(x: torch.Tensor, block: int = QUANT_BLOCK, per_tensor: bool = False):
    """x (batch, seqlen, heads, dim) -> (x8 float8_e4m3fn, descale float32 (batch, heads, cdiv(seqlen, block)))
    with x ≈ x8 · descale: one scale per block of `block` rows of one sequence and head (amax / 448).
    per_tensor=True: one scale for the whole tensor (the baseline the block scales are compared with)."""
    B, S, H, D = x.shape
    nb = -(-S // block)
    xf = x.float()
    if per_tensor:
        amax = xf.abs().amax().clamp_min(1e-12).expand(B, H, nb)
    else:
        pad = torch.nn.functional.pad(xf, (0, 0, 0, 0, 0, nb * block - S))
        amax = pad.view(B, nb, block, H, D).abs().amax(dim=(2, 4)).transpose(1, 2).clamp_min(1e-12)
    descale = (amax / FP8_MAX).contiguous()
    per_row = descale.repeat_interleave(block, dim=2)[:, :, :S].transpose(1, 2)[..., None]  # (B, S, H, 1)
    return (xf / per_row).clamp(-FP8_MAX, FP8_MAX).to(FP8), descale


def _block_descale(d, B, heads, S, name):
    """FA3's (batch, heads) per-head descale, or our (batch, heads, nblocks): -> (batch, heads, nblocks)."""
    nb = -(-S // QUANT_BLOCK)
    if not isinstance(d, torch.Tensor) or d.dtype != torch.float32:
        raise TypeError(f"{name} must be a float32 tensor of shape ({B}, {heads}) or ({B}, {heads}, {nb}); got "
                        f"{d.dtype if isinstance(d, torch.Tensor) else type(d).__name__}.")
    if tuple(d.shape) == (B, heads):
        return d[:, :, None].expand(B, heads, nb).contiguous()
    if tuple(d.shape) == (B, heads, nb):
        return d.contiguous()
    raise ValueError(f"{name} must have shape ({B}, {heads}) (per head, flash-attn 3) or ({B}, {heads}, {nb}) "
                     f"(per block of {QUANT_BLOCK} rows); got {tuple(d.shape)}.")


def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, seqlen, nheads, headdim).")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension; call {name}.contiguous().")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, FP8):
        raise TypeError(f"q, k, v must all be float16, bfloat16 or float8_e4m3fn (already quantised); got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}.")
    B, _, H, D = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape != v.shape or k.shape[3] != D:
        raise ValueError(f"k and v must be (batch={B}, seqlen_k, nheads_k, headdim={D}) and equal; got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}.")
    if H % k.shape[2]:
        raise ValueError(f"nheads ({H}) must be a multiple of nheads_k ({k.shape[2]}).")
    if D % 16 or not 32 <= D <= 256:
        raise ValueError(f"FP8 attention takes head dims 32..256 in multiples of 16; got {D}.")


def _attention(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, q_descale=None,
               k_descale=None, v_descale=None, incoherent=True, hadamard_seed=0, out_dtype=None,
               per_tensor=False):
    """flash_attn_fp8_func without the device check (the CPU tests run it through the interpreter)."""
    from .kernels import fp8 as kernel
    from .interface import _resolve_window
    _check(q, k, v)
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    if q.dtype == FP8:
        if q_descale is None or k_descale is None or v_descale is None:
            raise ValueError("float8 inputs need q_descale, k_descale and v_descale (x ≈ x8 · descale).")
        if q_descale.dim() == 2 and tuple(q_descale.shape) == (B, Hk) and Hk != H:  # FA3: q descale per kv head
            q_descale = q_descale.repeat_interleave(H // Hk, dim=1)
        qd, kd, vd = (_block_descale(q_descale, B, H, Sq, "q_descale"),
                      _block_descale(k_descale, B, Hk, Sk, "k_descale"),
                      _block_descale(v_descale, B, Hk, Sk, "v_descale"))
        q8, k8, v8 = q, k, v
        out_dtype = out_dtype or torch.bfloat16
    else:
        if any(d is not None for d in (q_descale, k_descale, v_descale)):
            raise ValueError(f"q_descale/k_descale/v_descale describe float8 inputs; q is {q.dtype}, which is "
                             "quantised here. Drop the descales or pass float8_e4m3fn tensors.")
        out_dtype = out_dtype or q.dtype
        qf, kf = q.float(), k.float()
        if incoherent:
            m = random_hadamard(D, hadamard_seed, q.device)
            qf, kf = qf @ m, kf @ m
        (q8, qd), (k8, kd), (v8, vd) = (quantize_fp8(t, per_tensor=per_tensor) for t in (qf, kf, v))
    out, lse = kernel.forward(q8, k8, v8, qd, kd, vd, float(softmax_scale), _resolve_window(causal, window_size),
                              float(softcap), out_dtype)
    return out, lse


def fp8_supported(device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def flash_attn_fp8_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, *,
                        q_descale=None, k_descale=None, v_descale=None, incoherent=True, hadamard_seed=0,
                        out_dtype=None, return_attn_probs=False):
    """FP8 attention forward, flash-attn's layout and mask conventions (causal bottom-right, window, softcap,
    GQA/MQA).

    Arguments:
        q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim). Either
            float16/bfloat16 (quantised here: Hadamard rotation of q and k when `incoherent`, then e4m3
            with one scale per block of 128 rows per head) or float8_e4m3fn with descales.
        q_descale, k_descale, v_descale: float8 inputs only: float32 (batch, nheads_k) as in flash-attn 3
            (q's may also be (batch, nheads)), or (batch, heads, cdiv(seqlen, 128)) per block.
        incoherent: bool, default True: random-sign Hadamard on q and k (head dim a power of 2).
        hadamard_seed: int, the signs' seed.
        out_dtype: default q's dtype (bfloat16 for float8 inputs).
        return_attn_probs: also return lse (batch, nheads, seqlen_q) float32 (and None), as flash-attn.
    Forward only: inputs that require grad raise NotImplementedError.
    """
    if not fp8_supported(q.device):
        where = q.device if q.device.type != "cuda" else torch.cuda.get_device_name(q.device)
        raise RuntimeError(f"flash_attn_fp8_func needs a GPU with FP8 tensor cores (compute capability 8.9 or "
                           f"newer, e.g. H100); q is on {where}. Use flash_attn_func in bfloat16 instead.")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError("flash_attn_fp8_func is forward-only (inference): its backward is not "
                                  "implemented. Run it under torch.no_grad(), or train with flash_attn_func.")
    out, lse = _attention(q, k, v, softmax_scale, causal, window_size, softcap, q_descale, k_descale, v_descale,
                          incoherent, hadamard_seed, out_dtype)
    return (out, lse, None) if return_attn_probs else out


@contextlib.contextmanager
def fp8_attention(incoherent: bool = True, hadamard_seed: int = 0):
    """Inference in FP8 through the usual entry points, e.g. around `model.generate(...)` with
    attn_implementation="flashattn_custom":

        with hf_flashattn.fp8.fp8_attention():
            out = model.generate(**inputs)

    Inside, calls of flash_attn_func that need no gradient, on float16/bfloat16 inputs with more than 16
    query rows (prefill) run flash_attn_fp8_func's kernel. Unchanged: calls with a gradient (training
    stays bf16), packed/padded (varlen) calls, and decode steps (<= 16 query rows: memory-bound, their
    split-KV kernel reads the bf16 cache). Per thread, like use_version()."""
    from .interface import _state
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if not fp8_supported(dev):
        where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "a machine without a CUDA GPU"
        raise RuntimeError(f"fp8_attention needs a GPU with FP8 tensor cores (compute capability 8.9 or newer, "
                           f"e.g. H100); this is {where}.")
    old = _state.fp8
    _state.fp8 = dict(incoherent=incoherent, hadamard_seed=hadamard_seed)
    try:
        yield
    finally:
        _state.fp8 = old
