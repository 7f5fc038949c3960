"""Per-token OPD losses ℓ_t as pure functions on tensors, selected by name from a registry.

Every loss is registered in :data:`LOSSES` as a :class:`LossSpec`: its per-token function, what it needs scored
(:class:`ScoreNeeds`: ``loss=lsm`` asks for the teacher's top-K support here, nowhere else) and its start-up
checks. Every loss returns ``(loss_B_T, metrics)`` where ``loss_B_T`` is ℓ_t per response position (not yet masked,
gated or averaged) and ``metrics`` maps names to per-token tensors ``_B_T`` that the learner reduces with the
loss mask. The reduction is the learner's job: a gated token-mean Σ m g ℓ / Σ m over the whole optimizer step
(:func:`masked_sum`). Nothing here imports rollout, Hydra or wandb.

Symbols follow docs/methods.md: π_θ (current student), π_old (student at rollout time), q (teacher), S_t (support),
r_t, A_t, ρ_t, ε, c, γ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from opd_lab.common.registry import Registry
from opd_lab.config.base import ConfigError


def at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 if it already is (so float64 gradient checks stay exact)."""
    return x if x.dtype == torch.float64 else x.float()


def masked_sum(values_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """Σ_t m_t v_t over every position (the numerator of the step's token-mean); masked positions contribute an
    exact 0 even where ``v`` is not finite (padding, a zero-weight micro-batch)."""
    return torch.where(mask_B_T.bool(), values_B_T, torch.zeros_like(values_B_T)).sum()


def dedup_mask(ids_B_T_S: torch.Tensor) -> torch.Tensor:
    """1 on the first occurrence of each id along the last dim, 0 on repeats."""
    sorted_ids, order = torch.sort(ids_B_T_S, dim=-1, stable=True)
    first_sorted = torch.ones_like(sorted_ids, dtype=torch.bool)
    first_sorted[..., 1:] = sorted_ids[..., 1:] != sorted_ids[..., :-1]
    keep = torch.empty_like(first_sorted)
    keep.scatter_(-1, order, first_sorted)
    return keep.long()


# ------------------------------------------------------------------------------------ sampled-token OPD
def discounted_returns(r_B_T: torch.Tensor, mask_B_T: torch.Tensor, gamma: float) -> torch.Tensor:
    """A_t = Σ_{t'≥t} γ^{t'−t} r_{t'} over valid positions (masked r_{t'} count as 0); γ = 0 gives A = r."""
    r = r_B_T * mask_B_T.to(r_B_T.dtype)
    if gamma == 0.0:
        return r
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return out


def behaviour_weight(
    prox_logp_B_T: torch.Tensor,
    behaviour_logp_B_T: torch.Tensor,
    off_policy: str,
    is_cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The detached behaviour weight w_t of a stale batch (docs/methods.md, "Staleness corrections").

    With the ratio π_prox(y_t|h_t)/π_b(y_t|h_t) = exp(log π_prox − log π_b) and C = ``is_cap``:
    ``decoupled``: w_t = min(ratio, C) (truncated importance sampling);
    ``masked``: w_t = ratio where 1/C ≤ ratio ≤ C, else 0 (the token is dropped).
    At k = 0 (π_prox = π_b) every w_t is exactly 1. Returns ``(w_B_T, metrics)`` with the per-token metrics
    ``staleness/w_mean``, ``staleness/w_truncated_frac`` and ``staleness/w_dropped_frac``.
    """
    ratio = torch.exp(prox_logp_B_T.detach() - behaviour_logp_B_T.detach())
    if off_policy == "decoupled":
        cut = ratio > is_cap
        w = ratio.clamp(max=is_cap)
        dropped = torch.zeros_like(ratio)
    elif off_policy == "masked":
        cut = torch.zeros_like(ratio, dtype=torch.bool)
        keep = (ratio >= 1.0 / is_cap) & (ratio <= is_cap)
        w = torch.where(keep, ratio, torch.zeros_like(ratio))
        dropped = (~keep).to(ratio.dtype)
    else:
        raise ValueError(f"off_policy={off_policy!r} has no behaviour weight: allowed decoupled, masked")
    return w, {"staleness/w_mean": w, "staleness/w_truncated_frac": cut.to(ratio.dtype),
               "staleness/w_dropped_frac": dropped}


def sampled_token_loss(
    logp_B_T: torch.Tensor,
    old_logp_B_T: torch.Tensor,
    teacher_logp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    clip_eps: float = 0.2,
    dual_clip: float = 3.0,
    gamma: float = 0.0,
    clip_log_ratio: float | None = 5.0,
    prox_logp_B_T: torch.Tensor | None = None,
    reward_reference: str = "behaviour",
    off_policy: str = "none",
    is_cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped sampled-token OPD, with the staleness corrections of docs/methods.md.

    r_t = log q(y_t|h_t) − log π_ref(y_t|h_t) (detached, optionally clamped to ±clip_log_ratio), where π_ref is
    π_b = π_old (``reward_reference='behaviour'``, as published), π_prox (``'proximal'``) or sg(π_θ) (``'current'``,
    recomputed at every update); A_t = Σ_{t'≥t} γ^{t'−t} r_{t'};
    ``off_policy='none'``: ρ_t = exp(log π_θ − log π_b), ℓ_t = −min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t), and for
    A_t < 0: ℓ_t = min(ℓ_t, −c·A_t);
    ``'decoupled'``/``'masked'``: the same with u_t = exp(log π_θ − log π_prox) in ρ_t's place, times the detached
    behaviour weight w_t (:func:`behaviour_weight`).

    Args: ``logp_B_T`` log π_θ(y_t|h_t) (with grad); ``old_logp_B_T`` log π_b (the policy that sampled the batch),
    ``teacher_logp_B_T`` log q, ``prox_logp_B_T`` log π_prox (``None``: π_prox = π_b, a batch sampled by the
    weights at the start of the step), all constants; ``mask_B_T`` m_t.
    """
    old = old_logp_B_T.detach()
    prox = old if prox_logp_B_T is None else prox_logp_B_T.detach()
    reference = {"behaviour": old, "proximal": prox, "current": logp_B_T.detach()}[reward_reference]
    r = teacher_logp_B_T.detach() - reference
    if clip_log_ratio is not None:
        r = r.clamp(-clip_log_ratio, clip_log_ratio)
    adv = discounted_returns(r, mask_B_T, gamma)
    ratio = torch.exp(logp_B_T - (old if off_policy == "none" else prox))
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(pg1, pg2)
    dual = -dual_clip * adv
    use_dual = (adv < 0) & (loss > dual)
    loss = torch.where(use_dual, dual, loss)
    metrics = {
        "ratio_clip_frac": (pg2 > pg1).float().detach(),
        "dual_clip_frac": use_dual.float().detach(),
        "advantage": adv.detach(),
        "log_ratio_teacher_old": r.detach(),
    }
    if off_policy != "none":
        w, w_metrics = behaviour_weight(prox, old, off_policy, is_cap)
        loss, metrics = loss * w, metrics | w_metrics
    return loss, metrics


# ------------------------------------------------------------------------------------------------- LSM
def lsm_loss(
    support_logits_B_T_S: torch.Tensor,
    teacher_support_logp_B_T_S: torch.Tensor,
    support_mask_B_T_S: torch.Tensor,
    student_lse_B_T: torch.Tensor | None = None,
    renormalise: bool = True,
    tail: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reverse KL of student and teacher on the support S_t.

    Renormalised (default): π̂(v) = exp(z_v) / Σ_{u∈S_t} exp(z_u), q̂ likewise, and
    ℓ_t = Σ_{v∈S_t} π̂(v) (log π̂(v) − log q̂(v)); the gradient reaches only the student's logits z at S_t.
    ``renormalise=False`` uses the full-vocabulary π(v) = exp(z_v − lse_t) and q(v) on S_t (an ablation known
    to collapse); ``tail=True`` (with ``renormalise=False``) adds one bucket for the mass outside S_t, giving
    the exact KL of the (|S_t|+1)-bucket coarsening.

    Args:
        support_logits_B_T_S: student logits z (already divided by the rollout temperature) at the ids of
            S_t (with grad).
        teacher_support_logp_B_T_S: log q(v|h_t) at the same ids, normalised over the full vocabulary.
        support_mask_B_T_S: 1 on real support entries, 0 on padding/duplicate entries.
        student_lse_B_T: log Σ_V exp(z) (needed unless renormalising; with grad).
    """
    smask = support_mask_B_T_S.bool()
    z = at_least_f32(support_logits_B_T_S)
    neg_inf = torch.finfo(z.dtype).min
    z = z.masked_fill(~smask, neg_inf)
    q_logp = at_least_f32(teacher_support_logp_B_T_S.detach()).to(z.dtype).masked_fill(~smask, neg_inf)
    q_lse_S = torch.logsumexp(q_logp, dim=-1)
    if renormalise:
        log_pi = torch.log_softmax(z, dim=-1)
        log_q = q_logp - q_lse_S.unsqueeze(-1)
    else:
        if student_lse_B_T is None:
            raise ValueError("lsm_loss with renormalise=False needs student_lse_B_T")
        log_pi = z - at_least_f32(student_lse_B_T).unsqueeze(-1)
        log_q = q_logp
    pi = torch.exp(log_pi) * smask
    loss = (pi * (log_pi - log_q).masked_fill(~smask, 0.0)).sum(-1)
    if tail:
        if student_lse_B_T is None or renormalise:
            raise ValueError("tail=True needs renormalise=False and student_lse_B_T")
        log_pi_in = torch.logsumexp(log_pi, dim=-1)
        log_pi_tail = torch.log(-torch.expm1(log_pi_in.clamp(max=-1e-7)))
        log_q_tail = torch.log(-torch.expm1(q_lse_S.clamp(max=-1e-7)))
        loss = loss + torch.exp(log_pi_tail) * (log_pi_tail - log_q_tail)
    metrics = {"teacher_support_mass": torch.exp(q_lse_S).detach()}
    if student_lse_B_T is not None:
        metrics["student_support_mass"] = torch.exp(
            torch.logsumexp(z.detach(), dim=-1) - student_lse_B_T.detach()
        )
    return loss, metrics


def full_reverse_kl(student_logits_B_T_V: torch.Tensor, teacher_logits_B_T_V: torch.Tensor) -> torch.Tensor:
    """ℓ_t = Σ_v π_θ(v) (log π_θ(v) − log q(v)) over the full vocabulary (diagnostics and small-V tests)."""
    log_pi = torch.log_softmax(at_least_f32(student_logits_B_T_V), dim=-1)
    log_q = torch.log_softmax(at_least_f32(teacher_logits_B_T_V.detach()), dim=-1)
    return (log_pi.exp() * (log_pi - log_q)).sum(-1)


# -------------------------------------------------------------------------------- registry (learner API)
@dataclass(frozen=True)
class ScoreNeeds:
    """What a loss needs scored on each rollout batch before its updates (scoring.py builds exactly this)."""

    teacher_top_k: int = 0  # K of the teacher's top-K ids and log-probs (0: none)
    student_top_k: int = 0  # K of π_old's own top-K ids, scored by the teacher too (student/union support)
    add_sampled_token: bool = False  # y_t joins the support S_t

    @property
    def support(self) -> bool:
        """The loss reads the student's logits at a support S_t."""
        return bool(self.teacher_top_k or self.student_top_k or self.add_sampled_token)


@dataclass(frozen=True)
class PolicyOutputs:
    """What the student's training forward gives a loss for one micro-batch (float32, with grad)."""

    logp_B_T: torch.Tensor  # log π_θ(y_t|h_t)
    lse_B_T: torch.Tensor  # log Σ_V exp(z_t)
    support_logits_B_T_S: torch.Tensor | None = None  # z_t at the support ids S_t


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: ``fn(out, scored, cfg) → (loss_B_T, metrics)`` on a micro-batch (``scored``: the
    :class:`~opd_lab.learner.scoring.ScoredBatch` rows), ``needs(cfg)`` what to score, ``check(cfg, vocab_size)`` the
    start-up checks that need the tokenizer."""

    fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    needs: Callable[..., ScoreNeeds] = lambda cfg: ScoreNeeds()
    check: Callable[..., None] = lambda cfg, vocab_size: None


LOSSES: Registry[LossSpec] = Registry("loss")


def _sampled_token(out: PolicyOutputs, scored, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return sampled_token_loss(out.logp_B_T, scored.old_logp_B_T, scored.teacher_logp_B_T, scored.loss_mask_B_T,
                              cfg.clip_eps, cfg.dual_clip, cfg.gamma, cfg.clip_log_ratio, scored.prox_logp_B_T,
                              cfg.reward_reference.value, cfg.off_policy.value, cfg.is_cap)


def _lsm(out: PolicyOutputs, scored, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LSM's ℓ_t, times the behaviour weight w_t with ``loss.off_policy=decoupled|masked`` (a token-level
    correction: LSM has no ratio, and the prefix h_t stays the behaviour's)."""
    loss, metrics = lsm_loss(out.support_logits_B_T_S, scored.teacher_support_logp_B_T_S, scored.support_mask_B_T_S,
                             out.lse_B_T, cfg.renormalise, cfg.tail)
    if cfg.off_policy.value != "none":
        prox = scored.old_logp_B_T if scored.prox_logp_B_T is None else scored.prox_logp_B_T
        w, w_metrics = behaviour_weight(prox, scored.old_logp_B_T, cfg.off_policy.value, cfg.is_cap)
        loss, metrics = loss * w.to(loss.dtype), metrics | w_metrics
    return loss, metrics


def _lsm_needs(cfg) -> ScoreNeeds:
    """S_t: the teacher's top-K (``support=teacher``), π_old's top-K (``student``) or both (``union``)."""
    support = cfg.support.value
    return ScoreNeeds(teacher_top_k=cfg.top_k if support != "student" else 0,
                      student_top_k=cfg.top_k if support in ("student", "union") else 0,
                      add_sampled_token=cfg.add_sampled_token)


def _lsm_check(cfg, vocab_size: int) -> None:
    if cfg.top_k > vocab_size:
        raise ConfigError(f"loss.top_k={cfg.top_k} is invalid: allowed 1..{vocab_size} (vocabulary size)")


LOSSES.add("sampled_token", LossSpec(_sampled_token))
LOSSES.add("lsm", LossSpec(_lsm, needs=_lsm_needs, check=_lsm_check))
