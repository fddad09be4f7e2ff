"""Host time of flash_attn_func through its three launch paths, in one process: "raw" (kernels._common.FAST_LAUNCH and
RAW_LAUNCH: kept CompiledKernels launched through Triton's C launcher function, tensors as addresses, CUtensorMaps
kept), "run" (FAST_LAUNCH only: kept CompiledKernels through CompiledKernel.run, descriptors made from kept fields)
and "jit" (Triton's entry point):

1. equal: fwd+bwd through raw (twice, new tensors each time: a kept kernel or tensor map must take the new pointers),
   run and jit, bitwise equal (the same kernels; deterministic=True except the single-pass case, whose dQ sum varies
   run to run: there dQ within 1% of its largest value, the rest bitwise), over v3 (its Triton kernel, the Gluon
   forward and backward, d64/128/256, GQA, a window, packed, the single pass) and v2;
2. host: microseconds of host time a call at a tiny shape (the GPU idles: time a call = host time), fwd and
   fwd+bwd, v3 and v2, each path, SDPA-cuDNN beside;
3. bench: triton.testing.do_bench (as benchmarks/bench.py: median, the L2 flushed before each call) at 16k tokens,
   512 and 1k a sequence, d64/128/256, causal or not, fwd and fwd+bwd: ours raw and run, SDPA flash and cuDNN;
4. profile: cProfile of v3 fwd+bwd through the raw path, the top functions by own time.

    python benchmarks/probe_host.py --out DIR      (writes probe_host.json, probe_host.md, probe_host_profile.txt)
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hf_flashattn as fa  # noqa: E402
from hf_flashattn.kernels import _common as C  # noqa: E402


def fwd_bwd(q, k, v, do, ver, causal, window=(-1, -1), cu=None, max_s=0, deterministic=False):
    if cu is None:
        o = fa.flash_attn_func(q, k, v, causal=causal, window_size=window, deterministic=deterministic, version=ver)
    else:
        o = fa.flash_attn_varlen_func(q, k, v, cu, cu, max_s, max_s, causal=causal, window_size=window,
                                      deterministic=deterministic, version=ver)
    return (o,) + torch.autograd.grad(o, (q, k, v), do)


def equal_section():
    rows = []
    cases = [  # (ver, B, S, H, Hk, D, causal, window, packed lens)
        ("v3", 2, 300, 4, 4, 128, True, (-1, -1), None),    # v3's Triton kernel (masked, < 2k keys)
        ("v3", 2, 1024, 4, 4, 128, False, (-1, -1), None),  # Gluon forward and backward
        ("v3", 1, 4096, 4, 2, 64, False, (-1, -1), None),   # Gluon d64, GQA
        ("v3", 2, 512, 2, 2, 256, True, (-1, -1), None),    # d256 (two dK/dV launches)
        ("v3", 1, 777, 8, 2, 128, True, (100, 0), None),    # window, GQA
        ("v3", 0, 0, 4, 2, 128, True, (-1, -1), [100, 333, 64]),  # packed
        ("v2", 2, 1024, 4, 4, 128, True, (-1, -1), None),
        ("v2", 2, 333, 4, 1, 80, False, (-1, -1), None),
        ("v2", 0, 0, 4, 2, 64, True, (-1, -1), [50, 400, 7]),
        ("v3", 1, 2048, 4, 2, 128, False, (-1, -1), None),  # the single pass (dQ summed by the TMA reduce)
        ("v3", 1, 2048, 4, 4, 64, False, (-1, -1), None),
    ]
    for ver, B, S, H, Hk, D, causal, window, lens in cases:
        single = not causal and S >= 2048 and D in (64, 128)
        def make(seed):
            g = torch.Generator(device="cuda").manual_seed(seed)
            shp = (lambda h: (sum(lens), h, D)) if lens else (lambda h: (B, S, h, D))
            t = [torch.randn(shp(h), device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=i < 3)
                 for i, h in enumerate((H, Hk, Hk, H))]
            return t
        cu = None
        if lens:
            cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
        ms = max(lens) if lens else 0
        results = {}
        for mode, seed in (("raw-1", 1), ("raw-2", 2), ("run-2", 2), ("jit-2", 2), ("raw-1b", 1)):
            set_path(mode.split("-")[0])
            q, k, v, do = make(seed)
            results[mode] = fwd_bwd(q, k, v, do, ver, causal, window, cu, ms, deterministic=not single)
            torch.cuda.synchronize()
        set_path("raw")

        def eq(x, y):
            if not single:
                return all(torch.equal(a, b) for a, b in zip(x, y))
            dq_ok = (x[1].float() - y[1].float()).abs().max().item() <= 0.01 * y[1].float().abs().max().item()
            return dq_ok and all(torch.equal(x[i], y[i]) for i in (0, 2, 3))
        same = eq(results["raw-2"], results["jit-2"]) and eq(results["run-2"], results["jit-2"])
        again = eq(results["raw-1"], results["raw-1b"])
        differs = not torch.equal(results["raw-1"][0], results["raw-2"][0])   # new inputs did reach the kernels
        r = dict(ver=ver, B=B, S=S, H=H, Hk=Hk, D=D, causal=causal, window=window, lens=lens, single_pass=single,
                 fast_equals_jit=same, repeat_equal=again, new_inputs_change_output=differs,
                 ok=same and again and differs)
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


PATHS = ("raw", "run", "jit")


def set_path(path: str):
    """raw, run or jit (module docstring)."""
    C.FAST_LAUNCH = path != "jit"
    C.RAW_LAUNCH = path == "raw"


def host_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t0) / n


def host_section():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    for D, S, causal in ((128, 256, True), (128, 256, False), (64, 256, False), (256, 256, True)):
        q, k, v, do = (torch.randn(1, S, 2, D, device="cuda", dtype=torch.bfloat16, requires_grad=i < 3)
                       for i in range(4))
        qt, kt, vt, dot = (x.detach().transpose(1, 2).requires_grad_(i < 3) for i, x in enumerate((q, k, v, do)))

        def sdpa_f():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

        def sdpa_fb():
            o = sdpa_f()
            torch.autograd.grad(o, (qt, kt, vt), dot)

        def ours_f(ver):
            def f():
                with torch.no_grad():
                    fa.flash_attn_func(q, k, v, causal=causal, version=ver)
            return f

        def ours_fb(ver):
            return lambda: fwd_bwd(q, k, v, do, ver, causal)

        with torch.no_grad():
            r = dict(D=D, S=S, causal=causal, sdpa_cudnn_fwd=host_us(sdpa_f))
        r["sdpa_cudnn_fwd_bwd"] = host_us(sdpa_fb)
        for ver in ("v3", "v2"):
            for path in PATHS:
                set_path(path)
                r[f"{ver}_{path}_fwd"] = host_us(ours_f(ver))
                r[f"{ver}_{path}_fwd_bwd"] = host_us(ours_fb(ver))
        set_path("raw")
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def bench_section(budget_s):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    t_end = time.time() + budget_s
    for D in (128, 64, 256):
        H = 2048 // D
        for S in (1024, 512):
            B = 16384 // S
            for causal in (True, False):
                if time.time() > t_end:
                    return rows
                q, k, v, do = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=i < 3)
                               for i in range(4))
                qt, kt, vt, dot = (x.detach().transpose(1, 2).contiguous().requires_grad_(i < 3)
                                   for i, x in enumerate((q, k, v, do)))
                fl = 4 * B * H * S * S * D * (0.5 if causal else 1.0)

                def sdpa(backend):
                    def f():
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                    return f
                impls = {"sdpa-flash": (sdpa(SDPBackend.FLASH_ATTENTION), (qt, kt, vt), dot),
                         "sdpa-cudnn": (sdpa(SDPBackend.CUDNN_ATTENTION), (qt, kt, vt), dot)}
                for ver in ("v3", "v2"):
                    impls[f"{ver}-raw"] = (lambda ver=ver: fa.flash_attn_func(q, k, v, causal=causal, version=ver),
                                           (q, k, v), do)
                    impls[f"{ver}-run"] = impls[f"{ver}-raw"]
                for mode in ("fwd", "fwd+bwd"):
                    r = dict(D=D, S=S, B=B, H=H, causal=causal, mode=mode)
                    for name, (fn, ins, g) in impls.items():
                        set_path(name.split("-")[-1] if name.startswith("v") else "raw")
                        if mode == "fwd":
                            def f(fn=fn):
                                with torch.no_grad():
                                    fn()
                        else:
                            def f(fn=fn, ins=ins, g=g):
                                torch.autograd.grad(fn(), ins, g)
                        f()
                        ms = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
                        r[name] = round(fl * (3.5 if mode != "fwd" else 1.0) / ms / 1e9, 1)
                    set_path("raw")
                    for ver in ("v3", "v2"):
                        for base in ("sdpa-flash", "sdpa-cudnn"):
                            for how in ("raw", "run"):
                                r[f"{ver}-{how}/{base}"] = round(r[f"{ver}-{how}"] / r[base], 3)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
                del q, k, v, do, qt, kt, vt, dot
    return rows


def profile_section():
    q, k, v, do = (torch.randn(1, 256, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=i < 3)
                   for i in range(4))
    for _ in range(20):
        fwd_bwd(q, k, v, do, "v3", False)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(300):
        fwd_bwd(q, k, v, do, "v3", False)
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    return s.getvalue()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=200)
    args = ap.parse_args()
    t0 = time.time()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cudnn=torch.backends.cudnn.version(), commit=os.environ.get("COMMIT", "unknown"),
                date=time.strftime("%Y-%m-%d"))
    out = dict(meta=meta)
    out["equal"] = equal_section()
    out["host_us"] = host_section()
    prof = profile_section()
    with open(os.path.join(args.out, "probe_host_profile.txt"), "w") as f:
        f.write(prof)
    out["bench"] = bench_section(max(30.0, args.budget_s - (time.time() - t0)))
    with open(os.path.join(args.out, "probe_host.json"), "w") as f:
        json.dump(out, f, indent=1)
    lines = [f"# Host time of a call: raw, run and JIT launches — {meta['gpu']}", "",
             f"date {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"cuDNN {meta['cudnn']}, bf16", "",
             "## Equal (fwd+bwd, raw and run against JIT; new inputs each call)", "",
             "| ver | shape | causal | window | packed | single pass | raw, run == JIT | repeat equal | ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in out["equal"]:
        lines.append(f"| {r['ver']} | {r['B']}x{r['S']} H{r['H']}/{r['Hk']} d{r['D']} | {r['causal']} | {r['window']} | "
                     f"{r['lens']} | {r['single_pass']} | {r['fast_equals_jit']} | {r['repeat_equal']} | {r['ok']} |")
    lines += ["", "## Host microseconds a call (tiny shapes: the GPU idles)", "",
              "| D | causal | cuDNN fwd | " + " | ".join(f"{v} fwd {p}" for v in ("v3", "v2") for p in PATHS)
              + " | cuDNN fwd+bwd | " + " | ".join(f"{v} f+b {p}" for v in ("v3", "v2") for p in PATHS) + " |",
              "|" + "---|" * (4 + 4 * len(PATHS))]
    for r in out["host_us"]:
        lines.append(f"| {r['D']} | {r['causal']} | {r['sdpa_cudnn_fwd']:.0f} | "
                     + " | ".join(f"{r[f'{v}_{p}_fwd']:.0f}" for v in ("v3", "v2") for p in PATHS)
                     + f" | {r['sdpa_cudnn_fwd_bwd']:.0f} | "
                     + " | ".join(f"{r[f'{v}_{p}_fwd_bwd']:.0f}" for v in ("v3", "v2") for p in PATHS) + " |")
    lines += ["", "## do_bench at 16k tokens (TFLOP/s; ratios)", "",
              "| D | S | causal | mode | flash | cuDNN | v3 raw | v3 run | v2 raw | v2 run | v3 raw/cuDNN | "
              "v3 run/cuDNN | v2 raw/flash | v2 run/flash |", "|" + "---|" * 14]
    for r in out["bench"]:
        lines.append(f"| {r['D']} | {r['S']} | {r['causal']} | {r['mode']} | {r['sdpa-flash']} | {r['sdpa-cudnn']} | "
                     f"{r['v3-raw']} | {r['v3-run']} | {r['v2-raw']} | {r['v2-run']} | "
                     f"{r['v3-raw/sdpa-cudnn']} | {r['v3-run/sdpa-cudnn']} | {r['v2-raw/sdpa-flash']} | "
                     f"{r['v2-run/sdpa-flash']} |")
    with open(os.path.join(args.out, "probe_host.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
