"""Markdown summary of benchmarks/sweep_bwd.py's JSON: per grid point, SDPA's backward beside each forced
config of one pass (the other pass at its default), with registers and spills; and the best combination; the merged
launch's pairs (`v2_bwd.MERGE`) where the sweep timed them.

    python benchmarks/summarize_sweep_bwd.py sweep_bwd.json > sweep_bwd.md
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path):
    d = json.load(open(path))
    out = [f"# v2 tile sweep — {d['gpu']}, torch {d['torch']}, triton {d['triton']}, commit {d['commit']}", "",
           "bf16, H = 2048 / D heads, B = 16384 / S; backward TFLOP/s = 2.5 x forward FLOPs / backward time. "
           "Each row forces one pass's config (BLOCK_M, BLOCK_N, warps, stages[, split]); the other pass runs its "
           "default (the first config of its list: the default when the sweep ran). (n) = spilled registers of the loaded kernel.", ""]
    pts = defaultdict(list)
    for r in d["rows"]:
        pts[(r["D"], r["S"], r["causal"])].append(r)
    for (D, S, causal), rs in pts.items():
        base = {r["impl"]: r for r in rs if r["impl"] != "ours"}
        out.append(f"## D={D} S={S} causal={causal}: SDPA backward cuDNN {base['sdpa-cudnn']['bwd_tflops']:.0f}, "
                   f"flash {base['sdpa-flash']['bwd_tflops']:.0f} TFLOP/s")
        out.append("")
        by = defaultdict(list)
        for r in rs:
            if r["impl"] == "ours":
                t = r.get("bwd_tflops") or r.get("tflops")
                by[r["kind"]].append(f"{tuple(r['cfg'])}: " + (f"{t:.0f} ({r.get('n_spills')})" if t else "error"))
        for kind, cells in by.items():
            out.append(f"- {kind}: " + " · ".join(cells))
        dk = [r for r in rs if r.get("kind") == "dkdv" and r.get("ms")]
        dq = [r for r in rs if r.get("kind") == "dq" and r.get("ms")]
        if dk and dq:
            t0 = (dk[0]["ms"] + dq[0]["ms"]) / 2            # both rows run the two defaults: the same time
            bk, bq = min(dk, key=lambda r: r["ms"]), min(dq, key=lambda r: r["ms"])
            best = bk["ms"] + bq["ms"] - t0
            fl = 4 * D * S * S * (2048 // D) * (16384 // S) * (0.5 if causal else 1.0)
            out.append(f"- best combination (dK/dV {tuple(bk['cfg'])}, dQ {tuple(bq['cfg'])}), estimated from the two "
                       f"passes' differences: {2.5 * fl / best / 1e9:.0f} TFLOP/s against the default's "
                       f"{2.5 * fl / t0 / 1e9:.0f}")
        mg = [r for r in rs if r.get("kind") == "merged" and r.get("ms")]
        if mg:
            bm = min(mg, key=lambda r: r["ms"])
            out.append(f"- merged launch: best pair {tuple(map(tuple, bm['cfg']))} {bm['bwd_tflops']:.0f} TFLOP/s, the "
                       f"default pair (first) {mg[0]['bwd_tflops']:.0f}")
        out.append("")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
