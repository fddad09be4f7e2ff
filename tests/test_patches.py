"""hf_flashattn.patches: per-family monkey-patch adapters, against the unpatched models.

Tiny random fp32 models on the CPU (the Triton kernels run through the interpreter there): hidden
64, 2 layers, 4 query heads / 2 key-value heads, head_dim 16, vocab 100, sequences of at most 24
tokens, a sliding window of 8 where the family has one. The models are built with
attn_implementation="eager" (unless a test says otherwise), so the patched attention receives
eager's 4D float masks; each test counts calls to prove that the stock attention function did not
run while patched and that hf_flashattn's kernels did.
"""
from __future__ import annotations

import copy
import functools
import types

import pytest
import torch

import _attn_testing

import hf_flashattn  # before transformers: sets TRITON_INTERPRET on the CPU, registers flashattn_custom
import hf_flashattn.patches as patches
from hf_flashattn import interface
from hf_flashattn.patches import _common, llama, mistral, qwen2, qwen3

from transformers import (AutoModelForCausalLM, DataCollatorWithFlattening, LlamaConfig, MistralConfig,
                          Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig)
from transformers import modeling_flash_attention_utils as fa_utils
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.modeling_utils import AttentionInterface
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen2_moe import modeling_qwen2_moe
from transformers.models.qwen3 import modeling_qwen3
from transformers.models.qwen3_moe import modeling_qwen3_moe

NAME = hf_flashattn.ATTN_IMPLEMENTATION
# The CPU (interpreter) is the target; on a GPU machine the same fp32 checks run on the GPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not hf_flashattn.is_interpreting() else "cpu")
PAD, WINDOW = 0, 8
TOL = dict(atol=1e-4, rtol=1e-4)  # fp32 both sides: summation order only (~1e-6); mask/window bugs are >1e-2
GRAD_TOL = 1e-4  # relative to each gradient tensor's largest entry
PADDED_LENGTHS = (24, 17, 9)  # left padded; 24 and 17 exceed WINDOW
PACKED_LENGTHS = (12, 7, 5)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=100, max_position_embeddings=128,
            pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
SLIDE = dict(use_sliding_window=True, sliding_window=WINDOW)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
CONFIGS = {  # a fresh config per model
    "llama": lambda: LlamaConfig(**TINY),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=WINDOW),                     # every layer slides
    "qwen2": lambda: Qwen2Config(**TINY, **SLIDE, max_window_layers=1),                 # layer 1 slides
    "qwen2_moe": lambda: Qwen2MoeConfig(**TINY, **SLIDE, **MOE, max_window_layers=2,     # layer 0 slides
                                        shared_expert_intermediate_size=64),
    "qwen3": lambda: Qwen3Config(**TINY, **SLIDE, max_window_layers=1),                 # layer 1 slides
    "qwen3_moe": lambda: Qwen3MoeConfig(**TINY, **SLIDE, **MOE),                        # every layer slides
}
TYPES = sorted(CONFIGS)
MODELING = {"llama": modeling_llama, "mistral": modeling_mistral, "qwen2": modeling_qwen2,
            "qwen2_moe": modeling_qwen2_moe, "qwen3": modeling_qwen3, "qwen3_moe": modeling_qwen3_moe}
FAMILIES = (llama, mistral, qwen2, qwen3)
LAYERS = TINY["num_hidden_layers"]


def build(model_type, impl="eager", state_dict=None, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[model_type](), attn_implementation=impl)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    assert model.config._attn_implementation == impl and model.config.model_type == model_type
    return model.to(DEVICE).eval()


def twins(model_type, impl="eager"):
    """(reference, copy to patch) with the same weights."""
    ref = build(model_type, impl)
    return ref, build(model_type, impl, ref.state_dict())


def left_padded(lengths, seed=1):
    return _attn_testing.left_padded(lengths, TINY["vocab_size"], PAD, DEVICE, seed)


def report(name, ours, ref):
    diff = (ours - ref).abs()
    print(f"{name}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}")
    return diff.max().item()


