"""Gradient-alignment maths: g* by hand and as the autograd steepest-ascent direction, cosine limits, d_t of each
loss against autograd/analytic forms, node selection, the diagnostic's loss registry, and the matched-position
comparison of correct vs incorrect rollouts with its bootstrap over questions."""

import math

import pytest
import torch

from opd_lab.core.alignment import (
    DIAGNOSTIC_LOSSES,
    choose_nodes,
    cosine,
    distill_gradient,
    ideal_gradient,
    matched_difference,
    q_all_equal,
)
from opd_lab.core.losses import full_reverse_kl


def test_ideal_gradient_by_hand_all_candidates():
    pi = torch.tensor([0.5, 0.3, 0.2])
    g, v = ideal_gradient(pi, torch.tensor([0, 1, 2]), torch.tensor([1.0, 0.0, 0.5]), "drop")
    assert v == pytest.approx(0.6)  # 0.5·1 + 0.3·0 + 0.2·0.5
    assert torch.allclose(g, torch.tensor([0.5 * 0.4, 0.3 * -0.6, 0.2 * -0.1]))


def test_ideal_gradient_is_the_steepest_ascent_of_success_probability():
    z = torch.tensor([0.3, -1.0, 0.7, 0.1], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([0.9, 0.1, 0.4, 0.0], dtype=torch.float64)
    (torch.softmax(z, -1) * q).sum().backward()  # P(success) = Σ_v π(v) Q(v)
    g, _ = ideal_gradient(torch.softmax(z.detach(), -1), torch.arange(4), q, "drop")
    assert torch.allclose(g.double(), z.grad, atol=1e-7)


def test_ideal_gradient_rest_modes():
    pi = torch.tensor([0.5, 0.3, 0.2])
    g, v = ideal_gradient(pi, torch.tensor([0, 1]), torch.tensor([1.0, 0.0]), "drop")
    assert v == pytest.approx(0.625)  # π renormalised on {0, 1}: 0.625·1
    assert torch.allclose(g, torch.tensor([0.625 * 0.375, 0.375 * -0.625, 0.0]))
    g, v = ideal_gradient(pi, torch.tensor([0]), torch.tensor([1.0]), "share", q_rest=0.25)
    assert v == pytest.approx(0.5 + 0.5 * 0.25)
    assert torch.allclose(g, torch.tensor([0.5 * 0.375, 0.3 * -0.375, 0.2 * -0.375]))


def test_alignment_limits():
    g = torch.tensor([0.2, -0.18, -0.02])
    assert cosine(g, g) == pytest.approx(1.0)
    assert cosine(g, -g) == pytest.approx(-1.0)
    assert cosine(g, 3 * g) == pytest.approx(1.0)
    assert math.isnan(cosine(g, torch.zeros(3)))


def test_full_rkl_gradient_equals_autograd_and_closed_form():
    torch.manual_seed(0)
    z, q_logits = torch.randn(11, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    logq = torch.log_softmax(q_logits, -1)
    d = distill_gradient("full_rkl", z, logq, token=3).double()
    zz = z.clone().requires_grad_(True)
    full_reverse_kl(zz.view(1, 1, -1), q_logits.view(1, 1, -1)).sum().backward()
    assert torch.allclose(d, -zz.grad, atol=1e-6)
    log_pi = torch.log_softmax(z, -1)
    kl = (log_pi.exp() * (log_pi - logq)).sum()
    assert torch.allclose(d, -log_pi.exp() * (log_pi - logq - kl), atol=1e-6)


def test_sampled_token_and_lsm_gradients():
    torch.manual_seed(1)
    z, logq = torch.randn(9, dtype=torch.float64), torch.log_softmax(torch.randn(9, dtype=torch.float64), -1)
    y = 4
    pi = torch.softmax(z, -1)
    adv = float(logq[y] - torch.log(pi[y]))
    e = torch.zeros(9, dtype=torch.float64)
    e[y] = 1
    d = distill_gradient("sampled_token", z, logq, token=y).double()
    assert torch.allclose(d, adv * (e - pi), atol=1e-6)  # at π_θ = π_old: d = A (e_y − π)
    d = distill_gradient("lsm", z, logq, token=y, top_k=3).double()
    outside = torch.ones(9, dtype=torch.bool)
    outside[torch.topk(logq, 3).indices] = False
    assert torch.all(d[outside] == 0) and d[~outside].abs().sum() > 0
    assert d.sum().abs() < 1e-6  # renormalised: gradient is orthogonal to a constant shift of the logits


def test_choose_nodes():
    ent = torch.tensor([0.1, 2.0, 0.3, 5.0, 0.2, 4.0, 1.0])
    assert choose_nodes(ent, "every_k", 2, 10) == [0, 2, 4]
    assert choose_nodes(ent, "every_k", 2, 2) == [0, 2]
    assert choose_nodes(ent, "top_entropy", 0, 2) == [3, 5]  # the last position is never a node


def test_diagnostic_losses_registry_matches_the_config():
    from opd_lab.config.diagnose import DIAGNOSTIC_LOSS_NAMES

    assert DIAGNOSTIC_LOSSES.names() == sorted(DIAGNOSTIC_LOSS_NAMES)
    with pytest.raises(KeyError, match="unknown diagnostic loss 'kl'; available"):
        distill_gradient("kl", torch.zeros(3), torch.log_softmax(torch.zeros(3), -1), 0)


def test_ideal_gradient_is_exactly_zero_when_every_q_is_equal():
    """All Q = 1 (or all 0, rest estimate included) gives g*_t = 0 exactly, so a_t is undefined, not the cosine of
    float-rounding noise (π renormalised on the candidates sums to 1 only up to rounding)."""
    torch.manual_seed(0)
    pi = torch.softmax(torch.randn(1000) * 3, -1)
    cands = torch.tensor([3, 17, 256, 999])
    for q, rest, q_rest in ((1.0, "drop", None), (0.0, "drop", None), (1.0, "share", 1.0), (0.5, "share", 0.5)):
        g, v = ideal_gradient(pi, cands, torch.full((4,), q), rest, q_rest)
        assert torch.count_nonzero(g) == 0 and v == q
        assert math.isnan(cosine(torch.randn(1000), g))
    assert q_all_equal([0.0, 0.0], 0.0) and not q_all_equal([0.0, 0.0], 0.5) and not q_all_equal([1.0, 0.5])
    g, _ = ideal_gradient(pi, cands, torch.zeros(4), "share", q_rest=0.25)  # the rest estimate differs: defined
    assert g.norm() > 0


# one node per row: question, position t, correct rollout, a_t
NODES = [(0, 0, True, 0.1), (0, 0, True, 0.3), (0, 24, True, 0.0),
         (1, 0, False, 0.5), (1, 24, False, 0.4), (1, 24, False, 0.2), (1, 48, False, 0.9),
         (2, 24, True, 0.0), (2, 24, True, 0.0), (2, 24, False, 0.6), (2, 72, True, math.nan)]


def _matched(nodes, **kw):
    return matched_difference(*map(list, zip(*nodes, strict=True)), **kw)


def test_matched_difference_by_hand():
    """t = 0: ā^inc − ā^cor = 0.5 − 0.2, w = min(2, 1) = 1; t = 24: 0.4 − 0.0, w = min(3, 3) = 3; t = 48 has no
    correct node and t = 72 only an undefined one: Δ = (1·0.3 + 3·0.4) / 4 = 0.375."""
    r = _matched(NODES)
    assert r["matched_diff"] == pytest.approx(0.375)
    assert (r["positions"], r["nodes_correct"], r["nodes_incorrect"], r["questions"]) == (2, 5, 4, 3)
    assert r["unmatched_diff"] == pytest.approx((0.5 + 0.4 + 0.2 + 0.9 + 0.6) / 5 - (0.1 + 0.3) / 5)
    assert r["ci95_low"] <= r["matched_diff"] <= r["ci95_high"]
    assert 0 < r["bootstrap"] <= 2000
    assert _matched(NODES) == r  # the bootstrap is seeded


def test_matched_difference_uses_only_positions_present_in_both_splits():
    """Correct rollouts probed only early (a_t = 0), incorrect ones only late (a_t = 1), one shared position t = 96:
    the matched difference is that position's 0.6 − 0.5, not the unmatched 0.9 − 0.1."""
    nodes = [(0, 0, True, 0.0), (0, 24, True, 0.0), (1, 48, False, 1.0), (1, 72, False, 1.0),
             (2, 96, True, 0.5), (3, 96, False, 0.6)]
    r = _matched(nodes)
    assert r["matched_diff"] == pytest.approx(0.1)
    assert (r["positions"], r["nodes_correct"], r["nodes_incorrect"]) == (1, 1, 1)
    assert r["unmatched_diff"] == pytest.approx((1 + 1 + 0.6) / 3 - 0.5 / 3)
    none = _matched(nodes[:4])  # no shared position: undefined, not an unmatched comparison
    assert math.isnan(none["matched_diff"]) and none["positions"] == 0 and math.isnan(none["ci95_low"])


def test_matched_difference_bootstrap_is_over_questions():
    """Resampling whole questions: one question gives a zero-width interval, and repeating every node within its
    question (correlated nodes add no information) leaves Δ and the interval unchanged."""
    one = _matched([(7, t, c, a) for _, t, c, a in NODES])
    assert one["ci95_low"] == pytest.approx(one["matched_diff"]) == pytest.approx(one["ci95_high"])
    r, doubled = _matched(NODES), _matched(NODES + NODES)
    for k in ("matched_diff", "ci95_low", "ci95_high"):
        assert doubled[k] == pytest.approx(r[k])
    assert r["ci95_high"] - r["ci95_low"] > 0
