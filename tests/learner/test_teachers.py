"""Several teachers (teachers.py) on tiny real models: one teacher is the single scorer unchanged; identical teachers
give one teacher's target under every rule; the per-token rules pick what a brute force over the full distributions
picks; one-at-a-time residency never holds two teachers on the device; routed scores flow through score_batch and
an optimizer update with per-teacher metrics."""

import math
import random

import pytest
import torch

from opd_lab.config import RoutingConfig
from opd_lab.config.routing import Confidence, RoutingRule
from opd_lab.core.losses import ScoreNeeds
from opd_lab.learner.scoring import HFTeacherScorer, build_support, score_batch
from opd_lab.learner.teachers import Teachers
from opd_lab.learner.update import optimizer_update, per_teacher_loss
from opd_lab.models.token_ids import TokenIds
from opd_lab.rollout.base import SamplingSpec
from opd_lab.rollout.hf import HFEngine
from opd_lab.tasks import encode_prompts
from opd_lab.tasks.arith import ArithmeticTask
from tests.conftest import compose, tiny_model
from tests.learner.test_update import RecordingOptimizer

RULES = ["per_sample", "mixture", "min_kl", "max_confidence"]


@pytest.fixture(scope="module")
def setup(tokenizer):
    student = tiny_model(tokenizer, 32, 1, seed=0)
    teachers = [tiny_model(tokenizer, 48, 1, seed=1), tiny_model(tokenizer, 48, 1, seed=2)]
    task = ArithmeticTask(min_operands=2, max_operands=3, min_digits=1, max_digits=2)
    problems = task.train_problems(4, random.Random(0))
    batch = HFEngine(student, tokenizer).generate(encode_prompts(tokenizer, problems),
                                                 SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_tokens=30, seed=0))
    batch.prompt_tags = [p.tag for p in problems]
    return student, teachers, batch, TokenIds.build(tokenizer, ["<think>", "</think>", "<|im_end|>"])


def _routing(rule: str, **kw) -> RoutingConfig:
    by_tag = {"ops2": "a", "ops3": "b"} if rule == "per_sample" else {}
    return RoutingConfig(rule=RoutingRule(rule), by_tag=by_tag, **kw)


def _old_at(student, batch):
    from opd_lab.learner.scoring import score_teacher

    def old_at(query):
        s = score_teacher(student, batch, 0, 1.0, query)
        return s.logp_B_T, s.query_logp_B_T_Q
    return old_at


NEEDS = {"sampled_token": ScoreNeeds(), "lsm": ScoreNeeds(teacher_top_k=5)}


def test_one_teacher_is_the_scorer_unchanged(setup):
    student, teachers, batch, _ = setup
    scorer = HFTeacherScorer(teachers[0])
    routed = Teachers(["teacher"], [scorer], RoutingConfig()).score(batch, NEEDS["lsm"], 1.0)
    ref = scorer(batch, 5, 1.0)
    assert routed.weights_B_T_N is None and routed.each_logp_B_T_N is None
    assert torch.equal(routed.scores.logp_B_T, ref.logp_B_T)
    assert torch.equal(routed.scores.topk_ids_B_T_K, ref.topk_ids_B_T_K)


@pytest.mark.parametrize("loss", ["sampled_token", "lsm"])
@pytest.mark.parametrize("rule", RULES)
def test_identical_teachers_give_the_one_teachers_target(setup, loss, rule):
    student, teachers, batch, _ = setup
    scorer = HFTeacherScorer(teachers[0])
    needs = NEEDS[loss]
    ref = scorer(batch, needs.teacher_top_k, 1.0)
    t = Teachers(["a", "b"], [scorer, scorer], _routing(rule), [0.3, 0.7])
    routed = t.score(batch, needs, 1.0, None, _old_at(student, batch),
                     lambda s: build_support(needs, batch.response_ids_B_T, s, None))
    m = batch.response_mask_B_T.bool()
    assert torch.allclose(routed.scores.logp_B_T[m], ref.logp_B_T[m], atol=1e-5)
    if needs.teacher_top_k:
        assert torch.allclose(routed.scores.topk_logp_B_T_K[m], ref.topk_logp_B_T_K[m], atol=1e-5)
        assert (routed.scores.topk_ids_B_T_K[m] == ref.topk_ids_B_T_K[m]).float().mean() > 0.99  # ties aside
    else:
        assert routed.scores.topk_ids_B_T_K is None
    assert torch.allclose(routed.weights_B_T_N.sum(-1), torch.ones(m.shape))


def _full(model, batch):
    """log q(·|h_t) over the whole vocabulary [B, T, V] (small V: the brute-force reference)."""
    from opd_lab.learner.heads import response_hidden

    with torch.no_grad():
        h = response_hidden(model, batch)
        return torch.log_softmax((h @ model.get_output_embeddings().weight.t()).double(), -1)


