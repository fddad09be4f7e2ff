"""GPU check of hf_flashattn.patches (issue 7, item 5): bf16 comparisons at realistic sizes and one
training-step time per model type, patched vs stock sdpa.

    python benchmarks/gpu_patches.py --out benchmarks/results/<date>-patches   [--budget-s 540]
    python benchmarks/gpu_patches.py --smoke --out /tmp/x   # CPU, tiny sizes, float32: checks the script runs

Per model type (llama, mistral, qwen2, qwen2_moe, qwen3, qwen3_moe; random weights, 4 layers, 2k tokens):
  * correctness, flash-attn's rule: a model built with attn_implementation="eager" and patched
    (patches.apply(model)) runs in bf16; its error against eager float32 must be <= 2x (3x for
    gradients) the error of eager bf16, plus a floor. Checked: logits of a left-padded batch (eager's
    4D masks reach the patch), logits of a packed batch (DataCollatorWithFlattening) against each
    sequence alone, the loss gradient of layer 0's q_proj / k_proj; greedy generate() agreement with
    eager bf16 is reported. Calls of the stock eager attention while patched are counted (must be 0).
  * Qwen2-MoE's sliding window: error of Transformers' stock flash path (which never receives the
    window) and of the patched model, both against eager float32.
  * training step (forward + backward + AdamW step) time, tokens/s and peak memory: a model built
    with "sdpa" stock vs the same model patched, on a dense (4 x 2048) and a packed (1 x 8192) batch.
Writes patches.json (rewritten after every model type, so a run cut short keeps what it measured).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hf_flashattn  # noqa: E402
import hf_flashattn.patches as patches  # noqa: E402
import transformers  # noqa: E402
from transformers import DataCollatorWithFlattening  # noqa: E402

NAME = hf_flashattn.ATTN_IMPLEMENTATION
WINDOW = 512


def configs(smoke):
    if smoke:
        common = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0)
        window, moe = 8, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    else:
        common = dict(vocab_size=1000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=16384,
                      pad_token_id=0)
        window, moe = WINDOW, dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512)
    slide = dict(use_sliding_window=True, sliding_window=window)
    return {
        "llama": lambda: transformers.LlamaConfig(**common),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=window),
        "qwen2": lambda: transformers.Qwen2Config(**common, **slide, max_window_layers=2),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**common, **slide, **moe, max_window_layers=4,
                                                         shared_expert_intermediate_size=common["intermediate_size"]),
        "qwen3": lambda: transformers.Qwen3Config(**common, **slide, max_window_layers=2),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**common, **slide, **moe),
    }


class Run:
    def __init__(self, args):
        self.smoke = args.smoke
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.low = torch.float32 if args.smoke else torch.bfloat16  # bf16 is unreliable in the CPU interpreter
        self.configs = configs(args.smoke)
        self.S = 24 if args.smoke else 2048
        self.B = 2 if args.smoke else 4
        self.vocab = self.configs["llama"]().vocab_size

    def build(self, model_type, impl, dtype, patched=False):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(self.configs[model_type](), attn_implementation=impl,
                                                              dtype=torch.float32)
        model = model.to(self.device, dtype).eval()
        return patches.apply(model) if patched else model

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def check(name, got, ref, low, factor, floor=2e-3):
    err, base = rel_err(got, ref), rel_err(low, ref)
    return dict(name=name, err=err, eager_low_err=base, bound=factor * base + floor, ok=err <= factor * base + floor)


def count_eager_calls(model_type):
    """Context: counts calls of the model module's eager_attention_forward."""
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    counter = {"n": 0}
    real = module.eager_attention_forward

    @functools.wraps(real)
    def counting(*a, **k):
        counter["n"] += 1
        return real(*a, **k)

    class Ctx:
        def __enter__(self):
            module.eager_attention_forward = counting
            return counter

        def __exit__(self, *exc):
            module.eager_attention_forward = real

    return Ctx()


