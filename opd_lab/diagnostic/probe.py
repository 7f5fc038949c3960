"""The diagnostic's phases on loaded models (docs/methods.md, "Diagnostic: gradient alignment"), shared by the
diagnostic app (``python -m opd_lab.diagnose``, which builds the models and writes the tables) and by the
``alignment`` routing rule (which re-weights teachers during training): sample rollouts of held-out questions →
phase 1: nodes and candidates → phase 2: Q by targeted continuations (adaptive) → phase 3: g*, d_t and a_t per
node × teacher × loss. The app's docstring states each quantity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from opd_lab import tasks
from opd_lab.config import Config, DiagnoseConfig
from opd_lab.core.alignment import (
    Teacher,
    choose_nodes,
    cosine,
    distill_gradient,
    head,
    ideal_gradient,
    node_logits,
    q_all_equal,
    response_entropy,
    response_states,
)
from opd_lab.models.token_ids import ends_with_stop
from opd_lab.rollout.base import RolloutBatch, SamplingSpec


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