@pytest.fixture(autouse=True)
def unpatched():
    """Every test starts and ends with no class or module patched."""
    for family in FAMILIES:
        family.revert()
    yield
    for family in FAMILIES:
        family.revert()


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of the stock attention functions (each family's eager_attention_forward, the
    AttentionInterface's sdpa and flashattn_custom) and of hf_flashattn's kernels."""
    counts = dict.fromkeys(("eager", "sdpa", NAME, "flash_attn_func", "flash_attn_varlen_func"), 0)

    def counting(real, key):
        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return real(*args, **kwargs)
        return wrapper

    for module in MODELING.values():
        monkeypatch.setattr(module, "eager_attention_forward", counting(module.eager_attention_forward, "eager"))
    for key in ("sdpa", NAME):
        stock = AttentionInterface._global_mapping[key]
        monkeypatch.setitem(AttentionInterface._global_mapping, key, counting(stock, key))
    for fname in ("flash_attn_func", "flash_attn_varlen_func"):
        monkeypatch.setattr(interface, fname, counting(getattr(interface, fname), fname))
    fa_utils._loaded_implementation = None  # Transformers' flash path caches resolved functions by name
    yield counts
    fa_utils._loaded_implementation = None


def ours(counts):
    return counts["flash_attn_func"] + counts["flash_attn_varlen_func"]


def reset(counts):
    for key in counts:
        counts[key] = 0


# ----------------------------------------------------------------------------------------------
# Numerics per model type: padding + gradients, packing, generate
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", TYPES)
def test_patched_model_matches_unpatched_logits_and_gradients(model_type, calls):
    """Left padding (eager hands the patched attention a 4D float mask), loss and every parameter's
    gradient; then revert: eager attention runs again and gives the reference logits."""
    ref, model = twins(model_type)
    assert patches.apply(model) is model
    ids, mask = left_padded(PADDED_LENGTHS)
    real = mask.bool()
    # Logits at t predict token t+1: skip labels predicted from a padding position (undefined output there).
    labels = ids.masked_fill(~(real & torch.nn.functional.pad(mask, (1, 0))[:, :-1].bool()), -100)
    out_ref = ref(ids, attention_mask=mask, labels=labels)
    out_ref.loss.backward()
    assert calls["eager"] == LAYERS and ours(calls) == 0
    reset(calls)
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert calls["eager"] == 0 and calls["flash_attn_varlen_func"] == LAYERS, calls
    report(f"{model_type} logits", out.logits[real], out_ref.logits[real])
    torch.testing.assert_close(out.logits[real], out_ref.logits[real], **TOL)
    torch.testing.assert_close(out.loss, out_ref.loss, **TOL)
    ref_grads = dict(ref.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        g_ref = ref_grads[name].grad
        if g_ref is None:  # MoE experts that no token was routed to, in both models
            assert p.grad is None or not p.grad.any(), name
            continue
        scale = g_ref.abs().max().item()
        worst = max(worst, (p.grad - g_ref).abs().max().item() / max(scale, 1e-30))
        torch.testing.assert_close(p.grad, g_ref, atol=GRAD_TOL * scale, rtol=GRAD_TOL,
                                   msg=lambda m, n=name: f"{n}: {m}")
    print(f"{model_type}: worst grad diff / grad scale {worst:.3e}")

    patches.revert(model)
    reset(calls)
    with torch.no_grad():
        again = model(ids, attention_mask=mask).logits
    assert calls["eager"] == LAYERS and ours(calls) == 0, calls
    torch.testing.assert_close(again, out_ref.logits.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("model_type,fa_kwargs", [(t, False) for t in TYPES] + [("llama", True), ("qwen3_moe", True)],
                         ids=[f"{t}-position_ids" for t in TYPES] + ["llama-cu_seq_lens", "qwen3_moe-cu_seq_lens"])
def test_packed_batch_matches_each_sequence_alone(model_type, fa_kwargs, calls):
    """DataCollatorWithFlattening: with position_ids only, eager builds a block-diagonal 4D mask that
    the patch turns back into sequences; with cu_seq_lens_* the boundaries come as kwargs."""
    ref, model = twins(model_type)
    patches.apply(model)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, TINY["vocab_size"], (n,), generator=g).tolist() for n in PACKED_LENGTHS]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=fa_kwargs)([{"input_ids": s} for s in seqs])
    batch.pop("labels")
    batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
    assert ("cu_seq_lens_q" in batch) == fa_kwargs
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        assert calls["eager"] == 0 and calls["flash_attn_varlen_func"] == LAYERS, calls
        alone = torch.cat([ref(torch.tensor([s], device=DEVICE)).logits[0] for s in seqs])
    report(f"{model_type} packed", packed, alone)
    torch.testing.assert_close(packed, alone, **TOL)


@pytest.mark.parametrize("model_type,cache", [("llama", "dynamic"), ("mistral", "static"), ("qwen2_moe", "dynamic"),
                                             ("qwen3", "static"), ("qwen3_moe", "dynamic")])
def test_greedy_generate_matches_unpatched(model_type, cache, calls):
    """Left-padded prompt longer than the window, prefill then q_len-1 decode steps (bottom-right causal);
    a static cache also hands the patch empty cache slots that the mask hides."""
    ref, model = twins(model_type)
    patches.apply(model)
    ids, mask = left_padded((11, 6))
    kwargs = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=PAD,
                  output_scores=True, return_dict_in_generate=True)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        expected = ref.generate(ids, **kwargs)
        reset(calls)
        got = model.generate(ids, **kwargs)
    print(f"{model_type} {cache}: ref {expected.sequences[:, 11:].tolist()} patched {got.sequences[:, 11:].tolist()}")
    report(f"{model_type} {cache} scores", torch.stack(got.scores), torch.stack(expected.scores))
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), **TOL)
    assert calls["eager"] == 0 and ours(calls) == 4 * LAYERS, calls


# ----------------------------------------------------------------------------------------------
# Patching mechanics: classes before a model exists, live modules, identity, PEFT
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type,impl", [("llama", "sdpa"), ("mistral", "sdpa"), ("qwen2", NAME),
                                             ("qwen3_moe", "eager")])
def test_class_patch_applies_to_models_built_afterwards(model_type, impl, calls):
    """apply(model_type) before building: whatever attn_implementation the model was built with (sdpa:
    4D bool masks or None; flashattn_custom: 2D masks), the stock function is not called; after
    revert(model_type) it is, with the same result."""
    assert patches.apply(model_type) is None
    model = build(model_type, impl)
    ids, mask = left_padded(PADDED_LENGTHS)
    real = mask.bool()
    stock = "eager" if impl == "eager" else impl
    with torch.no_grad():
        patched = model(ids, attention_mask=mask).logits
        assert calls[stock] == 0 and calls["flash_attn_varlen_func"] == LAYERS, calls
        patches.revert(model_type)
        reset(calls)
        stock_out = model(ids, attention_mask=mask).logits
    assert calls[stock] == LAYERS and (impl == NAME or ours(calls) == 0), calls
    report(f"{model_type} built with {impl}", patched[real], stock_out[real])
    torch.testing.assert_close(patched[real], stock_out[real], **TOL)


def test_apply_twice_is_a_noop_and_revert_restores_identity():
    originals = {family: {cls: cls.__dict__["forward"] for cls in family._PATCHER.classes()} for family in FAMILIES}
    for family in FAMILIES:
        family.apply()
        family.apply()
        for cls, original in originals[family].items():
            assert cls.forward is family.forward and original is not family.forward
        assert family._PATCHER._saved_classes == originals[family]  # the original, never our own function
        family.revert()
        for cls, original in originals[family].items():
            assert cls.__dict__["forward"] is original, cls
    # Live modules: an instance attribute bound to our forward; revert removes it, or restores one that was there.
    model = build("qwen3")
    attn = [layer.self_attn for layer in model.model.layers]
    someone_elses = types.MethodType(lambda self, *a, **k: None, attn[0])
    attn[0].forward = someone_elses
    patches.apply(model)
    patches.apply(model)
    for module in attn:
        assert module.forward.__func__ is qwen3.forward and type(module).forward is originals[qwen3][type(module)]
    assert len(qwen3._PATCHER._saved_modules) == len(attn)
    clone = copy.deepcopy(model)  # bound methods are rebound to the copies; nothing was saved for them
    clone_attn = [layer.self_attn for layer in clone.model.layers]
    assert all(m.forward.__func__ is qwen3.forward and m.forward.__self__ is m for m in clone_attn)
    patches.revert(clone)
    assert not any("forward" in vars(m) for m in clone_attn)
    patches.revert(model)
    assert attn[0].forward is someone_elses
    assert "forward" not in vars(attn[1]) and attn[1].forward.__func__ is originals[qwen3][type(attn[1])]
    assert len(qwen3._PATCHER._saved_modules) == 0


def test_peft_wrapped_model(calls):
    """patches.apply(peft_model) finds the attention modules under PeftModel; LoRA-wrapped
    projections run inside the patched forward; logits and LoRA gradients match."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(3)
    ref = get_peft_model(build("mistral"), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                      init_lora_weights=False))
    model = copy.deepcopy(ref)
    assert patches.apply(model) is model
    ids, mask = left_padded(PADDED_LENGTHS)
    real = mask.bool()
    logits = {}
    for key, m in (("ref", ref), ("patched", model)):
        reset(calls)
        out = m(ids, attention_mask=mask).logits
        (out[real] ** 2).mean().backward()
        logits[key] = out.detach()
    assert calls["eager"] == 0 and calls["flash_attn_varlen_func"] == LAYERS, calls
    report("peft mistral", logits["patched"][real], logits["ref"][real])
    torch.testing.assert_close(logits["patched"][real], logits["ref"][real], **TOL)
    ref_params = dict(ref.named_parameters())
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n, _ in lora)
    for n, p in lora:
        scale = ref_params[n].grad.abs().max().item()
        torch.testing.assert_close(p.grad, ref_params[n].grad, atol=GRAD_TOL * scale, rtol=GRAD_TOL)
    patches.revert(model)
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, modeling_mistral.MistralAttention))


