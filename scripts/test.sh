#!/usr/bin/env bash
# Run the test suite (CPU: Triton interpreter; a GPU is used when present). Sets itself up.
cd "$(dirname "$0")/.."
. scripts/_env.sh
python -m pytest -q "$@"
