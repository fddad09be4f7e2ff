"""What the per-family adapters share: the patched attention body, mask handling, and swapping
`forward` on classes and live modules with an exact revert.

Layout legend: B batch, Sq query length, Sk key length (past + new tokens), H query heads, Hkv
key/value heads (GQA: H a multiple of Hkv), D head dim. The projections come out as (B, S, heads, D),
flash-attn's layout, so the patched forward never transposes or copies Q/K/V for the kernel: rotary
is applied on that layout, and only the KV cache (which stores (B, Hkv, S, D)) sees transposed views.

The mask the model hands to attention depends on the `attn_implementation` it was built with:
  * None (no padding; flash-style or sdpa-skipped masks),
  * a 2D (B, Sk) padding mask (flash-style implementations such as "flashattn_custom"),
  * a 4D (B, 1, Sq, Sk) bool (sdpa) or additive float (eager) mask.
A 4D mask is turned back into padding and packed-sequence boundaries, and the result is checked
against the mask (causal, per-sequence, sliding window) so a custom 4D mask that the kernel cannot
express raises ValueError instead of being silently ignored. That work is done once per mask object
(every layer of one type receives the same tensor in a forward pass).
Outputs at padding positions (queries whose own token is masked out) are zeros, as in Transformers'
flash path; eager produces arbitrary values there.
"""
from __future__ import annotations

import types
import weakref

import torch
import torch.nn.functional as F

from hf_flashattn import interface

_MISSING = object()
OPTION_DEFAULTS = {"version": "auto"}


# ------------------------------------------------------------------------------------------------
# The patched attention body
# ------------------------------------------------------------------------------------------------

