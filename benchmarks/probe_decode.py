"""A/B of the split-KV decode kernel's variants in one process (issue 6: batch 1 and 8 at 32k read 0.99x the best
SDPA backend): K/V blocks through tensor descriptors (TMA) against pointer loads, the combine kernel's share (the
split kernel alone; the splits merged by the split kernel itself), split counts, pipeline depth and key block.

    python benchmarks/probe_decode.py --out DIR [--points b1-32k,b8-32k] [--rounds 9]

Every variant is captured in its own CUDA graph (`--calls` calls a graph, on one stream that also ran its warm-up, so
the fused merge's workspace is the stream's own and nothing is allocated in the capture); rounds replay the graphs
variant after variant, and each variant is read as its ratio to the first variant in the same round (median over
rounds), SDPA's cuDNN and flash backends among them. Correctness first: every variant's output against the pointer
kernel's (bitwise, or the max difference), and the TMA kernel against a float64 reference on ragged cache lengths with
inf/NaN in the cache slots not yet written. Writes probe_decode.json and probe_decode.md.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import hf_flashattn as fa  # noqa: E402
from hf_flashattn.kernels import decode  # noqa: E402
from hf_flashattn.reference import attention_ref  # noqa: E402
from rounds import interleaved_rounds, median_speedup, run_meta, save_json, save_md  # noqa: E402

H, HK, D = 32, 8, 128


def point(name):
    """'b8-32k' -> (batch 8, cache 32768)."""
    b, k = name.split("-")
    return int(b[1:]), int(k[:-1]) * 1024


BASE_TUNE = dict(decode.TUNE)
# A variant's name gives its TUNE changes and how the call merges: "ptr" / "tma" (pointer loads / tensor descriptors),
# then optional "-spN" (N splits; none: the rule's count), "-sN" (num_stages), "-wN" (num_warps), "-bnN" (key block),
# "-wavesN" (the rule's waves), "-old" (the rule before one_wave: two waves of programs, 2 stages below 16 splits),
# and a merge: "-split-only" (no merge: the split kernel's own time) or "-fused" (the split
# kernel merges); neither: the combine kernel, as flash_attn_with_kvcache.
def parse_variant(name):
    parts = name.split("-")
    tune, merge, splits = {"tma": parts[0] == "tma"}, "combine", 0
    if parts[0] not in ("ptr", "tma"):
        raise ValueError(f"variant {name!r}: starts with ptr or tma")
    rest = "-".join(parts[1:])
    if rest.endswith("split-only"):
        merge, rest = "split-only", rest[:-len("split-only")].rstrip("-")
    elif rest.endswith("fused"):
        merge, rest = "fused", rest[:-len("fused")].rstrip("-")
    for tok in filter(None, rest.split("-")):
        if tok == "old":
            tune["one_wave"] = False
            continue
        for prefix, key in (("waves", "waves"), ("sp", None), ("bn", "block_n"), ("s", "num_stages"),
                            ("w", "num_warps")):
            if tok.startswith(prefix) and tok[len(prefix):].isdigit():
                if key is None:
                    splits = int(tok[len(prefix):])
                else:
                    tune[key] = int(tok[len(prefix):])
                break
        else:
            raise ValueError(f"variant {name!r}: unknown part {tok!r}")
    return tune, merge, splits


SDPA = ("sdpa-cudnn", "sdpa-flash")


def make_call(variant, q, kc, vc, L):
    """A function running one decode step as `variant`, with the variant's TUNE set while it runs (a graph keeps the
    kernel its capture launched)."""
    if variant in SDPA:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        be = SDPBackend.CUDNN_ATTENTION if variant == "sdpa-cudnn" else SDPBackend.FLASH_ATTENTION
        qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)

        def run():
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
        return run
    tune, merge, splits = parse_variant(variant)

    def run():
        decode.set_tune(**{**BASE_TUNE, **tune})
        saved = decode._combine_launch
        try:
            if merge == "combine":
                return fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=L, num_splits=splits)
            if merge == "split-only":
                decode._combine_launch = lambda *a, **k: None
                return decode.forward(q, kc, vc, None, None, L, D ** -0.5, (-1, 0), 0.0, splits)[0]
            B, Sq, Hq, Dq = q.shape
            return decode._run(q, q.stride()[:3], kc, kc.stride()[:3], vc, vc.stride()[:3], B, Sq, Hq, Dq, HK, None,
                               None, L, D ** -0.5, (-1, 0), 0.0, splits, None, False, True)[0]
        finally:
            decode._combine_launch = saved
            decode.set_tune(**BASE_TUNE)
    return run


def graph_of(f, stream, calls):
    with torch.cuda.stream(stream):
        for _ in range(3):
            f()
    stream.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        for _ in range(calls):
            out = f()
    return g, out


def replay_us(g, stream, calls, reps=5):
    times = []
    with torch.cuda.stream(stream):
        g.replay()
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(stream)
            g.replay()
            b.record(stream)
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def check_reference():
    """The TMA kernel and the pointer kernel against float64 on ragged lengths (an empty cache included), unwritten
    slots holding inf and NaN, GQA and MQA, a window and softcap; bf16 and fp16."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for (Hq, Hk, Dh) in ((32, 8, 128), (8, 1, 64), (4, 4, 80), (8, 2, 256)):
            for kw in (dict(causal=True), dict(window_size=(300, 0)), dict(causal=True, softcap=20.0)):
                for splits in (0, 1, 5):
                    B, Sc = 3, 1000
                    kc, vc = (torch.randn(B + 1, Sc, Hk, Dh, device="cuda", generator=g).to(dtype) for _ in range(2))
                    q = torch.randn(B, 1, Hq, Dh, device="cuda", generator=g).to(dtype)
                    lens = torch.tensor([0, 613, 997], dtype=torch.int32, device="cuda")
                    idx = torch.tensor([2, 0, 3], dtype=torch.int32, device="cuda")
                    for c, L in zip(idx.tolist(), lens.tolist()):
                        kc[c, L:] = float("nan")
                        vc[c, L:] = float("inf")
                    ref, low = [], []
                    for b in range(B):
                        c, L = int(idx[b]), int(lens[b])
                        if L == 0:
                            ref.append(torch.zeros_like(q[b:b + 1], dtype=torch.float64))
                            low.append(torch.zeros_like(q[b:b + 1]))
                            continue
                        ref.append(attention_ref(q[b:b + 1], kc[c:c + 1, :L], vc[c:c + 1, :L],
                                                 compute_dtype=torch.float64, **kw)[0])
                        low.append(attention_ref(q[b:b + 1], kc[c:c + 1, :L], vc[c:c + 1, :L], compute_dtype=None,
                                                 **kw)[0])
                    ref, low = torch.cat(ref), torch.cat(low)
                    outs = {}
                    for tma in (False, True):
                        decode.set_tune(**{**BASE_TUNE, "tma": tma})
                        outs[tma] = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_batch_idx=idx,
                                                               num_splits=splits, **kw)
                    decode.set_tune(**BASE_TUNE)
                    bound = 2 * (low.double() - ref).abs().max().item() + 1e-3
                    errs = {t: (o.double() - ref).abs().max().item() for t, o in outs.items()}
                    rows.append(dict(dtype=str(dtype).split(".")[-1], H=Hq, Hk=Hk, D=Dh, kw=str(kw), splits=splits,
                                     err_ptr=errs[False], err_tma=errs[True], bound=bound,
                                     ok=all(e <= bound for e in errs.values()),
                                     bitwise=torch.equal(outs[False], outs[True])))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--points", default="b1-32k,b8-32k,b1-128k,b8-128k")
    ap.add_argument("--variants", default="ptr,tma,ptr-split-only,tma-split-only,ptr-fused,tma-fused,tma-s4,tma-s2,"
                                          "tma-bn128,tma-w8,sdpa-cudnn,sdpa-flash")
    ap.add_argument("--extra", default="b1-32k:ptr-sp16,ptr-sp24,ptr-sp48,ptr-sp64,tma-sp16,tma-sp24,tma-sp48,"
                                       "tma-sp64,tma-waves3,tma-waves4",
                    help="variants added at one point each: 'point:v1,v2;point:v3'")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=1e9)
    args = ap.parse_args()
    t0 = time.time()
    meta = run_meta(rounds=args.rounds, calls=args.calls, shape=f"GQA {H}/{HK}, d{D}, bf16, one query token")
    checks = check_reference()
    bad = [c for c in checks if not c["ok"]]
    nbit = sum(c["bitwise"] for c in checks)
    print(f"check: {len(checks) - len(bad)}/{len(checks)} within the bound, {nbit}/{len(checks)} TMA == pointer "
          f"bitwise; failing: {bad}", flush=True)
    results = []
    stream = torch.cuda.Stream()
    for p in args.points.split(","):
        if time.time() - t0 > args.budget_s:
            print(f"budget: {p} and later skipped", flush=True)
            break
        B, L = point(p)
        g = torch.Generator(device="cuda").manual_seed(1)
        q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        kc, vc = (torch.randn(B, L, HK, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        gbytes = 2 * B * L * HK * D * 2 / 1e9
        extra = dict(e.split(":", 1) for e in args.extra.split(";") if e)
        variants = args.variants.split(",") + (extra[p].split(",") if p in extra else [])
        graphs, row = {}, dict(point=p, B=B, L=L, variants={})
        ref = make_call("ptr", q, kc, vc, L)().clone()
        for v in variants:
            try:
                f = make_call(v, q, kc, vc, L)
                graphs[v], out = graph_of(f, stream, args.calls)
                torch.cuda.synchronize()
                graphs[v].replay()
                torch.cuda.synchronize()
                out = out if v not in SDPA else out.transpose(1, 2)
                row["variants"][v] = dict(bitwise=torch.equal(out, ref),
                                          max_diff=(out.float() - ref.float()).abs().max().item())
            except Exception as e:   # a variant that fails to compile or capture is reported, the others run
                row["variants"][v] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
                print(p, v, row["variants"][v]["error"], flush=True)
        timed = [v for v in variants if v in graphs]
        interleaved_rounds(row["variants"], {v: functools.partial(replay_us, graphs[v], stream, args.calls)
                                             for v in timed}, args.rounds, "us", 2)
        for v in timed:
            r = row["variants"][v]
            r["tb_s"] = gbytes / r["median_us"] * 1e6 / 1e3
            for sd in SDPA:
                if sd in timed:
                    r[f"of_{sd}"] = median_speedup(row["variants"], sd, v, "us")
        results.append(row)
        print(p, {v: (round(r.get("median_us", -1), 2), r.get("median_ratio"), r.get("bitwise"))
                  for v, r in row["variants"].items()}, flush=True)
        del graphs, q, kc, vc
        torch.cuda.empty_cache()
    save_json(args.out, "probe_decode", meta, t0, checks=checks, results=results)
    lines = [f"# Decode kernel variants — {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"cuDNN {meta['cudnn']}, commit {meta['commit']}", "",
             f"date {meta['date']}; {meta['shape']}; each variant in its own CUDA graph of {args.calls} calls, "
             f"{args.rounds} rounds variant after variant; ratio: to the first variant in the same round, median over "
             "rounds; ÷ cuDNN / ÷ flash: SDPA's time over the variant's in the same round (above 1: faster than it)",
             "",
             f"Check against float64 (ragged lengths, inf/NaN in unwritten slots, GQA/MQA/MHA, d64-d256, window, "
             f"softcap, split counts; bf16/fp16): {len(checks) - len(bad)}/{len(checks)} within the bound; TMA output "
             f"bitwise equal to the pointer kernel's in {nbit}/{len(checks)}", "",
             "| point | variant | median us | TB/s | ratio | ÷ cuDNN | ÷ flash | output == ptr's | max diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        for v, r in row["variants"].items():
            if "error" in r:
                lines.append(f"| {row['point']} | {v} | {r['error']} | | | | | | |")
                continue
            lines.append(f"| {row['point']} | {v} | {r['median_us']:.2f} | {r['tb_s']:.2f} | {r['median_ratio']:.3f} "
                         f"| {r.get('of_sdpa-cudnn', float('nan')):.3f} | {r.get('of_sdpa-flash', float('nan')):.3f} "
                         f"| {r['bitwise']} | {r['max_diff']:.2e} |")
    save_md(args.out, "probe_decode", lines)


if __name__ == "__main__":
    main()
