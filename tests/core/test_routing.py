"""Multi-teacher routing maths (routing.py): hand-computed choices, the mixtures against a full-vocabulary brute
force, invariances (identical teachers, one-hot weights) and the routing metrics."""

import math

import pytest
import torch

from opd_lab.core import routing as R
from opd_lab.core.losses import lsm_loss
from opd_lab.core.teacher_scores import TeacherScores


def _scores(logits_B_T_V: torch.Tensor, y_B_T: torch.Tensor, k: int, query_B_T_Q=None) -> TeacherScores:
    """A teacher's scores computed from its full distribution (the brute-force reference)."""
    lp = torch.log_softmax(logits_B_T_V.double(), -1).float()
    top, ids = lp.topk(k, -1) if k else (None, None)
    return TeacherScores(logp_B_T=lp.gather(-1, y_B_T[..., None])[..., 0], topk_ids_B_T_K=ids, topk_logp_B_T_K=top,
                         query_logp_B_T_Q=lp.gather(-1, query_B_T_Q) if query_B_T_Q is not None else None,
                         entropy_B_T=-(lp.exp() * lp).sum(-1))


@pytest.fixture
def two():
    g = torch.Generator().manual_seed(0)
    B, T, V = 2, 5, 7
    logits = [torch.randn(B, T, V, generator=g) * 2 for _ in range(2)]
    y = torch.randint(0, V, (B, T), generator=g)
    return logits, y


def test_take_choice_gathers_each_teachers_fields(two):
    logits, y = two
    s = [_scores(z, y, 3) for z in logits]
    choice = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]])
    out = R.take_choice(s, choice)
    for b in range(2):
        for t in range(5):
            i = int(choice[b, t])
            assert out.logp_B_T[b, t] == s[i].logp_B_T[b, t]
            assert torch.equal(out.topk_ids_B_T_K[b, t], s[i].topk_ids_B_T_K[b, t])
            assert torch.equal(out.topk_logp_B_T_K[b, t], s[i].topk_logp_B_T_K[b, t])
    assert out.query_logp_B_T_Q is None
    w = R.one_hot_weights(choice, 2)
    assert w.shape == (2, 5, 2) and torch.equal(w.argmax(-1), choice) and torch.all(w.sum(-1) == 1)


def test_max_confidence_top1_and_entropy_by_hand(two):
    logits, y = two
    s = [_scores(z, y, 1) for z in logits]
    p = [torch.softmax(z.double(), -1) for z in logits]
    top1 = torch.stack([q.max(-1).values for q in p], -1).argmax(-1)
    ent = torch.stack([-(q * q.log()).sum(-1) for q in p], -1).argmin(-1)
    assert torch.equal(R.max_confidence_choice(s, "top1"), top1)
    assert torch.equal(R.max_confidence_choice(s, "entropy"), ent)
    with pytest.raises(ValueError, match="top_k >= 1"):
        R.max_confidence_choice([_scores(z, y, 0) for z in logits], "top1")


def test_min_kl_sampled_token_is_the_k3_estimate():
    q = torch.tensor([[-1.0, -0.2, -3.0]])
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    r = q - old
    assert torch.allclose(R.sampled_kl_k3(q, old), torch.exp(r) - 1 - r)
    assert float(R.sampled_kl_k3(q, old)[0, 0]) == 0.0  # q = π_old at y_t: distance 0
    assert bool((R.sampled_kl_k3(torch.randn(4, 6), torch.randn(4, 6)) >= 0).all())


def test_support_kl_is_the_lsm_loss_at_pi_old(two):
    """D_i of min_kl for LSM is the renormalised LSM loss evaluated at π_θ = π_old on teacher i's support."""
    logits, _ = two
    old_logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(5))
    ids = torch.log_softmax(logits[0], -1).topk(3, -1).indices
    mask = torch.ones_like(ids)
    mask[0, 0, 2] = 0  # a duplicate entry
    q_at = torch.log_softmax(logits[0], -1).gather(-1, ids)
    old_at = torch.log_softmax(old_logits, -1).gather(-1, ids)
    ref, _ = lsm_loss(old_logits.gather(-1, ids), q_at, mask)
    assert torch.allclose(R.support_kl(old_at, q_at, mask), ref, atol=1e-6)
    assert torch.allclose(R.support_kl(q_at, q_at, mask), torch.zeros(2, 5), atol=1e-7)


