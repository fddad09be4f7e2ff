"""Where a decode step's time goes in Transformers (issue 6): the ~1B random Llama of bench_decode.py,
an 8k prompt, then decode steps (model forward of one token with the DynamicCache), for
flashattn_custom and sdpa: wall time per step, and the host-side (Python) profile of flashattn_custom's
steps (cProfile, top functions by own time), to show whether a step is bound by the GPU or by the host.
The step's parts, timed in turns (one variant after the other drifts too much to compare):
benchmarks/host_overhead.py.

    python benchmarks/profile_decode.py --out DIR
Writes profile.json and profile.txt.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hf_flashattn  # noqa: E402,F401


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def steps(model, ids, n, prof=None, mask=None):
    """Prefill ids, then time n decode steps (DynamicCache). mask: an all-ones (1, >= len + n) attention
    mask passed along, as generate() does; prof: a cProfile enabled for the decode steps only."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    L = ids.shape[1]
    extra = (lambda i: {}) if mask is None else (lambda i: {"attention_mask": mask[:, :L + i]})
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, **extra(0))
        tok = out.logits[:, -1:].argmax(-1)
        _sync()
        if prof is not None:
            prof.enable()
        times = []
        for i in range(n):
            t = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, **extra(i + 1))
            tok = out.logits[:, -1:].argmax(-1)
            _sync()
            times.append(time.perf_counter() - t)
        if prof is not None:
            prof.disable()
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--prompt", type=int, default=8192)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=40960)
    ids = torch.randint(1, 32000, (1, args.prompt), device="cuda")
    res, text = {}, []
    for impl in ("flashattn_custom", "sdpa"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), attn_implementation=impl,
                                                 dtype=torch.bfloat16).cuda().eval()
        steps(model, ids, 4)  # warm-up at the same length (compile, autotune, cuBLAS)
        t = steps(model, ids, 32)
        res[impl] = dict(step_ms_median=1e3 * sorted(t)[len(t) // 2], step_ms_min=1e3 * min(t))
        # the same with an all-ones attention mask, as generate() passes it
        mask = torch.ones(1, args.prompt + 64, dtype=torch.long, device="cuda")
        tm = steps(model, ids, 32, mask=mask)
        res[impl]["masked_step_ms_median"] = 1e3 * sorted(tm)[len(tm) // 2]
        prof = cProfile.Profile()
        steps(model, ids, 16, prof)
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
        text += [f"===== {impl}: decode step median {res[impl]['step_ms_median']:.2f} ms", s.getvalue()]
        print(text[-2], text[-1][:6000], sep="\n", flush=True)
        del model
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, commit=os.environ.get("COMMIT"),
                       prompt=args.prompt, results=res), f, indent=1)
    with open(os.path.join(args.out, "profile.txt"), "w") as f:
        f.write("\n".join(text))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
