"""Markdown summaries of committed GPU logs (benchmarks/results/*.json), for the README and notes.

    python benchmarks/summarize.py correctness RESULT.json META   # META: a bench.json or env.txt of the same call
    python benchmarks/summarize.py models RESULT.json META
    python benchmarks/summarize.py patches RESULT.json META
    python benchmarks/summarize.py ratios BENCH.json [BENCH.json ...]
    python benchmarks/summarize.py memory BENCH.json              # bench.py's peak-memory table, with its header
"""
from __future__ import annotations

import json
import sys


def _env_meta(path):
    """The env.txt that benchmarks/device_session.sh writes at the start of a device call."""
    lines = open(path).read().splitlines()
    date, commit = lines[0].split()[1], lines[0].split()[3]
    at = next(i for i, ln in enumerate(lines) if ln.startswith("torch "))   # lines after it: setuptools, pip's log
    words = lines[at].split()
    v = dict(zip(words[::2], words[1::2]))
    gpus = [ln.split(",")[0] for ln in lines[1:at]]
    gpu = gpus[0] + (f" x{len(gpus)}" if len(gpus) > 1 else "")
    return dict(gpu=gpu, torch=v["torch"], triton=v["triton"], cuda=v["cuda"], commit=commit, date=date[:10])


def header(meta_path):
    m = _env_meta(meta_path) if meta_path.endswith(".txt") else json.load(open(meta_path))["meta"]
    return (f"card {m['gpu']}, torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, commit {m['commit']}, "
            f"date {m['date']}" + ("" if meta_path.endswith(".txt") else f" (same device call as {meta_path.split('/')[-1]})"))


