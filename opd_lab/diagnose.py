"""``python -m opd_lab.diagnose``: training-free gradient alignment of distillation signals (METHODS.md,
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
correct at matched positions with a bootstrap CI over questions, :func:`~opd_lab.alignment.matched_difference`) and
``alignment_by_position.png``, ``alignment_correct_vs_incorrect.png``.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from opd_lab import console, runtime, tasks
from opd_lab.alignment import (
    Teacher,
    choose_nodes,
    cosine,
    distill_gradient,
    head,
    ideal_gradient,
    matched_difference,
    node_logits,
    q_all_equal,
    response_entropy,
    response_states,
)
from opd_lab.config import Config, ConfigError, DiagnoseConfig
from opd_lab.jobs import CONF_DIR
from opd_lab.rollout.base import RolloutBatch, SamplingSpec
from opd_lab.stats import mean_ci95
from opd_lab.tokens import ends_with_stop


@dataclass
class Probe:
    """One student rollout and the nodes h_t probed on it."""

    row: int  # its row in the rollout batch
    question: int  # index of its problem in :attr:`Diagnosis.problems`
    response: list[int]
    correct: bool
    nodes: list[int]  # probed response positions t
    logits_N_V: torch.Tensor  # the student's logits z_t at the nodes (float32, CPU)
    pi_N_V: torch.Tensor  # π_θ(·|h_t) at the nodes
    entropy_T: torch.Tensor  # entropy of π_θ(·|h_t) at every position
    candidates: list[list[int]]  # per node: the student's top-m tokens and y_t
    rest_first: list[list[int]]  # per node (rest=share): the first tokens of the shared-estimate continuations
    continuations: list[int] = field(default_factory=list)  # per node: continuations per candidate (estimate_q)
    rounds: list[int] = field(default_factory=list)  # per node: rounds of continuations it took (estimate_q)


@dataclass
class Diagnosis:
    """The diagnostic's inputs: config, tokenizer, student, teachers, the sampled questions and the engine."""

    cfg: Config
    tokenizer: object
    student: torch.nn.Module
    teachers: list[Teacher]
    qids: list[int]  # held-out indices of the questions
    problems: list
    prompts: list[list[int]]
    engine: object
    stop: tuple[int, ...]
    max_tokens: int

    @property
    def d(self) -> DiagnoseConfig:
        return self.cfg.diagnose


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
    from opd_lab.models import check_same_vocab, load_model, load_tokenizer, loading, resolve_paths
    from opd_lab.tokens import stop_token_ids

    d: DiagnoseConfig = cfg.diagnose
    runtime.seed_everything(d.seed)
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
    engine = runtime.make_engine(cfg, student, tokenizer, paths.student, stop)
    return Diagnosis(cfg, tokenizer, student, teachers, qids, problems, prompts, engine, stop,
                     d.max_tokens or cfg.rollout.max_tokens)


def sample_rollouts(diag: Diagnosis) -> RolloutBatch:
    """The student's rollouts of every question; prints the continuation budget before the work."""
    d = diag.d
    rollouts = diag.engine.generate(diag.prompts, SamplingSpec(n=d.rollouts_per_question, temperature=1.0, top_p=1.0,
                                                               max_tokens=diag.max_tokens, seed=d.seed))
    n_cand = d.top_m + 1 + (1 if d.rest.value == "share" else 0)
    mean_len = float(rollouts.response_mask_B_T.sum(-1).float().mean())
    nodes_per = d.max_nodes if d.node_mode == "top_entropy" else min(d.max_nodes, math.ceil(mean_len / d.every_k))
    n_cont = rollouts.size * nodes_per * n_cand * d.continuations
    print(f"opd-lab diagnose: {len(diag.problems)} questions × {d.rollouts_per_question} rollouts × ≤{nodes_per} "
          f"nodes × ≤{n_cand} candidates × M={d.continuations} = up to {n_cont} continuations "
          f"(~{n_cont * mean_len / 2:,.0f} tokens at half the mean response length {mean_len:.0f}) in the first "
          f"round; nodes with all-equal Q get further rounds up to {d.max_continuations} per candidate "
          f"(≤{n_cont // d.continuations * d.max_continuations} continuations in all)", flush=True)
    return rollouts


