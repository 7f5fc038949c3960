"""The embedded default task: multi-operand addition worked column by column.

A problem is a sum of ``n`` non-negative integers. The response adds them left to right, one pair at a time;
each pair is a block of newline-separated steps, every number zero-padded to a fixed width ``W`` so that a
small transformer can find the digits it needs at fixed relative offsets::

    <think>
    04821+00307          header: running total + next operand
    1+7+0=08             one line per column, least significant first: a_i + b_i + carry_in = two-digit sum
    2+0+0=02
    8+3+0=11
    4+0+1=05
    0+0+0=00
    =05128               the pair's result, most significant digit first
    ...                  (one block per remaining operand)
    </think>
    \\boxed{15694}

Three 4-digit operands give ~150 response tokens, four give ~210: 32/64/128-token blocks and newline spans
all differ. The grader checks the last ``\\boxed{...}`` exactly against the integer answer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True)
class Problem:
    """One question with its reference answer and worked solution.

    ``prompt`` is the user message (the question itself when None); ``source`` names the benchmark (pass@k is
    reported per source); ``grader`` is ``exact`` (boxed string equality) or ``math`` (math-verify); ``tag`` is
    the problem's slice for per-sample teacher routing (``ops<n>`` on the embedded task, a data-source field on
    math data).
    """

    question: str
    answer: str
    solution: str
    source: str = "arith"
    prompt: str | None = None
    grader: str = "exact"
    tag: str = ""


def width_for(max_digits: int, max_operands: int) -> int:
    """Digits needed for any partial sum of ``max_operands`` numbers of ``max_digits`` digits."""
    return len(str(max_operands * (10**max_digits - 1)))


def worked_solution(operands: list[int], width: int) -> str:
    """The step-by-step response body for ``sum(operands)`` (without chat special tokens)."""
    lines: list[str] = []
    total = operands[0]
    for b in operands[1:]:
        a_s, b_s = f"{total:0{width}d}", f"{b:0{width}d}"
        lines.append(f"{a_s}+{b_s}")
        carry = 0
        for i in range(width - 1, -1, -1):
            s = int(a_s[i]) + int(b_s[i]) + carry
            lines.append(f"{a_s[i]}+{b_s[i]}+{carry}={s:02d}")
            carry = s // 10
        total += b
        lines.append(f"={total:0{width}d}")
    return "\n".join(lines)


class ArithmeticTask:
    """Seeded generator of train and held-out problems.

    Difficulty is set by the operand count range and the digit count range. The held-out split is a fixed
    set drawn from ``eval_seed``; training problems are drawn from a stream seeded per call and never equal a
    held-out question.
    """

    def __init__(
        self,
        min_operands: int = 3,
        max_operands: int = 4,
        min_digits: int = 2,
        max_digits: int = 4,
        n_eval: int = 64,
        eval_seed: int = 1234,
    ) -> None:
        if not (2 <= min_operands <= max_operands):
            raise ValueError("need 2 <= min_operands <= max_operands")
        if not (1 <= min_digits <= max_digits):
            raise ValueError("need 1 <= min_digits <= max_digits")
        self.min_operands, self.max_operands = min_operands, max_operands
        self.min_digits, self.max_digits = min_digits, max_digits
        self.width = width_for(max_digits, max_operands)
        self._eval = self._draw(random.Random(eval_seed), n_eval, exclude=set())
        self._eval_questions = {p.question for p in self._eval}
        self._reserved: set[str] = set()  # questions kept out of training (a probe set: reserve())

    def _one(self, rng: random.Random) -> Problem:
        n = rng.randint(self.min_operands, self.max_operands)
        operands = []
        for _ in range(n):
            d = rng.randint(self.min_digits, self.max_digits)
            operands.append(rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1))
        question = "+".join(str(x) for x in operands)
        return Problem(question, str(sum(operands)), worked_solution(operands, self.width), tag=f"ops{n}")

    def _draw(self, rng: random.Random, n: int, exclude: set[str]) -> list[Problem]:
        out: list[Problem] = []
        seen: set[str] = set()
        while len(out) < n:
            p = self._one(rng)
            if p.question in exclude or p.question in seen:
                continue
            seen.add(p.question)
            out.append(p)
        return out

    def eval_problems(self) -> list[Problem]:
        """The fixed held-out split."""
        return list(self._eval)

    def train_problems(self, n: int, rng: random.Random) -> list[Problem]:
        """``n`` fresh training problems from ``rng``, disjoint from the held-out split and the reserved ones."""
        out = []
        while len(out) < n:
            p = self._one(rng)
            if p.question not in self._eval_questions and p.question not in self._reserved:
                out.append(p)
        return out

    def probe_problems(self, n: int, seed: int) -> list[Problem]:
        """``n`` problems of the training distribution, disjoint from the held-out split, from their own stream
        (``seed``); :meth:`reserve` keeps them out of training."""
        return self._draw(random.Random(f"probe-{seed}"), n, exclude=self._eval_questions)

    def reserve(self, problems: list[Problem]) -> None:
        """Keep ``problems`` out of every later training draw (a probe set held out from training)."""
        self._reserved |= {p.question for p in problems}

    def tags(self) -> list[str]:
        """Every problem tag the task produces: ``ops<n>`` for each operand count n."""
        return [f"ops{n}" for n in range(self.min_operands, self.max_operands + 1)]


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (no nested braces in this task), or None."""
    found = BOXED_RE.findall(text)
    return found[-1].strip() if found else None


def grade_exact(response: str, answer: str) -> bool:
    """True iff the last boxed answer equals ``answer`` exactly (integers: no equivalence needed)."""
    return extract_boxed(response) == answer
