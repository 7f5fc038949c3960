"""A sweep's runs as one pandas DataFrame, one row per run: every job of each Hydra multirun directory (failed,
unfinished and never-started jobs included: the expected jobs are re-expanded from ``multirun.yaml`` as Hydra's basic
sweeper expanded them) and the rows of earlier reports' ``runs.csv``; the variant and pair key of every row, and the
runs that a later part of the sweep superseded."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from opd_lab.run.tracking import gate_name, read_metrics

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


def final_per_problem(run_dir: Path) -> pd.DataFrame | None:
    """The run's final evaluation, one row per problem: the last step's ``student`` rows of
    ``eval_per_problem.csv`` (which ``--keep-runs`` keeps); in an evaluation-only run (a file that holds one model
    only: ``base_student``, ``teacher`` or ``checkpoint``) that model's rows; else the last
    ``evals/student_step_*.csv``; ``None`` when the run has none of them."""
    dtype = {"question": str, "answer": str, "tag": str}
    path = run_dir / "eval_per_problem.csv"
    if path.exists():
        df = pd.read_csv(path, dtype=dtype)
        if {"model", "step"} <= set(df.columns):
            if df["model"].nunique() == 1:  # an evaluation-only run: the one model it evaluated
                return df[df["step"] == df["step"].max()]
            df = df[df["model"] == "student"]
            if len(df):
                return df[df["step"] == df["step"].max()]
    files = sorted((run_dir / "evals").glob("student_step_*.csv"))
    return pd.read_csv(files[-1], dtype=dtype) if files else None


def final_by_tag(run_dir: Path) -> dict[str, float]:
    """``final/<tag>/pass@k``: the final evaluation's pass@k over the problems of each tag (``Problem.tag``: the
    embedded task's operand count ``ops<n>``, a math benchmark's ``tag_field``; in :func:`natural_key` order), from
    :func:`final_per_problem`; empty when the problems have fewer than two tags."""
    df = final_per_problem(run_dir)
    if df is None or "tag" not in df or df["tag"].nunique() < 2:
        return {}
    ks = [c for c in df.columns if c.startswith("pass@")]
    groups = sorted(df.groupby("tag"), key=lambda tg: natural_key(tg[0]))
    return {f"final/{tag}/{k}": float(g[k].mean()) for tag, g in groups for k in ks}


def natural_key(text: str) -> tuple:
    """Sorts ``ops9`` before ``ops10`` (digit runs compare as numbers)."""
    return tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", text)))


PROBLEM_KEY = ["benchmark", "question", "answer"]


def per_problem_differences(run_dir: Path, ref_dir: Path, ks: list[str]) -> pd.DataFrame | None:
    """Per evaluation problem (``PROBLEM_KEY``), the difference of each final pass@k between a run and its reference
    (the same seed): ``None`` where a run has no per-problem evaluation or the two did not answer exactly the same
    problems, each once."""
    a, b = final_per_problem(Path(run_dir)), final_per_problem(Path(ref_dir))
    if a is None or b is None or not all(k in a and k in b for k in ks):
        return None
    try:
        both = a[PROBLEM_KEY + ks].merge(b[PROBLEM_KEY + ks], on=PROBLEM_KEY, suffixes=("", "_ref"),
                                         validate="one_to_one")
    except pd.errors.MergeError:  # a problem twice in one evaluation
        return None
    if not len(a) == len(b) == len(both):
        return None
    return both[PROBLEM_KEY].assign(**{k: both[k] - both[f"{k}_ref"] for k in ks})


def problem_se(diffs: list[pd.DataFrame], ks: list[str]) -> dict[str, float]:
    """The standard error, over evaluation problems, of a comparison's mean Δpass@k: each problem's difference
    averaged over the pairs (``diffs``, one frame per pair from :func:`per_problem_differences`; problems answered
    in every pair), then per benchmark std/√problems, combined as the macro mean over benchmarks is,
    √(Σ_b SE_b²)/B. How far the mean Δ would move on another draw of problems; nan with fewer than 2 problems in
    a benchmark."""
    if not diffs:
        return dict.fromkeys(ks, math.nan)
    allp = pd.concat(diffs).groupby(PROBLEM_KEY, sort=False)[ks].agg(["mean", "count"])
    out = {}
    for k in ks:
        per = allp[allp[(k, "count")] == len(diffs)][(k, "mean")]
        by = per.groupby(level="benchmark", sort=False)
        se_b = [g.std(ddof=1) / math.sqrt(len(g)) if len(g) >= 2 else math.nan for _, g in by]
        out[k] = float(math.sqrt(sum(x * x for x in se_b)) / len(se_b)) if se_b else math.nan
    return out


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
            "gate": gate_name(g) if kind else None, "tau": g.get("tau"), "U": U,
            "reuse": r.get("reuse"), "staleness": r.get("staleness", 0), "lr": (cfg.get("trainer") or {}).get("lr"),
            "ungated": not eval_only and (kind == "none" or g.get("tau") == 0),
            "_pair_key": None if eval_only else json.dumps(pair, sort_keys=True, default=str)}


def load_sweep(sweep_dir: str | os.PathLike) -> pd.DataFrame:
    """Every job of the sweep as one row, including failed, unfinished and never-started jobs."""
    rows = _source_rows(sweep_dir)
    _name_by_axes(rows)
    return pd.DataFrame(rows)


def is_csv(source: str | os.PathLike) -> bool:
    return Path(source).suffix == ".csv"


def _source_rows(source: str | os.PathLike) -> list[dict]:
    """The rows of one source: a sweep directory, or an earlier report's ``runs.csv``."""
    return _csv_rows(Path(source)) if is_csv(source) else _sweep_rows(source)


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
        status, error = _unsupersede(rec)
        for col in ("former_status", "former_error", "superseded_by"):  # marked again below, against these sources
            rec.pop(col, None)
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
def by_position_of(run_dir: Path) -> dict[str, dict[int, float]]:
    """A run's ``<metric>/by_block/<b>`` (drift and gate by response position, at a step's first and last
    update) averaged over its training steps: ``{metric: {block: value}}``, e.g. ``{"drift/last_update": {0: …}}``."""
    acc: dict[str, dict[int, list[float]]] = {}
    for rec in read_metrics(Path(run_dir) / "metrics.jsonl"):
        for key, value in rec.items():
            if "/by_block/" in key and isinstance(value, int | float):
                what, b = key.split("/by_block/")
                acc.setdefault(what, {}).setdefault(int(b), []).append(float(value))
    return {what: {b: float(np.mean(v)) for b, v in sorted(blocks.items())} for what, blocks in acc.items()}


