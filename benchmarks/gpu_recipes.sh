#!/usr/bin/env bash
# GPU logs for the long-context recipe (issue 8), run by a device session, never by CI. Each run is
# recipes/finetune_long_context.py on the ~1B random Llama (Llama-3.2-1B's body, vocab 64), LoRA +
# activation checkpointing, bf16, one passkey document of exactly L tokens per step and GPU. A run writes
# $OUT/recipes/<name>.json (the recipe's summary, per-step losses) and <name>.log; a run that fails writes
# {"name", "status": out_of_memory | timeout | failed, "returncode"} instead. table.md sums them up.
#
#   bash benchmarks/gpu_recipes.sh bar       # 1x H100: 32k flashattn_custom vs sdpa (cuDNN), 128k flashattn_custom
#   bash benchmarks/gpu_recipes.sh bar32     # 1x H100: the 32k pair of bar only
#   bash benchmarks/gpu_recipes.sh grid      # 1x H100: 16k/32k/64k/128k x flashattn_custom, sdpa-cudnn, sdpa, eager
#   bash benchmarks/gpu_recipes.sh longest   # 1x H100: flashattn_custom at 192k, 256k, 384k, 512k until one fails
#   bash benchmarks/gpu_recipes.sh fsdp2     # 2x H100 (nvidia-h100-x2): FSDP2 at 32k/64k, and one GPU alone
#
# A device command may run 10 minutes: each phase stops starting runs after BUDGET_S seconds (default 500),
# and each run is killed after PER_RUN_S (default 240). Lengths already measured (a JSON exists) are skipped,
# so running a phase again continues it. Environment: OUT (default benchmarks/results/recipes-<date>),
# STEPS (default 6), WARMUP (default 2, steps left out of tokens/s).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/recipes-$(date +%F)}
DIR="$OUT/recipes"
mkdir -p "$DIR"
STEPS=${STEPS:-6}
WARMUP=${WARMUP:-2}
BUDGET_S=${BUDGET_S:-500}
PER_RUN_S=${PER_RUN_S:-240}
START=$SECONDS
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # hf_flashattn from this checkout, installed or not
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast

# run NAME CONFIG LEN IMPL [extra recipe args...]: returns 0 if the run trained, 1 otherwise
run() {
  local name=$1 cfg=$2 len=$3 impl=$4
  shift 4
  if [ -s "$DIR/$name.json" ]; then  # measured before: a failed run stays failed (and stops a growing sweep)
    echo "$name: done before"
    ! grep -q '"status"' "$DIR/$name.json"
    return
  fi
  if (( SECONDS - START > BUDGET_S )); then echo "$name: skipped (phase budget spent)"; return 1; fi
  local t0=$SECONDS rc status
  timeout "$PER_RUN_S" "$PYTHON" -m accelerate.commands.launch --config_file "recipes/accelerate/$cfg.yaml" recipes/finetune_long_context.py \
    --model-preset 1b --attn-implementation "$impl" --seq-len "$len" --min-len "$len" --batch-size 1 \
    --max-steps "$STEPS" --timing-warmup "$WARMUP" --warmup-steps 1 --lr 1e-4 --log-every 1 --eval-samples 0 \
    --no-save --metrics-out "$DIR/$name.json" "$@" > "$DIR/$name.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    status=failed
    grep -q -E "OutOfMemoryError|CUDA out of memory" "$DIR/$name.log" && status=out_of_memory
    [ $rc -eq 124 ] && status=timeout
    printf '{"name": "%s", "status": "%s", "returncode": %d, "seq_len": %d, "attn_implementation": "%s", "config": "%s"}\n' \
      "$name" "$status" "$rc" "$len" "$impl" "$cfg" > "$DIR/$name.json"
  fi
  local key='"tokens_per_s": [0-9.]*\|"peak_memory_gib": [0-9.]*\|"status": "[a-z_]*"'
  echo "$name: rc=$rc $((SECONDS - t0))s $(grep -o "$key" "$DIR/$name.json" | tr '\n' ' ')"
  return $(( rc != 0 ))
}

one_gpu() { CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} run "$@"; }

case "${1:-}" in
  bar)
    one_gpu 1gpu-flashattn_custom-32k single_gpu 32768 flashattn_custom
    one_gpu 1gpu-sdpa_cudnn-32k single_gpu 32768 sdpa --sdpa-backend cudnn
    one_gpu 1gpu-flashattn_custom-128k single_gpu 131072 flashattn_custom ;;
  bar32)  # the 32k pair of `bar` alone
    one_gpu 1gpu-flashattn_custom-32k single_gpu 32768 flashattn_custom
    one_gpu 1gpu-sdpa_cudnn-32k single_gpu 32768 sdpa --sdpa-backend cudnn ;;
  grid)
    for len in 16384 32768 65536 131072; do
      k=$((len / 1024))k
      one_gpu "1gpu-flashattn_custom-$k" single_gpu $len flashattn_custom
      one_gpu "1gpu-sdpa_cudnn-$k" single_gpu $len sdpa --sdpa-backend cudnn
      one_gpu "1gpu-sdpa-$k" single_gpu $len sdpa
    done
    for len in 16384 32768; do  # eager materialises heads x L x L scores: expected out of memory from 16k-32k
      one_gpu "1gpu-eager-$((len / 1024))k" single_gpu $len eager || break
    done ;;
  longest)  # fewer steps: a step at 256k+ takes tens of seconds
    for len in 196608 262144 393216 524288; do
      STEPS=3 WARMUP=1 one_gpu "1gpu-flashattn_custom-$((len / 1024))k" single_gpu $len flashattn_custom || break
    done ;;
  fsdp2)  # FSDP2_LENS: the context lengths (default 32768 65536)
    for len in ${FSDP2_LENS:-32768 65536}; do
      k=$((len / 1024))k
      run "2gpu-fsdp2-flashattn_custom-$k" fsdp2 $len flashattn_custom
      CUDA_VISIBLE_DEVICES=0 run "1gpu-alone-flashattn_custom-$k" single_gpu $len flashattn_custom
    done ;;
  *) echo "usage: $0 bar|bar32|grid|longest|fsdp2" >&2; exit 2 ;;
esac

"$PYTHON" - "$DIR" > "$DIR/table.md" <<'EOF'
import glob, json, os, sys
print("| run | attention | GPUs | seq len | tokens/s | peak memory (GiB) | final loss | status |")
print("|---|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    r, name = json.load(open(path)), os.path.basename(path)[:-5]
    impl = r["attn_implementation"] + ("-" + r["sdpa_backend"] if r.get("sdpa_backend", "auto") != "auto" else "")
    tok = f'{r["tokens_per_s"]:.0f}' if r.get("tokens_per_s") else "-"
    mem = f'{r["peak_memory_gib"]:.1f}' if r.get("peak_memory_gib") else "-"
    loss = f'{r["final_loss"]:.3f}' if r.get("final_loss") is not None else "-"
    print(f'| {name} | {impl} | {r.get("processes", "-")} | {r["seq_len"]} | {tok} | {mem} | {loss} | {r.get("status", "ok")} |')
EOF
cat "$DIR/table.md"
