"""End-to-end OPD step time of opd-lab's real loop against TRL's DistillationTrainer, on the same models and settings.

    bash scripts/setup_trl_env.sh                      # once: TRL in its own environment (.venv-trl)
    .venv/bin/python scripts/bench_step.py [--reps 3] [--steps 8] [--configs hf,static,static_k1,vllm] [--no-trl]

Settings (the issue's): the embedded teacher and student, 32 sequences per step (opd-lab: 8 prompts × 4 samples;
TRL: 32 prompts), up to 256 new tokens, T = 1, top-p 1, one AdamW update per step (``rollout.reuse=1
mini_batch_size=32 gate=none``), ``--steps`` measured steps after one warm-up step. opd-lab runs its real loop
(``python -m opd_lab``; nothing re-implemented here) and the timings come from its ``metrics.jsonl``; TRL runs
``scripts/bench_trl.py`` under ``.venv-trl``. The repetitions are interleaved (TRL, then every opd-lab
configuration, ``--reps`` times), since timings on shared machines drift. ``--main`` adds the main job's settings
(reuse 2, mini-batch 16, LSM + block64) for each engine.

Prints, per system: s/step (mean over repetitions of the mean over steps, and the range of the repetitions), the
breakdown (rollout, π_old, teacher, learner, engine sync, time the learner waited for the rollout), trained
completion tokens/s end to end, and the ratio of tokens/s to TRL's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDENT, TEACHER = ROOT / "opd_lab/assets/embedded/student", ROOT / "opd_lab/assets/embedded/teacher"
COMMON = ["rollout.n_prompts=8", "rollout.n_samples=4", "rollout.max_tokens=256", "rollout.temperature=1.0",
          "eval.baselines=false", "eval.n_samples=1", "eval.ks=[1]", "logger.wandb.mode=disabled",
          "logger.progress=false", "trainer.warmup_steps=0", "trainer.threads=2"]
TRL_LIKE = ["rollout.reuse=1", "rollout.mini_batch_size=32", "gate=none", "rollout.top_p=1.0"]
MAIN = ["rollout.reuse=2", "rollout.mini_batch_size=16", "loss=lsm", "gate=block64"]
CONFIGS = {
    "hf": ["rollout.engine=hf"],
    "static": ["rollout.engine=static"],
    "static_k1": ["rollout.engine=static", "rollout.staleness=1"],
    "vllm": ["rollout.engine=vllm"],
    "vllm_k1": ["rollout.engine=vllm", "rollout.staleness=1"],
}
PARTS = [("rollout/seconds", "rollout"), ("time/score_old_s", "π_old"), ("time/score_teacher_s", "teacher"),
         ("time/learner_s", "learner"), ("time/sync_s", "sync"), ("time/rollout_wait_s", "waited")]


def run_opd(overrides: list[str], steps: int, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "opd_lab", *COMMON, *overrides, f"trainer.steps={steps + 1}", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"})
    if proc.returncode:
        raise RuntimeError(f"{' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{"seconds": r["time/step_s"], "tokens": r["response/mean_len"] * 32,
             **{name: r.get(key, 0.0) for key, name in PARTS}} for r in recs if "loss" in r][1:]  # skip warm-up


def run_trl(steps: int, out: Path, prompts: Path) -> list[dict]:
    py = ROOT / ".venv-trl/bin/python"
    if not py.exists():
        raise SystemExit("TRL is not installed: bash scripts/setup_trl_env.sh (or pass --no-trl)")
    proc = subprocess.run([str(py), str(ROOT / "scripts/bench_trl.py"), "--student", str(STUDENT), "--teacher",
                           str(TEACHER), "--prompts", str(prompts), "--steps", str(steps + 1), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode:
        raise RuntimeError(f"TRL failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())["steps"][1:]


def summarise(reps: list[list[dict]]) -> dict:
    per_rep_s = [statistics.mean(s["seconds"] for s in rep) for rep in reps]
    per_rep_tps = [sum(s["tokens"] for s in rep) / sum(s["seconds"] for s in rep) for rep in reps]
    out = {"s_step": statistics.mean(per_rep_s), "s_min": min(per_rep_s), "s_max": max(per_rep_s),
           "tok_s": statistics.mean(per_rep_tps), "tok_min": min(per_rep_tps), "tok_max": max(per_rep_tps)}
    for _, name in PARTS:
        vals = [s.get(name) for rep in reps for s in rep if name in s]
        out[name] = statistics.mean(vals) if vals else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--configs", default="hf,static,static_k1,vllm")
    ap.add_argument("--main", action="store_true", help="also the main job's settings (reuse 2, mini-batch 16)")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--json", help="also write the raw per-step records here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_step_"))
    sys.path.insert(0, str(ROOT))
    from opd_lab.tasks.arith import ArithmeticTask

    prompts = work / "prompts.json"
    problems = ArithmeticTask().train_problems(32 * (args.steps + 1), random.Random(0))
    prompts.write_text(json.dumps([p.question for p in problems]))
    systems = {} if args.no_trl else {"TRL DistillationTrainer": None}
    for name in args.configs.split(","):
        systems[f"opd-lab {name}"] = TRL_LIKE + CONFIGS[name]
        if args.main:
            systems[f"opd-lab {name} (main job settings)"] = MAIN + CONFIGS[name]
    raw: dict[str, list] = {name: [] for name in systems}
    for rep in range(args.reps):
        for name, overrides in systems.items():
            out = work / f"{len(raw[name])}_{name.replace(' ', '_').replace('(', '').replace(')', '')}"
            raw[name].append(run_trl(args.steps, out.with_suffix(".json"), prompts) if overrides is None
                             else run_opd(overrides, args.steps, out))
            print(f"rep {rep + 1}/{args.reps} {name}: {statistics.mean(s['seconds'] for s in raw[name][-1]):.3f} "
                  "s/step", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    table = {name: summarise(reps) for name, reps in raw.items()}
    ref = table.get("TRL DistillationTrainer")
    print(f"\n32 sequences/step, ≤256 new tokens, T=1, top-p 1, one update/step; {args.steps} steps × {args.reps} "
          "repetitions (interleaved)\n")
    head = ["system", "s/step (range)", *[n for _, n in PARTS], "trained tok/s (range)", "× TRL"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, r in table.items():
        parts = ["–" if r[n] != r[n] else f"{r[n]:.3f}" for _, n in PARTS]
        ratio = f"{r['tok_s'] / ref['tok_s']:.2f}" if ref else "–"
        print(f"| {name} | {r['s_step']:.3f} ({r['s_min']:.3f}–{r['s_max']:.3f}) | " + " | ".join(parts) +
              f" | {r['tok_s']:,.0f} ({r['tok_min']:,.0f}–{r['tok_max']:,.0f}) | {ratio} |")


if __name__ == "__main__":
    main()
