"""Compile the backward kernels for sm_90a on a machine without a GPU (Triton's bundled ptxas) and report
registers and spills per config: a first filter before spending device time on a sweep.

    python benchmarks/compile_sm90.py            # table of (kernel, head dim, config) -> regs, spills

Codegen follows the local Triton, which may differ from the device's; the device sweep
(benchmarks/sweep_bwd.py) reports the real counts from the loaded kernels.
"""
from __future__ import annotations

import argparse  # noqa: I001
import inspect
import os as _os

_os.environ.setdefault("TRITON_INTERPRET", "0")  # compile, do not interpret (no GPU needed to compile)

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_flashattn.kernels import _common as C  # noqa: E402
from hf_flashattn.kernels import v2_bwd  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def signature(fn, ptr_dtype="bf16"):
    sig = {}
    for name in fn.arg_names:
        p = fn.params[fn.arg_names.index(name)]
        if p.is_constexpr:
            continue
        if name.isupper() and not name.startswith("SEQ") and name != "MASK_KIND":
            sig[name] = "*fp32" if name in ("LSE", "DELTA", "DQ_ACC") else \
                "*i32" if name.startswith("CU_") else f"*{ptr_dtype}"
        elif name in ("qk_scale", "cap_scale", "ds_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(fn, constexprs, num_warps, num_stages, aligned=True, maxnreg=None):
    sig = signature(fn)
    # constexprs left out take their defaults (Triton 3.9's ASTSource does not fill them in: "'NoneType' object has no
    # attribute '_unflatten_ir'")
    constexprs = dict(constexprs)
    for p in inspect.signature(fn.fn).parameters.values():
        if "constexpr" in str(p.annotation) and p.name not in constexprs and p.default is not inspect.Parameter.empty:
            constexprs[p.name] = p.default
    for k, v in constexprs.items():
        sig[k] = "constexpr"
    # pointers and strides 16-divisible, as Triton specialises them for (B, S, H, D) tensors with H*D a multiple of 16
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in sig
             if sig[n].startswith("*") or n.startswith("stride")} if aligned else {}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", 90, 32)
    k = triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages,
                                                         **({"maxnreg": maxnreg} if maxnreg else {})))
    # the bundled ptxas may be older than the PTX ISA version Triton writes; sm_90a needs nothing newer
    ptx = re.sub(r"^\.version \d+\.\d+", ".version 8.7", k.asm["ptx"], flags=re.M)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                         text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    stack = re.search(r"(\d+) bytes stack frame", out)
    wgmma = len(re.findall(r"wgmma.mma_async", ptx))
    return dict(regs=regs, spill_st=int(spill.group(1)), spill_ld=int(spill.group(2)), stack=int(stack.group(1)),
                wgmma=wgmma, mma_sync=len(re.findall(r"mma.sync", ptx)), smem=k.metadata.shared)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--kernels", default="dkdv,dq")
    ap.add_argument("--dkdv", default=None,
                    help="python literal: list of (BM, BN, warps, stages[, split[, kv_b[, dv_block_m]]])")
    ap.add_argument("--dq", default=None, help="python literal: list of (BM, BN, warps, stages)")
    ap.add_argument("--one-loop", action="store_true", help="the passes' blocks in one loop (v2_bwd.ONE_LOOP)")
    args = ap.parse_args()
    import ast
    over = {k: ast.literal_eval(getattr(args, k)) for k in ("dkdv", "dq") if getattr(args, k)}
    for d in map(int, args.dims.split(",")):
        cls = C.head_dim_class(d)
        for kname, fn, table, extra in (("dkdv", v2_bwd._dkdv_kernel, v2_bwd._DKDV_CONFIGS, {"ATOMIC_DQ": False}),
                                        ("dq", v2_bwd._dq_kernel, v2_bwd._DQ_CONFIGS, {})):
            if kname not in args.kernels.split(","):
                continue
            for c in over.get(kname, table[cls]):
                bm, bn, w, s = c[:4]
                split = bool(c[4:5] and c[4])
                kv_b = bool(c[5:6] and c[5])
                dv_bm = c[6] if len(c) > 6 and kname == "dkdv" else 0
                ce = dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_M=bm, BLOCK_N=bn, IS_VARLEN=False, SOFTCAP=False,
                          DOT_PREC="tf32", D_CLASS=cls, ONE_LOOP=args.one_loop, **extra)
                if kname == "dkdv":
                    ce["SPLIT"] = split
                    ce["KV_B"] = kv_b
                    ce["DV_BLOCK_M"] = dv_bm
                try:
                    r = compile_one(fn, ce, w, s)
                    label = (" kv_b" if kname == "dkdv" and kv_b else "") + (f" dv_bm {dv_bm}" if dv_bm else "")
                    print(f"{kname:5s} d{d:<4d} BM{bm:<4d} BN{bn:<4d} w{w} s{s} split={int(split)}{label}: "
                          f"regs {r['regs']:3d} spill st/ld {r['spill_st']}/{r['spill_ld']} stack {r['stack']} "
                          f"smem {r['smem']} wgmma {r['wgmma']}", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"{kname:5s} d{d} {c}: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
