"""The ``routing`` group: which teacher of ``model.teachers`` scores each token (multi-teacher OPD;
opd_lab/core/routing.py has the maths). With one teacher every rule is the identity."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from opd_lab.config.base import _check


class RoutingRule(str, Enum):
    """How the teachers' scores become the one target the loss sees (``routing.rule``): the built-in rules
    (``routing.rule`` is open: a plugin registers more in ``opd_lab.learner.teachers.RULES``)."""

    single = "single"  # one teacher (model.teachers has one entry, or none: model.teacher)
    per_sample = "per_sample"  # the row's problem tag picks its teacher (routing.by_tag): the MOPD standard
    mixture = "mixture"  # weighted average of the teachers' log-probs (model.teachers.*.weight)
    min_kl = "min_kl"  # per token: the teacher closest to π_old on the loss's support
    max_confidence = "max_confidence"  # per token: the most confident teacher (routing.confidence)
    alignment = "alignment"  # mixture weighted by each teacher's gradient alignment on a probe set


class Confidence(str, Enum):
    top1 = "top1"  # highest top-1 probability max_v q_i(v|h_t)
    entropy = "entropy"  # lowest entropy H(q_i(·|h_t)) (hf scorers: needs the full distribution)


class MixtureSpace(str, Enum):
    log = "log"  # log q = Σ_i w_i log q_i (the objective is Σ_i w_i KL(π‖q_i))
    prob = "prob"  # q = Σ_i w_i q_i (a proper mixture distribution)


class Residency(str, Enum):
    """Where the HF teachers wait between scorings (``routing.residency``)."""

    auto = "auto"  # all resident when they fit on their devices together, otherwise one at a time
    all = "all"  # every teacher stays on its device
    one = "one"  # one at a time: each teacher waits on the CPU and is moved to its device to score a batch


@dataclass
class AlignmentRouting:
    """``routing.rule=alignment``: every ``every`` steps (and before the first), the diagnostic (docs/methods.md) runs
    on ``n_questions`` probe problems of the training distribution, held out from training and evaluation, with the
    current student; teacher i's weight is softmax_i(ā_i / temperature) of its mean alignment ā_i over the defined
    nodes, for the run's loss (sampled-token, or LSM on the teacher's top-K)."""

    every: int = 50
    n_questions: int = 4
    rollouts_per_question: int = 2
    max_nodes: int = 4
    every_k: int = 32
    top_m: int = 3
    continuations: int = 4
    max_continuations: int = 16
    temperature: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("every", "n_questions", "rollouts_per_question", "max_nodes", "every_k", "top_m",
                     "continuations"):
            _check(getattr(self, name) >= 1, f"routing.alignment.{name}", getattr(self, name), "an integer >= 1")
        _check(self.max_continuations >= self.continuations, "routing.alignment.max_continuations",
               self.max_continuations, f"an integer >= routing.alignment.continuations ({self.continuations})")
        _check(self.temperature > 0, "routing.alignment.temperature", self.temperature, "> 0")


@dataclass
class RoutingConfig:
    """Multi-teacher routing. ``by_tag`` maps a problem tag (``Problem.tag``: ``ops3``/``ops4`` on the embedded
    task, the data-source field on math data) to a teacher name; ``default`` takes untagged or unlisted rows."""

    rule: str = RoutingRule.single.value  # a rule of RULES (checked at start-up): the built-ins or a plugin's
    by_tag: dict[str, str] = field(default_factory=dict)
    default: str | None = None
    confidence: Confidence = Confidence.top1
    mixture_space: MixtureSpace = MixtureSpace.log
    residency: Residency = Residency.auto
    alignment: AlignmentRouting = field(default_factory=AlignmentRouting)

    def __post_init__(self) -> None:
        _check(self.rule != RoutingRule.per_sample or bool(self.by_tag) or self.default is not None,
               "routing.by_tag", dict(self.by_tag), "a mapping tag → teacher name with routing.rule=per_sample")

    def check_teachers(self, names: list[str]) -> None:
        """Cross-field checks against the teacher names (``model.teachers``, or ``teacher``)."""
        allowed = ", ".join(names)
        for tag, teacher in self.by_tag.items():
            _check(teacher in names, f"routing.by_tag.{tag}", teacher, f"a teacher of model.teachers: {allowed}")
        _check(self.default is None or self.default in names, "routing.default", self.default,
               f"null or a teacher of model.teachers: {allowed}")
        _check(self.rule != RoutingRule.single or len(names) == 1, "routing.rule", self.rule,
               f"per_sample, mixture, min_kl, max_confidence or alignment with {len(names)} teachers ({allowed})")