def find_nodes(diag: Diagnosis, rollouts: RolloutBatch) -> list[Probe]:
    """Phase 1: for every rollout (student forward only), the nodes, π_θ there and the candidate tokens."""
    d = diag.d
    probes = []
    gen = torch.Generator().manual_seed(d.seed * 7919)
    for b in range(rollouts.size):
        j = int(rollouts.prompt_index_B[b])
        resp = rollouts.response_ids_B_T[b][rollouts.response_mask_B_T[b].bool()].tolist()
        if len(resp) < 2:
            continue
        correct = (not bool(rollouts.truncated_B[b])) and tasks.grade(rollouts.response_text[b], diag.problems[j])
        h = response_states(diag.student, diag.prompts[j], resp)
        ent = response_entropy(diag.student, h)
        nodes = choose_nodes(ent, d.node_mode, d.every_k, d.max_nodes)
        z = head(diag.student, h[nodes])
        pi = torch.softmax(z.double(), -1).float()
        cands, rest_first = [], []
        for i, t in enumerate(nodes):
            c = list(dict.fromkeys(torch.topk(pi[i], d.top_m).indices.tolist() + [resp[t]]))
            cands.append(c)
            if d.rest.value == "share":
                rest_first.append(_rest_tokens(pi[i], c, d.continuations, gen))
        probes.append(Probe(b, j, resp, correct, nodes, z, pi, ent, cands, rest_first))
    return probes


def _rest_tokens(pi_V: torch.Tensor, cands: list[int], n: int, gen: torch.Generator) -> list[int]:
    """``n`` first tokens of the shared-estimate continuations, drawn from π_θ restricted to R_t (the
    non-candidates; the first candidate where R_t has no mass)."""
    w = pi_V.clone()
    w[cands] = 0
    return [int(torch.multinomial(w, 1, generator=gen)) if float(w.sum()) > 0 else cands[0] for _ in range(n)]


# the seed stride between rounds of continuations (round 0 keeps the historical seeds d.seed·1_000_003 + chunk start)
ROUND_SEED_STRIDE = 1_000_000_007


def estimate_q(diag: Diagnosis, probes: list[Probe]) -> dict[tuple, list[float]]:
    """Phase 2: the successes of the targeted continuations, keyed ``(probe, node, candidate or None for the
    rest)``. Round 0: M per candidate, one per rest token, in engine-sized chunks (vLLM serves the shared prefixes
    from its prefix cache). An end-of-response first token ends the response: its outcome is the prefix's own grade.

    Adaptive Q: after each round, every node whose Q(h_t, v) estimates are all equal (with ``rest=share`` Q(h_t, R)
    counts too; g*_t = 0, a_t undefined) and whose per-candidate count n is below ``diagnose.max_continuations`` gets
    another round of min(n, cap − n) continuations for every candidate (and as many new rest tokens), so its count
    doubles (M, 2M, 4M, …) until some Q differs or the cap is reached. Round r > 0 is seeded apart from round 0
    (+ r·:data:`ROUND_SEED_STRIDE`), so its samples are new; with the cap equal to M there is exactly one round.
    Sets each probe's ``continuations`` and ``rounds`` per node."""
    d = diag.d
    share = d.rest.value == "share"
    gen = torch.Generator().manual_seed(d.seed * 7919 + 1)  # the rest tokens of rounds > 0
    for probe in probes:
        probe.continuations, probe.rounds = [0] * len(probe.nodes), [0] * len(probe.nodes)
    todo = {(p_i, i): d.continuations for p_i, probe in enumerate(probes) for i in range(len(probe.nodes))}
    wins: dict[tuple, list[float]] = {}
    rnd = 0

    def undefined(p_i: int, i: int) -> bool:  # every Q estimate of the node equal so far: g*_t = 0
        q_rest = float(np.mean(wins[(p_i, i, None)])) if share else None
        return q_all_equal([np.mean(wins[(p_i, i, v)]) for v in probes[p_i].candidates[i]], q_rest)

    while todo:
        jobs = []  # (probe index, node index, candidate token or None for the rest, first token, n samples)
        for (p_i, i), n in todo.items():
            probe = probes[p_i]
            jobs += [(p_i, i, v, v, n) for v in probe.candidates[i]]
            if share:
                if rnd:
                    probe.rest_first[i] = probe.rest_first[i] + _rest_tokens(probe.pi_N_V[i], probe.candidates[i],
                                                                             n, gen)
                jobs += [(p_i, i, None, v, 1) for v in probe.rest_first[i][-n:]]
        _run_round(diag, probes, jobs, wins, rnd)
        for (p_i, i), n in todo.items():
            probes[p_i].continuations[i] += n
            probes[p_i].rounds[i] = rnd + 1
        rnd += 1
        todo = {}
        for p_i, probe in enumerate(probes):
            for i, n in enumerate(probe.continuations):
                if n < d.max_continuations and undefined(p_i, i):
                    todo[(p_i, i)] = min(n, d.max_continuations - n)
        if todo:
            print(f"opd-lab diagnose: round {rnd + 1}: {len(todo)} nodes with all-equal Q resampled", flush=True)
    n_nodes = sum(len(p.nodes) for p in probes)
    if rnd > 1:
        n_undefined = sum(undefined(p_i, i) for p_i, p in enumerate(probes) for i in range(len(p.nodes)))
        print(f"opd-lab diagnose: adaptive Q took {rnd} rounds; {n_undefined} of {n_nodes} nodes still have all-equal "
              f"Q at the cap of {d.max_continuations} (g* = 0, a_t undefined)", flush=True)
    return wins


