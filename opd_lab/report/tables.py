"""The report's tables from the runs' DataFrame: per-variant means with 95% intervals, the per-tag table with the
untrained models' baselines, and the paired differences of every gated variant to its ungated run (or to
``--baseline``), as DataFrames and as the Markdown of ``summary.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from opd_lab.core.stats import mean_ci95, min_detectable_effect, seeds_needed
from opd_lab.report.sources import per_problem_differences, problem_se

# the published gain of blockwise gating (arXiv 2606.24084: sampled-token OPD, mean pass@8 0.4978 → 0.5160), which
# every paired comparison's power is set beside
PUBLISHED_GAIN = ("pass@8", 0.018)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Per variant (in sweep order): counts by status, and mean/std/CI95 of every final metric over the
    completed runs."""
    metrics = [c for c in runs.columns if c.startswith("final/")]
    metrics += [c for c in runs.columns if c.startswith("last10pct/")]
    out = []
    for variant, g in runs.groupby("variant", sort=False):
        done = g[g["status"] == "completed"]
        row = {"variant": variant, "n_completed": len(done), "n_failed": int((g["status"] == "failed").sum()),
               "n_unfinished": int((~g["status"].isin(["completed", "failed", "superseded"])).sum()),
               "seeds": ",".join(str(s) for s in done["seed"].dropna().astype(int))}
        for m in metrics:
            mean, std, ci, n = mean_ci95(done[m].tolist() if m in done else [])
            name = m.removeprefix("final/")
            row[f"{name}_mean"], row[f"{name}_std"], row[f"{name}_ci95"] = mean, std, ci
            row[f"{name}_n"] = n  # the completed runs that have the value (a legacy runs.csv has no per-tag columns)
        out.append(row)
    return pd.DataFrame(out)


def paired(runs: pd.DataFrame, baseline: str | None = None) -> pd.DataFrame:
    """For every gated variant: the difference of each final pass@k (overall and per tag) to the ungated run with
    the same setting (``_pair_key``) and the same seed, mean and 95% CI over seeds (a paired t interval: seed-to-seed
    noise shared by both runs cancels). With ``baseline`` (a variant name): every other trained variant against
    that variant's run with the same seed instead, whatever else differs (the multi-teacher sweep: each routing
    against the generalist). ``delta_<k>_mde80``: the smallest true mean difference a two-sided 5% paired t test
    of those pairs detects with 80% power, at the measured std of the differences (core.stats).
    ``delta_<k>_problem_se`` (overall pass@k, when every pair's runs have per-problem evaluations): the standard
    error of the mean Δ over the evaluation problems (:func:`~opd_lab.report.sources.problem_se`), to set beside
    its standard error over seeds, std/√n."""
    done = runs[(runs["status"] == "completed") & runs["_pair_key"].notna()]
    done = done.assign(_pair_key=common_pair_keys(done["_pair_key"]))
    metrics = [c for c in done.columns if c.startswith("final/") and c.split("/")[-1].startswith("pass@")]
    if baseline is not None:
        if baseline not in set(done["variant"]):
            raise ValueError(f"--baseline {baseline!r}: no completed trained run has that variant; variants: "
                             f"{', '.join(dict.fromkeys(done['variant']))}")
        groups, on = done[done["variant"] != baseline].groupby("variant", sort=False), ["seed"]
        refs = {v: done[done["variant"] == baseline] for v, _ in groups}
    else:
        base = done[done["ungated"].astype(bool)]
        groups, on = done[~done["ungated"].astype(bool)].groupby("variant", sort=False), ["_pair_key", "seed"]
        refs = {v: base[base["_pair_key"].isin(g["_pair_key"])] for v, g in groups}
    out = []
    for variant, g in groups:
        ref = refs[variant]
        if not len(ref):
            continue
        twice = ref.duplicated(on, keep=False)
        if twice.any():  # a run would be paired with two references and counted twice
            raise ValueError(f"{variant}: more than one reference run with the same seed and setting "
                             f"({', '.join(dict.fromkeys(ref.loc[twice, 'variant']))}); pairing cannot choose")
        row = {"variant": variant, "baseline": ", ".join(dict.fromkeys(ref["variant"]))}
        has_dirs = "run_dir" in g and "run_dir" in ref
        merged = g.merge(ref[[*on, *metrics, "variant", *(["run_dir"] if has_dirs else [])]], on=on,
                         suffixes=("", "_base"))
        row["n_pairs"] = len(merged)
        overall = [m.removeprefix("final/") for m in metrics if m.count("/") == 1]
        if has_dirs and len(merged):
            diffs = [per_problem_differences(Path(a), Path(b), overall) if isinstance(a, str) and isinstance(b, str)
                     and a and b else None for a, b in zip(merged["run_dir"], merged["run_dir_base"], strict=True)]
            se = problem_se(diffs, overall) if all(d is not None for d in diffs) else {}
            for k in overall:
                row[f"delta_{k}_problem_se"] = se.get(k, math.nan)
        for m in metrics:
            mean, std, ci, n = mean_ci95((merged[m] - merged[f"{m}_base"]).dropna().tolist())
            name = m.removeprefix("final/")
            row[f"delta_{name}_mean"], row[f"delta_{name}_ci95"] = mean, ci
            row[f"delta_{name}_n"] = n  # the pairs in which both runs have the value (≤ n_pairs)
            # power: the smallest true Δ that these n pairs, at their measured spread, detect 80% of the time
            std = 0.0 if abs(std) < 1e-12 else std  # differences equal up to float noise: no spread
            row[f"delta_{name}_std"], row[f"delta_{name}_mde80"] = std, min_detectable_effect(std, n)
        out.append(row)
    return pd.DataFrame(out)


