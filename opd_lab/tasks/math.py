"""Math prompts and benchmarks (DAPO-Math-17K style training prompts; AIME24/25, MATH500, AMC23 evaluation),
loaded from a ``datasets`` hub id or a local JSONL/JSON/Parquet file with a configured field mapping, and graded
with math-verify on the last ``\\boxed{...}`` of the response.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from opd_lab.config import ConfigError, DatasetConfig, MathTaskConfig
from opd_lab.tasks.arith import Problem

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


# ------------------------------------------------------------------------------------------------ loading
def get_field(record: Any, path: str) -> Any:
    """``record`` at a dotted path; integer parts index lists (``prompt.0.content``, ``reward_model.ground_truth``)."""
    cur = record
    for part in path.split("."):
        if isinstance(cur, (list, tuple)) and part.lstrip("-").isdigit():
            cur = cur[int(part)]
        elif isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            raise KeyError(part)
    return cur


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).suffix in LOCAL_SUFFIXES


def load_records(spec: DatasetConfig, field_name: str) -> list[dict]:
    """The rows of one dataset: a local file (``.jsonl``/``.json``/``.parquet``, or a folder of them) or a hub id.

    Errors name the config field to set (``field_name``), never only a library's stack trace.
    """
    path = spec.path
    if _looks_local(path):
        p = Path(path).expanduser()
        files = sorted(f for f in p.iterdir() if f.suffix in LOCAL_SUFFIXES) if p.is_dir() else [p]
        if not p.exists() or not files:
            raise ConfigError(f"{field_name}.path={path!r}: no such file (or no .jsonl/.json/.parquet in the "
                              f"folder); set {field_name}.path to a local file or a datasets hub id")
        rows: list[dict] = []
        for f in files:
            if f.suffix == ".parquet":
                import pandas as pd

                rows += pd.read_parquet(f).to_dict(orient="records")
            elif f.suffix == ".jsonl":
                rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            else:
                data = json.loads(f.read_text())
                rows += data if isinstance(data, list) else data.get("data", [])
        return rows
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(f"{field_name}.path={path!r} is a hub id and needs the `datasets` package: "
                          "pip install 'opd-lab[math]' (or use a local file)") from e
    try:
        ds = datasets.load_dataset(path, spec.subset, split=spec.split)
    except Exception as e:  # offline, unknown id, wrong split: one clear line naming the field
        raise ConfigError(f"{field_name}.path={path!r} (split={spec.split!r}) could not be loaded "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); set {field_name}.path to a "
                          "reachable hub id or a local .jsonl/.json/.parquet file") from None
    return [dict(r) for r in ds]


def load_problems(spec: DatasetConfig, field_name: str, source: str, template: str) -> list[Problem]:
    """Records → :class:`Problem` via the field mapping; the user message is ``template`` filled with the question."""
    records = load_records(spec, field_name)
    if not records:
        raise ConfigError(f"{field_name}.path={spec.path!r} holds no records")
    out = []
    for i, rec in enumerate(records[: spec.limit] if spec.limit else records):
        try:
            question = str(get_field(rec, spec.question_field))
            answer = get_field(rec, spec.answer_field)
        except KeyError as e:
            raise ConfigError(f"{field_name}: record {i} has no field {e.args[0]!r} on the path "
                              f"question_field={spec.question_field!r} / answer_field={spec.answer_field!r}; "
                              f"its top-level fields are {sorted(rec)}") from None
        if isinstance(answer, float) and answer.is_integer():
            answer = int(answer)  # AMC23 stores answers as floats
        tag = str(get_field(rec, spec.tag_field)) if spec.tag_field else source
        out.append(Problem(question=question, answer=str(answer).strip(), solution="", source=source,
                           prompt=template.format(question=question), grader="math", tag=tag))
    return out


class MathTask:
    """Training prompts from ``cfg.train`` (drawn with replacement, seeded per call) and the evaluation
    benchmarks of ``cfg.eval`` (each problem tagged with its benchmark name)."""

    def __init__(self, cfg: MathTaskConfig) -> None:
        self.cfg = cfg
        self._train: list[Problem] | None = None  # loaded on first use: evaluation needs no training prompts
        self._eval = [p for name, spec in cfg.eval.items()
                      for p in load_problems(spec, f"task.eval.{name}", name, cfg.prompt_template)]

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def load_train(self) -> None:
        """Load the training prompts now (a training run calls this before loading any model)."""
        if self._train is None:
            self._train = load_problems(self.cfg.train, "task.train", "train", self.cfg.prompt_template)

    def train_pool(self) -> list[Problem]:
        """Every training prompt (loaded on first use)."""
        self.load_train()
        return list(self._train)

    def train_problems(self, n: int, rng: random.Random) -> list[Problem]:
        self.load_train()
        return [self._train[rng.randrange(len(self._train))] for _ in range(n)]

    def probe_problems(self, n: int, seed: int) -> list[Problem]:
        """``n`` training records drawn without replacement with ``seed`` (:meth:`reserve` takes them out of
        training)."""
        self.load_train()
        return random.Random(f"probe-{seed}").sample(self._train, min(n, len(self._train) - 1))

    def reserve(self, problems: list[Problem]) -> None:
        """Take ``problems`` out of the training pool (a probe set held out from training)."""
        self.load_train()
        drop = {p.question for p in problems}
        self._train = [p for p in self._train if p.question not in drop]


# ------------------------------------------------------------------------------------------------ grading
def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces matched; None if absent
    or unclosed (a truncated answer)."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def grade_math(response: str, answer: str) -> bool:
    """math-verify equivalence of the response's last boxed answer with the reference answer."""
    pred = last_boxed(response)
    if pred is None:
        return False
    from math_verify import parse, verify

    gold = answer if "\\boxed" in answer else f"${answer}$"
    try:
        return bool(verify(parse(gold), parse(f"\\boxed{{{pred}}}")))
    except Exception:  # math-verify's parser/timeout on pathological input: not a correct answer
        return False