def _run_round(diag: Diagnosis, probes: list[Probe], jobs: list[tuple], wins: dict, rnd: int) -> None:
    """One round of ``jobs``: end-of-response first tokens graded as they stand, the rest continued, grouped by
    their sample count n."""
    for p_i, i, v, first, n in jobs:
        if first in diag.stop:
            probe = probes[p_i]
            text = diag.tokenizer.decode(probe.response[: probe.nodes[i]] + [first], skip_special_tokens=False)
            wins.setdefault((p_i, i, v), []).extend([float(tasks.grade(text, diag.problems[probe.question]))] * n)
    jobs = [job for job in jobs if job[3] not in diag.stop]
    for n in sorted({job[4] for job in jobs}):
        _continue(diag, probes, [job for job in jobs if job[4] == n], n, wins, rnd)


def _continue(diag: Diagnosis, probes: list[Probe], todo: list[tuple], n: int, wins: dict, rnd: int = 0) -> None:
    """``n`` continuations of each job, ``diagnose.chunk`` prompts per engine call, each with the rollout's
    remaining token budget, seeded by round ``rnd`` and chunk; the outcomes are appended to ``wins``."""
    from tqdm.auto import tqdm

    d = diag.d
    bar = tqdm(range(0, len(todo), d.chunk), desc=f"continuations (round {rnd + 1}, n={n})",
               disable=not diag.cfg.logger.progress, dynamic_ncols=True)
    for start in bar:
        chunk = todo[start : start + d.chunk]
        ps, budgets = [], []
        for p_i, i, _, first, _ in chunk:
            probe = probes[p_i]
            ps.append(diag.prompts[probe.question] + probe.response[: probe.nodes[i]] + [first])
            budgets.append(diag.max_tokens - probe.nodes[i] - 1)  # the rollout's remaining token budget
        out = None if max(budgets) < 1 else diag.engine.generate(
            ps, SamplingSpec(n, 1.0, 1.0, max(budgets), d.seed * 1_000_003 + start + rnd * ROUND_SEED_STRIDE))
        for c_i, (p_i, i, v, first, _) in enumerate(chunk):
            probe = probes[p_i]
            pre = probe.response[: probe.nodes[i]] + [first]
            for s_i in range(n):
                k = c_i * n + s_i
                cont = [] if out is None else \
                    out.response_ids_B_T[k][out.response_mask_B_T[k].bool()].tolist()[: budgets[c_i]]
                ok = ends_with_stop(pre + cont, diag.stop) and tasks.grade(
                    diag.tokenizer.decode(pre + cont, skip_special_tokens=False), diag.problems[probe.question])
                wins.setdefault((p_i, i, v), []).append(float(ok))