def test_registry_dispatch_options_and_errors(monkeypatch):
    assert {t: patches.adapter_for(t) for t in TYPES} == {"llama": llama, "mistral": mistral, "qwen2": qwen2,
                                                           "qwen2_moe": qwen2, "qwen3": qwen3, "qwen3_moe": qwen3}
    supported = r"supported: llama, mistral, qwen2, qwen2_moe, qwen3, qwen3_moe"
    with pytest.raises(NotImplementedError, match=r"model_type='gpt2'; " + supported):
        patches.apply("gpt2")
    with pytest.raises(NotImplementedError, match=r"model_type='bert'; " + supported):
        patches.apply(types.SimpleNamespace(config=types.SimpleNamespace(model_type="bert")))
    with pytest.raises(TypeError, match=r"unknown option\(s\) windw.*accept moe_sliding_window, version"):
        patches.apply("llama", windw=4)
    # Options go only where accepted: llama.apply() takes no moe_sliding_window, and must not receive it.
    patches.apply("llama", version="v1", moe_sliding_window=False)
    assert llama._PATCHER.options["version"] == "v1" and "moe_sliding_window" not in llama._PATCHER.options
    used, real = set(), interface._kernels
    monkeypatch.setattr(interface, "_kernels", lambda version: used.add(version) or real(version))
    with torch.no_grad():
        build("llama")(left_padded((5,))[0])
    assert used == {"v1"}
    patches.apply("qwen2_moe", moe_sliding_window=False)
    assert qwen2._PATCHER.options == {"version": "auto", "moe_sliding_window": False}
    patches.apply("qwen2_moe")
    assert qwen2._PATCHER.options["moe_sliding_window"] is True
    patches.apply("qwen2", version="v1")
    patches.revert("qwen2_moe")  # a full revert also resets the options
    assert qwen2._PATCHER.options == {"version": "auto", "moe_sliding_window": True}
    with pytest.raises(ValueError, match=r"no Qwen2Attention, Qwen2MoeAttention module in LlamaForCausalLM"):
        qwen2.apply(build("llama"))


