"""Prompt sources and graders. A task gives train/held-out problems, renders chat messages and grades.

Tasks are built by name from :data:`TASKS` (``task.name``: ``arith`` for the embedded default, ``math`` for the
benchmarks); :func:`encode_prompts` renders problems into chat-template token ids.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

from opd_lab.common.registry import Registry
from opd_lab.tasks.arith import ArithmeticTask, Problem, grade_exact


class Task(Protocol):
    def eval_problems(self) -> list[Problem]: ...

    def train_problems(self, n: int, rng: Any) -> list[Problem]: ...


# name → builder(task config); the math task (datasets, math-verify) is imported only when asked for
TASKS: Registry = Registry("task")
TASKS.add("arith", lambda c: ArithmeticTask(c.min_operands, c.max_operands, c.min_digits, c.max_digits, c.n_eval,
                                             c.eval_seed))
TASKS.add("math", "opd_lab.tasks.math:MathTask")


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
    return TASKS.get(cfg.name)(cfg)


def encode_prompts(tokenizer, problems: list[Problem], system_prompt: str | None = None,
                   enable_thinking: bool | None = None) -> list[list[int]]:
    """Chat-template token ids (with the generation prompt) for each problem.

    ``enable_thinking`` is passed to the template when set (Qwen3's thinking-mode switch).
    """
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    out = []
    for p in problems:
        ids = tokenizer.apply_chat_template(user_message(p, system_prompt), tokenize=True,
                                            add_generation_prompt=True, **extra)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        out.append(list(ids))
    return out


def prompt_encoder(cfg):
    """``encode(tokenizer, problems)`` with the task's system prompt and the model's thinking-mode setting."""
    return functools.partial(encode_prompts, system_prompt=getattr(cfg.task, "system_prompt", None),
                             enable_thinking=cfg.model.enable_thinking)
