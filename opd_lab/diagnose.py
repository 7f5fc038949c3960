"""``python -m opd_lab.diagnose``: training-free gradient alignment of distillation signals (METHODS.md,
"Diagnostic: gradient alignment").

For a question x, a student rollout y and a node h_t (a response position chosen every k tokens or by entropy):

- Q(h_t, v): the probability that the student solves x continuing from h_t·v, estimated by M continuations per
  candidate token v, each with the rollout's remaining token budget; an end-of-response candidate (a stop id)
  ends the response, so its Q is the grade of the prefix itself. Candidates C_t: the student's top-m tokens
  plus the sampled token y_t. The remaining
  vocabulary R_t is either dropped (``rest=drop``: π restricted to C_t and renormalised, g* = 0 on R_t) or shares
  one estimate Q(h_t, R) from M continuations whose first token is drawn from π restricted to R_t (``rest=share``).
- V(h_t) = Σ_v π_θ(v|h_t) Q(h_t, v) and the ideal logit-space gradient g*_t(v) = π_θ(v|h_t)(Q(h_t, v) − V(h_t)),
  the steepest-ascent direction of P(success) with respect to the logits z_t at that node.
- The distillation gradient d_t = −∂ℓ_t/∂z_t of each loss (sampled-token, LSM, full reverse KL) against each
  teacher (a model, or the student itself given a different context such as the reference answer).
- a_t = cos(d_t, g*_t) (undefined, NaN, when either vector is zero, e.g. all Q equal).

Outputs in the run directory: ``nodes.csv`` (one row per question × rollout × node × teacher × loss),
``summary.csv``/``summary.md`` (per teacher and loss, split by correct/incorrect rollouts, mean with 95% CI) and
``alignment_by_position.png``, ``alignment_correct_vs_incorrect.png``.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from opd_lab.config import Config, ConfigError, DiagnoseConfig, SampledTokenLossConfig
from opd_lab.jobs import CONF_DIR
from opd_lab.losses import full_reverse_kl, lsm_loss, sampled_token_loss
from opd_lab.rollout.base import SamplingSpec
from opd_lab.stats import mean_ci95

LOSSES = ("sampled_token", "lsm", "full_rkl")


# ------------------------------------------------------------------------------------------------- maths
def ideal_gradient(pi_V: torch.Tensor, cand_ids: torch.Tensor, q_cand: torch.Tensor, rest: str,
                   q_rest: float | None = None) -> tuple[torch.Tensor, float]:
    """g*_t ``[V]`` and V(h_t) from the student's probabilities ``pi_V`` and Q at the candidate ids.

    ``rest="drop"``: π restricted to the candidates and renormalised, g* = 0 elsewhere.
    ``rest="share"``: every non-candidate token takes Q = ``q_rest``.
    """
    pi = pi_V.double()
    q_full = torch.full_like(pi, float("nan"))
    q_full[cand_ids] = q_cand.double()
    in_c = torch.zeros_like(pi, dtype=torch.bool)
    in_c[cand_ids] = True
    if rest == "drop":
        p = torch.where(in_c, pi, torch.zeros_like(pi))
        p = p / p.sum()
        value = float((p[in_c] * q_full[in_c]).sum())
        g = torch.where(in_c, p * (torch.nan_to_num(q_full) - value), torch.zeros_like(pi))
    elif rest == "share":
        if q_rest is None:
            raise ValueError("rest='share' needs q_rest")
        q_full[~in_c] = q_rest
        value = float((pi * q_full).sum())
        g = pi * (q_full - value)
    else:
        raise ValueError(f"rest={rest!r}: allowed drop, share")
    return g.float(), value


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b); NaN when either is the zero vector."""
    na, nb = float(a.double().norm()), float(b.double().norm())
    if na == 0.0 or nb == 0.0:
        return math.nan
    return float((a.double() @ b.double()) / (na * nb))


