"""The ``model`` and ``task`` groups: the student/teacher pair (and how the embedded pair is built) and the
prompt source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omegaconf import MISSING

from opd_lab.config.base import LRSchedule, _check


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
    # Start a role from trained weights instead of from scratch (SFT then fine-tunes them): a folder name under
    # opd_lab/assets/embedded (``teacher``, ``student``, …) or a model folder path; same size as the role.
    teacher_init: str | None = None
    student_init: str | None = None
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("teacher_steps", "student_steps", "batch_size", "threads"):
            _check(getattr(self, name) >= 1, f"model.prepare.{name}", getattr(self, name), "an integer >= 1")
        _check(self.lr > 0, "model.prepare.lr", self.lr, "lr > 0")


@dataclass
class TrainSlice:
    """The slice of the arithmetic task an embedded teacher is trained on (a specialist); null fields keep the
    task's own value."""

    min_operands: int | None = None
    max_operands: int | None = None
    min_digits: int | None = None
    max_digits: int | None = None


@dataclass
class TeacherSpec:
    """One teacher of ``model.teachers``: a hub id, a local folder or ``embedded`` (built locally, on the whole
    task or on ``train_slice`` of it), where it is scored (null fields: the ``rollout.teacher_*`` settings) and its
    mixture weight (``routing.rule=mixture``)."""

    model: str = MISSING
    scorer: str | None = None  # hf | vllm | server (null: rollout.teacher_scorer)
    device: str | None = None  # hf scorer (null: rollout.teacher_device)
    server_url: str | None = None  # server scorer (null: rollout.teacher_server.url)
    weight: float = 1.0
    train_slice: TrainSlice | None = None  # embedded only: train this teacher on a slice of the task

    def validate(self, name: str) -> None:
        where = f"model.teachers.{name}"
        _check(bool(self.model), f"{where}.model", self.model, "a hub id, a local folder or 'embedded'")
        _check(self.scorer in (None, "hf", "vllm", "server"), f"{where}.scorer", self.scorer,
               "null, hf, vllm or server")
        _check(self.device is None or self.device == "cpu" or self.device.startswith("cuda"), f"{where}.device",
               self.device, "null, 'cpu' or 'cuda[:i]'")
        _check(self.server_url is None or self.server_url.startswith(("http://", "https://")),
               f"{where}.server_url", self.server_url, "null or an http(s):// URL")
        _check(math.isfinite(self.weight) and self.weight >= 0, f"{where}.weight", self.weight, "a finite weight >= 0")
        _check(self.train_slice is None or self.model == "embedded", f"{where}.train_slice", self.train_slice,
               "null unless model is 'embedded' (only the embedded teacher is trained here)")


@dataclass
class ModelConfig:
    """Student/teacher pair: hub ids or local ``save_pretrained`` folders, or ``embedded`` (built locally).

    ``teachers`` (name → :class:`TeacherSpec`) makes it multi-teacher OPD (``routing`` decides which teacher scores
    each token); empty, the one teacher is ``teacher``, exactly as before."""

    name: str = MISSING
    student: str = MISSING
    teacher: str = MISSING
    teachers: dict[str, TeacherSpec] = field(default_factory=dict)
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
        for name, spec in self.teachers.items():
            spec.validate(name)
        _check(not self.teachers or sum(s.weight for s in self.teachers.values()) > 0, "model.teachers.*.weight",
               {n: s.weight for n, s in self.teachers.items()}, "weights whose sum is > 0")
        is_embedded = "embedded" in (self.student, self.teacher, *(s.model for s in self.teachers.values()))
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
    tag_field: str | None = None  # dotted path of a record's tag (per-sample routing); null: the set's name

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
