#!/usr/bin/env bash
# A separate virtual environment with TRL, for scripts/bench_step.py's comparison with TRL's DistillationTrainer
# (never a dependency of opd-lab). Idempotent. torch is pinned to the same local CPU build as .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
TRL_SPEC="${TRL_SPEC:-trl==1.16.0}"
stamp=.venv-trl/.installed
[ -f "$stamp" ] && [ "$(cat "$stamp")" = "$TRL_SPEC" ] && exit 0
[ -x .venv-trl/bin/python ] || "${PYTHON:-python3}" -m venv .venv-trl
pip=(.venv-trl/bin/python -m pip install --disable-pip-version-check -q)
"${pip[@]}" "torch==2.13.0"
cons=()
if .venv-trl/bin/python -c "import torch,sys; sys.exit(0 if torch.__version__.endswith('+cpu') else 1)"; then
  cons=(-c constraints-cpu.txt)
fi
"${pip[@]}" "${cons[@]}" "$TRL_SPEC" "transformers>=4.57,<6" "datasets" "accelerate"
echo "$TRL_SPEC" > "$stamp"
