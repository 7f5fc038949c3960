"""One step's optimisation (update.py) on scored batches (scoring.py): the first update is exactly ungated, an update
does not depend on its micro-batch split, chunked and plain heads agree, the gates applied are normalise_gates's,
and a non-finite update is skipped and counted."""

import copy
import random

import pytest
import torch

from opd_lab.learner.loop import make_optimizer
from opd_lab.learner.scoring import HFTeacherScorer, score_batch
from opd_lab.learner.teachers import Teachers
from opd_lab.learner.update import optimizer_update, train_step
from opd_lab.models.token_ids import TokenIds
from opd_lab.rollout.base import SamplingSpec
from opd_lab.rollout.hf import HFEngine
from opd_lab.tasks import encode_prompts
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
    return student, teacher, batch, TokenIds.build(tokenizer, ["<think>", "</think>", "<|im_end|>"])


def _drifted(model, scale=0.05, seed=3):
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p.device))
    return m


@pytest.mark.parametrize("loss", ["sampled_token", "lsm"])
@pytest.mark.parametrize("gate", GATES)
def test_first_update_is_ungated(setup, loss, gate):
    student, teacher, batch, tokens = setup
    cfg = compose([f"loss={loss}", f"gate={gate}", "rollout.n_prompts=4", "rollout.n_samples=2",
                   "rollout.mini_batch_size=8", "gate.tau=5.0"])
    data = score_batch(cfg, student, Teachers.one(teacher), batch, tokens)
    out = optimizer_update(cfg, student, RecordingOptimizer(student), data, torch.arange(8))
    assert out["gate/min"] == pytest.approx(1.0, abs=1e-6) and out["gate/max"] == pytest.approx(1.0, abs=1e-6)
    assert out["loss"] == pytest.approx(out["ungated_loss"], rel=1e-6)
    assert out["drift/mean_abs_delta"] < 1e-5


@pytest.mark.parametrize("loss", ["sampled_token", "lsm"])
@pytest.mark.parametrize("gate", GATES + ["block32 gate.clip_min=0.9 gate.clip_max=1.05"])
def test_update_invariant_to_micro_batching(setup, loss, gate):
    student, teacher, batch, tokens = setup
    gate_overrides = [f"gate={gate.split()[0]}", *gate.split()[1:]]
    base = [f"loss={loss}", *gate_overrides, "rollout.n_prompts=4", "rollout.n_samples=2",
            "rollout.mini_batch_size=8", "gate.tau=20.0"]
    drifted = _drifted(student)
    results = []
    for accum in (1, 3, 8):
        cfg = compose(base + [f"trainer.grad_accum={accum}"])
        data = score_batch(cfg, student, Teachers.one(teacher), batch, tokens)  # π_old = student
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


def test_lsm_support_variants_score(setup):
    student, teacher, batch, tokens = setup
    for support, extra, width in (("teacher", False, 8), ("student", False, 8), ("union", True, 17)):
        cfg = compose(["loss=lsm", f"loss.support={support}", f"loss.add_sampled_token={extra}", "loss.top_k=8",
                       "rollout.n_prompts=4", "rollout.n_samples=2", "rollout.mini_batch_size=8"])
        data = score_batch(cfg, student, Teachers.one(teacher), batch, tokens)
        assert data.support_ids_B_T_S.shape[-1] == width
        # teacher log-probs at the support equal a direct teacher forward
        from opd_lab.learner.heads import response_logits

        with torch.no_grad():
            full = torch.log_softmax(response_logits(teacher.teacher, batch), -1)
        direct = full.gather(-1, data.support_ids_B_T_S)
        m = batch.response_mask_B_T.bool()
        assert torch.allclose(direct[m], data.teacher_support_logp_B_T_S[m], atol=1e-5)
        out = optimizer_update(cfg, student, RecordingOptimizer(student), data, torch.arange(8))
        assert out["loss"] >= 0


ALL_GATES = ["none", "token", "sequence", "block32", "block64", "block128", "span"]


@pytest.mark.parametrize("loss", ["sampled_token", "lsm", "lsm loss.renormalise=false loss.tail=true"])
@pytest.mark.parametrize("gate", ALL_GATES)
def test_chunked_path_equals_plain_path(setup, loss, gate):
    """Same loss, metrics and gradients whether the LM head runs on all positions or in chunks."""
    student, teacher, batch, tokens = setup
    base = [f"loss={loss.split()[0]}", *loss.split()[1:], f"gate={gate}", "rollout.n_prompts=4",
            "rollout.n_samples=2", "rollout.mini_batch_size=8", "gate.tau=20.0", "trainer.grad_accum=2",
            "rollout.temperature=0.8"]
    drifted = _drifted(student)
    results = []
    for path, chunk in (("plain", 1024), ("chunked", 7)):
        cfg = compose(base + [f"trainer.loss_path={path}", f"trainer.chunk_size={chunk}"])
        data = score_batch(cfg, student, Teachers.one(teacher), batch, tokens)
        opt = RecordingOptimizer(drifted)
        results.append((optimizer_update(cfg, drifted, opt, data, torch.arange(8)), opt.grads))
    (a, ga), (b, gb) = results
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), k
    for x, y in zip(ga, gb, strict=True):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)


