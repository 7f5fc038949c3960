import math

import pytest
import torch

from opd_lab.core.losses import LOSSES, LossSpec, discounted_returns, full_reverse_kl, lsm_loss, sampled_token_loss


# ----------------------------------------------------------------------------------------- sampled-token
def test_sampled_token_hand_computed():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]]))
    teacher = torch.log(torch.tensor([[0.8, 0.2, 0.5, 0.05]]))
    # ratios: 1.5 (A>0: clipped at 1.2), 0.5 (A<0: clip at 0.8 is the max), 1.0, 4.0 (A<0: dual clip)
    logp = old + torch.log(torch.tensor([[1.5, 0.5, 1.0, 4.0]]))
    mask = torch.ones_like(old)
    loss, m = sampled_token_loss(logp, old, teacher, mask, clip_eps=0.2, dual_clip=3.0)
    A = [math.log(1.6), math.log(0.4), 0.0, math.log(0.1)]
    expected = [
        -min(1.5 * A[0], 1.2 * A[0]),
        -min(0.5 * A[1], 0.8 * A[1]),
        0.0,
        min(-min(4.0 * A[3], 1.2 * A[3]), -3.0 * A[3]),
    ]
    assert loss[0].tolist() == pytest.approx(expected, rel=1e-5)
    assert m["dual_clip_frac"][0].tolist() == [0, 0, 0, 1]
    assert m["ratio_clip_frac"][0].tolist() == [1, 1, 0, 0]  # the dual clip, not the ratio clip, binds at 3


def test_sampled_token_gradient_on_policy_is_advantage():
    """At ρ = 1 the gradient w.r.t. log π_θ is −A_t (the unclipped policy gradient)."""
    old = torch.log(torch.tensor([[0.3, 0.6]]))
    teacher = torch.log(torch.tensor([[0.6, 0.2]]))
    logp = old.clone().requires_grad_(True)
    loss, _ = sampled_token_loss(logp, old, teacher, torch.ones_like(old))
    loss.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-math.log(2.0), -math.log(1 / 3)], rel=1e-5)