def common_pair_keys(keys: pd.Series) -> pd.Series:
    """The pair keys restricted to the config fields every run has: a field added to the schema after some runs were
    made (absent from their ``config.yaml``, so at its default when they ran) cannot tell two runs apart."""
    parsed = [json.loads(k) for k in keys]
    common = set.intersection(*(set(p) for p in parsed)) if parsed else set()
    # an override (``_legacy_pair_key``) given to some runs only is not a schema field at its default: kept
    common |= {k for p in parsed for k in p if k.startswith("override:")}
    return pd.Series([json.dumps({k: p.get(k) for k in sorted(common)}, sort_keys=True, default=str)
                      for p in parsed], index=keys.index, dtype=object)


def paired_markdown(pairs: pd.DataFrame, baseline: str | None = None) -> str:
    if not len(pairs):
        return ""
    ks = [c.removeprefix("delta_").removesuffix("_mean") for c in pairs.columns if c.endswith("_mean")]
    head = ["variant", "vs", "pairs", *[f"Δ{k}" for k in ks]]
    title, what = (f"{baseline} with the same seed", f"(variant − {baseline})") if baseline else (
        "the ungated run with the same seed", "(gated − ungated)")
    lines = ["", f"### Paired differences to {title}", "",
             f"Mean ± 95% confidence half-width of {what} over seeds; an interval that holds 0 is a null "
             "result.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in pairs.iterrows():
        cells = [_fmt(r[f"delta_{k}_mean"], r[f"delta_{k}_ci95"], signed=True) + _n_note(r, f"delta_{k}_n",
                                                                                          r["n_pairs"]) for k in ks]
        lines.append(f"| {r['variant']} | {r['baseline']} | {r['n_pairs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + power_markdown(pairs, ks, published=baseline is None) + noise_markdown(pairs)


def noise_markdown(pairs: pd.DataFrame) -> str:
    """Per paired comparison and overall pass@k: the standard error of the mean Δ over seeds (s/√n) beside its
    standard error over the evaluation problems (``delta_<k>_problem_se``) and their ratio; empty when no
    comparison has per-problem evaluations."""
    ks = [c.removeprefix("delta_").removesuffix("_problem_se") for c in pairs.columns if c.endswith("_problem_se")]
    ks = [k for k in ks if pairs[f"delta_{k}_problem_se"].notna().any()]
    if not ks:
        return ""
    lines = ["", "### Seeds against evaluation problems", "",
             "Two standard errors of each comparison's mean Δ: over seeds, s/√n (the intervals above; each seed's "
             "own evaluation samples are in it, as eval.seed follows the seed) / over problems, the per-problem Δ "
             "averaged over the pairs, its std over the problems / √problems (per benchmark, combined as the macro "
             "mean is): how far the mean Δ would move on another draw of problems from the task, which more seeds "
             "cannot reduce, since every seed answers the same problems (it also carries the per-problem noise of "
             "the n seeds, so it overstates the problem draw when n is small). In brackets, problems / seeds: well "
             "below 1, seed noise dominates; near or above 1, the draw of problems matters as much, and the "
             "intervals above are about these problems more than about the task.", "",
             "| variant | vs | pairs | " + " | ".join(f"SE seeds / problems Δ{k}" for k in ks) + " |",
             "|" + "---|" * (len(ks) + 3)]
    for _, r in pairs.iterrows():
        cells = []
        for k in ks:
            std, n, se = r[f"delta_{k}_std"], r[f"delta_{k}_n"], r[f"delta_{k}_problem_se"]
            seeds = std / math.sqrt(n) if np.isfinite(std) and n >= 2 else math.nan
            if not np.isfinite(se):
                cells.append("–")
            elif not np.isfinite(seeds):
                cells.append(f"– / {se:.3f}")
            else:
                cells.append(f"{seeds:.3f} / {se:.3f}" + (f" ({se / seeds:.1f})" if seeds > 0 else " (s = 0)"))
        lines.append(f"| {r['variant']} | {r['baseline']} | {r['n_pairs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def power_markdown(pairs: pd.DataFrame, ks: list[str], published: bool = True) -> str:
    """Per paired comparison: the smallest true Δ its pairs could detect (80% power, two-sided 5% paired t test, at
    the measured spread of the differences) and, for gated-vs-ungated pairs (``published``) with the published
    gain's metric, the seeds that would detect that gain."""
    ks = [k for k in ks if f"delta_{k}_mde80" in pairs]
    if not ks:
        return ""
    metric, gain = PUBLISHED_GAIN
    published = published and metric in ks
    head = ["variant", "vs", "pairs", *[f"MDE Δ{k}" for k in ks]]
    head += [f"seeds to detect {gain:+.3f} on {metric}"] if published else []
    lines = ["", "### Power of the paired comparisons", "",
             "The smallest true mean difference each comparison detects with 80% power (two-sided paired t test at "
             "5%, noncentral t, taking the measured seed-to-seed std s of the differences for the true one: with few "
             "pairs s is itself uncertain, and equal differences (s = 0) measure no spread). A null result with an MDE "
             f"above the published gain of blockwise gating ({gain:+.3f} {metric}, arXiv 2606.24084) cannot rule "
             "that gain out.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in pairs.iterrows():
        cells = [_fmt_mde(r[f"delta_{k}_mde80"], r[f"delta_{k}_std"]) + _n_note(r, f"delta_{k}_n", r["n_pairs"])
                 for k in ks]
        if published:
            std = r[f"delta_{metric}_std"]
            need = seeds_needed(gain, std, max_n=10_000) if np.isfinite(std) and std > 0 else None
            cells.append("–" if need is None else f"> {10_000:,}" if need > 10_000 else str(need))
        lines.append(f"| {r['variant']} | {r['baseline']} | {r['n_pairs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt_mde(mde: float, std: float) -> str:
    if not np.isfinite(mde):
        return "–"
    return "– (no spread: s = 0)" if std == 0 else f"{mde:.3f}"


def by_tag_markdown(summary: pd.DataFrame, teachers: pd.DataFrame | None = None) -> str:
    """Per tag (``final/<tag>/pass@k``): each variant's mean ± 95% CI and, when known, each baseline model's
    pass@k on the same problems (``teachers``: one row per model and tag, from a run's ``eval_per_problem.csv``);
    a model that is also an evaluation-only variant with per-tag values (``base_student``, ``teacher``) is shown
    once, as that variant."""
    cols = [c.removesuffix("_mean") for c in summary.columns if c.endswith("_mean") and "/" in c
            and c.split("/")[-1].startswith("pass@")]
    if not cols:
        return ""
    lines = ["", "### Final pass@k per tag", "", "Mean ± 95% confidence half-width over seeds, on the evaluation "
             "problems of each tag; n counts the runs that have per-tag values (a cell from fewer says so).", "",
             "| variant | n | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for _, r in summary.iterrows():
        n = max((int(r[f"{c}_n"]) for c in cols if f"{c}_n" in r), default=r["n_completed"])
        cells = [_fmt(r[f"{c}_mean"], r[f"{c}_ci95"]) + _n_note(r, f"{c}_n", n) for c in cols]
        lines.append(f"| {r['variant']} | {n} | " + " | ".join(cells) + " |")
    if teachers is not None and len(teachers):
        shown = {r["variant"] for _, r in summary.iterrows() if any(r[f"{c}_n"] > 0 for c in cols if f"{c}_n" in r)}
        for model, g in teachers.groupby("model", sort=False):
            if model in shown:  # an evaluation-only variant of that name already has these numbers above
                continue
            vals = {f"{t}/{k}": v for t, k, v in zip(g["tag"], g["k"], g["value"], strict=True)}
            cells = [f"{vals[c]:.3f}" if c in vals else "–" for c in cols]
            lines.append(f"| {model} (baseline, not trained) | – | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def baselines_by_tag(runs: pd.DataFrame) -> pd.DataFrame:
    """The untrained models' (``base_student``, the teachers) pass@k per tag, each from the first completed run that
    evaluated it (``eval_per_problem.csv``; cached across runs, so every run holds the same numbers for a model)."""
    rows, seen = [], set()
    for d in runs.loc[runs["status"] == "completed", "run_dir"]:
        path = Path(d) / "eval_per_problem.csv" if d else None
        if not path or not path.exists():
            continue
        df = pd.read_csv(path, dtype={"question": str, "answer": str, "tag": str})
        if "tag" not in df or "model" not in df or df["tag"].nunique() < 2:
            continue
        df = df[(df["model"] != "student") & ~df["model"].isin(seen)]
        ks = [c for c in df.columns if c.startswith("pass@")]
        rows += [{"model": m, "tag": t, "k": k, "value": float(g[k].mean())}
                 for (m, t), g in df.groupby(["model", "tag"], sort=False) for k in ks]
        seen |= set(df["model"])
    return pd.DataFrame(rows)


def by_position_markdown(runs: pd.DataFrame, block: int = 64) -> str:
    """Drift and the gate by response position: per variant and block of ``block`` tokens, the mean over seeds
    (± 95% t half-width) of each run's step-mean |δ| at the last update of a step and, for a gate, the gate there
    (``drift/last_update/by_block/<b>``, ``gate/last_update/by_block/<b>``), and the share of the update's valid
    tokens in the block (``tokens/…``: runs from 2026-12-07 on). Empty when no run logged them."""
    from opd_lab.report.sources import by_position_of

    per: dict[str, list[dict]] = {}
    done = runs[(runs["status"] == "completed") & (runs["run_dir"] != "")]
    for variant, d in zip(done["variant"], done["run_dir"], strict=True):
        got = by_position_of(Path(d))
        if got:
            per.setdefault(variant, []).append(got)
    if not per:
        return ""
    n_blocks = max(b + 1 for runs_ in per.values() for r in runs_ for blocks in r.values() for b in blocks)
    head = ["variant", "metric", "n"] + [f"{b * block}–{(b + 1) * block - 1}" for b in range(n_blocks)]
    lines = ["", f"## Drift and gate by response position (tokens {0}–{n_blocks * block - 1}, blocks of {block})", "",
             "Per run the mean over its steps at the last update of each step; mean ± 95% t half-width over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for variant, runs_ in per.items():
        for what, label in (("drift/last_update", "mean abs δ"), ("gate/last_update", "gate"),
                            ("tokens/last_update", "token share")):
            if not any(what in r for r in runs_):
                continue
            cells = []
            for b in range(n_blocks):
                mean, _, ci, _n = mean_ci95([r[what][b] for r in runs_ if b in r.get(what, {})])
                cells.append(_fmt(mean, ci) if label == "gate" else _fmt_small(mean, ci))
            lines.append(f"| {variant} | {label} | {len(runs_)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt_small(mean: float, ci: float) -> str:
    """A small positive quantity (|δ| ~ 1e-3 … 1e-1) with three significant digits."""
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.3g} ± {ci:.2g}" if np.isfinite(ci) else f"{mean:.3g}"


def _n_note(row: pd.Series, key: str, n: int) -> str:
    """`` (n=m)`` when the cell's value comes from m < n runs or pairs, else nothing."""
    m = row.get(key)
    return f" (n={int(m)})" if m is not None and np.isfinite(m) and 0 < int(m) < int(n) else ""


def _fmt(mean: float, ci: float, signed: bool = False) -> str:
    if not np.isfinite(mean):
        return "–"
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return f"{text} ± {ci:.3f}" if np.isfinite(ci) else text


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


# ---------------------------------------------------------------------------------------------------- CLI
