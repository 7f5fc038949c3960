"""``python -m opd_lab.report <multirun dir> [--out DIR]``: one table and a few plots for a sweep.

Reads every job of a Hydra multirun, including the ones that failed, are unfinished or never started (the
expected jobs are re-expanded from ``multirun.yaml`` exactly as Hydra's basic sweeper expanded them), into a
pandas DataFrame with one row per run, then writes to ``results/<sweep>/`` (or ``--out``):

- ``runs.csv``: job number, run directory, overrides, variant, seed, status (completed / failed / unfinished /
  running / not_started, or superseded: a job that did not complete and that a later source (another sweep
  directory) completed with the same variant and seeds), error, steps done and planned, final pass@k and
  truncation, last-steps training means;
- ``summary.csv`` and ``summary.md``: per variant, over the completed seeds, the mean, standard deviation and
  95% confidence half-width ``t_{0.975, n−1} · s / √n`` of every final metric, plus counts of failed and
  unfinished runs (and, in the Markdown, a list of the runs that did not complete, with their errors);
- a section of ``summary.md`` per tag of the evaluation problems (``final/<tag>/pass@k``: the embedded task's
  operand counts), with the untrained models' (base student, teachers) pass@k on the same problems;
- ``paired.csv`` (and a section of ``summary.md``): for every gated variant, the difference of each final pass@k
  (overall and per tag) to the ungated run with the same setting and seed, mean and 95% CI over seeds (paired);
  with ``--baseline VARIANT``, every other variant against that variant's run with the same seed instead;
- ``pass_at_k.png``: one panel per k, final pass@k per variant (mean with 95% CI error bars, one dot per seed),
  the untrained student and the teacher as lines;
- ``pass_at_k_over_steps.png``: held-out pass@k at every evaluation step (``eval.every``; not drawn when each run
  was evaluated once);
- ``curves.png``: training curves per variant (mean over seeds, shaded min–max): loss (a panel per loss),
  teacher − old log-ratio, gate std, fraction of gates below 0.5, mean |δ|, |δ| at the first update of each step
  (a panel flat in every run is left out and named);
- ``drift_by_position.png``: mean |δ| and the gate by response position (blocks of 64 tokens) at the first and
  the last update of a step, per variant (mean over steps and seeds);
- ``routing.png`` for multi-teacher runs: each teacher's share of the loss tokens and the routing entropy over
  training (also ``last10pct/`` and ``mean/`` columns of ``runs.csv``);
- ``drift_map.png`` when the runs vary U (updates per rollout batch) or the staleness k: final pass@k and mean
  |δ| against U and k, per loss and gate;
- ``plot_data/<figure>.csv``: what each figure draws (panel, series, x, y, interval), and a ``## Plots`` section
  of ``summary.md`` that says what each figure shows or why it was not drawn;
- with ``--keep-runs``: ``runs/<part>/``, each sweep directory's ``multirun.yaml`` and, per job, the small files
  the report reads (``.hydra/``, ``config.yaml``, ``status.json``, ``metrics.jsonl``, ``evals/``,
  ``eval_per_problem.csv``; no weights, no wandb). A kept part is itself a sweep directory, so a sweep run over
  several sessions is reported from the kept parts of the earlier ones and the new directories together;
- a source may also be an earlier report's ``runs.csv`` (its run directories gone): its rows enter the tables,
  the pairing, the pass@k and drift-map plots, but no curve over steps; with ``--keep-runs`` it is copied to
  ``runs/<folder>_runs.csv`` and read from there (the next report of the sweep passes the kept sources).

A variant is a run's overrides without its seed (``trainer.seed``, ``eval.seed``), named by ``cfg.variant``
when the sweep sets one (``conf/variant``) and otherwise by the overrides that vary across the sweep.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from opd_lab.report import plots
from opd_lab.report.archive import keep_runs
from opd_lab.report.sources import is_csv, load_sweep, load_sweeps, sweep_name
from opd_lab.report.tables import (
    baselines_by_tag,
    by_position_markdown,
    by_tag_markdown,
    paired,
    paired_markdown,
    summarise,
    summary_markdown,
)


def refuse_to_overwrite(out: Path) -> None:
    """A report never replaces files it did not just write: a non-empty ``out`` (an earlier report, committed results)
    is an error unless ``--force``."""
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} already holds files (an earlier report, or committed results): pass --force to "
                         "replace them, or name another --out")


def report(sweep_dir: str | os.PathLike | list, out: str | os.PathLike | None = None,
           baseline: str | None = None, force: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write ``runs.csv``, ``summary.csv``/``summary.md`` (with the per-tag table and the paired differences: to
    the ungated run, or to the ``baseline`` variant), ``paired.csv`` and the plots (pass@k, training and drift
    curves, pass@k over training steps, the drift map when U or k vary)."""
    dirs = [Path(d) for d in (sweep_dir if isinstance(sweep_dir, list) else [sweep_dir])]
    runs = load_sweeps(dirs)
    name = sweep_name(dirs[0], runs)
    out = Path(out) if out else Path("results") / name
    if not force:
        refuse_to_overwrite(out)
    for d in dirs:
        if is_csv(d) and d.resolve() == (out / "runs.csv").resolve():
            raise ValueError(f"{d} is a source and would be overwritten by this report: pass --keep-runs (it is "
                             "copied under runs/ first) or another --out")
    out.mkdir(parents=True, exist_ok=True)
    summary, pairs = summarise(runs), paired(runs, baseline)
    runs.rename(columns={"_pair_key": "pair_key"}).to_csv(out / "runs.csv", index=False)  # a later source
    summary.to_csv(out / "summary.csv", index=False)
    pairs.to_csv(out / "paired.csv", index=False)
    title = f"{name} ({', '.join(map(str, dirs))})"
    text = summary_markdown(summary, runs, title) + by_tag_markdown(summary, baselines_by_tag(runs))
    text += paired_markdown(pairs, baseline) + by_position_markdown(runs)
    (out / "summary.md").write_text(text + plots_markdown(draw_plots(runs, summary, out, name)))
    return runs, summary


