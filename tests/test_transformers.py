"""attn_implementation="flashattn_custom" end to end in Transformers, against "eager".

Tiny random fp32 models on the CPU (the Triton kernels run through the interpreter there):
hidden 64, 2 layers, 4 query heads / 2 key-value heads (GQA), head_dim 16, vocab 100, sequences
of at most 32 tokens. Every model test also checks, by counting calls, that hf_flashattn's
flash_attn_func / flash_attn_varlen_func did the attention, so a silent fallback fails.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import _attn_testing

import hf_flashattn  # before transformers: sets TRITON_INTERPRET on the CPU, installs the registration hook
from hf_flashattn import interface
from hf_flashattn.kernels import decode as decode_kernels
from hf_flashattn.integrations import transformers as integration

import transformers
from transformers import (AutoModelForCausalLM, DataCollatorWithFlattening, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config, StaticCache)
from transformers import modeling_flash_attention_utils as fa_utils
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.modeling_utils import AttentionInterface

NAME = hf_flashattn.ATTN_IMPLEMENTATION
# The CPU (interpreter) is the target; on a GPU machine the same fp32 checks run on the GPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not hf_flashattn.is_interpreting() else "cpu")
PAD = 0
# fp32 on both sides: differences come from summation order only (~1e-6); 1e-4 leaves room for the
# interpreter's tiled accumulation while any masking/window/packing mistake is orders larger.
TOL = dict(atol=1e-4, rtol=1e-4)
GRAD_TOL = 1e-4  # relative to each gradient tensor's largest entry
WINDOW = 8  # shorter than every sequence below, so sliding layers really slide
PADDED_LENGTHS = (32, 21, 9)
PACKED_LENGTHS = (20, 13, 9)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=100, max_position_embeddings=128,
            pad_token_id=PAD, bos_token_id=1, eos_token_id=2)

# A fresh config per model: from_config() writes attn_implementation into the config object it is given.
CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=WINDOW),                  # every layer slides
    "qwen2": lambda: Qwen2Config(**TINY, use_sliding_window=True, sliding_window=WINDOW,
                                 max_window_layers=1),                                # layer 1 slides
    "qwen3": lambda: Qwen3Config(**TINY),
}
FAMILIES = sorted(CONFIGS)


def qwen2_moe_config(use_sliding_window=True):  # layer 0 slides (Qwen2-MoE: layers 0, 2, ... below max_window_layers)
    return Qwen2MoeConfig(**TINY, use_sliding_window=use_sliding_window, sliding_window=WINDOW,
                          max_window_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          shared_expert_intermediate_size=64)


def build(config, impl, state_dict=None, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    assert model.config._attn_implementation == impl
    assert next(model.parameters()).dtype == torch.float32
    return model.to(DEVICE).eval()


def pair(family_or_config):
    """(eager model, flashattn_custom model) with the same weights."""
    make = CONFIGS[family_or_config] if isinstance(family_or_config, str) else family_or_config
    eager = build(make(), "eager")
    return eager, build(make(), NAME, eager.state_dict())


def left_padded(lengths, seed=1):
    return _attn_testing.left_padded(lengths, TINY["vocab_size"], PAD, DEVICE, seed)


def report(name, ours, ref):
    diff = (ours - ref).abs()
    print(f"{name}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}")


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of hf_flashattn's public functions as Transformers' flash path makes them."""
    counts = {"flash_attn_func": 0, "flash_attn_varlen_func": 0, "decode_masked": 0, "decode_lean": 0}
    for fname in ("flash_attn_func", "flash_attn_varlen_func"):
        real = getattr(interface, fname)

        @functools.wraps(real)  # Transformers inspects the signature; wraps() keeps the real one visible
        def counting(*args, _real=real, _fname=fname, **kwargs):
            counts[_fname] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(interface, fname, counting)
    real_masked = interface._decode_with_padding_mask

    def counting_masked(*args, **kwargs):  # decode steps with a padding mask (None: left to the flash path)
        out = real_masked(*args, **kwargs)
        counts["decode_masked"] += out is not None
        return out

    monkeypatch.setattr(interface, "_decode_with_padding_mask", counting_masked)
    real_lean = decode_kernels.decode_bhsd

    def counting_lean(*args, **kwargs):  # plain decode steps (no mask) in Transformers' layout
        counts["decode_lean"] += 1
        return real_lean(*args, **kwargs)

    monkeypatch.setattr(decode_kernels, "decode_bhsd", counting_lean)
    # lazy_import_flash_attention caches the resolved functions by name: forget them, so that NAME
    # resolves again through the adapter and picks up the counting wrappers.
    fa_utils._loaded_implementation = None
    yield counts
    fa_utils._loaded_implementation = None


