"""Prompt sources and graders. A task gives train/held-out problems, renders chat messages and grades."""

from __future__ import annotations

from typing import Any, Protocol

from opd_lab.tasks.arith import ArithmeticTask, Problem, grade_exact


class Task(Protocol):
    def eval_problems(self) -> list[Problem]: ...

    def train_problems(self, n: int, rng: Any) -> list[Problem]: ...


def user_message(problem: Problem, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat messages that pose ``problem`` (after an optional system message)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": problem.prompt or problem.question}]


def reference_response(problem: Problem) -> str:
    """The worked answer used for SFT of the embedded models (without the closing <|im_end|>)."""
    return f"<think>\n{problem.solution}\n</think>\n\\boxed{{{problem.answer}}}"


def grade(response_text: str, problem: Problem) -> bool:
    """Grade with the problem's grader: exact boxed-string equality or math-verify equivalence."""
    if problem.grader == "math":
        from opd_lab.tasks.math import grade_math

        return grade_math(response_text, problem.answer)
    return grade_exact(response_text, problem.answer)


def build_task(cfg: Any) -> Task:
    """Build the task selected by ``cfg.name`` (a TaskConfig dataclass)."""
    if cfg.name == "arith":
        return ArithmeticTask(cfg.min_operands, cfg.max_operands, cfg.min_digits, cfg.max_digits,
                              cfg.n_eval, cfg.eval_seed)
    if cfg.name == "math":
        from opd_lab.tasks.math import MathTask

        return MathTask(cfg)
    raise KeyError(f"unknown task {cfg.name!r}; available: ['arith', 'math']")
