"""``python -m opd_lab.diagnose``: training-free gradient alignment of distillation signals (docs/methods.md,
"Diagnostic: gradient alignment").

For a question x, a student rollout y and a node h_t (a response position chosen every k tokens or by entropy):

- Q(h_t, v): the probability that the student solves x continuing from h_t·v, estimated by M continuations per
  candidate token v, each with the rollout's remaining token budget; an end-of-response candidate (a stop id)
  ends the response, so its Q is the grade of the prefix itself. Adaptively: a node whose Q estimates are all
  equal (all 0, typical late in a failing rollout, or all 1; g*_t = 0 and a_t undefined) gets further rounds for
  all its candidates, each doubling its per-candidate count (M, 2M, 4M, … never above
  ``diagnose.max_continuations``), until some Q differs or the cap is reached. Candidates C_t: the student's
  top-m tokens plus the sampled token y_t. The remaining vocabulary R_t is either dropped (``rest=drop``: π
  restricted to C_t and renormalised, g* = 0 on R_t) or shares one estimate Q(h_t, R) from M continuations whose
  first token is drawn from π restricted to R_t (``rest=share``; it counts as a candidate in the adaptive rule).
- V(h_t) = Σ_v π_θ(v|h_t) Q(h_t, v) and the ideal logit-space gradient g*_t(v) = π_θ(v|h_t)(Q(h_t, v) − V(h_t)),
  the steepest-ascent direction of P(success) with respect to the logits z_t at that node.
- The distillation gradient d_t = −∂ℓ_t/∂z_t of each loss (sampled-token, LSM, full reverse KL) against each
  teacher (a model, or the student itself given a different context such as the reference answer).
- a_t = cos(d_t, g*_t) (undefined, NaN, when either vector is zero, e.g. all Q equal even at the cap: such
  nodes are kept in ``nodes.csv`` with ``defined`` false and counted in the summaries, never dropped).

Outputs in the run directory: ``nodes.csv`` (one row per question × rollout × node × teacher × loss, with the
per-candidate ``continuations`` and ``rounds`` the node used and ``defined``: g*_t ≠ 0),
``summary.csv``/``summary.md`` (per teacher and loss, split by correct/incorrect rollouts, mean with 95% CI, the
undefined nodes as a count and a fraction), ``matched.csv`` (and a second table in ``summary.md``: a_t incorrect −
correct at matched positions with a bootstrap CI over questions, :func:`~opd_lab.core.alignment.matched_difference`) and
``alignment_by_position.png``, ``alignment_correct_vs_incorrect.png``.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from opd_lab import tasks
from opd_lab.common import console, plugins
from opd_lab.config import Config, ConfigError, DiagnoseConfig
from opd_lab.core.alignment import Teacher, matched_difference
from opd_lab.core.stats import mean_ci95
from opd_lab.diagnostic.probe import (  # noqa: F401  (the phases, re-exported for callers of this app's module)
    ROUND_SEED_STRIDE,
    Diagnosis,
    Probe,
    estimate_q,
    find_nodes,
    sample_rollouts,
    score_alignment,
)
from opd_lab.run import components
from opd_lab.run.jobs import CONF_DIR


# --------------------------------------------------------------------------------------------------- run
def run(cfg: Config, run_dir: Path) -> pd.DataFrame:
    """Sample rollouts → phase 1: nodes and candidates → phase 2: Q by targeted continuations → phase 3: g*, d_t
    and a_t per node × teacher × loss; writes the tables and plots and returns the node table."""
    run_dir.mkdir(parents=True, exist_ok=True)
    diag = build(cfg)
    try:
        rollouts = sample_rollouts(diag)
        probes = find_nodes(diag, rollouts)
        wins = estimate_q(diag, probes)
        rows = score_alignment(diag, probes, wins)
    finally:
        diag.engine.close()
    df = pd.DataFrame(rows)
    write_outputs(df, Path(diag.d.out_dir) if diag.d.out_dir else run_dir, seed=diag.d.seed)
    return df


def build(cfg: Config) -> Diagnosis:
    """Models (the student, each configured teacher: a path, the teacher, or the student with a context), the
    held-out questions and the rollout engine."""
    from opd_lab.models.loading import check_same_vocab, load_model, load_tokenizer, loading, resolve_paths
    from opd_lab.models.token_ids import stop_token_ids

    d: DiagnoseConfig = cfg.diagnose
    components.seed_everything(d.seed)
    task = tasks.build_task(cfg.task)
    paths = resolve_paths(cfg)
    tokenizer = load_tokenizer(paths.tokenizer, cfg.model.chat_template)
    device = cfg.trainer.device
    with loading("model.student", paths.student):
        student = load_model(paths.student, cfg.model.dtype, device, trainable=False)
    teachers = []
    for name, spec in d.teachers.items():
        path = {"teacher": paths.teacher, "student": paths.student}.get(spec.model, spec.model)
        with loading(f"diagnose.teachers.{name}.model", path):
            check_same_vocab(tokenizer, load_tokenizer(path, cfg.model.chat_template))
            model = student if path == paths.student else load_model(path, cfg.model.dtype, device, trainable=False)
        teachers.append(Teacher(name, model, spec.context))
    pool = task.eval_problems()
    qids = random.Random(d.seed).sample(range(len(pool)), min(d.n_questions, len(pool)))  # held-out indices
    problems = [pool[i] for i in qids]
    prompts = tasks.prompt_encoder(cfg)(tokenizer, problems)
    stop = stop_token_ids(tokenizer, paths.student)
    engine = components.make_engine(cfg, student, tokenizer, paths.student, stop)
    return Diagnosis(cfg, tokenizer, student, teachers, qids, problems, prompts, engine, stop,
                     d.max_tokens or cfg.rollout.max_tokens)


# ------------------------------------------------------------------------------------------------ outputs
def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per teacher × loss × (all / correct / incorrect rollouts): mean alignment with a 95% CI over nodes,
    plus the per-question mean (each question weighted once) and how many nodes had no defined alignment
    (``undefined``, and ``undefined_frac`` of all the split's nodes, defined or not)."""
    out = []
    for (teacher, loss), g in df.groupby(["teacher", "loss"], sort=False):
        for split, part in (("all", g), ("correct", g[g["correct"]]), ("incorrect", g[~g["correct"]])):
            mean, std, ci, n = mean_ci95(part["alignment"].tolist())
            per_q = part.groupby("question")["alignment"].mean().dropna()
            qm, _, qci, qn = mean_ci95(per_q.tolist())
            undefined = int(part["alignment"].isna().sum())
            out.append({"teacher": teacher, "loss": loss, "rollouts": split, "nodes": n,
                        "undefined": undefined, "undefined_frac": undefined / len(part) if len(part) else math.nan,
                        "alignment_mean": mean,
                        "alignment_std": std, "alignment_ci95": ci, "questions": qn,
                        "per_question_mean": qm, "per_question_ci95": qci})
    return pd.DataFrame(out)


