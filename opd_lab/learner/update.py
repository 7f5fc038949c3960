"""One step's optimisation: R passes of AdamW updates over a scored rollout batch (docs/methods.md, "Rollout reuse").

One optimizer update (:func:`optimizer_update`) minimises the gated token-mean over its whole mini-batch

    loss = Σ m ĝ ℓ / Σ m,   ĝ = normalise_gates(exp(−τ(|m_G| − c)))   (c, Σ m g, Σ m over the whole update)

Each micro-batch computes the current log-probs, the drift δ_t = log π_θ − log π_old, the group drifts m_G and
the per-token loss ℓ_t, and back-propagates its share Σ m ĝ ℓ / Σ m. The shift c and the gate mean are scalars
of the whole update (every micro-batch of the mini-batch on every rank): with one micro-batch per rank they come
from that forward (two scalar all-reduces), with several a no-grad pre-pass computes them first. So the update
does not depend on how the mini-batch is split into micro-batches or ranks.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from opd_lab.common.distributed import SINGLE, Dist, grad_sync
from opd_lab.config import Config
from opd_lab.core.gates import (
    POSITION_BLOCK,
    group_drift,
    min_abs_drift,
    normalise_gates,
    position_block_sums,
    shifted_gate,
)
from opd_lab.core.losses import LOSSES, masked_sum
from opd_lab.learner.heads import as_policy
from opd_lab.learner.scoring import ScoredBatch, policy_forward


# --------------------------------------------------------------------------------------------------- plan
def update_plan(cfg: Config, step: int, local_rows: int, dist: Dist = SINGLE) -> list[list[torch.Tensor]]:
    """The mini-batches of every pass over a step's rollout batch: ``plan[r][u]`` are this rank's rows of update u
    of pass r (one permutation of the global batch per pass, seeded by the step, so any rank count takes the
    same sequences; W equal, contiguous rank shards of ``local_rows`` rows)."""
    lo = dist.rank * local_rows
    gen = torch.Generator().manual_seed(cfg.trainer.seed * 1_000_003 + step)
    plan = []
    for _ in range(cfg.rollout.reuse):
        perm = torch.randperm(local_rows * dist.world, generator=gen)
        plan.append([mb[(mb >= lo) & (mb < lo + local_rows)] - lo for mb in perm.split(cfg.rollout.mini_batch_size)])
    return plan


def micro_batches(idx: torch.Tensor, grad_accum: int, dist: Dist) -> list[torch.Tensor | None]:
    """This rank's rows ``idx`` in ≤ ``grad_accum`` micro-batches, padded with ``None`` (a zero-weight micro-batch)
    to the largest count on any rank: every rank runs as many forward/backward passes (FSDP2 gathers in each)."""
    micro: list[torch.Tensor | None] = [m for m in torch.tensor_split(idx, grad_accum) if m.numel() > 0]
    n = int(dist.max(len(micro))[0])
    return micro + [None] * (n - len(micro))


def _micro_of(cfg: Config, mini_batches: list[torch.Tensor], dist: Dist) -> list[torch.Tensor | None]:
    """The micro-batches of ``mini_batches``, in order."""
    return [m for mb in mini_batches for m in micro_batches(mb, cfg.trainer.grad_accum, dist)]


def old_scoring_plan(cfg: Config, step: int, local_rows: int, current: bool, dist: Dist = SINGLE):
    """``(micro_batches, deferred_rows)`` for :func:`~opd_lab.learner.scoring.score_batch`: when the batch was sampled
    by the current policy (``current``), the first update's rows are deferred (its own forward gives their π_old, bit
    for bit what the scoring pass would) and only the later mini-batches of the first pass are scored; a stale batch
    (rollout.staleness) is scored whole by the policy that sampled it. The same deferred plan scores π_prox of a
    stale batch (:func:`~opd_lab.learner.scoring.score_proximal`, :func:`proximal_plan`)."""
    first = update_plan(cfg, step, local_rows, dist)[0]
    if not current:
        return _micro_of(cfg, first, dist), None
    return _micro_of(cfg, first[1:], dist), first[0]


def needs_proximal(cfg: Config) -> bool:
    """Whether the loss or the gate reads π_prox (docs/methods.md, "Staleness corrections"): an off-policy correction,
    ``loss.reward_reference=proximal`` or ``gate.reference=proximal``."""
    reward = getattr(cfg.loss, "reward_reference", None)
    return (cfg.loss.off_policy.value != "none" or cfg.gate.reference.value == "proximal"
            or (reward is not None and reward.value == "proximal"))


def proximal_plan(cfg: Config, step: int, local_rows: int, current: bool, dist: Dist = SINGLE):
    """``(micro_batches, deferred_rows)`` of π_prox for a stale batch whose loss or gate needs it, else ``None``
    (a batch sampled by the current weights has π_prox = π_b)."""
    if current or not needs_proximal(cfg):
        return None
    return old_scoring_plan(cfg, step, local_rows, True, dist)


def _rows(scored: ScoredBatch, m: torch.Tensor | None, device) -> ScoredBatch:
    """Rows ``m`` on ``device``; ``None`` is a zero-weight micro-batch (local row 0, no valid token)."""
    return scored.select(m, device) if m is not None else scored.select(torch.zeros(1, dtype=torch.long),
                                                                        device).without_loss()


# ------------------------------------------------------------------------------------------------ one update
def micro_batch_loss(cfg: Config, policy, mb: ScoredBatch, scored: ScoredBatch | None = None,
                     idx: torch.Tensor | None = None):
    """Forward one micro-batch: per-token loss ℓ_t, loss metrics, the policy outputs and the drift
    ``(δ_B_T, m_G_B_T, cancel_B_T)`` (detached). Rows whose π_old is pending take it from this forward
    (``scored``/``idx``: the batch and rows ``mb`` was selected from; :meth:`ScoredBatch.take_pending`)."""
    out = policy_forward(cfg, policy, mb)
    if scored is not None:
        scored.take_pending(idx, mb, out.logp_B_T)
    loss_B_T, metrics = LOSSES.get(cfg.loss.name).fn(out, mb, cfg.loss)
    return loss_B_T, metrics, out, _drift(cfg, out.logp_B_T, mb)


def _drift(cfg: Config, logp_B_T: torch.Tensor, mb: ScoredBatch):
    """δ_t = log π_θ − log π_b (logged as the drift) and the group drifts m_G of the δ the gate sees
    (``gate.reference``: π_b, or π_prox for drift within the step only; the same at k = 0)."""
    delta = (logp_B_T - mb.old_logp_B_T).detach()
    gate_delta = delta
    if cfg.gate.reference.value == "proximal" and mb.prox_logp_B_T is not None:
        gate_delta = (logp_B_T - mb.prox_logp_B_T).detach()
    m_G, cancel = group_drift(gate_delta, mb.loss_mask_B_T, mb.response_mask_B_T.to(delta.device),
                              cfg.gate.kind, cfg.gate.block_size, mb.newline_B_T, cfg.gate.reduce)
    return delta, m_G, cancel


def gate_normaliser(cfg: Config, parts: list[tuple[torch.Tensor, torch.Tensor]], dist: Dist) -> tuple[float, float]:
    """The shift c = min |m_G| and the mean Σ m g / Σ m of the shift-stable raw gates over the whole update, from
    the ``(m_G_B_T, loss_mask_B_T)`` of each of this rank's micro-batches (two scalar all-reduces)."""
    shift = dist.min(min((min_abs_drift(m_G, mask) for m_G, mask in parts), default=math.inf))[0]
    z, n = dist.sum(sum(float(masked_sum(shifted_gate(m_G, mask, cfg.gate.tau, shift), mask)) for m_G, mask in parts),
                    sum(float(mask.sum()) for _, mask in parts))
    return shift, z / max(n, 1.0)


