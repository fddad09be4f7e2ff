"""Where the host time of a v3 forward+backward goes (bench.py's 512-1k points read close to their host time).

Microseconds of host time a call, each piece timed alone at a tiny shape (B=1, H=2, S=128, d128: the GPU idles, so
the time a call is the host's), N calls queued and one synchronize, median of 5 repeats:
flash_attn_func's forward without and with autograd, fwd+bwd through .backward(), the backward alone through
torch.autograd.backward on a kept graph (retain_graph), v3.backward, v3_gluon_bwd.backward for the default plan and
the two passes, torch.empty/zeros, SDPA-cuDNN beside; fwd+bwd with Python's garbage collector off and after
gc.freeze(), a trivial Python autograd.Function, the collections a run of fwd+bwd triggers. Then cProfile of fwd+bwd
(top functions by own and by cumulative time).

    python benchmarks/probe_host_bwd.py --out DIR     (writes probe_host_bwd.json, .md, _profile.txt)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_flashattn as fa  # noqa: E402
from hf_flashattn.kernels import v3  # noqa: E402
from hf_flashattn.kernels import v3_gluon_bwd as GB  # noqa: E402
from rounds import host_us, identity_fwd_bwd, write_profile  # noqa: E402


def _no_grad(fn, *a):
    with torch.no_grad():
        return fn(*a)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=os.environ.get("COMMIT", "unknown"), date=time.strftime("%Y-%m-%d"))
    rows = []
    B, S, H, D = 1, 128, 2, 128
    for causal in (False, True):
        mk = lambda: torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)  # noqa: E731
        q, k, v, do = mk(), mk(), mk(), mk()
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        win = (-1, 0) if causal else (-1, -1)
        out, lse = v3.forward(q, k, v, None, None, S, S, D ** -0.5, win, 0.0)

        def fb():
            for x in (qg, kg, vg):
                x.grad = None
            fa.flash_attn_func(qg, kg, vg, causal=causal, version="v3").backward(do)
        kept = fa.flash_attn_func(qg, kg, vg, causal=causal, version="v3")

        def bwd_only():
            torch.autograd.backward(kept, do, retain_graph=True)
        qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
        dot = do.transpose(1, 2)

        def cud():
            from torch.nn.attention import SDPBackend, sdpa_kernel
            for x in (qt, kt, vt):
                x.grad = None
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).backward(dot)
        args_b = (do, q, k, v, out, lse, None, None, S, S, D ** -0.5, win)

        def ident():
            identity_fwd_bwd(qg, do)

        def no_gc(fn):
            def run():
                gc.disable()
                try:
                    fn()
                finally:
                    gc.enable()
            return run
        pieces = {
            "flash_attn_func fwd, no grad": lambda: fa.flash_attn_func(q, k, v, causal=causal, version="v3"),
            "flash_attn_func fwd, autograd Function": lambda: fa.flash_attn_func(qg, kg, vg, causal=causal,
                                                                                 version="v3"),
            "fwd+bwd (.backward)": fb,
            "bwd alone (autograd.backward, kept graph)": bwd_only,
            "v3.backward": lambda: v3.backward(do, q, k, v, out, lse, None, None, S, S, D ** -0.5, win, 0.0, False),
            "v3_gluon_bwd.backward, default plan": lambda: GB.backward(*args_b),
            "v3_gluon_bwd.backward, two passes": lambda: GB.backward(*args_b, _plan=GB.plan(D, True)),
            "torch.empty x6": lambda: [torch.empty(B, S, H, D, device="cuda") for _ in range(6)],
            "torch.zeros fp32 accumulator": lambda: torch.zeros(B, S + 128, H, D, device="cuda"),
            "sdpa-cudnn fwd+bwd": cud,
            "fwd+bwd, Python's gc disabled": no_gc(fb),
            "sdpa-cudnn fwd+bwd, gc disabled": no_gc(cud),
            "a Python autograd.Function (identity) fwd+bwd": ident,
            "v3.backward, no grad mode": lambda: _no_grad(v3.backward, do, q, k, v, out, lse, None, None, S, S,
                                                          D ** -0.5, win, 0.0, False),
        }
        for name, fn in pieces.items():
            try:
                us = host_us(fn)
                rows.append(dict(causal=causal, piece=name, host_us=us))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(causal=causal, piece=name, error=f"{type(e).__name__}: {str(e)[:200]}"))
            print(json.dumps(rows[-1]), flush=True)
        # the same fwd+bwd with our kernels' host paths stubbed out (new empty tensors instead): what remains is the
        # autograd Function, the engine and flash_attn_func's Python
        real_f, real_b = v3.forward, v3.backward
        try:
            v3.backward = lambda do_, q_, k_, v_, *a: (torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_))
            rows.append(dict(causal=causal, piece="fwd+bwd, v3.backward stubbed", host_us=host_us(fb)))
            print(json.dumps(rows[-1]), flush=True)
            v3.forward = lambda q_, *a: (torch.empty_like(q_), torch.empty(q_.shape[0], q_.shape[2], q_.shape[1],
                                                                            device=q_.device))
            rows.append(dict(causal=causal, piece="fwd+bwd, v3.forward and v3.backward stubbed", host_us=host_us(fb)))
            print(json.dumps(rows[-1]), flush=True)
        finally:
            v3.forward, v3.backward = real_f, real_b
        if causal:   # v3.backward looped in another thread (the autograd engine runs CUDA backwards on its own)
            import threading
            res = {}

            def in_thread():
                res["us"] = host_us(lambda: v3.backward(do, q, k, v, out, lse, None, None, S, S, D ** -0.5, win,
                                                        0.0, False))
            th = threading.Thread(target=in_thread)
            th.start()
            th.join()
            rows.append(dict(causal=causal, piece="v3.backward in another thread", host_us=res["us"]))
            print(json.dumps(rows[-1]), flush=True)
            before = [st["collections"] for st in gc.get_stats()]
            for _ in range(200):
                fb()
            torch.cuda.synchronize()
            after = [st["collections"] for st in gc.get_stats()]
            rows.append(dict(causal=causal, piece="gc collections per 200 fwd+bwd (gen 0/1/2)",
                             collections=[a - b for a, b in zip(after, before)],
                             tracked_objects=len(gc.get_objects())))
            print(json.dumps(rows[-1]), flush=True)
            gc.freeze()
            rows.append(dict(causal=causal, piece="fwd+bwd after gc.freeze()", host_us=host_us(fb)))
            print(json.dumps(rows[-1]), flush=True)
            gc.unfreeze()
            write_profile(os.path.join(args.out, "probe_host_bwd_profile.txt"), fb, 300)
    with open(os.path.join(args.out, "probe_host_bwd.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    md = [f"# Host time of v3 fwd+bwd, piece by piece — {meta['gpu']}, torch {meta['torch']}, triton "
          f"{meta['triton']}, commit {meta['commit']}", "",
          f"B={B}, S={S}, H={H}, d{D}, bf16 (the GPU idles: a call's time is host time); us a call, median of 5 x 200",
          "", "| piece | not causal | causal |", "|---|---|---|"]
    for name in dict.fromkeys(r["piece"] for r in rows):
        cells = [next((f"{r['host_us']:.0f}" if "host_us" in r else str(r.get("collections", "err")) for r in rows
                       if r["piece"] == name and r["causal"] == c), "–") for c in (False, True)]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "probe_host_bwd.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