def matched(df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per teacher × loss: a_t on incorrect minus correct rollouts at matched positions (``position_bin``), with a
    95% bootstrap CI over questions (:func:`~opd_lab.core.alignment.matched_difference`, seeded by ``seed``)."""
    pos = "position_bin" if "position_bin" in df else "position"
    out = []
    for (teacher, loss), g in df.groupby(["teacher", "loss"], sort=False):
        out.append({"teacher": teacher, "loss": loss,
                    **matched_difference(g["question"].to_numpy(), g[pos].to_numpy(), g["correct"].to_numpy(),
                                         g["alignment"].to_numpy(), n_boot=2000, seed=seed)})
    return pd.DataFrame(out)


def write_outputs(df: pd.DataFrame, out: Path, seed: int = 0) -> None:
    """``nodes.csv``, ``summary.csv``, ``matched.csv``, ``summary.md`` (both tables) and the plots; ``seed`` seeds
    the matched comparison's bootstrap."""
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "nodes.csv", index=False)
    summary = summarise(df) if len(df) else pd.DataFrame()
    summary.to_csv(out / "summary.csv", index=False)
    match = matched(df, seed) if len(df) else pd.DataFrame()
    match.to_csv(out / "matched.csv", index=False)
    (out / "summary.md").write_text(summary_markdown(summary, match))
    if len(df):
        plot_alignment(df, summary, out)


