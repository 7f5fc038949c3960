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
- ``pass_at_k.png``: pass@k per variant (mean with 95% CI error bars, one dot per seed);
- ``pass_at_k_over_steps.png``: held-out pass@k at every evaluation step (``eval.every``);
- ``curves.png``: training curves per variant (mean over seeds, shaded min–max): loss, teacher − old log-ratio,
  gate std, fraction of gates below 0.5, mean |δ|, |δ| at the first update of each step;
- ``routing.png`` for multi-teacher runs: each teacher's share of the loss tokens and the routing entropy over
  training (also ``last10pct/`` and ``mean/`` columns of ``runs.csv``);
- ``drift_map.png`` when the runs vary U (updates per rollout batch) or the staleness k: final pass@k and mean
  |δ| against U and k, per loss and gate;
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
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from opd_lab.core.stats import mean_ci95
from opd_lab.report import plots
from opd_lab.run.tracking import read_metrics

SEED_KEYS = ("trainer.seed", "eval.seed")
TRAIN_MEANS = ("loss", "teacher_minus_old_logp", "gate/mean", "gate/std", "gate/frac_below_0.5",
               "drift/mean_abs_delta", "drift/first_update_mean_abs_delta", "response/mean_len",
               "response/truncated_frac", "time/step_s")
# multi-teacher runs: each teacher's token share (overall and on each problem tag's rows), routing entropy
ROUTING = ("routing/frac/", "routing/entropy", "routing/by_tag/")
# config fields that do not make two runs different experiments: their seed, the gate (whose effect the pairing
# measures), where and how they log
BOOKKEEPING = ("output_dir", "cache_dir", "logger.", "trainer.resume", "trainer.checkpoint_every",
               "trainer.keep_checkpoints", "trainer.threads", "eval.every")
