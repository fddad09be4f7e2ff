#!/usr/bin/env bash
# Run the test suite (CPU: Triton interpreter; a GPU is used when present). Sets itself up.
cd "$(dirname "$0")/.."
. scripts/_env.sh
# the tests spread over up to four processes, one a CPU (pytest-xdist; on this project's 2-core machine, 2026-11-28:
# 455 s with two, 840 s in one); `bash scripts/test.sh -n 0` runs them in one process (a later -n wins)
# The CPUs this process may run on, not xdist's `-n auto`: with psutil installed (accelerate needs it), that counts
# the host's physical cores and ignores the affinity a container sets.
workers=$(python -c "import os
cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
print(min(4, cpus))")
python -m pytest -q -n "$workers" "$@"
