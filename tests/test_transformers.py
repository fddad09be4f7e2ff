"""attn_implementation="flashattn_custom" end to end in Transformers, against "eager": numerics per model family.

Tiny random fp32 models on the CPU (the Triton kernels run through the interpreter there):
hidden 64, 2 layers, 4 query heads / 2 key-value heads (GQA), head_dim 16, vocab 100, sequences
of at most 32 tokens. Every model test also checks, by counting calls, that hf_flashattn's
flash_attn_func / flash_attn_varlen_func did the attention, so a silent fallback fails. The models, builders and
fixtures are in _hf_testing; the registration and the ways to ask for the implementation in test_registration.py.
"""
from __future__ import annotations

import pytest
import torch

import hf_flashattn  # noqa: F401 (before transformers: sets TRITON_INTERPRET on the CPU)
from hf_flashattn.kernels import decode as decode_kernels
from hf_flashattn.integrations import transformers as integration
from _hf_testing import (CONFIGS, DEVICE, FAMILIES, GRAD_TOL, NAME, PACKED_LENGTHS, PAD, PADDED_LENGTHS, TINY, TOL,
                         WINDOW, build, cache_kwargs, check_matches_eager, left_padded, pair, qwen2_moe_config, report)

from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, StaticCache
from transformers.modeling_utils import AttentionInterface


# ----------------------------------------------------------------------------------------------
# Numerics per model family: padding, packing, generate, gradients
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_logits_match_eager(family, calls, kernel_version):
    eager, ours = pair(family)
    check_matches_eager(ours, eager, calls)


@pytest.mark.parametrize("fa_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_batch_matches_each_sequence_alone(family, fa_kwargs, calls, kernel_version):
    eager, ours = pair(family)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, TINY["vocab_size"], (n,), generator=g).tolist() for n in PACKED_LENGTHS]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=fa_kwargs)([{"input_ids": s} for s in seqs])
    batch.pop("labels")
    batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
    assert batch["input_ids"].shape == (1, sum(PACKED_LENGTHS)) and ("cu_seq_lens_q" in batch) == fa_kwargs
    with torch.no_grad():
        packed = ours(**batch, use_cache=False).logits[0]
        alone = torch.cat([eager(torch.tensor([s], device=DEVICE)).logits[0] for s in seqs])
    report(f"{family} packed", packed, alone)
    torch.testing.assert_close(packed, alone, **TOL)
    assert calls["flash_attn_varlen_func"] == ours.config.num_hidden_layers and calls["flash_attn_func"] == 0


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_eager(family, cache, padded, calls, kernel_version):
    eager, ours = pair(family)
    ids, mask = left_padded((11, 6) if padded else (11,))  # 11 + 6 new tokens > WINDOW
    kwargs = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=PAD,
                  output_scores=True, return_dict_in_generate=True)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        ref, out = eager.generate(ids, **kwargs), ours.generate(ids, **kwargs)
    print(f"{family} {cache}: eager {ref.sequences[:, 11:].tolist()} ours {out.sequences[:, 11:].tolist()}")
    report(f"{family} {cache} scores", torch.stack(out.scores), torch.stack(ref.scores))
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), **TOL)
    assert calls["flash_attn_func"] + calls["flash_attn_varlen_func"] + calls["decode_masked"] + \
        calls["decode_lean"] == 6 * ours.config.num_hidden_layers
    # unpadded decode steps with a dynamic cache take the lean path (v2's split-KV kernel in Transformers'
    # layout); other kernel versions never do
    if kernel_version == "v2" and not padded and cache == "dynamic":
        assert calls["decode_lean"] == 5 * ours.config.num_hidden_layers, calls
    assert kernel_version == "v2" or calls["decode_lean"] == 0, calls
    if padded:  # decode steps with a padding mask take the masked split-KV path (v2's kernel only)
        assert (calls["decode_masked"] > 0) == (kernel_version == "v2"), calls
    assert kernel_version == "v2" or calls["decode_masked"] == 0, calls


