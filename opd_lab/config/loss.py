"""The ``loss`` and ``gate`` groups: what the learner minimises (docs/methods.md, Losses and Gates)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from omegaconf import MISSING

from opd_lab.config.base import _check


# --------------------------------------------------------------------------------------------------- loss
class SpecialMask(str, Enum):
    none = "none"
    first = "first"
    all = "all"


class Support(str, Enum):
    teacher = "teacher"
    student = "student"
    union = "union"


class RewardReference(str, Enum):
    """The log-prob the sampled-token reward subtracts (docs/methods.md, "Staleness corrections")."""

    behaviour = "behaviour"  # r_t = log q − log π_b (as published)
    proximal = "proximal"  # r_t = log q − log π_prox (the learner's weights at the start of the step)
    current = "current"  # r_t = log q − sg(log π_θ), recomputed at every update


class OffPolicy(str, Enum):
    """How an update treats π_b ≠ π_prox (a stale batch, ``rollout.staleness`` ≥ 1)."""

    none = "none"  # ρ_t = π_θ/π_b in the clipped objective (as published)
    decoupled = "decoupled"  # u_t = π_θ/π_prox in the clip, times w_t = min(π_prox/π_b, C) (decoupled PPO)
    masked = "masked"  # as decoupled, but w_t = π_prox/π_b inside [1/C, C] and 0 outside (token dropped)


@dataclass
class LossConfig:
    """Fields shared by every loss: which sampled tokens are masked (m_t = 0) as special tokens (the strings are
    ``model.special_tokens``) and the rollout top-p the loss is published with (``rollout.top_p`` defaults to it)."""

    name: str = MISSING
    mask_special: SpecialMask = SpecialMask.first
    rollout_top_p: float = 1.0
    off_policy: OffPolicy = OffPolicy.none  # staleness correction: none | decoupled | masked
    is_cap: float = 2.0  # C of the behaviour weight w_t (off_policy=decoupled|masked)

    def _validate(self) -> None:
        pass

    def __post_init__(self) -> None:
        _check(0 < self.rollout_top_p <= 1, "loss.rollout_top_p", self.rollout_top_p, "0 < rollout_top_p <= 1")
        _check(self.is_cap > 1.0, "loss.is_cap", self.is_cap, "is_cap > 1 (C caps the weight π_prox/π_b; C <= 1 "
               "would cut every token of an unchanged policy)")
        self._validate()


@dataclass
class SampledTokenLossConfig(LossConfig):
    """PPO-style sampled-token OPD: A_t from r_t = log q − log π_old, clip ε, dual clip c, discount γ."""

    name: str = "sampled_token"
    rollout_top_p: float = 1.0  # as published: top-p was applied to the LSM runs only (docs/methods.md)
    clip_eps: float = 0.2
    dual_clip: float = 3.0
    gamma: float = 0.0
    clip_log_ratio: float | None = 5.0
    reward_reference: RewardReference = RewardReference.behaviour  # behaviour | proximal | current

    def _validate(self) -> None:
        _check(self.name == "sampled_token", "loss.name", self.name, "'sampled_token' for this schema")
        _check(0.0 < self.clip_eps < 1.0, "loss.clip_eps", self.clip_eps, "0 < clip_eps < 1")
        _check(self.dual_clip > 1.0, "loss.dual_clip", self.dual_clip, "dual_clip > 1")
        _check(0.0 <= self.gamma <= 1.0, "loss.gamma", self.gamma, "0 <= gamma <= 1")
        _check(
            self.clip_log_ratio is None or self.clip_log_ratio > 0,
            "loss.clip_log_ratio",
            self.clip_log_ratio,
            "null or > 0",
        )


@dataclass
class LSMLossConfig(LossConfig):
    """Teacher top-K local support matching: reverse KL of π̂_θ and q̂ renormalised on the support S_t."""

    name: str = "lsm"
    rollout_top_p: float = 0.9
    top_k: int = 32
    renormalise: bool = True
    support: Support = Support.teacher
    add_sampled_token: bool = False
    tail: bool = False

    def _validate(self) -> None:
        _check(self.name == "lsm", "loss.name", self.name, "'lsm' for this schema")
        _check(self.top_k >= 1, "loss.top_k", self.top_k, "an integer >= 1 (and <= the vocabulary size)")
        _check(
            not (self.tail and self.renormalise),
            "loss.tail",
            self.tail,
            "true only with loss.renormalise=false (the tail bucket replaces renormalisation)",
        )


# --------------------------------------------------------------------------------------------------- gate
class GateReference(str, Enum):
    """The δ_t the gates see (docs/methods.md, "Staleness corrections")."""

    behaviour = "behaviour"  # δ_t = log π_θ − log π_b: drift within the step and staleness
    proximal = "proximal"  # δ_t = log π_θ − log π_prox: drift within the step only


class GateKind(str, Enum):
    """The built-in groupings (``gate.kind`` is open: a plugin registers more in ``GROUPINGS``)."""

    none = "none"
    token = "token"
    sequence = "sequence"
    block = "block"
    span = "span"


@dataclass
class GateConfig:
    """Blockwise policy-drift gate g_t = exp(−τ·|m_G|), normalised to unit mean over the optimizer update, then
    optionally clipped to [clip_min, clip_max]. ``kind`` names the grouping of positions into G and ``reduce`` the
    group statistic m_G of the δ_t in G (``mean``, the method's; ``max_abs``: the δ_t of largest |δ_t|), both looked
    up in a registry (opd_lab/core/gates.py) that a plugin extends (docs/extending.md); the names are checked at
    start-up. ``block_size`` belongs to ``kind=block`` among the built-ins (a plugin's grouping may use it)."""

    kind: str = GateKind.none.value
    block_size: int | None = None
    reduce: str = "mean"
    tau: float = 1.0
    clip_min: float | None = None
    clip_max: float | None = None
    reference: GateReference = GateReference.behaviour  # behaviour | proximal

    def __post_init__(self) -> None:
        block = self.kind == GateKind.block
        builtin = self.kind in {k.value for k in GateKind}
        _check(not builtin or block == (self.block_size is not None), "gate.block_size", self.block_size,
               "an integer >= 1 with gate.kind=block (gate=block32|block64|block128), and null with any other kind")
        _check(self.block_size is None or self.block_size >= 1, "gate.block_size", self.block_size, "an integer >= 1")
        _check(self.kind != GateKind.none or self.reduce == "mean", "gate.reduce", self.reduce,
               "mean with gate=none (there is no group to reduce)")
        _check(self.tau >= 0.0, "gate.tau", self.tau, "tau >= 0")
        clip = (self.clip_min, self.clip_max)
        _check(self.kind != GateKind.none or clip == (None, None), "gate.clip_min/clip_max", clip,
               "null with gate=none (there is no gate to clip)")
        lo = 0.0 if self.clip_min is None else self.clip_min
        hi = float("inf") if self.clip_max is None else self.clip_max
        _check(0.0 <= lo <= 1.0 <= hi and lo < hi, "gate.clip_min/clip_max", clip,
               "0 <= clip_min <= 1 <= clip_max with clip_min < clip_max (a clip must keep the unit gate)")
