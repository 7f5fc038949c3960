"""The maths of the gradient-alignment diagnostic (docs/methods.md, "Diagnostic: gradient alignment"), as functions on
tensors: the ideal logit-space gradient g*_t from Q estimates, each loss's distillation gradient d_t by autograd
through the learner's own loss functions, their cosine a_t, node selection and the model reads they need, and the
matched-position comparison of a_t on correct vs incorrect rollouts with its bootstrap over questions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from opd_lab.common.registry import Registry
from opd_lab.config import SampledTokenLossConfig
from opd_lab.core.losses import full_reverse_kl, lsm_loss, sampled_token_loss


def q_all_equal(q_cand, q_rest: float | None = None) -> bool:
    """Whether every Q(h_t, v) estimate (and Q(h_t, R) when given) is equal: then g*_t = 0 and a_t is undefined."""
    qs = [float(q) for q in q_cand] + ([float(q_rest)] if q_rest is not None else [])
    return len(set(qs)) <= 1


def ideal_gradient(pi_V: torch.Tensor, cand_ids: torch.Tensor, q_cand: torch.Tensor, rest: str,
                   q_rest: float | None = None) -> tuple[torch.Tensor, float]:
    """g*_t ``[V]`` and V(h_t) from the student's probabilities ``pi_V`` and Q at the candidate ids.

    ``rest="drop"``: π restricted to the candidates and renormalised, g* = 0 elsewhere.
    ``rest="share"``: every non-candidate token takes Q = ``q_rest``.

    Where every Q estimate is equal (all 0, or all 1; under ``share`` the rest estimate counts too), g*_t = 0
    exactly and V(h_t) is that Q: computing π·(Q − V) would leave float-rounding noise, a spurious direction.
    """
    if rest not in ("drop", "share"):
        raise ValueError(f"rest={rest!r}: allowed drop, share")
    if rest == "share" and q_rest is None:
        raise ValueError("rest='share' needs q_rest")
    if q_all_equal(q_cand.tolist(), q_rest if rest == "share" else None):
        return torch.zeros(pi_V.shape, dtype=torch.float32), float(q_cand.double()[0])
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
    else:
        q_full[~in_c] = q_rest
        value = float((pi * q_full).sum())
        g = pi * (q_full - value)
    return g.float(), value


def _matched_delta(w_B_Q: np.ndarray, cnt_Q_S_P: np.ndarray, tot_Q_S_P: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Δ of :func:`matched_difference` for each row b of question weights ``w_B_Q`` (1: the data, counts: a bootstrap
    resample), from the per question × split (correct, incorrect) × position node counts and a_t sums; also which
    positions both splits have and the weighted counts."""
    n = np.einsum("bq,qsp->bsp", w_B_Q, cnt_Q_S_P)
    s = np.einsum("bq,qsp->bsp", w_B_Q, tot_Q_S_P)
    both = (n[:, 0] > 0) & (n[:, 1] > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.where(both, s[:, 1] / n[:, 1] - s[:, 0] / n[:, 0], 0.0)
    w = np.where(both, np.minimum(n[:, 0], n[:, 1]), 0.0)
    den = w.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (w * diff).sum(-1) / den, math.nan), both, n


