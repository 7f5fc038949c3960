"""AdamW and its learning-rate schedule, shared by the OPD learner and the SFT of the embedded models."""

from __future__ import annotations

import math

import torch


def lr_factor(update: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """The LR multiplier of optimizer update ``update`` (0-based) of ``total``.

    Linear warm-up (u + 1) / ``warmup`` over the first ``warmup`` updates, then ``constant`` (1) or ``cosine``
    decay from 1 at update ``warmup`` to exactly ``min_ratio`` at the last update, ``total − 1``.
    """
    if update < warmup:
        return (update + 1) / warmup
    if schedule == "constant" or total - 1 <= warmup:
        return 1.0
    frac = min(1.0, (update - warmup) / (total - 1 - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def adamw_with_schedule(params, lr: float, betas: tuple[float, float], weight_decay: float, warmup: int,
                        total: int, schedule: str, min_ratio: float):
    """``(AdamW, LambdaLR)`` with :func:`lr_factor`; the scheduler is stepped once per optimizer update."""
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: lr_factor(u, warmup, total, schedule, min_ratio))
    return opt, sched
