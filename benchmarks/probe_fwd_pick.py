"""v2's forward at a few points: the autotuner's pick and its timings, then each config of the head-dim class forced
in turn (registers, spills and shared memory from the loaded kernel), beside SDPA-flash in the same rounds. Written
to compare Triton releases on one machine (run it under each; benchmarks/carry_triton.sh brings a second release).

    python benchmarks/probe_fwd_pick.py --out DIR [--points 256:512:0,256:512:1] [--rounds 7]

A point is D:S:causal at batch 16384 // S, 8 heads (the grid's d256 rows).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_flashattn  # noqa: E402
from hf_flashattn.kernels import _common as C  # noqa: E402
from hf_flashattn.kernels import v2  # noqa: E402
from rounds import switched  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--points", default="256:512:0,256:512:1")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(0)
    rows = []
    ver = triton.__version__
    for spec in a.points.split(","):
        D, S, causal = (int(x) for x in spec.split(":"))
        B, H = max(1, 16384 // S), 8
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        fwd = (lambda: hf_flashattn.flash_attn_func(q, k, v, causal=bool(causal), version="v2"))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

        def flash():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=bool(causal))

        ref = fwd()
        tuned = v2._fwd_launch.tuned
        best = tuned.best_config if tuned is not None else None
        timings = {str(c): [round(x, 4) for x in (t if isinstance(t, (list, tuple)) else [t])]
                   for c, t in (getattr(tuned, "configs_timings", None) or {}).items()}
        cands = [c for c in v2._fwd_configs() if c.kwargs["D_CLASS"] == C.head_dim_class(D)]
        impls = {"pick": fwd, "sdpa-flash": flash}
        meta = {}
        for c in cands:
            name = f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}:{c.num_warps}:{c.num_stages}"

            def forced(c=c):
                with switched((v2._fwd_launch, "force", c)):
                    return fwd()
            out = forced()
            last = v2._fwd_launch.last
            meta[name] = {"regs": getattr(last, "n_regs", None), "spills": getattr(last, "n_spills", None),
                          "shared": getattr(getattr(last, "metadata", None), "shared", None),
                          "max_abs_vs_pick": (out.float() - ref.float()).abs().max().item()}
            impls[name] = forced
        times = {n: [] for n in impls}
        for _ in range(a.rounds):
            for n, f in impls.items():
                times[n].append(do_bench(f, warmup=10, rep=40))
        med = {n: statistics.median(t) for n, t in times.items()}
        row = {"triton": ver, "D": D, "S": S, "B": B, "H": H, "causal": bool(causal), "best_config": str(best),
               "tuner_timings": timings, "median_ms": med, "meta": meta,
               "flash_over": {n: med["sdpa-flash"] / m for n, m in med.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(os.path.join(a.out, f"probe_fwd_pick-{ver}.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
