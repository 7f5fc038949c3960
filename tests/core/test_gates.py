import math

import pytest
import torch

from opd_lab.core.gates import (
    REDUCERS,
    group_drift,
    group_max_abs,
    group_mean,
    normalise_gates,
    response_positions,
    shifted_gate,
)


def drift_gate(
    delta_B_T: torch.Tensor,
    loss_mask_B_T: torch.Tensor,
    response_mask_B_T: torch.Tensor,
    kind: str,
    tau: float,
    block_size: int | None = None,
    newline_B_T: torch.Tensor | None = None,
    shift: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The raw gate of one micro-batch, g_t ∝ exp(−τ·|m_G|): :func:`group_drift` then :func:`shifted_gate` (the
    learner takes the shift c over the whole optimizer update instead). ``gate_B_T`` is 1 off the loss mask and, as
    ``kind='none'`` has no groups (m_G ≡ 0), everywhere for it; ``extras`` holds m_G and the cancellation flags."""
    m_G, cancel = group_drift(delta_B_T, loss_mask_B_T, response_mask_B_T, kind, block_size, newline_B_T)
    gate = shifted_gate(m_G, loss_mask_B_T, tau, shift)
    return gate, {"group_drift_B_T": m_G, "cancel_B_T": cancel}


KINDS = [("none", None), ("token", None), ("sequence", None), ("block", 32), ("block", 64), ("block", 128),
         ("block", 2), ("span", None)]


def _random_case(B=3, T=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(B, T, generator=g) * 0.3
    resp = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate([T, T - 37, 90][:B]):
        resp[b, :n] = 1
    loss_mask = resp.clone()
    loss_mask[0, 5] = 0  # a masked special token
    newline = (torch.rand(B, T, generator=g) < 0.1).long()
    return delta, loss_mask, resp, newline


@pytest.mark.parametrize("kind,bs", KINDS)
def test_gate_is_one_without_drift(kind, bs):
    _, loss_mask, resp, newline = _random_case()
    g, _ = drift_gate(torch.zeros(loss_mask.shape), loss_mask, resp, kind, tau=3.0, block_size=bs,
                      newline_B_T=newline)
    assert torch.equal(g, torch.ones_like(g))
    assert torch.equal(normalise_gates(g, loss_mask), torch.ones_like(g))


@pytest.mark.parametrize("kind,bs", KINDS)
def test_normalised_gate_has_unit_mean_and_no_grad(kind, bs):
    delta, loss_mask, resp, newline = _random_case()
    delta.requires_grad_(True)
    g, _ = drift_gate(delta, loss_mask, resp, kind, tau=2.0, block_size=bs, newline_B_T=newline)
    assert not g.requires_grad
    gn = normalise_gates(g, loss_mask)
    mean = (gn * loss_mask).sum() / loss_mask.sum()
    assert mean.item() == pytest.approx(1.0, abs=1e-6)


def test_hand_computed_block_gate():
    # one row, block size 2: deltas (0.2, -0.2 | 0.4, 0.2 | 1.0); tau = 1
    delta = torch.tensor([[0.2, -0.2, 0.4, 0.2, 1.0]])
    mask = torch.ones_like(delta, dtype=torch.long)
    g, extras = drift_gate(delta, mask, mask, "block", tau=1.0, block_size=2)
    expected = torch.tensor([[1.0, 1.0, math.exp(-0.3), math.exp(-0.3), math.exp(-1.0)]])
    assert torch.allclose(g, expected)
    # signed mean: the first block cancels; the cancellation flag marks δ of sign opposite to m_G
    assert torch.allclose(extras["group_drift_B_T"], torch.tensor([[0.0, 0.0, 0.3, 0.3, 1.0]]))
    gn = normalise_gates(g, mask)
    assert torch.allclose(gn, expected / expected.mean())


def test_hand_computed_token_sequence_span():
    delta = torch.tensor([[0.1, -0.3, 0.5, 0.2]])
    mask = torch.ones_like(delta, dtype=torch.long)
    g_tok, _ = drift_gate(delta, mask, mask, "token", tau=2.0, shift=0.0)  # the unshifted raw gate
    assert torch.allclose(g_tok, torch.exp(-2.0 * delta.abs()))
    g_seq, _ = drift_gate(delta, mask, mask, "sequence", tau=2.0, shift=0.0)
    assert torch.allclose(g_seq, torch.full_like(delta, math.exp(-2.0 * 0.125)))
    newline = torch.tensor([[0, 1, 0, 0]])  # span ends after position 1: {0, 1}, {2, 3}
    g_span, _ = drift_gate(delta, mask, mask, "span", tau=1.0, newline_B_T=newline, shift=0.0)
    assert torch.allclose(g_span, torch.tensor([[math.exp(-0.1)] * 2 + [math.exp(-0.35)] * 2]))
    # shift-stable (the default): exp(−τ(|m_G| − min |m_G|)), the same gates up to the common factor exp(τ·0.1)
    g_stable, _ = drift_gate(delta, mask, mask, "token", tau=2.0)
    assert torch.allclose(g_stable, torch.exp(-2.0 * (delta.abs() - 0.1)))
    assert torch.allclose(normalise_gates(g_stable, mask), normalise_gates(g_tok, mask))


def test_masked_positions_do_not_enter_group_mean():
    delta = torch.tensor([[0.2, 5.0, 0.4]])
    resp = torch.ones_like(delta, dtype=torch.long)
    loss_mask = torch.tensor([[1, 0, 1]])
    g, extras = drift_gate(delta, loss_mask, resp, "sequence", tau=1.0, shift=0.0)
    assert torch.allclose(g[0, [0, 2]], torch.full((2,), math.exp(-0.3)))
    assert torch.allclose(extras["group_drift_B_T"][0, [0, 2]], torch.full((2,), 0.3))
    assert g[0, 1] == 1.0


@pytest.mark.parametrize("kind,bs", KINDS)
def test_block_boundaries_ignore_padding(kind, bs):
    """The same response padded on the left and/or right gets the same gates on its tokens."""
    delta, loss_mask, resp, newline = _random_case(B=1, T=150)
    ref, _ = drift_gate(delta, loss_mask, resp, kind, 1.5, bs, newline)
    for left, right in [(7, 0), (0, 11), (33, 5)]:
        def pad(x, left=left, right=right):
            return torch.cat([torch.zeros(1, left, dtype=x.dtype), x, torch.zeros(1, right, dtype=x.dtype)], 1)

        g, _ = drift_gate(pad(delta), pad(loss_mask), pad(resp), kind, 1.5, bs, pad(newline))
        assert torch.allclose(g[:, left : left + 150], ref)


def test_hand_computed_max_abs_statistic():
    """gate.reduce=max_abs: each group's signed δ of largest |δ| among its masked-in positions (a masked 5.0 is
    ignored, −0.4 beats 0.3, the tie +0.2/−0.2 resolves to +0.2), 0 for a group with no masked-in position."""
    delta = torch.tensor([[0.3, -0.4, 5.0, 0.2, -0.2, 0.7, 9.0]])
    resp = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    loss_mask = torch.tensor([[1, 1, 0, 1, 1, 0, 0]])
    m_G, cancel = group_drift(delta, loss_mask, resp, "block", 3, None, "max_abs")
    # blocks {0,1,2} {3,4,5}: −0.4 | +0.2 (tie); position 6 is off the response
    assert torch.allclose(m_G, torch.tensor([[-0.4, -0.4, -0.4, 0.2, 0.2, 0.2, 0.0]]))
    assert cancel.tolist() == [[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]]
    empty = group_max_abs(delta, torch.zeros_like(loss_mask), torch.tensor([[0, 0, 0, 1, 1, 1, -1]]))
    assert torch.equal(empty, torch.zeros_like(delta))
    assert set(REDUCERS.names()) >= {"mean", "max_abs"}


@pytest.mark.parametrize("kind,bs", KINDS)
def test_max_abs_bounds_the_mean_and_ignores_padding(kind, bs):
    """|max_abs| ≥ |mean| in every group (equal for one-token groups), and padding never moves it."""
    delta, loss_mask, resp, newline = _random_case()
    mean, _ = group_drift(delta, loss_mask, resp, kind, bs, newline)
    top, _ = group_drift(delta, loss_mask, resp, kind, bs, newline, "max_abs")
    assert bool((top.abs() >= mean.abs() - 1e-7).all())
    if kind == "token":
        assert torch.allclose(top * loss_mask, delta * loss_mask)
    padded = [torch.cat([torch.zeros(3, 9, dtype=x.dtype), x], 1) for x in (delta, loss_mask, resp, newline)]
    top_padded, _ = group_drift(*padded[:3], kind, bs, padded[3], "max_abs")
    assert torch.equal(top_padded[:, 9:], top)


def test_response_positions_and_group_mean():
    resp = torch.tensor([[0, 0, 1, 1, 1, 0]])
    assert response_positions(resp).tolist() == [[-1, -1, 0, 1, 2, -1]]
    vals = torch.tensor([[9.0, 9.0, 1.0, 2.0, 6.0, 9.0]])
    groups = torch.tensor([[-1, -1, 0, 0, 1, -1]])
    assert group_mean(vals, resp, groups).tolist() == [[0.0, 0.0, 1.5, 1.5, 6.0, 0.0]]


def test_normalise_with_clip():
    g = torch.tensor([[0.1, 1.0, 1.9]])
    mask = torch.ones_like(g)
    out = normalise_gates(g, mask, clip_min=0.5, clip_max=1.5)
    assert out[0].tolist() == pytest.approx([0.5, 1.0, 1.5])
    # the mean of a whole update (several micro-batches) can be given: g / mean, then the clip
    assert normalise_gates(g, mask, mean=2.0)[0].tolist() == pytest.approx([0.05, 0.5, 0.95])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gates_never_all_underflow(dtype):
    """δ = [1, 2], token gate, τ = 200: every τ|m_G| is past exp's underflow, yet the normalised gates are the exact
    [2/(1 + e^-200), 2e^-200/(1 + e^-200)] ≈ [2, 2.8e-87] (0 in float32), never [0, 0] (a zero update)."""
    delta = torch.tensor([[1.0, 2.0]], dtype=dtype)
    mask = torch.ones_like(delta, dtype=torch.long)
    g, _ = drift_gate(delta, mask, mask, "token", tau=200.0)
    out = normalise_gates(g, mask)
    assert out[0, 0].item() == pytest.approx(2.0, rel=1e-12)
    tiny = 2 * math.exp(-200.0)
    assert out[0, 1].item() == (pytest.approx(tiny, rel=1e-9) if dtype == torch.float64 else 0.0)
    for kind, bs in KINDS[1:]:  # any kind: the least drifted group gets exactly 1 before normalisation
        d, lm, resp, nl = _random_case()
        g, _ = drift_gate(d * 1000, lm, resp, kind, tau=50.0, block_size=bs, newline_B_T=nl)
        assert g[lm.bool()].max().item() == 1.0 and torch.isfinite(normalise_gates(g, lm)).all()


def test_position_block_sums_by_hand_and_padding():
    """Σ m v and Σ m per block of response positions: block 2 of one row (positions 0–1 | 2–3 | 4+, the last block
    taking the positions past it), a masked token left out, left padding moving nothing."""
    from opd_lab.core.gates import position_block_sums

    resp = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]])
    mask = resp.clone()
    mask[0, 2] = 0  # the row's second response token is a masked special
    v = torch.tensor([[9.0, 1.0, 5.0, 2.0, 4.0, 8.0, 16.0], [3.0, 6.0, 7.0, 9.0, 9.0, 9.0, 9.0]])
    sums, counts = position_block_sums({"v": v}, mask, resp, n_blocks=3, block=2)
    assert counts.tolist() == [3.0, 3.0, 2.0]
    assert sums["v"].tolist() == [1.0 + 3.0 + 6.0, 2.0 + 4.0 + 7.0, 8.0 + 16.0]
    padded = [torch.cat([torch.zeros(2, 5, dtype=x.dtype), x], 1) for x in (v, mask, resp)]
    again, n_again = position_block_sums({"v": padded[0]}, padded[1], padded[2], n_blocks=3, block=2)
    assert torch.equal(again["v"], sums["v"]) and torch.equal(n_again, counts)