def test_static_cache_decode_steps_see_one_mask_size():
    """generate() with a static cache builds each step's mask outside the (compiled) forward; the decode
    steps must all pass the same mask size, else a compiled forward records a new CUDA graph every step."""
    _, ours = pair("llama")
    ids, mask = left_padded((11, 6))
    sizes = []
    hook = ours.model.register_forward_pre_hook(
        lambda mod, args, kwargs: sizes.append((kwargs["input_ids"].shape[1], tuple(kwargs["attention_mask"].shape))),
        with_kwargs=True)
    try:
        with torch.no_grad():
            ours.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                          pad_token_id=PAD, cache_implementation="static", disable_compile=True)
    finally:
        hook.remove()
    decode = [m for q, m in sizes if q == 1]
    assert len(decode) == 5 and len(set(decode)) == 1, sizes
    assert decode[0][-1] >= 11 + 6 - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_eager(family, calls, kernel_version):
    eager, ours = pair(family)
    ids, mask = left_padded(PADDED_LENGTHS)
    # Logits at position t predict token t+1: a row's first real token is predicted from a padding
    # position, whose attention output is undefined (eager: uniform over all keys; flash: zeros).
    predicted_from_real = mask.bool() & torch.nn.functional.pad(mask, (1, 0))[:, :-1].bool()
    labels = ids.masked_fill(~predicted_from_real, -100)
    losses = []
    for model in (eager, ours):
        model.train()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], **TOL)
    ref_grads = {n: p.grad for n, p in eager.named_parameters()}
    # Gradients span 1e-4 (q/k projections) to 1e-1 (embeddings): tolerances relative to each tensor's scale.
    scale = {n: g.abs().max().item() for n, g in ref_grads.items()}
    worst = max(((p.grad - ref_grads[n]).abs().max().item() / scale[n], n) for n, p in ours.named_parameters())
    print(f"{family}: loss {losses[0].item():.6f}; worst grad diff / grad scale {worst[0]:.3e} ({worst[1]})")
    for n, p in ours.named_parameters():
        assert p.grad is not None and scale[n] > 0, n
        torch.testing.assert_close(p.grad, ref_grads[n], atol=GRAD_TOL * scale[n], rtol=GRAD_TOL,
                                   msg=lambda m, n=n: f"{n}: {m}")
    assert calls["flash_attn_varlen_func"] == ours.config.num_hidden_layers


