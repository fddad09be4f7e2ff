#!/usr/bin/env bash
# The main job: a tiny Llama with attn_implementation="flashattn_custom" against eager. Sets itself up.
cd "$(dirname "$0")/.."
. scripts/_env.sh
python demo.py "$@"
