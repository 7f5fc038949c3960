"""Structured-config schemas of every Hydra group (no torch import here).

One module per group (``loss`` (with ``gate``), ``rollout``, ``model`` (with ``task``), ``trainer`` (with
``eval`` and ``logger``), ``diagnose``), all re-exported here. Each group has a ``base_<group>`` schema in
Hydra's ConfigStore; the YAML files under ``conf/<group>/`` start with ``defaults: [base_<group>]`` and hold
values only. Hydra rejects unknown keys and wrong types at
composition; closed choices are Enums (OmegaConf lists the allowed values); ranges are checked in
``__post_init__``, which runs when :func:`to_run_config` turns the composed config into these dataclasses,
before any model is loaded. Every error names the field (dotted path) and what is allowed.

Symbols follow ``docs/methods.md``: ``tau`` (gate temperature), ``top_k`` (K), ``reuse`` (R), ``gamma`` (γ),
``clip_eps`` (ε), ``dual_clip`` (c).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from enum import Enum
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from opd_lab.common import plugins
from opd_lab.config.base import (  # noqa: F401
    ConfigError,
    LRSchedule,
    _check,
)
from opd_lab.config.diagnose import (  # noqa: F401
    DiagnoseConfig,
    DiagnoseTeacher,
    NodeMode,
    RestMode,
)
from opd_lab.config.loss import (  # noqa: F401
    GateConfig,
    GateKind,
    GateReference,
    LossConfig,
    LSMLossConfig,
    OffPolicy,
    RewardReference,
    SampledTokenLossConfig,
    SpecialMask,
    Support,
)
from opd_lab.config.model import (  # noqa: F401
    MATH_PROMPT,
    ArithTaskConfig,
    DatasetConfig,
    EmbeddedModelSize,
    MathTaskConfig,
    ModelConfig,
    PrepareConfig,
    TaskConfig,
    TeacherSpec,
    TrainSlice,
)
from opd_lab.config.rollout import (  # noqa: F401
    Backend,
    RolloutConfig,
    TeacherScorer,
    TeacherServerConfig,
    VLLMConfig,
)
from opd_lab.config.routing import (  # noqa: F401
    AlignmentRouting,
    Confidence,
    MixtureSpace,
    Residency,
    RoutingConfig,
    RoutingRule,
)
from opd_lab.config.trainer import (  # noqa: F401
    DistBackend,
    EvalConfig,
    EvalTarget,
    LoggerConfig,
    LossPath,
    Parallel,
    TrainerConfig,
    WandbConfig,
    WandbMode,
)


# ------------------------------------------------------------------------------------------------- root
@dataclass
class Config:
    loss: Any = MISSING
    gate: GateConfig = MISSING
    rollout: RolloutConfig = MISSING
    model: ModelConfig = MISSING
    task: Any = MISSING
    trainer: TrainerConfig = MISSING
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    diagnose: DiagnoseConfig | None = None  # set by conf/diagnose.yaml (python -m opd_lab.diagnose)
    plugins: list[str] = field(default_factory=list)  # modules/files with a researcher's own pieces (docs/extending.md)
    variant: str = ""  # a label for sweeps and reports (set by conf/variant/*); empty: derived from loss and gate
    cache_dir: str = "${oc.env:OPD_LAB_CACHE,${oc.env:HOME}/.cache/opd_lab}"
    output_dir: str = "${hydra:runtime.output_dir}"


SCHEMAS: dict[str, type] = {
    "base_config": Config,
    "base_loss_sampled_token": SampledTokenLossConfig,
    "base_loss_lsm": LSMLossConfig,
    "base_gate": GateConfig,
    "base_rollout": RolloutConfig,
    "base_model": ModelConfig,
    "base_task_arith": ArithTaskConfig,
    "base_task_math": MathTaskConfig,
    "base_trainer": TrainerConfig,
    "base_logger": LoggerConfig,
    "base_diagnose": DiagnoseConfig,
    "base_routing": RoutingConfig,
}


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent).

    The schemas sit at the top level, outside every group, so that ``--help`` lists only real options and
    ``gate=base_gate`` is refused (Hydra: "Could not find 'gate/base_gate'", with the available options); a group's
    YAML file pulls its schema in with ``defaults: [/base_<group>@_here_]``. A plugin stores its own schema the
    same way (docs/extending.md).
    """
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=name, node=node)


