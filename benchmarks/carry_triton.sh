#!/usr/bin/env bash
# A Triton release other than the device image's (3.6) on the GPU machine, to check the GPU path on the newest
# release that `triton>=3.6` admits. Its wheel (285 MB for 3.9.0) is larger than one device call may carry (64 MiB
# with the working tree), so `pack` makes a trimmed copy in parts small enough to carry one a call:
#   - libtriton.so without its symbol tables (`strip --strip-unneeded`: 500 -> 192 MB),
#   - no AMD backend, CUPTI, Proton, instrumentation, plugins or MLIR headers (none is used to compile or launch),
#   - no ptxas: the device image's Triton 3.6 ptxas (CUDA 12.8) is used through TRITON_PTXAS_PATH and (3.9 compiles
#     sm90 with it) TRITON_PTXAS_BLACKWELL_PATH, and Triton picks the PTX version from the ptxas it is given,
# about 44 MB as tar.xz, split into parts of at most PART_MB (default 30) under .tparts/ (ignored by git).
#
#   here:    bash benchmarks/carry_triton.sh pack 3.9.0
#   device:  bash benchmarks/carry_triton.sh stash          # in each call that carries a part (carry: [".tparts"])
#            eval "$(bash benchmarks/carry_triton.sh use)"  # once all parts are stashed: exports PYTHONPATH, both
#                                                           # ptxas paths and TRITON_BACKENDS_IN_TREE, or exits
#                                                           # non-zero naming what is missing
# The parts are stashed under /tmp/tparts on the device machine, which keeps them while it stays warm (30 s idle).
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=${1:-}
case $cmd in
  pack)
    ver=${2:?"usage: carry_triton.sh pack VERSION (e.g. 3.9.0)"}
    work=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$work" "triton==$ver"
    (cd "$work" && unzip -q triton-*.whl && rm triton-*.whl)
    strip --strip-unneeded "$work/triton/_C/libtriton.so"
    rm -rf "$work/triton/backends/amd" "$work/triton/backends/nvidia/lib/cupti" \
      "$work/triton/backends/nvidia/lib/cupti-blackwell" "$work/triton/backends/nvidia/bin/ptxas-blackwell" \
      "$work/triton/backends/nvidia/bin/ptxas" "$work/triton/_C/libproton.so" "$work/triton/instrumentation" \
      "$work/triton/plugins" "$work/triton/include"
    rm -rf .tparts && mkdir -p .tparts
    (cd "$work" && tar cf - triton "triton-$ver.dist-info") | xz -T2 -9 | split -b "${PART_MB:-30}M" - ".tparts/triton-$ver.tar.xz."
    rm -rf "$work"
    grep -qx '/.tparts/' .git/info/exclude 2>/dev/null || echo '/.tparts/' >> .git/info/exclude
    ls -l .tparts
    ;;
  stash)
    mkdir -p /tmp/tparts
    cp .tparts/* /tmp/tparts/
    ls -l /tmp/tparts
    ;;
  use)
    ptxas=$(python3 -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/ptxas'))")
    [ -x "$ptxas" ] || { echo "echo 'no ptxas at $ptxas'; exit 3"; exit 3; }
    # shellcheck disable=SC2012
    first=$(ls /tmp/tparts/*.tar.xz.aa 2>/dev/null | head -1)
    [ -n "$first" ] || { echo "echo 'no stashed parts under /tmp/tparts'; exit 3"; exit 3; }
    base=${first%.aa}
    dest=/tmp/$(basename "$base" .tar.xz)
    if [ ! -d "$dest/triton" ]; then
      mkdir -p "$dest"
      cat "$base".* | xz -d | tar xf - -C "$dest" || { echo "echo 'parts of $base incomplete'; exit 3"; exit 3; }
    fi
    # TRITON_BACKENDS_IN_TREE: the backends under triton/backends (nvidia only here), not the entry points, which
    # name the image's release's AMD backend too
    echo "export PYTHONPATH=$dest\${PYTHONPATH:+:\$PYTHONPATH} TRITON_PTXAS_PATH=$ptxas TRITON_PTXAS_BLACKWELL_PATH=$ptxas TRITON_BACKENDS_IN_TREE=1"
    ;;
  *) echo "usage: carry_triton.sh pack VERSION | stash | use" >&2; exit 2 ;;
esac