def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin):
    """Rotary embedding on q (B, S, H, D) and k (B, S, Hkv, D) with cos, sin (B, S, D): the same
    arithmetic as Transformers' apply_rotary_pos_emb, broadcasting over heads on dim 2."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def attention_forward(module, hidden_states, position_embeddings, attention_mask, cache, kwargs, *,
                      sliding_window=None, qk_norm=False, version="auto"):
    """The body of every patched attention forward: projections -> (q_norm/k_norm) -> rotary ->
    cache update -> hf_flashattn kernel -> o_proj. Returns (output (B, S, hidden), None)."""
    input_shape = hidden_states.shape[:-1]
    shape = (*input_shape, -1, module.head_dim)
    q = module.q_proj(hidden_states).view(shape)
    k = module.k_proj(hidden_states).view(shape)
    v = module.v_proj(hidden_states).view(shape)
    if qk_norm:
        q, k = module.q_norm(q), module.k_norm(k)
    cos, sin = position_embeddings
    q, k = apply_rotary(q, k, cos, sin)
    if cache is not None:  # the cache stores (B, Hkv, S, D): hand it transposed views, take views back
        k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), module.layer_idx, kwargs=kwargs)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    out = attention(module, q, k, v, attention_mask, sliding_window, kwargs, version)
    return module.o_proj(out.reshape(*input_shape, -1)), None


def attention(module, q, k, v, attention_mask, sliding_window, kwargs, version="auto"):
    """Causal attention of q (B, Sq, H, D) over k, v (B, Sk, Hkv, D) (any strides, contiguous last
    dim), bottom-right aligned, with the model's mask and an optional sliding window of
    `sliding_window` keys (the query's own included; flash-attn window_size=(sliding_window-1, 0)).
    Returns (B, Sq, H, D)."""
    B, Sq = q.shape[:2]
    opts = dict(dropout_p=module.attention_dropout if module.training else 0.0, softmax_scale=module.scaling,
                causal=True, window_size=(sliding_window - 1, 0) if sliding_window else (-1, -1), version=version)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:  # packed batch with precomputed boundaries (B == 1)
        if B != 1:
            raise ValueError(f"cu_seq_lens_q/cu_seq_lens_k describe a packed batch of size 1; got batch size {B}.")
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        max_q = int(cu_q.diff().max()) if max_q is None else max_q
        max_k = int(cu_k.diff().max()) if max_k is None else max_k
        out = interface.flash_attn_varlen_func(q[0], k[0], v[0], cu_q.int(), cu_k.int(), max_q, max_k, **opts)
        return out.unsqueeze(0)
    valid, starts, length = _layout(attention_mask, B, Sq, k.shape[1], sliding_window, kwargs.get("position_ids"),
                                    type(module).__name__)
    k, v = k[:, :length], v[:, :length]  # static caches hold more slots than are filled
    if valid is None and starts is None:
        return interface.flash_attn_func(q, k, v, **opts)
    return _varlen(q, k, v, valid, starts, opts)


def _varlen(q, k, v, valid, starts, opts):
    """One varlen call over the sequences of the batch. valid (B, Sk) bool or None (all valid): real
    tokens; the queries are the last Sq positions. starts (B, Sk) bool or None: packed-sequence starts."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if valid is None:  # packing without padding (then Sq == Sk): flatten, no gather
        begin = torch.nonzero(starts.flatten()).flatten()
        seq_lens = torch.diff(begin, append=begin.new_tensor([B * Sk]))
        cu, longest = F.pad(seq_lens.cumsum(0), (1, 0)).int(), int(seq_lens.max())
        out = interface.flash_attn_varlen_func(q.reshape(-1, H, D), k.reshape(-1, *k.shape[2:]),
                                               v.reshape(-1, *v.shape[2:]), cu, cu, longest, longest, **opts)
        return out.view(B, Sq, *out.shape[1:])
    new_seq = valid & (valid.cumsum(1) == 1)  # each row's first real token starts a sequence
    if starts is not None:
        new_seq = new_seq | (starts & valid)
    seq_id = new_seq.flatten().cumsum(0).view(B, Sk) - 1
    n_seq = int(new_seq.sum())
    bk, sk = valid.nonzero(as_tuple=True)
    bq, sq = valid[:, Sk - Sq:].nonzero(as_tuple=True)
    if len(bq) == 0:
        return q.new_zeros(B, Sq, H, v.shape[-1])
    len_k = torch.bincount(seq_id[bk, sk], minlength=n_seq)
    len_q = torch.bincount(seq_id[bq, sq + (Sk - Sq)], minlength=n_seq)
    cu_k, cu_q = (F.pad(n.cumsum(0), (1, 0)).int() for n in (len_k, len_q))
    out = interface.flash_attn_varlen_func(q[bq, sq], k[bk, sk], v[bk, sk], cu_q, cu_k, int(len_q.max()),
                                           int(len_k.max()), **opts)
    return out.new_zeros(B, Sq, *out.shape[1:]).index_put((bq, sq), out)


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------

def _layout(mask, B, Sq, Sk, window, position_ids, who):
    """(valid (B, L) bool or None, starts (B, L) bool or None, L): which of the first L keys are real,
    where packed sequences start. None means all valid / a single sequence per row."""
    if mask is None:
        valid, starts, length = None, None, Sk
    elif not torch.is_tensor(mask):
        raise TypeError(f"{who} (patched by hf_flashattn.patches) received a {type(mask).__name__} attention mask; "
                        "it handles None, a 2D padding mask or a 4D mask. Build the model with "
                        "attn_implementation='eager', 'sdpa' or 'flashattn_custom' (not 'flex_attention').")
    elif mask.ndim == 2:
        valid = mask[:, -Sk:].bool()
        length = valid.shape[1]
        valid = None if bool(valid.all()) else valid.expand(B, -1)
        starts = None
    elif mask.ndim == 4:
        valid, starts, length = _from_4d(mask, B, Sq, window, who)
    else:
        raise ValueError(f"{who} (patched by hf_flashattn.patches): attention mask of shape {tuple(mask.shape)}; "
                         "expected None, (batch, kv_len) or (batch, 1, q_len, kv_len).")
    if valid is None and starts is None and B == 1 and Sq == length and Sq > 1 and position_ids is not None:
        # packing only in a batch of one, as DataCollatorWithFlattening makes and Transformers' flash path assumes
        starts = _cached(position_ids, ("starts",), lambda: _starts_from_position_ids(position_ids))
    return valid, starts, length


def _starts_from_position_ids(position_ids):
    """Packed sequences (DataCollatorWithFlattening without flash kwargs): a sequence starts wherever
    the position does not follow the previous one, as in Transformers' find_packed_sequence_indices."""
    starts = F.pad(torch.diff(position_ids[:1], dim=-1) != 1, (1, 0), value=True)
    return starts if bool(starts[:, 1:].any()) else None  # a device sync: once per forward (cached)


_CACHE: dict = {}  # id(tensor) -> (weakref to tensor, key, result): one derivation per forward, not per layer


def _cached(tensor, key, derive):
    hit = _CACHE.get(id(tensor))
    if hit is not None and hit[0]() is tensor and hit[1] == key:
        return hit[2]
    result = derive()
    if len(_CACHE) >= 8:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[id(tensor)] = (weakref.ref(tensor), key, result)
    return result


def _from_4d(mask, B, Sq, window, who):
    return _cached(mask, (B, Sq, window), lambda: _derive_4d(mask, B, Sq, window, who))


def _derive_4d(mask, B, Sq, window, who):
    def refuse(why):
        return ValueError(f"{who} (patched by hf_flashattn.patches) received a 4D attention mask that {why}; the "
                          "patched attention expresses causal masks with padding, packed sequences and the layer's "
                          f"sliding window ({window}). Pass a 2D padding mask, or revert the patch for this input.")

    if mask.shape[1] != 1 or mask.shape[2] != Sq:
        raise refuse(f"has shape {tuple(mask.shape)} (expected (batch, 1, {Sq}, kv_len))")
    m = mask[:, 0].expand(B, -1, -1)
    if m.dtype == torch.bool:
        allowed = m
    else:
        allowed = m == 0
        if not bool((allowed | (m <= torch.finfo(m.dtype).min / 2)).all()):
            raise refuse("adds a bias (values other than 0 and the dtype's minimum)")
    seen = allowed.any(1)  # (B, Sk): keys some query attends to
    cols = seen.any(0).nonzero()
    if len(cols) == 0:
        raise refuse("masks every key for every query")
    length = int(cols[-1]) + 1  # static caches: slots past the last attended key are empty
    allowed, valid = allowed[:, :, :length], seen[:, :length]
    first_q = length - Sq
    if first_q < 0:
        raise refuse(f"lets the {Sq} queries attend only to the first {length} keys")
    starts = None
    if first_q == 0 and Sq > 1:  # no past keys: packed sequences show up as queries that cannot see their predecessor
        starts = F.pad(~allowed.diagonal(offset=-1, dim1=1, dim2=2), (1, 0), value=True)
    # What the kernel will compute, as a (B, Sq, length) mask, compared on the rows of real queries.
    new_seq = valid & (valid.cumsum(1) == 1)
    if starts is not None:
        new_seq = new_seq | (starts & valid)
    seq = new_seq.cumsum(1, dtype=torch.int32)
    rank = valid.cumsum(1, dtype=torch.int32)
    dist = rank[:, first_q:, None] - rank[:, None, :]
    expected = valid[:, None, :] & (seq[:, first_q:, None] == seq[:, None, :]) & (dist >= 0)
    if window:
        expected &= dist < window
    if bool(((allowed != expected) & valid[:, first_q:, None]).any()):
        raise refuse("is not a causal padding/packing mask with this window")
    if starts is not None and not bool((starts & valid & (valid.cumsum(1) > 1)).any()):
        starts = None  # only each row's first real token starts a sequence: padding, not packing
    return (None if bool(valid.all()) else valid), starts, length


# ------------------------------------------------------------------------------------------------
# Swapping forward on classes and live modules
# ------------------------------------------------------------------------------------------------

class Patcher:
    """Installs one family's patched `forward` on its attention classes (models built afterwards)
    or on the attention modules of a live model (PEFT-wrapped too), and restores exactly what was
    there. `options` is read by the patched forward at call time (the latest apply() wins)."""

    def __init__(self, name, forward, classes, **option_defaults):
        self.name, self.forward, self._classes = name, forward, classes
        self._defaults = {**OPTION_DEFAULTS, **option_defaults}
        self.options = dict(self._defaults)
        self._saved_classes: dict = {}  # class -> its own original `forward`
        self._saved_modules = weakref.WeakKeyDictionary()  # module -> its previous instance `forward` or _MISSING

    def classes(self):
        return tuple(self._classes())

    def apply(self, model=None, **options):
        self.options.update(options)
        if model is None:
            for cls in self.classes():
                if cls.__dict__.get("forward") is not self.forward:
                    self._saved_classes[cls] = cls.__dict__["forward"]
                    cls.forward = self.forward
            return None
        modules = self._modules(model)
        if not modules:
            raise ValueError(f"hf_flashattn.patches.{self.name}: no {', '.join(c.__name__ for c in self.classes())} "
                             f"module in {type(model).__name__}.")
        for module in modules:
            current = module.__dict__.get("forward", _MISSING)
            if getattr(current, "__func__", None) is not self.forward:
                self._saved_modules[module] = current
                module.forward = types.MethodType(self.forward, module)
        return model

    def revert(self, model=None):
        """With a model: restore its attention modules. Without: restore the classes and every module
        patched so far, and reset the options."""
        modules = list(self._saved_modules.keys()) if model is None else self._modules(model)
        for module in modules:
            previous = self._saved_modules.pop(module, None)
            if previous is None and getattr(vars(module).get("forward"), "__func__", None) is self.forward:
                previous = _MISSING  # a copy (deepcopy, pickle) of a patched module: nothing was saved for it
            if previous is _MISSING:
                del module.forward
            elif previous is not None:
                module.forward = previous
        if model is None:
            for cls, original in self._saved_classes.items():
                cls.forward = original
            self._saved_classes.clear()
            self.options = dict(self._defaults)
        return model

    def _modules(self, model):
        classes = self.classes()
        return [m for m in model.modules() if isinstance(m, classes)]
