"""Pieces shared by the kernels: visibility windows, tile ranges, softcap, host-side helpers.

Visibility (bottom-right aligned, as flash-attn >= 2.1): with diag = seqlen_k - seqlen_q, query
row i sees key column j iff  i + diag - left <= j <= i + diag + right.  An unbounded side (-1 in
the public API) is passed to the kernels as a large number (`unbounded()`), so the kernels never
branch on it.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._runtime import env_get, is_interpreting

# (major, minor) of the Triton in use: code generation differs between the releases `triton>=3.6` admits
TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))
LN2 = 0.6931471805599453    # ln(2):   log(x) = log2(x) * ln(2)


@triton.jit
def tile_range(t0, T_BLOCK: tl.constexpr, diag, left, right, S, L_BLOCK: tl.constexpr):
    """For the tile of rows [t0, t0 + T_BLOCK), where row r sees columns c with
    r + diag - left <= c <= r + diag + right and c < S, return (lo, full_lo, full_hi, hi):
    columns [lo, hi) hold every visible column (lo aligned to L_BLOCK); blocks in
    [full_lo, full_hi) are visible to every row of the tile and need no mask; the blocks of
    [lo, full_lo) and [full_hi, hi) are partially visible and must be masked."""
    lo = tl.maximum(t0 + diag - left, 0)
    lo = (lo // L_BLOCK) * L_BLOCK
    hi = tl.minimum(t0 + T_BLOCK + diag + right, S)
    hi = tl.maximum(hi, lo)
    full_lo = tl.maximum(t0 + T_BLOCK - 1 + diag - left, 0)
    full_lo = tl.minimum(tl.cdiv(full_lo, L_BLOCK) * L_BLOCK, hi)
    full_hi = tl.minimum(t0 + diag + right + 1, S)
    full_hi = tl.maximum((full_hi // L_BLOCK) * L_BLOCK, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def body_end(lo, hi, S, BLOCK: tl.constexpr):
    """End of the blocks of [lo, hi) (lo a multiple of BLOCK) that lie wholly below S: the one-loop kernels' loop runs
    [lo, body_end) with unmasked loads, and the block [body_end, hi), when not empty, is the one across the tail S."""
    return tl.maximum(tl.minimum(hi, (S // BLOCK) * BLOCK), lo)


# `grouped_tile`: K/V elements (both, one head) a group of heads may hold in L2 together (~24 MB in 16-bit)
GROUP_L2_ELEMS = tl.constexpr(6 << 20)
# `grouped_tile`'s tiles a group on the GPU, per kernel (1: each head's tiles in a row, heaviest first, the order
# before the nineteenth session; benchmarks/probe_tile_order.py compares values by setting these). Measured on the
# H100 (results/2026-11-27-h100-probe-tile-order{,-fold}.md, rounds in one process, bitwise equal output): v2's
# forward 1.02-1.06x faster with 1024 under a causal mask at 1k-8k (d64 4k 1.058, d256 1k 1.042-1.049, d128 1k
# 1.024-1.031), unmasked within noise, d64 512 causal 0.97-0.98; v3.py's kernel (d64 below the Gluon kernel's range)
# within -1.9..+0.9% at 512-4k and 2-6% slower at 8k causal: kept at 1.
# On the interpreter 4, so that the CPU tests run several groups, a partial last one included.
# "v2_bwd": v2's backward passes (`grouped_rank`); HF_FLASHATTN_BWD_GROUP_TILES (read at import) sets it, 1 being the
# order before the twenty-third session.
GROUP_TILES = {"v2": 1024, "v3": 1, "v2_bwd": int(env_get("HF_FLASHATTN_BWD_GROUP_TILES", "1024"))}


def group_tiles(kernel: str) -> int:
    """GROUP_TILES[kernel] for a launch (4 on Triton's interpreter)."""
    return 4 if _INTERPRETING else GROUP_TILES[kernel]


@triton.jit
def launch_index():
    """This program's place in its launch's order (a 3-D grid read x fastest, as the hardware starts them)."""
    return tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))


