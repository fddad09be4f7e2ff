"""GPU correctness grid (bf16/fp16, real sizes) against a float32 reference, flash-attn's error rule.

    python benchmarks/gpu_check.py --out DIR [--versions v2,v1]

Version "v2-halves": v2 with its forward forced to the HALVES config of the head-dim class (the cases it applies to).

Rule: |kernel - ref32| <= 2 x |torch_lowprec - ref32| + floor for out (max-abs), 3x for gradients
(the backward adds two matmuls and the rounding of dS to 16 bits, so its error is larger by
construction; flash-attn's own tests allow the same). The low-precision path is the reference
computed in the input dtype on the GPU. Writes check.json with one row per case.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_flashattn as fa  # noqa: E402
from hf_flashattn.kernels import _common as C  # noqa: E402
from hf_flashattn.reference import attention_ref, attention_varlen_ref  # noqa: E402
from rounds import switched  # noqa: E402

FLOOR = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# --direct: each case also checks that later calls (the kept direct launches) and calls with FAST_LAUNCH off give the
# first call's bits (run with autotuning on: the tuned kernels' direct launch exists only then)
DIRECT = False
# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim)
SHAPES = [(2, 113, 203, 8, 2, 80), (1, 1023, 1024, 4, 4, 64), (1, 1024, 1023, 8, 1, 128),
          (2, 512, 512, 32, 8, 96), (1, 1, 2048, 32, 8, 128), (1, 256, 384, 4, 4, 256),
          (1, 200, 257, 4, 1, 192), (1, 2048, 2048, 16, 16, 128),
          (1, 777, 4500, 8, 2, 128)]   # keys >= 4096: v3's long-sequence plan at d128
MASKS = [dict(causal=False), dict(causal=True), dict(window_size=(128, 0)), dict(window_size=(64, 32), softcap=30.0)]
# q, k, v as views of one stacked tensor (flash_attn_qkvpacked_func and kin): (shape, varlen, stacked); qkv needs
# seqlen_q = seqlen_k and nheads = nheads_k
STACKED = [((2, 1024, 1024, 16, 16, 128), False, "qkv"), ((2, 113, 203, 8, 2, 80), False, "kv"),
           ((3, 700, 700, 8, 8, 128), True, "qkv"), ((3, 700, 700, 8, 2, 64), True, "kv")]


def _ref(q, k, v, do, cu, dtype, kw):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    if cu is None:
        out, lse = attention_ref(*leaves, compute_dtype=dtype, **kw)
    else:
        out, lse = attention_varlen_ref(*leaves, cu, cu, compute_dtype=dtype, **kw)
    return (out, lse, *torch.autograd.grad(out, leaves, do.to(dtype)))


def _stacked_call(stacked, q, k, v, cu, version, kw):
    """(out, lse, grads): q, k and v as views of one stacked tensor (stacked="qkv", through
    flash_attn[_varlen]_qkvpacked_func) or k and v (stacked="kv", the kvpacked functions); grads(do) is (dq, dk, dv),
    taken with respect to the stacked leaf and split back."""
    dim = -3   # (B, S, 3, H, D) dense, (total, 3, H, D) packed
    opts = dict(return_attn_probs=True, version=version, **kw)
    m = None if cu is None else int((cu[1:] - cu[:-1]).max())
    if stacked == "qkv":
        leaves = [torch.stack([q, k, v], dim=dim).requires_grad_()]
        if cu is None:
            out, lse, _ = fa.flash_attn_qkvpacked_func(*leaves, **opts)
        else:
            out, lse, _ = fa.flash_attn_varlen_qkvpacked_func(*leaves, cu, m, **opts)
    else:
        leaves = [q.clone().requires_grad_(), torch.stack([k, v], dim=dim).requires_grad_()]
        if cu is None:
            out, lse, _ = fa.flash_attn_kvpacked_func(*leaves, **opts)
        else:
            out, lse, _ = fa.flash_attn_varlen_kvpacked_func(*leaves, cu, cu, m, m, **opts)

    def grads(do):
        *dq, stacked_grad = torch.autograd.grad(out, leaves, do)
        return (*dq, *stacked_grad.unbind(dim))
    return out, lse, grads


def halves_config(shape, kw):
    """version "v2-halves": v2 with its forward forced to the first HALVES config that the autotuner would be offered
    for this case (`v2.prune_fwd`), which this grid, run without tuning, never reaches; None where none is (head dims
    over 128, softcap)."""
    from hf_flashattn.kernels import v2
    offered = v2.prune_fwd(v2._fwd_configs(), {}, BLOCK_D=shape[-1], FOLD=v2.FOLD, SOFTCAP=bool(kw.get("softcap")))
    return next((c for c in offered if c.kwargs.get("HALVES")), None)


def run_case(version, dtype, shape, kw, varlen=False, stacked=None):
    """stacked: None (separate q, k, v), "qkv" or "kv" (the packed-argument functions, `_stacked_call`)."""
    if version == "v2-halves":
        from hf_flashattn.kernels import v2
        v2._fwd_launch.force = halves_config(shape, kw)
        try:
            row = run_case("v2", dtype, shape, kw, varlen, stacked)
        finally:
            v2._fwd_launch.force = None
        row["version"] = version
        return row
    B, Sq, Sk, H, Hk, D = shape
    dev = "cuda"
    cu = None
    if varlen:  # pack B sequences of different lengths
        lens = [Sq - 37 * i for i in range(B)]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
        q = torch.randn(sum(lens), H, D, device=dev, dtype=dtype)
        k, v = (torch.randn(sum(lens), Hk, D, device=dev, dtype=dtype) for _ in range(2))
    else:
        q = torch.randn(B, Sq, H, D, device=dev, dtype=dtype)
        k, v = (torch.randn(B, Sk, Hk, D, device=dev, dtype=dtype) for _ in range(2))
    do = torch.randn_like(q)

    def call():
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        if stacked:
            out, lse, grads = _stacked_call(stacked, q, k, v, cu, version, kw)
        elif varlen:
            m = int((cu[1:] - cu[:-1]).max())
            out, lse, _ = fa.flash_attn_varlen_func(qq, kk, vv, cu, cu, m, m, return_attn_probs=True, version=version,
                                                    **kw)
        else:
            out, lse, _ = fa.flash_attn_func(qq, kk, vv, return_attn_probs=True, version=version, **kw)
        return (out, lse, *(grads(do) if stacked else torch.autograd.grad(out, (qq, kk, vv), do)))
    got = call()
    direct = None
    if DIRECT:
        # the same call twice more: again (after the first call's tuning, the kept launches: `Launcher._direct`,
        # `FastLaunch`) and with FAST_LAUNCH off (every launch through Triton's entry point); all bits equal
        again = call()
        with switched((C, "FAST_LAUNCH", False)):
            entry = call()
        direct = all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(got, again, entry))
    ref = _ref(q, k, v, do, cu, torch.float32, kw)
    low = _ref(q, k, v, do, cu, dtype, kw)
    row = dict(version=version, dtype=str(dtype).split(".")[-1], shape=list(shape), varlen=varlen, stacked=stacked,
               **{k_: (list(v_) if isinstance(v_, tuple) else v_) for k_, v_ in kw.items()}, ok=True)
    for name, i, f in (("out", 0, 2), ("dq", 2, 3), ("dk", 3, 3), ("dv", 4, 3)):
        err = (got[i].float() - ref[i]).abs().max().item()
        base = (low[i].float() - ref[i]).abs().max().item()
        bound = f * base + FLOOR[dtype]
        ok = bool(torch.isfinite(got[i]).all()) and err <= bound
        row[name] = dict(err=err, torch_err=base, bound=bound, ok=ok)
        row["ok"] &= ok
    if direct is not None:
        row["direct_bitwise"] = direct
        row["ok"] &= direct
    fin = torch.isfinite(ref[1])
    row["lse_inf_match"] = bool(torch.equal(torch.isinf(got[1]), ~fin))
    row["lse_err"] = (got[1][fin] - ref[1][fin]).abs().max().item() if fin.any() else 0.0
    row["ok"] &= row["lse_inf_match"] and row["lse_err"] < 1e-2
    return row


def run_cases(cases, t_end, extra=None, version="v3"):
    """The probes' checks: run_case over (dtype, shape, kw, varlen) cases until the clock passes t_end, each row
    printed PASS/FAIL as JSON; extra(row, dtype, shape, kw, varlen) may add checks of its own to a row. A case that
    raises is a failed row with the error, and the cases go on."""
    rows = []
    for dtype, shape, kw, varlen in cases:
        if time.time() > t_end:
            break
        try:
            row = run_case(version, dtype, shape, kw, varlen=varlen)
            if extra is not None:
                extra(row, dtype, shape, kw, varlen)
        except Exception as e:  # noqa: BLE001
            row = dict(dtype=str(dtype), shape=list(shape), varlen=varlen, **{k: str(v) for k, v in kw.items()},
                       ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
        print(("PASS " if row["ok"] else "FAIL ") + json.dumps(row), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--versions", default="v2")
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--dtypes", default="bf16,fp16", help="a subset, e.g. fp16 to finish a grid a budget cut short")
    ap.add_argument("--packed-only", action="store_true", help="only the packed (varlen) cases")
    ap.add_argument("--head-dims", default=None, help="only the cases of these head dims, e.g. 192,256")
    ap.add_argument("--stacked-only", action="store_true",
                    help="only the cases whose q, k, v (or k, v) are views of one stacked tensor (qkvpacked/kvpacked)")
    ap.add_argument("--single-pass-from-keys", type=int, default=None,
                    help="v3_gluon_bwd.SINGLE_PASS_FROM_KEYS for the run (0: v3's single-pass backward on every shape "
                         "at d64/d128, which by default takes it only from 2048 visible keys)")
    ap.add_argument("--direct", action="store_true",
                    help="each case run three times: first, again (the kept direct launches) and with FAST_LAUNCH "
                         "off; the four outputs must be bitwise equal across the three (with autotuning on, and with "
                         "--single-pass-from-keys above the grid's lengths where v3's atomic dQ would differ)")
    args = ap.parse_args()
    global DIRECT
    DIRECT = args.direct
    if args.single_pass_from_keys is not None:
        from hf_flashattn.kernels import v3_gluon_bwd
        v3_gluon_bwd.SINGLE_PASS_FROM_KEYS = args.single_pass_from_keys
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    rows, t0 = [], time.time()
    cases = []
    for version in args.versions.split(","):
        for dtype in [{"bf16": torch.bfloat16, "fp16": torch.float16}[d] for d in args.dtypes.split(",")]:
            for shape in SHAPES:
                for kw in MASKS:
                    if dtype == torch.float16 and kw != MASKS[1]:
                        continue        # fp16: causal only (bf16 carries the full mask grid)
                    cases.append((version, dtype, shape, kw, False))
            for kw in MASKS[:3]:
                cases.append((version, dtype, (3, 700, 700, 8, 2, 128), kw, True))
            for kw in MASKS[:2]:   # d64 packed, GQA: v3's single-pass backward
                cases.append((version, dtype, (3, 300, 300, 8, 2, 64), kw, True))
            cases.append((version, dtype, (2, 4200, 4200, 4, 2, 128), MASKS[1], True))   # packed, long plan
            cases.append((version, dtype, (3, 300, 300, 4, 1, 256), MASKS[0], True))
            cases.append((version, dtype, (3, 300, 300, 8, 8, 64), MASKS[3], True))
            for shape, varlen, stacked in STACKED:
                for kw in MASKS[:2]:
                    cases.append((version, dtype, shape, kw, varlen, stacked))
    cases = [c + (None,) * (6 - len(c)) for c in cases]
    cases = [c for c in cases if c[0] != "v2-halves" or halves_config(c[2], c[3]) is not None]
    if args.packed_only:
        cases = [c for c in cases if c[4]]
    if args.head_dims:
        cases = [c for c in cases if c[2][-1] in {int(d) for d in args.head_dims.split(",")}]
    if args.stacked_only:
        cases = [c for c in cases if c[5]]
    for version, dtype, shape, kw, varlen, stacked in cases:
        if time.time() - t0 > args.budget_s:
            print(f"time budget of {args.budget_s}s reached: {len(cases) - len(rows)} cases not run")
            break
        try:
            r = run_case(version, dtype, shape, kw, varlen, stacked)
        except Exception as e:  # a compile or launch failure is a failed case, and the grid goes on
            r = dict(version=version, dtype=str(dtype).split(".")[-1], shape=list(shape), varlen=varlen, stacked=stacked,
                     **kw, ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
            print("FAIL " + json.dumps(r, default=str), flush=True)
            torch.cuda.empty_cache()
        else:
            print(("PASS " if r["ok"] else "FAIL ") + json.dumps({k: r[k] for k in ("version", "dtype", "shape", "varlen",
                                                                           "stacked")}
                  | {k: r[k] for k in r if k in ("causal", "window_size", "softcap")}
                  | {n: "%.2e/%.2e" % (r[n]["err"], r[n]["bound"]) for n in ("out", "dq", "dk", "dv")}
                  | {k: r[k] for k in r if k == "direct_bitwise"}), flush=True)
        rows.append(r)
        with open(os.path.join(args.out, "check.json"), "w") as f:
            json.dump(rows, f, indent=1, default=str)
    bad = [r for r in rows if not r["ok"]]
    print(f"correctness grid: {len(rows) - len(bad)}/{len(rows)} pass in {time.time() - t0:.0f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