def distill_gradient(loss: str, z_V: torch.Tensor, teacher_logp_V: torch.Tensor, token: int,
                     top_k: int = 32) -> torch.Tensor:
    """d_t = −∂ℓ_t/∂z_t ``[V]`` at one node, by autograd through the loss functions the learner uses.

    ``sampled_token``: ℓ_t of :func:`~opd_lab.losses.sampled_token_loss` at π_θ = π_old (first pass), with the
    one-token advantage r_t = log q(y_t) − log π(y_t) (γ = 0); ``lsm``: :func:`~opd_lab.losses.lsm_loss` on the
    teacher's top-K support (renormalised); ``full_rkl``: :func:`~opd_lab.losses.full_reverse_kl`.
    """
    z = z_V.detach().double().clone().requires_grad_(True)
    logq = teacher_logp_V.detach().double()
    if loss == "sampled_token":
        logp = torch.log_softmax(z, -1)[token]
        old = logp.detach()
        cfg = SampledTokenLossConfig()
        ell, _ = sampled_token_loss(logp.view(1, 1), old.view(1, 1), logq[token].view(1, 1), torch.ones(1, 1),
                                    cfg.clip_eps, cfg.dual_clip, 0.0, cfg.clip_log_ratio)
    elif loss == "lsm":
        support = torch.topk(logq, min(top_k, logq.numel())).indices
        ell, _ = lsm_loss(z[support].view(1, 1, -1), logq[support].view(1, 1, -1),
                          torch.ones(1, 1, support.numel()), renormalise=True)
    elif loss == "full_rkl":
        ell = full_reverse_kl(z.view(1, 1, -1), logq.view(1, 1, -1))
    else:
        raise ValueError(f"unknown loss {loss!r}; available: {LOSSES}")
    (grad,) = torch.autograd.grad(ell.sum(), z)
    return (-grad).float()


def entropy(logits_N_V: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits_N_V.double(), -1)
    return -(logp.exp() * logp).sum(-1).float()


def choose_nodes(ent_T: torch.Tensor, mode: str, every_k: int, max_nodes: int) -> list[int]:
    """Response positions to probe: every k-th (0, k, 2k, …) or the highest-entropy ones, at most ``max_nodes``,
    never the last position (a node needs a continuation)."""
    T = ent_T.numel() - 1
    if T <= 0:
        return []
    if mode == "every_k":
        return list(range(0, T, every_k))[:max_nodes]
    top = torch.topk(ent_T[:T], min(max_nodes, T)).indices
    return sorted(top.tolist())


