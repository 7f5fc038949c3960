"""The training teachers of a run: ``model.teachers`` (name → model, scorer, device, weight) or the one
``model.teacher``; their scorers; where their weights wait between scorings (``routing.residency``); and the routing
of their scores into the one target the loss sees (``routing.rule``; the maths is in routing.py).

With one teacher, :meth:`Teachers.score` is exactly the single scorer's call (no second pass, no routing): a run
with one entry in ``model.teachers`` is bit-identical to the same run with ``model.teacher``.

Teachers that do not fit on their devices together are scored one at a time: each waits on the CPU and is moved
to its device for the scoring of a rollout batch, then back (``residency=one``; ``auto`` decides from the free device
memory at start-up). Never are all of them resident when they do not fit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from opd_lab.common.registry import Registry
from opd_lab.config import RoutingConfig
from opd_lab.core import routing as R
from opd_lab.core.losses import ScoreNeeds
from opd_lab.core.teacher_scores import TeacherScores
from opd_lab.rollout.base import RolloutBatch

# (query_ids_B_T_Q or None) → (log π_old(y_t) [B, T], log π_old at the query ids [B, T, Q] or None): a no-grad
# forward of the policy that sampled the batch (scoring.py supplies it)
OldAt = Callable[[torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]
# teacher scores → the loss's support S_t (ids, log q, mask), as scoring.build_support builds it
SupportOf = Callable[[TeacherScores], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class Routed:
    """One batch's routed teacher scores: the target the loss sees, the routing weights w_{t,i} ``[B, T, N]`` and
    every teacher's log q_i(y_t) ``[B, T, N]`` (both None with one teacher)."""

    scores: TeacherScores
    weights_B_T_N: torch.Tensor | None = None
    each_logp_B_T_N: torch.Tensor | None = None


class Teachers:
    """The named teachers of a run and how their scores are routed.

    ``scorers[i]`` scores a batch for teacher ``names[i]`` (the TeacherScorer protocol); ``models[i]`` is its HF
    module when it has one (moved between the CPU and ``devices[i]`` when ``one_at_a_time``); ``weights`` are the
    mixture weights w_i (normalised; the alignment rule replaces them as it refreshes)."""

    def __init__(self, names: list[str], scorers: list, routing: RoutingConfig, weights: list[float] | None = None,
                 models: list[torch.nn.Module | None] | None = None, devices: list[str | None] | None = None,
                 one_at_a_time: bool = False) -> None:
        self.names, self.scorers, self.routing = list(names), list(scorers), routing
        self.weights = R.normalised_weights(weights if weights is not None else [1.0] * len(names))
        self.models = list(models) if models is not None else [None] * len(names)
        self.devices = list(devices) if devices is not None else [None] * len(names)
        self.one_at_a_time = one_at_a_time
        self.resident: set[int] = set() if one_at_a_time else set(range(len(names)))

    @classmethod
    def one(cls, scorer) -> Teachers:
        """The one teacher ``model.teacher`` behind ``scorer``."""
        return cls(["teacher"], [scorer], RoutingConfig())

    def __len__(self) -> int:
        return len(self.names)

    @property
    def rule(self) -> str:
        return self.routing.rule if len(self.names) > 1 else "single"

    # --------------------------------------------------------------------------------------------- scoring
    def score(self, batch: RolloutBatch, needs: ScoreNeeds, temperature: float,
              old_topk_B_T_K: torch.Tensor | None = None, old_at: OldAt | None = None,
              support_of: SupportOf | None = None) -> Routed:
        """Score ``batch`` with every teacher and route (module docstring). ``old_topk_B_T_K``: π_old's top-K ids
        (the student/union support), scored by every teacher as query ids; ``old_at``/``support_of``: what
        ``min_kl`` needs of π_old and of the loss's support. The rule is looked up by name in :data:`RULES`."""
        k = needs.teacher_top_k
        if len(self.names) == 1:
            return Routed(self._call(0, batch, k, temperature, old_topk_B_T_K))
        rule = RULES.get(self.routing.rule)
        k_call, entropy = rule.scoring(self.routing, k)
        per = [self._call(i, batch, k_call, temperature, old_topk_B_T_K, entropy) for i in range(len(self.names))]
        ctx = RouteContext(batch, needs, temperature, k, k_call, old_topk_B_T_K, old_at, support_of,
                           torch.stack([s.logp_B_T for s in per], dim=-1))
        return rule.route(self, per, ctx)

    def distances(self, per: list[TeacherScores], batch: RolloutBatch, needs: ScoreNeeds, old_at: OldAt | None,
                  support_of: SupportOf | None) -> torch.Tensor:
        """D_i(t) of ``min_kl`` ``[B, T, N]``: KL(π̂_old ‖ q̂_i) on teacher i's support S_t^i when the loss has a
        support, else the k3 estimate of KL(π_old ‖ q_i) at y_t."""
        if old_at is None:
            raise ValueError("routing.rule=min_kl needs π_old (old_at)")
        if not needs.support:
            old_logp, _ = old_at(None)
            return torch.stack([R.sampled_kl_k3(s.logp_B_T, old_logp) for s in per], dim=-1)
        assert support_of is not None
        supports = [support_of(s) for s in per]
        ids = torch.cat([ids for ids, _, _ in supports], dim=-1)
        _, old_q = old_at(ids)
        out, start = [], 0
        for ids_i, logq_i, mask_i in supports:
            S = ids_i.shape[-1]
            out.append(R.support_kl(old_q[..., start : start + S], logq_i, mask_i))
            start += S
        return torch.stack(out, dim=-1)

    def _call(self, i: int, batch: RolloutBatch, top_k: int, temperature: float, query, entropy: bool = False):
        with self.placed(i):
            if entropy:
                return self.scorers[i](batch, top_k, temperature, query, entropy=True)
            return self.scorers[i](batch, top_k, temperature, query)

    # ------------------------------------------------------------------------------------------- placement
    @contextlib.contextmanager
    def placed(self, i: int):
        """Teacher i on its device while it scores (one at a time: moved from the CPU, and back afterwards)."""
        model, device = self.models[i], self.devices[i]
        if not self.one_at_a_time or model is None or device in (None, "cpu"):
            self.resident.add(i)
            yield
            if self.one_at_a_time:
                self.resident.discard(i)
            return
        model.to(device)
        self.resident.add(i)
        try:
            yield
        finally:
            model.to("cpu")
            self.resident.discard(i)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def close(self) -> None:
        for s in self.scorers:
            s.close()