def correctness(path, meta):
    rows = json.load(open(path))
    out = [f"# Correctness grid on the GPU: {path.split('/')[-1]}", "", header(meta), "",
           "Rule: max |kernel − ref_fp32| ≤ 2× (out) / 3× (dq, dk, dv) max |torch_lowprec − ref_fp32| + floor "
           "(bf16 1.6e-2, fp16 2e-3); lse: +inf rows match and max error < 1e-2.", "",
           f"**{sum(r['ok'] for r in rows)}/{len(rows)} cases pass.**", "",
           "| version | dtype | (B, Sq, Sk, H, Hk, D) | varlen | mask | out err / bound | dq | dk | dv | ok |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mask = ", ".join(f"{k}={r[k]}" for k in ("causal", "window_size", "softcap", "stacked") if r.get(k) is not None)
        if "error" in r:  # the case did not run (compile or launch failure)
            out.append(f"| {r['version']} | {r['dtype']} | {tuple(r['shape'])} | {r['varlen']} | {mask} | "
                       f"error: {r['error'][:70]} | | | | NO |")
            continue
        cells = [f"{r[n]['err']:.1e} / {r[n]['bound']:.1e}" for n in ("out", "dq", "dk", "dv")]
        out.append(f"| {r['version']} | {r['dtype']} | {tuple(r['shape'])} | {r['varlen']} | {mask} | "
                   + " | ".join(cells) + f" | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(out) + "\n"


def models(path, meta):
    d = json.load(open(path))
    out = [f"# Model comparisons in bf16 on the GPU: {path.split('/')[-1]}", "", header(meta) +
           f", transformers {d['transformers']}", "",
           "Relative max error against eager in float32; bound = 2× (logits) / 3× (gradient) eager-bf16's error + 2e-3.",
           "Models: 4 layers, hidden 512, 8 heads / 2 kv heads, head dim 64, random weights; batch 4 × 512 tokens "
           "left-padded by 0/17/100/300; packed batch of 300+128+77+7 tokens.", "",
           "| family | check | flashattn_custom err | eager bf16 err | bound | ok |", "|---|---|---|---|---|---|"]
    for r in d["results"]:
        for c in r.get("checks", []):
            out.append(f"| {r['family']} ({r.get('version', 'v2')}) | {c['name']} | {c['err']:.2e} | {c['eager_bf16_err']:.2e} | "
                       f"{c['bound']:.2e} | {'yes' if c['ok'] else 'NO'} |")
    out += ["", "Greedy generate() (32 new tokens, batch 4, 64-token prompts), token agreement with eager bf16:", "",
            "| family | dynamic cache | static cache |", "|---|---|---|"]
    for r in d["results"]:
        out.append(f"| {r['family']} ({r.get('version', 'v2')}) | {r.get('generate_dynamic_agreement', float('nan')):.3f} | "
                   f"{r.get('generate_static_agreement', float('nan')):.3f} |")
    return "\n".join(out) + "\n"


def patches(path, meta):
    d = json.load(open(path))
    out = [f"# hf_flashattn.patches on the GPU: {path.split('/')[-1]}", "", header(meta) +
           f", transformers {d['meta']['transformers']}", "",
           "Models: 4 layers, hidden 1024, 8 heads / 2 kv heads, head dim 128, random weights, bf16, built with "
           "attn_implementation='eager' and patched. Relative max error against eager float32; bound = 2× (logits) / "
           "3× (gradients) eager-bf16's error + 2e-3. Stock eager attention calls while patched must be 0.", "",
           "| model type | check | patched err | eager bf16 err | bound | ok |", "|---|---|---|---|---|---|"]
    for t, r in d["results"].items():
        c = r.get("correctness", {})
        for ch in c.get("checks", []):
            out.append(f"| {t} | {ch['name']} | {ch['err']:.2e} | {ch['eager_low_err']:.2e} | {ch['bound']:.2e} | "
                       f"{'yes' if ch['ok'] else 'NO'} |")
        if "error" in c:
            out.append(f"| {t} | error: {c['error'][:80]} | | | | NO |")
    out += ["", "| model type | stock eager calls while patched | generate agreement vs eager bf16 (dynamic / static) |",
            "|---|---|---|"]
    for t, r in d["results"].items():
        c = r.get("correctness", {})
        out.append(f"| {t} | {c.get('eager_calls_while_patched')} | "
                   f"{c.get('generate_dynamic_agreement_vs_eager_low', float('nan')):.3f} / "
                   f"{c.get('generate_static_agreement_vs_eager_low', float('nan')):.3f} |")
    out += ["", "Training step (forward + backward + AdamW), tokens/s and speed-up of the patched model over the same "
            "model built with stock 'sdpa':", "",
            "| model type | batch | sdpa tokens/s | patched tokens/s | patched ÷ sdpa | peak GiB sdpa / patched |",
            "|---|---|---|---|---|---|"]
    for t, r in d["results"].items():
        for name, row in r.get("training", {}).items():
            if "sdpa" not in row:
                continue
            out.append(f"| {t} | {name} | {row['sdpa']['tokens_per_s']:.0f} | {row['patched']['tokens_per_s']:.0f} | "
                       f"{row['speedup']:.2f} | {row['sdpa']['peak_gib']:.2f} / {row['patched']['peak_gib']:.2f} |")
    w = d["results"].get("qwen2_moe", {}).get("sliding_window_fix")
    if w and "error" not in w:
        out += ["", "Qwen2-MoE sliding window (Transformers' flash path never receives it), relative max error of the "
                "logits against eager float32:", "",
                f"- eager bf16: {w['eager_low_err']:.3f}", f"- stock flash path (flashattn_custom, no window): "
                f"{w['stock_flash_path_err']:.3f}", f"- patched: {w['patched_err']:.3f}"]
    return "\n".join(out) + "\n"


def ratios(paths):
    rows = [r for p in paths for r in json.load(open(p))["rows"]]
    by = {}
    for r in rows:
        by[(r["D"], r["S"], r["H"], r["Hk"], r["causal"], r["mode"], r["impl"])] = r["tflops"]
    keys = sorted({k[:6] for k in by})
    out = ["| D | seqlen | heads | causal | mode | v2 TFLOP/s | ÷ SDPA flash | ÷ SDPA cuDNN | ÷ Flex | v1 TFLOP/s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        v2 = by.get(k + ("ours-v2",))
        cell = lambda b: f"{v2 / by[k + (b,)]:.2f}" if v2 and by.get(k + (b,)) else "–"  # noqa: E731
        v1 = by.get(k + ("ours-v1",))
        out.append(f"| {k[0]} | {k[1]} | {k[2]}/{k[3]} | {k[4]} | {k[5]} | {v2:.0f} | {cell('sdpa-flash')} | "
                   f"{cell('sdpa-cudnn')} | {cell('flex')} | {f'{v1:.0f}' if v1 else '–'} |")
    return "\n".join(out) + "\n"


def memory(path):
    d = json.load(open(path))
    m, mem = d["meta"], d["peak_memory"]
    lengths = sorted({r["S"] for r in mem})
    one = mem[0]
    out = [f"# Peak memory of fwd+bwd: {path.split('/')[-1]}", "",
           f"card {m['gpu']}, torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, "
           f"commit {m['commit']}, date {m['date']}", "",
           f"bf16, batch 1, {one['H']} heads, head dim {one['D']}, causal; MiB allocated above the inputs and dO at the "
           "call's peak (a first call of the same shapes before the measured one). Inputs: q, k, v and dO, "
           f"{one['inputs_mib'] / one['S'] * 1024:.0f} MiB a 1k tokens.", "",
           "| impl | " + " | ".join(str(S) for S in lengths) + " | MiB a 1k tokens at the longest |",
           "|---|" + "---|" * (len(lengths) + 1)]
    for name in dict.fromkeys(r["impl"] for r in mem):
        cells = {r["S"]: r["extra_peak_mib"] for r in mem if r["impl"] == name}
        last = cells[lengths[-1]]
        out.append(f"| {name} | " + " | ".join("OOM" if cells[S] is None else f"{cells[S]:.0f}" for S in lengths)
                   + f" | {'–' if last is None else f'{last / lengths[-1] * 1024:.1f}'} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "ratios":
        print(ratios(sys.argv[2:]), end="")
    elif what == "memory":
        print(memory(sys.argv[2]), end="")
    else:
        print({"correctness": correctness, "models": models, "patches": patches}[what](sys.argv[2], sys.argv[3]), end="")