class LargestFloat32(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest float32 tensor any op creates (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("loss", ["sampled_token", "lsm"])
def test_chunked_path_never_holds_full_logits(tokenizer, loss):
    """With V large next to the model, [B, T, V] float32 would dwarf everything else; it never appears."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    V, B, T_max = 4096, 4, 48
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1, head_dim=32,
                                         tie_word_embeddings=True))
    from opd_lab.rollout.base import assemble_batch

    g = torch.Generator().manual_seed(1)
    responses = [torch.randint(5, V, (T_max - 3 * i,), generator=g).tolist() for i in range(B)]
    batch = assemble_batch([[1, 2, 3]] * B, responses, [[0.0] * len(r) for r in responses], [True] * B, 1, 0,
                           [""] * B)
    T = batch.response_mask_B_T.shape[1]
    teacher_scorer = HFTeacherScorer(model, chunk_size=8)
    zeros = torch.zeros(V, dtype=torch.bool)
    cfg = compose([f"loss={loss}", "gate=block32", "rollout.n_prompts=4", "rollout.n_samples=1",
                   "rollout.mini_batch_size=4", "trainer.loss_path=chunked", "trainer.chunk_size=8"])
    data = score_batch(cfg, model, Teachers.one(teacher_scorer), batch,
                       TokenIds(special=(), stop=(0,), newline_V=zeros))
    mode = LargestFloat32()
    with mode:
        optimizer_update(cfg, model, RecordingOptimizer(model), data, torch.arange(B))
    assert mode.largest < B * T * V // 4  # at most one chunk of 8 positions (plus the head's own [V, H])
    plain = compose([f"loss={loss}", "gate=block32", "rollout.n_prompts=4", "rollout.n_samples=1",
                     "rollout.mini_batch_size=4", "trainer.loss_path=plain"])
    mode_plain = LargestFloat32()
    with mode_plain:
        optimizer_update(plain, model, RecordingOptimizer(model), data, torch.arange(B))
    assert mode_plain.largest >= B * T * V  # the test can fail: the plain path does hold [B, T, V]


@pytest.mark.parametrize("precision", ["float32", "autocast_bf16", "bfloat16"])
@pytest.mark.parametrize("loss", ["sampled_token", "lsm"])
def test_first_update_has_exactly_zero_drift(setup, precision, loss):
    """π_old is scored by the learner's own forward (same precision, autocast, rows and shapes as the first
    update), so before the first update δ ≡ 0 and every gate is exactly 1, in float32, under bf16 autocast and
    with bf16 weights (the old scorer, outside autocast and in other batch shapes, gave |δ| up to 0.28)."""
    from opd_lab.learner.update import old_scoring_plan, update_plan

    student, teacher, batch, tokens = setup
    model = copy.deepcopy(student)
    if precision == "bfloat16":
        model = model.to(torch.bfloat16)
    cfg = compose([f"loss={loss}", "gate=token", "gate.tau=50.0", "rollout.n_prompts=4", "rollout.n_samples=2",
                   "rollout.mini_batch_size=4", "trainer.grad_accum=2",
                   f"trainer.autocast_bf16={precision == 'autocast_bf16'}"])
    data = score_batch(cfg, model, Teachers.one(teacher), batch, tokens,
                       old_scoring_plan(cfg, 3, batch.size, current=False)[0])
    first = update_plan(cfg, 3, batch.size)[0][0]
    out = optimizer_update(cfg, model, RecordingOptimizer(model), data, first)
    assert out["drift/mean_abs_delta"] == 0.0
    assert out["gate/min"] == 1.0 and out["gate/max"] == 1.0 and out["ratio_clip_frac" if loss ==
                                                                    "sampled_token" else "loss"] == out[
        "ratio_clip_frac" if loss == "sampled_token" else "ungated_loss"]


@pytest.mark.parametrize("accum", [1, 3])
@pytest.mark.parametrize("underflow", [False, True])
def test_update_equals_normalise_gates_reference(setup, accum, underflow):
    """The learner's gradient is that of Σ m ĝ ℓ / Σ m with ĝ = normalise_gates(drift_gate(...)) over the whole
    mini-batch, however it is split; with τ so large that every raw exp(−τ|m_G|) underflows (the unshifted gate
    was 0 everywhere: a zero update), the update is still the exact, non-zero one."""
    from opd_lab.core.gates import normalise_gates
    from opd_lab.learner.heads import as_policy
    from opd_lab.learner.update import micro_batch_loss
    from tests.core.test_gates import drift_gate

    student, teacher, batch, tokens = setup
    drifted = _drifted(student, scale=0.2)
    base = ["loss=sampled_token", "gate=token", "rollout.n_prompts=4", "rollout.n_samples=2",
            "rollout.mini_batch_size=8", f"trainer.grad_accum={accum}", "trainer.grad_clip=null"]
    data = score_batch(compose(base), student, Teachers.one(teacher), batch, tokens)
    rows = data.select(torch.arange(8))

    def reference_forward(tau):
        model = copy.deepcopy(drifted)
        loss_B_T, _, out, _ = micro_batch_loss(compose(base + [f"gate.tau={tau}"]), as_policy(model), rows)
        return model, loss_B_T, (out.logp_B_T - rows.old_logp_B_T).detach()

    _, _, delta = reference_forward(1.0)
    valid = rows.loss_mask_B_T.bool()
    tau = 200.0 / float(delta.abs()[valid].min()) if underflow else 2.0
    if underflow:
        assert float(torch.exp(-tau * delta.abs())[valid].max()) == 0.0  # the old raw gate: all zero
    cfg = compose(base + [f"gate.tau={tau}"])
    opt = RecordingOptimizer(drifted)
    optimizer_update(cfg, drifted, opt, data, torch.arange(8))
    ref_model, loss_B_T, delta = reference_forward(tau)
    mask = rows.loss_mask_B_T
    g, _ = drift_gate(delta, mask, rows.response_mask_B_T, "token", tau)
    (loss_B_T * normalise_gates(g, mask) * mask).sum().div(mask.sum()).backward()
    ref = [p.grad for p in ref_model.parameters()]
    assert sum(float(r.abs().sum()) for r in ref) > 0
    for a, b in zip(opt.grads, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss", ["sampled_token", "lsm"])
def test_injected_nan_loss_is_skipped_and_counted(setup, loss):
    student, teacher, batch, tokens = setup
    student = copy.deepcopy(student)
    cfg = compose([f"loss={loss}", "rollout.n_prompts=4", "rollout.n_samples=2", "rollout.mini_batch_size=4",
                   "rollout.reuse=2"])
    data = score_batch(cfg, student, Teachers.one(teacher), batch, tokens)
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


def test_metrics_average_over_the_updates_that_report_them():
    """A mini-batch with no valid token has no gate statistics (a collapsed drift-map run died on this with a
    KeyError): each metric is averaged over the updates that have it."""
    from opd_lab.learner.update import mean_over_updates

    per_update = [{"loss": 1.0, "gate/mean": 1.0, "gate/std": 0.2, "tokens": 5.0, "guard/skipped": 0.0},
                  {"loss": 3.0, "tokens": 0.0, "guard/skipped": 0.0},
                  {"loss": 2.0, "gate/mean": 1.0, "gate/std": 0.4, "tokens": 7.0, "guard/skipped": 0.0}]
    out = mean_over_updates(per_update)
    assert out == pytest.approx({"loss": 2.0, "gate/mean": 1.0, "gate/std": 0.3})


# ----------------------------------------------------------------------------------- staleness corrections
def test_proximal_log_probs_come_from_the_weights_at_the_start_of_the_step(setup):
    """A stale batch: π_old = π_b is scored by the weights that sampled it, π_prox by the learner's current weights
    (before the step's first update): the later rows by the no-grad π_prox forward, the first update's rows by that
    update's own forward. The test fails if π_prox is π_b's (the two differ by the staleness drift)."""
    from opd_lab.learner.heads import as_policy
    from opd_lab.learner.scoring import policy_forward, proximal_stats, score_proximal
    from opd_lab.learner.update import old_scoring_plan, proximal_plan, update_plan

    student, teacher, batch, tokens = setup
    behaviour, current = copy.deepcopy(student), _drifted(student, scale=0.05)
    cfg = compose(["loss=sampled_token", "gate=block32", "gate.reference=proximal", "loss.off_policy=decoupled",
                   "rollout.n_prompts=4", "rollout.n_samples=2", "rollout.mini_batch_size=4", "rollout.staleness=1"])
    old_rows, deferred = old_scoring_plan(cfg, 3, batch.size, False)
    assert deferred is None  # a stale batch is scored whole by π_b
    data = score_batch(cfg, behaviour, Teachers.one(teacher), batch, tokens, old_rows)
    assert proximal_plan(cfg, 3, batch.size, True) is None  # sampled by the current weights: π_prox = π_b
    score_proximal(cfg, current, data, *proximal_plan(cfg, 3, batch.size, False))
    first = update_plan(cfg, 3, batch.size)[0][0]
    later = torch.tensor(sorted(set(range(batch.size)) - set(first.tolist())))
    mask = data.response_mask_B_T.bool()
    want = policy_forward(cfg, as_policy(current), data.select(torch.arange(batch.size))).logp_B_T.detach()
    assert torch.isnan(data.prox_logp_B_T[first]).all()  # pending until the first update's forward
    assert torch.allclose(data.prox_logp_B_T[later][mask[later]], want[later][mask[later]], atol=1e-5)
    assert float((data.prox_logp_B_T[later] - data.old_logp_B_T[later])[mask[later]].abs().mean()) > 1e-3
    out = optimizer_update(cfg, current, RecordingOptimizer(current), data, first)
    assert not torch.isnan(data.prox_logp_B_T[mask]).any()
    assert torch.allclose(data.prox_logp_B_T[first][mask[first]], want[first][mask[first]], atol=1e-5)
    # the first update sees u_t = π_θ/π_prox = 1 and, for the gate, δ_prox = 0: every gate exactly 1
    assert out["gate/min"] == 1.0 and out["gate/max"] == 1.0 and out["ratio_clip_frac"] == 0.0
    assert out["drift/mean_abs_delta"] > 1e-3  # the logged drift stays against π_b
    w = torch.exp(data.prox_logp_B_T[first] - data.old_logp_B_T[first]).clamp(max=2.0)
    lm = data.loss_mask_B_T[first].bool()
    assert out["staleness/w_mean"] == pytest.approx(float(w[lm].mean()), rel=1e-5)
    assert proximal_stats(data)["staleness/prox_behaviour_abs"] == pytest.approx(
        float((data.prox_logp_B_T - data.old_logp_B_T)[mask].abs().mean()), rel=1e-6)


@pytest.mark.parametrize("reward", ["behaviour", "current"])
def test_current_reward_is_recomputed_at_every_update(setup, reward):
    """``loss.reward_reference=current``: the second update on a batch takes r_t = log q − log π_θ at the weights
    after the first update; ``behaviour`` keeps r_t = log q − log π_old for every update."""
    from opd_lab.learner.heads import as_policy
    from opd_lab.learner.scoring import policy_forward

    student, teacher, batch, tokens = setup
    model = copy.deepcopy(student)
    cfg = compose(["loss=sampled_token", "gate=none", f"loss.reward_reference={reward}", "loss.clip_log_ratio=null",
                   "rollout.n_prompts=4", "rollout.n_samples=2", "rollout.mini_batch_size=8", "trainer.lr=1e-2",
                   "trainer.warmup_steps=0"])
    data = score_batch(cfg, model, Teachers.one(teacher), batch, tokens)
    rows = torch.arange(batch.size)
    optimizer, _ = make_optimizer(cfg, model)
    first = optimizer_update(cfg, model, optimizer, data, rows)
    after = policy_forward(cfg, as_policy(model), data.select(rows)).logp_B_T.detach()
    second = optimizer_update(cfg, model, optimizer, data, rows)
    lm = data.loss_mask_B_T.bool()
    old_gap = float((data.teacher_logp_B_T - data.old_logp_B_T)[lm].mean())
    assert first["log_ratio_teacher_old"] == pytest.approx(old_gap, rel=1e-5)  # first update: π_θ = π_old
    want = old_gap if reward == "behaviour" else float((data.teacher_logp_B_T - after)[lm].mean())
    assert second["log_ratio_teacher_old"] == pytest.approx(want, rel=1e-5)
    assert abs(float((data.teacher_logp_B_T - after)[lm].mean()) - old_gap) > 1e-4  # the two can be told apart


def test_old_log_probs_keep_a_float64_students_precision(setup):
    """π_old is kept in the model's precision (at least float32): a float64 student has δ exactly 0 at its first
    update (float32 storage left |δ| ~ 4e-7)."""
    from opd_lab.learner.update import old_scoring_plan, update_plan

    student, teacher, batch, tokens = setup
    model = copy.deepcopy(student).double()
    cfg = compose(["loss=sampled_token", "gate=token", "rollout.n_prompts=4", "rollout.n_samples=2",
                   "rollout.mini_batch_size=4"])
    old_rows, _ = old_scoring_plan(cfg, 3, batch.size, False)  # every row scored by the π_old forward
    data = score_batch(cfg, model, Teachers.one(teacher), batch, tokens, old_rows)
    assert data.old_logp_B_T.dtype == torch.float64
    out = optimizer_update(cfg, model, RecordingOptimizer(model), data, update_plan(cfg, 3, batch.size)[0][0])
    assert out["drift/mean_abs_delta"] == 0.0