# ----------------------------------------------------------------------------------------------
# What the patch fixes, what it refuses, and how it calls the kernel
# ----------------------------------------------------------------------------------------------

def test_qwen2_moe_sliding_window_stock_flash_vs_eager_vs_patched(monkeypatch):
    """Qwen2-MoE never passes sliding_window to the attention function. Stock eager honours the window
    through its mask; Transformers' stock flash path (flash_attention_forward, here on hf_flashattn's
    kernels) ignores it; the patch applies it, to eager-built and flash-built models alike.
    moe_sliding_window=False reproduces the stock flash path (on a flash-built model: on an eager-built
    one the 4D mask carries the window, and the patch refuses to contradict it)."""
    monkeypatch.setitem(AttentionInterface._global_mapping, NAME, flash_attention_forward)  # no module fallback
    fa_utils._loaded_implementation = None
    eager, patched = twins("qwen2_moe")
    flash_built = build("qwen2_moe", NAME, eager.state_dict())
    assert eager.model.layers[0].self_attn.sliding_window == WINDOW
    patches.apply(patched)
    ids = left_padded((24,))[0]
    with torch.no_grad():
        ref, stock_flash, ours_eager_built = (m(ids).logits for m in (eager, flash_built, patched))
        patches.apply(flash_built)
        ours_flash_built = flash_built(ids).logits
        patches.apply(flash_built, moe_sliding_window=False)
        no_window = flash_built(ids).logits
        with pytest.raises(ValueError, match=r"Qwen2MoeAttention .* not a causal padding/packing mask with this"):
            patched(ids)
    d_flash = report("qwen2_moe stock flash path vs stock eager", stock_flash, ref)
    report("qwen2_moe patched (eager-built) vs stock eager", ours_eager_built, ref)
    report("qwen2_moe patched (flash-built) vs stock eager", ours_flash_built, ref)
    report("qwen2_moe patched, moe_sliding_window=False, vs stock flash path", no_window, stock_flash)
    assert d_flash > 1e-2, "the window does not change the output: the comparison is vacuous"
    torch.testing.assert_close(ours_eager_built, ref, **TOL)
    torch.testing.assert_close(ours_flash_built, ref, **TOL)
    torch.testing.assert_close(no_window, stock_flash, **TOL)


