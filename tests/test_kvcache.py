"""flash_attn_with_kvcache: in-place append, split-KV decoding with packed GQA, against the reference;
custom-op registration (opcheck) and torch.compile(fullgraph=True)."""
from __future__ import annotations

import pytest
import torch

import hf_flashattn as fa
from hf_flashattn import interface
from _attn_testing import FLOOR
from hf_flashattn.reference import attention_ref


def _case(B=3, Sc=90, H=4, Hk=2, D=32, Sq=1, Snew=1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    kc, vc = mk(B + 1, Sc, Hk, D), mk(B + 1, Sc, Hk, D)
    q = mk(B, Sq, H, D)
    kn, vn = (mk(B, Snew, Hk, D), mk(B, Snew, Hk, D)) if Snew else (None, None)
    lens = torch.tensor([0, 37, Sc - Snew][:B], dtype=torch.int32)      # ragged, including an empty cache
    idx = torch.tensor([2, 0, 3][:B], dtype=torch.int32)                # entries out of order, one unused
    return q, kc, vc, kn, vn, lens, idx


def _reference(q, kc, vc, kn, vn, lens, idx, dtype=torch.float64, **kw):
    """Append with plain indexing, then attend each sequence to its valid rows."""
    kc, vc = kc.clone(), vc.clone()
    snew = 0 if kn is None else kn.shape[1]
    outs, lses = [], []
    for b in range(q.shape[0]):
        c, L = int(idx[b]), int(lens[b])
        if snew:
            kc[c, L:L + snew], vc[c, L:L + snew] = kn[b], vn[b]
        o, l = attention_ref(q[b:b + 1], kc[c:c + 1, :L + snew], vc[c:c + 1, :L + snew], compute_dtype=dtype, **kw)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses), kc, vc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H, Hk", [(4, 2), (4, 1), (2, 2)], ids=["gqa", "mqa", "mha"])
@pytest.mark.parametrize("Sq, Snew", [(1, 1), (3, 3), (2, 0)], ids=["decode", "append3", "no-append"])
@pytest.mark.parametrize("mask", [dict(causal=True), dict(window_size=(16, 0)), dict(causal=True, softcap=4.0)],
                         ids=["causal", "window", "softcap"])
def test_append_and_decode_match_reference(dtype, H, Hk, Sq, Snew, mask):
    q, kc, vc, kn, vn, lens, idx = _case(H=H, Hk=Hk, Sq=Sq, Snew=Snew, dtype=dtype)
    ref_out, ref_lse, ref_kc, ref_vc = _reference(q, kc, vc, kn, vn, lens, idx, **mask)
    low_out = _reference(q, kc, vc, kn, vn, lens, idx, dtype=None if dtype != torch.float32 else torch.float32,
                         **mask)[0]
    out, lse = fa.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, cache_batch_idx=idx,
                                          return_softmax_lse=True, **mask)
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc), "append wrote the wrong rows"
    err = (out.double() - ref_out).abs().max().item()
    bound = 2 * (low_out.double() - ref_out).abs().max().item() + FLOOR[dtype]
    print(f"out err {err:.3e} bound {bound:.3e}")
    assert err <= bound
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~fin)
    assert (lse[fin].double() - ref_lse[fin]).abs().max() < 1e-3


@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_split_kv_matches_unsplit(num_splits):
    q, kc, vc, kn, vn, lens, idx = _case(Sc=120, H=8, Hk=2, Sq=2, Snew=2, seed=1)
    one, lse1 = fa.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), kn, vn, cache_seqlens=lens,
                                           cache_batch_idx=idx, causal=True, num_splits=1, return_softmax_lse=True)
    many, lsen = fa.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), kn, vn, cache_seqlens=lens,
                                            cache_batch_idx=idx, causal=True, num_splits=num_splits,
                                            return_softmax_lse=True)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lsen, lse1, rtol=1e-5, atol=1e-6)