@pytest.mark.parametrize("confidence", ["top1", "entropy"])
def test_max_confidence_matches_the_brute_force(setup, confidence):
    student, teachers, batch, _ = setup
    t = Teachers(["a", "b"], [HFTeacherScorer(m) for m in teachers],
                 _routing("max_confidence", confidence=Confidence(confidence)))
    routed = t.score(batch, NEEDS["sampled_token"], 1.0)
    full = [_full(m, batch) for m in teachers]
    if confidence == "top1":
        want = torch.stack([f.max(-1).values for f in full], -1).argmax(-1)
    else:
        want = torch.stack([-(f.exp() * f).sum(-1) for f in full], -1).argmin(-1)
    m = batch.response_mask_B_T.bool()
    assert torch.equal(routed.weights_B_T_N.argmax(-1)[m], want[m])
    y = batch.response_ids_B_T
    chosen = torch.stack([f.gather(-1, y[..., None])[..., 0] for f in full], -1).gather(-1, want[..., None])[..., 0]
    assert torch.allclose(routed.scores.logp_B_T[m], chosen[m].float(), atol=1e-5)


@pytest.mark.parametrize("loss", ["sampled_token", "lsm"])
def test_min_kl_matches_the_brute_force(setup, loss):
    student, teachers, batch, _ = setup
    needs = NEEDS[loss]
    t = Teachers(["a", "b"], [HFTeacherScorer(m) for m in teachers], _routing("min_kl"))
    routed = t.score(batch, needs, 1.0, None, _old_at(student, batch),
                     lambda s: build_support(needs, batch.response_ids_B_T, s, None))
    full, old = [_full(m, batch) for m in teachers], _full(student, batch)
    y = batch.response_ids_B_T[..., None]
    if loss == "sampled_token":
        r = [(f.gather(-1, y) - old.gather(-1, y))[..., 0] for f in full]
        d = torch.stack([torch.expm1(x) - x for x in r], -1)
    else:
        d = []
        for f in full:
            ids = f.topk(5, -1).indices
            p, q = torch.log_softmax(old.gather(-1, ids), -1), torch.log_softmax(f.gather(-1, ids), -1)
            d.append((p.exp() * (p - q)).sum(-1))
        d = torch.stack(d, -1)
    m = batch.response_mask_B_T.bool()
    clear = (d[..., 0] - d[..., 1]).abs() > 1e-4  # not a near-tie
    assert torch.equal(routed.weights_B_T_N.argmax(-1)[m & clear], d.argmin(-1)[m & clear])


def test_per_sample_routes_rows_by_tag(setup):
    student, teachers, batch, _ = setup
    t = Teachers(["a", "b"], [HFTeacherScorer(m) for m in teachers], _routing("per_sample"))
    routed = t.score(batch, NEEDS["lsm"], 1.0)
    rows = torch.tensor([0 if tag == "ops2" else 1 for tag in batch.tags_B])
    assert torch.equal(routed.weights_B_T_N.argmax(-1), rows[:, None].expand_as(batch.response_mask_B_T))
    ref = [HFTeacherScorer(m)(batch, 5, 1.0) for m in teachers]
    for b, i in enumerate(rows.tolist()):
        assert torch.equal(routed.scores.topk_ids_B_T_K[b], ref[i].topk_ids_B_T_K[b])


class _Placed(torch.nn.Module):
    """A stand-in teacher module that records where it is."""

    def __init__(self, log, name):
        super().__init__()
        self.log, self.name, self.where = log, name, "cpu"

    def to(self, device):
        self.where = str(device)
        return self


def test_one_at_a_time_never_holds_two_teachers_on_the_device(setup):
    student, teachers, batch, _ = setup
    log: list[tuple] = []
    mods = [_Placed(log, "a"), _Placed(log, "b"), _Placed(log, "c")]

    def scorer(i):
        real = HFTeacherScorer(teachers[i % 2])

        def call(b, k, temp, query=None, entropy=False):
            log.append(tuple(m.where for m in mods))
            return real(b, k, temp, query, entropy)
        call.close = lambda: None
        return call

    t = Teachers(["a", "b", "c"], [scorer(i) for i in range(3)], _routing("mixture"), models=mods,
                 devices=["cuda:0"] * 3, one_at_a_time=True)
    t.score(batch, NEEDS["lsm"], 1.0)  # the mixture scores every teacher twice (top-K, then the candidates)
    assert len(log) == 6
    for where in log:
        assert sum(w == "cuda:0" for w in where) == 1, log
    assert all(m.where == "cpu" for m in mods) and not t.resident


