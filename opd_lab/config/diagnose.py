"""The ``diagnose`` group: the gradient-alignment diagnostic (``python -m opd_lab.diagnose``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from opd_lab.config.base import _check

# --------------------------------------------------------------------------------------------- diagnose
# the losses of opd_lab.core.alignment.DIAGNOSTIC_LOSSES (a test keeps the two in step)
DIAGNOSTIC_LOSS_NAMES = ("sampled_token", "lsm", "full_rkl")


class NodeMode(str, Enum):
    every_k = "every_k"
    top_entropy = "top_entropy"


class RestMode(str, Enum):
    drop = "drop"
    share = "share"


@dataclass
class DiagnoseTeacher:
    """A teacher for the diagnostic: ``teacher`` / ``student`` (the configured models) or a path/hub id, with an
    optional system-prompt ``context`` ({answer}, {question} are filled in: e.g. self-distillation with the answer)."""

    model: str = "teacher"
    context: str | None = None


@dataclass
class DiagnoseConfig:
    """Gradient-alignment diagnostic (``python -m opd_lab.diagnose``; docs/methods.md)."""

    n_questions: int = 16
    rollouts_per_question: int = 2
    node_mode: NodeMode = NodeMode.every_k  # every_k: positions 0, k, 2k, …; top_entropy: highest-entropy positions
    every_k: int = 24
    max_nodes: int = 8  # per rollout
    top_m: int = 3  # candidates: the student's top-m tokens plus the sampled token
    rest: RestMode = RestMode.drop  # the other tokens: dropped (π renormalised on the candidates) or one shared Q
    continuations: int = 8  # M targeted continuations per candidate (the first round)
    # adaptive Q: a node whose Q estimates are all equal (g*_t = 0, a_t undefined) gets another round for all its
    # candidates, doubling its per-candidate count (M, 2M, 4M, …), until some Q differs or this cap is reached;
    # max_continuations = continuations: one round of M (no adaptive sampling)
    max_continuations: int = 64
    max_tokens: int | None = None  # continuation cap (null: rollout.max_tokens)
    chunk: int = 256  # continuation prompts per engine call
    losses: list[str] = field(default_factory=lambda: ["sampled_token", "lsm", "full_rkl"])
    lsm_top_k: int = 32
    # name → {model, context}; values are plain mappings so that `+diagnose.teachers.x={model: /path}` works
    teachers: dict[str, Any] = field(default_factory=lambda: {"teacher": {"model": "teacher"}})
    seed: int = 0
    out_dir: str | None = None  # also write the tables and plots here (e.g. results/diagnostics/<name>)

    def __post_init__(self) -> None:
        for name in ("n_questions", "rollouts_per_question", "every_k", "max_nodes", "top_m", "continuations",
                     "lsm_top_k", "chunk"):
            _check(getattr(self, name) >= 1, f"diagnose.{name}", getattr(self, name), "an integer >= 1")
        _check(self.max_continuations >= self.continuations, "diagnose.max_continuations", self.max_continuations,
               f"an integer >= diagnose.continuations ({self.continuations})")
        _check(self.max_tokens is None or self.max_tokens >= 1, "diagnose.max_tokens", self.max_tokens,
               "null or an integer >= 1")
        bad = [x for x in self.losses if x not in DIAGNOSTIC_LOSS_NAMES]
        _check(len(self.losses) > 0 and not bad, "diagnose.losses", list(self.losses),
               f"a non-empty list of {', '.join(DIAGNOSTIC_LOSS_NAMES)}")
        _check(len(self.teachers) > 0, "diagnose.teachers", dict(self.teachers), "at least one named teacher")
        specs = {}
        for name, spec in self.teachers.items():
            spec = spec if isinstance(spec, DiagnoseTeacher) else dict(spec or {})
            if isinstance(spec, dict):
                extra = sorted(set(spec) - {"model", "context"})
                _check(not extra and isinstance(spec.get("model", "teacher"), str), f"diagnose.teachers.{name}",
                       spec, "{model: teacher|student|<path or hub id>, context: <text with {answer}> or null}")
                spec = DiagnoseTeacher(**spec)
            specs[name] = spec
        self.teachers = specs
