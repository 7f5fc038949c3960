"""Teacher weights from gradient alignment (``routing.rule=alignment``): the diagnostic of docs/methods.md run during
training on a fixed probe set, with the current student.

Every ``routing.alignment.every`` steps (and before the first), on ``n_questions`` probe problems drawn once from the
training distribution with ``routing.alignment.seed`` and held out from both training (:func:`reserve_probe` takes
them out of every training draw before the first) and evaluation (``task.probe_problems``): student rollouts, nodes,
adaptive Q estimates by targeted continuations (opd_lab/diagnostic/probe.py), then for each teacher i the alignment
a_t = cos(d_t, g*_t) of the run's loss against teacher i at every node. With ā_i the mean over the nodes where a_t
is defined (some Q differs), the weights are w_i = softmax_i(ā_i / temperature); the mixture of teachers.py then
uses them. When no node is defined the weights are kept as they were (and the metrics say so).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from opd_lab.config import Config, DiagnoseConfig
from opd_lab.core.alignment import Teacher
from opd_lab.diagnostic.probe import Diagnosis, estimate_q, find_nodes, sample_rollouts, score_alignment
from opd_lab.tasks import prompt_encoder


def reserve_probe(cfg: Config, task) -> None:
    """Take the alignment probe set out of training (before any training batch is drawn)."""
    task.reserve(task.probe_problems(cfg.routing.alignment.n_questions, cfg.routing.alignment.seed))


def softmax_weights(mean_alignment_N: list[float], temperature: float) -> torch.Tensor:
    """w_i = exp(ā_i / τ) / Σ_j exp(ā_j / τ) (float64; a teacher with no defined node, NaN, gets weight 0)."""
    a = torch.tensor(mean_alignment_N, dtype=torch.float64)
    logits = torch.where(torch.isnan(a), torch.full_like(a, -math.inf), a / temperature)
    return torch.softmax(logits, 0)


def probe_config(cfg: Config, names: list[str], step: int) -> DiagnoseConfig:
    """The diagnostic's settings for one refresh: ``routing.alignment`` sizes, the run's loss, new samples each
    refresh (seeded by the step)."""
    a = cfg.routing.alignment
    return DiagnoseConfig(n_questions=a.n_questions, rollouts_per_question=a.rollouts_per_question,
                          every_k=a.every_k, max_nodes=a.max_nodes, top_m=a.top_m, continuations=a.continuations,
                          max_continuations=a.max_continuations, losses=[cfg.loss.name],
                          lsm_top_k=getattr(cfg.loss, "top_k", 32), teachers={n: {"model": n} for n in names},
                          seed=a.seed * 1_000_003 + step)


def alignment_weights(cfg: Config, student, engine, tokenizer, task, stop: tuple[int, ...], teachers,
                      step: int) -> dict[str, float]:
    """Refresh ``teachers.weights`` from the alignment of each teacher on the probe set (module docstring) and return
    the metrics: ``routing/alignment/<name>`` (ā_i), ``routing/weight/<name>`` (w_i), ``routing/alignment_nodes``
    and ``routing/alignment_defined_frac``. ``student``: the current student's language model; ``engine``: a
    rollout engine holding its current weights."""
    a = cfg.routing.alignment
    problems = task.probe_problems(a.n_questions, a.seed)
    prompts = prompt_encoder(cfg)(tokenizer, problems)
    dcfg = probe_config(cfg, teachers.names, step)
    was_training = student.training
    student.eval()
    try:
        diag = Diagnosis(replace(cfg, diagnose=dcfg), tokenizer, student, [], list(range(len(problems))), problems,
                         prompts, engine, stop, cfg.rollout.max_tokens)
        probes = find_nodes(diag, sample_rollouts(diag))
        wins = estimate_q(diag, probes)
        rows = []
        for i, name in enumerate(teachers.names):
            if teachers.models[i] is None:
                raise ValueError(f"routing.rule=alignment needs teacher {name!r} as an HF model (its logits at the "
                                 "probe nodes): set model.teachers.{name}.scorer=hf")
            with teachers.placed(i):
                rows += score_alignment(replace(diag, teachers=[Teacher(name, teachers.models[i], None)]), probes,
                                        wins)
    finally:
        student.train(was_training)
    means, out = [], {}
    defined = [r for r in rows if r["defined"]]
    for name in teachers.names:
        vals = [r["alignment"] for r in defined if r["teacher"] == name and np.isfinite(r["alignment"])]
        means.append(float(np.mean(vals)) if vals else math.nan)
        out[f"routing/alignment/{name}"] = means[-1]
    n_nodes = len(rows) // max(len(teachers.names), 1)
    out["routing/alignment_nodes"] = float(n_nodes)
    out["routing/alignment_defined_frac"] = len(defined) / max(len(rows), 1)
    if any(np.isfinite(m) for m in means):
        teachers.weights = softmax_weights(means, a.temperature)
    out |= {f"routing/weight/{n}": float(w) for n, w in zip(teachers.names, teachers.weights, strict=True)}
    return out
