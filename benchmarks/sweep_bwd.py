"""Sweep of the v2 kernels' tile configs on one GPU: the backward's dK/dV and dQ passes as two launches, the merged
launch's pairs (`v2_bwd.MERGE`), and the forward at the small-sequence points, each config forced in turn, beside
SDPA-cuDNN and SDPA-flash measured in the same process. Registers and spills are read from the loaded kernels.

    python benchmarks/sweep_bwd.py --out DIR [--dims 64,128,256] [--budget-s 400]

Compiling dominates: the configs are compiled first by a pool of worker processes on tiny inputs of
the same specialisation (Triton's on-disk cache is shared), then timed in this process.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import multiprocessing as mp
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, split[, kv_b]]) candidates per head dim; kv_b (the queries x keys
# orientation) needs BLOCK_M >= 64 for wgmma (a local sm_90a compile of BLOCK_M 32 used mma.sync for QKᵀ)
DKDV = {64: [(64, 64, 4, 3, False, True), (32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3),
             (32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2), (64, 64, 8, 3), (32, 128, 4, 5), (32, 128, 4, 3, True),
             (64, 128, 8, 2, True), (32, 128, 8, 3, True), (64, 128, 8, 2, False, True),
             (64, 64, 8, 2, False, True), (64, 128, 4, 3, False, True), (128, 64, 8, 2, False, True),
             (128, 128, 8, 2, False, True), (64, 128, 8, 3, False, True),
             # fewer spills in a local sm_90a compile (NOTES, fourth session), not yet timed
             (64, 32, 4, 3, False, True), (64, 32, 4, 4, False, True), (128, 64, 8, 3, False, True),
             (128, 32, 8, 2, False, True)],
        128: [(32, 64, 4, 3), (32, 128, 8, 2), (64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2),
              (32, 64, 8, 2), (32, 128, 4, 3), (32, 128, 8, 2, True), (64, 128, 8, 2, True), (32, 128, 8, 3, True),
              (32, 64, 4, 3, True), (64, 64, 4, 3, False, True), (64, 64, 8, 2, False, True),
              (64, 128, 8, 2, False, True)],
        256: [(32, 128, 8, 2, True), (32, 64, 8, 2), (16, 64, 4, 2), (32, 32, 8, 2), (64, 64, 8, 2), (16, 32, 4, 2),
              (32, 64, 8, 2, True), (64, 64, 8, 2, True), (16, 64, 4, 2, True), (64, 64, 8, 2, True, True),
              (64, 128, 8, 2, True, True),
              # fewer spills with one loop a tile in a local sm_90a compile (twenty-first session): 96-192 bytes against
              # the first's 432 ((32, 64, 8, 2, True) above: 112)
              (16, 64, 8, 2, True), (16, 128, 8, 2, True), (32, 128, 8, 1, True), (16, 64, 8, 3, True),
              (64, 128, 8, 1, True)]}
DQ = {64: [(64, 64, 4, 3), (128, 32, 8, 3), (128, 32, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3), (128, 64, 8, 3)],
      128: [(128, 64, 8, 3), (128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
      256: [(128, 32, 8, 2), (64, 32, 8, 2), (64, 16, 4, 2), (32, 32, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)]}
# the merged launch (`v2_bwd.MERGE`, d256 by default): (dK/dV config, dQ config) pairs sharing warps and stages, the
# package's default first; the others compiled locally for sm_90a (Triton 3.6) within the shared-memory limit
# (a seventh field: the split dV programs' query-tile height, `DV_BLOCK_M`)
MERGED = {256: [((32, 128, 8, 2, True, False, 64), (128, 32, 8, 2)), ((32, 128, 8, 2, True), (128, 32, 8, 2)),
                ((32, 128, 8, 2, True, False, 64), (64, 64, 8, 2)), ((16, 128, 8, 2, True, False, 64), (128, 32, 8, 2)),
                ((16, 64, 4, 2, True), (64, 16, 4, 2)),
                ((16, 128, 8, 2, True), (128, 32, 8, 2)), ((32, 64, 8, 2, True), (128, 32, 8, 2)),
                ((16, 64, 8, 2, True), (128, 32, 8, 2)), ((64, 128, 8, 1, True), (128, 32, 8, 1)),
                ((32, 128, 8, 1, True), (128, 32, 8, 1)), ((32, 128, 8, 2, True), (64, 64, 8, 2)),
                ((32, 128, 8, 2, True), (64, 32, 8, 2)), ((64, 64, 8, 2, True, True), (128, 32, 8, 2)),
                ((64, 64, 8, 2, True), (128, 32, 8, 2))]}
FWD = {64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4)],
       128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 4),
             (128, 32, 4, 4)],
       256: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 3)]}


def cfg(c, d):
    from hf_flashattn.kernels import _common as C
    from hf_flashattn.kernels import v2_bwd
    if isinstance(c[0], tuple):   # a merged pair
        return v2_bwd._merged_config(C.head_dim_class(d), *c)
    return v2_bwd._config(C.head_dim_class(d), *c)


@contextlib.contextmanager
def _merge_for(kind, d):
    """`v2_bwd.MERGE` of d's class set for the timing of one kind (dK/dV and dQ configs are forced on the two
    launches, the merged pairs on the one), restored after."""
    from hf_flashattn.kernels import _common as C
    from hf_flashattn.kernels import v2_bwd
    cls = C.head_dim_class(d)
    old = v2_bwd.MERGE[cls]
    if kind != "fwd":
        v2_bwd.MERGE[cls] = kind == "merged"
    try:
        yield
    finally:
        v2_bwd.MERGE[cls] = old


def inputs(B, H, Hk, S, D, grad=False):
    mk = lambda h: torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=grad)  # noqa: E731
    return mk(H), mk(Hk), mk(Hk), torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)


def run_once(kind, c, D, S=256, H=4, Hk=4, B=1, causal=False):
    """One forced launch (compiles on first use); returns the CompiledKernel's registers and spills."""
    from hf_flashattn.kernels import v2, v2_bwd
    q, k, v, do = inputs(B, H, Hk, S, D)
    out, lse = v2.forward(q, k, v, None, None, S, S, D ** -0.5, (-1, 0) if causal else (-1, -1), 0.0)
    launcher = {"fwd": v2._fwd_launch, "dkdv": v2_bwd._dkdv_launch, "dq": v2_bwd._dq_launch,
                "merged": v2_bwd._merged_launch}[kind]
    launcher.force = cfg(c, D)
    try:
        with _merge_for(kind, D):
            if kind == "fwd":
                v2.forward(q, k, v, None, None, S, S, D ** -0.5, (-1, 0) if causal else (-1, -1), 0.0)
            else:
                v2_bwd.backward(do, q, k, v, out, lse, None, None, S, S, D ** -0.5, (-1, 0) if causal else (-1, -1),
                                0.0)
        torch.cuda.synchronize()
        ck = launcher.last
        return dict(n_regs=getattr(ck, "n_regs", None), n_spills=getattr(ck, "n_spills", None))
    finally:
        launcher.force = None


