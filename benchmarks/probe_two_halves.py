"""Probe: a forward program that owns two 64-row query tiles of one head as two separate products in Triton's language
(one warpgroup, four warps), against v2's kernel, at issue 2's d128 512 unmasked cell. Dense, unmasked, no softcap,
lengths a multiple of the tiles: a probe of the idea, not a kernel of the package.

Why: v2's pick there (64 x 32 tiles, three programs an SM) is latency-bound with no unit saturated
(benchmarks/NOTES.md, twenty-fourth to twenty-ninth sessions). One program with two independent score / softmax / P.V
chains over the same K and V block gives the scheduler (ptxas, and Triton's wgmma waits) work of the other half to
issue while one half's exponentials wait, the way FA3's intra-warpgroup overlap does by hand; it also reads each K and
V block from L2 once for 128 rows (v2's 64-row tiles read it twice). The one-tensor form of the same 128 rows (a
128 x 32 tile with four warps, one product for both halves) measured 1.046x slower than the pick (twenty-fifth
session): what differs here is only that the halves are separate products and separate softmaxes.

    python benchmarks/probe_two_halves.py --out DIR [--rounds 7] [--variants ...] [--points d128-512]
    python benchmarks/probe_two_halves.py --compile     # sm_90a registers / spills / wgmma waits, no GPU needed

Variants: `v2` (the autotuner's pick, what version="v2" runs), `v2:BMxBN:WARPS:STAGES[:MAXNREG[:H]]` (a v2 config
forced; MAXNREG 0: none; H 1: v2's HALVES, the package's form of this probe's kernel),
`halves:BN:STAGES[:MAXNREG[:ORDER[:LOOPS[:FEAT]]]]` (this probe's kernel; ORDER 0: both halves' scores first, then
each half's softmax and P.V; 1: one half after the other; LOOPS 3: the keys as three loops, two of them empty, as v2's
HALVES; FEAT: parts of v2's kernel in the probe's, bits, see the kernel). A name + `+g1`: v2's tile order with one
head's tiles in a row (`_common.GROUP_TILES["v2"] = 1`). First checked against a float32 reference with flash-attn's
rule, then timed in interleaved rounds with SDPA's flash and cuDNN backends (`rounds.time_forwards`). The `v2`
variants are also checked on awkward cases (causal with q_len != k_len, a window, head dim 80, GQA and MQA, packed
sequences; bf16 and fp16).
"""
from __future__ import annotations

import os
import sys
import time

import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hf_flashattn.kernels._common import grouped_tile, head_dim_class  # noqa: E402
from hf_flashattn.kernels.v2 import _halves_range, _load_rows, _store_rows  # noqa: E402

HALF = tl.constexpr(64)   # rows a half (one warpgroup's wgmma M)