@pytest.fixture(params=["v2", "v1"])
def kernel_version(request, monkeypatch):
    """Runs a model test with hf_flashattn.use_version(<version>) (how flashattn_custom is switched to
    another kernel generation) and checks that exactly that version's kernels ran."""
    used = set()
    real = interface._kernels

    def recording(version):
        used.add(version)
        return real(version)

    monkeypatch.setattr(interface, "_kernels", recording)
    with hf_flashattn.use_version(request.param):
        yield request.param
    assert used == {request.param}, f"kernels used: {used}, expected {request.param}"


# ----------------------------------------------------------------------------------------------
# Registration and the adapter on Transformers' internals
# ----------------------------------------------------------------------------------------------

def test_name_is_registered_with_attention_and_mask_interfaces():
    assert integration.is_registered()
    assert NAME in AttentionInterface._global_mapping
    mask_fn = AttentionMaskInterface._global_mapping[NAME]
    assert getattr(mask_fn, "__hf_flashattn__", False)
    # same answers as Transformers' flash mask where the mask already spans the keys ...
    full = torch.ones(2, 7, dtype=torch.bool)
    assert mask_fn(2, 1, 7, attention_mask=full) is None and flash_attention_mask(2, 1, 7, attention_mask=full) is None
    padded = full.clone()
    padded[0, :3] = False
    assert torch.equal(mask_fn(2, 1, 7, attention_mask=padded), flash_attention_mask(2, 1, 7, attention_mask=padded))
    # ... and a static cache's mask (shorter than the cache) right-padded with zeros to the cache's size, so
    # that a compiled decode step sees the same input size every step
    grown = mask_fn(2, 1, 12, attention_mask=padded)
    assert grown.shape == (2, 12) and grown.dtype == padded.dtype
    assert torch.equal(grown[:, :7], padded) and not grown[:, 7:].any()
    # a prefill (several query tokens, aligned with the mask's last columns) keeps Transformers' mask
    assert torch.equal(mask_fn(2, 3, 12, attention_mask=padded), flash_attention_mask(2, 3, 12, attention_mask=padded))


def test_lazy_imports_adapter_resolves_our_functions():
    """The loud-failure test for Transformers internals: if the flash loader stops going through the
    adapter, or the adapter stops returning our functions, this fails."""
    assert hasattr(fa_utils._lazy_imports, "__hf_flashattn_original__")
    fns = fa_utils._lazy_imports(NAME, None, allow_all_kernels=False)
    assert fns == (interface.flash_attn_func, interface.flash_attn_varlen_func, None, fa_utils._pad_input,
                   fa_utils._unpad_input)
    fa_utils._loaded_implementation = None
    try:
        loaded = fa_utils.lazy_import_flash_attention(NAME)[0]
        assert loaded[:3] == (interface.flash_attn_func, interface.flash_attn_varlen_func, None)
        assert fa_utils._loaded_implementation == NAME
    finally:
        fa_utils._loaded_implementation = None
    # The keywords Transformers will pass, decided by inspecting our varlen signature.
    supports = fa_utils._lazy_define_process_function(interface.flash_attn_varlen_func).keywords["supports_mapping"]
    for key in ("dropout_p", "window_size", "softcap", "deterministic", "max_seqlen_q", "max_seqlen_k"):
        assert supports[key], key


