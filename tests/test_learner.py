import copy
import random

import pytest
import torch

from opd_lab.evaluation import encode_prompts
from opd_lab.learner import optimizer_update, score_batch, special_mask_B_T, token_table
from opd_lab.rollout.base import SamplingSpec
from opd_lab.rollout.hf import HFEngine
from opd_lab.scoring import HFTeacherScorer
from opd_lab.tasks.arith import ArithmeticTask
from tests.conftest import compose, tiny_model

GATES = ["none", "token", "sequence", "block32", "span"]


class RecordingOptimizer:
    """Stands in for AdamW: records the gradient it would step with."""

    def __init__(self, model):
        self.params = list(model.parameters())
        self.grads = None

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]


@pytest.fixture(scope="module")
def setup(tokenizer):
    student = tiny_model(tokenizer, 32, 1, seed=0)
    teacher = HFTeacherScorer(tiny_model(tokenizer, 48, 1, seed=1))
    task = ArithmeticTask(min_operands=2, max_operands=2, min_digits=1, max_digits=2)
    problems = task.train_problems(4, random.Random(0))
    batch = HFEngine(student, tokenizer).generate(encode_prompts(tokenizer, problems),
                                                 SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_tokens=40, seed=0))
    special_V = token_table(tokenizer, lambda s: s in {"<", "think", "<|im_end|>"})
    newline_V = token_table(tokenizer, lambda s: "\n" in s)
    return student, teacher, batch, special_V, newline_V


def _drifted(model, scale=0.05, seed=3):
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


@pytest.mark.parametrize("loss", ["sampled_token", "lsm"])
@pytest.mark.parametrize("gate", GATES)
def test_first_update_is_ungated(setup, loss, gate):
    student, teacher, batch, special_V, newline_V = setup
    cfg = compose([f"loss={loss}", f"gate={gate}", "rollout.n_prompts=4", "rollout.n_samples=2",
                   "rollout.mini_batch_size=8", "gate.tau=5.0"])
    data = score_batch(cfg, student, teacher, batch, special_V, newline_V)
    out = optimizer_update(cfg, student, RecordingOptimizer(student), data, torch.arange(8))
    assert out["gate/min"] == pytest.approx(1.0, abs=1e-6) and out["gate/max"] == pytest.approx(1.0, abs=1e-6)
    assert out["loss"] == pytest.approx(out["ungated_loss"], rel=1e-6)
    assert out["drift/mean_abs_delta"] < 1e-5


@pytest.mark.parametrize("loss", ["sampled_token", "lsm"])
@pytest.mark.parametrize("gate", GATES + ["block32 gate.clip_min=0.9 gate.clip_max=1.05"])
def test_update_invariant_to_micro_batching(setup, loss, gate):
    student, teacher, batch, special_V, newline_V = setup
    gate_overrides = [f"gate={gate.split()[0]}", *gate.split()[1:]]
    base = [f"loss={loss}", *gate_overrides, "rollout.n_prompts=4", "rollout.n_samples=2",
            "rollout.mini_batch_size=8", "gate.tau=20.0"]
    drifted = _drifted(student)
    results = []
    for accum in (1, 3, 8):
        cfg = compose(base + [f"trainer.grad_accum={accum}"])
        data = score_batch(cfg, student, teacher, batch, special_V, newline_V)  # π_old = student
        opt = RecordingOptimizer(drifted)
        out = optimizer_update(cfg, drifted, opt, data, torch.arange(8))
        results.append((out, opt.grads))
    (ref, ref_g), others = results[0], results[1:]
    assert ref["drift/mean_abs_delta"] > 1e-3 and ref["gate/std"] > 1e-4 or gate == "none"
    for out, grads in others:
        assert out["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert out["gate/mean"] == pytest.approx(ref["gate/mean"], rel=1e-5)
        if "clip" not in gate:  # a clip moves the mean away from 1 by design
            assert out["gate/mean"] == pytest.approx(1.0, abs=1e-5)
        for a, b in zip(grads, ref_g, strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_special_token_masking(tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    im_end, think = ids("<|im_end|>"), ids("<think>")
    x, lt, t = ids("x"), ids("<"), ids("t")
    resp = torch.tensor([[lt, x, lt, im_end, 0], [x, x, im_end, x, im_end]])
    rmask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    special_V = token_table(tokenizer, lambda s: s in {"<", "think", "<|im_end|>"})
    assert not special_V[think] and not special_V[t] and special_V[lt] and special_V[im_end]
    first = special_mask_B_T(resp, rmask, special_V, "first")
    assert first.tolist() == [[1, 0, 0, 0, 0], [0, 0, 1, 0, 0]]
    every = special_mask_B_T(resp, rmask, special_V, "all")
    assert every.tolist() == [[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]]
    assert special_mask_B_T(resp, rmask, special_V, "none").sum() == 0


def test_lsm_support_variants_score(setup):
    student, teacher, batch, special_V, newline_V = setup
    for support, extra, width in (("teacher", False, 8), ("student", False, 8), ("union", True, 17)):
        cfg = compose(["loss=lsm", f"loss.support={support}", f"loss.add_sampled_token={extra}", "loss.top_k=8",
                       "rollout.n_prompts=4", "rollout.n_samples=2", "rollout.mini_batch_size=8"])
        data = score_batch(cfg, student, teacher, batch, special_V, newline_V)
        assert data.support_ids_B_T_S.shape[-1] == width
        # teacher log-probs at the support equal a direct teacher forward
        from opd_lab.scoring import response_logits

        with torch.no_grad():
            full = torch.log_softmax(response_logits(teacher.teacher, batch), -1)
        direct = full.gather(-1, data.support_ids_B_T_S)
        m = batch.response_mask_B_T.bool()
        assert torch.allclose(direct[m], data.teacher_support_logp_B_T_S[m], atol=1e-5)
        out = optimizer_update(cfg, student, RecordingOptimizer(student), data, torch.arange(8))
        assert out["loss"] >= 0
