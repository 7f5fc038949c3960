"""Guarded steps: a non-finite loss skips the update (weights and Adam state untouched) and is counted; enough in
a row abort with a clear message; collapse signals."""

import copy

import pytest
import torch

from opd_lab.learner import make_optimizer
from opd_lab.monitors import UpdateGuard, repetition_B
from opd_lab.scoring import score_batch
from opd_lab.update import train_step
from tests.conftest import compose
from tests.test_learner import setup  # noqa: F401  (module fixture: tiny student, teacher, one rollout batch)


@pytest.mark.parametrize("loss", ["sampled_token", "lsm"])
def test_injected_nan_loss_is_skipped_and_counted(setup, loss):  # noqa: F811
    student, teacher, batch, tokens = setup
    student = copy.deepcopy(student)
    cfg = compose([f"loss={loss}", "rollout.n_prompts=4", "rollout.n_samples=2", "rollout.mini_batch_size=4",
                   "rollout.reuse=2"])
    data = score_batch(cfg, student, teacher, batch, tokens)
    opt, sched = make_optimizer(cfg, student)

    good = train_step(cfg, student, opt, sched, data, step=0)  # finite: 4 updates, none skipped
    assert good["guard/skipped_updates"] == 0 and good["updates"] == 4
    before = [p.detach().clone() for p in student.parameters()]
    adam = copy.deepcopy(opt.state_dict()["state"])

    data.teacher_logp_B_T = torch.full_like(data.teacher_logp_B_T, float("nan"))  # every row poisoned
    if data.teacher_support_logp_B_T_S is not None:
        data.teacher_support_logp_B_T_S = torch.full_like(data.teacher_support_logp_B_T_S, float("nan"))
    bad = train_step(cfg, student, opt, sched, data, step=1)
    assert bad["guard/skipped_updates"] == 4 and bad["guard/trailing_bad_updates"] == 4
    for p, q in zip(student.parameters(), before, strict=True):
        assert torch.equal(p, q)  # no update applied
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[k]["exp_avg"], adam[k]["exp_avg"]) for k in adam)


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


def test_startup_tokenizer_checks(tokenizer):
    from opd_lab.config import ConfigError
    from opd_lab.models import check_same_vocab

    check_same_vocab(tokenizer, copy.deepcopy(tokenizer))
    other = copy.deepcopy(tokenizer)
    other.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    with pytest.raises(ConfigError, match="vocabulary"):
        check_same_vocab(tokenizer, other)
    swapped = copy.deepcopy(tokenizer)
    swapped.pad_token = "<|im_start|>"
    with pytest.raises(ConfigError, match="pad_token_id"):
        check_same_vocab(tokenizer, swapped)
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ConfigError, match="chat templates"):
        check_same_vocab(tokenizer, templated)
