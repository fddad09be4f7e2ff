#!/usr/bin/env bash
# One device call, several GPU phases, each under its own time limit; everything a phase writes is
# packed into $OUT/results.tgz (the device tool returns at most 8 files), with $OUT/session.log.
#
#   bash benchmarks/device_session.sh check:240 patches:150 decode:150
#
# Phases (the number is the phase's wall-clock limit in seconds; its script gets a budget a little
# under it so that it writes its JSON before being killed):
#   check     benchmarks/gpu_check.py --versions $CHECK_VERSIONS (default v3,v1,v2) $CHECK_ARGS, autotuning off
#   check-direct  the same grid with autotuning on and --direct: each case's later calls (the kept direct launches)
#             and calls with FAST_LAUNCH off must give the first call's bits ($DIRECT_VERSIONS default v2,v3,
#             $DIRECT_DTYPES default bf16; v3's single pass off, its atomic dQ being unordered)
#   packed    benchmarks/bench_packed.py $PACKED_ARGS (the packed functions' in-place backward against the views
#             through flash_attn_func: time, peak memory, gradients)
#   models    benchmarks/gpu_models.py --versions $MODEL_VERSIONS (default v2,v3)
#   patches   benchmarks/gpu_patches.py
#   decode    benchmarks/bench_decode.py $DECODE_ARGS (e.g. --skip-generate: the kernel table only)
#   decode-gen     its generate() part only (dynamic cache; $GEN_ARGS, e.g. "--prompts 32768 --no-eager")
#   decode-static  its generate() part with a static (compiled) cache
#   host      benchmarks/host_overhead.py (host time of a decode step's attention, piece by piece)
#   decode-check   benchmarks/gpu_decode_check.py (decode paths and the direct kernel launch against the reference)
#   profile   benchmarks/profile_decode.py (host-side profile of Transformers decode steps)
#   sweep     benchmarks/sweep_decode.py (launch parameters of the split-KV decode kernel)
#   sweep-bwd benchmarks/sweep_bwd.py (tile configs of v2's backward passes and forward, forced one by one; SWEEP_DIMS,
#             SWEEP_SEQLENS, SWEEP_KINDS)
#   sweep-v3  benchmarks/sweep_v3.py $SWEEP_ARGS (v3 forward launch plans: tiles, host/in-kernel descriptors, WS, fold;
#             SWEEP_DIMS, SWEEP_SEQLENS)
#   gluon     benchmarks/sweep_gluon.py $GLUON_ARGS (the Gluon v3 forward: correctness grid, then its plans beside
#             the Triton-language v3, SDPA-cuDNN and SDPA-flash)
#   gluon-bwd benchmarks/sweep_gluon_bwd.py $GLUON_BWD_ARGS (the Gluon v3 backward: correctness through
#             flash_attn_func, then fwd+bwd beside v2's backward, SDPA-cuDNN, SDPA-flash, Flex)
#   probe     benchmarks/probe_short_fwd.py (short-sequence forwards: host time a call beside the measured time)
#   host-v3   benchmarks/probe_host.py (flash_attn_func's direct launches against Triton's entry point: equal results,
#             host time a call, do_bench at 512-1k tokens, a profile)
#   host-bwd  benchmarks/probe_host_bwd.py (host time of a v3 fwd+bwd piece by piece at a tiny shape, a profile)
#   host-v2   benchmarks/probe_host_v2.py $HOST_V2_ARGS (v2 fwd+bwd: host segments at a tiny shape; the short points
#             timed as bench.py does, queued, and on the host, beside SDPA-flash)
#   gqa-ab    benchmarks/probe_gqa_ab.py (GQA 32k causal fwd+bwd timed as bench.py and as sweep_gluon_bwd.py, one process)
#   bwd-parts benchmarks/probe_bwd_parts.py $BWD_PARTS_ARGS (a fwd+bwd's device time kernel by kernel under
#             torch.profiler, ours-v3 beside SDPA-cuDNN and SDPA-flash; default d128/d64 at 1k and 4k)
#   kv-out    benchmarks/probe_kv_out.py $KV_OUT_ARGS (the dK/dV pass's store and K/V-slot variants: bitwise check
#             against the baseline, then rounds of A/B at 1k-4k)
#   probe-decode benchmarks/probe_decode.py $PROBE_DECODE_ARGS (the split-KV decode kernel's variants in CUDA graphs:
#             TMA against pointer loads, the combine's share, split counts; check against float64 first)
#   tail      benchmarks/probe_tail.py $TAIL_ARGS (the Gluon forward's tail of single tiles under a square causal mask:
#             bitwise and reference check, then A/B rounds beside SDPA-cuDNN)
#   tile-order benchmarks/probe_tile_order.py $TILE_ORDER_ARGS (the one-program-a-tile forwards' launch order: bitwise
#             and reference check, then GROUP_TILES values A/B in rounds beside SDPA-cuDNN and SDPA-flash)
#   plan-ab   benchmarks/probe_plan_ab.py $PLAN_AB_ARGS (the Gluon forward's default plans against variants, e.g.
#             ping-pong: bitwise and reference check, then A/B rounds beside SDPA-cuDNN)
#   plan-ab2  the same with $PLAN_AB2_ARGS (a second set of points and variants in the same call)
#   bwd-tma   benchmarks/probe_bwd_tma.py $BWD_TMA_ARGS (v2's backward with descriptor loads against pointer loads:
#             bitwise check, then fwd+bwd rounds at 512-1k beside SDPA-flash)
#   one-loop  benchmarks/probe_one_loop.py $ONE_LOOP_ARGS (the one-loop kernels against the three loops, config by
#             config, bitwise: v3.py's plans, v2's forward and backward configs forced)
#   persistent benchmarks/probe_persistent.py (the Gluon forward and backward persistent against one program a unit:
#             check with bitwise equality, then the forward and fwd+bwd grid beside v3.py's kernel and SDPA-cuDNN;
#             PERSISTENT_ARGS=--quick: a few cases and four points)
#   packed-fwd benchmarks/probe_packed_fwd.py (the Gluon forward on packed sequences: check, then d64 causal at 8k-32k
#             dense / packed against v3.py's kernel and SDPA-cuDNN)
#   fp8       benchmarks/bench_fp8.py (FP8 accuracy, generation agreement, speed)
#   fp8-check benchmarks/gpu_fp8_check.py (FP8 kernel on awkward shapes, each tile-load path, against float64)
#   fp8-diagnose  its variants (pointer loads / TMA / TMA + WS / no P·V) over a few tiles ($DIAG_ARGS, e.g.
#             "--diag-dims 128 --diag-s 4096 --diag-causal --diag-tma-only --diag-configs '[(128,64,4,4)]'")
#   bench     benchmarks/bench.py $BENCH_ARGS (default --versions v2,v3)
#   fwd-pick  benchmarks/probe_fwd_pick.py $FWD_PICK_ARGS (v2 forward: the autotuner's pick and each config forced,
#             beside SDPA-flash; run it under each Triton release, benchmarks/carry_triton.sh bringing a second one)
#   recipes-bar / recipes-grid / recipes-longest / recipes-fsdp2   benchmarks/gpu_recipes.sh PHASE
#   ncu       Nsight Compute (--set full, clocks left alone) on benchmarks/ncu_target.py's kernels
#             ($NCU_TARGETS, default "fp8 dkdv"), details pages as text; NCU_SOURCE=1 adds per-line
#             counters (source page, CSV)
# A folder .tcache (Triton's cache of an earlier call, carried back) is used when present, and the
# cache (compiled kernels and launchers, without their IR) is returned as $OUT/tcache.tgz so that the next call need
# not compile again: carry it as a file (`carry: [".devout/tcache.tgz"]`, ignored by git) and start the command with
# `tar xzf .devout/tcache.tgz && ...`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-out}
RES=${RES:-/tmp/device-results}
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="$PWD/.tcache"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$TRITON_CACHE_DIR"
# installed (editable, offline) so that hf_flashattn.patches resolves through the package-dir mapping
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$RES/pip.log" 2>&1 || echo "pip install -e . failed" | tee -a "$RES/pip.log"
{
  echo "date $(date -u +%FT%TZ) commit ${COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers, accelerate, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"
  python3 -c "import importlib.metadata as m; print('setuptools', m.version('setuptools'), '| hf-flashattn installed', m.version('hf-flashattn'))"
  cat "$RES/pip.log"
} > "$RES/env.txt" 2>&1
cat "$RES/env.txt" | tee "$OUT/session.log"