def sweep_name(sweep_dir: Path, runs: pd.DataFrame) -> str:
    """The runs' ``logger.wandb.group`` when they share one (set by hand), else the sweep config's name
    (``--config-name block_ablation``, from ``multirun.yaml``), else the sweep directory's name (a runs.csv: its
    folder's)."""
    groups = set()
    for d in runs["run_dir"]:
        if d and (Path(d) / "config.yaml").exists():
            cfg = yaml.safe_load((Path(d) / "config.yaml").read_text())
            groups.add(((cfg.get("logger") or {}).get("wandb") or {}).get("group"))
    groups.discard(None)
    if len(groups) == 1:
        return groups.pop()
    if is_csv(sweep_dir):
        return sweep_dir.parent.name
    saved = sweep_dir / "multirun.yaml"
    name = ((yaml.safe_load(saved.read_text()) or {}).get("hydra", {}).get("job", {}).get("config_name")
            if saved.exists() else None)
    return name if name and name != "config" else sweep_dir.name


def load_sweeps(sweep_dirs: list[Path]) -> pd.DataFrame:
    """One table of the runs of several sweep directories (one sweep run in parts); job numbers stay per part.
    Variants are named by the overrides that vary across all the parts (a part may fix one, e.g. its loss)."""
    rows = [{"sweep": str(d), **row} if is_csv(d) else {**row, "sweep": str(d)}
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


def _unsupersede(rec: dict) -> tuple[str, str]:
    """A runs.csv row's status and error as they were before ``_mark_superseded`` (kept in ``former_status`` and
    ``former_error``): the row is marked again against the sources given now. A runs.csv written before those
    columns existed kept them only in the text of ``error`` (``<status> (<error>); completed in <source>``)."""
    error = rec["error"] if _present(rec.get("error")) else ""
    if rec["status"] != "superseded":
        return rec["status"], error
    if _present(rec.get("former_status")):
        return rec["former_status"], rec["former_error"] if _present(rec.get("former_error")) else ""
    status, _, error = error.rsplit("; completed in ", 1)[0].partition(" (")  # a legacy runs.csv
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
            runs.loc[i, ["former_status", "former_error", "superseded_by"]] = [runs.at[i, "status"], err, by]
            runs.at[i, "error"] = f"{runs.at[i, 'status']}{f' ({err})' if err else ''}; completed in {by}"
            runs.at[i, "status"] = "superseded"