def test_automatic_split_choice_splits_long_caches():
    from hf_flashattn.kernels.decode import choose_num_splits
    from hf_flashattn.kernels.decode import _stages
    # H100: 132 SMs. Batch 1, 8 kv heads, a 32k cache: 8 programs unsplit -> split so that every program has an SM of
    # its own (one wave: 132 // 8 = 16 splits, 128 programs); batch 8: 2 splits
    assert choose_num_splits(1, 8, 1, 32768, 64, 132) == 16
    assert choose_num_splits(8, 8, 1, 32768, 64, 132) == 2
    assert choose_num_splits(2, 8, 1, 32768, 64, 132) == 8
    assert choose_num_splits(12, 8, 1, 32768, 64, 132) == 1     # 96 units fit the SMs: unsplit
    # without one_wave, 2 waves: 2 x 132 programs wanted: 33 splits, but 512 key blocks in 33 equal whole shares are 32
    # of 16 and an empty one
    assert choose_num_splits(1, 8, 1, 32768, 64, 132, one_wave=False) == 32
    assert choose_num_splits(8, 8, 1, 32768, 64, 132, one_wave=False) == 5      # 5 x 103 blocks >= 512: none empty
    # more units than SMs: the two-wave rule either way
    assert choose_num_splits(20, 8, 1, 32768, 64, 132) == choose_num_splits(20, 8, 1, 32768, 64, 132, one_wave=False)
    # 3 stages when every program has an SM (or >= 16 splits), else 2
    assert _stages(16, 128, 132) == 3 and _stages(2, 128, 132) == 3 and _stages(5, 320, 132) == 2
    assert _stages(32, 256, 132) == 3
    for batch in (1, 2, 3, 8):
        for L in (1000, 4096, 5000, 32768, 131072):
            for one_wave in (True, False):
                n = choose_num_splits(batch, 8, 1, L, 64, 132, one_wave=one_wave)
                blocks = -(-L // 64)
                assert (n - 1) * -(-blocks // n) < blocks, (batch, L, n)   # the last split has keys
                assert not one_wave or batch * 8 * n <= 132                # one wave: an SM a program
    # many sequences with short caches already fill it
    assert choose_num_splits(64, 8, 1, 128, 64, 132) == 1
    # never fewer than 2 key blocks per split
    assert choose_num_splits(1, 1, 1, 256, 64, 132) == 2


def test_int_cache_seqlens_reads_no_lengths_tensor(monkeypatch):
    """An int cache_seqlens (every sequence the same length) reaches the kernel as no lengths tensor and a key length of
    cache_seqlens + seqlen_new (no fill or add kernel a call), with or without an append, and without one gives what
    the same lengths as a tensor give (with one: test_int_cache_seqlens_is_checked_on_the_host_...); None means every
    cache row. A malformed cache is named as such."""
    from hf_flashattn.kernels import decode
    seen = []
    real = decode.forward

    def spy(q, kc, vc, seqlens_k, bidx, max_k, *a, **kw):
        seen.append((seqlens_k, max_k))
        return real(q, kc, vc, seqlens_k, bidx, max_k, *a, **kw)
    monkeypatch.setattr(decode, "forward", spy)
    q, kc, vc, kn, vn, _, idx = _case(B=2, Sc=70, Snew=2, dtype=torch.float16)
    a = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=40, cache_batch_idx=idx, causal=True)
    assert seen == [(None, 40)]
    b = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.full((2,), 40, dtype=torch.int32),
                                   cache_batch_idx=idx, causal=True)
    torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    seen.clear()
    fa.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), kn, vn, cache_seqlens=40, cache_batch_idx=idx)
    assert seen == [(None, 42)]
    seen.clear()
    fa.flash_attn_with_kvcache(q, kc[:2], vc[:2])
    assert seen == [(None, 70)]
    with pytest.raises(TypeError, match="k_cache must be a torch.Tensor"):
        fa.flash_attn_with_kvcache(q, [1.0], vc, cache_seqlens=3)
    with pytest.raises(TypeError, match="q, k_cache and v_cache must share a dtype; got q torch.float16 and v_cache"):
        fa.flash_attn_with_kvcache(q, kc, vc.float(), cache_seqlens=3, cache_batch_idx=idx)


