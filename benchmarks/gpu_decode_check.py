"""GPU correctness of the decode paths (issue 6), in particular of the direct launch of cached compiled
kernels (`kernels._common.FastLaunch`), which Triton's interpreter (the CPU tests) never takes.

For each case: the first call compiles through Triton's JIT, later calls launch the cached kernel. Checked:
  * every call against the float64 reference with flash-attn's rule (|ours - ref64| <= 2 x |torch
    low-precision - ref64| + floor, max-abs);
  * the direct launch bitwise equal to the JIT launch (FAST_LAUNCH off), call after call;
  * pointers of other alignment (views 4 elements into a buffer) and ints of other divisibility get a
    kernel of their own specialisation, not the cached one;
  * the lean Transformers path (`decode.decode_bhsd`, Transformers' (B, H, S, D) layout), flash_attn_func
    decode shapes, flash_attn_with_kvcache with ragged cache_seqlens and an append, and the masked
    decode of a left-padded batch;
  * decode_bhsd's direct launch (`decode._direct`) over a cache that grows a key a step, bitwise against the
    JIT launch;
  * decode_bhsd's in-kernel merge of the splits (one launch, a cached workspace per stream) against the
    combine kernel, on two streams at once and over changing shapes, its counters back at zero;
  * flash_attn_with_kvcache replayed from a CUDA graph bitwise equal to its launch, and with an int cache_seqlens
    (no lengths tensor) against the reference;
  * greedy generate() of a small bf16 Llama: flashattn_custom with the direct launch gives the same tokens
    as with the JIT launch, and is compared with sdpa (agreement reported).

    python benchmarks/gpu_decode_check.py --out DIR      (writes decode_check.json; exit 1 on a failure)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import hf_flashattn as fa  # noqa: E402
from hf_flashattn import interface  # noqa: E402
from hf_flashattn.kernels import _common as C, decode  # noqa: E402
from hf_flashattn.reference import attention_ref  # noqa: E402

FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# On a machine without a GPU (a dry run of this script through Triton's interpreter): small cases, float16
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.bfloat16, torch.float16) if DEV == "cuda" else (torch.float16,)
SMALL = DEV == "cpu"
RESULTS = []


def check(name, got, ref64, ref_low, dtype, factor=2.0):
    err = (got.double() - ref64.double()).abs().max().item()
    base = (ref_low.double() - ref64.double()).abs().max().item()
    bound = factor * base + FLOOR[dtype]
    ok = bool(torch.isfinite(got).all()) and err <= bound
    RESULTS.append(dict(name=name, err=err, bound=bound, ok=ok))
    print(("ok  " if ok else "FAIL"), f"{name}: err {err:.3e} bound {bound:.3e}", flush=True)


def same(name, a, b):
    ok = torch.equal(a, b)
    RESULTS.append(dict(name=name, bitwise=ok, ok=ok))
    print(("ok  " if ok else "FAIL"), f"{name}: bitwise equal" if ok else f"{name}: differs", flush=True)


def jit(fn):
    """fn() with every kernel launched through Triton's JIT entry point."""
    with mock.patch.object(C, "FAST_LAUNCH", False):
        return fn()


def separate(fn):
    """fn() with decode_bhsd's splits merged by the combine kernel (a second launch) instead of in-kernel."""
    with mock.patch.object(decode, "FUSED_MERGE", False):
        return fn()


def counters_zero(name):
    """Every counter of the in-kernel merge is back at zero after the calls (the next call relies on it)."""
    torch.cuda.synchronize()
    left = sum(int(ws.counters.count_nonzero()) for ws in decode._WORKSPACES.values())
    RESULTS.append(dict(name=name, nonzero_counters=left, ok=left == 0))
    print(("ok  " if left == 0 else "FAIL"), f"{name}: {left} counters left nonzero", flush=True)