@triton.jit
def grouped_tile(seqlen_k, group_tiles, HEAD_DIM: tl.constexpr):
    """(pid_m, h, b) of this program of a grid (n_m, H, B) of query tiles. Programs start in launch order (x fastest);
    read in that order, the (batch, head) pairs come in groups of g, and within a group the row tiles from the last
    (the heaviest under a causal mask) to the first, each tile of the g heads in turn: the longest tiles of every
    group start first, the shortest end it, so the launch's last wave holds the shortest tiles (at d64 1k causal a
    static model gives 142 against 150 time units for one head's tiles in a row, 139.6 the ideal). g: about
    group_tiles tiles a group (a few waves of programs), at most as many heads as keep their keys and values in L2
    together (GROUP_L2_ELEMS), at least 1 (then: one head's tiles in a row, heaviest first)."""
    n_m = tl.num_programs(0)
    n_h = tl.num_programs(1)
    # the constant as a tensor first: on Triton 3.7-3.8's interpreter a global constexpr divided by a tensor gives a
    # constexpr wrapping a tensor, which tl.minimum then rejects
    l2_elems = tl.full([], GROUP_L2_ELEMS // (2 * HEAD_DIM), tl.int32)
    mi, bh = grouped_rank(launch_index(), n_m, n_h * tl.num_programs(2), l2_elems // tl.maximum(seqlen_k, 1),
                          group_tiles)
    return n_m - 1 - mi, bh % n_h, bh // n_h


@triton.jit
def grouped_rank(lin, n_m, n_bh, l2_pairs, group_tiles):
    """(rank, pair) of the lin-th program (in launch order) of a launch of n_m tiles x n_bh (batch, head) pairs, in
    `grouped_tile`'s order: rank 0 .. n_m - 1 the tile's place in its pair's list, heaviest first (the caller maps it
    to a tile); pair = head + heads * batch. Groups of g = min(l2_pairs, group_tiles // n_m) pairs (at least 1; g = 1:
    one pair's tiles in a row, i.e. a grid (n_m, n_h, n_b)'s own order); l2_pairs: how many pairs keep the tensors the
    tiles stream in L2 together."""
    g = tl.minimum(l2_pairs, group_tiles // n_m)
    g = tl.maximum(g, 1)
    grp = lin // (g * n_m)
    r = lin - grp * (g * n_m)
    first = grp * g
    size = tl.minimum(g, n_bh - first)
    mi = r // size
    bh = first + r - mi * size
    return mi, bh


@triton.jit
def _timer_after_nap(dep):
    # a short nap (the warp off the issue slots), then the global nanosecond timer; `dep` orders the calls
    return tl.inline_asm_elementwise("nanosleep.u32 256;\n\tmov.u64 $0, %globaltimer;", "=l,l", [dep],
                                     dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def stagger(lin, lo, hi, ns, ramp):
    """Delay the programs lin in [lo, hi) (launch order) by ns + ramp * (lin - lo) / (hi - lo) nanoseconds, napping
    off the issue slots, so that SMs running tiles of equal time do not run in step (v2's forward, `v2.STAGGER`).
    Only in kernels compiled for the GPU (inline PTX)."""
    if (lin >= lo) & (lin < hi):
        wait = ns + (ramp * (lin - lo).to(tl.int64)) // tl.maximum(hi - lo, 1)
        t0 = _timer_after_nap(lin.to(tl.int64))
        t = t0
        while t - t0 < wait:
            t = _timer_after_nap(t)


# Masked scores skip the window's lower bound where the window has no left edge (`visible`'s LEFT; causal masks
# and key tails). False: every masked score tests both bounds (the kernels before the twentieth session; benchmarks
# compare the two).
SKIP_LEFT = True


def left_edge(window) -> bool:
    """`visible`'s LEFT for a window (left, right) as the public API takes it: do masked scores test a left edge."""
    return window[0] >= 0 or not SKIP_LEFT


@triton.jit
def visible(rows, cols, diag, left, right, S_cols, LEFT: tl.constexpr = True, RIGHT: tl.constexpr = True):
    """Bool tile: column cols[None, :] is visible from row rows[:, None]: r - left <= c <= min(r + right, S_cols - 1)
    with r = row + diag, the bounds worked out per row (one or two compares a score). LEFT False: the caller knows the
    window has no left edge (left is `unbounded`, r - left below every column), the lower bound is skipped. RIGHT
    False: the caller knows right is unbounded and the columns past S_cols are harmless (the dK/dV pass's transposed
    tiles, whose query rows past Sq have P = 0), the upper bound is skipped (one of LEFT, RIGHT must be True)."""
    r = rows + diag
    c = cols[None, :]
    if RIGHT:
        keep = c <= tl.minimum(r + right, S_cols - 1)[:, None]
        if LEFT:
            keep = keep & (c >= (r - left)[:, None])
    else:
        keep = c >= (r - left)[:, None]
    return keep


@triton.jit
def tanh(x):
    # tanh(x) = 1 - 2 / (e^(2x) + 1), written with exp2; exact at ±inf, no tl.math.tanh needed
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


def unbounded(max_seqlen_q: int, max_seqlen_k: int) -> int:
    """A window side larger than any distance between a query and a key."""
    return max_seqlen_q + max_seqlen_k + 1


def window_args(window, max_seqlen_q: int, max_seqlen_k: int):
    big = unbounded(max_seqlen_q, max_seqlen_k)
    left, right = window
    return (left if left >= 0 else big), (right if right >= 0 else big)


def score_scales(softmax_scale: float, softcap: float):
    """(qk_scale, cap_scale) such that the score in log2 units is
    qk * qk_scale                      without softcap, and
    cap_scale * tanh(qk * qk_scale)    with softcap (qk_scale = scale / cap, cap_scale = cap * log2 e)."""
    if softcap > 0:
        return softmax_scale / softcap, softcap * LOG2E
    return softmax_scale * LOG2E, 1.0


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs: true float32 products (the GPU would otherwise use tf32, ~1e-3 relative error)
    return "ieee" if dtype == torch.float32 else "tf32"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of plain ints (Triton's cdiv is a constexpr function in newer releases: a JIT call, microseconds)."""
    return -(-a // b)


def num_sms(device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: the interpreter's stand-in)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:  # get_device_properties on every call is measurable host time
    return torch.cuda.get_device_properties(index).multi_processor_count


def seq_layout(x: torch.Tensor, varlen: bool):
    """(stride_batch, stride_seq, stride_head) of a (B, S, H, D) or packed (T, H, D) tensor."""
    return layout_of(x.stride(), varlen)


def layout_of(strides: tuple, varlen: bool) -> tuple:
    """`seq_layout` from a tensor's strides (e.g. `contiguous_strides` of a tensor not made yet)."""
    if varlen:
        return 0, strides[0], strides[1]
    return strides[0], strides[1], strides[2]


def contiguous_strides(shape) -> tuple:
    """The strides torch.empty(shape) gets (a size-0 dimension counts as 1, as torch counts it)."""
    out, acc = [], 1
    for n in reversed(tuple(shape)):
        out.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(out))


def grad_maker(grads, varlen: bool):
    """new(i, like) for a backward's gradients: grads[i] when the caller gave (dq, dk, dv) to write into (the views of
    a packed tensor's gradient), else a new tensor of like's shape, dtype and device; zero-filled when packed (varlen),
    as rows outside every sequence get no program and must read as 0, else left uninitialised (every row is
    written)."""
    if grads is None:
        make = torch.zeros if varlen else torch.empty
        return lambda i, like: make(like.shape, dtype=like.dtype, device=like.device)
    return lambda i, like: grads[i].zero_() if varlen else grads[i]


def grads_key(grads):
    """What Triton specialises on in given gradient tensors (`grad_maker`'s grads): their strides and 16-byte
    alignment, for the direct launches' keys (None: made fresh, their strides follow from the shapes)."""
    if grads is None:
        return None
    return tuple(t.stride() for t in grads), (grads[0].data_ptr() | grads[1].data_ptr() | grads[2].data_ptr()) & 15


def head_dim_class(d: int) -> int:
    """The head-dim class a head dim (or its padded tile) belongs to: 64 (<= 64), 128 (<= 128) or 256 (<= 256); the
    kernels' config tables, plans and dispatch rules are kept per class."""
    return 64 if d <= 64 else 128 if d <= 128 else 256


def mask_kind(window) -> int:
    """0: no mask, 1: causal, 2: other window. Only an autotuning key (the kernels see the window)."""
    left, right = window
    return 0 if (left < 0 and right < 0) else 1 if (left < 0 and right == 0) else 2


def pow2(n: int) -> int:
    """The least power of two >= n (n >= 1): triton.next_power_of_2 without its cost on the host path of every call
    (~1.7 us a call on the CPU where it was timed, against ~0.1)."""
    return 1 << (n - 1).bit_length()


def seq_bucket(n: int) -> int:
    """Autotuning key for a sequence length: its power-of-two bucket, so packed batches whose longest
    sequence changes every step do not re-tune every step."""
    return max(64, min(pow2(max(n, 1)), 65536))


def tune_bucket(n: int, pairs: int, device) -> int:
    """Autotuning key of a launch (the kernels' SEQ_BUCKET argument, used by no kernel body) over `pairs` (head,
    sequence) pairs of length n: `seq_bucket(n)` x 4 + the class of its work, its 128-row tiles (cdiv(n, 128) x pairs)
    over the device's SMs: 0 under one wave, 1 under two, 2 under four, 3 from four. Without the class the first call
    of a length bucket chose the tiles for every later call of it: on an H200 a d256 forward tuned on 513 x 1025
    keys, batch 1 and 8 heads (40 tiles, where 64-row tiles fill more SMs) then ran 16 x 8 heads x 1k at 0.75x the
    speed of its 128-row tiles (results/2026-11-28-h200-probe-even-one.md)."""
    waves = cdiv(n, 128) * pairs / max(num_sms(device), 1)
    return seq_bucket(n) * 4 + (0 if waves < 1 else 1 if waves < 2 else 2 if waves < 4 else 3)


class Launcher:
    """Launches a kernel with block sizes chosen by, in order: fixed small tiles on the interpreter;
    the first config the prune function keeps when HF_FLASHATTN_AUTOTUNE=0 (no tuning, quick first
    call); else triton.autotune over `configs` keyed on `key`. `configs` are ordered best guess first."""

    def __init__(self, kernel, configs, prune, key, interp_meta, reset_to_zero=None, pre_hook=None):
        import os
        self.kernel, self.configs, self.prune, self.interp_meta = kernel, configs, prune, interp_meta
        # pre_hook(nargs): called with the arguments by name and the chosen config's kwargs before every launch
        # (it sizes the blocks of host-made tensor descriptors to the config's tiles, and must do nothing else: the
        # direct launch skips it when no argument is a descriptor); set on the configs for the autotuner, called here
        # on the other paths
        self.pre_hook = pre_hook
        if pre_hook is not None:
            for c in configs:
                c.pre_hook = pre_hook
        self.interpret = is_interpreting()
        self.tune = os.environ.get("HF_FLASHATTN_AUTOTUNE", "1") != "0"
        self.tuned = None
        # force: a triton.Config that overrides tuning (benchmarks/sweep_bwd.py; tests of variants that
        # the interpreter's fixed tiles would not reach); on the interpreter its kwargs go over interp_meta
        self.force = None
        self.last = None   # the CompiledKernel of the last forced launch (its registers and spills)
        self.key = key
        self._tune_pos = None
        self.direct = None  # FastLaunch of the kernel: the tuned launch's CompiledKernel, kept per call-site key
        if not self.interpret and self.tune:
            # reset_to_zero: outputs accumulated with atomics, zeroed before each tuning run
            self.tuned = triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune},
                                         reset_to_zero=reset_to_zero)(kernel)
            self.direct = FastLaunch(kernel)

    def _hook(self, args, meta, kw):
        if self.pre_hook is not None:
            self.pre_hook(dict(zip(self.kernel.arg_names, args), **meta, **kw))

    def __call__(self, grid_fn, args, meta, site_key=None):
        """site_key: as `FastLaunch.keyed`'s, everything Triton specialises on in this call but the tuned config
        (the values of the autotuning key are added here): after the first tuned launch of a key, later ones
        launch the kept CompiledKernel with the config the autotuner chose, without its ~20 us a call of
        bookkeeping (the arguments by name, its key, the JIT's specialisation), and through Triton's C launcher
        itself where the arguments allow it (`_direct`: 71-96 -> 29-45 us from one launch of a v2 fwd+bwd to the next
        on the H200's hosts, results/2026-11-28-h200-probe-host-v2{,-raw}.md)."""
        if site_key is not None and self.direct is not None and self.force is None and FAST_LAUNCH \
                and not _launch_hooks():
            return self._direct(grid_fn, args, meta, site_key)
        if self.force is not None:
            cfg = self.force
            kw = dict(self.interp_meta, **cfg.kwargs) if self.interpret else dict(cfg.kwargs)
            opts = {} if self.interpret else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                                  **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
            self._hook(args, meta, kw)
            self.last = self.kernel[grid_fn(kw)](*args, **meta, **kw, **opts)
            return self.last
        if self.interpret:
            self._hook(args, meta, self.interp_meta)
            self.kernel[grid_fn(self.interp_meta)](*args, **meta, **self.interp_meta)
        elif self.tuned is None:
            cfg = self.prune(self.configs, {}, **meta)[0]
            self._hook(args, meta, cfg.kwargs)
            self.kernel[grid_fn(cfg.kwargs)](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages)
        else:
            self.tuned[grid_fn](*args, **meta)

    def _direct(self, grid_fn, args, meta, site_key):
        names = self.kernel.arg_names
        pos = self._tune_pos
        if pos is None:
            pos = self._tune_pos = tuple((n, names.index(n)) for n in self.key)
        tune = tuple(meta[n] if n in meta else args[i] for n, i in pos)
        device = torch.cuda.current_device()
        key = ("tuned", site_key, tune, device)
        fl = self.direct
        entry = fl.cache.get(key)
        if entry is None:
            compiled = _ready(self.tuned[grid_fn](*args, **meta))
            cfg = self.tuned.best_config
            full = dict(meta, **cfg.kwargs)
            # arguments that are all tensors, numbers or None (the site key fixes their types): no descriptor for the
            # pre-hook to size, so no hook, and the launch through Triton's C launcher itself (`_Raw`); otherwise
            # through CompiledKernel.run, the hook called first (it may resize a descriptor's block in place)
            plain = all(isinstance(a, (torch.Tensor, int, float, type(None))) for a in args)
            raw = _Raw.of(compiled, args) if plain else None
            hook = None if plain else cfg.pre_hook
            keep(fl.cache, key, ((compiled, tuple(full.get(n, d) for n, d in fl.constexprs)), cfg, raw, hook))
            return compiled
        (compiled, tail), cfg, raw, hook = entry
        if hook is not None:
            hook(dict(zip(names, args), **meta, **cfg.kwargs))
        return fl._again((compiled, tail, raw, False), grid_fn(cfg.kwargs), device, args)


@triton.jit
def seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(q_start, k_start, Sq, Sk) of sequence b: read from cu_seqlens when packed, else (0, 0, seqlen_q,
    seqlen_k). Starts are int64 row offsets (a packed batch can exceed 2^31 elements)."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        k_start = tl.load(CU_K + b).to(tl.int64)
        Sq = (tl.load(CU_Q + b + 1) - q_start).to(tl.int32)
        Sk = (tl.load(CU_K + b + 1) - k_start).to(tl.int32)
    else:
        q_start = tl.zeros([], dtype=tl.int64)
        k_start = tl.zeros([], dtype=tl.int64)
        Sq = seqlen_q
        Sk = seqlen_k
    return q_start, k_start, Sq, Sk


@triton.jit
def load_rows_pair(A_ptrs, B_ptrs, rows, S, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   MASKED: tl.constexpr):
    """Load two (rows, BLOCK_D) tiles that share a row range (k and v, or q and dO): rows >= S are
    masked only on edge blocks (MASKED), the head-dim padding only when BLOCK_D != HEAD_DIM."""
    if MASKED:
        mask = (rows[:, None] < S) & (offs_d[None, :] < HEAD_DIM)
        a = tl.load(A_ptrs, mask=mask, other=0.0)
        b = tl.load(B_ptrs, mask=mask, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        a = tl.load(A_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        b = tl.load(B_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        a = tl.load(A_ptrs)
        b = tl.load(B_ptrs)
    return a, b


@triton.jit
def desc_rows(desc, b, row0, start, h, S, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
              MASKED: tl.constexpr):
    """Rows [start, start + BLOCK) of head h of sequence b through a host-made tensor descriptor over the whole
    (B, S, H, D) tensor, or over the packed (total, H, D) one (rows from row0, the sequence's start) when
    IS_VARLEN; block (1, BLOCK, 1, BLOCK_D) or (BLOCK, 1, BLOCK_D). Rows past the tensor and head-dim padding
    read as zeros. In a packed batch the rows past this sequence's S are the next sequence's (or the padding
    after the last): on a MASKED tile (the only ones that reach past S) they are zeroed, because P = 0 does not
    cancel them in a product when they hold inf or NaN (0 · inf = NaN)."""
    if IS_VARLEN:
        t = desc.load([(row0 + start).to(tl.int32), h, 0]).reshape(BLOCK, BLOCK_D)
        if MASKED:
            t = tl.where((start + tl.arange(0, BLOCK) < S)[:, None], t, tl.zeros_like(t))
        return t
    else:
        return desc.load([b, start, h, 0]).reshape(BLOCK, BLOCK_D)


def host_descriptor(t: torch.Tensor, rows: int, block_d: int, varlen: bool, tma: bool = False):
    """A TensorDescriptor over (B, S, H, D) (or packed (total, H, D)) whose block is `rows` rows of one head; tma: as
    a `Tma` argument of a FastLaunch launch (made only where Triton's launcher needs the object)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    block = (rows, 1, block_d) if varlen else (1, rows, 1, block_d)
    return Tma(TensorDescriptor, t, block) if tma else descriptor(TensorDescriptor, t, block)


def descriptors_ok(*tensors) -> bool:
    """TMA's rule for a descriptor over the whole tensor: base pointer and every stride but the last
    16-byte aligned, the last dim contiguous, and no empty dim (a descriptor cannot span nothing)."""
    for t in tensors:
        if t.data_ptr() % 16 or t.stride(-1) != 1 or t.numel() == 0:
            return False
        if any((st * t.element_size()) % 16 for st in t.stride()[:-1]):
            return False
    return True


@triton.jit
def load_tile_pair(A_DESC, B_DESC, A_base, B_base, stride_a, stride_b, start, offs, S, offs_d, b, row0, h,
                   HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                   TMA: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Two (BLOCK, BLOCK_D) tiles sharing the rows [start, start + BLOCK) (q and dO, or k and v): through the
    caller's descriptors when TMA (`desc_rows`: rows past S read as zeros), else pointer loads from the bases
    (`load_rows_pair`)."""
    if TMA:
        a = desc_rows(A_DESC, b, row0, start, h, S, BLOCK, BLOCK_D, IS_VARLEN, MASKED)
        c = desc_rows(B_DESC, b, row0, start, h, S, BLOCK, BLOCK_D, IS_VARLEN, MASKED)
    else:
        rows = start + offs
        a, c = load_rows_pair(A_base + rows[:, None] * stride_a + offs_d[None, :],
                              B_base + rows[:, None] * stride_b + offs_d[None, :], rows, S, offs_d, HEAD_DIM, BLOCK_D,
                              MASKED)
    return a, c


@triton.jit
def softmax_step(s, m_i, l_i):
    """One online-softmax step over a tile of log2 scores s: (p, alpha, m_new, l_new), where
    p = 2^(s - m_new) and the accumulator is rescaled by alpha. A row that has seen nothing yet keeps
    m = -inf and is shifted by 0 (no NaN from -inf - -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def softmax_tile(qk, m_i, l_i, descale, qk_scale, cap_scale, offs_m, cols, Sk, diag, left, right,
                 MASKED: tl.constexpr, SOFTCAP: tl.constexpr, FOLD: tl.constexpr, DESCALE: tl.constexpr,
                 LEFT: tl.constexpr = True, SEEN: tl.constexpr = False):
    """The online-softmax step of one key tile from raw q·k (float32, in units of `descale` when DESCALE: FP8's
    block scales): (p, alpha, m_new, l_new) as softmax_step. FOLD (no softcap; the caller guarantees the scale
    c > 0): softmax_step on s = qk · c with c folded in: the row max taken on qk (max(qk) · c = max(qk · c):
    rounding is monotonic) and the exponent qk · c - m one fused multiply-add, float32 operations fewer per
    score than scaling the tile first. LEFT: as `visible`'s (False: the window has no left edge). SEEN (with FOLD):
    every row sees a key of this tile, so its new max is finite and needs no guard for a row that has seen nothing."""
    if SOFTCAP or not FOLD:
        if DESCALE:
            qk = qk * descale
        s, _ = scores_from_qk(qk, qk_scale, cap_scale, SOFTCAP)
        if MASKED:
            s = tl.where(visible(offs_m, cols, diag, left, right, Sk, LEFT), s, float("-inf"))
        p, alpha, m_new, l_i = softmax_step(s, m_i, l_i)
    else:
        if MASKED:
            qk = tl.where(visible(offs_m, cols, diag, left, right, Sk, LEFT), qk, float("-inf"))
        if DESCALE:
            c = descale * qk_scale
        else:
            c = qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1) * c)
        if SEEN:
            m_shift = m_new
        else:
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk * c - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def normalise_rows(acc, l_i, m_i, EMPTY_LSE: tl.constexpr):
    """Epilogue of the forward kernels: O = acc / l and lse = ln(l · 2^m); a row that saw no key
    (l = 0) gets O = 0 and lse = EMPTY_LSE (+inf as flash-attn; -inf for a split-KV partial)."""
    seen = l_i > 0.0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, EMPTY_LSE)
    return acc, lse


@triton.jit
def scores_from_qk(qk, qk_scale, cap_scale, SOFTCAP: tl.constexpr):
    """Raw q·k -> scores in log2 units (see score_scales), and t = tanh(...) under softcap (the
    backward's chain-rule factor is 1 - t²; without softcap t is qk, unused and dropped)."""
    if SOFTCAP:
        t = tanh(qk * qk_scale)
        s = cap_scale * t
    else:
        t = qk
        s = qk * qk_scale
    return s, t


@triton.jit
def log2_scores(a, b, qk_scale, cap_scale, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr):
    """scores_from_qk of a·bᵀ."""
    return scores_from_qk(tl.dot(a, tl.trans(b), input_precision=DOT_PREC), qk_scale, cap_scale, SOFTCAP)


# Set to False to launch every kernel through Triton's JIT entry point (benchmarks compare the two).
FAST_LAUNCH = True


class FastLaunch:
    """`kernel[grid](*args, **meta)` for the kernels of a decode step, with less host time per launch.

    Triton's JIT entry point binds and specialises every argument, then formats its compile options into
    a string for the cache key, on every call: ~37 us a launch on the H100 machine's host, which a decode
    step (~10 us of GPU time per layer) cannot hide (`benchmarks/results/2026-11-26-h100-host-overhead.md`).
    Here the first call of each specialisation goes through the JIT (compiling or loading the kernel as
    usual) and keeps the returned CompiledKernel; later calls with the same specialisation hand the
    arguments straight to its launcher, as Triton's entry point itself does after its bookkeeping.

    The key repeats what Triton specialises on, conservatively: the dtype and the address modulo 16 of each
    tensor, each int modulo 16 (and whether it is 1) unless the kernel marks it do_not_specialize, which
    ints do not fit in 32 bits (or in 63), which arguments are None, floats or bools, the meta-parameters
    by name and value, and the current device. Two calls with the same key are compiled identically by
    Triton, so reusing the kernel is exact. Runtime arguments are
    positional and come first; constexprs are keywords (`meta`), defaults filled from the signature. On
    Triton's interpreter, with FAST_LAUNCH off, or with a launch hook installed (a profiler), this is a
    plain `kernel[grid](...)`.
    """

    def __init__(self, kernel):
        import inspect
        self.kernel = kernel
        params = list(inspect.signature(kernel.fn).parameters.values())
        flags = ["constexpr" in str(p.annotation) for p in params]
        self.n_runtime = flags.index(True) if True in flags else len(flags)
        if not all(flags[self.n_runtime:]):
            raise TypeError(f"{kernel.fn.__name__}: FastLaunch needs the constexpr parameters last")
        self.constexprs = [(p.name, p.default) for p in params[self.n_runtime:]]
        # ints Triton does not specialise (do_not_specialize: only their 32/64-bit type counts); on the
        # interpreter the kernel object has no params, and this path is not taken there
        self.dns = frozenset(i for i, kp in enumerate(getattr(kernel, "params", ())[:self.n_runtime])
                             if getattr(kp, "do_not_specialize", False))
        self.cache = {}
        self._layouts = {}  # argument types -> (tensor positions, specialised int positions, int positions)

    def _key(self, args, meta, device: int):
        types = tuple(map(type, args))
        layout = self._layouts.get(types)
        if layout is None:
            other = [t.__name__ for t in types if not issubclass(t, (torch.Tensor, int, float, type(None)))]
            if other:   # e.g. a tensor descriptor: Triton specialises on its block and layout, not seen here
                raise TypeError(f"{self.kernel.fn.__name__}: FastLaunch's generic key covers tensors, ints, floats "
                                f"and None, not {other}; launch it with keyed() and a key of the call's own")
            tensors = tuple(i for i, t in enumerate(types) if issubclass(t, torch.Tensor))
            ints = tuple(i for i, t in enumerate(types) if t is int)
            layout = self._layouts[types] = (tensors, tuple(i for i in ints if i not in self.dns), ints)
        tensors, spec_ints, ints = layout
        ts = [args[i] for i in tensors]
        return (types, tuple(meta.items()), device,
                tuple([t.dtype for t in ts]), tuple([t.data_ptr() & 15 for t in ts]),
                tuple([16 if args[i] == 1 else args[i] & 15 for i in spec_ints]),
                # the ints outside 32 bits, each by position (Triton types each one i64, or u64 from 2**63)
                tuple([(i, args[i] > 0x7FFFFFFFFFFFFFFF) for i in ints
                       if not -0x80000000 <= args[i] <= 0x7FFFFFFF]))

    def __call__(self, grid, *args, **meta):
        if len(args) != self.n_runtime:
            raise TypeError(f"{self.kernel.fn.__name__} takes {self.n_runtime} runtime arguments, got {len(args)}")
        if not FAST_LAUNCH or _INTERPRETING or _launch_hooks():
            return self.kernel[grid](*_materialise(args), **meta)
        device = torch.cuda.current_device()
        key = self._key(args, meta, device)
        entry = self.cache.get(key)
        if entry is None:
            return self._first(key, grid, args, meta)
        return self._again(entry, grid, device, args)

    def keyed(self, site_key, grid, *args, **meta):
        """`kernel[grid](*args, **meta)` with the caller's key in place of the generic one: `site_key` must
        determine everything Triton specialises on in this call (each pointer's dtype and 16-byte alignment, each
        specialised int's residue mod 16 and whether it is 1, each int's 32/64-bit type, which arguments are None,
        each tensor descriptor's dtype, block and layout, the meta-parameters). A call site knows that from a few
        shapes and options, cheaper than the generic key's walk over every argument, and it is how kernels with
        tensor-descriptor arguments (which the generic key does not cover) launch directly."""
        if len(args) != self.n_runtime:
            raise TypeError(f"{self.kernel.fn.__name__} takes {self.n_runtime} runtime arguments, got {len(args)}")
        return self.launch(site_key, grid, args, meta)

    def launch(self, site_key, grid, args, meta: dict):
        """`keyed` with the runtime arguments as one sequence and the meta-parameters as one dict, both passed as
        they are (a call site that keeps them per shape builds neither per call); the count is the caller's to get
        right."""
        if not FAST_LAUNCH or _INTERPRETING or _launch_hooks():
            return self.kernel[grid](*_materialise(args), **meta)
        device = torch.cuda.current_device()
        key = ("site", site_key, device)
        entry = self.cache.get(key)
        if entry is None:
            return self._first(key, grid, args, meta)
        return self._again(entry, grid, device, args)

    def _first(self, key, grid, args, meta):
        """The first call of a key: through Triton's JIT (compiling or loading the kernel), keeping the result and,
        where Triton's launcher allows it, a `_Raw` launch of it."""
        compiled = _ready(self.kernel[grid](*_materialise(args), **meta))
        raw = _Raw.of(compiled, args)
        keep(self.cache, key, (compiled, tuple(meta.get(n, d) for n, d in self.constexprs), raw,
                               any(type(a) is Tma for a in args)))
        return compiled

    @staticmethod
    def _again(entry, grid, device, args):
        compiled, tail, raw, has_tma = entry
        g0 = grid[0]
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        if raw is not None and RAW_LAUNCH:
            raw(g0, g1, g2, _raw_stream(device), args, tail)
            return compiled
        compiled.run(g0, g1, g2, _raw_stream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *(_materialise(args) if has_tma else args), *tail)
        return compiled


# Launch kept kernels through Triton's generated C launcher itself (`_Raw`) where its form is known; False: through
# `CompiledKernel.run` (benchmarks/probe_host.py compares the two; read at each launch).
RAW_LAUNCH = True


class Tma:
    """A tensor-descriptor argument of a FastLaunch launch: a descriptor of class `cls` (Triton's or Gluon's
    TensorDescriptor) over `t` with block `block` (and shared `layout`, Gluon's), made only where Triton's launcher
    needs the object (`descriptor`); the direct launch (`_Raw`) reads the tensor's address, shape and strides."""
    __slots__ = ("cls", "t", "block", "layout")

    def __init__(self, cls, t: torch.Tensor, block, layout=None):
        self.cls, self.t, self.block, self.layout = cls, t, block, layout

    def make(self):
        return descriptor(self.cls, self.t, self.block, self.layout)


def _tma_fill():
    """Triton 3.6's CUtensorMap encoder (`fill_tma_descriptor` of its driver's utilities)."""
    return triton.runtime.driver.active.utils.fill_tma_descriptor


def _materialise(args):
    """args with each `Tma` made into its descriptor."""
    return [a.make() if type(a) is Tma else a for a in args]


class _Raw:
    """A kept kernel launched through the C function of Triton's launcher module, skipping what Triton 3.6 does in
    Python on every launch (`CudaLauncher.__call__`, and per tensor descriptor `wrap_handle_tensordesc`'s loop,
    `make_tensordesc_arg` and `fill_tma_descriptor`, which encodes a CUtensorMap): here the arguments are expanded
    as that wrapper expands them, each tensor passed as its address (an int: the C launcher then neither calls
    data_ptr() nor asks the driver about the pointer, as decode's direct launch), and each descriptor's CUtensorMap
    kept per (argument, address, shape, strides), everything it encodes besides the kernel's fixed metadata (dtype,
    block, swizzle). `of` returns None (the caller launches through `CompiledKernel.run`) unless the launcher has
    exactly the form written for: Triton 3.6's (a `__triton_launcher` module whose `launch` takes
    `_BASE_ARGS_FORMAT` "iiiKKppOOOOOO" then the kernel's arguments, every descriptor with TMA metadata, no global
    or profile scratch) and every descriptor passed as a `Tma`. Triton 3.7+ launch through one generic function and
    take the `CompiledKernel.run` path."""
    __slots__ = ("launch", "head", "ptrs", "descs", "maps", "fill")

    @classmethod
    def of(cls, compiled, args):
        try:
            run = compiled.run
            if getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1):
                return None
            launch = run.launch
            metas = []
            code = getattr(launch, "__code__", None)
            if code is not None:   # wrap_handle_tensordesc's closure around the C launcher
                cells = dict(zip(code.co_freevars, launch.__closure__ or ()))
                if "launcher" not in cells or "tensordesc_meta" not in cells:
                    return None
                launch = cells["launcher"].cell_contents
                metas = list(cells["tensordesc_meta"].cell_contents or ())
            if getattr(launch, "__module__", None) != "__triton_launcher":
                return None
            import sys
            drv = sys.modules.get(type(run).__module__)
            if getattr(drv, "_BASE_ARGS_FORMAT", None) != "iiiKKppOOOOOO":
                return None
            pos = [i for i, a in enumerate(args) if type(a) is Tma]
            if len(pos) != len(metas) or any(m is None or m.get("fp4_padded") for m in metas):
                return None
            to_host = drv.TMA_DTYPE_DEVICE_TO_HOST
            self = cls()
            self.launch = launch
            self.head = (compiled.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                         compiled.packed_metadata, None, None, None)
            self.ptrs = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
            self.descs = tuple((i, m["swizzle"], m["elem_size"], to_host[m["elem_type"]], list(m["block_size"]))
                               for i, m in zip(pos, metas))
            self.maps = {}
            self.fill = _tma_fill() if self.descs else None
            return self
        except (AttributeError, KeyError, TypeError, ValueError):   # another launcher's form
            return None

    def __call__(self, g0, g1, g2, stream, args, tail):
        a = list(args)
        for i in self.ptrs:
            a[i] = a[i].data_ptr()
        if self.descs:
            flat = []
            prev = 0
            maps = self.maps
            for i, swizzle, elem_size, dtype, block in self.descs:
                flat += a[prev:i]
                t = a[i].t
                ptr, shape, strides = t.data_ptr(), t.shape, t.stride()
                key = (i, ptr, shape, strides)
                m = maps.get(key)
                if m is None:
                    m = keep(maps, key, self.fill(ptr, swizzle, elem_size, dtype, block, shape, strides, 0))
                flat.append(m)
                flat += shape
                flat += strides
                prev = i + 1
            flat += a[prev:]
            a = flat
        self.launch(g0, g1, g2, stream, *self.head, *a, *tail)


def _ready(compiled):
    """The CompiledKernel a JIT launch returned (a future's result under Triton's asynchronous compile mode), with
    its module loaded, ready for `CompiledKernel.run`."""
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    compiled._init_handles()
    return compiled


def keep(cache: dict, key, value):
    """cache[key] = value for the host-side caches of a call (kept kernels, descriptor fields, routes); a long run
    over many shapes starts a cache over at 4096 entries rather than let it grow. Returns value."""
    if len(cache) >= 4096:
        cache.clear()
    cache[key] = value
    return value


_DESC_FIELDS: dict = {}


def descriptor(cls, t: torch.Tensor, block, layout=None):
    """`cls.from_tensor(t, list(block)[, layout])` (cls: Triton's or Gluon's TensorDescriptor), its checks (a
    dataclass's __post_init__: alignment, strides, block shape; ~6 us a descriptor) made once per shape, strides,
    dtype, block, layout and base alignment: later descriptors of that kind copy the first one's fields and take
    their own base. `layout` is one object per call site (its identity is in the key and it is kept alive)."""
    key = (cls, t.shape, t.stride(), t.dtype, block, id(layout), t.data_ptr() & 15)
    hit = _DESC_FIELDS.get(key)
    if hit is None:
        d = cls.from_tensor(t, list(block)) if layout is None else cls.from_tensor(t, list(block), layout)
        fields = dict(d.__dict__)
        del fields["base"]
        keep(_DESC_FIELDS, key, (fields, layout))
        return d
    d = cls.__new__(cls)
    d.__dict__.update(hit[0])
    d.base = t
    return d


def _launch_hooks() -> bool:
    """True when a Triton launch hook is installed (a profiler such as proton): launches then go through
    Triton's entry point, which calls the hooks."""
    if _KNOBS is None:  # pragma: no cover - Triton without knobs
        return True
    rt = _KNOBS.runtime
    # a HookChain (Triton >= 3.5) is always there; it counts when something was added to it
    h = rt.launch_enter_hook
    if h is not None and getattr(h, "calls", True):
        return True
    h = rt.launch_exit_hook
    return h is not None and bool(getattr(h, "calls", True))


def _raw_stream(device: int) -> int:
    """The current CUDA stream's handle, as Triton's entry point gets it (its driver's get_current_stream,
    looked up once: `driver.active` is a lazy proxy, a microsecond an attribute)."""
    global _get_stream
    if _get_stream is None:
        _get_stream = triton.runtime.driver.active.get_current_stream
    return _get_stream(device)


_get_stream = None


try:
    from triton import knobs as _KNOBS
except ImportError:  # pragma: no cover
    _KNOBS = None


_INTERPRETING = is_interpreting()