def correctness(run, model_type):
    dev, B, S = run.device, run.B, run.S
    ref = run.build(model_type, "eager", torch.float32)
    low = run.build(model_type, "eager", run.low)
    ours = run.build(model_type, "eager", run.low, patched=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, run.vocab, (B, S), generator=g).to(dev)
    mask = torch.ones(B, S, dtype=torch.long, device=dev)
    for b, pad in enumerate([0, S // 3, 5, S // 2][:B]):
        mask[b, :pad] = 0
    keep = mask.bool()
    out = dict(checks=[])
    with torch.no_grad(), count_eager_calls(model_type) as eager_calls:
        lr, ll = ref(ids, attention_mask=mask).logits, low(ids, attention_mask=mask).logits
        eager_calls["n"] = 0
        lo = ours(ids, attention_mask=mask).logits
        out["eager_calls_while_patched"] = eager_calls["n"]
    out["checks"].append(check("left-padded logits", lo[keep], lr[keep], ll[keep], 2))
    lens = [S // 2, S // 4, S // 8, S - S // 2 - S // 4 - S // 8]
    seqs = [ids[i % B, -n:].tolist() for i, n in enumerate(lens)]
    for fa_kwargs in (False, True):
        batch = DataCollatorWithFlattening(return_flash_attn_kwargs=fa_kwargs)([{"input_ids": s} for s in seqs])
        batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            lp = ours(**batch, use_cache=False).logits[0]
            per_ref = torch.cat([ref(torch.tensor([s], device=dev)).logits[0] for s in seqs])
            per_low = torch.cat([low(torch.tensor([s], device=dev)).logits[0] for s in seqs])
        out["checks"].append(check(f"packed logits ({'cu_seq_lens' if fa_kwargs else 'position_ids'})", lp, per_ref,
                                   per_low, 2))
    labels = ids.masked_fill(~(keep & torch.nn.functional.pad(mask, (1, 0))[:, :-1].bool()), -100)
    grads = {}
    for tag, m in (("ref", ref), ("low", low), ("ours", ours)):
        m(ids, attention_mask=mask, labels=labels).loss.backward()
        attn = m.model.layers[0].self_attn
        grads[tag] = (attn.q_proj.weight.grad.clone(), attn.k_proj.weight.grad.clone())
        m.zero_grad(set_to_none=True)
    for i, proj in enumerate(("q_proj", "k_proj")):
        out["checks"].append(check(f"loss grad (layer 0 {proj})", grads["ours"][i], grads["ref"][i], grads["low"][i],
                                   3))
    P, new = (12, 4) if run.smoke else (256, 32)
    # disable_compile: generate() compiles the static-cache forward by default; compare the kernels, not inductor
    kw = dict(attention_mask=mask[:, -P:], max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
              disable_compile=True)
    for cache in ("dynamic", "static"):
        extra = dict(cache_implementation="static") if cache == "static" else {}
        with torch.no_grad():
            a = low.generate(ids[:, -P:], **kw, **extra)[:, P:]
            b = ours.generate(ids[:, -P:], **kw, **extra)[:, P:]
        out[f"generate_{cache}_agreement_vs_eager_low"] = (a == b).float().mean().item()
    out["ok"] = all(c["ok"] for c in out["checks"]) and out["eager_calls_while_patched"] == 0
    return out


def qwen2_moe_window(run):
    """Transformers' flash path never receives Qwen2-MoE's sliding window; the patch applies it."""
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.modeling_utils import AttentionInterface
    ref = run.build("qwen2_moe", "eager", torch.float32)
    low = run.build("qwen2_moe", "eager", run.low)
    ours = run.build("qwen2_moe", "eager", run.low, patched=True)
    saved = AttentionInterface._global_mapping[NAME]
    AttentionInterface._global_mapping[NAME] = flash_attention_forward  # stock: no module.sliding_window fallback
    try:
        stock = run.build("qwen2_moe", NAME, run.low)
        ids = torch.randint(3, run.vocab, (1, run.S), generator=torch.Generator().manual_seed(2)).to(run.device)
        with torch.no_grad():
            lr, ll, ls, lo = (m(ids).logits for m in (ref, low, stock, ours))
    finally:
        AttentionInterface._global_mapping[NAME] = saved
    return dict(eager_low_err=rel_err(ll, lr), stock_flash_path_err=rel_err(ls, lr), patched_err=rel_err(lo, lr))


def step_time(run, model, batch, steps, warmup=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            run.sync()
            t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    run.sync()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if run.device.type == "cuda" else None
    tokens = batch["input_ids"].numel()
    return dict(step_s=dt, tokens_per_s=tokens / dt, peak_gib=peak)


def training(run, model_type):
    g = torch.Generator().manual_seed(3)
    B, S = (2, 24) if run.smoke else (4, 2048)
    ids = torch.randint(3, run.vocab, (B, S), generator=g)
    dense = dict(input_ids=ids, labels=ids.clone())
    lens = [S * B // 2, S * B // 4, S * B // 8, S * B - S * B // 2 - S * B // 4 - S * B // 8]
    flat = ids.flatten()
    seqs, start = [], 0
    for n in lens:
        seqs.append({"input_ids": flat[start:start + n].tolist()})
        start += n
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(seqs)
    out = {}
    steps = 1 if run.smoke else 5
    for name, batch in ((f"dense_{B}x{S}", dense), (f"packed_1x{B * S}", packed)):
        batch = {k: (v.to(run.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        row = {}
        for variant in ("sdpa", "patched"):
            model = run.build(model_type, "sdpa", run.low, patched=variant == "patched")
            row[variant] = step_time(run, model, batch, steps)
            del model
        row["speedup"] = row["sdpa"]["step_s"] / row["patched"]["step_s"]
        out[name] = row
    return out


def meta(run):
    commit = os.environ.get("COMMIT")  # the device copy has no (or a stale) .git: the caller passes the commit
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = None
    import triton
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), commit=commit,
                gpu=torch.cuda.get_device_name() if run.device.type == "cuda" else "cpu (smoke)",
                torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
                dtype=str(run.low), seqlen=run.S, kernel_version=hf_flashattn.get_default_version())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=540, help="stop starting new work after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, float32: check that the script runs")
    ap.add_argument("--types", default=",".join(configs(True)), help="comma-separated model types")
    args = ap.parse_args()
    run = Run(args)
    torch.backends.cuda.matmul.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)
    path, t_start = os.path.join(args.out, "patches.json"), time.time()
    report = dict(meta=meta(run), results={}, skipped=[])

    def save():
        with open(path, "w") as f:
            json.dump(report, f, indent=1)

    for model_type in args.types.split(","):
        if time.time() - t_start > args.budget_s:
            report["skipped"].append(model_type)
            continue
        r = {}
        for part, fn in (("correctness", correctness), ("training", training)):
            try:
                r[part] = fn(run, model_type)
            except Exception as e:  # keep going: one broken type must not hide the others
                r[part] = dict(ok=False, error=f"{type(e).__name__}: {e}")
        if model_type == "qwen2_moe":
            try:
                r["sliding_window_fix"] = qwen2_moe_window(run)
            except Exception as e:
                r["sliding_window_fix"] = dict(error=f"{type(e).__name__}: {e}")
        report["results"][model_type] = r
        print(model_type, json.dumps(r), flush=True)
        save()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    ok = all(r.get("correctness", {}).get("ok") for r in report["results"].values())
    report["ok"] = ok
    save()
    print("patches:", "all pass" if ok else "FAILURES", "->", path)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