def test_min_kl_choice_takes_the_first_on_ties():
    d = torch.tensor([[[0.3, 0.1, 0.1], [0.0, 0.0, 0.5]]])
    assert R.min_kl_choice(d).tolist() == [[1, 0]]


@pytest.mark.parametrize("space", ["log", "prob"])
def test_mixture_against_the_full_distribution(two, space):
    """log q_mix at y_t and the mixture's top-K support from the candidates equal the brute force on the full
    vocabulary (every id is a candidate when K·N >= V)."""
    logits, y = two
    w = R.normalised_weights([3.0, 1.0])
    lps = [torch.log_softmax(z.double(), -1) for z in logits]
    full = (w[0] * lps[0] + w[1] * lps[1]) if space == "log" else torch.log(w[0] * lps[0].exp() + w[1] * lps[1].exp())
    s = [_scores(z, y, 4) for z in logits]  # 2 × 4 >= V = 7: the union is every id
    cand = R.candidates([x.topk_ids_B_T_K for x in s])
    cand_logp = [lp.float().gather(-1, cand[0]) for lp in lps]
    out = R.mixture_scores(s, w, space, 4, cand, cand_logp)
    assert torch.allclose(out.logp_B_T, full.float().gather(-1, y[..., None])[..., 0], atol=1e-6)
    ref_top, ref_ids = full.float().topk(4, -1)
    assert torch.allclose(out.topk_logp_B_T_K, ref_top, atol=1e-6)
    assert torch.equal(torch.sort(out.topk_ids_B_T_K, -1).values, torch.sort(ref_ids, -1).values)


@pytest.mark.parametrize("space", ["log", "prob"])
def test_mixture_of_identical_teachers_is_the_teacher(two, space):
    logits, y = two
    s = _scores(logits[0], y, 3)
    cand = R.candidates([s.topk_ids_B_T_K, s.topk_ids_B_T_K])
    lp = torch.log_softmax(logits[0].double(), -1).float()
    out = R.mixture_scores([s, s], R.normalised_weights([0.3, 0.7]), space, 3, cand,
                           [lp.gather(-1, cand[0])] * 2)
    assert torch.allclose(out.logp_B_T, s.logp_B_T, atol=1e-6)
    assert torch.allclose(out.topk_logp_B_T_K, s.topk_logp_B_T_K, atol=1e-6)
    assert torch.equal(out.topk_ids_B_T_K, s.topk_ids_B_T_K)


@pytest.mark.parametrize("space", ["log", "prob"])
def test_one_hot_mixture_weight_is_that_teacher(two, space):
    logits, y = two
    s = [_scores(z, y, 0, query_B_T_Q=torch.zeros(2, 5, 2, dtype=torch.long)) for z in logits]
    out = R.mixture_scores(s, R.normalised_weights([0.0, 1.0]), space, 0, n_query=2)
    assert torch.allclose(out.logp_B_T, s[1].logp_B_T, atol=1e-6)
    assert torch.allclose(out.query_logp_B_T_Q, s[1].query_logp_B_T_Q, atol=1e-6)


def test_weights_must_have_a_positive_sum():
    assert R.normalised_weights([2.0, 2.0]).tolist() == [0.5, 0.5]
    for bad in ([0.0, 0.0], [1.0, -0.5]):
        with pytest.raises(ValueError, match="weights"):
            R.normalised_weights(bad)


def test_per_sample_rows_by_tag():
    names = ["a", "b"]
    assert R.row_teachers(["ops3", "ops4", "x"], {"ops3": "a", "ops4": "b"}, "a", names).tolist() == [0, 1, 0]
    assert R.per_sample_choice(torch.tensor([1, 0]), 3).tolist() == [[1, 1, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="routing.by_tag"):
        R.row_teachers(["x"], {"ops3": "a"}, None, names)


def test_routing_metrics():
    mask = torch.tensor([[1, 1, 1, 0]])
    w = R.one_hot_weights(torch.tensor([[0, 0, 1, 1]]), 2)
    m = R.routing_metrics(w, mask, ["a", "b"])
    assert m["routing/frac/a"] == pytest.approx(2 / 3) and m["routing/frac/b"] == pytest.approx(1 / 3)
    assert m["routing/entropy"] == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    assert R.routing_metrics(R.one_hot_weights(torch.zeros(1, 4), 2), mask, ["a", "b"])["routing/entropy"] == 0.0
    even = R.routing_metrics(R.constant_weights(torch.tensor([0.5, 0.5]), 1, 4), mask, ["a", "b"])
    assert even["routing/entropy"] == pytest.approx(math.log(2))
