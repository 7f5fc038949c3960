"""Load the student/teacher pair and their tokenizer; check that they share one vocabulary."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from opd_lab.config import Config, ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelPaths:
    student: str
    teacher: str
    tokenizer: str


def resolve_paths(cfg: Config) -> ModelPaths:
    """Hub ids or local folders for student, teacher and tokenizer (``embedded`` is built/cached first)."""
    m = cfg.model
    student, teacher = m.student, m.teacher
    if "embedded" in (student, teacher):
        from opd_lab.prepare import resolve_role

        def embedded(role: str) -> str:
            return str(resolve_role(m.prepare, cfg.task, role, cfg.cache_dir, progress=cfg.logger.progress))

        student = embedded("student") if student == "embedded" else student
        teacher = embedded("teacher") if teacher == "embedded" else teacher
    for field_name, value in (("model.student", student), ("model.teacher", teacher)):
        _check_reachable(field_name, value)
    return ModelPaths(student, teacher, m.tokenizer or student)


def _check_reachable(field_name: str, value: str) -> None:
    """A local-looking path that does not exist is a config error, not a hub lookup deep in transformers."""
    looks_local = value.startswith(("/", "./", "../", "~")) or os.sep in value and value.count("/") != 1
    if looks_local and not Path(value).expanduser().exists():
        raise ConfigError(f"{field_name}={value!r}: no such folder; set {field_name} to a local "
                          "save_pretrained folder or a hub id")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
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


def check_same_vocab(student_tok, teacher_tok) -> None:
    """Hard error unless the two tokenizers have identical vocabularies and special ids."""
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ConfigError("student and teacher tokenizers differ (vocabulary); opd-lab needs one shared "
                          "vocabulary: set model.tokenizer or pick a matching pair")
    for attr in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(student_tok, attr) != getattr(teacher_tok, attr):
            raise ConfigError(f"student and teacher tokenizers differ in {attr}: "
                              f"{getattr(student_tok, attr)} vs {getattr(teacher_tok, attr)}")