def to_run_config(cfg: DictConfig) -> Config:
    """Turn a composed config into validated dataclasses; range errors become :class:`ConfigError`.

    Also runs the cross-group checks that no single schema can make.
    """
    plugins.load(cfg.get("plugins"))  # a worker (SLURM launcher) imports them here; the entry points did already
    try:
        run = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as e:  # OmegaConf wraps errors raised by __post_init__
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        msg = getattr(e, "msg", None) or str(e)
        raise ConfigError(msg.split("\n")[0]) from None
    assert isinstance(run, Config)
    if run.eval.ks is None:
        run.eval.ks = run.eval.default_ks()
    for name in ("loss", "task"):
        _check(is_dataclass(getattr(run, name)), name, getattr(run, name), "an option of the config group")
    check_scorers(run)
    run.routing.check_teachers(teacher_names(run))
    mixed = run.routing.rule in (RoutingRule.mixture, RoutingRule.alignment) and len(teacher_names(run)) > 1
    _check(not (mixed and run.routing.mixture_space == MixtureSpace.log and getattr(run.loss, "tail", False)),
           "loss.tail", getattr(run.loss, "tail", None),
           "false with a log-space mixture of teachers (routing.rule=mixture|alignment, routing.mixture_space=log): "
           "the geometric mixture Π_i q_i^{w_i} is not normalised, so its tail bucket 1 − Σ_S q is not a "
           "probability; use routing.mixture_space=prob or loss.tail=false")
    for name, spec in run.model.teachers.items():
        if spec.train_slice is not None and isinstance(run.task, ArithTaskConfig):
            narrowed = {k: v for k, v in asdict(spec.train_slice).items() if v is not None}
            try:
                replace(run.task, **narrowed)
            except ConfigError as e:
                raise ConfigError(f"model.teachers.{name}.train_slice={narrowed} is invalid on this task "
                                  f"({e})") from None
    _check(run.eval.checkpoint is None or run.eval.only is not None, "eval.checkpoint", run.eval.checkpoint,
           "null unless eval.only is set (an evaluation-only run)")
    check_vllm_lengths(run)
    mb = run.rollout.mini_batch_size
    _check(
        run.trainer.grad_accum <= mb,
        "trainer.grad_accum",
        run.trainer.grad_accum,
        f"<= rollout.mini_batch_size={mb} (each micro-batch holds at least one sequence)",
    )
    return run


def check_scorers(run: Config) -> None:
    """What a vLLM or server teacher scorer cannot give: another temperature, a student/union support, more than
    ``max_logprobs`` ids, the entropy, a mixture's cross-scoring, the alignment probe's logits."""
    for field_name, used in teacher_scorers(run):
        if used in (TeacherScorer.vllm, TeacherScorer.server):
            _check(run.rollout.temperature == 1.0, field_name, used.value,
                   "hf when rollout.temperature != 1 (vLLM prompt log-probs ignore temperature)")
            lsm = isinstance(run.loss, LSMLossConfig)
            _check(not lsm or run.loss.support == Support.teacher, field_name, used.value,
                   "hf when loss.support is student or union (vLLM returns the teacher's top-K only)")
            _check(not lsm or run.loss.top_k <= run.rollout.vllm.max_logprobs, "loss.top_k",
                   getattr(run.loss, "top_k", None), f"<= rollout.vllm.max_logprobs={run.rollout.vllm.max_logprobs}")
            _check(run.routing.rule != RoutingRule.max_confidence or run.routing.confidence != Confidence.entropy,
                   field_name, used.value, "hf with routing.confidence=entropy (the entropy needs the full "
                   "distribution; vLLM returns the top-K only)")
            _check(run.routing.rule != RoutingRule.mixture or not isinstance(run.loss, LSMLossConfig), field_name,
                   used.value, "hf with routing.rule=mixture and loss=lsm (the mixture's support needs every "
                   "teacher's log-probs at the other teachers' top-K ids)")
            _check(run.routing.rule != RoutingRule.alignment, field_name, used.value,
                   "hf with routing.rule=alignment (the alignment probe needs each teacher's logits at its nodes)")