def test_lazy_imports_adapter_delegates_other_names():
    seen = []

    def original(implementation, attention_wrapper=None, allow_all_kernels=False):
        seen.append((implementation, attention_wrapper, allow_all_kernels))
        return "original"

    adapter = integration._make_lazy_imports(original, fa_utils)
    assert adapter("flash_attention_2", "wrapper", allow_all_kernels=True) == "original"
    assert seen == [("flash_attention_2", "wrapper", True)]
    assert adapter(NAME)[1] is interface.flash_attn_varlen_func and len(seen) == 1


def test_register_is_idempotent():
    adapter, forward = fa_utils._lazy_imports, AttentionInterface._global_mapping[NAME]
    hf_flashattn.register()
    hf_flashattn.register()
    assert fa_utils._lazy_imports is adapter
    assert not hasattr(adapter.__hf_flashattn_original__, "__hf_flashattn_original__")  # wrapped once
    assert AttentionInterface._global_mapping[NAME] is forward


def test_register_fails_loudly_when_internals_change(monkeypatch):
    version = re.escape(f"transformers {transformers.__version__}")

    def changed(implementation, attention_wrapper=None):  # a Transformers release changed the parameters
        raise AssertionError("must not be called")

    monkeypatch.setattr(fa_utils, "_lazy_imports", changed)
    with pytest.raises(RuntimeError, match=version + r".*_lazy_imports takes \('implementation', 'attention_wrapper'\)"):
        hf_flashattn.register()
    assert fa_utils._lazy_imports is changed  # nothing half-installed
    monkeypatch.delattr(fa_utils, "_lazy_imports")
    with pytest.raises(RuntimeError, match=version + r".*_lazy_imports no longer exists"):
        hf_flashattn.register()


def test_register_forgets_a_stale_cached_resolution(calls):
    """transformers 5.17 caches the name before resolving it: a model built with NAME before
    registration leaves NAME cached with someone else's functions. register() must clear that."""
    eager, ours = pair("llama")
    fa_utils._loaded_implementation, fa_utils._flash_fn, fa_utils._flash_varlen_fn = NAME, None, None
    hf_flashattn.register()
    ids, mask = left_padded(PADDED_LENGTHS)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[mask.bool()],
                                   eager(ids, attention_mask=mask).logits[mask.bool()], **TOL)
    assert calls["flash_attn_varlen_func"] == 2


def test_switching_between_implementations(calls):
    """lazy_import_flash_attention keeps one implementation at a time; each forward asks again by
    name, so ours must come back after another flash implementation (or eager) ran in between."""
    eager, ours = pair("llama")
    ids = left_padded((16,))[0]
    with torch.no_grad():
        ref = eager(ids).logits
        torch.testing.assert_close(ours(ids).logits, ref, **TOL)
        fa_utils._loaded_implementation = "flash_attention_2"  # as if another model had just run FA2

        def poisoned(*args, **kwargs):
            raise AssertionError("the previously loaded implementation was used")

        fa_utils._flash_fn = fa_utils._flash_varlen_fn = poisoned
        torch.testing.assert_close(ours(ids).logits, ref, **TOL)
        torch.testing.assert_close(eager(ids).logits, ref, **TOL)
        torch.testing.assert_close(ours(ids).logits, ref, **TOL)
    assert calls["flash_attn_func"] == 3 * 2


