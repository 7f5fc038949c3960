#!/usr/bin/env bash
# The prepared GPU check: everything a lent one-GPU machine should measure, in one command, ≤ ~8 minutes, with what
# such a machine has (PyTorch, transformers, pandas; no vLLM). Every result goes to one folder:
#
#   bash scripts/gpu_check.sh [OUT]          # OUT defaults to results/gpu_check/<UTC date>
#
# 1. the CUDA-marked tests (tests/test_gpu.py)                                         → pytest_gpu.txt
# 2. the loss-path benchmark at Qwen3's vocabulary, V = 151,936 (bf16)                 → bench_loss.txt
# 3. a 20-step embedded run on the GPU with bf16 autocast (static engine)              → embedded_bf16/
# 4. the step benchmark on the GPU (default engine and k = 1, peaks measured on it)    → bench_step.txt
# 5. 5 training steps of a Qwen3-0.6B-shaped model with random weights (no download),
#    static engine, chunked head, bf16                                                  → qwen3_0.6b_random/
# and nvidia-smi, the package versions and each step's wall time                       → env.txt, steps.tsv
#
# Packages the machine lacks (hydra-core, omegaconf, antlr4) travel as wheels: run
#   .venv/bin/python -m pip download --no-deps -d .gpu-wheels hydra-core==1.3.2 omegaconf==2.3.0 \
#       antlr4-python3-runtime==4.9.3
# here and carry `.gpu-wheels` (device tool: carry=[".gpu-wheels"]); this script installs them when missing.
# GPU_CHECK_DEVICE=cpu runs the same steps on a CPU with smaller sizes (a smoke test of the script itself).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/gpu_check/$(date -u +%Y-%m-%d)}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-$(command -v python3 || command -v python)}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
mkdir -p "$OUT"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\tseconds\n' >"$STEPS"

if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  if [ -d .gpu-wheels ]; then
    "$PY" -m pip install -q --no-index --find-links .gpu-wheels hydra-core omegaconf antlr4-python3-runtime
  else
    echo "gpu_check: hydra-core/omegaconf missing and no .gpu-wheels folder (see the header of this script)" >&2
    exit 2
  fi
fi

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record status and wall time; never stop the check
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "== $name"
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$([ $rc = 0 ] && echo ok || echo "rc=$rc")" "$(( $(date +%s) - t0 ))" >>"$STEPS"
  tail -n 3 "$OUT/$name.txt"
}

{
  date -u; uname -a
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); print('transformers',
transformers.__version__)"
  git rev-parse HEAD 2>/dev/null || true
} >"$OUT/env.txt" 2>&1

if [ "$DEVICE" = cuda ]; then
  LOSS_ARGS=(--device cuda --dtype bfloat16 --V 151936 --T 8192 --B 1 --H 1024)
  QWEN_LAYERS=()
  QWEN_RUN=(rollout.n_prompts=8 rollout.n_samples=4 rollout.mini_batch_size=16 rollout.max_tokens=256
            model.dtype=bfloat16)
  STEP_REPS=(--reps 2 --steps 6)
else
  LOSS_ARGS=(--device cpu --V 151936 --T 256 --B 1 --H 256 --repeats 2)
  QWEN_LAYERS=(--layers 2)
  QWEN_RUN=(rollout.n_prompts=2 rollout.n_samples=2 rollout.mini_batch_size=4 rollout.max_tokens=32)
  STEP_REPS=(--reps 1 --steps 2)
fi

step pytest_gpu 240 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
step bench_loss 180 "$PY" scripts/bench_loss.py "${LOSS_ARGS[@]}"
step embedded_bf16 240 "$PY" -m opd_lab trainer.device="$DEVICE" trainer.autocast_bf16=true rollout.engine=static \
  trainer.steps=20 eval.n_samples=4 "eval.ks=[1,4]" logger.progress=false logger.wandb.mode=disabled \
  hydra.run.dir="$OUT/embedded_bf16"
step bench_step 300 "$PY" scripts/bench_step.py --no-trl "${STEP_REPS[@]}" --configs auto,auto_k1 \
  --set trainer.device="$DEVICE" --peak-device "$DEVICE" --json "$OUT/bench_step.json"
QWEN=$(mktemp -d)
step make_qwen3 180 "$PY" scripts/make_random_qwen3.py --shape 0.6b --seed 0 --out "$QWEN/student" "${QWEN_LAYERS[@]}"
"$PY" scripts/make_random_qwen3.py --shape 0.6b --seed 1 --out "$QWEN/teacher" "${QWEN_LAYERS[@]}" >/dev/null 2>&1
step qwen3_0.6b_random 300 "$PY" -m opd_lab model.student="$QWEN/student" model.teacher="$QWEN/teacher" \
  trainer.device="$DEVICE" rollout.engine=static trainer.loss_path=chunked trainer.steps=5 trainer.warmup_steps=1 \
  "${QWEN_RUN[@]}" eval.baselines=false eval.n_samples=2 "eval.ks=[1,2]" eval.max_tokens=64 task.n_eval=16 \
  logger.progress=false logger.wandb.mode=disabled hydra.run.dir="$OUT/qwen3_0.6b_random"
rm -rf "$QWEN" "$OUT"/*/checkpoint "$OUT"/*/checkpoints
echo "== done: $OUT"; cat "$STEPS"