# ------------------------------------------------------------------------------------------------ routing rules
@dataclass
class RouteContext:
    """What a routing rule sees besides the teachers and their scores ``per``: the batch, the loss's needs, the top-K
    the loss asked for (``k``) and the one the teachers were scored with (``k_call``), π_old's top-K ids, the π_old
    and support callbacks (``min_kl``) and every teacher's log q_i(y_t) ``[B, T, N]``."""

    batch: RolloutBatch
    needs: ScoreNeeds
    temperature: float
    k: int
    k_call: int
    old_topk_B_T_K: torch.Tensor | None
    old_at: OldAt | None
    support_of: SupportOf | None
    each_logp_B_T_N: torch.Tensor


@dataclass(frozen=True)
class Rule:
    """A registered routing rule: ``route(teachers, per, ctx) → Routed`` and ``scoring(routing, k) → (k_call,
    entropy)``, how the teachers are scored for it (a top-1 or the entropy that a confidence rule needs)."""

    route: Callable[[Teachers, list[TeacherScores], RouteContext], Routed]
    scoring: Callable[[RoutingConfig, int], tuple[int, bool]] = lambda routing, k: (k, False)


RULES: Registry[Rule] = Registry("routing rule")


def _mixture(t: Teachers, per: list[TeacherScores], ctx: RouteContext) -> Routed:
    """log q = Σ_i w_i log q_i (or q = Σ_i w_i q_i); with a support, every teacher at the union of their top-K ids."""
    cand = cand_logp = None
    if ctx.k:
        cand = R.candidates([s.topk_ids_B_T_K for s in per])
        cand_logp = [t._call(i, ctx.batch, 0, ctx.temperature, cand[0]).query_logp_B_T_Q for i in range(len(t))]
    n_query = ctx.old_topk_B_T_K.shape[-1] if ctx.old_topk_B_T_K is not None else 0
    target = R.mixture_scores(per, t.weights, t.routing.mixture_space.value, ctx.k, cand, cand_logp, n_query)
    B, T = ctx.batch.response_mask_B_T.shape
    return Routed(target, R.constant_weights(t.weights, B, T), ctx.each_logp_B_T_N)


def _hard(choose: Callable[[Teachers, list[TeacherScores], RouteContext], torch.Tensor]):
    """A rule that hands the loss one teacher's scores per token, unchanged: ``choose`` gives its index ``[B, T]``."""
    def route(t: Teachers, per: list[TeacherScores], ctx: RouteContext) -> Routed:
        choice = choose(t, per, ctx)
        target = R.take_choice(per, choice)
        if ctx.k_call > ctx.k:  # the top-1 was scored for routing only: the loss asked for no support
            target.topk_ids_B_T_K = target.topk_logp_B_T_K = None
        target.entropy_B_T = None
        return Routed(target, R.one_hot_weights(choice, len(t)), ctx.each_logp_B_T_N)

    return route


def _confidence_scoring(routing: RoutingConfig, k: int) -> tuple[int, bool]:
    top1 = routing.confidence.value == "top1"
    return (max(k, 1) if top1 else k), not top1


RULES.add("mixture", Rule(_mixture))
RULES.add("alignment", Rule(_mixture))  # a mixture whose weights the alignment refresh sets
RULES.add("per_sample", Rule(_hard(lambda t, per, ctx: R.per_sample_choice(
    R.row_teachers(ctx.batch.tags_B, dict(t.routing.by_tag), t.routing.default, t.names),
    ctx.batch.response_mask_B_T.shape[1]))))
RULES.add("max_confidence", Rule(_hard(lambda t, per, ctx: R.max_confidence_choice(per, t.routing.confidence.value)),
                                 scoring=_confidence_scoring))
RULES.add("min_kl", Rule(_hard(lambda t, per, ctx: R.min_kl_choice(
    t.distances(per, ctx.batch, ctx.needs, ctx.old_at, ctx.support_of)))))


def fits_together(models: list[torch.nn.Module | None], devices: list[str | None], headroom: float = 0.8) -> bool:
    """Whether the HF teachers fit on their devices at once: the parameter bytes per CUDA device within ``headroom``
    of its free memory now (CPU teachers always fit)."""
    need: dict[str, int] = {}
    for model, device in zip(models, devices, strict=True):
        if model is None or device is None or not str(device).startswith("cuda"):
            continue
        need[device] = need.get(device, 0) + sum(p.numel() * p.element_size() for p in model.parameters())
    for device, n in need.items():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if n > headroom * free:
            return False
    return True