def draw_plots(runs: pd.DataFrame, summary: pd.DataFrame, out: Path, name: str) -> dict:
    """Every figure that applies, each with the table of what it draws in ``plot_data/<figure>.csv``; returns
    ``{file: Plot | Skipped}`` (a figure with nothing to show is not written; an earlier report's copy is
    removed so that no stale figure stays beside the new tables)."""
    ks = [c.removesuffix("_mean") for c in summary.columns if c.startswith("pass@") and c.endswith("_mean")
          and "/" not in c]
    base = plots.baselines_of(runs)
    done = runs[runs["status"] == "completed"]
    figures = {
        "pass_at_k.png": lambda p: plots.plot_pass_at_k(runs, summary, base, p, name),
        "pass_at_k_over_steps.png": lambda p: plots.plot_eval_curves(runs, ks, base, p, name),
        "curves.png": lambda p: plots.plot_curves(runs, p, name),
        "drift_by_position.png": lambda p: plots.plot_drift_by_position(runs, p, name),
    }
    if done["U"].nunique() > 1 or done["staleness"].nunique() > 1:
        figures["drift_map.png"] = lambda p: plots.plot_drift_map(runs, ks, p, name)
    shares = sorted((c.removeprefix("mean/") for c in runs.columns if c.startswith("mean/routing/")
                     and "/frac/" in c), key=lambda k: ("by_tag" in k, k))  # overall shares first, then per tag
    if shares:
        figures["routing.png"] = lambda p: plots.plot_routing(runs, [*shares, "routing/entropy"], p, name)
    results = {}
    for file, draw in figures.items():
        path, data = out / file, out / "plot_data" / f"{Path(file).stem}.csv"
        results[file] = draw(path)
        if isinstance(results[file], plots.Plot):
            data.parent.mkdir(exist_ok=True)
            results[file].data.to_csv(data, index=False)
        else:
            path.unlink(missing_ok=True)
            data.unlink(missing_ok=True)
    return results


def plots_markdown(results: dict) -> str:
    """The summary's list of figures: what each shows, or why it was not drawn."""
    lines = ["", "## Plots", ""]
    for file, res in results.items():
        if isinstance(res, plots.Plot):
            lines.append(f"- `{file}`: {res.note} (data: `plot_data/{Path(file).stem}.csv`)")
        else:
            lines.append(f"- `{file}`: not drawn: {res.reason}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opd_lab.report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", nargs="+", help="a Hydra multirun directory (holds multirun.yaml and one folder "
                   "per job), or an earlier report's runs.csv; several: one sweep run in parts")
    p.add_argument("--out", help="output folder (default: results/<sweep name>)")
    p.add_argument("--keep-runs", action="store_true", help="also copy each job's config, status, metrics and "
                   "evaluations into <out>/runs/<part>/ (a sweep directory the report can read again later)")
    p.add_argument("--force", action="store_true", help="replace the files of a non-empty --out (by default a "
                   "report refuses: it never overwrites an earlier report or committed results)")
    p.add_argument("--baseline", help="pair every other variant with this variant's run of the same seed (e.g. "
                   "mt_generalist) instead of each gated variant with its ungated run")
    args = p.parse_args(argv)
    try:
        dirs = list(args.sweep_dir)
        first = Path(dirs[0])
        if not first.exists():
            raise FileNotFoundError(f"no such sweep directory or runs.csv: {first}")
        args.out = args.out or str(Path("results") / sweep_name(first, load_sweep(first)))
        if not args.force:
            refuse_to_overwrite(Path(args.out))
        if args.keep_runs:
            dirs = keep_runs([Path(d) for d in dirs], Path(args.out))
        runs, summary = report(dirs, args.out, args.baseline)
    except (FileNotFoundError, ValueError) as e:
        print(f"opd-lab report: {e}", file=sys.stderr)
        return 2
    counts = runs["status"].value_counts().to_dict()
    out = Path(args.out)
    print((out / "summary.md").read_text())  # what report() wrote: nothing is read or paired a second time
    print(f"runs: {counts}; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
