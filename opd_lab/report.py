"""``python -m opd_lab.report <multirun dir> [--out DIR]``: one table and a few plots for a sweep.

Reads every job of a Hydra multirun, including the ones that failed, are unfinished or never started (the
expected jobs are re-expanded from ``multirun.yaml`` exactly as Hydra's basic sweeper expanded them), into a
pandas DataFrame with one row per run, then writes to ``results/<sweep>/`` (or ``--out``):

- ``runs.csv``: job number, run directory, overrides, variant, seed, status (completed / failed / unfinished /
  running / not_started), error, steps done and planned, final pass@k and truncation, last-steps training means;
- ``summary.csv`` and ``summary.md``: per variant, over the completed seeds, the mean, standard deviation and
  95% confidence half-width ``t_{0.975, n−1} · s / √n`` of every final metric, plus counts of failed and
  unfinished runs (and, in the Markdown, a list of the runs that did not complete, with their errors);
- ``pass_at_k.png``: pass@k per variant (mean with 95% CI error bars, one dot per seed);
- ``curves.png``: training curves per variant (mean over seeds, shaded min–max): loss, teacher − old log-ratio,
  gate mean and std, mean |δ|.

A variant is a run's overrides without its seed (``trainer.seed``, ``eval.seed``), named by ``cfg.variant``
when the sweep sets one (``conf/variant``) and otherwise by the overrides that vary across the sweep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from opd_lab.stats import mean_ci95
from opd_lab.tracking import read_metrics

SEED_KEYS = ("trainer.seed", "eval.seed")
CURVES = (
    ("loss", "loss"),
    ("teacher_minus_old_logp", "teacher − old log-ratio"),
    ("gate/mean", "gate mean"),
    ("gate/std", "gate std"),
    ("drift/mean_abs_delta", "mean |δ|"),
)
TRAIN_MEANS = ("loss", "teacher_minus_old_logp", "gate/mean", "gate/std", "drift/mean_abs_delta",
               "response/mean_len", "time/step_s")

# ------------------------------------------------------------------------------------------ reading runs
def expected_jobs(sweep_dir: Path) -> list[list[str]]:
    """The jobs' override lists, in job-number order, re-expanded from ``multirun.yaml`` (as Hydra's basic
    sweeper does: ``hydra.sweeper.params`` then the command-line overrides). Empty when not reproducible."""
    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return []
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        conf = yaml.safe_load(path.read_text())
        hydra = conf["hydra"]
        if "basic_sweeper" not in str(hydra["sweeper"].get("_target_", "")):
            return []
        params = [f"{k}={v}" for k, v in (hydra["sweeper"].get("params") or {}).items()]
        overrides = OverridesParser.create().parse_overrides(params + list(hydra["overrides"]["task"]))
        batches = BasicSweeper.split_arguments(overrides, None)
        return [list(job) for batch in batches for job in batch]
    except Exception as e:  # a sweep from another sweeper plugin or a newer Hydra: report what exists
        print(f"opd-lab report: cannot re-expand {path} ({type(e).__name__}: {e}); listing existing runs only",
              file=sys.stderr)
        return []


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def read_run(run_dir: Path) -> dict:
    """One run directory → one row (status ``unfinished`` if it never wrote a final status)."""
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    status_path = run_dir / "status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else {"status": "unfinished"}
    state = status.get("status", "unfinished")
    if state == "running" and not _pid_alive(status.get("pid")):
        state = "unfinished"
    values = dict(_split(o) for o in overrides)
    seed = (cfg.get("trainer") or {}).get("seed", values.get("trainer.seed"))
    eval_only = bool((cfg.get("eval") or {}).get("only"))
    row = {
        "run_dir": str(run_dir), "overrides": " ".join(overrides), "_overrides": overrides,
        "variant": cfg.get("variant") or values.get("variant") or None,
        "seed": int(seed) if seed is not None else None, "status": state, "error": status.get("error", ""),
        "steps_planned": 0 if eval_only else (cfg.get("trainer") or {}).get("steps"),
    }
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    row["steps_done"] = max((r["step"] for r in train), default=0)
    tail = train[-max(1, len(train) // 10):] if train else []
    for key in TRAIN_MEANS:
        vals = [r[key] for r in tail if key in r]
        row[f"last10pct/{key}"] = float(np.mean(vals)) if vals else math.nan
    for key, value in (status.get("final") or {}).items():
        row[f"final/{key}"] = value
    return row


def curves_of(run_dir: Path) -> pd.DataFrame:
    """Per-step training metrics of one run (``step`` plus the :data:`CURVES` keys that exist)."""
    recs = [{"step": r["step"], **{k: r.get(k, math.nan) for k, _ in CURVES}}
            for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]
    return pd.DataFrame(recs, columns=["step", *[k for k, _ in CURVES]])


def load_sweep(sweep_dir: str | os.PathLike) -> pd.DataFrame:
    """Every job of the sweep as one row, including failed, unfinished and never-started jobs."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no such sweep directory: {sweep_dir}")
    found: dict[int, Path] = {}
    extra: list[Path] = []
    for ov in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        run_dir = ov.parent.parent
        if "wandb" in run_dir.parts:
            continue
        try:
            num = int(yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["num"])
            found[num] = run_dir
        except Exception:
            extra.append(run_dir)
    expected = expected_jobs(sweep_dir)
    rows = []
    for num in range(max(len(expected), max(found, default=-1) + 1)):
        if num in found:
            rows.append({"job": num, **read_run(found[num])})
        elif num < len(expected):
            ov = expected[num]
            values = dict(_split(o) for o in ov)
            seed = values.get("trainer.seed")
            rows.append({"job": num, "run_dir": "", "overrides": " ".join(ov), "_overrides": ov,
                         "variant": values.get("variant") or None,
                         "seed": int(seed) if seed not in (None, "") else None, "status": "not_started",
                         "error": "", "steps_done": 0})
    rows += [{"job": None, **read_run(d)} for d in extra]
    if not rows:
        raise FileNotFoundError(f"{sweep_dir} holds no Hydra job directories (.hydra/overrides.yaml)")
    _name_by_axes(rows)
    return pd.DataFrame(rows)


