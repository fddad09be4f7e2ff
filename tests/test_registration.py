"""attn_implementation="flashattn_custom" in Transformers: the registration, the adapter on Transformers'
internals (made to fail loudly when a release changes them), the lazy import hook, and the ways to ask for the
implementation (from_pretrained, from_config, the config argument, set_attn_implementation).

The models are the tiny random-weight fp32 models of _hf_testing; their numerics per family are test_transformers.py's.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import hf_flashattn  # before transformers: sets TRITON_INTERPRET on the CPU, installs the registration hook
from hf_flashattn import interface
from hf_flashattn.integrations import transformers as integration
from _hf_testing import DEVICE, NAME, PADDED_LENGTHS, TINY, TOL, build, check_matches_eager, left_padded, pair

import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers import modeling_flash_attention_utils as fa_utils
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.modeling_utils import AttentionInterface


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

def test_from_pretrained(tmp_path, calls):
    eager = build(LlamaConfig(**TINY), "eager")
    eager.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME).to(DEVICE).eval()
    assert model.config._attn_implementation == NAME
    check_matches_eager(model, eager, calls)


def test_from_config_and_config_argument(calls):
    eager = build(LlamaConfig(**TINY), "eager")
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY), attn_implementation=NAME).to(DEVICE).eval()
    model.load_state_dict(eager.state_dict())
    check_matches_eager(model, eager, calls)
    model = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation=NAME)).eval()
    assert model.config._attn_implementation == NAME


def test_set_attn_implementation(calls):
    eager = build(LlamaConfig(**TINY), "eager")
    model = build(LlamaConfig(**TINY), "sdpa", eager.state_dict())
    model.set_attn_implementation(NAME)
    assert model.config._attn_implementation == model.model.config._attn_implementation == NAME
    check_matches_eager(model, eager, calls)
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