def test_empty_cache_rows_give_zero_and_inf_lse():
    q, kc, vc, _, _, lens, idx = _case(Snew=0)
    out, lse = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_batch_idx=idx, causal=True,
                                          return_softmax_lse=True)
    assert int(lens[0]) == 0
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isinf(lse[0]).all()


@pytest.mark.parametrize("kw, exc, pattern", [
    (dict(rotary_cos=torch.ones(1)), NotImplementedError, "rotary_cos"),
    (dict(block_table=torch.ones(1)), NotImplementedError, "block_table"),
    (dict(cache_seqlens=torch.tensor([0, 1, 2])), TypeError, "cache_seqlens must be an int or an int32"),
    (dict(cache_seqlens=torch.tensor([0, 1, 90], dtype=torch.int32)), ValueError, r"seqlen_cache=90"),
    (dict(cache_batch_idx=torch.tensor([0, 1, 9], dtype=torch.int32)), ValueError, r"cache_batch_idx values"),
    (dict(num_splits=-1), ValueError, "num_splits"),
    (dict(version="v1"), NotImplementedError, "version='v1'"),
])
def test_bad_kvcache_arguments(kw, exc, pattern):
    q, kc, vc, kn, vn, lens, idx = _case()
    args = dict(cache_seqlens=lens, cache_batch_idx=idx) | kw
    with pytest.raises(exc, match=pattern):
        fa.flash_attn_with_kvcache(q, kc, vc, kn, vn, **args)


def test_int_cache_seqlens_is_checked_on_the_host_and_matches_the_tensor_form():
    q, kc, vc, kn, vn, lens, idx = _case()
    with pytest.raises(ValueError, match=r"cache_seqlens=90 and seqlen_new=1"):
        fa.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=90, cache_batch_idx=idx)
    with pytest.raises(ValueError, match=r"cache_seqlens=-1"):
        fa.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=-1, cache_batch_idx=idx)
    a_kc, a_vc, b_kc, b_vc = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    a = fa.flash_attn_with_kvcache(q, a_kc, a_vc, kn, vn, cache_seqlens=37, cache_batch_idx=idx, causal=True)
    b = fa.flash_attn_with_kvcache(q, b_kc, b_vc, kn, vn, cache_seqlens=torch.full((3,), 37, dtype=torch.int32),
                                   cache_batch_idx=idx, causal=True)
    assert torch.equal(a, b) and torch.equal(a_kc, b_kc) and torch.equal(a_vc, b_vc)
    assert not torch.equal(a_kc, kc), "the append did not write"


def test_append_needs_cache_seqlens_and_both_k_v():
    q, kc, vc, kn, vn, lens, idx = _case()
    with pytest.raises(ValueError, match="cache_seqlens is required"):
        fa.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_batch_idx=idx)
    with pytest.raises(ValueError, match="k and v must be given together"):
        fa.flash_attn_with_kvcache(q, kc, vc, kn, None, cache_seqlens=lens, cache_batch_idx=idx)


def test_custom_ops_pass_opcheck():
    q, kc, vc, kn, vn, lens, idx = _case(Sc=40)
    lens = torch.tensor([0, 5, 30], dtype=torch.int32)
    torch.library.opcheck(interface._kvcache_fwd, (q, kc, vc, kn, vn, lens, idx, 0.2, -1, 0, 0.0, 2))
    qq, kk, vv = torch.randn(1, 9, 2, 16), torch.randn(1, 12, 1, 16), torch.randn(1, 12, 1, 16)
    torch.library.opcheck(interface._attn_fwd, (qq, kk, vv, None, None, 9, 12, 0.25, -1, 0, 0.0, "v2"))
    out, lse = interface._attn_fwd(qq, kk, vv, None, None, 9, 12, 0.25, -1, 0, 0.0, "v2")
    torch.library.opcheck(interface._attn_bwd, (torch.randn_like(out), qq, kk, vv, out, lse, None, None, 9, 12, 0.25,
                                                -1, 0, 0.0, False, "v2"))