def test_clip_log_ratio_and_discount():
    old = torch.zeros(1, 3)
    teacher = torch.tensor([[-10.0, 1.0, 2.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    _, m = sampled_token_loss(old.clone(), old, teacher, mask, gamma=0.5, clip_log_ratio=5.0)
    # r = (−5, [masked → 0], 2); A_2 = 2, A_1 = 0 + 0.5·2 = 1, A_0 = −5 + 0.5·1 = −4.5
    assert m["advantage"][0].tolist() == pytest.approx([-4.5, 1.0, 2.0])
    r = torch.tensor([[1.0, 2.0, 3.0]])
    assert discounted_returns(r, torch.ones_like(r), 0.0).tolist() == r.tolist()
    assert discounted_returns(r, torch.ones_like(r), 1.0).tolist() == [[6.0, 5.0, 3.0]]


# -------------------------------------------------------------------------------------------------- LSM
def _lsm_case(seed=0, B=2, T=3, S=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, S, generator=g, dtype=dtype)
    q = torch.log_softmax(torch.randn(B, T, S + 4, generator=g, dtype=dtype), -1)[..., :S]
    return z, q, torch.ones(B, T, S, dtype=torch.long)


def test_lsm_hand_computed():
    z = torch.log(torch.tensor([[[0.2, 0.2]]]))  # renormalised student: (0.5, 0.5)
    q = torch.log(torch.tensor([[[0.6, 0.2]]]))  # renormalised teacher: (0.75, 0.25)
    loss, m = lsm_loss(z, q, torch.ones(1, 1, 2))
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["teacher_support_mass"].item() == pytest.approx(0.8, rel=1e-6)


def test_lsm_zero_when_renormalised_distributions_match():
    z, q, mask = _lsm_case()
    loss, _ = lsm_loss(q + 3.0, q, mask)  # same renormalised distribution, shifted logits
    assert torch.allclose(loss, torch.zeros_like(loss), atol=1e-12)


def test_lsm_on_full_support_equals_full_reverse_kl():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    q = torch.log_softmax(zt, -1)
    loss, _ = lsm_loss(zs, q, torch.ones(2, 4, 7))
    assert torch.allclose(loss, full_reverse_kl(zs, zt), atol=1e-6)


def test_lsm_finite_difference_gradient():
    z, q, mask = _lsm_case()
    mask[0, 1, 3] = 0
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: lsm_loss(x, q, mask)[0], (z,))
    lse = torch.logsumexp(torch.cat([z.detach(), torch.randn(2, 3, 6, dtype=torch.float64)], -1), -1)
    lse.requires_grad_(True)
    for tail in (False, True):
        def fn(x, s, tail=tail):
            return lsm_loss(x, q, mask, s, renormalise=False, tail=tail)[0]

        assert torch.autograd.gradcheck(fn, (z, lse))


def test_lsm_masked_support_entries_are_ignored():
    z, q, mask = _lsm_case(dtype=torch.float32)
    mask[..., -1] = 0
    full, _ = lsm_loss(z, q, mask)
    sub, _ = lsm_loss(z[..., :-1], q[..., :-1], mask[..., :-1])
    assert torch.allclose(full, sub, atol=1e-6)
    z2 = z.clone().requires_grad_(True)
    lsm_loss(z2, q, mask)[0].sum().backward()
    assert torch.all(z2.grad[..., -1] == 0)


def test_lsm_tail_is_bucketed_kl():
    """With the tail bucket, the loss is the KL of the distributions coarsened to S ∪ {rest}."""
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(1, 2, 6, generator=g, dtype=torch.float64), torch.randn(1, 2, 6, generator=g,
                                                                                dtype=torch.float64)
    ls, lq = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    S = 4
    loss, _ = lsm_loss(zs[..., :S], lq[..., :S], torch.ones(1, 2, S), torch.logsumexp(zs, -1),
                       renormalise=False, tail=True)
    p = torch.cat([ls[..., :S].exp(), ls[..., S:].exp().sum(-1, keepdim=True)], -1)
    qq = torch.cat([lq[..., :S].exp(), lq[..., S:].exp().sum(-1, keepdim=True)], -1)
    assert torch.allclose(loss, (p * (p.log() - qq.log())).sum(-1), atol=1e-10)


def test_registry_lists_names_on_miss():
    assert LOSSES.names() == ["lsm", "sampled_token"]
    assert all(isinstance(LOSSES.get(n), LossSpec) for n in LOSSES.names())
    assert LOSSES.get("lsm").needs is not LOSSES.get("sampled_token").needs  # LSM asks for the teacher's top-K
    with pytest.raises(KeyError, match=r"unknown loss 'nope'; available: \['lsm', 'sampled_token'\]"):
        LOSSES.get("nope")


# ----------------------------------------------------------------------------------- staleness corrections
def _reference_sampled_token(logp, old, prox, q, reward, off_policy, cap, eps=0.2, c=3.0, clip=5.0):
    """Per-token ℓ_t and ∂ℓ_t/∂log π_θ from docs/methods.md, one token at a time in Python floats (float64)."""
    losses, grads = [], []
    for lp, b, p, lq in zip(logp, old, prox, q, strict=True):
        ref = {"behaviour": b, "proximal": p, "current": lp}[reward]
        A = max(-clip, min(clip, lq - ref))
        anchor = b if off_policy == "none" else p
        rho = math.exp(lp - anchor)
        unclipped, clipped = -rho * A, -min(max(rho, 1 - eps), 1 + eps) * A
        loss, grad = (unclipped, -rho * A) if unclipped >= clipped else (clipped, 0.0)
        if A < 0 and loss > -c * A:
            loss, grad = -c * A, 0.0
        ratio = math.exp(p - b)
        w = {"none": 1.0, "decoupled": min(ratio, cap), "masked": ratio if 1 / cap <= ratio <= cap else 0.0}[off_policy]
        losses.append(loss * w)
        grads.append(grad * w)
    return losses, grads


# π_θ/π_b, π_prox/π_b per token: in the clip and out of it on both sides, A of both signs, the dual clip,
# π_prox/π_b above C = 2 (truncated or dropped), below 1/C (dropped) and inside [1/C, C]
_OLD = [math.log(v) for v in (0.5, 0.5, 0.5, 0.5, 0.4, 0.3, 0.6)]
_PROX = [b + math.log(r) for b, r in zip(_OLD, (1.0, 1.3, 0.7, 2.5, 0.4, 1.1, 3.0), strict=True)]
_LOGP = [b + math.log(r) for b, r in zip(_OLD, (1.5, 1.1, 0.5, 3.0, 0.45, 1.0, 5.0), strict=True)]
_Q = [math.log(v) for v in (0.8, 0.2, 0.5, 0.05, 0.9, 0.3, 0.01)]


@pytest.mark.parametrize("reward", ["behaviour", "proximal", "current"])
@pytest.mark.parametrize("off_policy", ["none", "decoupled", "masked"])
def test_staleness_corrections_against_a_float64_hand_computation(reward, off_policy):
    """ℓ_t and its gradient for every reward reference × correction: ρ_t = π_θ/π_b (none) or u_t = π_θ/π_prox
    (decoupled, masked) in the clip, the truncated or masked behaviour weight w_t, the reward's reference."""
    logp = torch.tensor([_LOGP], dtype=torch.float64, requires_grad=True)
    old, prox, q = (torch.tensor([v], dtype=torch.float64) for v in (_OLD, _PROX, _Q))
    loss, m = sampled_token_loss(logp, old, q, torch.ones_like(old), prox_logp_B_T=prox, reward_reference=reward,
                                 off_policy=off_policy, is_cap=2.0)
    loss.sum().backward()
    want_loss, want_grad = _reference_sampled_token(_LOGP, _OLD, _PROX, _Q, reward, off_policy, 2.0)
    assert loss[0].tolist() == pytest.approx(want_loss, rel=1e-12, abs=1e-12)
    assert logp.grad[0].tolist() == pytest.approx(want_grad, rel=1e-12, abs=1e-12)
    assert sum(abs(g) for g in want_grad) > 0.1  # the case has gradient to get wrong
    if off_policy == "decoupled":
        assert m["staleness/w_truncated_frac"][0].tolist() == [0, 0, 0, 1, 0, 0, 1]
        assert m["staleness/w_mean"][0].tolist() == pytest.approx([1.0, 1.3, 0.7, 2.0, 0.4, 1.1, 2.0])
    if off_policy == "masked":
        assert m["staleness/w_dropped_frac"][0].tolist() == [0, 0, 0, 1, 1, 0, 1]
        assert m["staleness/w_mean"][0].tolist() == pytest.approx([1.0, 1.3, 0.7, 0.0, 0.0, 1.1, 0.0])


def test_every_correction_differs_from_the_published_loss_on_a_stale_token():
    """The cases above can fail: on these tokens each option changes ℓ_t (so the hand computation tells them apart)."""
    base, _ = _reference_sampled_token(_LOGP, _OLD, _PROX, _Q, "behaviour", "none", 2.0)
    for reward, off_policy in [("proximal", "none"), ("current", "none"), ("behaviour", "decoupled"),
                               ("behaviour", "masked")]:
        other, _ = _reference_sampled_token(_LOGP, _OLD, _PROX, _Q, reward, off_policy, 2.0)
        assert max(abs(a - b) for a, b in zip(base, other, strict=True)) > 1e-3, (reward, off_policy)


@pytest.mark.parametrize("reward", ["behaviour", "proximal"])
@pytest.mark.parametrize("off_policy", ["none", "decoupled", "masked"])
def test_with_prox_equal_to_behaviour_every_correction_is_bit_identical(reward, off_policy):
    """k = 0: π_prox = π_b, so w_t = 1 and u_t = ρ_t exactly; the loss and its gradient are the published ones bit
    for bit (float32, as the learner runs them). ``current`` is no such no-op: it follows π_θ (next test)."""
    g = torch.Generator().manual_seed(0)
    old = torch.randn(3, 9, generator=g) - 2
    logp0 = (old + 0.3 * torch.randn(3, 9, generator=g))
    q, mask = torch.randn(3, 9, generator=g) - 2, (torch.rand(3, 9, generator=g) > 0.2).float()
    outs = []
    for kwargs in ({}, {"prox_logp_B_T": old.clone(), "reward_reference": reward, "off_policy": off_policy}):
        logp = logp0.clone().requires_grad_(True)
        loss, _ = sampled_token_loss(logp, old, q, mask, **kwargs)
        (loss * mask).sum().backward()
        outs.append((loss.detach(), logp.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_current_reward_follows_the_current_policy():
    """``reward_reference=current``: r_t = log q − sg(log π_θ) at whatever π_θ the update sees (not π_b), and no
    gradient flows through the reward."""
    old = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    q = torch.log(torch.tensor([[0.6, 0.2]], dtype=torch.float64))
    logp = torch.log(torch.tensor([[0.55, 0.45]], dtype=torch.float64)).requires_grad_(True)
    _, m = sampled_token_loss(logp, old, q, torch.ones_like(old), reward_reference="current", clip_log_ratio=None)
    assert m["log_ratio_teacher_old"][0].tolist() == pytest.approx((q - logp.detach())[0].tolist(), rel=1e-12)
    loss, _ = sampled_token_loss(logp, old, q, torch.ones_like(old), reward_reference="current")
    loss.sum().backward()  # in the clip: ∂ℓ/∂log π_θ = −ρ A with A = log q − log π_θ held constant
    rho = (logp.detach() - old).exp()
    assert logp.grad[0].tolist() == pytest.approx((-rho * (q - logp.detach()))[0].tolist(), rel=1e-12)


@pytest.mark.parametrize("off_policy", ["decoupled", "masked"])
def test_lsm_correction_multiplies_each_token_by_its_behaviour_weight(off_policy):
    """LSM has no ratio: ``decoupled``/``masked`` give ℓ_t · w_t (and the gradient w_t ∂ℓ_t), from the registry's
    loss, as the learner calls it."""
    from types import SimpleNamespace

    from opd_lab.config import LSMLossConfig, OffPolicy
    from opd_lab.core.losses import LOSSES, PolicyOutputs

    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 5, generator=g, dtype=torch.float64)
    tq = torch.log_softmax(torch.randn(1, 4, 5, generator=g, dtype=torch.float64), -1)
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64))
    prox = old + torch.log(torch.tensor([[1.0, 2.5, 0.3, 1.4]], dtype=torch.float64))
    scored = SimpleNamespace(teacher_support_logp_B_T_S=tq, support_mask_B_T_S=torch.ones(1, 4, 5),
                             old_logp_B_T=old, prox_logp_B_T=prox)
    plain, _ = lsm_loss(z, tq, torch.ones(1, 4, 5))
    zg = z.clone().requires_grad_(True)
    out = PolicyOutputs(torch.zeros(1, 4), torch.zeros(1, 4), zg)
    loss, m = LOSSES.get("lsm").fn(out, scored, LSMLossConfig(off_policy=OffPolicy(off_policy), is_cap=2.0))
    w = [1.0, 2.0, 0.3, 1.4] if off_policy == "decoupled" else [1.0, 0.0, 0.0, 1.4]
    assert loss[0].tolist() == pytest.approx([a * b for a, b in zip(plain[0].tolist(), w, strict=True)], rel=1e-12)
    assert m["staleness/w_mean"][0].tolist() == pytest.approx(w, rel=1e-12)
    loss.sum().backward()
    zr = z.clone().requires_grad_(True)
    lr_, _ = lsm_loss(zr, tq, torch.ones(1, 4, 5))
    (lr_ * torch.tensor([w], dtype=torch.float64)).sum().backward()
    assert torch.allclose(zg.grad, zr.grad, rtol=1e-12, atol=1e-15)


def test_behaviour_weight_refuses_none():
    from opd_lab.core.losses import behaviour_weight

    with pytest.raises(ValueError, match="allowed decoupled, masked"):
        behaviour_weight(torch.zeros(1), torch.zeros(1), "none")