def streams_case():
    """decode_bhsd on two streams at once (a workspace per stream), then many calls of changing shapes on
    one: every output against the two-launch path, counters back at zero."""
    if DEV != "cuda":
        return
    g = torch.Generator(device=DEV).manual_seed(5)
    mk = lambda B, H, Hk, L: (torch.randn(B, H, 1, 128, device=DEV, dtype=torch.bfloat16, generator=g),  # noqa: E731
                              torch.randn(B, Hk, L, 128, device=DEV, dtype=torch.bfloat16, generator=g),
                              torch.randn(B, Hk, L, 128, device=DEV, dtype=torch.bfloat16, generator=g))
    cases = [mk(1, 32, 8, 32768), mk(2, 32, 8, 8192)]
    refs_ = [separate(lambda c=c: decode.decode_bhsd(*c, 128 ** -0.5, (-1, 0), 0.0)) for c in cases]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = [[], []]
    torch.cuda.synchronize()
    for _ in range(50):
        for i, st in enumerate(streams):
            with torch.cuda.stream(st):
                outs[i].append(decode.decode_bhsd(*cases[i], 128 ** -0.5, (-1, 0), 0.0))
    torch.cuda.synchronize()
    for i in range(2):
        worst = max((o.float() - refs_[i].float()).abs().max().item() for o in outs[i])
        ok = worst <= 1e-2
        RESULTS.append(dict(name=f"two streams, case {i}: 50 calls vs two-launch path", err=worst, ok=ok))
        print(("ok  " if ok else "FAIL"), f"two streams case {i}: max diff {worst:.3e}", flush=True)
    for L in (100, 1000, 4097, 20000, 3, 65536):
        for B in (1, 3):
            c = mk(B, 16, 4, L)
            a = decode.decode_bhsd(*c, 128 ** -0.5, (-1, 0), 0.0)
            b = separate(lambda c=c: decode.decode_bhsd(*c, 128 ** -0.5, (-1, 0), 0.0))
            d = (a.float() - b.float()).abs().max().item()
            RESULTS.append(dict(name=f"in-kernel merge vs combine kernel B{B} L{L}", err=d, ok=d <= 1e-2))
            print(("ok  " if d <= 1e-2 else "FAIL"), f"merge B{B} L{L}: max diff {d:.3e}", flush=True)
    counters_zero("counters after the stream cases")


def misaligned(x):
    """x's values in a tensor whose data pointer is 8 bytes (4 elements) off a 16-byte boundary."""
    buf = torch.empty(x.numel() + 4, dtype=x.dtype, device=x.device)
    y = buf[4:].view(x.shape)
    y.copy_(x)
    return y


def refs(q, k, v, **kw):
    """float64 reference and the low-precision PyTorch path, (B, Sq, H, D) inputs."""
    return attention_ref(q, k, v, **kw)[0], attention_ref(q, k, v, compute_dtype=None, **kw)[0]


def lean_cases():
    g = torch.Generator(device=DEV).manual_seed(0)
    for dtype in DTYPES:
        for B, L, H, Hk, D, window, softcap in ((1, 4096, 32, 8, 128, -1, 0.0), (3, 1000, 32, 8, 80, -1, 0.0),
                                                 (2, 777, 8, 1, 64, 100, 0.0), (1, 203, 4, 4, 256, -1, 30.0),
                                                 (2, 32768, 32, 8, 128, -1, 0.0), (1, 9, 8, 2, 40, -1, 0.0)):
            if SMALL and (L > 1000 or D > 128):
                continue
            name = f"lean {str(dtype)[6:]} B{B} L{L} H{H}/{Hk} d{D} w{window} cap{softcap}"
            q = torch.randn(B, H, 1, D, device=DEV, dtype=dtype, generator=g)
            k = torch.randn(B, Hk, L, D, device=DEV, dtype=dtype, generator=g)
            v = torch.randn(B, Hk, L, D, device=DEV, dtype=dtype, generator=g)
            scale = D ** -0.5
            ref64, low = refs(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                              window_size=(window, 0), softcap=softcap)
            run = lambda q=q, k=k, v=v: decode.decode_bhsd(q, k, v, scale, (window, 0), softcap)  # noqa: E731
            first, second, third = run(), run(), run()
            check(name + " (JIT call)", first, ref64, low, dtype)
            check(name + " (direct call)", second, ref64, low, dtype)
            same(name + " direct == JIT", second, jit(run))
            same(name + " direct, twice", second, third)
            two = separate(run)
            check(name + " (two launches: combine kernel)", two, ref64, low, dtype)
            qm, km, vm = misaligned(q), misaligned(k), misaligned(v)
            check(name + " misaligned views", decode.decode_bhsd(qm, km, vm, scale, (window, 0), softcap),
                  ref64, low, dtype)
            # (B, S, H, D) storage seen through transposed views, as a static cache would hold it
            kt, vt = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
            check(name + " strided views", decode.decode_bhsd(q, kt, vt, scale, (window, 0), softcap),
                  ref64, low, dtype)