def test_compiles_fullgraph_without_graph_breaks():
    """torch.compile sees the kernels as opaque custom ops: no graph break, same result."""
    q, kc, vc, kn, vn, lens, idx = _case(Sc=40)
    lens = torch.tensor([0, 5, 30], dtype=torch.int32)

    def step(q, kc, vc, kn, vn):
        return fa.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, cache_batch_idx=idx, causal=True)

    def dense(q, k, v):
        return fa.flash_attn_func(q, k, v, causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    kc1, vc1 = kc.clone(), vc.clone()
    torch.testing.assert_close(compiled(q, kc1, vc1, kn, vn), step(q, kc.clone(), vc.clone(), kn, vn))
    assert torch.equal(kc1[int(idx[1]), 5], kn[1, 0]), "the compiled call did not append in place"
    qq, kk, vv = torch.randn(1, 9, 2, 16), torch.randn(1, 12, 1, 16), torch.randn(1, 12, 1, 16)
    torch.testing.assert_close(torch.compile(dense, fullgraph=True, backend="aot_eager")(qq, kk, vv), dense(qq, kk, vv))


def test_fast_launch_key_separates_what_triton_specialises():
    """The direct launch of a cached compiled kernel (kernels._common.FastLaunch, GPU only) reuses a kernel
    only for arguments Triton would specialise identically: tensor dtype and 16-byte alignment, int
    divisibility by 16, == 1, 32-bit range, None-ness, meta-parameters by name and value."""
    import inspect
    from hf_flashattn.kernels import decode
    fl = decode._decode_launch
    names = list(inspect.signature(decode._decode_kernel.fn).parameters)
    assert fl.n_runtime == names.index("HEAD_DIM")
    assert ("HAS_SEQLENS", True) in fl.constexprs and ("STORE_LSE", True) in fl.constexprs
    buf = torch.zeros(64, dtype=torch.float16)
    assert buf.data_ptr() % 16 == 0

    def key(t, n, **meta):
        return fl._key((t, n, 0.5, None), meta or {"BLOCK_N": 64}, 0)

    assert key(buf[:8], 32) == key(buf[8:16], 48)            # both 16-byte aligned, both multiples of 16
    assert key(buf[:8], 32) != key(buf[4:12], 32)            # 8 bytes off
    assert key(buf[:8], 32) != key(buf[:8].float(), 32)      # dtype
    assert key(buf[:8], 32) != key(buf[:8], 33)              # divisibility
    assert key(buf[:8], 1) != key(buf[:8], 3)                # == 1
    assert key(buf[:8], 32) != key(buf[:8], 2 ** 32)         # 64-bit int
    assert key(buf[:8], 32) != key(buf[:8], 32, BLOCK_N=32)  # meta value
    assert key(buf[:8], 32, BLOCK_M=64) != key(buf[:8], 32, BLOCK_N=64)  # meta name
    assert fl._key((buf, None), {}, 0) != fl._key((buf, buf), {}, 0)
    with pytest.raises(TypeError, match="runtime arguments"):
        fl((1, 1, 1), buf)


def test_fast_launch_key_ignores_the_residues_of_unspecialised_ints():
    """Ints the kernel marks do_not_specialize (the key length, the window) change every decode step; Triton
    compiles them once, so the key keeps only their 32/64-bit type. The compiled kernel (a JITFunction on the
    GPU) is stood in for by its parameters, as the interpreter's kernel object has none."""
    import inspect
    import types
    from hf_flashattn.kernels import _common as C, decode
    names = list(inspect.signature(decode._decode_kernel.fn).parameters)
    dns = {"seqlen_q", "window_left", "window_right", "group", "n_splits", "max_seqlen_k", "lse_off"}
    kernel = types.SimpleNamespace(fn=decode._decode_kernel.fn,
                                   params=[types.SimpleNamespace(do_not_specialize=n in dns) for n in names])
    fl = C.FastLaunch(kernel)
    assert {names[i] for i in fl.dns} == dns
    n = fl.n_runtime
    t = torch.zeros(16, dtype=torch.float16)
    base = [t if names[i].isupper() else 64 for i in range(n)]
    base[names.index("qk_scale")] = base[names.index("cap_scale")] = 1.0

    def key(**changes):
        args = list(base)
        for name, value in changes.items():
            args[names.index(name)] = value
        return fl._key(tuple(args), {"BLOCK_N": 64}, 0)

    assert key(max_seqlen_k=33) == key(max_seqlen_k=48) == key()          # not specialised: one kernel
    assert key(max_seqlen_k=2 ** 31) != key()                              # but a 64-bit int is another type,
    assert key(max_seqlen_k=2 ** 31) != key(lse_off=2 ** 31)               # argument by argument
    assert key(max_seqlen_k=2 ** 31) != key(max_seqlen_k=2 ** 63)          # (unsigned from 2**63)
    assert key(stride_kh=33) != key()                                      # a specialised int keeps its residue
    assert key(stride_kh=1) != key(stride_kh=17)


def test_lean_decode_matches_flash_attn_func():
    """decode.decode_bhsd (generate()'s per-layer path, Transformers' (B, H, S, D) layout, no lse) equals
    flash_attn_func on the transposed inputs, with splits, GQA, a window and softcap."""
    from hf_flashattn.kernels import decode
    g = torch.Generator().manual_seed(3)
    for B, H, Hk, L, D, window, cap in ((2, 4, 2, 300, 16, -1, 0.0), (1, 8, 1, 77, 40, 20, 5.0), (3, 2, 2, 9, 8, -1, 0.0)):
        q = torch.randn(B, H, 1, D, generator=g, dtype=torch.float16)
        k = torch.randn(B, Hk, L, D, generator=g, dtype=torch.float16)
        v = torch.randn(B, Hk, L, D, generator=g, dtype=torch.float16)
        out = decode.decode_bhsd(q, k, v, D ** -0.5, (window, 0), cap)
        ref = fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                 window_size=(window, -1), softcap=cap)
        assert out.shape == (B, 1, H, D) and out.is_contiguous()
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=0)


