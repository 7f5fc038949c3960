#!/usr/bin/env bash
# Set up (first time) and run the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export WANDB_MODE=offline HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
