"""Host time of the pieces of one decode step's attention (issue 6: generate() with a dynamic cache is bound
by the host, one Python call after another). Each piece is called N times in a loop; the GPU work of a call
(~10 us at these sizes) is shorter than its host time, so time per call = host time per call.

Pieces: torch.empty; the FastLaunch cache key; the decode kernel launched through Triton's JIT entry point,
through FastLaunch, and straight through the CompiledKernel; decode.decode_bhsd (one launch, and with the
combine kernel: two; at 1k keys, where the host is slower than the kernel, with its direct launch and
through FastLaunch); flash_attn_func; the
Transformers attention functions of flashattn_custom and sdpa on the same module and tensors. Then whole
decode steps of the ~1B Llama (8k prompt, DynamicCache, all-ones mask as generate() passes it) for
flashattn_custom and sdpa, and flashattn_custom with parts left out, interleaved round by round so that
drift of the machine hits every variant alike.

    python benchmarks/host_overhead.py --out DIR      (writes host_overhead.json)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hf_flashattn as fa  # noqa: E402
from hf_flashattn.kernels import _common as C, decode  # noqa: E402


def per_call_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t) / n


def pieces():
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    B, H, Hk, D, L = 1, 32, 8, 128, 8192
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hk, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hk, L, D, device="cuda", dtype=torch.bfloat16)
    res = {}
    res["torch.empty (1, 1, 32, 128)"] = per_call_us(lambda: torch.empty((1, 1, 32, 128), dtype=torch.bfloat16,
                                                                        device="cuda"))
    # capture one launch's arguments
    seen = {}
    real = decode._decode_launch

    class Rec:
        constexprs = real.constexprs

        def __call__(self, grid, *args, **meta):
            seen.update(grid=grid, args=args, meta=meta)
            return real(grid, *args, **meta)
    decode._decode_launch = Rec()
    try:
        decode.decode_bhsd(q, k, v, D ** -0.5, (-1, 0), 0.0)
    finally:
        decode._decode_launch = real
    grid, args, meta = seen["grid"], seen["args"], seen["meta"]
    compiled = real(grid, *args, **meta)
    full = list(args) + [meta.get(n, d) for n, d in real.constexprs]
    res["FastLaunch key"] = per_call_us(lambda: real._key(args, meta, torch.cuda.current_device()))
    res["decode kernel: Triton JIT launch"] = per_call_us(lambda: decode._decode_kernel[grid](*args, **meta))
    res["decode kernel: FastLaunch"] = per_call_us(lambda: real(grid, *args, **meta))
    res["decode kernel: CompiledKernel[grid](*args)"] = per_call_us(lambda: compiled[grid](*full))
    res["decode.decode_bhsd"] = per_call_us(lambda: decode.decode_bhsd(q, k, v, D ** -0.5, (-1, 0), 0.0))
    from unittest import mock
    # at 1k keys the kernel's GPU time (~5 us) is below the host time: these rows measure the host
    k1, v1 = k[:, :, :1024], v[:, :, :1024]
    res["decode.decode_bhsd, 1k keys (direct launch)"] = per_call_us(
        lambda: decode.decode_bhsd(q, k1, v1, D ** -0.5, (-1, 0), 0.0))
    with mock.patch.object(decode, "_direct", lambda *a: None):
        res["decode.decode_bhsd, 1k keys (FastLaunch)"] = per_call_us(
            lambda: decode.decode_bhsd(q, k1, v1, D ** -0.5, (-1, 0), 0.0))
    with mock.patch.object(decode, "FUSED_MERGE", False):
        res["decode.decode_bhsd (two launches)"] = per_call_us(
            lambda: decode.decode_bhsd(q, k, v, D ** -0.5, (-1, 0), 0.0))
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    res["flash_attn_func"] = per_call_us(lambda: fa.flash_attn_func(qt, kt, vt, causal=True))
    cfg = LlamaConfig(hidden_size=H * D, intermediate_size=256, num_hidden_layers=1, num_attention_heads=H,
                      num_key_value_heads=Hk, vocab_size=100)
    pos = torch.full((1, 1), L - 1, device="cuda")   # the keywords a Llama layer passes on a decode step
    for impl in ("flashattn_custom", "sdpa"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=torch.bfloat16).cuda()
        attn = model.model.layers[0].self_attn
        fn = ALL_ATTENTION_FUNCTIONS[impl]
        res[f"attention function {impl}"] = per_call_us(
            lambda: fn(attn, q, k, v, None, dropout=0.0, scaling=attn.scaling, position_ids=pos, use_cache=True))
        del model
    return res


def steps(model, ids, n, mask):
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    L = ids.shape[1]
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, attention_mask=mask[:, :L])
    tok = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    times = []
    for i in range(n):
        t = time.perf_counter()
        out = model(input_ids=tok, past_key_values=cache, use_cache=True, attention_mask=mask[:, :L + i + 1])
        tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def interleaved_steps(rounds=8, n=16, prompt=8192):
    from unittest import mock
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    cfg = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=40960)
    ids = torch.randint(1, 32000, (1, prompt), device="cuda")
    mask = torch.ones(1, prompt + n + 1, dtype=torch.long, device="cuda")
    models = {}
    for impl in ("flashattn_custom", "sdpa"):
        torch.manual_seed(0)
        models[impl] = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), attn_implementation=impl,
                                                        dtype=torch.bfloat16).cuda().eval()

    def no_launch(q, qs, k_cache, ks, v_cache, vs, B, Sq, H, D, *a, **kw):
        return torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device), None, 1

    def no_attention(module, query, key, value, attention_mask, **kwargs):
        return query.transpose(1, 2), None

    variants = {
        "sdpa": ("sdpa", None),
        "flashattn_custom": ("flashattn_custom", None),
        "flashattn_custom/jit-launch": ("flashattn_custom", lambda: mock.patch.object(C, "FAST_LAUNCH", False)),
        "flashattn_custom/two-launch": ("flashattn_custom", lambda: mock.patch.object(decode, "FUSED_MERGE", False)),
        "flashattn_custom/no-direct": ("flashattn_custom", lambda: mock.patch.object(decode, "_direct",
                                                                                    lambda *a: None)),
        "flashattn_custom/no-launch": ("flashattn_custom", lambda: mock.patch.multiple(
            decode, _run=no_launch, _direct=lambda q, k, v, B, H, Sq, D, *a: q.new_empty((B, Sq, H, D)))),
        "flashattn_custom/no-attention": ("flashattn_custom", lambda: mock.patch.dict(
            ALL_ATTENTION_FUNCTIONS._global_mapping, {"flashattn_custom": no_attention})),
        "sdpa/no-attention": ("sdpa", lambda: mock.patch.dict(ALL_ATTENTION_FUNCTIONS._global_mapping,
                                                               {"sdpa": no_attention})),
    }
    times = {name: [] for name in variants}
    with torch.no_grad():
        for r in range(rounds + 1):
            for name, (impl, patch) in variants.items():
                ctx = patch() if patch else None
                if ctx:
                    ctx.start()
                try:
                    t = steps(models[impl], ids, n, mask)
                finally:
                    if ctx:
                        ctx.stop()
                if r > 0:  # round 0 warms every variant up
                    times[name] += t
    return {name: dict(median_ms=1e3 * sorted(t)[len(t) // 2], min_ms=1e3 * min(t)) for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, commit=os.environ.get("COMMIT"))
    res["pieces_us"] = pieces()
    print(json.dumps(res["pieces_us"], indent=1), flush=True)
    res["decode_step_8k"] = interleaved_steps()
    print(json.dumps(res["decode_step_8k"], indent=1), flush=True)
    with open(os.path.join(args.out, "host_overhead.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