def _name_by_axes(rows: list[dict]) -> None:
    """Name the variants without a ``cfg.variant`` label by the overrides that vary across the sweep (its axes),
    not by overrides every job shares (``logger.progress=false`` …); seeds never name a variant."""
    raw = [r.pop("_overrides") for r in rows]
    per_row = [dict(_split(o) for o in ov) for ov in raw]
    order = list(dict.fromkeys(k for ov in per_row for k in ov if k not in SEED_KEYS and k != "variant"))
    axes = [k for k in order if len({ov.get(k) for ov in per_row}) > 1]
    for r, ov, rw in zip(rows, per_row, raw, strict=True):
        if r["variant"]:
            continue
        if axes:
            r["variant"] = " ".join(f"{k}={ov[k]}" for k in axes if k in ov)
        else:  # one job, or jobs that differ only by seed: every override that is not a seed
            r["variant"] = " ".join(o for o in rw if _split(o)[0] not in (*SEED_KEYS, "variant")) or "default"


# ------------------------------------------------------------------------------------------------ tables
def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Per variant (in sweep order): counts by status, and mean/std/CI95 of every final metric over the
    completed runs."""
    metrics = [c for c in runs.columns if c.startswith("final/")]
    metrics += [c for c in runs.columns if c.startswith("last10pct/")]
    out = []
    for variant, g in runs.groupby("variant", sort=False):
        done = g[g["status"] == "completed"]
        row = {"variant": variant, "n_completed": len(done), "n_failed": int((g["status"] == "failed").sum()),
               "n_unfinished": int((~g["status"].isin(["completed", "failed"])).sum()),
               "seeds": ",".join(str(s) for s in done["seed"].dropna().astype(int))}
        for m in metrics:
            mean, std, ci, _ = mean_ci95(done[m].tolist() if m in done else [])
            name = m.removeprefix("final/")
            row[f"{name}_mean"], row[f"{name}_std"], row[f"{name}_ci95"] = mean, std, ci
        out.append(row)
    return pd.DataFrame(out)


def _fmt(mean: float, ci: float) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.3f} ± {ci:.3f}" if np.isfinite(ci) else f"{mean:.3f}"


def summary_markdown(summary: pd.DataFrame, runs: pd.DataFrame, title: str) -> str:
    """The summary as a Markdown table (mean ± 95% CI half-width), then the runs that did not complete."""
    ks = [c.removesuffix("_mean") for c in summary.columns if c.startswith("pass@") and c.endswith("_mean")]
    cols = ks + [c for c in ("truncated_frac",) if f"{c}_mean" in summary]
    head = ["variant", "n", *cols, "failed", "unfinished"]
    lines = [f"## {title}", "", "Mean ± 95% confidence half-width (Student t over seeds).", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for _, r in summary.iterrows():
        cells = [str(r["variant"]), str(r["n_completed"])] + [_fmt(r[f"{c}_mean"], r[f"{c}_ci95"]) for c in cols]
        lines.append("| " + " | ".join(cells + [str(r["n_failed"]), str(r["n_unfinished"])]) + " |")
    bad = runs[runs["status"] != "completed"]
    if len(bad):
        lines += ["", "### Runs that did not complete", "", "| job | variant | seed | status | error |",
                  "|---|---|---|---|---|"]
        for _, r in bad.iterrows():
            err = str(r.get("error") or "").replace("|", "/").replace("\n", " ")[:200]
            lines.append(f"| {r['job']} | {r['variant']} | {r['seed']} | {r['status']} | {err} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- plots
def plot_pass_at_k(runs: pd.DataFrame, summary: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [c.removesuffix("_mean") for c in summary.columns if c.startswith("pass@") and c.endswith("_mean")]
    variants = list(summary["variant"])
    x = np.arange(len(variants))
    width = 0.8 / max(1, len(ks))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(variants) + 2), 4.2))
    done = runs[runs["status"] == "completed"]
    for i, k in enumerate(ks):
        off = (i - (len(ks) - 1) / 2) * width
        ci = summary[f"{k}_ci95"].fillna(0).to_numpy()
        ax.bar(x + off, summary[f"{k}_mean"], width, yerr=ci, capsize=3, label=k, alpha=0.8)
        for j, v in enumerate(variants):
            pts = done.loc[done["variant"] == v, f"final/{k}"].dropna()
            ax.scatter(np.full(len(pts), x[j] + off), pts, s=10, color="black", zorder=3)
    ax.set_xticks(x, variants, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out pass@k")
    ax.set_title(f"{title}: mean ± 95% CI over seeds (dots: seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(runs: pd.DataFrame, path: Path, title: str, smooth: int = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.6))
    trained = runs[(runs["run_dir"] != "") & (runs["steps_done"] > 0)]
    for variant, g in trained.groupby("variant", sort=False):
        frames = [curves_of(Path(d)).set_index("step") for d in g["run_dir"]]
        frames = [f for f in frames if len(f)]
        if not frames:
            continue
        for ax, (key, label) in zip(axes, CURVES, strict=True):
            table = pd.concat([f[key].rename(i) for i, f in enumerate(frames)], axis=1)
            table = table.rolling(smooth, min_periods=1).mean()
            line = ax.plot(table.index, table.mean(axis=1), label=variant, lw=1.3)[0]
            ax.fill_between(table.index, table.min(axis=1), table.max(axis=1), color=line.get_color(), alpha=0.15)
            ax.set_title(label)
            ax.set_xlabel("step")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: mean over seeds (band: min–max), rolling mean over {smooth} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- CLI
def sweep_name(sweep_dir: Path, runs: pd.DataFrame) -> str:
    """The sweep's wandb group when the runs share one, else the sweep directory's parent/name."""
    groups = set()
    for d in runs["run_dir"]:
        if d and (Path(d) / "config.yaml").exists():
            cfg = yaml.safe_load((Path(d) / "config.yaml").read_text())
            groups.add(((cfg.get("logger") or {}).get("wandb") or {}).get("group"))
    groups.discard(None)
    return groups.pop() if len(groups) == 1 else sweep_dir.name


def report(sweep_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write ``runs.csv``, ``summary.csv``, ``summary.md``, ``pass_at_k.png`` and ``curves.png``."""
    sweep_dir = Path(sweep_dir)
    runs = load_sweep(sweep_dir)
    name = sweep_name(sweep_dir, runs)
    out = Path(out) if out else Path("results") / name
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs)
    runs.to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    title = f"{name} ({sweep_dir})"
    (out / "summary.md").write_text(summary_markdown(summary, runs, title))
    if summary["n_completed"].sum():
        plot_pass_at_k(runs, summary, out / "pass_at_k.png", name)
    plot_curves(runs, out / "curves.png", name)
    return runs, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opd_lab.report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", help="a Hydra multirun directory (holds multirun.yaml and one folder per job)")
    p.add_argument("--out", help="output folder (default: results/<sweep name>)")
    args = p.parse_args(argv)
    try:
        runs, summary = report(args.sweep_dir, args.out)
    except FileNotFoundError as e:
        print(f"opd-lab report: {e}", file=sys.stderr)
        return 2
    counts = runs["status"].value_counts().to_dict()
    print(summary_markdown(summary, runs, str(args.sweep_dir)))
    print(f"runs: {counts}; written to {args.out or Path('results') / sweep_name(Path(args.sweep_dir), runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