def _prepass_normaliser(cfg: Config, policy, scored: ScoredBatch, idx: list[torch.Tensor | None],
                        micro: list[ScoredBatch], dist: Dist) -> tuple[float, float]:
    """Several micro-batches: the update's gate normaliser from a no-grad forward of each, before any backward."""
    parts = []
    with torch.no_grad():
        for m, mb in zip(idx, micro, strict=True):
            logp = policy_forward(cfg, policy, mb).logp_B_T
            scored.take_pending(m, mb, logp)
            parts.append((_drift(cfg, logp, mb)[1], mb.loss_mask_B_T))
    return gate_normaliser(cfg, parts, dist)


def optimizer_update(cfg: Config, policy, optimizer, scored: ScoredBatch, idx: torch.Tensor,
                     dist: Dist = SINGLE) -> dict[str, float]:
    """One AdamW update on this rank's mini-batch rows ``idx`` (``trainer.grad_accum`` micro-batches; module
    docstring). Each micro-batch back-propagates Σ m ĝ ℓ · W / N with N = Σ_ranks Σ m (DDP/FSDP2 average the
    gradients over the W ranks); a non-finite loss or gradient norm skips the update (weights and Adam moments
    untouched)."""
    policy = as_policy(policy)
    device = next(policy.parameters()).device
    micro_idx = micro_batches(idx, cfg.trainer.grad_accum, dist)
    micro = [_rows(scored, m, device) for m in micro_idx]
    gated = cfg.gate.kind != "none"
    n_valid = dist.sum(sum(float(mb.loss_mask_B_T.sum()) for mb in micro))[0]
    norm = _prepass_normaliser(cfg, policy, scored, micro_idx, micro, dist) if gated and len(micro) > 1 else None
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = defaultdict(float)
    gates = []
    n_blocks = -(-cfg.rollout.max_tokens // POSITION_BLOCK)
    by_pos = {"drift": torch.zeros(n_blocks, dtype=torch.float64), "gate": torch.zeros(n_blocks, dtype=torch.float64),
              "n": torch.zeros(n_blocks, dtype=torch.float64)}
    for i, (m, mb) in enumerate(zip(micro_idx, micro, strict=True)):
        with grad_sync(policy, i == len(micro) - 1):
            loss_B_T, metrics, _, (delta, m_G, cancel) = micro_batch_loss(cfg, policy, mb, scored, m)
            mask = mb.loss_mask_B_T
            g = torch.ones_like(delta)
            if gated:
                shift, mean = norm if norm is not None else gate_normaliser(cfg, [(m_G, mask)], dist)
                g = normalise_gates(shifted_gate(m_G, mask, cfg.gate.tau, shift), mask, cfg.gate.clip_min,
                                    cfg.gate.clip_max, mean)
            (masked_sum(loss_B_T * g, mask) * (dist.world / max(n_valid, 1.0))).backward()
        per_token = {"loss": loss_B_T.detach() * g, "ungated_loss": loss_B_T.detach(), "abs_delta": delta.abs(),
                     "cancel": cancel, **metrics, **routed_loss_terms(mb, loss_B_T.detach() * g)}
        for k, v in per_token.items():
            sums[k] += float(masked_sum(v, mask))
        gates.append(g.detach()[mask.bool()])
        block_sums, counts = position_block_sums({"drift": delta.abs(), "gate": g}, mask,
                                                 mb.response_mask_B_T.to(delta.device), n_blocks)
        for k, v in (*block_sums.items(), ("n", counts)):
            by_pos[k] += v.cpu()
    out = _step_optimizer(cfg, policy, optimizer, sums, gates, n_valid, dist)
    return out | by_position(by_pos, gated, dist)


def by_position(by_pos: dict[str, torch.Tensor], gated: bool, dist: Dist = SINGLE) -> dict[str, float]:
    """``drift/by_block/<b>`` (mean |δ_t|) and, for a gate, ``gate/by_block/<b>`` (mean normalised gate) over the
    update's valid tokens at response positions [64b, 64(b+1)) of all ranks, and ``tokens/by_block/<b>``, the share
    of the update's valid tokens there (how much a block's mean weighs: a late block holds only the long responses);
    blocks with no token are absent."""
    n = len(by_pos["n"])
    flat = dist.sum(*torch.cat([by_pos["drift"], by_pos["gate"], by_pos["n"]]).tolist())
    drift, gate, count = flat[:n], flat[n : 2 * n], flat[2 * n :]
    out = {f"drift/by_block/{b}": drift[b] / count[b] for b in range(n) if count[b] > 0}
    total = sum(count)
    out |= {f"tokens/by_block/{b}": count[b] / total for b in range(n) if count[b] > 0}
    if gated:
        out |= {f"gate/by_block/{b}": gate[b] / count[b] for b in range(n) if count[b] > 0}
    return out


def routed_loss_terms(mb: ScoredBatch, gated_loss_B_T: torch.Tensor) -> dict[str, torch.Tensor]:
    """Several teachers routed per sample or per token (one-hot w): per teacher i, the per-token terms w_{t,i} g_t ℓ_t
    and w_{t,i} whose masked sums give its loss Σ m w_i g ℓ / Σ m w_i (:func:`per_teacher_loss`). A mixture gives
    every token every teacher's weight, so its per-teacher loss would be the loss itself: none is logged."""
    if mb.route_B_T_N is None or not bool(((mb.route_B_T_N == 0) | (mb.route_B_T_N == 1)).all()):
        return {}
    out = {}
    for i, name in enumerate(mb.teacher_names):
        w = mb.route_B_T_N[..., i].to(gated_loss_B_T.device)
        out[f"teacher/{name}/loss_w"], out[f"teacher/{name}/w"] = gated_loss_B_T * w, w
    return out


def per_teacher_loss(out: dict[str, float]) -> dict[str, float]:
    """``teacher/<name>/loss`` = Σ m w_i g ℓ / Σ m w_i from the token means of its two terms (over a step's updates:
    the ratio of their means; absent when no token was routed to that teacher)."""
    for key in [k for k in out if k.endswith("/loss_w")]:
        prefix = key.removesuffix("loss_w")  # teacher/<name>/
        lw, w = out.pop(key), out.pop(prefix + "w")
        if w > 0:
            out[prefix + "loss"] = lw / w
    return out


def _step_optimizer(cfg: Config, policy, optimizer, sums: dict[str, float], gates: list[torch.Tensor],
                    n_valid: float, dist: Dist) -> dict[str, float]:
    """Clip, guard and step; the update's metrics (token means over all ranks, gate statistics)."""
    keys = sorted(sums)
    totals = dict(zip(keys, dist.sum(*(sums[k] for k in keys)), strict=True))  # one all-reduce for every sum
    grad_norm = torch.nn.utils.clip_grad_norm_(
        policy.parameters(), cfg.trainer.grad_clip if cfg.trainer.grad_clip is not None else math.inf)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    finite = math.isfinite(totals["loss"]) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    out = {k: v / max(n_valid, 1.0) for k, v in totals.items()}
    out |= {"grad_norm": grad_norm, "tokens": n_valid, "guard/skipped": 0.0 if finite else 1.0}
    out |= gate_metrics(torch.cat(gates), dist)
    out["gate/cancel_rate"] = out.pop("cancel")
    out["drift/mean_abs_delta"] = out.pop("abs_delta")
    return out


def gate_metrics(gate_N: torch.Tensor, dist: Dist = SINGLE) -> dict[str, float]:
    """Mean, min, max, std and fraction below 0.5 of the normalised gates ``gate_N`` of all ranks."""
    g = gate_N.double()
    n, s, ss, below = dist.sum(g.numel(), g.sum(), (g * g).sum(), (g < 0.5).sum())
    if not n:
        return {}
    lo = dist.min(g.min() if g.numel() else math.inf)[0]
    hi = dist.max(g.max() if g.numel() else -math.inf)[0]
    mean = s / n
    return {"gate/mean": mean, "gate/min": lo, "gate/max": hi, "gate/std": math.sqrt(max(ss / n - mean * mean, 0.0)),
            "gate/frac_below_0.5": below / n}


def mean_over_updates(per_update: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the updates that report it: an update whose mini-batch holds no valid token (every
    response empty or masked, as in a collapsed run) has no gate statistics, and must not end the run."""
    keys = dict.fromkeys(k for u in per_update for k in u if k not in ("tokens", "guard/skipped"))
    return {k: sum(u[k] for u in per_update if k in u) / sum(k in u for u in per_update) for k in keys}


# ---------------------------------------------------------------------------------------------- one step
def train_step(cfg: Config, policy, optimizer, scheduler, scored: ScoredBatch, step: int,
               dist: Dist = SINGLE) -> dict[str, float]:
    """R passes over the scored batch in the mini-batches of :func:`update_plan`; metrics averaged over the
    updates (``drift/first_update_mean_abs_delta``: the first update's, 0 when π_old is the current policy).

    The permutation is over the global batch (W equal, contiguous rank shards of ``scored.batch.size`` rows), so
    a mini-batch holds the same sequences whatever W is; each rank updates with the rows of it that it holds.
    """
    per_update: list[dict[str, float]] = []
    for pass_ in update_plan(cfg, step, scored.batch.size, dist):
        for local in pass_:
            per_update.append(optimizer_update(cfg, policy, optimizer, scored, local, dist))
            scheduler.step()
    out = per_teacher_loss(mean_over_updates(per_update))
    out["guard/skipped_updates"] = sum(u["guard/skipped"] for u in per_update)
    out["guard/trailing_bad_updates"] = next(
        (i for i, u in enumerate(reversed(per_update)) if not u["guard/skipped"]), len(per_update))
    out["gate/min"] = min(u.get("gate/min", 1.0) for u in per_update)
    out["gate/max"] = max(u.get("gate/max", 1.0) for u in per_update)
    out["drift/first_update_mean_abs_delta"] = per_update[0]["drift/mean_abs_delta"]
    out["drift/last_update_mean_abs_delta"] = per_update[-1]["drift/mean_abs_delta"]
    for key in [k for k in out if "/by_block/" in k]:  # by position: the step's first and last update
        what, b = key.split("/by_block/")
        out.pop(key)
        for when, u in (("first_update", per_update[0]), ("last_update", per_update[-1])):
            if key in u:
                out[f"{what}/{when}/by_block/{b}"] = u[key]
    out["updates"] = len(per_update)
    return out