def check_vllm_lengths(run: Config) -> None:
    """With a vLLM engine or scorer, every response cap must leave room for a prompt in ``rollout.vllm.max_model_len``
    (run again once ``rollout.engine=auto`` is resolved)."""
    uses_vllm = run.rollout.engine == Backend.vllm or any(s == TeacherScorer.vllm for _, s in teacher_scorers(run))
    for name, cap in (("rollout.max_tokens", run.rollout.max_tokens), ("eval.max_tokens", run.eval.max_tokens)):
        _check(not uses_vllm or cap < run.rollout.vllm.max_model_len, name, cap,
               f"< rollout.vllm.max_model_len={run.rollout.vllm.max_model_len} (prompt + response must fit)")


def staleness_notes(run: Config) -> list[str]:
    """Start-up lines about staleness: for a synchronous run (``rollout.staleness=0``), one for each correction it
    names (π_prox = π_b there, so it is a no-op; ``loss.reward_reference=current`` is none: it follows π_θ through a
    step's updates); for an asynchronous sampled-token run with the published reward, one warning pointing at the
    correction that the staleness map found safe."""
    reward = getattr(run.loss, "reward_reference", None)
    if run.rollout.staleness:  # results/staleness_map: the published sampled-token reward collapses when stale
        return [] if reward != RewardReference.behaviour else [
            f"rollout.staleness={run.rollout.staleness} with the published sampled-token reward collapsed in every "
            "seed of results/staleness_map; correction=current_decoupled (loss.reward_reference=current "
            "loss.off_policy=decoupled) matched k = 0 at k = 1, 2"]
    named = [f"loss.off_policy={run.loss.off_policy.value}"] if run.loss.off_policy != OffPolicy.none else []
    named += ["loss.reward_reference=proximal"] if reward == RewardReference.proximal else []
    named += ["gate.reference=proximal"] if run.gate.reference == GateReference.proximal else []
    notes = [f"{', '.join(named)}: a no-op with rollout.staleness=0 (π_prox = π_b); the run equals the uncorrected "
             "one"] if named else []
    if reward == RewardReference.current:
        notes.append("loss.reward_reference=current with rollout.staleness=0: the first update of each step equals "
                     "the published reward's; the later ones take r_t against the current weights (reuse drift)")
    return notes


def teacher_names(run: Config) -> list[str]:
    """The training teachers' names: ``model.teachers``, or ``teacher`` (``model.teacher``) when it is empty."""
    return list(run.model.teachers) or ["teacher"]


def teacher_scorers(run: Config) -> list[tuple[str, TeacherScorer]]:
    """``(field, scorer)`` of every training teacher: its own ``scorer`` or ``rollout.teacher_scorer``."""
    if not run.model.teachers:
        return [("rollout.teacher_scorer", run.rollout.teacher_scorer)]
    return [(f"model.teachers.{n}.scorer" if s.scorer else "rollout.teacher_scorer",
             TeacherScorer(s.scorer) if s.scorer else run.rollout.teacher_scorer)
            for n, s in run.model.teachers.items()]


def as_flat_dict(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config dataclass to ``{'a.b': value}`` (Enums as their values) for logging."""
    out: dict[str, Any] = {}
    if is_dataclass(obj):
        for f in fields(obj):
            out.update(as_flat_dict(getattr(obj, f.name), f"{prefix}{f.name}."))
        return out
    key = prefix[:-1]
    out[key] = obj.value if isinstance(obj, Enum) else obj
    return out