def growing_case():
    """decode_bhsd as generate() calls it with a dynamic cache: a new contiguous cache one key longer every
    step (new strides, a split count that changes on the way), the direct launch against the JIT launch
    bitwise and against the reference."""
    g = torch.Generator(device=DEV).manual_seed(9)
    B, H, Hk, D = 2, 32, 8, 128
    base = [torch.randn(B, Hk, 4400 if not SMALL else 300, D, device=DEV, dtype=torch.bfloat16, generator=g)
            for _ in range(2)]
    q = torch.randn(B, H, 1, D, device=DEV, dtype=torch.bfloat16, generator=g)
    lengths = range(4090, 4100) if not SMALL else range(250, 253)
    for L in (*lengths, 257 if not SMALL else 200, 130, 64):
        k, v = base[0][:, :, :L].contiguous(), base[1][:, :, :L].contiguous()
        run = lambda k=k, v=v: decode.decode_bhsd(q, k, v, D ** -0.5, (-1, 0), 0.0)  # noqa: E731
        got = run()
        same(f"growing cache L{L}: direct == JIT", got, jit(run))
        ref64, low = refs(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        check(f"growing cache L{L}", got, ref64, low, torch.bfloat16)
    counters_zero("counters after the growing cache")


def graph_case():
    """The split decode (decode kernel, then the combine) captured in a CUDA graph and replayed, against the
    eager call."""
    if DEV != "cuda":
        return
    g = torch.Generator(device=DEV).manual_seed(4)
    for L in (4096, 32768):
        q = torch.randn(1, 32, 1, 128, device=DEV, dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, 8, L, 128, device=DEV, dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, 8, L, 128, device=DEV, dtype=torch.bfloat16, generator=g)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            decode.decode_bhsd(q, k, v, 128 ** -0.5, (-1, 0), 0.0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = decode.decode_bhsd(q, k, v, 128 ** -0.5, (-1, 0), 0.0)
        q.copy_(torch.randn(q.shape, device=DEV, dtype=q.dtype, generator=g))
        graph.replay()
        torch.cuda.synchronize()
        # captured: the combine kernel merges (no cached workspace inside a graph), as the eager call below
        same(f"CUDA graph replay L{L} == eager call (new q)", out,
             separate(lambda: decode.decode_bhsd(q, k, v, 128 ** -0.5, (-1, 0), 0.0)))


def uniform_case():
    """flash_attn_with_kvcache with ragged tensor lengths, launched and replayed from a CUDA graph (bitwise the same),
    against the float64 reference; and with an int cache_seqlens (every sequence the same length: no lengths tensor,
    the key length in use) against the reference."""
    if DEV != "cuda":
        return
    g = torch.Generator(device=DEV).manual_seed(5)
    for B, L, H, Hk, D in ((1, 32768, 32, 8, 128), (8, 4100, 32, 8, 128), (3, 1203, 16, 16, 80), (2, 9000, 8, 1, 64)):
        q = torch.randn(B, 1, H, D, device=DEV, dtype=torch.bfloat16, generator=g)
        kc = torch.randn(B, L, Hk, D, device=DEV, dtype=torch.bfloat16, generator=g)
        vc = torch.randn(B, L, Hk, D, device=DEV, dtype=torch.bfloat16, generator=g)
        lens = torch.randint(L // 2, L + 1, (B,), device=DEV, generator=g).to(torch.int32)

        def call():
            return fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True)
        eager = call()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = call()
        graph.replay()
        torch.cuda.synchronize()
        name = f"kvcache B{B} L{L} H{H}/{Hk} d{D}"
        same(f"{name}: graph replay == launched", captured, eager)
        b = B - 1
        n = int(lens[b])
        r64, rlow = refs(q[b:b + 1], kc[b:b + 1, :n], vc[b:b + 1, :n], causal=True)
        check(f"{name} seq {b} (len {n}) against the reference", eager[b:b + 1], r64, rlow, torch.bfloat16)
        n = L // 2 + 3
        o = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=n, causal=True)
        r64, rlow = refs(q, kc[:, :n], vc[:, :n], causal=True)
        check(f"{name} int cache_seqlens={n} against the reference", o, r64, rlow, torch.bfloat16)


def api_cases():
    g = torch.Generator(device=DEV).manual_seed(1)
    for dtype in DTYPES:
        for B, Sq, L, H, Hk, D in ((2, 1, 5000, 32, 8, 128), (3, 4, 1203, 16, 16, 80), (1, 2, 300, 8, 1, 64)):
            if SMALL and L > 1300:
                continue
            name = f"flash_attn_func {str(dtype)[6:]} B{B} Sq{Sq} L{L} H{H}/{Hk} d{D}"
            q = torch.randn(B, Sq, H, D, device=DEV, dtype=dtype, generator=g)
            k = torch.randn(B, L, Hk, D, device=DEV, dtype=dtype, generator=g)
            v = torch.randn(B, L, Hk, D, device=DEV, dtype=dtype, generator=g)
            ref64, low = refs(q, k, v, causal=True)
            for i in range(3):
                check(f"{name} call {i}", fa.flash_attn_func(q, k, v, causal=True), ref64, low, dtype)
            # kvcache: ragged lengths, one new key appended in the kernel, then attention
            S_cache = L + 16
            kc = torch.zeros(B, S_cache, Hk, D, device=DEV, dtype=dtype)
            vc = torch.zeros_like(kc)
            lens = torch.randint(L // 3, L - Sq, (B,), device=DEV, generator=g).to(torch.int32)
            for b in range(B):
                kc[b, :lens[b]] = k[b, :lens[b]]
                vc[b, :lens[b]] = v[b, :lens[b]]
            kn, vn = k[:, -Sq:].contiguous(), v[:, -Sq:].contiguous()
            outs = []
            for i in range(3):
                kc2, vc2 = kc.clone(), vc.clone()
                outs.append(fa.flash_attn_with_kvcache(q, kc2, vc2, kn, vn, cache_seqlens=lens, causal=True))
            for b in range(B):
                n = int(lens[b]) + Sq
                kb = torch.cat([k[b:b + 1, :lens[b]], kn[b:b + 1]], 1)
                vb = torch.cat([v[b:b + 1, :lens[b]], vn[b:b + 1]], 1)
                r64, rlow = refs(q[b:b + 1], kb, vb, causal=True)
                for i, o in enumerate(outs):
                    check(f"kvcache {str(dtype)[6:]} B{B} seq {b} (len {n}) call {i}", o[b:b + 1], r64, rlow, dtype)
            same(f"kvcache {str(dtype)[6:]} B{B} direct == JIT", outs[1],
                 jit(lambda: fa.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), kn, vn, cache_seqlens=lens,
                                                        causal=True)))
            # the masked decode (left-padded batch): key j of sequence b attended iff mask[b, j]
            mask = torch.ones(B, L, dtype=torch.long, device=DEV)
            for b in range(B):
                mask[b, :b * 7] = 0
            for i in range(2):
                o = interface._decode_with_padding_mask(q, k, v, mask, None, (-1, 0), 0.0)
                for b in range(B):
                    r64, rlow = refs(q[b:b + 1], k[b:b + 1, b * 7:], v[b:b + 1, b * 7:], causal=True)
                    check(f"masked decode {str(dtype)[6:]} B{B} Sq{Sq} seq {b} call {i}", o[b:b + 1], r64, rlow, dtype)