def score_alignment(diag: Diagnosis, probes: list[Probe], wins: dict[tuple, list[float]]) -> list[dict]:
    """Phase 3: Q, g*, the teachers' log-probs at the nodes, d_t and a_t per node × teacher × loss. Each row
    carries the node's per-candidate ``continuations`` n, its ``rounds``, ``defined`` (g*_t ≠ 0: some Q differs),
    the sampling error √(Q(1 − Q)/n) of its Q estimates and ``position_bin``, the position the matched comparison
    groups by (t on the every-k grid; for ``top_entropy``, the start of t's bin of width every_k)."""
    d = diag.d
    encode = tasks.prompt_encoder(diag.cfg)
    rows = []
    for p_i, probe in enumerate(probes):
        prob = diag.problems[probe.question]
        teacher_logp = {}
        for tch in diag.teachers:
            tz = node_logits(tch.model, tch.prompt(diag.tokenizer, prob, encode), probe.response, probe.nodes)
            teacher_logp[tch.name] = torch.log_softmax(tz.double(), -1).float()
        for i, t in enumerate(probe.nodes):
            c = probe.candidates[i]
            q_t = torch.tensor([float(np.mean(wins[(p_i, i, v)])) for v in c])
            q_rest = float(np.mean(wins[(p_i, i, None)])) if d.rest.value == "share" else None
            g_star, value = ideal_gradient(probe.pi_N_V[i], torch.tensor(c), q_t, d.rest.value, q_rest)
            n_cont = probe.continuations[i] if probe.continuations else d.continuations
            se = torch.sqrt(q_t * (1 - q_t) / n_cont)
            defined = bool(g_star.abs().sum() > 0)
            pos_bin = t if d.node_mode.value == "every_k" else t // d.every_k * d.every_k
            for tch in diag.teachers:
                for loss in d.losses:
                    dt = distill_gradient(loss, probe.logits_N_V[i], teacher_logp[tch.name][i], probe.response[t],
                                          top_k=d.lsm_top_k)
                    rows.append({
                        "question": diag.qids[probe.question], "rollout": probe.row, "correct": probe.correct,
                        "position": t, "rel_position": t / len(probe.response), "entropy": float(probe.entropy_T[t]),
                        "teacher": tch.name, "loss": loss, "alignment": cosine(dt, g_star),
                        "g_star_norm": float(g_star.norm()), "d_norm": float(dt.norm()), "value": value,
                        "n_candidates": len(c), "q_min": float(q_t.min()), "q_max": float(q_t.max()),
                        "q_se_mean": float(se.mean()), "q_se_max": float(se.max()), "q_rest": q_rest,
                        "sampled_token_q": float(q_t[c.index(probe.response[t])]),
                        "continuations": n_cont, "rounds": probe.rounds[i] if probe.rounds else 1,
                        "defined": defined, "position_bin": pos_bin,
                    })
    return rows


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
    95% bootstrap CI over questions (:func:`~opd_lab.alignment.matched_difference`, seeded by ``seed``)."""
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "nodes.csv", index=False)
    summary = summarise(df) if len(df) else pd.DataFrame()
    summary.to_csv(out / "summary.csv", index=False)
    match = matched(df, seed) if len(df) else pd.DataFrame()
    match.to_csv(out / "matched.csv", index=False)
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
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    if not len(df):
        return
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
    from opd_lab.jobs import config_error

    try:
        run_cfg = to_run_config(cfg)
        console.configure(run_cfg.logger.verbose)  # engine and library records to the log file only
        if run_cfg.diagnose is None:
            raise ConfigError("diagnose=null is invalid: allowed a diagnose config (diagnose=default)")
        df = run(run_cfg, Path(run_cfg.output_dir))
    except ConfigError as e:
        config_error(e)
        return
    print((Path(run_cfg.diagnose.out_dir or run_cfg.output_dir) / "summary.md").read_text())
    print(f"{len(df)} node rows; written to {run_cfg.diagnose.out_dir or run_cfg.output_dir}", file=sys.stderr)


if __name__ == "__main__":
    app()
