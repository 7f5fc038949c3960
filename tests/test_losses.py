import math

import pytest
import torch

from opd_lab.losses import discounted_returns, full_reverse_kl, get_loss, lsm_loss, sampled_token_loss


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
    assert get_loss("lsm") and get_loss("sampled_token")
    with pytest.raises(KeyError, match="available"):
        get_loss("nope")