def generate_case():
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=8192)
    ids = torch.randint(3, 1000, (1, 300 if SMALL else 3000), device=DEV, generator=torch.Generator(device=DEV).manual_seed(2))
    toks = {}
    for impl in ("flashattn_custom", "sdpa"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=DTYPES[0]).to(DEV).eval()
        kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            toks[impl] = model.generate(ids, **kw)[0, ids.shape[1]:]
            if impl == "flashattn_custom":
                toks["flashattn_custom/jit"] = jit(lambda: model.generate(ids, **kw)[0, ids.shape[1]:])
    same("generate: direct launch == JIT launch (tokens)", toks["flashattn_custom"], toks["flashattn_custom/jit"])
    if DEV == "cuda":
        counters_zero("counters after generate()")
    agree = (toks["flashattn_custom"] == toks["sdpa"]).float().mean().item()
    RESULTS.append(dict(name="generate agreement with sdpa (bf16 near-ties may differ)", agreement=agree, ok=True))
    print(f"info generate: greedy agreement with sdpa {agree:.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    for part in (lean_cases, growing_case, graph_case, uniform_case, streams_case, api_cases, generate_case):
        try:
            part()
        except Exception:  # noqa: BLE001
            RESULTS.append(dict(name=part.__name__, ok=False, error=traceback.format_exc()[-2000:]))
            print("FAIL", part.__name__, traceback.format_exc(), flush=True)
    n_fail = sum(not r["ok"] for r in RESULTS)
    cache = {name: len(fl.cache) for name, fl in (("decode", decode._decode_launch), ("combine", decode._combine_launch))}
    cache["direct"] = sum(len(plan[2]) for plan in decode._DIRECT.values())
    print(f"decode check: {len(RESULTS) - n_fail}/{len(RESULTS)} passed; cached kernels {cache}", flush=True)
    with open(os.path.join(args.out, "decode_check.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)", torch=torch.__version__, commit=os.environ.get("COMMIT"),
                       passed=len(RESULTS) - n_fail, total=len(RESULTS), cached_kernels=cache, results=RESULTS),
                  f, indent=1)
    sys.exit(1 if n_fail else 0)


if __name__ == "__main__":
    main()
