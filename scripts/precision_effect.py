"""The training effect of bf16 autocast: a sweep's runs paired by seed against its float32 runs.

    python -m opd_lab --multirun trainer.seed=0,1,2,3,4 trainer.autocast_bf16=false,true \\
        rollout.teacher_autocast_bf16=false,true hydra.sweep.dir=multirun/precision
    .venv/bin/python scripts/precision_effect.py multirun/precision --out results/precision_effect

Per run (one job folder of the sweep): the final pass@k and the mean over the training steps of the loss, the
drift (mean |δ_t| at the last update of a step), the gate's spread, the sampler-vs-π_old mismatch
|log π_s − log π_old| and the phase timings (timings without the first step). Per setting (learner bf16
``trainer.autocast_bf16``, teacher bf16 ``rollout.teacher_autocast_bf16``, both): the mean of each, and the paired
difference to the float32 run of the same seed with its 95% t interval. Writes ``runs.csv``, ``summary.csv`` and
``paired.csv`` into ``--out`` (refusing a non-empty folder unless ``--force``) and prints both tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from opd_lab.core.stats import mean_ci95  # noqa: E402
from opd_lab.run.tracking import read_metrics  # noqa: E402

METRICS = ["loss", "drift/last_update_mean_abs_delta", "gate/std", "gate/min", "gate/frac_below_0.5",
           "mismatch/sampler_old_abs", "teacher_minus_old_logp", "grad_norm",
           "time/learner_s", "time/score_teacher_s", "time/step_s"]
SETTINGS = {(False, False): "float32", (False, True): "teacher bf16", (True, False): "learner bf16",
            (True, True): "both bf16"}


def run_row(job: Path) -> dict:
    """One job folder → its seed, precision setting, final pass@k and per-step means."""
    cfg = yaml.safe_load((job / "config.yaml").read_text())
    steps = [s for s in read_metrics(job / "metrics.jsonl") if "loss" in s]
    final = json.loads((job / "status.json").read_text())["final"]
    row = {"job": job.name, "seed": cfg["trainer"]["seed"], "steps": len(steps),
           "setting": SETTINGS[(bool(cfg["trainer"]["autocast_bf16"]), bool(cfg["rollout"]["teacher_autocast_bf16"]))],
           **{k: final[k] for k in final if k.startswith("pass@")}}
    for k in METRICS:
        values = [s[k] for s in (steps[1:] if k.startswith("time/") else steps) if k in s]
        row[k] = float(np.mean(values)) if values else np.nan
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--force", action="store_true", help="replace the files of a non-empty --out")
    args = ap.parse_args()
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        sys.exit(f"{args.out} is not empty: pass --force to replace its files")
    jobs = sorted((p for p in args.sweep_dir.iterdir() if (p / "status.json").exists()), key=lambda p: int(p.name))
    if not jobs:
        sys.exit(f"{args.sweep_dir}: no job folders with a status.json")
    runs = pd.DataFrame([run_row(j) for j in jobs])
    cols = [c for c in runs.columns if c.startswith("pass@")] + METRICS
    order = [s for s in SETTINGS.values() if s in set(runs.setting)]
    if "float32" not in order:
        sys.exit("the sweep has no float32 runs to pair with")
    summary = runs.groupby("setting")[cols].mean().loc[order]
    base = runs[runs.setting == "float32"].set_index("seed")
    paired = []
    for setting in order[1:]:
        other = runs[runs.setting == setting].set_index("seed")
        for k in cols:
            d = (other[k] - base[k]).dropna()
            mean, _, half, n = mean_ci95(d.to_numpy())
            paired.append({"setting": setting, "metric": k, "n": n, "diff": mean, "ci95": half,
                           "ratio": float(other[k].mean() / base[k].mean()) if base[k].mean() else np.nan})
    paired = pd.DataFrame(paired)
    args.out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(args.out / "runs.csv", index=False)
    summary.to_csv(args.out / "summary.csv")
    paired.to_csv(args.out / "paired.csv", index=False)
    pd.set_option("display.width", 200)
    print(summary.T.to_string(float_format=lambda x: f"{x:.4g}"))
    print(paired.to_string(index=False, float_format=lambda x: f"{x:.4g}"))


if __name__ == "__main__":
    main()
