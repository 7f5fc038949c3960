"""Monitors: consecutive non-finite updates abort with a clear message; the repetition (collapse) signal."""

import pytest
import torch

from opd_lab.learner.monitors import UpdateGuard, repetition_B


def test_guard_aborts_after_consecutive_bad_updates(capsys):
    guard = UpdateGuard(max_bad=5)
    ok = {"guard/skipped_updates": 0, "guard/trailing_bad_updates": 0, "updates": 4, "loss": 0.1, "grad_norm": 1.0}
    bad = {"guard/skipped_updates": 4, "guard/trailing_bad_updates": 4, "updates": 4, "loss": float("nan"),
           "grad_norm": float("nan")}
    tail = {"guard/skipped_updates": 1, "guard/trailing_bad_updates": 1, "updates": 4, "loss": 0.2,
            "grad_norm": float("inf")}
    assert guard.update(1, tail) == 1
    guard.check(1, tail)
    assert guard.update(2, ok) == 0  # a good update resets the run
    assert guard.update(3, tail) == 1
    assert guard.update(4, bad) == 5
    assert "skipped 4/4 updates" in capsys.readouterr().err
    with pytest.raises(FloatingPointError, match="5 consecutive optimizer updates.*trainer.max_bad_updates=5"):
        guard.check(4, bad)
    assert guard.total == 6


def test_repetition_signal():
    loop = torch.tensor([[1, 2, 3] * 30])
    varied = torch.arange(90).unsqueeze(0)
    short = torch.tensor([[1, 1, 1, 1, 1, 1]])
    ids = torch.nn.utils.rnn.pad_sequence([loop[0], varied[0], short[0]], batch_first=True)
    mask = torch.zeros_like(ids)
    mask[0, :90], mask[1, :90], mask[2, :6] = 1, 1, 1
    assert repetition_B(ids, mask).tolist() == [True, False, False]