def test_lean_decode_merges_splits_in_kernel_with_one_launch(monkeypatch):
    """decode_bhsd (generate()'s per-layer call) merges the splits in the split kernel itself: one launch,
    partials and counters in a cached per-stream workspace, the counters back at zero after every call
    (the next call relies on it), the same output as the combine kernel's merge; growing shapes grow the
    workspace. While torch.compile traces (or a CUDA graph is captured) the combine kernel merges instead."""
    from hf_flashattn.kernels import decode
    launches = {"decode": 0, "combine": 0}
    for name in launches:
        real = getattr(decode, f"_{name}_launch")
        monkeypatch.setattr(decode, f"_{name}_launch", lambda *a, _r=real, _n=name, **kw:
                            launches.__setitem__(_n, launches[_n] + 1) or _r(*a, **kw))
    g = torch.Generator().manual_seed(11)
    # few (batch, kv head) programs, so that the interpreter's 4 "SMs" ask for 2-4 splits in every case
    largest = 0
    for B, H, Hk, L, D, window, cap in ((1, 8, 2, 200, 16, -1, 0.0), (1, 4, 1, 333, 32, 50, 0.0),
                                        (1, 6, 2, 500, 24, -1, 4.0), (2, 2, 1, 400, 8, -1, 0.0)):
        t = decode._tiles(1, H, Hk, D, torch.device("cpu"))
        n = decode.choose_num_splits(B, Hk, t.row_tiles, L, t.block_n, t.num_sms)
        assert n >= 2
        largest = max(largest, n * B * H * D + n * B * H)
        q = torch.randn(B, H, 1, D, generator=g, dtype=torch.float16)
        k = torch.randn(B, Hk, L, D, generator=g, dtype=torch.float16)
        v = torch.randn(B, Hk, L, D, generator=g, dtype=torch.float16)
        launches.update(decode=0, combine=0)
        fused = decode.decode_bhsd(q, k, v, D ** -0.5, (window, 0), cap)
        assert launches == {"decode": 1, "combine": 0}, launches
        for ws in decode._WORKSPACES.values():
            assert int(ws.counters.count_nonzero()) == 0, "a counter of the in-kernel merge was left nonzero"
        monkeypatch.setattr(decode, "FUSED_MERGE", False)
        two = decode.decode_bhsd(q, k, v, D ** -0.5, (window, 0), cap)
        monkeypatch.setattr(decode, "FUSED_MERGE", True)
        assert launches == {"decode": 2, "combine": 1}, launches
        torch.testing.assert_close(fused, two, atol=1e-3, rtol=0)
        ref = fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                 window_size=(window, -1), softcap=cap)
        torch.testing.assert_close(fused, ref, atol=1e-3, rtol=0)
    assert len(decode._WORKSPACES) == 1   # one device, one stream
    ws, = decode._WORKSPACES.values()
    assert ws.floats.numel() == ws.n_floats >= largest   # grown to the largest call (partial rows and lse)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    launches.update(decode=0, combine=0)
    decode.decode_bhsd(q, k, v, D ** -0.5, (-1, 0), 0.0)
    assert launches == {"decode": 1, "combine": 1}, "under torch.compile the combine kernel must merge"