def _worker(job):
    os.environ.setdefault("HF_FLASHATTN_AUTOTUNE", "0")
    kind, c, D = job
    try:
        return job, run_once(kind, c, D)
    except Exception as e:  # noqa: BLE001
        return job, dict(error=f"{type(e).__name__}: {str(e)[:200]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--kinds", default="merged,dkdv,dq,fwd", help="which tables to compile and time")
    ap.add_argument("--max-configs", type=int, default=None, help="the first N configs of each table only")
    args = ap.parse_args()
    os.environ["HF_FLASHATTN_AUTOTUNE"] = "0"
    t0 = time.time()
    import hf_flashattn  # noqa: F401
    from hf_flashattn.kernels import v2, v2_bwd
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    dims = [int(d) for d in args.dims.split(",")]
    kinds = args.kinds.split(",")
    tables = [(kind, table) for kind, table in (("merged", MERGED), ("dkdv", DKDV), ("dq", DQ), ("fwd", FWD))
              if kind in kinds]
    tables = [(kind, {d: cs[:args.max_configs] for d, cs in table.items()}) for kind, table in tables]
    jobs = [(kind, c, D) for D in dims for kind, table in tables for c in table.get(D, [])]
    info = {}
    with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as ex:
        for job, r in ex.map(_worker, jobs):
            info[(job[0], tuple(job[1]), job[2])] = r
            print("compiled", job, r, flush=True)
    print(f"compiled {len(jobs)} configs in {time.time() - t0:.0f}s", flush=True)
    rows = []
    points = [(D, S, c) for D in dims for S in map(int, args.seqlens.split(",")) for c in (False, True)]
    for D, S, causal in points:
        if time.time() - t0 > args.budget_s:
            print("time budget reached: skipped", D, S, causal, flush=True)
            continue
        H = 2048 // D
        B = 16384 // S
        win = (-1, 0) if causal else (-1, -1)
        q, k, v, do = inputs(B, H, H, S, D)
        fl = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
        out, lse = v2.forward(q, k, v, None, None, S, S, D ** -0.5, win, 0.0)

        def bwd():
            v2_bwd.backward(do, q, k, v, out, lse, None, None, S, S, D ** -0.5, win, 0.0)
        base = dict(D=D, S=S, B=B, H=H, causal=causal)
        # SDPA baselines: fwd and fwd+bwd; their backward time is the difference
        qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
        dot = do.transpose(1, 2)
        for name, be in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
            with sdpa_kernel(be):
                f_ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                                               return_mode="median")
                fb_ms = triton.testing.do_bench(lambda: torch.autograd.grad(
                    F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal), (qt, kt, vt), dot),
                    return_mode="median")
            rows.append(dict(base, impl=name, fwd_ms=f_ms, bwd_ms=fb_ms - f_ms, fwd_tflops=fl / f_ms / 1e9,
                             bwd_tflops=2.5 * fl / (fb_ms - f_ms) / 1e9))
        # the first config of each list is the current default (what the autotune-off path runs): it holds
        # the other pass fixed while each candidate of one pass is timed
        dk0, dq0 = cfg(DKDV[D][0], D), cfg(DQ[D][0], D)
        for kind, table in tables:
            if kind == "fwd" and S > 4096:
                continue
            for c in table.get(D, []):
                r = dict(base, impl="ours", kind=kind, cfg=list(c), **info.get((kind, tuple(c), D), {}))
                if "error" in r:
                    rows.append(r)
                    continue
                try:
                    with _merge_for(kind, D):
                        if kind == "fwd":
                            v2._fwd_launch.force = cfg(c, D)
                            ms = triton.testing.do_bench(
                                lambda: v2.forward(q, k, v, None, None, S, S, D ** -0.5, win, 0.0),
                                return_mode="median")
                            r.update(ms=ms, tflops=fl / ms / 1e9)
                        else:
                            if kind == "merged":
                                v2_bwd._merged_launch.force = cfg(c, D)
                            else:
                                v2_bwd._dkdv_launch.force = cfg(c, D) if kind == "dkdv" else dk0
                                v2_bwd._dq_launch.force = cfg(c, D) if kind == "dq" else dq0
                            ms = triton.testing.do_bench(bwd, return_mode="median")
                            r.update(ms=ms, bwd_tflops=2.5 * fl / ms / 1e9)
                except Exception as e:  # noqa: BLE001
                    r.update(error=f"{type(e).__name__}: {str(e)[:200]}")
                finally:
                    v2._fwd_launch.force = v2_bwd._dkdv_launch.force = v2_bwd._dq_launch.force = None
                    v2_bwd._merged_launch.force = None
                rows.append(r)
                print(json.dumps(r), flush=True)
        with open(os.path.join(args.out, "sweep_bwd.json"), "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           commit=os.environ.get("COMMIT", "unknown"), bwd_tma=os.environ.get("HF_FLASHATTN_BWD_TMA"),
                           rows=rows), f, indent=1)
        del q, k, v, do, out, lse, qt, kt, vt
        torch.cuda.empty_cache()
    print(f"total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
