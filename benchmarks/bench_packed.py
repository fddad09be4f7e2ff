"""The packed functions' backward: one gradient of the packed tensor written in place (flash_attn_qkvpacked_func and
flash_attn_kvpacked_func) against the same call on the views through flash_attn_func, whose three gradients autograd
stacks into the packed tensor's (the path the packed functions took before).

For each version and shape: fwd+bwd time (triton's do_bench, median) and the peak memory a fwd+bwd allocates above the
inputs, both ways; then the gradients compared (bitwise where the backward is deterministic).

    python benchmarks/bench_packed.py --out DIR [--versions v2,v3]
Writes bench_packed.json and bench_packed.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hf_flashattn as fa  # noqa: E402

# (name, B, S, H, Hk, D): qkv-packed where H == Hk, else q with kv packed
SHAPES = [("qkv d128 16k", 1, 16384, 16, 16, 128), ("qkv d64 4k x4", 4, 4096, 32, 32, 64),
          ("kv d128 GQA 32/8 8k", 2, 8192, 32, 8, 128)]


def _inputs(B, S, H, Hk, D):
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    if H == Hk:
        return (mk(B, S, 3, H, D).requires_grad_(),), mk(B, S, H, D)
    return (mk(B, S, H, D).requires_grad_(), mk(B, S, 2, Hk, D).requires_grad_()), mk(B, S, H, D)


def _calls(leaves, version):
    if len(leaves) == 1:
        (qkv,) = leaves
        return (lambda: fa.flash_attn_qkvpacked_func(qkv, causal=True, version=version),
                lambda: fa.flash_attn_func(*qkv.unbind(2), causal=True, version=version))
    q, kv = leaves
    return (lambda: fa.flash_attn_kvpacked_func(q, kv, causal=True, version=version),
            lambda: fa.flash_attn_func(q, *kv.unbind(2), causal=True, version=version))


def _fwd_bwd(call, leaves, do):
    for t in leaves:
        t.grad = None
    call().backward(do)


def _peak_mib(call, leaves, do):
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call().backward(do)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--versions", default="v2,v3")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=os.environ.get("COMMIT", "unknown"), date=time.strftime("%Y-%m-%d"), rounds=args.rounds)
    rows = []
    for version in args.versions.split(","):
        for name, B, S, H, Hk, D in SHAPES:
            leaves, do = _inputs(B, S, H, Hk, D)
            packed, views = _calls(leaves, version)
            grads = {}
            for label, call in (("packed", packed), ("views", views)):
                _fwd_bwd(call, leaves, do)
                grads[label] = [t.grad.clone() for t in leaves]
            same = all(torch.equal(a, b) for a, b in zip(grads["packed"], grads["views"]))
            close = all(torch.allclose(a.float(), b.float(), atol=2e-2, rtol=0) for a, b in
                        zip(grads["packed"], grads["views"]))
            rec = {"packed": [], "views": []}
            for _ in range(args.rounds):
                for label, call in (("packed", packed), ("views", views)):
                    rec[label].append(triton.testing.do_bench(lambda c=call, lv=leaves, g=do: _fwd_bwd(c, lv, g),
                                                              warmup=5, rep=60, return_mode="median"))
            med = {k: sorted(v)[len(v) // 2] for k, v in rec.items()}
            row = dict(version=version, shape=name, B=B, S=S, H=H, Hk=Hk, D=D, grads_bitwise=same, grads_close=close,
                       ms=med, rounds_ms=rec, peak_mib={lb: round(_peak_mib(c, leaves, do), 1) for lb, c in
                                                       (("packed", packed), ("views", views))})
            print(json.dumps(row), flush=True)
            rows.append(row)
            grads.clear()
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_packed.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    md = [f"# Packed functions' backward: in place against stacked — {meta['gpu']}, torch {meta['torch']}, triton "
          f"{meta['triton']}, commit {meta['commit']}", "", f"date {meta['date']}; causal, bf16; fwd+bwd time median "
          f"of {args.rounds} rounds (do_bench); peak memory a fwd+bwd allocates above the inputs", "",
          "| version | shape | ms packed | ms views | views ÷ packed | peak MiB packed | peak MiB views "
          "| grads bitwise |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['version']} | {r['shape']} | {r['ms']['packed']:.3f} | {r['ms']['views']:.3f} | "
                  f"{r['ms']['views'] / r['ms']['packed']:.3f} | {r['peak_mib']['packed']} | "
                  f"{r['peak_mib']['views']} | {r['grads_bitwise']} |")
    with open(os.path.join(args.out, "bench_packed.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
