# Sourced by the scripts: use the active virtualenv, else create ./.venv with what the project needs.
# torch: on a machine without an NVIDIA GPU, torch==2.13.0 (the CPU wheel); with one, the default build.
set -euo pipefail
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
fi
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then pip install -q torch; else pip install -q torch==2.13.0; fi
fi
# always (quick when satisfied): `import hf_flashattn` alone would succeed from the repo root uninstalled
pip install -q -e ".[test]"
