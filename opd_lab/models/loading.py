"""Load the student/teacher pair and their tokenizer; check that they share one vocabulary."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from opd_lab.config import ArithTaskConfig, Config, ConfigError, TeacherSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelPaths:
    student: str
    teacher: str
    tokenizer: str
    teachers: dict[str, str] = field(default_factory=dict)  # the training teachers: name → folder or hub id


def train_slice_task(task: ArithTaskConfig, spec: TeacherSpec) -> ArithTaskConfig:
    """The arithmetic task an embedded teacher is trained on: the task, narrowed by ``spec.train_slice``."""
    if spec.train_slice is None:
        return task
    return replace(task, **{k: v for k, v in asdict(spec.train_slice).items() if v is not None})


def resolve_paths(cfg: Config) -> ModelPaths:
    """Hub ids or local folders for student, teacher and tokenizer (``embedded`` is built/cached first)."""
    m = cfg.model
    student, teacher = m.student, m.teacher
    if "embedded" in (student, teacher):
        from opd_lab.models.embedded import resolve_role

        # The embedded pair is trained on the arithmetic task (the configured one, or its defaults when the run
        # uses another task, e.g. evaluating the embedded models on math fixtures).
        task = cfg.task if isinstance(cfg.task, ArithTaskConfig) else ArithTaskConfig()

        def embedded(role: str) -> str:
            return str(resolve_role(m.prepare, task, role, cfg.cache_dir, progress=cfg.logger.progress))

        student = embedded("student") if student == "embedded" else student
        teacher = embedded("teacher") if teacher == "embedded" else teacher
    teachers = {"teacher": teacher}
    if m.teachers:
        teachers = {}
        for name, spec in m.teachers.items():
            if spec.model == "embedded":
                from opd_lab.models.embedded import resolve_role

                arith = cfg.task if isinstance(cfg.task, ArithTaskConfig) else ArithTaskConfig()
                teachers[name] = str(resolve_role(m.prepare, train_slice_task(arith, spec), "teacher", cfg.cache_dir,
                                                  progress=cfg.logger.progress))
            else:
                teachers[name] = spec.model
    checks = [("model.student", student), ("model.teacher", teacher)]
    checks += [(f"model.teachers.{n}.model", v) for n, v in teachers.items() if m.teachers]
    for field_name, value in checks:
        _check_reachable(field_name, value)
    if cfg.eval.checkpoint:
        _check_reachable("eval.checkpoint", cfg.eval.checkpoint, always_local=True)
    return ModelPaths(student, teacher, m.tokenizer or student, teachers)


def _check_reachable(field_name: str, value: str, always_local: bool = False) -> None:
    """A local-looking path that does not exist is a config error, not a hub lookup deep in transformers."""
    looks_local = always_local or value.startswith(("/", "./", "../", "~")) or os.sep in value and value.count("/") != 1
    if looks_local and not Path(value).expanduser().exists():
        raise ConfigError(f"{field_name}={value!r}: no such folder; set {field_name} to a local "
                          "save_pretrained folder or a hub id")


@contextmanager
def loading(field_name: str, value: str):
    """Turn a failed hub/local load into one :class:`ConfigError` line that names the field to set."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:240] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{field_name}={value!r} could not be loaded ({type(e).__name__}: {first}); set "
                          f"{field_name} to a local save_pretrained folder or a reachable hub id") from None


def load_tokenizer(path: str, chat_template: str | None = None):
    """The tokenizer at ``path``, left-padded, with a pad token; ``chat_template`` (a file or template text)
    replaces its own template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if chat_template:
        p = Path(chat_template).expanduser()
        tok.chat_template = p.read_text() if "{" not in chat_template and p.is_file() else chat_template
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(path: str, dtype: str, device: str, trainable: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])
    model.to(device)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


def check_same_vocab(student_tok, teacher_tok, field_name: str = "model.teacher") -> None:
    """Hard error unless the two tokenizers have identical vocabularies and special ids (``field_name``: the
    teacher's config field, named in the message)."""
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ConfigError(f"{field_name}: student and teacher tokenizers differ (vocabulary); opd-lab needs one "
                          "shared vocabulary: set model.tokenizer or pick a matching pair")
    for attr in ("eos_token_id", "pad_token_id", "bos_token_id", "all_special_ids"):
        if getattr(student_tok, attr) != getattr(teacher_tok, attr):
            raise ConfigError(f"{field_name}: student and teacher tokenizers differ in {attr}: "
                              f"{getattr(student_tok, attr)} vs {getattr(teacher_tok, attr)}")
    if student_tok.chat_template != teacher_tok.chat_template:
        raise ConfigError(f"{field_name}: student and teacher tokenizers have different chat templates; set "
                          "model.chat_template to render both the same way")
