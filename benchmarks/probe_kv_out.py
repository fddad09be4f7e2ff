"""A/B of the Gluon backward's dK/dV pass (`_bwd_kernel`) variants in one process: how dK and dV leave (KV_OUT 0
masked stores, 1 TMA stores through buffers of their own, 2 TMA stores through the consumer's K/V buffers, 3 through
the single pass's dQ tiles) and one
or two K/V slots (MAX_KV_SLOTS), at the points where the pass's per-tile cost weighs most (1k-2k keys) and a few
single-pass points.

    python benchmarks/probe_kv_out.py --out DIR [--points d128-1k,d128-1k-causal,...] [--rounds 7]

Every variant runs the same inputs; rounds go variant after variant, so a drift of the card's clock or of the host
shows in every variant alike, and each variant's time is read as its ratio to the baseline's in the same round (the
median of those ratios; and the median device time of `_bwd_kernel` under torch.profiler). Correctness: each
variant's dK and dV are compared bitwise with the baseline's (the variants change where dK and dV are stored from,
not how they are summed), dQ bitwise with two passes (its own pass, unchanged) and within 1e-2 relative with the
single pass (its float32 sum's order varies between runs). Writes probe_kv_out.json and probe_kv_out.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import multiprocessing as mp
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from rounds import interleaved_rounds, save_json, save_md  # noqa: E402

# name -> (D, S, causal, packed); B = 16384 / S, H = 2048 / D (bench.py's grid); packed: the B sequences of S tokens
# as one packed batch (cu_seqlens), their lengths S, S - 37, S - 74, ... (a sequence's last key tile reaches into the
# next one's keys)
POINTS = {"d128-1k": (128, 1024, False, False), "d128-1k-causal": (128, 1024, True, False),
          "d64-1k": (64, 1024, False, False), "d64-1k-causal": (64, 1024, True, False),
          "d128-2k-causal": (128, 2048, True, False), "d128-4k": (128, 4096, False, False),
          "d64-4k": (64, 4096, False, False), "d128-4k-causal": (128, 4096, True, False),
          "d256-1k": (256, 1024, False, False), "d256-1k-causal": (256, 1024, True, False),
          "packed-d128-1k": (128, 1024, False, True), "packed-d128-1k-causal": (128, 1024, True, True),
          "packed-d64-1k-causal": (64, 1024, True, True), "d128-2k": (128, 2048, False, False),
          "d64-2k": (64, 2048, False, False), "d64-4k-causal": (64, 4096, True, False),
          "d128-16k-causal": (128, 16384, True, False), "packed-d128-4k": (128, 4096, False, True)}
# name -> (MAX_KV_SLOTS, KV_OUT); the first is the baseline; "rule": v3_gluon_bwd's defaults (`_KV_PLANS`);
# "two-pass-below-4k" / "-8k": the rule with the two passes up to 4096 / 8192 visible keys (SINGLE_PASS_FROM_KEYS)
VARIANTS = {"slots1-out0": (1, 0), "slots2-out0": (2, 0), "slots1-out1": (1, 1), "slots2-out2": (2, 2),
            "slots1-out2": (1, 2), "slots1-out3": (1, 3), "rule": (None, None)}
FROM_KEYS = {"two-pass-below-4k": 4096, "two-pass-below-8k": 8192}
VARIANTS.update({k: (None, None) for k in FROM_KEYS})


def set_variant(GB, variant):
    GB.MAX_KV_SLOTS, GB.KV_OUT = VARIANTS[variant]
    GB.SINGLE_PASS_FROM_KEYS = FROM_KEYS.get(variant, 2048)


def setup(D, S, causal, packed=False, seed=0):
    from hf_flashattn import flash_attn_func, flash_attn_varlen_func
    B, H = 16384 // S, 2048 // D
    g = torch.Generator(device="cuda").manual_seed(seed)
    window = (-1, 0) if causal else (-1, -1)
    if not packed:
        q, k, v, do = (torch.randn((B, S, H, D), device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
        out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True, version="v3")
        return q, k, v, do, out, lse, window, None, S
    lens = [max(S - 37 * i, 1) for i in range(B)]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    q, k, v, do = (torch.randn((sum(lens), H, D), device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, S, S, causal=causal, return_attn_probs=True, version="v3")
    return q, k, v, do, out, lse, window, cu, S


def call(GB, inputs, variant, plan=None):
    q, k, v, do, out, lse, window, cu, S = inputs
    set_variant(GB, variant)
    return GB.backward(do, q, k, v, out, lse, cu, cu, S, S, q.shape[-1] ** -0.5, window,
                       _plan=plan or GB.plan(q.shape[-1], False, S, window))


# awkward dense shapes (B, Sq, Sk, H, Hk, D) for the bitwise check against the baseline: ragged lengths (TMA clips
# the last tile's rows), GQA/MQA, keys no query sees (their dK/dV are zero stores)
CHECK_SHAPES = [(2, 113, 203, 8, 2, 128), (2, 203, 113, 8, 8, 64), (1, 1023, 1024, 4, 1, 128),
                (1, 100, 700, 4, 4, 128), (1, 1024, 1023, 8, 2, 64), (2, 113, 203, 8, 2, 256),
                (1, 1023, 1024, 4, 1, 256)]
# packed (B sequences of Sq, Sq - 37, ... tokens, q_len = k_len, H, Hk, D)
CHECK_PACKED = [(3, 300, 8, 2, 128), (3, 200, 4, 4, 64), (2, 1100, 8, 1, 128), (2, 300, 4, 4, 256)]
CHECK_MASKS = [(-1, -1), (-1, 0), (64, 32)]


def check(GB, variants, only=None):
    """[(shape, window, plan, variant, dK/dV bitwise equal to the baseline's)] over CHECK_SHAPES and CHECK_PACKED x
    CHECK_MASKS, with both the two passes and the single pass (d64/d128's default plan from 2k keys; d256 runs two
    passes)."""
    from hf_flashattn import flash_attn_func, flash_attn_varlen_func
    rows = []
    cases = [(s, False) for s in CHECK_SHAPES] + [(s, True) for s in CHECK_PACKED]
    for shape, packed in (cases if only is None else [cases[only]]):
        g = torch.Generator(device="cuda").manual_seed(1)
        if packed:
            B, S, H, Hk, D = shape
            lens = [S - 37 * i for i in range(B)]
            cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
            q, do = (torch.randn((sum(lens), H, D), device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
            k, v = (torch.randn((sum(lens), Hk, D), device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
            Sq = Sk = S
        else:
            B, Sq, Sk, H, Hk, D = shape
            cu = None
            q, do = (torch.randn((B, Sq, H, D), device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
            k, v = (torch.randn((B, Sk, Hk, D), device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        for window in CHECK_MASKS:
            if packed:
                out, lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, Sq, Sk, window_size=window,
                                                     return_attn_probs=True, version="v3")
            else:
                out, lse, _ = flash_attn_func(q, k, v, window_size=window, return_attn_probs=True, version="v3")
            for single in ((False, True) if D != 256 else (False,)):
                plan = GB.plan(D) if single else GB.plan(D, deterministic=True)
                res = {}
                for v_ in variants:
                    set_variant(GB, v_)
                    res[v_] = GB.backward(do, q, k, v, out, lse, cu, cu, Sq, Sk, D ** -0.5, window, _plan=plan)
                for v_ in variants[1:]:
                    eq = torch.equal(res[v_][1], res[variants[0]][1]) and torch.equal(res[v_][2], res[variants[0]][2])
                    rows.append(dict(shape=list(shape), packed=packed, window=list(window), single=single, variant=v_,
                                     bitwise=eq))
    return rows


def warm(point, variant):
    """Compile one (point, variant), or the check's case `point` (an int) under one variant, in a process of its own
    (the disk cache serves the main process)."""
    from hf_flashattn.kernels import v3_gluon_bwd as GB
    t = time.time()
    if isinstance(point, int):
        check(GB, [variant], only=point)
    else:
        call(GB, setup(*POINTS[point]), variant)
    torch.cuda.synchronize()
    return point, variant, round(time.time() - t, 1)


def bwd_kernel_us(f, iters, total=False):
    """`_bwd_kernel`'s device time a call of f (total: every kernel's, fills and casts included), us."""
    from probe_bwd_parts import kernel_times
    return sum(us for name, _, us in kernel_times(f, iters) if total or name.startswith("_bwd_kernel"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--points", default="d128-1k,d128-1k-causal,d64-1k,d64-1k-causal,d128-2k-causal,d128-4k,d64-4k")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--total", action="store_true", help="time every kernel of the backward, not `_bwd_kernel` alone")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    import triton

    from hf_flashattn.kernels import v3_gluon_bwd as GB
    points, variants = args.points.split(","), args.variants.split(",")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=os.environ.get("COMMIT", "unknown"), rounds=args.rounds, iters=args.iters,
                date=time.strftime("%Y-%m-%d"))
    with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as ex:
        n_cases = 0 if args.no_check else len(CHECK_SHAPES) + len(CHECK_PACKED)
        tasks = [(c, v) for c in range(n_cases) for v in variants] + [(p, v) for p in points for v in variants]
        warmed = list(ex.map(warm, *zip(*tasks)))
    meta["warm_s"] = round(time.time() - t0, 1)
    print(f"compiled in {meta['warm_s']} s: {warmed}", flush=True)
    checks = [] if args.no_check else check(GB, variants)
    bad = [c for c in checks if not c["bitwise"]]
    print(f"check: {len(checks) - len(bad)}/{len(checks)} bitwise; differ: {bad}", flush=True)
    results = []
    for p in points:
        if time.time() - t0 > args.budget_s:
            print(f"budget: {p} and later skipped", flush=True)
            break
        D, S, causal, packed = POINTS[p]
        inputs = setup(D, S, causal, packed)
        ref = call(GB, inputs, variants[0])
        two_pass = GB.plan(D, False, S, inputs[6])[-1] == 0
        row = dict(point=p, D=D, S=S, causal=causal, packed=packed, two_pass=two_pass, variants={})
        for v in variants:
            got = call(GB, inputs, v)
            tp = GB.plan(D, False, S, inputs[6])[-1] == 0
            ok_kv = torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
            if two_pass and tp:
                ok_q = torch.equal(got[0], ref[0])
            else:
                ok_q = bool(((got[0].float() - ref[0].float()).norm() / ref[0].float().norm()) < 1e-2)
            row["variants"][v] = dict(two_pass=tp, dkdv_bitwise=ok_kv, dq_ok=ok_q)
        interleaved_rounds(row["variants"], {v: functools.partial(bwd_kernel_us, functools.partial(call, GB, inputs, v),
                                                                  args.iters, args.total) for v in variants},
                           args.rounds, "us", 1)
        results.append(row)
        print(p, {v: (r["median_us"], r["median_ratio"], r["dkdv_bitwise"], r["dq_ok"])
                  for v, r in row["variants"].items()}, flush=True)
        del inputs, ref
    set_variant(GB, "rule")   # the measured rule again
    save_json(args.out, "probe_kv_out", meta, t0, checks=checks, results=results)
    lines = [f"# dK/dV pass variants — {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"commit {meta['commit']}", "",
             f"date {meta['date']}; bf16, B = 16384 / S, H = 2048 / D; `_bwd_kernel`'s device time (torch.profiler, "
             f"{args.iters} calls{'; every kernel of the backward' if args.total else ''}) in {args.rounds} "
             "rounds, variant after variant; ratio: to the first variant in the same round, median over rounds", "",
             f"Check (dK and dV bitwise equal to {variants[0]}'s, awkward dense and packed shapes x windows x both "
             "plans): "
             f"{len(checks) - len(bad)}/{len(checks)}" + (f"; differ: {bad}" if bad else ""), "",
             "| point | two passes | variant | median us | min us | ratio (median) | dK/dV bitwise | dQ ok |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results:
        for v, r in row["variants"].items():
            lines.append(f"| {row['point']} | {r.get('two_pass', row['two_pass'])} | {v} | {r['median_us']:.1f} | "
                         f"{min(r['us']):.1f} | {r['median_ratio']:.3f} | {r['dkdv_bitwise']} | {r['dq_ok']} |")
    save_md(args.out, "probe_kv_out", lines)


if __name__ == "__main__":
    main()