def _run_python(code):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_import_is_lazy_and_registers_when_transformers_loads():
    out = _run_python("""
        import sys, warnings
        warnings.simplefilter("error", RuntimeWarning)    # our hook reports failures as RuntimeWarning
        import hf_flashattn
        from hf_flashattn import _lazy_register
        from hf_flashattn.integrations import transformers as integration
        assert not [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")], "eager import"
        assert _lazy_register._finder in sys.meta_path
        from transformers import AutoModelForCausalLM, LlamaConfig  # lazy: modeling_utils not imported yet
        assert "transformers.modeling_utils" not in sys.modules and not integration.is_registered()
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=100)
        # The user's path: resolving the model class imports modeling_utils, whose import registers the name.
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="flashattn_custom")
        assert model.config._attn_implementation == "flashattn_custom"
        assert integration.is_registered()
        assert _lazy_register._finder is None
        assert not any(isinstance(f, _lazy_register._RegisterAfterImport) for f in sys.meta_path)
        assert "exec_module" not in vars(sys.modules["transformers.modeling_utils"].__loader__)
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_import_after_transformers_registers_immediately():
    out = _run_python("""
        import sys, warnings
        warnings.simplefilter("error", RuntimeWarning)
        import transformers.modeling_utils
        import hf_flashattn
        from hf_flashattn import _lazy_register
        from hf_flashattn.integrations import transformers as integration
        assert integration.is_registered() and _lazy_register._finder is None
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=100)
        assert LlamaForCausalLM._from_config(cfg, attn_implementation="flashattn_custom").config._attn_implementation \
            == "flashattn_custom"
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_hook_warns_instead_of_breaking_transformers_when_internals_change():
    out = _run_python("""
        import warnings
        import transformers.modeling_flash_attention_utils as fa_utils   # does not import modeling_utils
        del fa_utils._lazy_imports                                        # a release that renamed it
        import hf_flashattn
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import transformers.modeling_utils                            # must still import (binds transformers)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert any("flashattn_custom" in m and "transformers " + transformers.__version__ in m for m in messages), messages
        try:
            hf_flashattn.register()
        except RuntimeError as e:
            assert "_lazy_imports no longer exists" in str(e), e
        else:
            raise AssertionError("register() did not raise")
        print("ok")
    """)
    assert out.strip().endswith("ok")


# ----------------------------------------------------------------------------------------------
# Ways to ask for the implementation
# ----------------------------------------------------------------------------------------------

def _check_matches_eager(model, eager, calls):
    ids, mask = left_padded(PADDED_LENGTHS)
    with torch.no_grad():
        ours, ref = model(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits
    report(model.config._attn_implementation, ours[mask.bool()], ref[mask.bool()])
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], **TOL)
    assert calls["flash_attn_varlen_func"] == model.config.num_hidden_layers


def test_from_pretrained(tmp_path, calls):
    eager = build(LlamaConfig(**TINY), "eager")
    eager.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME).to(DEVICE).eval()
    assert model.config._attn_implementation == NAME
    _check_matches_eager(model, eager, calls)


def test_from_config_and_config_argument(calls):
    eager = build(LlamaConfig(**TINY), "eager")
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY), attn_implementation=NAME).to(DEVICE).eval()
    model.load_state_dict(eager.state_dict())
    _check_matches_eager(model, eager, calls)
    model = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation=NAME)).eval()
    assert model.config._attn_implementation == NAME


def test_set_attn_implementation(calls):
    eager = build(LlamaConfig(**TINY), "eager")
    model = build(LlamaConfig(**TINY), "sdpa", eager.state_dict())
    model.set_attn_implementation(NAME)
    assert model.config._attn_implementation == model.model.config._attn_implementation == NAME
    _check_matches_eager(model, eager, calls)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        model(left_padded((9,))[0])
    assert calls["flash_attn_varlen_func"] + calls["flash_attn_func"] == model.config.num_hidden_layers  # unchanged


def test_name_without_registration_fails(monkeypatch):
    """Without our adapter the flash loader rejects the name: proves the adapter is what makes it work."""
    monkeypatch.setattr(fa_utils, "_lazy_imports", fa_utils._lazy_imports.__hf_flashattn_original__)
    fa_utils._loaded_implementation = None
    try:
        with pytest.raises(ValueError, match=f"Could not find .*{NAME}"):
            build(LlamaConfig(**TINY), NAME)
    finally:
        fa_utils._loaded_implementation = None


# ----------------------------------------------------------------------------------------------
# Numerics per model family: padding, packing, generate, gradients
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_logits_match_eager(family, calls, kernel_version):
    eager, ours = pair(family)
    _check_matches_eager(ours, eager, calls)


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
        cache = StaticCache(config=config, max_cache_len=24)
        with torch.no_grad():
            tok = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits[:, -1:].argmax(-1)
            fwd = torch.compile(model.forward, fullgraph=True, backend="aot_eager") if compiled else model.forward
            logits.append(fwd(input_ids=tok, attention_mask=step_mask, past_key_values=cache,
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