UNPAIRED = ("trainer.seed", "eval.seed", "gate.", "variant", *BOOKKEEPING)
# what a runs.csv written before it kept the pair key still says of a run's setting (besides its gate)
CSV_SETTING = {"loss": "loss.name", "U": "U", "reuse": "rollout.reuse", "staleness": "rollout.staleness",
               "lr": "trainer.lr"}


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
        "steps_planned": 0 if eval_only else (cfg.get("trainer") or {}).get("steps"), **setting_of(cfg, eval_only),
    }
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    row["steps_done"] = max((r["step"] for r in train), default=0)
    tail = train[-max(1, len(train) // 10):] if train else []
    routing = sorted({k for r in train[:1] for k in r if k.startswith(ROUTING)})
    for key in (*TRAIN_MEANS, *routing):
        vals = [r[key] for r in tail if key in r]
        row[f"last10pct/{key}"] = float(np.mean(vals)) if vals else math.nan
        every = [r[key] for r in train if key in r]
        row[f"mean/{key}"] = float(np.mean(every)) if every else math.nan
    for key, value in (status.get("final") or {}).items():
        row[f"final/{key}"] = value
    if state == "completed":
        row |= final_by_tag(run_dir)
    return row


def final_by_tag(run_dir: Path) -> dict[str, float]:
    """``final/<tag>/pass@k``: the final evaluation's pass@k over the problems of each tag (``Problem.tag``: the
    embedded task's operand count ``ops<n>``, a math benchmark's ``tag_field``), from the last
    ``evals/student_step_*.csv``; empty when the problems have fewer than two tags."""
    files = sorted((run_dir / "evals").glob("student_step_*.csv"))
    if not files:
        return {}
    df = pd.read_csv(files[-1], dtype={"question": str, "answer": str, "tag": str})
    if "tag" not in df or df["tag"].nunique() < 2:
        return {}
    ks = [c for c in df.columns if c.startswith("pass@")]
    return {f"final/{tag}/{k}": float(g[k].mean()) for tag, g in df.groupby("tag", sort=True) for k in ks}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def setting_of(cfg: dict, eval_only: bool) -> dict:
    """The run's experimental setting from its resolved ``config.yaml``: loss, gate, τ, U (updates per rollout
    batch), reuse, staleness, lr; ``ungated`` (no gate, or τ = 0: every gate is 1) and ``_pair_key`` (everything
    but seed and gate: runs that differ only in their gate are paired by seed)."""
    flat = _flat(cfg)
    r = cfg.get("rollout") or {}
    g = cfg.get("gate") or {}
    kind = g.get("kind")
    batch = (r.get("n_prompts") or 0) * (r.get("n_samples") or 0)
    U = (r.get("reuse") or 0) * batch // max(r.get("mini_batch_size") or 1, 1)
    pair = {k: v for k, v in flat.items() if not k.startswith(UNPAIRED)} | {"U": U}
    return {"loss": (cfg.get("loss") or {}).get("name"),
            "gate": f"block{g.get('block_size')}" if kind == "block" else kind, "tau": g.get("tau"), "U": U,
            "reuse": r.get("reuse"), "staleness": r.get("staleness", 0), "lr": (cfg.get("trainer") or {}).get("lr"),
            "ungated": not eval_only and (kind == "none" or g.get("tau") == 0),
            "_pair_key": None if eval_only else json.dumps(pair, sort_keys=True, default=str)}


def load_sweep(sweep_dir: str | os.PathLike) -> pd.DataFrame:
    """Every job of the sweep as one row, including failed, unfinished and never-started jobs."""
    rows = _source_rows(sweep_dir)
    _name_by_axes(rows)
    return pd.DataFrame(rows)


def _is_csv(source: str | os.PathLike) -> bool:
    return Path(source).suffix == ".csv"


def _source_rows(source: str | os.PathLike) -> list[dict]:
    """The rows of one source: a sweep directory, or an earlier report's ``runs.csv``."""
    return _csv_rows(Path(source)) if _is_csv(source) else _sweep_rows(source)


def _names_nothing(key: str) -> bool:
    """An override key that never names a variant: a seed, the variant label itself, or bookkeeping."""
    return key in (*SEED_KEYS, "variant") or key.startswith(BOOKKEEPING)


def _split_overrides(text: str) -> list[str]:
    """``runs.csv``'s space-joined overrides back into a list: a space inside brackets, braces or quotes (a list
    value such as ``x=[a, b]``) does not split."""
    out, cur, depth, quote = [], "", 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == " " and depth == 0:
            out, cur = (out + [cur] if cur else out), ""
            continue
        cur += ch
    return out + [cur] if cur else out


def _legacy_pair_key(row: dict) -> str:
    """The pair key of a run when a source's ``runs.csv`` predates the kept key: its setting columns
    (``CSV_SETTING``) and every override that is not a seed, a gate, its variant label or bookkeeping (the sweep's
    other axes: a drift point, a temperature …); given to every run of such a report, directories' too."""
    def plain(v):
        return int(v) if isinstance(v, float) and v.is_integer() else v

    key = {name: plain(row.get(col)) for col, name in CSV_SETTING.items()}
    for o in row["_overrides"]:
        k, v = _split(o)
        if not _names_nothing(k) and not k.startswith("gate"):
            key[f"override:{k}"] = v
    return json.dumps(key, sort_keys=True, default=str)


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value != ""


def _csv_rows(path: Path) -> list[dict]:
    """The rows of an earlier report's ``runs.csv``: final metrics and training means, without a run directory (no
    curve over steps). The variant is named again from the overrides (as for a directory's runs: by what varies
    over every source) and the pair key read back (``pair_key``); a ``runs.csv`` written before it kept the key
    marks its trained rows ``_legacy_key``, and ``load_sweeps`` then pairs every source's runs by
    ``_legacy_pair_key``."""
    if not path.is_file():
        raise FileNotFoundError(f"no such runs.csv: {path}")
    df = pd.read_csv(path, dtype={"overrides": str, "error": str, "variant": str, "run_dir": str, "pair_key": str,
                                  "sweep": str, "loss": str, "gate": str})
    missing = [c for c in ("overrides", "status", "seed", "ungated", "steps_planned", *CSV_SETTING)
               if c not in df.columns and not (c in CSV_SETTING and "pair_key" in df.columns)]
    if missing:
        raise ValueError(f"{path} lacks the columns {', '.join(missing)} (a runs.csv from an older report): report "
                         "its run directories instead")
    rows = []
    for rec in df.to_dict("records"):
        ov = _split_overrides(rec["overrides"]) if _present(rec.get("overrides")) else []
        values = dict(_split(o) for o in ov)
        key = rec.pop("pair_key", None)
        trained = _present(rec.get("loss")) and _present(rec.get("steps_planned")) and rec["steps_planned"] > 0
        status, error = _unsupersede(rec["status"], rec["error"] if _present(rec.get("error")) else "")
        rec |= {"run_dir": "", "_overrides": ov, "variant": values.get("variant") or None, "status": status,
                "error": error,
                "seed": int(rec["seed"]) if _present(rec.get("seed")) else None,
                "ungated": str(rec.get("ungated")) == "True", "_pair_key": key if _present(key) else None,
                "_legacy_key": trained and not _present(key),
                "sweep": f"{path}" + (f" ({rec['sweep']})" if _present(rec.get("sweep")) else "")}
        rows.append(rec)
    if not rows:
        raise FileNotFoundError(f"{path} holds no runs")
    return rows


def _sweep_rows(sweep_dir: str | os.PathLike) -> list[dict]:
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
    return rows


def _name_by_axes(rows: list[dict]) -> None:
    """Name the variants without a ``cfg.variant`` label by the overrides that vary across the sweep (its axes),
    not by overrides every job shares; seeds and bookkeeping (``trainer.threads``, ``logger.*`` …: one part run
    with ``logger.progress=false``, another without) never name a variant."""
    raw = [r.pop("_overrides") for r in rows]
    per_row = [dict(_split(o) for o in ov) for ov in raw]
    order = list(dict.fromkeys(k for ov in per_row for k in ov if not _names_nothing(k)))
    axes = [k for k in order if len({ov.get(k) for ov in per_row}) > 1]
    for r, ov, rw in zip(rows, per_row, raw, strict=True):
        if r["variant"]:
            continue
        if axes:
            r["variant"] = " ".join(f"{k}={ov[k]}" for k in axes if k in ov)
        else:  # one job, or jobs that differ only by seed: every override that is not a seed
            r["variant"] = " ".join(o for o in rw if not _names_nothing(_split(o)[0])) or "default"


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
               "n_unfinished": int((~g["status"].isin(["completed", "failed", "superseded"])).sum()),
               "seeds": ",".join(str(s) for s in done["seed"].dropna().astype(int))}
        for m in metrics:
            mean, std, ci, _ = mean_ci95(done[m].tolist() if m in done else [])
            name = m.removeprefix("final/")
            row[f"{name}_mean"], row[f"{name}_std"], row[f"{name}_ci95"] = mean, std, ci
        out.append(row)
    return pd.DataFrame(out)


def paired(runs: pd.DataFrame, baseline: str | None = None) -> pd.DataFrame:
    """For every gated variant: the difference of each final pass@k (overall and per tag) to the ungated run with
    the same setting (``_pair_key``) and the same seed, mean and 95% CI over seeds (a paired t interval: seed-to-seed
    noise shared by both runs cancels). With ``baseline`` (a variant name): every other trained variant against
    that variant's run with the same seed instead, whatever else differs (the multi-teacher sweep: each routing
    against the generalist)."""
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
        merged = g.merge(ref[[*on, *metrics, "variant"]], on=on, suffixes=("", "_base"))
        row["n_pairs"] = len(merged)
        for m in metrics:
            mean, std, ci, n = mean_ci95((merged[m] - merged[f"{m}_base"]).dropna().tolist())
            name = m.removeprefix("final/")
            row[f"delta_{name}_mean"], row[f"delta_{name}_ci95"] = mean, ci
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
        cells = [_fmt(r[f"delta_{k}_mean"], r[f"delta_{k}_ci95"], signed=True) for k in ks]
        lines.append(f"| {r['variant']} | {r['baseline']} | {r['n_pairs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def by_tag_markdown(summary: pd.DataFrame, teachers: pd.DataFrame | None = None) -> str:
    """Per tag (``final/<tag>/pass@k``): each variant's mean ± 95% CI and, when known, each baseline model's
    pass@k on the same problems (``teachers``: one row per model and tag, from a run's ``eval_per_problem.csv``)."""
    cols = [c.removesuffix("_mean") for c in summary.columns if c.endswith("_mean") and "/" in c
            and c.split("/")[-1].startswith("pass@")]
    if not cols:
        return ""
    lines = ["", "### Final pass@k per tag", "", "Mean ± 95% confidence half-width over seeds, on the evaluation "
             "problems of each tag.", "", "| variant | n | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for _, r in summary.iterrows():
        cells = [_fmt(r[f"{c}_mean"], r[f"{c}_ci95"]) for c in cols]
        lines.append(f"| {r['variant']} | {r['n_completed']} | " + " | ".join(cells) + " |")
    if teachers is not None and len(teachers):
        for model, g in teachers.groupby("model", sort=False):
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
def sweep_name(sweep_dir: Path, runs: pd.DataFrame) -> str:
    """The sweep's wandb group when the runs share one, else the sweep directory's parent/name."""
    groups = set()
    for d in runs["run_dir"]:
        if d and (Path(d) / "config.yaml").exists():
            cfg = yaml.safe_load((Path(d) / "config.yaml").read_text())
            groups.add(((cfg.get("logger") or {}).get("wandb") or {}).get("group"))
    groups.discard(None)
    return groups.pop() if len(groups) == 1 else (sweep_dir.parent.name if _is_csv(sweep_dir) else sweep_dir.name)


def load_sweeps(sweep_dirs: list[Path]) -> pd.DataFrame:
    """One table of the runs of several sweep directories (one sweep run in parts); job numbers stay per part.
    Variants are named by the overrides that vary across all the parts (a part may fix one, e.g. its loss)."""
    rows = [{"sweep": str(d), **row} if _is_csv(d) else {**row, "sweep": str(d)}
            for d in sweep_dirs for row in _source_rows(d)]
    legacy = [r.pop("_legacy_key", False) for r in rows]
    if any(legacy):
        for r, old in zip(rows, legacy, strict=True):
            if old or r.get("_pair_key") is not None:  # every trained run, whatever its source
                r["_pair_key"] = _legacy_pair_key(r)
    for r in rows:  # every seed it was given (trainer.seed, eval.seed): two runs that share them are one run
        r["_seeds"] = " ".join(o for o in r["_overrides"] if _split(o)[0] in SEED_KEYS)
    _name_by_axes(rows)
    runs = pd.DataFrame(rows)
    done = runs[runs["status"] == "completed"]
    twice = done[done.duplicated(["variant", "_seeds"], keep=False)]
    if len(twice):
        found = [f"{v} {s} in {', '.join(g['sweep'])}" for (v, s), g in twice.groupby(["variant", "_seeds"],
                                                                                       sort=False)]
        raise ValueError(f"{len(found)} completed runs appear more than once (the same variant and seeds in two "
                         f"sources?): {'; '.join(found[:3])}{' …' if len(found) > 3 else ''}")
    _mark_superseded(runs, done)
    return runs.drop(columns=["_seeds"])


def _unsupersede(status: str, error: str) -> tuple[str, str]:
    """A runs.csv row's status and error as they were before ``_mark_superseded`` (which wrote a superseded row's
    error as ``<status> (<error>); completed in <source>``): the row is marked again against the sources given now."""
    if status != "superseded":
        return status, error
    status, _, error = error.rsplit("; completed in ", 1)[0].partition(" (")
    return status or "unfinished", error.removesuffix(")")


def _mark_superseded(runs: pd.DataFrame, done: pd.DataFrame) -> None:
    """A run that did not complete (failed, unfinished, not started) and whose variant and seeds a run of a later
    part completed (a job re-run: given after it among the sources, or after it in one runs.csv, from another sweep
    directory) becomes ``superseded``: it is listed with the runs that did not complete, its former status and error
    kept in ``error``, but counted neither as failed nor as unfinished. A failure after a completed run of the same
    job, or beside one in its own part, stays a failure."""
    later: dict[tuple, list[tuple[int, str]]] = {}
    for i, v, s, sweep in zip(done.index, done["variant"], done["_seeds"], done["sweep"], strict=True):
        later.setdefault((v, s), []).append((i, sweep))
    for i in runs.index[runs["status"] != "completed"]:
        by = next((sweep for j, sweep in later.get((runs.at[i, "variant"], runs.at[i, "_seeds"]), [])
                   if j > i and sweep != runs.at[i, "sweep"]), None)
        if by is not None:
            err = runs.at[i, "error"] if _present(runs.at[i, "error"]) else ""
            runs.at[i, "error"] = f"{runs.at[i, 'status']}{f' ({err})' if err else ''}; completed in {by}"
            runs.at[i, "status"] = "superseded"


def report(sweep_dir: str | os.PathLike | list, out: str | os.PathLike | None = None,
           baseline: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write ``runs.csv``, ``summary.csv``/``summary.md`` (with the per-tag table and the paired differences: to
    the ungated run, or to the ``baseline`` variant), ``paired.csv`` and the plots (pass@k, training and drift
    curves, pass@k over training steps, the drift map when U or k vary)."""
    dirs = [Path(d) for d in (sweep_dir if isinstance(sweep_dir, list) else [sweep_dir])]
    runs = load_sweeps(dirs)
    name = sweep_name(dirs[0], runs)
    out = Path(out) if out else Path("results") / name
    for d in dirs:
        if _is_csv(d) and d.resolve() == (out / "runs.csv").resolve():
            raise ValueError(f"{d} is a source and would be overwritten by this report: pass --keep-runs (it is "
                             "copied under runs/ first) or another --out")
    out.mkdir(parents=True, exist_ok=True)
    summary, pairs = summarise(runs), paired(runs, baseline)
    runs.rename(columns={"_pair_key": "pair_key"}).to_csv(out / "runs.csv", index=False)  # a later source
    summary.to_csv(out / "summary.csv", index=False)
    pairs.to_csv(out / "paired.csv", index=False)
    title = f"{name} ({', '.join(map(str, dirs))})"
    text = summary_markdown(summary, runs, title) + by_tag_markdown(summary, baselines_by_tag(runs))
    (out / "summary.md").write_text(text + paired_markdown(pairs, baseline))
    ks = [c.removesuffix("_mean") for c in summary.columns if c.startswith("pass@") and c.endswith("_mean")
          and "/" not in c]
    if summary["n_completed"].sum():
        plots.plot_pass_at_k(runs, summary, out / "pass_at_k.png", name)
        plots.plot_eval_curves(runs, ks, out / "pass_at_k_over_steps.png", name)
        done = runs[runs["status"] == "completed"]
        if done["U"].nunique() > 1 or done["staleness"].nunique() > 1:
            plots.plot_drift_map(runs, ks, out / "drift_map.png", name)
    plots.plot_curves(runs, out / "curves.png", name)
    shares = sorted((c.removeprefix("mean/") for c in runs.columns if c.startswith("mean/routing/")
                     and "/frac/" in c), key=lambda k: ("by_tag" in k, k))  # overall shares first, then per tag
    if shares:
        plots.plot_routing(runs, [*shares, "routing/entropy"], out / "routing.png", name)
    return runs, summary


KEPT = (".hydra/overrides.yaml", ".hydra/hydra.yaml", ".hydra/config.yaml", "config.yaml", "status.json",
        "metrics.jsonl", "eval_per_problem.csv")


def keep_runs(sweep_dirs: list[Path], out: Path) -> list[Path]:
    """Copy what the report reads of each sweep directory into ``out/runs/<part>/`` (the part named by the sweep
    directory's own name; a directory already under ``out/runs`` is left where it is), and each ``runs.csv`` source
    to ``out/runs/<its folder>_runs.csv``. Returns the kept sources."""
    import shutil

    kept = []
    for d in sweep_dirs:
        d = Path(d).resolve()
        if (out / "runs").resolve() in d.parents:
            kept.append(d)
            continue
        dest = out / "runs" / f"{d.parent.name}_{d.name}"
        if _is_csv(d):  # an earlier report's runs.csv: kept whole, as runs/<its folder>_runs.csv
            if dest.exists() and dest.read_bytes() != d.read_bytes():
                own = d == (out / "runs.csv").resolve()  # this report's output: it holds every source it was made of
                raise ValueError(f"{d} is {'the output of an earlier report into ' + str(out) if own else 'not'} "
                                 f"the runs.csv kept as {dest}; pass the kept sources ({out / 'runs'}/*) and the "
                                 "new parts instead")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(d, dest)
            kept.append(dest)
            continue
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        if (d / "multirun.yaml").exists():
            shutil.copy2(d / "multirun.yaml", dest / "multirun.yaml")
        for ov in sorted(d.rglob(".hydra/overrides.yaml")):
            run_dir = ov.parent.parent
            if "wandb" in run_dir.parts:
                continue
            target = dest / run_dir.relative_to(d)
            for name in KEPT:
                if (run_dir / name).exists():
                    (target / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(run_dir / name, target / name)
            for f in sorted((run_dir / "evals").glob("*.csv")):
                (target / "evals").mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target / "evals" / f.name)
        kept.append(dest)
    return kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opd_lab.report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", nargs="+", help="a Hydra multirun directory (holds multirun.yaml and one folder "
                   "per job), or an earlier report's runs.csv; several: one sweep run in parts")
    p.add_argument("--out", help="output folder (default: results/<sweep name>)")
    p.add_argument("--keep-runs", action="store_true", help="also copy each job's config, status, metrics and "
                   "evaluations into <out>/runs/<part>/ (a sweep directory the report can read again later)")
    p.add_argument("--baseline", help="pair every other variant with this variant's run of the same seed (e.g. "
                   "mt_generalist) instead of each gated variant with its ungated run")
    args = p.parse_args(argv)
    try:
        dirs = list(args.sweep_dir)
        if args.keep_runs:
            first = Path(dirs[0])
            if not first.exists():
                raise FileNotFoundError(f"no such sweep directory or runs.csv: {first}")
            out = Path(args.out) if args.out else Path("results") / sweep_name(first, load_sweep(first))
            dirs = keep_runs([Path(d) for d in dirs], out)
            args.out = str(out)
        runs, summary = report(dirs, args.out, args.baseline)
    except (FileNotFoundError, ValueError) as e:
        print(f"opd-lab report: {e}", file=sys.stderr)
        return 2
    counts = runs["status"].value_counts().to_dict()
    out = Path(args.out) if args.out else Path("results") / sweep_name(Path(args.sweep_dir[0]), runs)
    print((out / "summary.md").read_text())  # what report() wrote: nothing is read or paired a second time
    print(f"runs: {counts}; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
