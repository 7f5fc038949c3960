"""The LR schedule shared by the learner and the embedded models' SFT."""

import math

import pytest

from opd_lab.core.optim import lr_factor


def test_cosine_ends_exactly_at_min_ratio():
    total, warm = 40, 3
    factors = [lr_factor(u, warm, total, "cosine", 0.1) for u in range(total)]
    assert factors[:warm] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert factors[warm] == 1.0 and factors[-1] == pytest.approx(0.1, abs=1e-15)  # the last update is at the minimum
    assert all(a >= b for a, b in zip(factors[warm:], factors[warm + 1 :], strict=False))
    mid = warm + (total - 1 - warm) / 2
    assert lr_factor(int(mid), warm, total, "cosine", 0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - warm) / (total - 1 - warm))))
    assert {lr_factor(u, warm, total, "constant", 0.1) for u in range(warm, total)} == {1.0}
    assert lr_factor(0, 0, 1, "cosine", 0.1) == 1.0  # a single update: nothing to decay over


def test_learner_schedule_reaches_min_lr_on_its_last_update(tokenizer):
    from opd_lab.learner.loop import make_optimizer
    from tests.conftest import compose, tiny_model

    cfg = compose(["trainer.steps=3", "trainer.warmup_steps=1", "trainer.lr=1e-3", "trainer.min_lr_ratio=0.25"])
    opt, sched = make_optimizer(cfg, tiny_model(tokenizer))
    per_step = cfg.rollout.reuse * cfg.rollout.batch_size // cfg.rollout.mini_batch_size
    lrs = []
    for _ in range(cfg.trainer.steps * per_step):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[-1] == pytest.approx(0.25e-3, rel=1e-12) and max(lrs) == pytest.approx(1e-3)