def matched_difference(question, position, correct, alignment, n_boot: int = 2000, seed: int = 0) -> dict:
    """a_t on incorrect minus correct rollouts at matched positions t, with a 95% bootstrap CI over questions.

    Inputs are parallel sequences, one entry per node (one teacher × loss): the question x, the (binned) response
    position t, whether the rollout was correct, and a_t (NaN where undefined: those nodes are left out). With
    n_t^inc, n_t^cor the numbers of defined nodes at t and ā_t^inc, ā_t^cor their mean a_t, over the positions
    present in both splits

        Δ = Σ_t w_t (ā_t^inc − ā_t^cor) / Σ_t w_t,   w_t = min(n_t^cor, n_t^inc),

    so that late nodes (mostly of failing rollouts) are never compared with early ones. Nodes of one question are
    correlated, so the CI resamples questions with replacement (``n_boot`` times, ``numpy.random.default_rng(seed)``;
    a question drawn k times contributes its nodes k times), recomputes Δ, and takes the 2.5/97.5 percentiles of the
    resamples where Δ is defined.

    Returns ``matched_diff`` (Δ), ``ci95_low``, ``ci95_high``, ``positions`` (matched positions), ``nodes_correct``
    and ``nodes_incorrect`` (defined nodes at matched positions), ``questions`` (with a defined node),
    ``unmatched_diff`` (mean a_t incorrect − correct over all defined nodes, for contrast) and ``bootstrap`` (the
    resamples with a defined Δ).
    """
    a = np.asarray(alignment, dtype=float)
    keep = np.isfinite(a)
    a, q = a[keep], np.asarray(question)[keep]
    pos, inc = np.asarray(position)[keep], ~np.asarray(correct, dtype=bool)[keep]
    out = {"matched_diff": math.nan, "ci95_low": math.nan, "ci95_high": math.nan, "positions": 0,
           "nodes_correct": 0, "nodes_incorrect": 0, "questions": int(len(np.unique(q))),
           "unmatched_diff": float(a[inc].mean() - a[~inc].mean()) if inc.any() and (~inc).any() else math.nan,
           "bootstrap": 0}
    if not (inc.any() and (~inc).any()):
        return out
    _, qi = np.unique(q, return_inverse=True)
    _, pi = np.unique(pos, return_inverse=True)
    n_q, n_p = int(qi.max()) + 1, int(pi.max()) + 1
    cnt, tot = np.zeros((n_q, 2, n_p)), np.zeros((n_q, 2, n_p))  # split 0: correct, 1: incorrect
    np.add.at(cnt, (qi, inc.astype(int), pi), 1.0)
    np.add.at(tot, (qi, inc.astype(int), pi), a)

    d0, both, n = _matched_delta(np.ones((1, n_q)), cnt, tot)
    out.update(matched_diff=float(d0[0]), positions=int(both[0].sum()),
               nodes_correct=int(n[0, 0][both[0]].sum()), nodes_incorrect=int(n[0, 1][both[0]].sum()))
    if not both[0].any():
        return out
    draws = np.random.default_rng(seed).integers(0, n_q, size=(n_boot, n_q))
    w = np.zeros((n_boot, n_q))
    np.add.at(w, (np.repeat(np.arange(n_boot), n_q), draws.ravel()), 1.0)
    boot = _matched_delta(w, cnt, tot)[0]
    boot = boot[np.isfinite(boot)]
    if len(boot):
        lo, hi = np.percentile(boot, [2.5, 97.5])
        out.update(ci95_low=float(lo), ci95_high=float(hi), bootstrap=int(len(boot)))
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b); NaN when either is the zero vector."""
    na, nb = float(a.double().norm()), float(b.double().norm())
    if na == 0.0 or nb == 0.0:
        return math.nan
    return float((a.double() @ b.double()) / (na * nb))


def _sampled_token_node(z: torch.Tensor, logq: torch.Tensor, token: int, top_k: int) -> torch.Tensor:
    """ℓ_t of :func:`~opd_lab.core.losses.sampled_token_loss` at π_θ = π_old (first pass), with the one-token advantage
    r_t = log q(y_t) − log π(y_t) (γ = 0)."""
    logp = torch.log_softmax(z, -1)[token]
    cfg = SampledTokenLossConfig()
    ell, _ = sampled_token_loss(logp.view(1, 1), logp.detach().view(1, 1), logq[token].view(1, 1), torch.ones(1, 1),
                                cfg.clip_eps, cfg.dual_clip, 0.0, cfg.clip_log_ratio)
    return ell


def _lsm_node(z: torch.Tensor, logq: torch.Tensor, token: int, top_k: int) -> torch.Tensor:
    """ℓ_t of :func:`~opd_lab.core.losses.lsm_loss` on the teacher's top-K support (renormalised)."""
    support = torch.topk(logq, min(top_k, logq.numel())).indices
    ell, _ = lsm_loss(z[support].view(1, 1, -1), logq[support].view(1, 1, -1), torch.ones(1, 1, support.numel()),
                      renormalise=True)
    return ell


def _full_rkl_node(z: torch.Tensor, logq: torch.Tensor, token: int, top_k: int) -> torch.Tensor:
    """ℓ_t of :func:`~opd_lab.core.losses.full_reverse_kl` over the whole vocabulary."""
    return full_reverse_kl(z.view(1, 1, -1), logq.view(1, 1, -1))


# the diagnostic's losses: name → ℓ_t(z_V, log q_V, y_t, K) at one node (names: config.DIAGNOSTIC_LOSS_NAMES)
DIAGNOSTIC_LOSSES: Registry = Registry("diagnostic loss")
DIAGNOSTIC_LOSSES.add("sampled_token", _sampled_token_node)
DIAGNOSTIC_LOSSES.add("lsm", _lsm_node)
DIAGNOSTIC_LOSSES.add("full_rkl", _full_rkl_node)


def distill_gradient(loss: str, z_V: torch.Tensor, teacher_logp_V: torch.Tensor, token: int,
                     top_k: int = 32) -> torch.Tensor:
    """d_t = −∂ℓ_t/∂z_t ``[V]`` at one node, by autograd through the loss functions the learner uses
    (:data:`DIAGNOSTIC_LOSSES`)."""
    z = z_V.detach().double().clone().requires_grad_(True)
    ell = DIAGNOSTIC_LOSSES.get(loss)(z, teacher_logp_V.detach().double(), token, top_k)
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
