"""Blockwise policy-drift gates (BPDG), as pure functions on tensors.

Shape suffixes (the project's convention): ``_B_T`` is [batch, response positions]; ``_B_T_K`` adds K support
ids; ``_B`` is per sequence. Masks are 0/1 tensors of the same shape as the values they mask.

Inputs, per docs/methods.md:
- ``delta_B_T``: δ_t = log π_θ(y_t|h_t) − log π_old(y_t|h_t) (signed; detached here).
- ``loss_mask_B_T``: m_t, 1 on positions whose loss counts (response tokens that are not masked specials).
- ``response_mask_B_T``: 1 on every response token. Positions are counted from each row's first response
  token, so left or right padding in the tensor never moves a block boundary.
- ``newline_B_T``: 1 where the sampled token contains a newline (only the ``span`` gate uses it).

A gate groups positions into G (``gate.kind``, a grouping of :data:`GROUPINGS`), takes the signed group drift
m_G = mean_{t∈G, m_t=1} δ_t (``gate.reduce``, a statistic of :data:`REDUCERS`: ``mean`` is the method's,
``max_abs`` the δ_t of largest |δ_t|) and returns the raw gate g_t = exp(−τ·|m_G|), computed shift-stable as
exp(−τ(|m_G| − min_G' |m_G'|)) (:func:`shifted_gate`).
:func:`normalise_gates` rescales to unit mean over the valid positions of an optimizer update and applies the
optional clip; the learner calls exactly these functions, with the shift and the mean taken over the whole
update (every micro-batch and rank).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from opd_lab.common.registry import Registry

GroupFn = Callable[..., torch.Tensor]
# gate kind → grouping(response_mask_B_T, block_size, newline_B_T) → group index per position (−1: no group)
GROUPINGS: Registry[GroupFn] = Registry("gate kind")
ReduceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# gate.reduce → statistic(values_B_T, mask_B_T, group_B_T) → the group's value at each of its positions, [B, T]
# (0 off every group and for groups with no masked-in position); it must be signed: the cancellation rate needs it
REDUCERS: Registry[ReduceFn] = Registry("gate statistic")


def response_positions(response_mask_B_T: torch.Tensor) -> torch.Tensor:
    """Index of each response token counted from the row's first response token (0-based); −1 elsewhere."""
    pos = torch.cumsum(response_mask_B_T.long(), dim=-1) - 1
    return torch.where(response_mask_B_T.bool(), pos, torch.full_like(pos, -1))


@GROUPINGS.register("none")
def no_groups(response_mask_B_T: torch.Tensor, **_) -> torch.Tensor:
    """No gate: no position belongs to a group (g_t = 1 everywhere)."""
    return torch.full_like(response_mask_B_T, -1, dtype=torch.long)


@GROUPINGS.register("token")
def token_groups(response_mask_B_T: torch.Tensor, **_) -> torch.Tensor:
    """Every response position is its own group."""
    return response_positions(response_mask_B_T)


@GROUPINGS.register("sequence")
def sequence_groups(response_mask_B_T: torch.Tensor, **_) -> torch.Tensor:
    """The whole response is one group."""
    return torch.where(response_mask_B_T.bool(), 0, -1)