# ------------------------------------------------------------------------------------------------ models
def response_states(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """Final hidden states ``[T, H]`` at the nodes h_t that predict response tokens t = 0 … T−1."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + response_ids[:-1]], device=device)
    with torch.no_grad():
        return model.base_model(input_ids=ids).last_hidden_state[0, len(prompt_ids) - 1 :]


def head(model, h_N_H: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[N, V]`` (on the CPU) of hidden states ``h_N_H``."""
    with torch.no_grad():
        return (h_N_H.float() @ model.get_output_embeddings().weight.float().T).cpu()


def node_logits(model, prompt_ids: list[int], response_ids: list[int], positions: list[int]) -> torch.Tensor:
    """Float32 logits ``[N, V]`` predicting response token t (the node h_t) for each t in ``positions``."""
    return head(model, response_states(model, prompt_ids, response_ids)[positions])


def response_entropy(model, h_T_H: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Entropy ``[T]`` of π_θ(·|h_t) at every node, ``chunk`` positions at a time (never a [T, V] tensor)."""
    return torch.cat([entropy(head(model, h_T_H[i : i + chunk])) for i in range(0, h_T_H.shape[0], chunk)])


@dataclass
class Teacher:
    name: str
    model: torch.nn.Module
    context: str | None

    def prompt(self, tokenizer, problem, encode) -> list[int]:
        """The teacher's prompt: the student's, with ``context`` (filled in) as the system message when set."""
        if not self.context:
            return encode(tokenizer, [problem])[0]
        system = self.context.format(answer=problem.answer, question=problem.question)
        return encode(tokenizer, [problem], system_prompt=system)[0]


# --------------------------------------------------------------------------------------------------- run
def run(cfg: Config, run_dir: Path) -> pd.DataFrame:
    from tqdm.auto import tqdm

    from opd_lab.models import check_same_vocab, load_model, load_tokenizer, loading, resolve_paths
    from opd_lab.runtime import make_engine, seed_everything
    from opd_lab.tasks import build_task, grade, prompt_encoder
    from opd_lab.tokens import ends_with_stop, stop_token_ids

    d: DiagnoseConfig = cfg.diagnose
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(d.seed)
    task = build_task(cfg.task)
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
    encode = prompt_encoder(cfg)
    prompts = encode(tokenizer, problems)

    stop = stop_token_ids(tokenizer, paths.student)
    engine = make_engine(cfg, student, tokenizer, paths.student, stop)
    max_tokens = d.max_tokens or cfg.rollout.max_tokens
    try:
        rollouts = engine.generate(prompts, SamplingSpec(n=d.rollouts_per_question, temperature=1.0, top_p=1.0,
                                                         max_tokens=max_tokens, seed=d.seed))
        n_cand = d.top_m + 1 + (1 if d.rest.value == "share" else 0)
        mean_len = float(rollouts.response_mask_B_T.sum(-1).float().mean())
        nodes_per = d.max_nodes if d.node_mode == "top_entropy" else min(d.max_nodes, math.ceil(mean_len / d.every_k))
        n_cont = rollouts.size * nodes_per * n_cand * d.continuations
        print(f"opd-lab diagnose: {len(problems)} questions × {d.rollouts_per_question} rollouts × ≤{nodes_per} "
              f"nodes × ≤{n_cand} candidates × M={d.continuations} = up to {n_cont} continuations "
              f"(~{n_cont * mean_len / 2:,.0f} tokens at half the mean response length {mean_len:.0f})",
              flush=True)
        # Phase 1: nodes and candidates of every rollout (student forward only).
        probes = []  # per rollout: (b, j, resp, correct, nodes, z_nodes, pi_nodes, ent, cands, rest_first)
        gen = torch.Generator().manual_seed(d.seed * 7919)
        for b in range(rollouts.size):
            j = int(rollouts.prompt_index_B[b])
            resp = rollouts.response_ids_B_T[b][rollouts.response_mask_B_T[b].bool()].tolist()
            if len(resp) < 2:
                continue
            correct = (not bool(rollouts.truncated_B[b])) and grade(rollouts.response_text[b], problems[j])
            h = response_states(student, prompts[j], resp)
            ent = response_entropy(student, h)
            nodes = choose_nodes(ent, d.node_mode, d.every_k, d.max_nodes)
            z = head(student, h[nodes])
            pi = torch.softmax(z.double(), -1).float()
            cands, rest_first = [], []
            for i, t in enumerate(nodes):
                c = list(dict.fromkeys(torch.topk(pi[i], d.top_m).indices.tolist() + [resp[t]]))
                cands.append(c)
                if d.rest.value == "share":
                    w = pi[i].clone()
                    w[c] = 0
                    rest_first.append([int(torch.multinomial(w, 1, generator=gen)) if float(w.sum()) > 0 else c[0]
                                       for _ in range(d.continuations)])
            probes.append((b, j, resp, correct, nodes, z, pi, ent, cands, rest_first))

        # Phase 2: all targeted continuations, in engine-sized chunks (M per candidate; one per rest token). The
        # shared prefixes are served from the engine's prefix cache on vLLM.
        M = d.continuations
        jobs = []  # (probe index, node index, candidate token or None for the rest, first token, n samples)
        for p_i, probe in enumerate(probes):
            cands, rest_first = probe[8], probe[9]
            for i in range(len(probe[4])):
                jobs += [(p_i, i, v, v, M) for v in cands[i]]
                if d.rest.value == "share":
                    jobs += [(p_i, i, None, v, 1) for v in rest_first[i]]
        wins: dict[tuple, list[float]] = {}
        for p_i, i, v, first, n in jobs:  # an end-of-response first token ends the response: its own grade
            if first in stop:
                _, j, resp, _, nodes = probes[p_i][:5]
                text = tokenizer.decode(resp[: nodes[i]] + [first], skip_special_tokens=False)
                wins.setdefault((p_i, i, v), []).extend([float(grade(text, problems[j]))] * n)
        jobs = [job for job in jobs if job[3] not in stop]
        for n in sorted({job[4] for job in jobs}):
            todo = [job for job in jobs if job[4] == n]
            bar = tqdm(range(0, len(todo), d.chunk), desc=f"continuations (n={n})",
                       disable=not cfg.logger.progress, dynamic_ncols=True)
            for start in bar:
                chunk = todo[start : start + d.chunk]
                ps, budgets = [], []
                for p_i, i, _, first, _ in chunk:
                    _, j, resp, _, nodes = probes[p_i][:5]
                    ps.append(prompts[j] + resp[: nodes[i]] + [first])
                    budgets.append(max_tokens - nodes[i] - 1)  # the rollout's remaining token budget
                if max(budgets) < 1:
                    out = None
                else:
                    out = engine.generate(ps, SamplingSpec(n, 1.0, 1.0, max(budgets), d.seed * 1_000_003 + start))
                for c_i, (p_i, i, v, first, _) in enumerate(chunk):
                    _, j, resp, _, nodes = probes[p_i][:5]
                    pre = resp[: nodes[i]] + [first]
                    for s_i in range(n):
                        k = c_i * n + s_i
                        cont = [] if out is None else \
                            out.response_ids_B_T[k][out.response_mask_B_T[k].bool()].tolist()[: budgets[c_i]]
                        ok = ends_with_stop(pre + cont, stop) and grade(
                            tokenizer.decode(pre + cont, skip_special_tokens=False), problems[j])
                        wins.setdefault((p_i, i, v), []).append(float(ok))

        # Phase 3: Q, g*, teacher scores, d_t and a_t per node × teacher × loss.
        rows = []
        for p_i, (b, j, resp, correct, nodes, z, pi, ent, cands, _) in enumerate(probes):
            prob = problems[j]
            teacher_logp = {}
            for tch in teachers:
                tz = node_logits(tch.model, tch.prompt(tokenizer, prob, encode), resp, nodes)
                teacher_logp[tch.name] = torch.log_softmax(tz.double(), -1).float()
            for i, t in enumerate(nodes):
                c = cands[i]
                q_t = torch.tensor([float(np.mean(wins[(p_i, i, v)])) for v in c])
                q_rest = float(np.mean(wins[(p_i, i, None)])) if d.rest.value == "share" else None
                g_star, value = ideal_gradient(pi[i], torch.tensor(c), q_t, d.rest.value, q_rest)
                se = torch.sqrt(q_t * (1 - q_t) / M)
                for tch in teachers:
                    for loss in d.losses:
                        dt = distill_gradient(loss, z[i], teacher_logp[tch.name][i], resp[t], top_k=d.lsm_top_k)
                        rows.append({
                            "question": qids[j], "rollout": b, "correct": correct, "position": t,
                            "rel_position": t / len(resp), "entropy": float(ent[t]), "teacher": tch.name,
                            "loss": loss, "alignment": cosine(dt, g_star), "g_star_norm": float(g_star.norm()),
                            "d_norm": float(dt.norm()), "value": value, "n_candidates": len(c),
                            "q_min": float(q_t.min()), "q_max": float(q_t.max()), "q_se_mean": float(se.mean()),
                            "q_se_max": float(se.max()), "q_rest": q_rest,
                            "sampled_token_q": float(q_t[c.index(resp[t])]),
                        })
    finally:
        engine.close()
    df = pd.DataFrame(rows)
    write_outputs(df, Path(d.out_dir) if d.out_dir else run_dir)
    return df


# ------------------------------------------------------------------------------------------------ outputs
def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per teacher × loss × (all / correct / incorrect rollouts): mean alignment with a 95% CI over nodes,
    plus the per-question mean (each question weighted once) and how many nodes had no defined alignment."""
    out = []
    for (teacher, loss), g in df.groupby(["teacher", "loss"], sort=False):
        for split, part in (("all", g), ("correct", g[g["correct"]]), ("incorrect", g[~g["correct"]])):
            mean, std, ci, n = mean_ci95(part["alignment"].tolist())
            per_q = part.groupby("question")["alignment"].mean().dropna()
            qm, _, qci, qn = mean_ci95(per_q.tolist())
            out.append({"teacher": teacher, "loss": loss, "rollouts": split, "nodes": n,
                        "undefined": int(part["alignment"].isna().sum()), "alignment_mean": mean,
                        "alignment_std": std, "alignment_ci95": ci, "questions": qn,
                        "per_question_mean": qm, "per_question_ci95": qci})
    return pd.DataFrame(out)


def write_outputs(df: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "nodes.csv", index=False)
    summary = summarise(df) if len(df) else pd.DataFrame()
    summary.to_csv(out / "summary.csv", index=False)
    lines = ["| teacher | loss | rollouts | nodes | mean a_t ± 95% CI | per-question mean ± CI | undefined |",
             "|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        lines.append(f"| {r['teacher']} | {r['loss']} | {r['rollouts']} | {r['nodes']} | "
                     f"{r['alignment_mean']:.3f} ± {r['alignment_ci95']:.3f} | "
                     f"{r['per_question_mean']:.3f} ± {r['per_question_ci95']:.3f} | {r['undefined']} |")
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