@triton.jit
def _half_step(acc, l_i, m_i, qk, v, c):
    """One half's online-softmax step on raw scores qk (the scale c folded into the exponent) and its P.V."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * c)
    p = tl.exp2(qk * c - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _probe_range(acc0, l0, m0, q0, acc1, l1, m1, q1, K_base, V_base, stride_kn, stride_vn, start, end, offs_n, offs_d,
                 qk_scale, BLOCK_N: tl.constexpr, ORDER: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(K_base + cols[:, None] * stride_kn + offs_d[None, :])
        v = tl.load(V_base + cols[:, None] * stride_vn + offs_d[None, :])
        if ORDER == 0:   # both halves' scores issued first, then each half's softmax and P.V
            qk0 = tl.dot(q0, tl.trans(k))
            qk1 = tl.dot(q1, tl.trans(k))
            acc0, l0, m0 = _half_step(acc0, l0, m0, qk0, v, qk_scale)
            acc1, l1, m1 = _half_step(acc1, l1, m1, qk1, v, qk_scale)
        else:            # one half after the other
            acc0, l0, m0 = _half_step(acc0, l0, m0, tl.dot(q0, tl.trans(k)), v, qk_scale)
            acc1, l1, m1 = _half_step(acc1, l1, m1, tl.dot(q1, tl.trans(k)), v, qk_scale)
    return acc0, l0, m0, acc1, l1, m1


@triton.jit
def _halves_kernel(Q, K, V, O, LSE, stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                   stride_vb, stride_vn, stride_vh, stride_ob, stride_om, stride_oh, stride_lb, stride_lh, seqlen,
                   qk_scale, edge, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, ORDER: tl.constexpr,
                   LOOPS: tl.constexpr = 1, FEAT: tl.constexpr = 0):
    # FEAT (a bisection toward v2's HALVES kernel; bits): 1 the key loop is v2's `_halves_range`; 2 Q loaded and O,
    # lse stored by v2's `_load_rows` / `_store_rows` (row masks, the normalisation's empty-row guard); 4 the tile from
    # v2's `grouped_tile` order
    # grid (seqlen / 128, H, B): program (t, h, b) computes rows [128 t, 128 t + 128) of head h, sequence b, as two
    # halves
    if FEAT & 4:
        t, h, b = grouped_tile(seqlen, 1024, HEAD_DIM)
        h = h.to(tl.int64)
        b = b.to(tl.int64)
    else:
        t = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
    rows0 = t * (2 * HALF) + tl.arange(0, HALF)
    rows1 = rows0 + HALF
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    Q_base = Q + b * stride_qb + h * stride_qh
    K_base = K + b * stride_kb + h * stride_kh
    V_base = V + b * stride_vb + h * stride_vh
    if FEAT & 2:
        q0 = _load_rows(Q_base, rows0, seqlen, stride_qm, offs_d, HEAD_DIM, HEAD_DIM)
        q1 = _load_rows(Q_base, rows1, seqlen, stride_qm, offs_d, HEAD_DIM, HEAD_DIM)
    else:
        q0 = tl.load(Q_base + rows0[:, None] * stride_qm + offs_d[None, :])
        q1 = tl.load(Q_base + rows1[:, None] * stride_qm + offs_d[None, :])
    m0 = tl.full([HALF], float("-inf"), dtype=tl.float32)
    m1 = tl.full([HALF], float("-inf"), dtype=tl.float32)
    l0 = tl.zeros([HALF], dtype=tl.float32)
    l1 = tl.zeros([HALF], dtype=tl.float32)
    acc0 = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
    acc1 = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
    if LOOPS == 3:   # as v2's HALVES: three loops, [0, edge), [edge, seqlen - edge), [seqlen - edge, seqlen) (edge
        # a run-time 0: the two edge loops empty, but compiled)
        acc0, l0, m0, acc1, l1, m1 = _probe_range(acc0, l0, m0, q0, acc1, l1, m1, q1, K_base, V_base, stride_kn,
                                                  stride_vn, 0, edge, offs_n, offs_d, qk_scale, BLOCK_N, ORDER)
        acc0, l0, m0, acc1, l1, m1 = _probe_range(acc0, l0, m0, q0, acc1, l1, m1, q1, K_base, V_base, stride_kn,
                                                  stride_vn, edge, seqlen - edge, offs_n, offs_d, qk_scale, BLOCK_N,
                                                  ORDER)
        acc0, l0, m0, acc1, l1, m1 = _probe_range(acc0, l0, m0, q0, acc1, l1, m1, q1, K_base, V_base, stride_kn,
                                                  stride_vn, seqlen - edge, seqlen, offs_n, offs_d, qk_scale, BLOCK_N,
                                                  ORDER)
    elif FEAT & 1:
        acc0, l0, m0, acc1, l1, m1 = _halves_range(acc0, l0, m0, q0, rows0, acc1, l1, m1, q1, rows1, K_base, V_base,
                                                   stride_kn, stride_vn, 0, seqlen, offs_n, offs_d, seqlen, 0, seqlen,
                                                   seqlen, qk_scale, HEAD_DIM, HEAD_DIM, BLOCK_N, False, "tf32", True)
    else:
        acc0, l0, m0, acc1, l1, m1 = _probe_range(acc0, l0, m0, q0, acc1, l1, m1, q1, K_base, V_base, stride_kn,
                                                  stride_vn, 0, seqlen, offs_n, offs_d, qk_scale, BLOCK_N, ORDER)
    O_base = O + b * stride_ob + h * stride_oh
    L_base = LSE + b * stride_lb + h * stride_lh
    if FEAT & 2:
        _store_rows(O_base, L_base, acc0, l0, m0, rows0, seqlen, stride_om, offs_d, HEAD_DIM, HEAD_DIM)
        _store_rows(O_base, L_base, acc1, l1, m1, rows1, seqlen, stride_om, offs_d, HEAD_DIM, HEAD_DIM)
        return
    tl.store(O_base + rows0[:, None] * stride_om + offs_d[None, :], (acc0 / l0[:, None]).to(O.dtype.element_ty))
    tl.store(O_base + rows1[:, None] * stride_om + offs_d[None, :], (acc1 / l1[:, None]).to(O.dtype.element_ty))
    tl.store(L_base + rows0, (m0 + tl.log2(l0)) * 0.6931471805599453)
    tl.store(L_base + rows1, (m1 + tl.log2(l1)) * 0.6931471805599453)


def halves_forward(q, k, v, block_n=32, stages=3, maxnreg=None, order=0, loops=1, feat=0):
    """(out, lse) of dense (B, S, H, D) q, k, v without a mask: S a multiple of 128 and of block_n, one key head a
    query head, D a power of two (the probe's restrictions, checked)."""
    import torch
    B, S, H, D = q.shape
    if S % (2 * HALF.value) or S % block_n or k.shape != q.shape or v.shape != q.shape or D & (D - 1):
        raise ValueError(f"probe restriction: shapes {tuple(q.shape)} {tuple(k.shape)}")
    out = torch.empty_like(q)
    lse = torch.empty((B, H, S), device=q.device, dtype=torch.float32)
    scale = D ** -0.5 * 1.4426950408889634
    _halves_kernel[(S // (2 * HALF.value), H, B)](
        q, k, v, out, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), lse.stride(0),
        lse.stride(1), S, scale, 0, HEAD_DIM=D, BLOCK_N=block_n, ORDER=order, LOOPS=loops, FEAT=feat, num_warps=4,
        num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    return out, lse


def parse_variant(name):
    f = name.split(":")
    if f[0] == "halves":
        return dict(block_n=int(f[1]), stages=int(f[2]), maxnreg=int(f[3]) if len(f) > 3 and int(f[3]) else None,
                    order=int(f[4]) if len(f) > 4 else 0, loops=int(f[5]) if len(f) > 5 else 1,
                    feat=int(f[6]) if len(f) > 6 else 0)
    raise SystemExit(f"unknown variant {name}")


def compile_report(variants):
    """sm_90a compile of each `halves` variant with the local Triton and its bundled ptxas (no GPU)."""
    os.environ["TRITON_INTERPRET"] = "0"
    from compile_sm90 import compile_one
    for name in variants:
        if not name.startswith("halves"):
            continue
        p = parse_variant(name)
        ce = dict(HEAD_DIM=128, BLOCK_N=p["block_n"], ORDER=p["order"], LOOPS=p["loops"], FEAT=p["feat"])
        r = compile_one(_halves_kernel, ce, 4, p["stages"], maxnreg=p["maxnreg"])
        print(f"{name}: regs {r['regs']} spill st/ld {r['spill_st']}/{r['spill_ld']} smem {r['smem']} "
              f"wgmma {r['wgmma']} mma.sync {r['mma_sync']}", flush=True)


POINTS = {"d128-512": (128, 512, 32, 16, 16, False), "d128-1k": (128, 1024, 16, 16, 16, False),
          "d64-512": (64, 512, 32, 32, 32, False), "d128-512-causal": (128, 512, 32, 16, 16, True),
          "d64-1k": (64, 1024, 16, 32, 32, False), "d128-4k": (128, 4096, 4, 16, 16, False),
          "d128-4k-causal": (128, 4096, 4, 16, 16, True), "d256-512-causal": (256, 512, 32, 8, 8, True)}


def main():
    from rounds import probe_parser
    ap = probe_parser(POINTS, no_check=True)
    ap.add_argument("--variants", default="v2,v2:64x32:4:3:168,halves:32:3,halves:32:3:0:1,halves:64:2,"
                                          "halves:32:2,halves:64:3:232")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if args.compile:
        compile_report(variants)
        return
    import functools

    import torch

    from fwd_rule import forward_rule
    from hf_flashattn import flash_attn_func, flash_attn_varlen_func
    from hf_flashattn.kernels import v2
    from rounds import forward_points, run_meta, save_json, save_md, sdpa_forward, time_forwards

    t0 = time.time()
    meta = run_meta(rounds=args.rounds, iters=args.iters, variants=variants)

    def runner(name, q, k, v):
        if name.endswith("+g1"):
            from hf_flashattn.kernels import _common
            f = runner(name[:-3], q, k, v)

            def grouped_1(**kw):
                old = _common.GROUP_TILES["v2"]
                _common.GROUP_TILES["v2"] = 1
                try:
                    return f(**kw)
                finally:
                    _common.GROUP_TILES["v2"] = old
            return grouped_1
        if name.startswith("halves"):
            return functools.partial(halves_forward, q, k, v, **parse_variant(name))
        cfg = None
        if name.startswith("v2:"):
            f = name.split(":")
            bm, bn = (int(x) for x in f[1].split("x"))
            cfg = v2._fwd_config(head_dim_class(q.shape[-1]), bm, bn, int(f[2]), int(f[3]),
                                 int(f[4]) if len(f) > 4 and int(f[4]) else None, len(f) > 5 and f[5] == "1")

        def call(**kw):
            v2._fwd_launch.force = cfg
            try:
                if "cu_seqlens_q" in kw:
                    return flash_attn_varlen_func(q, k, v, return_attn_probs=True, version="v2", **kw)[:2]
                return flash_attn_func(q, k, v, return_attn_probs=True, version="v2", **kw)[:2]
            finally:
                v2._fwd_launch.force = None
        return call

    results, checks = {}, []
    # the check: each variant on a small and the timed shapes against a float32 reference (flash-attn's rule)
    for shape in ((2, 256, 4, 128), (1, 512, 2, 64)):
        q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for name in variants:
            out, lse = runner(name, q, k, v)()
            r = forward_rule(out, lse, q, k, v)
            checks.append(dict(variant=name, shape=list(shape), **r))
            print(name, shape, r, flush=True)
    # v2's variants on awkward cases: (B, Sq, Sk, H, Hk, D), mask; packed: three sequences of ragged lengths
    awkward = [((2, 113, 203, 8, 2, 128), dict(causal=True)), ((1, 250, 130, 4, 4, 128), {}),
               ((1, 300, 300, 4, 4, 128), dict(window_size=(64, 0))), ((2, 77, 77, 4, 1, 80), {}),
               ((1, 200, 200, 6, 3, 64), dict(window_size=(-1, 16))), ((1, 129, 129, 4, 4, 40), dict(causal=True)),
               ((1, 400, 400, 4, 2, 128), dict(causal=True, packed=(0, 100, 257, 400))),
               ((1, 300, 300, 4, 4, 64), dict(packed=(0, 37, 300)))]
    for (B, Sq, Sk, H, Hk, D), mask in ([] if args.no_check else awkward):
        for dtype in (torch.bfloat16, torch.float16):
            q = torch.randn(B, Sq, H, D, device="cuda", dtype=dtype)
            k, v = (torch.randn(B, Sk, Hk, D, device="cuda", dtype=dtype) for _ in range(2))
            kw = dict(mask)
            if "packed" in kw:
                cu = torch.tensor(kw.pop("packed"), device="cuda", dtype=torch.int32)
                q, k, v = q[0], k[0], v[0]
                kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu)
                n = int((cu[1:] - cu[:-1]).max())
                call_kw = dict(kw, max_seqlen_q=n, max_seqlen_k=n)
            else:
                call_kw = kw
            for name in variants:
                if not name.startswith("v2") or name.endswith("+g1"):
                    continue
                out, lse = runner(name, q, k, v)(**call_kw)
                r = forward_rule(out, lse, q, k, v, **kw)
                checks.append(dict(variant=name, shape=[B, Sq, Sk, H, Hk, D], mask=str(mask), dtype=str(dtype), **r))
                print(name, (B, Sq, Sk, H, Hk, D), mask, dtype, r, flush=True)
    for p, (D, S, B, H, Hk, causal), (q, k, v), (qt, kt, vt), flops in forward_points(args.points, POINTS, t0,
                                                                                      args.budget_s):
        calls = {"sdpa-flash": functools.partial(sdpa_forward, "flash", qt, kt, vt, causal, False),
                 "sdpa-cudnn": functools.partial(sdpa_forward, "cudnn", qt, kt, vt, causal, False)}
        for name in variants:
            if name.startswith("halves") and causal:   # the probe's kernel has no mask
                continue
            calls[name] = functools.partial(runner(name, q, k, v), **({"causal": True} if causal else {}))
        results[p] = time_forwards(calls, args.rounds, args.iters, flops)
        print(p, {n: (round(r["median_ms"] * 1e3, 1), round(r["of_flash"], 3)) for n, r in results[p].items()},
              flush=True)
    save_json(args.out, "probe_two_halves", meta, t0, checks=checks, results=results)
    lines = [f"# Two 64-row halves a program (probe), {meta['device']}, torch {meta['torch']}, triton "
             f"{meta['triton']}, commit {meta['commit']}, {meta['date']}", "",
             f"{args.rounds} interleaved rounds of {args.iters} calls; ratios are medians over rounds of SDPA-flash's "
             "time over the variant's (above 1: faster than flash).", "",
             "| point | variant | us | TFLOP/s | / flash | / cuDNN |", "|---|---|---|---|---|---|"]
    for p, recs in results.items():
        for n, r in recs.items():
            lines.append(f"| {p} | {n} | {r['median_ms'] * 1e3:.1f} | {r['tflops']:.0f} | {r['of_flash']:.3f} | "
                         f"{r['of_cudnn']:.3f} |")
    bad = [c for c in checks if not c["ok"]]
    lines += ["", f"Check: {len(checks) - len(bad)}/{len(checks)} within flash-attn's rule (each variant on dense "
              "unmasked shapes; v2's also on the awkward cases, bf16 and fp16)" +
              (": FAILED " + ", ".join(f"{c['variant']} {c['shape']} {c.get('mask', '')} {c.get('dtype', '')}"
                                       for c in bad) if bad else ".")]
    save_md(args.out, "probe_two_halves", lines)


if __name__ == "__main__":
    main()
