"""Decode benchmark (issue 6): one new query token against a long KV cache, and end-to-end generate().

    python benchmarks/bench_decode.py --out DIR [--skip-generate] [--skip-kernels] [--cache static] [--budget-s S]

Kernel part: batch 1 and 8, GQA 32/8, d128, bf16, cache 4k / 32k / 128k. Achieved bandwidth = K and V
bytes read (2 · B · L · Hk · D · 2) ÷ time, against the measured copy bandwidth; time against SDPA (the best
of its backends that runs the shape) and compiled FlexAttention, in the same process.
Generate part: a ~1B-parameter random-weight Llama-architecture model, prompts of 8k and 32k tokens,
64 new tokens, eager / sdpa / flashattn_custom; decode tokens/s = 63 / (t(64 new) - t(1 new)).
Writes decode.json and decode.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hf_flashattn as fa  # noqa: E402
from hf_flashattn.kernels import decode  # noqa: E402


def copy_bandwidth():
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda").random_(0, 255)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() / ms / 1e9


def kernel_rows(bw):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    H, Hk, D = 32, 8, 128
    for B in (1, 8):
        for L in (4096, 32768, 131072):
            q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16)
            kc = torch.randn(B, L, Hk, D, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn(B, L, Hk, D, device="cuda", dtype=torch.bfloat16)
            qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
            gbytes = 2 * B * L * Hk * D * 2 / 1e9
            impls = {"ours-kvcache": lambda: fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=L),
                     "ours-flash_attn_func": lambda: fa.flash_attn_func(q, kc, vc)}
            # generate()'s per-layer call in Transformers' layout: launched, the splits are merged in-kernel
            # (one launch); captured in a graph, by the combine kernel (as the two rows above)
            qb, kb, vb = (x.transpose(1, 2).contiguous() for x in (q, kc, vc))
            impls["ours-bhsd"] = lambda: decode.decode_bhsd(qb, kb, vb, D ** -0.5, (-1, 0), 0.0)
            for name, be in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
                             ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-math", SDPBackend.MATH)):
                def run(be=be):
                    with sdpa_kernel(be):
                        return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
                impls[name] = run
            impls["flex"] = lambda: flex(qt, kt, vt, enable_gqa=True)
            def timed(name, f):
                try:
                    f()
                    # ms: launched from Python one call after another (CPU launch cost included when the
                    # kernel is shorter); graph_ms: the same call replayed from a CUDA graph (GPU time, as
                    # in a compiled static-cache decode loop)
                    ms = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
                    row = dict(impl=name, B=B, L=L, ms=ms, tb_s=gbytes / ms, frac_copy_bw=gbytes / ms / bw)
                    try:
                        gms = triton.testing.do_bench_cudagraph(f, rep=100, return_mode="median")
                        row.update(graph_ms=gms, graph_tb_s=gbytes / gms, graph_frac_copy_bw=gbytes / gms / bw)
                    except Exception as e:
                        row["graph_error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    rows.append(row)
                except Exception as e:
                    rows.append(dict(impl=name, B=B, L=L, ms=None, error=f"{type(e).__name__}: {str(e)[:120]}"))
            for name, f in impls.items():
                timed(name, f)
            # the in-kernel merge taking the tile's rows all at once (TUNE["merge_rows"], off by default):
            # launched only differs (in a graph the combine kernel merges)
            decode.set_tune(merge_rows=True)
            try:
                timed("ours-bhsd-rows-at-once", impls["ours-bhsd"])
            finally:
                decode.set_tune(merge_rows=False)
            print(" ".join(f"{r['impl']}={r['ms']:.3f}ms" if r.get("ms") else f"{r['impl']}=–"
                           for r in rows[-len(impls) - 1:]), f"B={B} L={L}", flush=True)
            del q, kc, vc, qb, kb, vb
            torch.cuda.empty_cache()
    return rows


def generate_rows(budget_s, t0, save=lambda rows: None, cache="dynamic", reps=3, prompts=(8192, 32768), eager=True):
    """cache "static": generate(cache_implementation="static"), which Transformers compiles (CUDA graphs
    with "reduce-overhead"): decode steps without the host cost of Python launches.
    The implementations are timed in turns, `reps` rounds (best of the rounds for each): a decode step is
    bound by the host, whose speed drifts over a run; in turns, the drift hits every implementation alike."""
    import hf_flashattn  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=40960)
    rows = []
    for prompt in prompts:
        ids = torch.randint(1, 32000, (1, prompt), device="cuda")
        # eager only at 8k: its 32k run materialises 32 x 32k scores a layer and would spend the budget
        impls = ("flashattn_custom", "sdpa") + (("eager",) if eager and cache == "dynamic" and prompt <= 8192 else ())
        gkw = dict(do_sample=False, pad_token_id=0)
        if cache == "static":
            gkw["cache_implementation"] = "static"
        models, times, errors = {}, {impl: {1: [], 64: []} for impl in impls}, {}
        for impl in impls:
            if time.time() - t0 > budget_s:
                errors[impl] = "skipped: time budget"
                continue
            torch.manual_seed(0)
            try:
                models[impl] = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), attn_implementation=impl,
                                                                dtype=torch.bfloat16).cuda().eval()
                # warm-up: the first generate() compiles/autotunes kernels and initialises cuBLAS/cuDNN
                # (static cache: at the timed prompt length, so that the compiled graphs are the timed ones)
                warm = ids if cache == "static" else ids[:, :1024]
                models[impl].generate(warm, max_new_tokens=4, min_new_tokens=4, **gkw)
            except Exception as e:  # e.g. a compile failure of the static-cache path: recorded, not fatal
                errors[impl] = f"{type(e).__name__}: {str(e)[:200]}"
                models.pop(impl, None)
        for _ in range(reps):
            for impl, model in models.items():
                if impl in errors or time.time() - t0 > budget_s:
                    continue
                try:
                    for new in (1, 64):
                        torch.cuda.synchronize()
                        s = time.time()
                        model.generate(ids, max_new_tokens=new, min_new_tokens=new, **gkw)
                        torch.cuda.synchronize()
                        times[impl][new].append(time.time() - s)
                except torch.cuda.OutOfMemoryError:
                    errors[impl] = "OOM"
                except Exception as e:  # noqa: BLE001
                    errors[impl] = f"{type(e).__name__}: {str(e)[:200]}"
        for impl in impls:
            tm = times[impl]
            if impl in errors or not tm[64]:
                rows.append(dict(impl=impl, prompt=prompt, cache=cache, error=errors.get(impl, "not timed")))
            else:
                t1, t64 = min(tm[1]), min(tm[64])
                rows.append(dict(impl=impl, prompt=prompt, cache=cache, decode_tok_s=63 / (t64 - t1), prefill_s=t1,
                                 generate_64_tok_s=64 / t64, times=tm, rounds=len(tm[64])))
            print(rows[-1], flush=True)
        save(rows)
        models.clear()
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--cache", default="dynamic", choices=("dynamic", "static"), help="generate()'s KV cache")
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--prompts", default="8192,32768", help="generate() prompt lengths, comma-separated")
    ap.add_argument("--no-eager", action="store_true", help="generate(): leave eager attention out")
    ap.add_argument("--rounds", type=int, default=3, help="generate(): rounds of the implementations in turns")
    args = ap.parse_args()
    t0 = time.time()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=os.environ.get("COMMIT", "unknown"), date=time.strftime("%Y-%m-%d"))
    bw = copy_bandwidth()
    rows = [] if args.skip_kernels else kernel_rows(bw)

    def save(gen):  # after the kernel part and after every generate row: a run cut short keeps its numbers
        with open(os.path.join(args.out, "decode.json"), "w") as f:
            json.dump(dict(meta=meta, copy_tb_s=bw, kernel=rows, generate=gen), f, indent=1)

    save([])
    gen = [] if args.skip_generate else generate_rows(
        args.budget_s, t0, save, args.cache, reps=args.rounds, prompts=tuple(int(p) for p in args.prompts.split(",")),
        eager=not args.no_eager)
    save(gen)
    md = [f"# Decode — {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}",
          "", f"copy bandwidth {bw:.2f} TB/s; GQA 32/8, d128, bf16, one query token", "",
          "launched: one Python call after another (CPU launch cost included); graph: replayed from a CUDA graph", "",
          "| B | cache | impl | launched ms | TB/s | of copy bw | graph ms | TB/s | of copy bw |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("ms"):
            g = (f"{r['graph_ms']:.3f} | {r['graph_tb_s']:.2f} | {r['graph_frac_copy_bw']:.0%}" if r.get("graph_ms")
                 else "– | – | –")
            md.append(f"| {r['B']} | {r['L']} | {r['impl']} | {r['ms']:.3f} | {r['tb_s']:.2f} | "
                      f"{r['frac_copy_bw']:.0%} | {g} |")
    md += ["", f"generate(), {args.cache} cache:", "",
           "| prompt | impl | decode tokens/s (63 / (t64 − t1)) | generate tokens/s (64 / t64) | prefill s |",
           "|---|---|---|---|---|"]
    for r in gen:
        if "decode_tok_s" in r:
            md.append(f"| {r['prompt']} | {r['impl']} | {r['decode_tok_s']:.1f} | {r['generate_64_tok_s']:.1f} | "
                      f"{r['prefill_s']:.2f} |")
        else:
            md.append(f"| {r['prompt']} | {r['impl']} | {r.get('error', r.get('skipped'))} | – | – |")
    with open(os.path.join(args.out, "decode.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
