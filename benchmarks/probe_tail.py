"""A/B of the Gluon forward's tail (v3_gluon.TAIL_SPLIT: under a square causal mask, the last round of pairs of row
tiles run as single tiles where `tail_pairs` finds the schedule shorter) in one process.

    python benchmarks/probe_tail.py --out DIR [--rounds 7]

Check first: on shapes that get a tail (d64 and d128 plans, GQA and MHA, bf16 and fp16), out and lse with the tail
bitwise equal to those without it (the same tiles, computed the same way, in another order), and within flash-attn's
error rule of a float32 reference. Then rounds of flash_attn_func(version="v3") forwards, tail on and off and SDPA's
cuDNN backend in turns; each read as its ratio to the first in the same round, median over rounds. Writes
probe_tail.json and probe_tail.md.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fwd_rule import forward_rule  # noqa: E402
from rounds import (forward_points, probe_parser, run_meta, save_json, save_md, sdpa_forward,  # noqa: E402
                    switched, time_forwards)

# (D, S, B, H, Hk): square causal shapes whose schedule gets a tail on 132 SMs
CHECK = [(64, 2048, 1, 32, 8), (64, 3000, 1, 24, 24), (64, 2048, 3, 8, 2), (128, 3000, 1, 16, 4),
         (128, 2048, 3, 8, 8), (128, 2048, 1, 24, 6)]
# name -> (D, S, B, H, Hk, causal)
POINTS = {"d64-16k-causal": (64, 16384, 1, 32, 32, True), "gqa-d128-32k-causal": (128, 32768, 1, 32, 8, True),
          "d128-16k-causal": (128, 16384, 1, 16, 16, True), "gqa-d128-8k-causal": (128, 8192, 2, 32, 8, True)}


def fwd(q, k, v):
    from hf_flashattn import flash_attn_func
    return flash_attn_func(q, k, v, causal=True, return_attn_probs=True, version="v3")


def check():
    from hf_flashattn.kernels import v3_gluon as G
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for D, S, B, H, Hk in CHECK:
            g = torch.Generator(device="cuda").manual_seed(D + S + H)
            q = torch.randn(B, S, H, D, device="cuda", dtype=dtype, generator=g)
            k, v = (torch.randn(B, S, Hk, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
            p = G._PLANS[D]
            res = {}
            for on in (True, False):
                G.TAIL_SPLIT = on
                res[on] = G.forward(q, k, v, S, S, D ** -0.5, (-1, 0), _plan=p)
            G.TAIL_SPLIT = True
            n_mt = -(-S // p[0])
            tail = G.tail_pairs(n_mt, B * H, min(torch.cuda.get_device_properties(0).multi_processor_count,
                                                  B * H * ((n_mt + 1) // 2)))
            rule = forward_rule(*res[True], q, k, v, causal=True)
            row = dict(dtype=str(dtype).split(".")[-1], shape=[D, S, B, H, Hk], tail=tail,
                       bitwise=bool(torch.equal(res[True][0], res[False][0])
                                    and torch.equal(res[True][1], res[False][1])),
                       err=rule["err"], torch_err=rule["torch_err"], lse_err=rule["lse_err"])
            row["ok"] = bool(row["bitwise"] and tail > 0 and rule["ok"])
            rows.append(row)
            if not row["ok"]:
                print("FAIL", json.dumps(row), flush=True)
    return rows


def tail_fwd(G, on, q, k, v):
    with switched((G, "TAIL_SPLIT", on)):
        return fwd(q, k, v)


def main():
    ap = probe_parser(POINTS)
    args = ap.parse_args()
    t0 = time.time()
    from hf_flashattn.kernels import v3_gluon as G
    meta = run_meta(rounds=args.rounds, iters=args.iters)
    checks = check()
    bad = [c for c in checks if not c["ok"]]
    print(f"check: {len(checks) - len(bad)}/{len(checks)}", flush=True)
    results = []
    for p, (D, S, B, H, Hk, _), (q, k, v), (qt, kt, vt), flops in forward_points(args.points, POINTS, t0,
                                                                                  args.budget_s):
        variants = {"tail": functools.partial(tail_fwd, G, True, q, k, v),
                    "no-tail": functools.partial(tail_fwd, G, False, q, k, v),
                    "sdpa-cudnn": functools.partial(sdpa_forward, "cudnn", qt, kt, vt, True, H != Hk)}
        a, b = variants["tail"](), variants["no-tail"]()
        G.TAIL_SPLIT = True
        st = [s for key, s in G._SETUPS.items() if key[0] == q.shape and key[-1] is True and not s.empty]
        row = dict(point=p, D=D, S=S, B=B, H=H, Hk=Hk, tail=st[-1].tail if st else None,
                   bitwise=bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])), variants={})
        del a, b
        row["variants"] = time_forwards(variants, args.rounds, args.iters, flops)
        results.append(row)
        print(p, json.dumps({n: (round(r["tflops"]), round(r["median_ratio"], 4), round(r["of_cudnn"], 3))
                             for n, r in row["variants"].items()}), "tail", row["tail"], "bitwise", row["bitwise"],
              flush=True)
        del q, k, v, qt, kt, vt, variants   # the point's tensors, freed before the next point's (forward_points)
    save_json(args.out, "probe_tail", meta, t0, checks=checks, results=results)
    lines = [f"# Gluon forward: the schedule's tail — {meta['device']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, cuDNN {meta['cudnn']}, commit {meta['commit']}", "",
             f"date {meta['date']}; bf16 forwards through flash_attn_func(version='v3'), {args.iters} calls a "
             f"timing, {args.rounds} rounds, tail / no tail / SDPA-cuDNN in turns; ratio: to `tail` in the same "
             "round (median); ÷ cuDNN: cuDNN's time over the variant's (median over rounds)", "",
             f"Check (tail against no tail bitwise, and against a float32 reference with flash-attn's rule; shapes "
             f"with a tail, bf16/fp16): {len(checks) - len(bad)}/{len(checks)}", "",
             "| point | tail pairs | out/lse bitwise | variant | median ms | TFLOP/s | ratio | ÷ cuDNN |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results:
        for name, r in row["variants"].items():
            lines.append(f"| {row['point']} | {row['tail']} | {row['bitwise']} | {name} | {r['median_ms']:.3f} | "
                         f"{r['tflops']:.0f} | {r['median_ratio']:.3f} | {r['of_cudnn']:.3f} |")
    save_md(args.out, "probe_tail", lines)


if __name__ == "__main__":
    main()
