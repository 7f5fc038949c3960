"""Blockwise policy-drift gates (BPDG), as pure functions on tensors.

Shape suffixes (the project's convention): ``_B_T`` is [batch, response positions]; ``_B_T_K`` adds K support
ids; ``_B`` is per sequence. Masks are 0/1 tensors of the same shape as the values they mask.

Inputs, per METHODS.md:
- ``delta_B_T``: δ_t = log π_θ(y_t|h_t) − log π_old(y_t|h_t) (signed; detached here).
- ``loss_mask_B_T``: m_t, 1 on positions whose loss counts (response tokens that are not masked specials).
- ``response_mask_B_T``: 1 on every response token. Positions are counted from each row's first response
  token, so left or right padding in the tensor never moves a block boundary.
- ``newline_B_T``: 1 where the sampled token contains a newline (only the ``span`` gate uses it).

A gate groups positions into G, takes the signed group drift m_G = mean_{t∈G, m_t=1} δ_t and returns the raw
gate g_t = exp(−τ·|m_G|). :func:`normalise_gates` rescales to unit mean over the valid positions of an
optimizer step; the learner applies the same scalar through its gradient normaliser (see ``learner.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GroupFn = Callable[..., torch.Tensor]
_GROUPINGS: dict[str, GroupFn] = {}


def register_grouping(name: str) -> Callable[[GroupFn], GroupFn]:
    def deco(fn: GroupFn) -> GroupFn:
        _GROUPINGS[name] = fn
        return fn

    return deco


def response_positions(response_mask_B_T: torch.Tensor) -> torch.Tensor:
    """Index of each response token counted from the row's first response token (0-based); −1 elsewhere."""
    pos = torch.cumsum(response_mask_B_T.long(), dim=-1) - 1
    return torch.where(response_mask_B_T.bool(), pos, torch.full_like(pos, -1))


@register_grouping("token")
def token_groups(response_mask_B_T: torch.Tensor, **_) -> torch.Tensor:
    """Every response position is its own group."""
    return response_positions(response_mask_B_T)


@register_grouping("sequence")
def sequence_groups(response_mask_B_T: torch.Tensor, **_) -> torch.Tensor:
    """The whole response is one group."""
    return torch.where(response_mask_B_T.bool(), 0, -1)


@register_grouping("block")
def block_groups(response_mask_B_T: torch.Tensor, block_size: int, **_) -> torch.Tensor:
    """Consecutive groups of ``block_size`` response positions, from the first response token."""
    pos = response_positions(response_mask_B_T)
    return torch.where(pos >= 0, pos // block_size, -1)


@register_grouping("span")
def span_groups(response_mask_B_T: torch.Tensor, newline_B_T: torch.Tensor, **_) -> torch.Tensor:
    """Reasoning steps: a group ends after each newline-containing token and at the end of the response."""
    nl = (newline_B_T.bool() & response_mask_B_T.bool()).long()
    gid = torch.cumsum(nl, dim=-1) - nl  # newlines strictly before t
    return torch.where(response_mask_B_T.bool(), gid, -1)


def group_mean(values_B_T: torch.Tensor, mask_B_T: torch.Tensor, group_B_T: torch.Tensor) -> torch.Tensor:
    """Masked mean of ``values`` over each row's group, broadcast back to ``[B, T]`` (0 for empty groups)."""
    B, T = values_B_T.shape
    n_groups = int(group_B_T.max().item()) + 1 if group_B_T.numel() else 0
    if n_groups <= 0:
        return torch.zeros_like(values_B_T)
    in_group = group_B_T >= 0
    flat = (torch.arange(B, device=values_B_T.device).unsqueeze(1) * n_groups + group_B_T.clamp(min=0))
    flat = flat.reshape(-1)
    w = (mask_B_T.to(values_B_T.dtype) * in_group).reshape(-1)
    sums = torch.zeros(B * n_groups, dtype=values_B_T.dtype, device=values_B_T.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, flat, values_B_T.reshape(-1) * w)
    counts.index_add_(0, flat, w)
    means = sums / counts.clamp(min=1)
    return torch.where(in_group, means[flat].reshape(B, T), torch.zeros_like(values_B_T))


def drift_gate(
    delta_B_T: torch.Tensor,
    loss_mask_B_T: torch.Tensor,
    response_mask_B_T: torch.Tensor,
    kind: str,
    tau: float,
    block_size: int = 64,
    newline_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Raw gate g_t = exp(−τ·|m_G|) (``kind`` ∈ none, token, sequence, block, span), no gradient.

    Returns ``(gate_B_T, extras)``; ``gate_B_T`` is 1 off the loss mask. ``extras['group_drift_B_T']`` is m_G
    per position and ``extras['cancel_B_T']`` flags positions whose δ_t has the opposite sign to m_G
    (sign cancellation inside the group; logged as a rate).
    """
    delta_B_T = delta_B_T.detach()
    mask = loss_mask_B_T.to(delta_B_T.dtype)
    if kind == "none":
        ones = torch.ones_like(delta_B_T)
        return ones, {"group_drift_B_T": torch.zeros_like(delta_B_T), "cancel_B_T": torch.zeros_like(delta_B_T)}
    if kind not in _GROUPINGS:
        raise KeyError(f"unknown gate kind {kind!r}; available: ['none', {', '.join(map(repr, _GROUPINGS))}]")
    if kind == "span" and newline_B_T is None:
        raise ValueError("the span gate needs newline_B_T")
    groups = _GROUPINGS[kind](response_mask_B_T=response_mask_B_T, block_size=block_size, newline_B_T=newline_B_T)
    m_G = group_mean(delta_B_T, mask, groups)
    gate = torch.exp(-tau * m_G.abs())
    gate = torch.where(mask.bool(), gate, torch.ones_like(gate))
    cancel = ((torch.sign(delta_B_T) * torch.sign(m_G)) < 0).to(delta_B_T.dtype) * mask
    return gate, {"group_drift_B_T": m_G, "cancel_B_T": cancel}


def normalise_gates(
    gate_B_T: torch.Tensor,
    loss_mask_B_T: torch.Tensor,
    clip_min: float | None = None,
    clip_max: float | None = None,
) -> torch.Tensor:
    """g_t ← g_t / (Σ m g / Σ m) over all given positions, then the optional clip [g_min, g_max].

    Pass the whole optimizer step (every micro-batch) to get the step-level normalisation of METHODS.md.
    """
    mask = loss_mask_B_T.to(gate_B_T.dtype)
    mean = (gate_B_T * mask).sum() / mask.sum().clamp(min=1)
    out = gate_B_T / mean.clamp(min=torch.finfo(gate_B_T.dtype).tiny)
    if clip_min is not None or clip_max is not None:
        out = out.clamp(min=clip_min, max=clip_max)
    return out