@pytest.mark.parametrize("rule", ["max_confidence", "min_kl"])
def test_routed_batch_through_an_update(setup, tokenizer, rule):
    """score_batch keeps the routing (weights, per-teacher gaps, token fractions); an update reports a loss per
    teacher, and with hard routing Σ_i f_i · loss_i is the update's loss."""
    student, teachers, batch, tokens = setup
    cfg = compose(["loss=lsm", "gate=block32", "rollout.n_prompts=4", "rollout.n_samples=2",
                   "rollout.mini_batch_size=8", "loss.top_k=5"])
    t = Teachers(["a", "b"], [HFTeacherScorer(m) for m in teachers], _routing(rule))
    data = score_batch(cfg, student, t, batch, tokens)
    names = ["a", "b"]
    assert data.teacher_names == tuple(names) and data.route_B_T_N.shape == (*batch.response_mask_B_T.shape, 2)
    fr = [data.stats[f"routing/frac/{n}"] for n in names]
    lm = data.loss_mask_B_T.bool()
    want = data.route_B_T_N[lm].double().mean(0).tolist()
    assert fr == pytest.approx(want) and sum(fr) == pytest.approx(1.0)
    assert data.stats["routing/entropy"] == pytest.approx(-sum(f * math.log(f) for f in fr if f > 0))
    old = data.old_logp_B_T
    for i, n in enumerate(names):  # each teacher's own gap, from its own log-probs
        gap = (data.teacher_logp_each_B_T_N[..., i] - old)[lm].mean()
        assert data.stats[f"teacher/{n}/minus_old_logp"] == pytest.approx(float(gap), rel=1e-5)
    out = per_teacher_loss(optimizer_update(cfg, student, RecordingOptimizer(student), data, torch.arange(8)))
    present = [n for n, f in zip(names, fr, strict=True) if f > 0]
    assert all(f"teacher/{n}/loss" in out for n in present)
    assert sum(f * out.get(f"teacher/{n}/loss", 0.0) for n, f in zip(names, fr, strict=True)) == pytest.approx(
        out["loss"], rel=1e-5)


def test_a_mixture_logs_no_per_teacher_loss(setup):
    """Under a mixture every token carries every teacher's weight: a per-teacher loss would be the loss itself."""
    student, teachers, batch, tokens = setup
    cfg = compose(["loss=sampled_token", "gate=none", "rollout.n_prompts=4", "rollout.n_samples=2",
                   "rollout.mini_batch_size=8"])
    t = Teachers(["a", "b"], [HFTeacherScorer(m) for m in teachers], _routing("mixture"), [1.0, 3.0])
    data = score_batch(cfg, student, t, batch, tokens)
    assert data.stats["routing/frac/a"] == pytest.approx(0.25) and data.stats["routing/frac/b"] == pytest.approx(0.75)
    out = per_teacher_loss(optimizer_update(cfg, student, RecordingOptimizer(student), data, torch.arange(8)))
    assert not any(k.startswith("teacher/") and k.endswith("loss") for k in out)
    each = data.teacher_logp_each_B_T_N
    assert torch.allclose(data.teacher_logp_B_T, 0.25 * each[..., 0] + 0.75 * each[..., 1], atol=1e-6)


def test_hard_rules_take_ids_and_log_probs_from_the_same_teacher(setup):
    """Whatever teacher a token is routed to, its support ids and their log-probs both come from that teacher."""
    student, teachers, batch, _ = setup
    ref = [HFTeacherScorer(m)(batch, 5, 1.0) for m in teachers]
    for rule in ("min_kl", "max_confidence", "per_sample"):
        t = Teachers(["a", "b"], [HFTeacherScorer(m) for m in teachers], _routing(rule))
        routed = t.score(batch, NEEDS["lsm"], 1.0, None, _old_at(student, batch),
                         lambda s: build_support(NEEDS["lsm"], batch.response_ids_B_T, s, None))
        choice = routed.weights_B_T_N.argmax(-1)
        for i in range(2):
            m = (choice == i) & batch.response_mask_B_T.bool()
            assert torch.equal(routed.scores.topk_ids_B_T_K[m], ref[i].topk_ids_B_T_K[m]), rule
            assert torch.equal(routed.scores.topk_logp_B_T_K[m], ref[i].topk_logp_B_T_K[m]), rule
            assert torch.equal(routed.scores.logp_B_T[m], ref[i].logp_B_T[m]), rule


def test_every_routing_rule_of_the_config_is_registered():
    from opd_lab.config import RoutingRule
    from opd_lab.learner.teachers import RULES

    assert set(RULES.names()) | {"single"} == {r.value for r in RoutingRule}  # single: one teacher, no routing
    assert RULES.get("alignment").route is RULES.get("mixture").route  # alignment sets the mixture's weights
    with pytest.raises(KeyError, match="unknown routing rule 'nope'"):
        RULES.get("nope")