def test_custom_4d_mask_is_refused_with_a_clear_error():
    """A 4D mask the kernel cannot express (here: bidirectional) must not be silently replaced by a
    causal one: the unpatched model accepts it, the patched one raises."""
    model = build("llama")
    ids = left_padded((10,))[0]
    bidirectional = torch.zeros(1, 1, 10, 10, device=DEVICE)
    with torch.no_grad():
        model(ids, attention_mask=bidirectional)
        patches.apply(model)
        with pytest.raises(ValueError, match=r"LlamaAttention \(patched by hf_flashattn.patches\) received a 4D "
                                             r"attention mask that is not a causal padding/packing mask"):
            model(ids, attention_mask=bidirectional)
        with pytest.raises(ValueError, match=r"adds a bias"):
            model(ids, attention_mask=torch.full((1, 1, 10, 10), -1.0, device=DEVICE).tril())


def test_rotary_on_natural_layout_matches_transformers_bitwise():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 7, 4, 16, generator=g), torch.randn(2, 7, 2, 16, generator=g)
    rotary = modeling_llama.LlamaRotaryEmbedding(LlamaConfig(**TINY))
    cos, sin = rotary(q, torch.arange(3, 10).expand(2, -1))
    ref_q, ref_k = modeling_llama.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    got_q, got_k = _common.apply_rotary(q, k, cos, sin)
    assert torch.equal(got_q, ref_q.transpose(1, 2)) and torch.equal(got_k, ref_k.transpose(1, 2))


def test_kernel_gets_projections_and_cache_without_copies(monkeypatch):
    """No repeat_kv, no transposed copies: V reaches flash_attn_func as a view of v_proj's output
    (B, S, Hkv, D); with a cache, K and V are (B, S, Hkv, D) views of the cache's own storage."""
    model = build("llama")
    patches.apply(model)
    seen, v_out = [], []
    real = interface.flash_attn_func
    monkeypatch.setattr(interface, "flash_attn_func",
                        lambda q, k, v, **kw: seen.append((q, k, v)) or real(q, k, v, **kw))
    model.model.layers[0].self_attn.v_proj.register_forward_hook(lambda mod, inp, out: v_out.append(out))
    ids = left_padded((12,))[0]
    with torch.no_grad():
        model(ids, use_cache=False)
        q, k, v = seen[0]
        assert q.shape == (1, 12, 4, 16) and k.shape == v.shape == (1, 12, 2, 16)
        assert v.data_ptr() == v_out[0].data_ptr() and q.is_contiguous() and k.is_contiguous()
        seen.clear()
        out = model(ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values  # 5.24 names it cache, 5.17 past_key_values
    q, k, v = seen[0]
    layer = cache.layers[0]
    assert k.shape == v.shape == (1, 12, 2, 16) and k.stride(-1) == 1
    assert k.data_ptr() == layer.keys.data_ptr() and v.data_ptr() == layer.values.data_ptr()