def test_direct_decode_launch_passes_the_kernel_what_its_first_call_passed(monkeypatch):
    """decode_bhsd's direct launch on a GPU (`decode._direct`, which Triton's interpreter never takes): the
    first call of a shape goes through the kernel launch; later calls hand the cached compiled kernel the
    same grid, stream, arguments in the same places (pointers as ints, the output's a fresh one) and
    constexprs. Misaligned pointers, strides that are not multiples of 16 and a single split are declined
    (None: `_run` launches them), as is any call with the direct launch switched off."""
    import inspect
    from hf_flashattn.kernels import _common as C, decode
    calls = []

    class Compiled:
        function, packed_metadata = "function", "packed"

        def run(self, *a):
            calls.append(("run", a))

    class Launch:
        constexprs = decode._decode_launch.constexprs

        def __call__(self, grid, *args, **meta):
            calls.append(("launch", grid, args, meta))
            return Compiled()

    monkeypatch.setattr(decode, "_decode_launch", Launch())
    monkeypatch.setattr(decode, "_DIRECT", {})
    monkeypatch.setattr(decode, "_WORKSPACES", {})
    monkeypatch.setattr(C, "_launch_hooks", lambda: False)
    monkeypatch.setattr(C, "_raw_stream", lambda device: 7)
    g = torch.Generator().manual_seed(3)
    B, H, Hk, D, L = 1, 8, 2, 16, 200
    q = torch.randn(B, H, 1, D, generator=g, dtype=torch.float16)
    k = torch.randn(B, Hk, L, D, generator=g, dtype=torch.float16)
    v = torch.randn(B, Hk, L, D, generator=g, dtype=torch.float16)

    def direct(q, k, v, window=(-1, 0), cap=0.0):
        return decode._direct(q, k, v, q.shape[0], q.shape[1], q.shape[2], q.shape[3], q.stride(), k.stride(),
                              v.stride(), D ** -0.5, window, cap)

    for window, cap in (((-1, 0), 0.0), ((50, 0), 2.0)):
        calls.clear()
        first, second = direct(q, k, v, window, cap), direct(q, k, v, window, cap)
        assert first is not None and second is not None and first.shape == (B, 1, H, D)
        (kind1, grid, args, meta), (kind2, run) = calls
        assert (kind1, kind2) == ("launch", "run")
        names = list(inspect.signature(decode._decode_kernel.fn).parameters)
        out_at = names.index("OF")
        assert args[out_at] is first and args[names.index("Q")] is q and args[names.index("K")] is k
        assert meta["FUSED"] and meta["SPLIT"] and not meta["STORE_LSE"] and meta["SOFTCAP"] == (cap > 0)
        assert run[:9] == (*grid, 7, "function", "packed", None, None, None)
        want = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
        want[out_at] = second.data_ptr()
        assert list(run[9:9 + len(args)]) == want
        assert run[9 + len(args):] == tuple(meta.get(n, d) for n, d in Launch.constexprs)
    calls.clear()
    odd = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)   # 2 bytes off
    odd.copy_(q)
    assert direct(odd, k, v) is None
    k40 = torch.randn(B, Hk, L, 40, generator=g, dtype=torch.float16)   # strides 40: not multiples of 16
    assert direct(torch.randn(B, H, 1, 40, generator=g, dtype=torch.float16), k40, k40) is None
    assert direct(q, k[:, :, :40], v[:, :, :40]) is None                # one split at this key length
    monkeypatch.setattr(C, "FAST_LAUNCH", False)
    assert direct(q, k, v) is None
    assert calls == []


