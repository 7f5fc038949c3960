"""Structured-config schemas of every Hydra group (no torch import here).

Each group has a ``base_<group>`` schema in Hydra's ConfigStore; the YAML files under ``conf/<group>/`` start
with ``defaults: [base_<group>]`` and hold values only. Hydra rejects unknown keys and wrong types at
composition; closed choices are Enums (OmegaConf lists the allowed values); ranges are checked in
``__post_init__``, which runs when :func:`to_run_config` turns the composed config into these dataclasses,
before any model is loaded. Every error names the field (dotted path) and what is allowed.

Symbols follow ``METHODS.md``: ``tau`` (gate temperature), ``top_k`` (K), ``reuse`` (R), ``gamma`` (γ),
``clip_eps`` (ε), ``dual_clip`` (c).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is out of range; the message names the field and the allowed values."""


def _check(ok: bool, path: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{path}={value!r} is invalid: allowed {allowed}")


# --------------------------------------------------------------------------------------------------- loss
class SpecialMask(str, Enum):
    none = "none"
    first = "first"
    all = "all"


class Support(str, Enum):
    teacher = "teacher"
    student = "student"
    union = "union"


@dataclass
class LossConfig:
    """Fields shared by every loss: which sampled tokens are masked (m_t = 0) as special tokens (the strings are
    ``model.special_tokens``) and the rollout top-p the loss is published with (``rollout.top_p`` defaults to it)."""

    name: str = MISSING
    mask_special: SpecialMask = SpecialMask.first
    rollout_top_p: float = 1.0

    def _validate(self) -> None:
        pass

    def __post_init__(self) -> None:
        _check(0 < self.rollout_top_p <= 1, "loss.rollout_top_p", self.rollout_top_p, "0 < rollout_top_p <= 1")
        self._validate()


@dataclass
class SampledTokenLossConfig(LossConfig):
    """PPO-style sampled-token OPD: A_t from r_t = log q − log π_old, clip ε, dual clip c, discount γ."""

    name: str = "sampled_token"
    rollout_top_p: float = 1.0  # as published: top-p was applied to the LSM runs only (METHODS.md)
    clip_eps: float = 0.2
    dual_clip: float = 3.0
    gamma: float = 0.0
    clip_log_ratio: float | None = 5.0

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
class GateKind(str, Enum):
    none = "none"
    token = "token"
    sequence = "sequence"
    block = "block"
    span = "span"


@dataclass
class GateConfig:
    """Blockwise policy-drift gate g_t = exp(−τ·|m_G|), normalised to unit mean over the optimizer update, then
    optionally clipped to [clip_min, clip_max]. ``block_size`` belongs to ``kind=block`` only."""

    kind: GateKind = GateKind.none
    block_size: int | None = None
    tau: float = 1.0
    clip_min: float | None = None
    clip_max: float | None = None

    def __post_init__(self) -> None:
        block = self.kind == GateKind.block
        _check(block == (self.block_size is not None), "gate.block_size", self.block_size,
               "an integer >= 1 with gate.kind=block (gate=block32|block64|block128), and null with any other kind")
        _check(not block or self.block_size >= 1, "gate.block_size", self.block_size, "an integer >= 1")
        _check(self.tau >= 0.0, "gate.tau", self.tau, "tau >= 0")
        clip = (self.clip_min, self.clip_max)
        _check(self.kind != GateKind.none or clip == (None, None), "gate.clip_min/clip_max", clip,
               "null with gate=none (there is no gate to clip)")
        lo = 0.0 if self.clip_min is None else self.clip_min
        hi = float("inf") if self.clip_max is None else self.clip_max
        _check(0.0 <= lo <= 1.0 <= hi and lo < hi, "gate.clip_min/clip_max", clip,
               "0 <= clip_min <= 1 <= clip_max with clip_min < clip_max (a clip must keep the unit gate)")


# ------------------------------------------------------------------------------------------------ rollout
class Backend(str, Enum):
    """Who samples (``rollout.engine``) or scores the teacher (``rollout.teacher_scorer``)."""

    hf = "hf"
    vllm = "vllm"


class TeacherScorer(str, Enum):
    """Who scores the teacher (``rollout.teacher_scorer``)."""

    hf = "hf"  # a transformers forward of the teacher, on rollout.teacher_device
    vllm = "vllm"  # an in-process vLLM engine: prompt log-probs with top-K
    server = "server"  # a running vLLM OpenAI-compatible server (rollout.teacher_server): prompt log-probs with top-K


@dataclass
class TeacherServerConfig:
    """A vLLM server serving the teacher (``vllm serve <teacher> --max-logprobs K``), for
    ``rollout.teacher_scorer=server``: one teacher shared by many learners, on other GPUs or machines."""

    url: str | None = None  # e.g. http://teacher-node:8000 (the /v1/completions endpoint is used)
    model: str | None = None  # the served model name (null: the server's first model)
    timeout_s: float = 600.0
    batch_size: int = 64  # sequences per request
    api_key_env: str = "OPENAI_API_KEY"  # sent as a bearer token when this environment variable is set

    def __post_init__(self) -> None:
        _check(self.url is None or self.url.startswith(("http://", "https://")), "rollout.teacher_server.url",
               self.url, "null or an http(s):// URL")
        _check(self.timeout_s > 0, "rollout.teacher_server.timeout_s", self.timeout_s, "> 0")
        _check(self.batch_size >= 1, "rollout.teacher_server.batch_size", self.batch_size, "an integer >= 1")


@dataclass
class VLLMConfig:
    """vLLM engine settings (``rollout.engine=vllm`` and/or ``rollout.teacher_scorer=vllm``)."""

    max_model_len: int = 1024
    enforce_eager: bool = True
    kv_cache_gib: float = 1.0  # CPU: VLLM_CPU_KVCACHE_SPACE (unset, vLLM reserves ~8 GiB)
    gpu_memory_utilization: float = 0.3  # GPU: share of the device the engine may take (learner shares it)
    sleep_mode: bool = False  # GPU: free the engine's memory while the learner runs
    max_logprobs: int = 64
    max_num_batched_tokens: int = 16384  # CPU: tokens per scheduler step (whole prompts, no chunked prefill)

    def __post_init__(self) -> None:
        _check(self.max_model_len >= 16, "rollout.vllm.max_model_len", self.max_model_len, ">= 16")
        _check(self.max_logprobs >= 1, "rollout.vllm.max_logprobs", self.max_logprobs, "an integer >= 1")
        _check(self.kv_cache_gib > 0, "rollout.vllm.kv_cache_gib", self.kv_cache_gib, "> 0")
        _check(0 < self.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization",
               self.gpu_memory_utilization, "0 < value <= 1")


@dataclass
class RolloutConfig:
    """Sampling, batch layout and the reuse count R (optimisation passes per rollout batch)."""

    engine: Backend = Backend.vllm
    teacher_scorer: TeacherScorer = TeacherScorer.hf
    teacher_device: str | None = None  # hf scorer: where the teacher lives (null: the learner's device; e.g. cuda:1)
    teacher_server: TeacherServerConfig = field(default_factory=TeacherServerConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    n_prompts: int = 8
    n_samples: int = 4
    temperature: float = 1.0
    top_p: float = 0.9
    max_tokens: int = 256
    reuse: int = 2
    mini_batch_size: int = 16

    @property
    def batch_size(self) -> int:
        return self.n_prompts * self.n_samples

    def __post_init__(self) -> None:
        for name in ("n_prompts", "n_samples", "max_tokens", "reuse", "mini_batch_size"):
            _check(getattr(self, name) >= 1, f"rollout.{name}", getattr(self, name), "an integer >= 1")
        _check(self.temperature > 0, "rollout.temperature", self.temperature, "temperature > 0")
        _check(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "0 < top_p <= 1")
        _check(self.teacher_device is None or self.teacher_device == "cpu" or self.teacher_device.startswith("cuda"),
               "rollout.teacher_device", self.teacher_device, "null, 'cpu' or 'cuda[:i]'")
        _check(self.teacher_scorer != TeacherScorer.server or self.teacher_server.url is not None,
               "rollout.teacher_server.url", self.teacher_server.url,
               "the server's URL (http://host:port) when rollout.teacher_scorer=server")
        _check(
            self.batch_size % self.mini_batch_size == 0,
            "rollout.mini_batch_size",
            self.mini_batch_size,
            f"a divisor of the rollout batch n_prompts*n_samples={self.batch_size}",
        )


# -------------------------------------------------------------------------------------------------- model
@dataclass
class EmbeddedModelSize:
    """A Qwen3Config shape for an embedded model (head_dim 32: a size vLLM's CPU attention supports)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32


class LRSchedule(str, Enum):
    cosine = "cosine"
    constant = "constant"


@dataclass
class PrepareConfig:
    """How the embedded teacher and student are built (each role cached under a hash of its own settings)."""

    seed: int = 0
    teacher: EmbeddedModelSize = field(default_factory=EmbeddedModelSize)
    student: EmbeddedModelSize = field(default_factory=EmbeddedModelSize)
    teacher_steps: int = 1000
    student_steps: int = 150
    teacher_schedule: LRSchedule = LRSchedule.cosine
    student_schedule: LRSchedule = LRSchedule.constant
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("teacher_steps", "student_steps", "batch_size", "threads"):
            _check(getattr(self, name) >= 1, f"model.prepare.{name}", getattr(self, name), "an integer >= 1")
        _check(self.lr > 0, "model.prepare.lr", self.lr, "lr > 0")


@dataclass
class ModelConfig:
    """Student/teacher pair: hub ids or local ``save_pretrained`` folders, or ``embedded`` (built locally)."""

    name: str = MISSING
    student: str = MISSING
    teacher: str = MISSING
    tokenizer: str | None = None
    dtype: str = "float32"
    # Sampled tokens masked out of the loss (loss.mask_special); each must be a single token of the tokenizer.
    special_tokens: list[str] = field(default_factory=lambda: ["<think>", "</think>", "<|im_end|>"])
    prepare: PrepareConfig | None = None
    chat_template: str | None = None  # a .jinja file or template text replacing the tokenizer's own
    enable_thinking: bool | None = None  # passed to the chat template (Qwen3 thinking mode); null: template default

    def __post_init__(self) -> None:
        _check(
            self.dtype in ("float32", "bfloat16", "float16"),
            "model.dtype",
            self.dtype,
            "one of float32, bfloat16, float16",
        )
        is_embedded = self.student == "embedded" or self.teacher == "embedded"
        _check(
            not is_embedded or self.prepare is not None,
            "model.prepare",
            self.prepare,
            "a PrepareConfig when student/teacher is 'embedded'",
        )


# --------------------------------------------------------------------------------------------------- task
@dataclass
class TaskConfig:
    name: str = MISSING


@dataclass
class ArithTaskConfig(TaskConfig):
    """Embedded multi-operand addition (see ``opd_lab.tasks.arith``)."""

    name: str = "arith"
    min_operands: int = 3
    max_operands: int = 4
    min_digits: int = 2
    max_digits: int = 4
    n_eval: int = 64
    eval_seed: int = 1234

    def __post_init__(self) -> None:
        _check(2 <= self.min_operands <= self.max_operands, "task.min_operands/max_operands",
               (self.min_operands, self.max_operands), "2 <= min_operands <= max_operands")
        _check(1 <= self.min_digits <= self.max_digits, "task.min_digits/max_digits",
               (self.min_digits, self.max_digits), "1 <= min_digits <= max_digits")
        _check(self.n_eval >= 1, "task.n_eval", self.n_eval, "an integer >= 1")


@dataclass
class DatasetConfig:
    """One prompt set: a ``datasets`` hub id (with ``subset``/``split``) or a local .jsonl/.json/.parquet file or
    folder, and the dotted paths of the question and answer fields (list indices allowed: ``prompt.0.content``)."""

    path: str = MISSING
    split: str = "test"
    subset: str | None = None
    question_field: str = "problem"
    answer_field: str = "answer"
    limit: int | None = None  # first N records only

    def __post_init__(self) -> None:
        _check(bool(self.path), "task.*.path", self.path, "a hub id or a local file")
        _check(self.limit is None or self.limit >= 1, "task.*.limit", self.limit, "null or an integer >= 1")


MATH_PROMPT = "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."


@dataclass
class MathTaskConfig(TaskConfig):
    """Math prompts (question → boxed answer) for training and named evaluation benchmarks, graded by
    math-verify. ``prompt_template`` is filled with ``{question}``."""

    name: str = "math"
    train: DatasetConfig = field(default_factory=DatasetConfig)
    eval: dict[str, DatasetConfig] = field(default_factory=dict)
    prompt_template: str = MATH_PROMPT
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        _check("{question}" in self.prompt_template, "task.prompt_template", self.prompt_template,
               "a template containing {question}")
        _check(len(self.eval) >= 1, "task.eval", dict(self.eval), "at least one named benchmark")


# ------------------------------------------------------------------------------------------------ trainer
class LossPath(str, Enum):
    plain = "plain"
    chunked = "chunked"


class Parallel(str, Enum):
    """How ranks started by torchrun share the learner (``trainer.parallel``; ignored by a single process)."""

    ddp = "ddp"  # DistributedDataParallel: every rank holds the whole student and its Adam moments
    fsdp2 = "fsdp2"  # fully_shard per decoder layer + root: weights, gradients and Adam moments sharded


class DistBackend(str, Enum):
    auto = "auto"  # nccl on CUDA, gloo on CPU
    nccl = "nccl"
    gloo = "gloo"


@dataclass
class TrainerConfig:
    """Optimisation: ``steps`` rollout batches, each giving reuse × (batch / mini_batch_size) AdamW updates."""

    steps: int = 40
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    lr_schedule: LRSchedule = LRSchedule.cosine  # after warm-up: cosine decay to min_lr_ratio·lr, or constant
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    loss_path: LossPath = LossPath.chunked  # chunked: LM head over chunk_size positions at a time, recomputed
    chunk_size: int = 1024  # positions per log-sum-exp / LM-head chunk
    checkpoint_every: int = 0  # steps between resumable checkpoints (0: only the final model)
    keep_checkpoints: int = 2  # how many resumable checkpoints to keep (newest)
    resume: str = "never"  # never | auto (this run dir, or the latest unfinished run with the same config) | a run dir
    max_bad_updates: int = 3  # abort after this many consecutive updates skipped for a non-finite loss/grad norm
    autocast_bf16: bool = False  # bf16 autocast of the student forward, π_old included (log-prob maths stays float32)
    parallel: Parallel = Parallel.ddp  # under torchrun: ddp | fsdp2 (README "Beyond one GPU")
    dist_backend: DistBackend = DistBackend.auto
    dist_timeout_min: int = 30  # a collective waiting longer than this fails the run (a dead rank)

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "trainer.steps", self.steps, "an integer >= 0")
        _check(self.lr > 0, "trainer.lr", self.lr, "lr > 0")
        _check(self.weight_decay >= 0, "trainer.weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "trainer.beta1/beta2", (self.beta1, self.beta2),
               "values in [0, 1)")
        _check(self.warmup_steps >= 0, "trainer.warmup_steps", self.warmup_steps, ">= 0")
        _check(self.steps == 0 or self.warmup_steps < self.steps, "trainer.warmup_steps", self.warmup_steps,
               f"fewer than trainer.steps={self.steps} (warm-up would take every update of the run)")
        _check(0 <= self.min_lr_ratio <= 1, "trainer.min_lr_ratio", self.min_lr_ratio, "0 <= min_lr_ratio <= 1")
        _check(self.grad_clip is None or self.grad_clip > 0, "trainer.grad_clip", self.grad_clip, "null or > 0")
        _check(self.grad_accum >= 1, "trainer.grad_accum", self.grad_accum, "an integer >= 1")
        _check(self.checkpoint_every >= 0, "trainer.checkpoint_every", self.checkpoint_every,
               "0 (final model only) or a step interval >= 1")
        _check(self.keep_checkpoints >= 1, "trainer.keep_checkpoints", self.keep_checkpoints, "an integer >= 1")
        _check(bool(self.resume), "trainer.resume", self.resume, "never, auto, or a run directory")
        _check(self.max_bad_updates >= 1, "trainer.max_bad_updates", self.max_bad_updates, "an integer >= 1")
        _check(self.device == "cpu" or self.device.startswith("cuda"), "trainer.device", self.device,
               "'cpu' or 'cuda[:i]'")
        _check(self.chunk_size >= 1, "trainer.chunk_size", self.chunk_size, "an integer >= 1")
        _check(self.dist_timeout_min >= 1, "trainer.dist_timeout_min", self.dist_timeout_min, "an integer >= 1")
        _check(self.dist_backend != DistBackend.nccl or self.device.startswith("cuda"), "trainer.dist_backend",
               self.dist_backend.value, "gloo or auto with trainer.device=cpu (nccl needs CUDA)")
        _check(not (self.parallel == Parallel.fsdp2 and self.device.startswith("cuda")
                    and self.dist_backend == DistBackend.gloo), "trainer.dist_backend", self.dist_backend.value,
               "nccl or auto with trainer.parallel=fsdp2 on CUDA (FSDP2's collectives on CUDA tensors need NCCL; "
               "gloo crashed on an H100)")


# ----------------------------------------------------------------------------------------------- evaluate
class EvalTarget(str, Enum):
    student = "student"
    teacher = "teacher"


@dataclass
class EvalConfig:
    """pass@k on the held-out split with n samples per problem (unbiased estimator).

    ``only`` makes the run evaluation-only: null trains then evaluates; ``student``/``teacher`` evaluates that
    untrained model and trains nothing (the two untrained variants of a benchmark, whatever ``trainer.steps``).
    """

    n_samples: int = 8
    ks: list[int] = field(default_factory=lambda: [1, 8])
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 1234
    every: int = 0
    baselines: bool = True
    only: EvalTarget | None = None
    checkpoint: str | None = None  # evaluation only: a saved model folder to evaluate instead of eval.only

    def __post_init__(self) -> None:
        _check(self.n_samples >= 1, "eval.n_samples", self.n_samples, "an integer >= 1")
        _check(len(self.ks) > 0 and all(1 <= k <= self.n_samples for k in self.ks), "eval.ks", self.ks,
               f"a non-empty list of k with 1 <= k <= eval.n_samples={self.n_samples}")
        _check(len(set(self.ks)) == len(self.ks), "eval.ks", list(self.ks), "distinct values of k")
        _check(self.temperature > 0, "eval.temperature", self.temperature, "temperature > 0")
        _check(0 < self.top_p <= 1, "eval.top_p", self.top_p, "0 < top_p <= 1")
        _check(self.every >= 0, "eval.every", self.every, "0 (only at the end) or a step interval >= 1")


# ------------------------------------------------------------------------------------------------- logger
class WandbMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "opd-lab"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True


# --------------------------------------------------------------------------------------------- diagnose
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
    """Gradient-alignment diagnostic (``python -m opd_lab.diagnose``; METHODS.md)."""

    n_questions: int = 16
    rollouts_per_question: int = 2
    node_mode: NodeMode = NodeMode.every_k  # every_k: positions 0, k, 2k, …; top_entropy: highest-entropy positions
    every_k: int = 24
    max_nodes: int = 8  # per rollout
    top_m: int = 3  # candidates: the student's top-m tokens plus the sampled token
    rest: RestMode = RestMode.drop  # the other tokens: dropped (π renormalised on the candidates) or one shared Q
    continuations: int = 8  # M targeted continuations per candidate
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
        _check(self.max_tokens is None or self.max_tokens >= 1, "diagnose.max_tokens", self.max_tokens,
               "null or an integer >= 1")
        bad = [x for x in self.losses if x not in ("sampled_token", "lsm", "full_rkl")]
        _check(len(self.losses) > 0 and not bad, "diagnose.losses", list(self.losses),
               "a non-empty list of sampled_token, lsm, full_rkl")
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


# ------------------------------------------------------------------------------------------------- root
@dataclass
class Config:
    loss: Any = MISSING
    gate: GateConfig = MISSING
    rollout: RolloutConfig = MISSING
    model: ModelConfig = MISSING
    task: Any = MISSING
    trainer: TrainerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    diagnose: DiagnoseConfig | None = None  # set by conf/diagnose.yaml (python -m opd_lab.diagnose)
    variant: str = ""  # a label for sweeps and reports (set by conf/variant/*); empty: derived from loss and gate
    cache_dir: str = "${oc.env:OPD_LAB_CACHE,${oc.env:HOME}/.cache/opd_lab}"
    output_dir: str = "${hydra:runtime.output_dir}"


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="loss", name="base_loss_sampled_token", node=SampledTokenLossConfig)
    cs.store(group="loss", name="base_loss_lsm", node=LSMLossConfig)
    cs.store(group="gate", name="base_gate", node=GateConfig)
    cs.store(group="rollout", name="base_rollout", node=RolloutConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="task", name="base_task_arith", node=ArithTaskConfig)
    cs.store(group="task", name="base_task_math", node=MathTaskConfig)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)
    cs.store(group="logger", name="base_logger", node=LoggerConfig)
    cs.store(group="diagnose", name="base_diagnose", node=DiagnoseConfig)


def to_run_config(cfg: DictConfig) -> Config:
    """Turn a composed config into validated dataclasses; range errors become :class:`ConfigError`.

    Also runs the cross-group checks that no single schema can make.
    """
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
    for name in ("loss", "task"):
        _check(is_dataclass(getattr(run, name)), name, getattr(run, name), "an option of the config group")
    scorer = run.rollout.teacher_scorer
    if scorer in (TeacherScorer.vllm, TeacherScorer.server):
        _check(run.rollout.temperature == 1.0, "rollout.teacher_scorer", scorer.value,
               "hf when rollout.temperature != 1 (vLLM prompt log-probs ignore temperature)")
        lsm = isinstance(run.loss, LSMLossConfig)
        _check(not lsm or run.loss.support == Support.teacher, "rollout.teacher_scorer", scorer.value,
               "hf when loss.support is student or union (vLLM returns the teacher's top-K only)")
        _check(not lsm or run.loss.top_k <= run.rollout.vllm.max_logprobs, "loss.top_k",
               getattr(run.loss, "top_k", None), f"<= rollout.vllm.max_logprobs={run.rollout.vllm.max_logprobs}")
    _check(run.eval.checkpoint is None or run.eval.only is not None, "eval.checkpoint", run.eval.checkpoint,
           "null unless eval.only is set (an evaluation-only run)")
    uses_vllm = Backend.vllm in (run.rollout.engine,) or scorer == TeacherScorer.vllm
    for name, cap in (("rollout.max_tokens", run.rollout.max_tokens), ("eval.max_tokens", run.eval.max_tokens)):
        _check(not uses_vllm or cap < run.rollout.vllm.max_model_len, name, cap,
               f"< rollout.vllm.max_model_len={run.rollout.vllm.max_model_len} (prompt + response must fit)")
    mb = run.rollout.mini_batch_size
    _check(
        run.trainer.grad_accum <= mb,
        "trainer.grad_accum",
        run.trainer.grad_accum,
        f"<= rollout.mini_batch_size={mb} (each micro-batch holds at least one sequence)",
    )
    return run


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
