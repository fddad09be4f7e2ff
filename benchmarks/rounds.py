"""Variants timed in rounds within one process (the probes' A/B method): each round times every variant once, in
order, and reads each as its ratio to the first variant's time in that round, so that a drift of the card's clock or of
the host hits every variant alike; the medians over rounds are the result."""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import time


def interleaved_rounds(records: dict, timers: dict, rounds: int, unit: str, digits: int) -> None:
    """Run `rounds` rounds of `timers` (name -> a function returning one timing, in `unit`), in their order. Each
    records[name] gets the list `unit` of its timings (rounded to `digits`), the list "ratio" of its timing over the
    first timer's in the same round, and their medians, "median_<unit>" and "median_ratio"."""
    for _ in range(rounds):
        base = None
        for name, timer in timers.items():
            t = timer()
            base = t if base is None else base
            records[name].setdefault(unit, []).append(round(t, digits))
            records[name].setdefault("ratio", []).append(round(t / base, 4))
    for name in timers:
        r = records[name]
        r[f"median_{unit}"] = statistics.median(r[unit])
        r["median_ratio"] = statistics.median(r["ratio"])


@contextlib.contextmanager
def switched(*sets):
    """Module switches flipped for the block (the probes' variants): each (module, attribute, value) set on entry, the
    old values put back on exit."""
    old = [getattr(m, a) for m, a, _ in sets]
    for m, a, value in sets:
        setattr(m, a, value)
    try:
        yield
    finally:
        for (m, a, _), o in zip(sets, old):
            setattr(m, a, o)


def median_speedup(records: dict, ref: str, name: str, unit: str) -> float:
    """The median over rounds of ref's timing over name's (above 1: name was faster than ref)."""
    return statistics.median(a / b for a, b in zip(records[ref][unit], records[name][unit]))


def timed_ms(f, iters: int) -> float:
    """Mean milliseconds of `iters` calls of f (queued back to back, one warm-up call first), by CUDA events."""
    import torch
    f()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        f()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


# the SDPA baselines a probe may time beside its variants, and the key of each one's ratio in `time_forwards`' records
BASELINES = {"sdpa-cudnn": "of_cudnn", "sdpa-flash": "of_flash"}


def time_forwards(variants: dict, rounds: int, iters: int, flops: float) -> dict:
    """Calls (name -> f) timed in `rounds` interleaved rounds of `iters` calls (`timed_ms`): per name the records of
    `interleaved_rounds` (unit "ms"), its TFLOP/s at the median time (`flops` a call) and, for each SDPA baseline among
    the variants (`BASELINES`), "of_cudnn" / "of_flash": the median over rounds of the baseline's time over its own."""
    import functools
    records = {name: {} for name in variants}
    interleaved_rounds(records, {name: functools.partial(timed_ms, f, iters) for name, f in variants.items()}, rounds,
                       "ms", 4)
    for name, r in records.items():
        r["tflops"] = flops / r["median_ms"] / 1e9
        for base, key in BASELINES.items():
            if base in records:
                r[key] = median_speedup(records, base, name, "ms")
    return records



def probe_parser(points: dict, iters: int = 10, no_check: bool = False):
    """The rounds-based probes' common command line: --out, --points (default: every key of `points`), --rounds,
    --iters (calls a timing), --budget-s, and with no_check --no-check (skip the probe's check on awkward shapes); a
    probe adds its own arguments to the parser returned."""
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--points", default=",".join(points))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--budget-s", type=float, default=1e9)
    if no_check:
        ap.add_argument("--no-check", action="store_true", help="skip the check on awkward shapes")
    return ap


def run_meta(**extra) -> dict:
    """A probe's JSON header: the card, the stack (torch, triton, cuDNN), the commit ($COMMIT), the date, then the
    probe's own fields (its rounds, calls a timing, ...)."""
    import torch
    import triton
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cudnn=torch.backends.cudnn.version(), commit=os.environ.get("COMMIT", "unknown"),
                date=time.strftime("%Y-%m-%d"), **extra)


def sdpa_forward(backend: str, qt, kt, vt, causal: bool, gqa: bool):
    """SDPA's forward on (B, H, S, D) views with one backend, "cudnn" or "flash" (the probes' baselines)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION if backend == "cudnn" else SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)


def forward_points(names: str, points: dict, t0: float, budget_s: float):
    """The forward probes' grid points in turn (`names`: comma-separated keys of `points`, name -> (D, S, B, H, Hk,
    causal)) until `budget_s` seconds after t0: per point (name, (D, S, B, H, Hk, causal), (q, k, v) random bf16 on the
    GPU as (B, S, H or Hk, D), their (B, H, S, D) views for SDPA, the forward's FLOPs, halved under the causal mask)."""
    import torch
    for p in names.split(","):
        if time.time() - t0 > budget_s:
            print(f"budget: {p} and later skipped", flush=True)
            return
        D, S, B, H, Hk, causal = points[p]
        q = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, S, Hk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        yield p, points[p], (q, k, v), tuple(t.transpose(1, 2) for t in (q, k, v)), \
            4 * B * H * S * S * D / (2 if causal else 1)
        del q, k, v
        torch.cuda.empty_cache()


def save_json(out: str, stem: str, meta: dict, t0: float, **payload) -> None:
    """A probe's results, written before its report is built (a report that fails to build loses nothing):
    meta["total_s"] (seconds since t0), then OUT/stem.json with meta and the payload's keys, in order."""
    meta["total_s"] = round(time.time() - t0, 1)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(dict(meta=meta, **payload), f, indent=1)


def save_md(out: str, stem: str, lines: list) -> None:
    """A probe's report: OUT/stem.md, printed too."""
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def host_us(fn, n=200, reps=5):
    """Host microseconds a call of fn (CUDA): one warm call, then `reps` runs of n calls queued on the host, each
    run ended by a synchronize; the median over runs (the host probes' measure)."""
    import torch
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


def queued_ms(fn, n=50):
    """(total, host) milliseconds a call of fn (CUDA) over n calls queued back to back after one warm call: total up
    to the closing synchronize (the GPU's time a call whenever the host runs ahead of it), host up to the last launch
    (the host probes' "queued" measure)."""
    import torch
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) * 1e3 / n
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3 / n, host


def write_profile(path: str, fn, n: int) -> None:
    """cProfile of n calls of fn (CUDA, synchronized at the end): the top 40 functions by own time, then by cumulative
    time, written to `path` (the host probes' profile)."""
    import cProfile
    import io
    import pstats
    import torch
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    text = []
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats(key).print_stats(40)
        text.append(buf.getvalue())
    with open(path, "w") as f:
        f.write("\n\n".join(text))


_IDENTITY = []


def identity_fwd_bwd(x, g):
    """A trivial Python autograd.Function's forward and backward on x with gradient g (x.grad reset first): the host
    probes' yardstick for what any Python Function costs a call (the machines' hosts differ in speed). The class is
    made once, on the first call."""
    if not _IDENTITY:
        import torch

        class Identity(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                return t.view_as(t)

            @staticmethod
            def backward(ctx, grad):
                return grad
        _IDENTITY.append(Identity)
    x.grad = None
    _IDENTITY[0].apply(x).backward(g)