def summary_markdown(summary: pd.DataFrame, match: pd.DataFrame) -> str:
    """``summary.md``: alignment per teacher × loss × rollout correctness, then the matched-position differences."""
    lines = ["| teacher | loss | rollouts | nodes | mean a_t ± 95% CI | per-question mean ± CI | undefined |",
             "|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        lines.append(f"| {r['teacher']} | {r['loss']} | {r['rollouts']} | {r['nodes']} | "
                     f"{r['alignment_mean']:.3f} ± {r['alignment_ci95']:.3f} | "
                     f"{r['per_question_mean']:.3f} ± {r['per_question_ci95']:.3f} | "
                     f"{r['undefined']} ({r['undefined_frac']:.1%}) |")
    lines += ["", "Matched positions: mean a_t incorrect − correct at the same response position, weighted by "
              "min(n_correct, n_incorrect); 95% CI: bootstrap over questions.", "",
              "| teacher | loss | Δ incorrect − correct [95% CI] | positions | nodes (correct / incorrect) | "
              "unmatched Δ |", "|---|---|---|---|---|---|"]
    for _, r in match.iterrows():
        lines.append(f"| {r['teacher']} | {r['loss']} | {r['matched_diff']:.3f} [{r['ci95_low']:.3f}, "
                     f"{r['ci95_high']:.3f}] | {r['positions']} | {r['nodes_correct']} / {r['nodes_incorrect']} | "
                     f"{r['unmatched_diff']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_alignment(df: pd.DataFrame, summary: pd.DataFrame, out: Path) -> None:
    """``alignment_by_position.png`` (mean a_t over the response) and ``alignment_correct_vs_incorrect.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = list(df.groupby(["teacher", "loss"], sort=False).groups)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 1, 6)
    for teacher, loss in combos:
        part = df[(df["teacher"] == teacher) & (df["loss"] == loss)].dropna(subset=["alignment"])
        mids, means = [], []
        for lo, hi in zip(bins[:-1], bins[1:], strict=True):
            sel = part[(part["rel_position"] >= lo) & (part["rel_position"] < hi)]["alignment"]
            if len(sel):
                mids.append((lo + hi) / 2)
                means.append(sel.mean())
        ax.plot(mids, means, marker="o", label=f"{teacher} / {loss}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("node position (fraction of the response)")
    ax.set_ylabel("mean alignment cos(d_t, g*_t)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "alignment_by_position.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(combos) + 2), 4))
    x = np.arange(len(combos))
    for k, split in enumerate(("correct", "incorrect")):
        sub = summary[summary["rollouts"] == split].set_index(["teacher", "loss"])
        means = [sub.loc[c, "alignment_mean"] if c in sub.index else np.nan for c in combos]
        cis = [sub.loc[c, "alignment_ci95"] if c in sub.index else np.nan for c in combos]
        ax.bar(x + (k - 0.5) * 0.38, means, 0.38, yerr=np.nan_to_num(cis), capsize=3,
               label=f"{split} rollouts")
    ax.set_xticks(x, [f"{t}\n{loss}" for t, loss in combos], fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("mean alignment (95% CI over nodes)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "alignment_correct_vs_incorrect.png", dpi=110)
    plt.close(fig)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="diagnose")
def app(cfg: DictConfig) -> None:
    from opd_lab.config import to_run_config
    from opd_lab.run.jobs import config_error

    try:
        run_cfg = to_run_config(cfg)
        components.check_registered(run_cfg)
        console.configure(run_cfg.logger.verbose)  # engine and library records to the log file only
        chosen = components.resolve_engine(run_cfg)
        if chosen:
            print(f"opd-lab: {chosen}", flush=True)
        if run_cfg.diagnose is None:
            raise ConfigError("diagnose=null is invalid: allowed a diagnose config (diagnose=default)")
        df = run(run_cfg, Path(run_cfg.output_dir))
    except ConfigError as e:
        config_error(e)
        return
    print((Path(run_cfg.diagnose.out_dir or run_cfg.output_dir) / "summary.md").read_text())
    print(f"{len(df)} node rows; written to {run_cfg.diagnose.out_dir or run_cfg.output_dir}", file=sys.stderr)


if __name__ == "__main__":
    plugins.load_from_argv()  # before Hydra composes: a plugin may store the schema its YAML names
    app()