def test_qwen2_moe_sliding_window_matches_eager(calls):
    """Qwen2-MoE never passes sliding_window to the attention function; our wrapper reads it from the
    module. Checks padded (varlen) and unpadded (dense) forwards, and that the window matters here."""
    eager, ours = pair(qwen2_moe_config)
    assert ours.model.layers[0].self_attn.sliding_window == WINDOW
    full = build(qwen2_moe_config(use_sliding_window=False), "eager", eager.state_dict())
    ids, mask = left_padded(PADDED_LENGTHS)
    single = ids[:1]
    with torch.no_grad():
        ref, out = eager(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
        ref1, out1 = eager(single).logits, ours(single).logits
        no_window = full(single).logits
    report("qwen2_moe padded", out[mask.bool()], ref[mask.bool()])
    report("qwen2_moe unpadded", out1, ref1)
    assert (no_window - ref1).abs().max() > 1e-3, "the window does not change the output: the test is vacuous"
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], **TOL)
    torch.testing.assert_close(out1, ref1, **TOL)
    assert calls["flash_attn_varlen_func"] == 2 and calls["flash_attn_func"] == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_decode_step_skips_the_flash_path_and_matches_it(family, monkeypatch):
    """A decode step with one token and no padding calls our kernel directly (no per-layer
    `_is_packed_sequence` device sync); its output equals what Transformers' flash path computes, with
    the layer's sliding window (the cache here is longer than WINDOW), softcap and scaling."""
    import transformers.integrations.flash_attention as hf_flash
    integ = integration
    _, ours = pair(family)
    attn = ours.model.layers[0].self_attn
    fn = AttentionInterface._global_mapping[NAME]
    g = torch.Generator().manual_seed(3)
    H, Hk, D = ours.config.num_attention_heads, ours.config.num_key_value_heads, attn.head_dim
    q = torch.randn(2, H, 1, D, generator=g)
    k, v = torch.randn(2, Hk, WINDOW + 9, D, generator=g), torch.randn(2, Hk, WINDOW + 9, D, generator=g)
    seen = []
    real = hf_flash._flash_attention_forward
    monkeypatch.setattr(hf_flash, "_flash_attention_forward", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    for window, softcap in ((None, None), (WINDOW, None), (WINDOW, 5.0)):
        kw = dict(dropout=0.0, scaling=attn.scaling, sliding_window=window, softcap=softcap)
        assert integ._is_plain_decode_step(attn, q, k, v, None, kw)
        fast, _ = fn(attn, q, k, v, None, **kw)
        assert not seen, "the plain decode step went through Transformers' flash path"
        slow, _ = hf_flash.flash_attention_forward(attn, q, k, v, None, **kw)
        assert seen, "the reference did not run Transformers' flash path"
        seen.clear()
        torch.testing.assert_close(fast, slow, rtol=0, atol=0)
    # a padding mask (left padding, and a static cache whose mask covers fewer keys than it holds): the
    # masked split-KV path, against Transformers' unpad + varlen path (another kernel: close, not equal)
    mask = torch.ones(2, WINDOW + 5, dtype=torch.bool)
    mask[1, :7] = False
    for window, softcap in ((None, None), (WINDOW, 5.0)):
        kw = dict(dropout=0.0, scaling=attn.scaling, sliding_window=window, softcap=softcap)
        assert integ._is_plain_decode_step(attn, q, k, v, mask, kw)
        fast, _ = fn(attn, q, k, v, mask, **kw)
        assert not seen, "the masked decode step went through Transformers' flash path"
        slow, _ = hf_flash.flash_attention_forward(attn, q, k, v, mask, **kw)
        assert seen
        seen.clear()
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    # not plain: several tokens, packed-sequence kwargs, a mask longer than the keys -> Transformers' path
    assert not integ._is_plain_decode_step(attn, torch.randn(2, H, 2, D), k, v, None, {})
    assert not integ._is_plain_decode_step(attn, q, k, v, torch.ones(2, WINDOW + 10, dtype=torch.bool), {})
    assert not integ._is_plain_decode_step(attn, q, k, v, None, {"cu_seq_lens_q": torch.zeros(3, dtype=torch.int32)})


def test_decode_step_that_wants_gradients_keeps_autograd(monkeypatch):
    """A one-token step whose inputs require gradients (a training or scoring forward over one new token)
    must not take the lean no-autograd kernel call: its output carries the autograd graph, and the
    gradients equal those of Transformers' own flash path."""
    import transformers.integrations.flash_attention as hf_flash
    _, ours = pair("llama")
    attn = ours.model.layers[0].self_attn
    fn = AttentionInterface._global_mapping[NAME]
    lean = []
    real = decode_kernels.decode_bhsd
    monkeypatch.setattr(decode_kernels, "decode_bhsd", lambda *a, **kw: lean.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(5)
    H, Hk, D = ours.config.num_attention_heads, ours.config.num_key_value_heads, attn.head_dim
    base = [torch.randn(2, H, 1, D, generator=g), torch.randn(2, Hk, 30, D, generator=g),
            torch.randn(2, Hk, 30, D, generator=g)]
    grads = []
    for run in (lambda *t: fn(attn, *t, None, dropout=0.0, scaling=attn.scaling)[0],
                lambda *t: hf_flash.flash_attention_forward(attn, *t, None, dropout=0.0, scaling=attn.scaling)[0]):
        ts = [t.clone().requires_grad_() for t in base]
        out = run(*ts)
        assert out.grad_fn is not None, "the output of a step that wants gradients has no autograd graph"
        (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads.append([t.grad for t in ts])
    assert not lean, "a step that wants gradients took the no-autograd lean path"
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():   # the same step without gradients takes it
        fn(attn, *base, None, dropout=0.0, scaling=attn.scaling)
    assert lean


def test_compiled_decode_step_reaches_the_kernel_through_the_custom_ops(monkeypatch):
    """A static cache's decode step runs compiled: the attention forward with one token and no mask compiles with
    fullgraph=True (no graph break), does not take the lean call (a direct kernel launch that Dynamo would trace into:
    the 2026-11-27 static-cache generate() failed so on the GPU), and gives the eager step's output."""
    _, ours = pair("llama")
    attn = ours.model.layers[0].self_attn
    fn = AttentionInterface._global_mapping[NAME]
    g = torch.Generator().manual_seed(6)
    H, Hk, D = ours.config.num_attention_heads, ours.config.num_key_value_heads, attn.head_dim
    q, k, v = torch.randn(1, H, 1, D, generator=g), torch.randn(1, Hk, 40, D, generator=g), \
        torch.randn(1, Hk, 40, D, generator=g)
    with torch.no_grad():
        eager = fn(attn, q, k, v, None, dropout=0.0, scaling=attn.scaling)[0]
        lean = []
        real = integration._lean_step
        monkeypatch.setattr(integration, "_lean_step", lambda *a: lean.append(1) or real(*a))
        torch._dynamo.reset()
        step = torch.compile(lambda q, k, v: fn(attn, q, k, v, None, dropout=0.0, scaling=attn.scaling)[0],
                             fullgraph=True, backend="eager")
        out = step(q, k, v)
    assert not lean, "the compiled step took the lean call (a kernel launch Dynamo traces into)"
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)


def test_module_sliding_window_lookup():
    """The per-layer lookup of a module's window (no nn.Module.__getattr__ miss) finds an instance
    attribute, a class attribute or property, and None when there is none."""
    class Plain(torch.nn.Module):
        pass

    class WithProperty(torch.nn.Module):
        @property
        def sliding_window(self):
            return 7

    m = Plain()
    assert integration._module_sliding_window(m) is None
    m.sliding_window = 5
    assert integration._module_sliding_window(m) == 5
    assert integration._module_sliding_window(WithProperty()) == 7


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_static_cache_decode_step_compiles_fullgraph(padded):
    """torch.compile(model.forward, fullgraph=True) on a decode step with a StaticCache (what generate()
    auto-compiles): no graph break through Transformers' flash path and our custom ops, and the same
    logits as the step run eagerly. float16: the float32 path logs a cast warning, which dynamo cannot trace."""
    config = CONFIGS["llama"]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=NAME).to(DEVICE, torch.float16).eval()
    ids, mask = left_padded((11, 6) if padded else (11, 11))
    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    logits = []
    for compiled in (False, True):
        cache = cache_kwargs(model, StaticCache(config=config, max_cache_len=24))
        with torch.no_grad():
            tok = model(input_ids=ids, attention_mask=mask, **cache).logits[:, -1:].argmax(-1)
            fwd = torch.compile(model.forward, fullgraph=True, backend="aot_eager") if compiled else model.forward
            logits.append(fwd(input_ids=tok, attention_mask=step_mask, **cache,
                              cache_position=torch.tensor([ids.shape[1]], device=DEVICE)).logits)
    torch._dynamo.reset()
    assert torch.isfinite(logits[0]).all()
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)


def test_attention_sinks_are_refused_not_dropped():
    """Transformers drops keywords a flash implementation does not take; sinks (s_aux, gpt-oss) would be
    ignored silently, so the registered function refuses them by name."""
    _, ours = pair("llama")
    attn = ours.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, attn.head_dim)
    k = v = torch.randn(1, 2, 3, attn.head_dim)
    with pytest.raises(NotImplementedError, match="s_aux"):
        AttentionInterface._global_mapping[NAME](attn, q, k, v, None, s_aux=torch.zeros(4))