def test_in_kernel_merge_of_all_rows_at_once_equals_the_row_loop(monkeypatch):
    """TUNE["merge_rows"] (off by default until timed): the split that finishes last merges the tile's rows
    all at once instead of one per iteration; GQA groups of 4, 3 and 6 (padded to 4 and 8 rows, the padding
    loading nothing) and 1: the same outputs as the row loop and as the combine kernel."""
    from hf_flashattn.kernels import decode
    g = torch.Generator().manual_seed(12)
    cases = ((1, 8, 2, 200, 16), (1, 6, 2, 333, 32), (2, 6, 1, 300, 16), (1, 2, 2, 250, 8))
    for B, H, Hk, L, D in cases:
        q = torch.randn(B, H, 1, D, generator=g, dtype=torch.float16)
        k = torch.randn(B, Hk, L, D, generator=g, dtype=torch.float16)
        v = torch.randn(B, Hk, L, D, generator=g, dtype=torch.float16)
        loop = decode.decode_bhsd(q, k, v, D ** -0.5, (-1, 0), 0.0)
        old = dict(decode.TUNE)
        try:
            decode.set_tune(merge_rows=True)
            meta = decode._meta(decode._tiles(1, H, Hk, D, q.device), 3, q.dtype, False, False, False, False, False,
                                True)
            assert meta["MERGE_ROWS"] == decode._pow2(H // Hk)
            at_once = decode.decode_bhsd(q, k, v, D ** -0.5, (-1, 0), 0.0)
        finally:
            decode.set_tune(**old)
        monkeypatch.setattr(decode, "FUSED_MERGE", False)
        two = decode.decode_bhsd(q, k, v, D ** -0.5, (-1, 0), 0.0)
        monkeypatch.setattr(decode, "FUSED_MERGE", True)
        torch.testing.assert_close(at_once, loop, atol=0, rtol=0)
        torch.testing.assert_close(at_once, two, atol=1e-3, rtol=0)
        for ws in decode._WORKSPACES.values():
            assert int(ws.counters.count_nonzero()) == 0


def test_launch_meta_names_every_constexpr_of_the_decode_kernel():
    """torch.compile launches the decode kernel as a user-defined Triton kernel from the traced call, and refuses a call
    that leaves out a constexpr even where it has a default (the static-cache generate() of the seventeenth session's
    first run failed so when TMA was added without it): `_meta` names each one."""
    import inspect

    from hf_flashattn.kernels import decode
    params = inspect.signature(decode._decode_kernel.fn).parameters.values()
    constexprs = {p.name for p in params if "constexpr" in str(p.annotation)}
    t = decode._tiles(1, 8, 2, 64, torch.device("cpu"))
    for fused in (False, True):
        meta = decode._meta(t, 4, torch.float16, False, False, False, True, not fused, fused)
        assert constexprs <= set(meta), sorted(constexprs - set(meta))


def test_set_tune_forgets_cached_launch_plans():
    """The per-shape launch plans follow the decode kernel's TUNE: set_tune changes it and drops the plans
    made with the old values; an unknown parameter is refused by name."""
    from hf_flashattn.kernels import decode
    q = torch.randn(1, 4, 1, 16, dtype=torch.float16)
    k = torch.randn(1, 2, 100, 16, dtype=torch.float16)
    decode.decode_bhsd(q, k, k, 0.25, (-1, 0), 0.0)
    assert decode._TILES and decode._METAS
    old = dict(decode.TUNE)
    try:
        decode.set_tune(waves=3)
        assert decode.TUNE["waves"] == 3 and not decode._TILES and not decode._METAS
        with pytest.raises(KeyError, match="blocks"):
            decode.set_tune(blocks=2)
    finally:
        decode.set_tune(**old)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_cache_read_through_tensor_descriptors_matches_pointer_loads(monkeypatch, layout):
    """TUNE["tma"]: K and V blocks through tensor descriptors over the caches (Hopper; here Triton's interpreter), with
    the cache slots past the keys in use holding inf and NaN (zeroed in V, masked in the scores), ragged lengths with an
    empty cache, cache_batch_idx, GQA, a window and split counts; and decode_bhsd's (B, Hk, L, D) layout through the
    same descriptor (its strides reordered). Equal to the pointer kernel's output and within the reference's bound."""
    from hf_flashattn.kernels import decode
    calls = []
    real = decode._cache_descriptor
    monkeypatch.setattr(decode, "_cache_descriptor", lambda *a: calls.append(a[2]) or real(*a))
    if layout == "bshd":
        q, kc, vc, _, _, lens, idx = _case(B=3, Sc=90, H=4, Hk=2, D=32, Snew=0, dtype=torch.float16, seed=3)
        for c, L in zip(idx.tolist(), lens.tolist()):
            kc[c, L:], vc[c, L:] = float("nan"), float("inf")
        ref = _reference(q, kc, vc, None, None, lens, idx, window_size=(40, 0))[0]
        low = _reference(q, kc, vc, None, None, lens, idx, dtype=None, window_size=(40, 0))[0]
        run = [lambda s=s: fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_batch_idx=idx,
                                                      window_size=(40, 0), num_splits=s) for s in (1, 3)]
    else:
        g = torch.Generator().manual_seed(4)
        q = torch.randn(2, 4, 1, 16, generator=g, dtype=torch.float16)
        kc, vc = (torch.randn(2, 2, 150, 16, generator=g, dtype=torch.float16) for _ in range(2))
        ref = attention_ref(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), causal=True)[0]
        low = attention_ref(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), causal=True,
                            compute_dtype=None)[0]
        run = [lambda f=f: decode.decode_bhsd(q, kc, vc, 0.25, (-1, 0), 0.0) if f else
               decode._run(q, (q.stride(0), q.stride(2), q.stride(1)), kc, (kc.stride(0), kc.stride(2), kc.stride(1)),
                           vc, (vc.stride(0), vc.stride(2), vc.stride(1)), 2, 1, 4, 16, 2, None, None, 150, 0.25,
                           (-1, 0), 0.0, 3, None, False)[0] for f in (True, False)]
    old = dict(decode.TUNE)
    try:
        pointer = [f() for f in run]
        assert not calls
        decode.set_tune(tma=True)
        tma = [f() for f in run]
    finally:
        decode.set_tune(**old)
    assert calls, "the descriptor path was not taken"
    bound = 2 * (low.double() - ref.double()).abs().max().item() + FLOOR[torch.float16]
    for p, t in zip(pointer, tma):
        assert torch.isfinite(t).all()
        torch.testing.assert_close(t, p, atol=1e-3, rtol=0)
        assert (t.double() - ref.double()).abs().max().item() <= bound