@GROUPINGS.register("block")
def block_groups(response_mask_B_T: torch.Tensor, block_size: int, **_) -> torch.Tensor:
    """Consecutive groups of ``block_size`` response positions, from the first response token."""
    pos = response_positions(response_mask_B_T)
    return torch.where(pos >= 0, pos // block_size, -1)


@GROUPINGS.register("span")
def span_groups(response_mask_B_T: torch.Tensor, newline_B_T: torch.Tensor, **_) -> torch.Tensor:
    """Reasoning steps: a group ends after each newline-containing token and at the end of the response."""
    nl = (newline_B_T.bool() & response_mask_B_T.bool()).long()
    gid = torch.cumsum(nl, dim=-1) - nl  # newlines strictly before t
    return torch.where(response_mask_B_T.bool(), gid, -1)


def flat_groups(group_B_T: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(flat_BT, n_groups)``: each position's group as one index into ``B · n_groups`` slots (row-major; positions
    off every group point at their row's slot 0 and must be masked out by the caller)."""
    B = group_B_T.shape[0]
    n_groups = int(group_B_T.max().item()) + 1 if group_B_T.numel() else 0
    rows = torch.arange(B, device=group_B_T.device).unsqueeze(1) * max(n_groups, 0)
    return (rows + group_B_T.clamp(min=0)).reshape(-1), n_groups


@REDUCERS.register("mean")
def group_mean(values_B_T: torch.Tensor, mask_B_T: torch.Tensor, group_B_T: torch.Tensor) -> torch.Tensor:
    """Masked mean of ``values`` over each row's group, broadcast back to ``[B, T]`` (0 for empty groups)."""
    B, T = values_B_T.shape
    flat, n_groups = flat_groups(group_B_T)
    if n_groups <= 0:
        return torch.zeros_like(values_B_T)
    in_group = group_B_T >= 0
    w = (mask_B_T.to(values_B_T.dtype) * in_group).reshape(-1)
    sums = torch.zeros(B * n_groups, dtype=values_B_T.dtype, device=values_B_T.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, flat, values_B_T.reshape(-1) * w)
    counts.index_add_(0, flat, w)
    means = sums / counts.clamp(min=1)
    return torch.where(in_group, means[flat].reshape(B, T), torch.zeros_like(values_B_T))


@REDUCERS.register("max_abs")
def group_max_abs(values_B_T: torch.Tensor, mask_B_T: torch.Tensor, group_B_T: torch.Tensor) -> torch.Tensor:
    """The masked-in value of largest magnitude in each row's group, signed (the group's worst token: one token
    that drifted far is not averaged away by its neighbours), broadcast back to ``[B, T]`` (0 for empty groups).
    Ties between +a and −a resolve to +a."""
    B, T = values_B_T.shape
    flat, n_groups = flat_groups(group_B_T)
    if n_groups <= 0:
        return torch.zeros_like(values_B_T)
    valid = ((group_B_T >= 0) & mask_B_T.bool()).reshape(-1)
    v = values_B_T.reshape(-1)
    hi = torch.full((B * n_groups,), -math.inf, dtype=v.dtype, device=v.device)
    lo = torch.full_like(hi, math.inf)
    hi.scatter_reduce_(0, flat[valid], v[valid], reduce="amax")
    lo.scatter_reduce_(0, flat[valid], v[valid], reduce="amin")
    extreme = torch.where(hi.abs() >= lo.abs(), hi, lo)
    extreme = torch.where(torch.isfinite(extreme), extreme, torch.zeros_like(extreme))  # groups with no valid t
    return torch.where(group_B_T >= 0, extreme[flat].reshape(B, T), torch.zeros_like(values_B_T))


def group_drift(
    delta_B_T: torch.Tensor,
    loss_mask_B_T: torch.Tensor,
    response_mask_B_T: torch.Tensor,
    kind: str,
    block_size: int | None = None,
    newline_B_T: torch.Tensor | None = None,
    reduce: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed group drift m_G = mean_{t∈G, m_t=1} δ_t (or the ``reduce`` statistic of :data:`REDUCERS`) at every
    position of group G, and the sign-cancellation flags.

    Returns ``(m_G_B_T, cancel_B_T)``: ``m_G_B_T`` is 0 off the response (and everywhere for ``kind='none'``);
    ``cancel_B_T`` is 1 at valid positions whose δ_t has the opposite sign to m_G (drifts cancelling inside the
    group; logged as a rate).
    """
    delta_B_T = delta_B_T.detach()
    mask = loss_mask_B_T.to(delta_B_T.dtype)
    grouping = GROUPINGS.get(kind)
    if kind == "span" and newline_B_T is None:
        raise ValueError("the span gate needs newline_B_T")
    groups = grouping(response_mask_B_T=response_mask_B_T, block_size=block_size, newline_B_T=newline_B_T)
    m_G = REDUCERS.get(reduce)(delta_B_T, mask, groups)
    cancel = ((torch.sign(delta_B_T) * torch.sign(m_G)) < 0).to(delta_B_T.dtype) * mask
    return m_G, cancel


POSITION_BLOCK = 64  # response positions per block of the drift-by-position metrics (drift/*/by_block/<b>)


def position_block_sums(values: dict[str, torch.Tensor], mask_B_T: torch.Tensor, response_mask_B_T: torch.Tensor,
                        n_blocks: int, block: int = POSITION_BLOCK) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Σ_t m_t v_t of each ``values`` tensor ``[B, T]`` and Σ_t m_t over each block b of ``block`` response
    positions (t ∈ [b·block, (b+1)·block), counted from the row's first response token, so padding moves nothing),
    ``[n_blocks]`` each in float64; positions past the last block count in it. Divided, they give the mean of v by
    position along the response (how drift and the gate change from a response's start to its end)."""
    pos = response_positions(response_mask_B_T)
    idx = torch.where(pos >= 0, (pos // block).clamp(max=n_blocks - 1), 0).reshape(-1)
    w = (mask_B_T.to(torch.float64) * (pos >= 0)).reshape(-1)
    counts = torch.zeros(n_blocks, dtype=torch.float64, device=w.device).index_add_(0, idx, w)
    sums = {k: torch.zeros_like(counts).index_add_(0, idx, v.detach().to(torch.float64).reshape(-1) * w)
            for k, v in values.items()}
    return sums, counts


def min_abs_drift(m_G_B_T: torch.Tensor, loss_mask_B_T: torch.Tensor) -> float:
    """min |m_G| over the valid positions (+inf when there are none): the shift of the shift-stable gate."""
    valid = loss_mask_B_T.bool()
    return float(m_G_B_T.abs()[valid].min()) if bool(valid.any()) else math.inf


def shifted_gate(m_G_B_T: torch.Tensor, loss_mask_B_T: torch.Tensor, tau: float,
                 shift: float | None = None) -> torch.Tensor:
    """Raw gate computed shift-stable: g_t = exp(−τ(|m_G| − c)) on valid positions, 1 elsewhere.

    ``shift`` c is the min of |m_G| over the optimizer update's groups (default: over the given positions,
    :func:`min_abs_drift`); the unit-mean normalisation cancels the common factor exp(τc), and the group with
    the least drift gets exactly 1, so no τ can make every gate underflow to 0. No gradient.
    """
    c = min_abs_drift(m_G_B_T, loss_mask_B_T) if shift is None else shift
    c = 0.0 if not math.isfinite(c) else c
    gate = torch.exp(-tau * (m_G_B_T.detach().abs() - c))
    return torch.where(loss_mask_B_T.bool(), gate, torch.ones_like(gate))


def normalise_gates(
    gate_B_T: torch.Tensor,
    loss_mask_B_T: torch.Tensor,
    clip_min: float | None = None,
    clip_max: float | None = None,
    mean: float | None = None,
) -> torch.Tensor:
    """g_t ← g_t / (Σ m g / Σ m), then the optional clip [g_min, g_max].

    The mean is over the given positions, or ``mean`` when the optimizer update spans several micro-batches or
    ranks (the learner sums Σ m g and Σ m over all of them first): the step-level normalisation of docs/methods.md.
    """
    if mean is None:
        mask = loss_mask_B_T.to(gate_B_T.dtype)
        mean = (gate_B_T * mask).sum() / mask.sum().clamp(min=1)
    mean = torch.as_tensor(mean, dtype=gate_B_T.dtype)
    out = gate_B_T / mean.clamp(min=torch.finfo(gate_B_T.dtype).tiny)
    if clip_min is not None or clip_max is not None:
        out = out.clamp(min=clip_min, max=clip_max)
    return out