for spec in "$@"; do
  phase=${spec%%:*}
  secs=${spec#*:}
  [ "$secs" = "$spec" ] && secs=300
  budget=$(( secs > 90 ? secs - 45 : secs / 2 ))
  dir="$RES/$phase"
  mkdir -p "$dir"
  case $phase in
    check) cmd=(env HF_FLASHATTN_AUTOTUNE=0 python3 benchmarks/gpu_check.py --out "$dir"
                --versions "${CHECK_VERSIONS:-v3,v1,v2}" --dtypes "${CHECK_DTYPES:-bf16,fp16}" --budget-s "$budget"
                ${CHECK_ARGS:-}) ;;
    check-direct) cmd=(python3 benchmarks/gpu_check.py --out "$dir" --direct --single-pass-from-keys 100000000
                --versions "${DIRECT_VERSIONS:-v2,v3}" --dtypes "${DIRECT_DTYPES:-bf16}" --budget-s "$budget"
                ${DIRECT_ARGS:-}) ;;
    packed) cmd=(python3 benchmarks/bench_packed.py --out "$dir" ${PACKED_ARGS:-}) ;;
    models) cmd=(python3 benchmarks/gpu_models.py --out "$dir" --versions "${MODEL_VERSIONS:-v2,v3}") ;;
    patches) cmd=(python3 benchmarks/gpu_patches.py --out "$dir" --budget-s "$budget") ;;
    # shellcheck disable=SC2206
    decode) cmd=(python3 benchmarks/bench_decode.py --out "$dir" --budget-s "$budget" ${DECODE_ARGS:-}) ;;
    decode-check) cmd=(python3 benchmarks/gpu_decode_check.py --out "$dir") ;;
    host) cmd=(python3 benchmarks/host_overhead.py --out "$dir") ;;
    # shellcheck disable=SC2206
    decode-gen) cmd=(python3 benchmarks/bench_decode.py --out "$dir" --budget-s "$budget" --skip-kernels ${GEN_ARGS:-}) ;;
    decode-static) cmd=(python3 benchmarks/bench_decode.py --out "$dir" --budget-s "$budget" --skip-kernels --cache static) ;;
    profile) cmd=(python3 benchmarks/profile_decode.py --out "$dir") ;;
    sweep) cmd=(python3 benchmarks/sweep_decode.py --out "$dir") ;;
    sweep-bwd) cmd=(python3 benchmarks/sweep_bwd.py --out "$dir" --budget-s "$budget" --dims "${SWEEP_DIMS:-64,128,256}"
                   --seqlens "${SWEEP_SEQLENS:-1024,4096,16384}" --kinds "${SWEEP_KINDS:-merged,dkdv,dq,fwd}" ${SWEEP_ARGS:-}) ;;
    # shellcheck disable=SC2206
    sweep-v3) cmd=(python3 benchmarks/sweep_v3.py --out "$dir" --budget-s "$budget" --dims "${SWEEP_DIMS:-128,256,64}"
                  --seqlens "${SWEEP_SEQLENS:-4096,16384,1024}" ${SWEEP_ARGS:-}) ;;
    gluon) cmd=(python3 benchmarks/sweep_gluon.py --out "$dir" --budget-s "$budget" ${GLUON_ARGS:-}) ;;
    probe) cmd=(python3 benchmarks/probe_short_fwd.py --out "$dir") ;;
    host-v3) cmd=(python3 benchmarks/probe_host.py --out "$dir" --budget-s "$budget") ;;
    host-bwd) cmd=(python3 benchmarks/probe_host_bwd.py --out "$dir") ;;
    host-v2) cmd=(python3 benchmarks/probe_host_v2.py --out "$dir" ${HOST_V2_ARGS:-}) ;;
    gqa-ab) cmd=(python3 benchmarks/probe_gqa_ab.py --out "$dir") ;;
    # shellcheck disable=SC2206
    bwd-parts) cmd=(python3 benchmarks/probe_bwd_parts.py --out "$dir" --budget-s "$budget" ${BWD_PARTS_ARGS:-}) ;;
    # shellcheck disable=SC2206
    kv-out) cmd=(python3 benchmarks/probe_kv_out.py --out "$dir" --budget-s "$budget" ${KV_OUT_ARGS:-}) ;;
    # shellcheck disable=SC2206
    probe-decode) cmd=(python3 benchmarks/probe_decode.py --out "$dir" --budget-s "$budget" ${PROBE_DECODE_ARGS:-}) ;;
    # shellcheck disable=SC2206
    tail) cmd=(python3 benchmarks/probe_tail.py --out "$dir" --budget-s "$budget" ${TAIL_ARGS:-}) ;;
    # shellcheck disable=SC2206
    plan-ab) cmd=(python3 benchmarks/probe_plan_ab.py --out "$dir" --budget-s "$budget" ${PLAN_AB_ARGS:-}) ;;
    # shellcheck disable=SC2206
    plan-ab2) cmd=(python3 benchmarks/probe_plan_ab.py --out "$dir" --budget-s "$budget" ${PLAN_AB2_ARGS:-}) ;;
    # shellcheck disable=SC2206
    bwd-tma) cmd=(python3 benchmarks/probe_bwd_tma.py --out "$dir" --budget-s "$budget" ${BWD_TMA_ARGS:-}) ;;
    # shellcheck disable=SC2206
    one-loop) cmd=(python3 benchmarks/probe_one_loop.py --out "$dir" --budget-s "$budget" ${ONE_LOOP_ARGS:-}) ;;
    tile-order) cmd=(python3 benchmarks/probe_tile_order.py --out "$dir" --budget-s "$budget" ${TILE_ORDER_ARGS:-}) ;;
    # shellcheck disable=SC2206
    persistent) cmd=(python3 benchmarks/probe_persistent.py --out "$dir" --budget-s "$budget" ${PERSISTENT_ARGS:-}) ;;
    packed-fwd) cmd=(python3 benchmarks/probe_packed_fwd.py --out "$dir" --budget-s "$budget") ;;
    # shellcheck disable=SC2206
    gluon-bwd) cmd=(python3 benchmarks/sweep_gluon_bwd.py --out "$dir" --budget-s "$budget" ${GLUON_BWD_ARGS:-}) ;;
    fp8) cmd=(python3 benchmarks/bench_fp8.py --out "$dir" --budget-s "$budget") ;;
    fp8-check) cmd=(python3 benchmarks/gpu_fp8_check.py --out "$dir") ;;
    # shellcheck disable=SC2206
    fp8-diagnose) cmd=(python3 benchmarks/bench_fp8.py --out "$dir" --diagnose ${DIAG_ARGS:-}) ;;
    # shellcheck disable=SC2206
    bench) cmd=(python3 benchmarks/bench.py --out "$dir" --budget-s "$budget" ${BENCH_ARGS:---versions v2,v3}) ;;
    # shellcheck disable=SC2206
    fwd-pick) cmd=(python3 benchmarks/probe_fwd_pick.py --out "$dir" ${FWD_PICK_ARGS:-}) ;;
    recipes-*) cmd=(env OUT="$dir" BUDGET_S="$budget" bash benchmarks/gpu_recipes.sh "${phase#recipes-}") ;;
    ncu) cmd=(bash -c '
           NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
           [ -n "$NCU" ] || { echo "no ncu on this machine"; exit 1; }
           for t in ${NCU_TARGETS:-fp8 dkdv}; do
             case $t in
               fp8) sel="-k regex:_fp8_fwd_kernel -s 2 -c 1" ;;
               dkdv) sel="-k regex:_dkdv_kernel -s 2 -c 1" ;;
               gluon-fwd) sel="-k regex:_fwd_kernel_ws -s 2 -c 1" ;;
               v2-fwd128|v2-fwd256c) sel="-k regex:^_fwd_kernel$ -s 2 -c 1" ;;
               flash-fwd128) sel="-k regex:flash_fwd -s 2 -c 1" ;;
               *) sel="--profile-from-start off -s 2 -c 2" ;;   # cudnn-fwd: its launches inside the range
             esac
             src=$([ "${NCU_SOURCE:-0}" = 1 ] && echo "--import-source yes")
             # shellcheck disable=SC2086
             "$NCU" --clock-control none --set full $src $sel -f -o "$0/$t" python3 benchmarks/ncu_target.py "$t"
             "$NCU" -i "$0/$t.ncu-rep" --page details > "$0/$t-details.txt" 2>&1
             # NCU_SOURCE=1: per-line counters (Triton keeps line info in its PTX), to find which load or
             # instruction a finding belongs to
             [ "${NCU_SOURCE:-0}" = 1 ] && "$NCU" -i "$0/$t.ncu-rep" --page source --csv --print-source cuda,sass \
               > "$0/$t-source.csv" 2>&1
             rm -f "$0/$t.ncu-rep"
           done' "$dir") ;;
    *) echo "unknown phase $phase" | tee -a "$OUT/session.log"; continue ;;
  esac
  t0=$SECONDS
  timeout -k 15 "$secs" "${cmd[@]}" > "$dir/$phase.log" 2>&1
  rc=$?
  {
    echo "=== $phase: rc=$rc in $((SECONDS - t0))s (limit $secs s): ${cmd[*]}"
    grep -E "^(FAIL|correctness grid|models:|time budget|decode check)" "$dir/$phase.log" | head -40
    tail -n 25 "$dir/$phase.log"
  } | tee -a "$OUT/session.log"
done

cp "$OUT/session.log" "$RES/session.log"
tar czf "$OUT/results.tgz" -C "$RES" .
# Triton's cache without the IR of each kernel (.llir, .ptx, .ttgir, .ttir, .source: 90% of its bytes; a cache hit
# loads the .json and the .cubin, and a group's missing children are skipped), so that it fits the 16 MiB a returned
# file may have (the fifteenth session's calls had 91 MB with the IR and came back without it)
find .tcache -type f \( -name '*.llir' -o -name '*.ptx' -o -name '*.ttgir' -o -name '*.ttir' -o -name '*.source' \) \
  -delete 2>/dev/null
tar czf /tmp/tcache.tgz .tcache 2>/dev/null && [ "$(stat -c %s /tmp/tcache.tgz)" -lt 15000000 ] && cp /tmp/tcache.tgz "$OUT/"
echo "Triton cache returned: $(stat -c %s "$OUT/tcache.tgz" 2>/dev/null || echo none) bytes" | tee -a "$OUT/session.log"
ls -la "$OUT"
