"""Shared pieces of the Transformers tests (test_transformers.py, test_registration.py): tiny random-weight
model configs, builders and left-padded batches. The fixtures that count hf_flashattn's calls and pin a kernel
version are in conftest.py."""
from __future__ import annotations

import torch

import _attn_testing

import hf_flashattn  # before transformers: sets TRITON_INTERPRET on the CPU, installs the registration hook

from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config

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


def cache_kwargs(model, cache) -> dict:
    """The cache as the keyword the model's forward takes: `cache` from Transformers 5.24 (which deprecates
    `past_key_values`, to be removed in 5.40), `past_key_values` before (5.17)."""
    import inspect
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def left_padded(lengths, seed=1):
    return _attn_testing.left_padded(lengths, TINY["vocab_size"], PAD, DEVICE, seed)


def report(name, ours, ref):
    diff = (ours - ref).abs()
    print(f"{name}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}")


def check_matches_eager(model, eager, calls):
    """Left-padded logits of `model` against `eager`, and every layer through flash_attn_varlen_func."""
    ids, mask = left_padded(PADDED_LENGTHS)
    with torch.no_grad():
        ours, ref = model(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits
    report(model.config._attn_implementation, ours[mask.bool()], ref[mask.bool()])
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], **TOL)
    assert calls["flash_attn_varlen_func"] == model.config.num_hidden_layers

