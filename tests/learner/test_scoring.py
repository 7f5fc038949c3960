import math
from types import SimpleNamespace

import pytest
import torch

from opd_lab.learner.heads import logsumexp_chunked, response_hidden, response_logits
from opd_lab.learner.scoring import dedup_mask, routing_by_tag, score_teacher
from opd_lab.rollout.base import assemble_batch
from tests.conftest import tiny_model


def test_chunked_logsumexp_matches_full():
    x = torch.randn(2, 37, 11)
    for chunk in (1, 5, 37, 100):
        assert torch.allclose(logsumexp_chunked(x, chunk), torch.logsumexp(x, -1), atol=1e-6)


def test_dedup_mask_keeps_first_occurrence():
    ids = torch.tensor([[[3, 1, 3, 2, 1, 7]]])
    assert dedup_mask(ids).tolist() == [[[1, 1, 0, 1, 0, 1]]]


def test_response_logprobs_ignore_left_padding(tokenizer):
    """A padded batch gives each response the log-probs of its own unpadded forward."""
    model = tiny_model(tokenizer, 32, 2, seed=4)
    prompts = [[1, 10, 11, 12, 13, 14], [1, 20]]
    responses = [[30, 31, 32], [40, 41, 42, 43, 2]]
    batch = assemble_batch(prompts, responses, [[0.0] * 3, [0.0] * 5], [True, False], 1, 0, ["", ""])
    with torch.no_grad():
        lp = torch.log_softmax(response_logits(model, batch), -1)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            full = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0], -1)
            ref = full[len(p) - 1 : len(p) + len(r) - 1].gather(-1, torch.tensor(r)[:, None])[:, 0]
            got = lp[i, : len(r)].gather(-1, torch.tensor(r)[:, None])[:, 0]
            assert torch.allclose(got, ref, atol=1e-5)


def test_teacher_scores_are_full_vocab_logprobs(tokenizer):
    model = tiny_model(tokenizer, 32, 1, seed=5)
    batch = assemble_batch([[1, 5, 6], [1, 7]], [[8, 9], [10, 11, 12]], [[0.0] * 2, [0.0] * 3],
                           [True, True], 1, 0, ["", ""])
    q = torch.tensor([[[3, 4]] * 3, [[5, 6]] * 3])
    s = score_teacher(model, batch, top_k=4, temperature=0.7, query_ids_B_T_Q=q, batch_size=1, chunk_size=2)
    with torch.no_grad():
        full = torch.log_softmax(response_logits(model, batch, 0.7), -1)
    m = batch.response_mask_B_T.bool()
    assert torch.allclose(s.logp_B_T[m], full.gather(-1, batch.response_ids_B_T[..., None])[..., 0][m], atol=1e-5)
    top = full.topk(4, -1)
    assert torch.equal(s.topk_ids_B_T_K[m], top.indices[m])
    assert torch.allclose(s.topk_logp_B_T_K[m], top.values[m], atol=1e-5)
    assert torch.allclose(s.query_logp_B_T_Q[m], full.gather(-1, q)[m], atol=1e-5)


def _head_case(seed=0, B=2, T=5, H=4, V=9, K=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T, K), generator=g)
    return h, w, ids


def _reference(h, w, ids, temperature):
    logits = h @ w.t() / temperature
    return torch.logsumexp(logits, -1), logits.gather(-1, ids)


def test_fused_heads_match_autograd_reference():
    from opd_lab.learner.heads import head_stats_chunked, head_stats_plain

    h, w, ids = _head_case()
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    # dense backward; without an lse gradient the sparse one (sparse_min 0) and the dense scatter (inf)
    for use_lse, sparse_min in ((True, 64), (False, 0), (False, math.inf)):
        def objective(lse, z, use_lse=use_lse):
            return ((lse * a).sum() if use_lse else 0) + (z * b).sum()

        ref = torch.autograd.grad(objective(*_reference(h, w, ids, 0.7)), (h, w))
        got = torch.autograd.grad(objective(*head_stats_chunked(h, w, ids, 0.7, 2, sparse_min)), (h, w))
        for x, y in zip(got, ref, strict=True):
            assert torch.allclose(x, y, atol=1e-10)
        logits = (h @ w.t() / 0.7).detach().requires_grad_(True)
        ref_l = torch.autograd.grad(objective(torch.logsumexp(logits, -1), logits.gather(-1, ids)), logits)[0]
        got_l = torch.autograd.grad(objective(*head_stats_plain(logits, ids, chunk_size=2)), logits)[0]
        assert torch.allclose(got_l, ref_l, atol=1e-10)


def test_fused_heads_gradcheck():
    from opd_lab.learner.heads import head_stats_chunked

    h, w, ids = _head_case(seed=1, T=4)
    assert torch.autograd.gradcheck(lambda x, y: head_stats_chunked(x, y, ids, 1.3, 3), (h, w))
    for sparse_min in (0, math.inf):  # z only: the sparse backward, and the dense scatter
        assert torch.autograd.gradcheck(lambda x, y, s=sparse_min: head_stats_chunked(x, y, ids, 1.0, 3, s)[1], (h, w))


def test_sparse_backward_only_where_the_vocabulary_is_large_against_the_support(monkeypatch):
    """The z-only backward scatters densely into [B, C, V] when V ≤ SPARSE_MIN_VOCAB_PER_ID · K (a small
    vocabulary, as the embedded models' 101), and index-adds rows of W only above it (a real model's)."""
    from opd_lab.learner import heads

    calls = []
    index_add = torch.Tensor.index_add_
    monkeypatch.setattr(torch.Tensor, "index_add_", lambda self, *a: calls.append(1) or index_add(self, *a))
    for V, sparse in ((heads.SPARSE_MIN_VOCAB_PER_ID * 3, False), (heads.SPARSE_MIN_VOCAB_PER_ID * 3 + 1, True)):
        h, w, ids = _head_case(V=V, K=3)
        calls.clear()
        heads.head_stats_chunked(h, w, ids, 1.0, 2)[1].sum().backward()
        assert bool(calls) == sparse, V


def test_float64_teacher_keeps_float64_topk(tokenizer):
    """A float64 teacher's top-K log-probs stay float64 (gradient checks and exact comparisons rely on it)."""
    model = tiny_model(tokenizer, 32, 1, seed=5).double()
    batch = assemble_batch([[1, 5, 6]], [[8, 9, 10]], [[0.0] * 3], [True], 1, 0, [""])
    s = score_teacher(model, batch, top_k=4)
    assert s.topk_logp_B_T_K.dtype == torch.float64 and s.logp_B_T.dtype == torch.float64
    with torch.no_grad():
        ref = torch.log_softmax(response_logits(model, batch), -1)
    assert torch.allclose(s.topk_logp_B_T_K, ref.topk(4, -1).values, atol=1e-12)


class _OtherRank:
    """Duck-typed ``Dist`` for two ranks in one process: the other rank's tags, and either its contributions to
    each ``sum`` (added to this rank's) or, with ``record``, a list that collects this rank's contributions."""

    def __init__(self, other_tags, other_sums=None, record=None):
        self.other_tags, self.other_sums, self.record = other_tags, other_sums, record

    def gather(self, obj):
        return [obj, self.other_tags]

    def sum(self, *values):
        mine = [float(v) for v in values]
        if self.record is not None:
            self.record.append(mine)
            return mine
        return [a + b for a, b in zip(mine, self.other_sums.pop(0), strict=True)]


def test_routing_by_tag_over_two_ranks_equals_one_process_holding_both_ranks_rows():
    g = torch.Generator().manual_seed(0)
    B, T = 5, 7
    w = torch.softmax(torch.randn(B, T, 2, generator=g), -1)
    mask = torch.rand(B, T, generator=g) > 0.3
    tags = ["ops2", "ops3", "ops2", "ops3", "ops4"]  # rank 0: rows 0–2 (no ops4); rank 1: rows 3–4 (no ops2)
    batch = lambda rows: SimpleNamespace(teacher_names=("a", "b"), route_B_T_N=w[rows], loss_mask_B_T=mask[rows])  # noqa: E731
    r0, r1 = slice(0, 3), slice(3, 5)
    contributions = []
    routing_by_tag(batch(r1), tags[r1], _OtherRank(sorted(set(tags[r0])), record=contributions))
    two = routing_by_tag(batch(r0), tags[r0], _OtherRank(sorted(set(tags[r1])), other_sums=contributions))
    one = routing_by_tag(batch(slice(0, B)), tags)
    assert sorted(two) == sorted(one) and {k.split("/")[2] for k in one} == {"ops2", "ops3", "ops4"}
    assert two == pytest.approx(one, abs=1e-12)
    # the ops3 shares mix both ranks' rows: neither rank's own rows give them
    alone = routing_by_tag(batch(r0), tags[r0])
    assert abs(alone["routing/by_tag/ops3/frac/a"] - one["routing/by_tag/ops3/frac/a"]) > 1e-3


def test_teacher_bf16_autocast_stays_close_to_float32():
    """``rollout.teacher_autocast_bf16``: the teacher's body in bf16 moves log q(y_t) on real rollouts of the embedded
    pair by ~4e-4 on average (measured; bounded here at 5e-3 mean, 1e-2 at the 99th percentile), the outputs stay
    float32, and the autocast is really applied (the scores are not bit-identical)."""
    import random

    from opd_lab.models.loading import load_model, load_tokenizer
    from opd_lab.models.token_ids import stop_token_ids
    from opd_lab.rollout.base import SamplingSpec
    from opd_lab.rollout.static import StaticEngine
    from opd_lab.tasks import encode_prompts
    from opd_lab.tasks.arith import ArithmeticTask
    from tests.test_e2e import ROOT

    root = ROOT / "opd_lab/assets/embedded"
    tok = load_tokenizer(str(root / "student"))
    student = load_model(str(root / "student"), "float32", "cpu", trainable=False)
    teacher = load_model(str(root / "teacher"), "float32", "cpu", trainable=False)
    engine = StaticEngine(student, tok, stop_token_ids(tok, str(root / "student")))
    batch = engine.generate(encode_prompts(tok, ArithmeticTask().train_problems(4, random.Random(3))),
                            SamplingSpec(4, 1.0, 1.0, 256, 0))
    full, half = score_teacher(teacher, batch, top_k=8), score_teacher(teacher, batch, top_k=8, autocast_bf16=True)
    m = batch.response_mask_B_T.bool()
    d = (full.logp_B_T - half.logp_B_T)[m].abs()
    assert half.logp_B_T.dtype == torch.float32 and half.topk_logp_B_T_K.dtype == torch.float32
    assert 0 < d.max() and d.mean() < 5e-3 and torch.quantile(d, 0.99) < 1e-2


def test_response_forward_is_unmasked_causal_attention_and_ignores_padding_content(tokenizer, monkeypatch):
    """Rows are packed to the left, so the model runs plain causal attention (no [B, L, L] mask); what the padding
    cells hold changes nothing at real positions, and the hidden states match each row's own unpadded forward."""
    model = tiny_model(tokenizer, 32, 2, seed=6)
    prompts = [[1, 10, 11, 12, 13, 14, 15], [1, 20], [1, 21, 22, 23]]
    responses = [[30, 31], [40, 41, 42, 43, 44, 2], [50, 51, 52, 2]]
    batch = assemble_batch(prompts, responses, [[0.0] * len(r) for r in responses], [True, False, False], 1, 0,
                           [""] * 3)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        h = response_hidden(model, batch)
        assert calls and all(mask is None and causal for mask, causal in calls)
        noisy = batch.select(torch.arange(3))
        pad = torch.cat([1 - noisy.attention_mask_B_L[:, : noisy.prompt_len], 1 - noisy.response_mask_B_T], 1).bool()
        noisy.input_ids_B_L = torch.where(pad, torch.randint(3, 60, pad.shape), noisy.input_ids_B_L)
        h_noisy = response_hidden(model, noisy)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            alone = model.base_model(input_ids=torch.tensor([p + r])).last_hidden_state[0]
            ref = alone[len(p) - 1 : len(p) + len(r) - 1]
            assert torch.allclose(h[i, : len(r)], ref, atol=1e-5)
            assert torch.equal(h[i, : len(r)], h_noisy[i, : len(r)])


def test_dense_support_backward_keeps_float32_precision_under_bf16_autocast():
    """Under bf16 autocast the z-only backward's dense path (small V) gives the sparse path's float32 gradients."""
    from opd_lab.learner.heads import head_stats_chunked

    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 6, 16, generator=g).bfloat16().requires_grad_(True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    ids, b = torch.randint(0, 40, (2, 6, 5), generator=g), torch.randn(2, 6, 5, generator=g)
    grads = []
    for sparse_min in (0, math.inf):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = head_stats_chunked(h, w, ids, 0.9, 4, sparse_min)[1]
        grads.append(torch.autograd.grad((z * b).sum(), (h, w)))
    (gh_sparse, gw_sparse), (gh_dense, gw_dense) = grads
    assert gw_dense.dtype == gw_sparse.dtype == torch.float32
    assert torch.allclose(gw_dense, gw_sparse, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gh_dense.float(), gh_sparse.float(), rtol=2e-2, atol=2e-2)


def test_a_row_without_prompt_tokens_is_refused(tokenizer):
    model = tiny_model(tokenizer, 32, 1, seed=7)
    batch = assemble_batch([[1, 5], [1]], [[8, 9], [10]], [[0.0] * 2, [0.0]], [False, False], 1, 0, ["", ""])
    batch.attention_mask_B_L[1, :2] = 0
    with pytest.raises(ValueError, match="at least one prompt token"):
        response_hidden(model, batch)


def test_length_groups_cover_every_row_once_in_length_order_within_the_limits():
    """``length_groups``: each row once, in order of response length, ≤ max_rows rows and ≤ max_tokens padded
    tokens per group (a longer row than the budget is a group of its own)."""
    lens = [5, 1, 9, 3, 3, 7, 2, 8, 30]
    batch = assemble_batch([[1, 2]] * len(lens), [list(range(10, 10 + n)) for n in lens],
                           [[0.0] * n for n in lens], [False] * len(lens), 1, 0, [""] * len(lens))
    from opd_lab.learner.scoring import length_groups

    for max_rows, max_tokens in [(64, 16), (2, 1000), (3, 12), (64, 1)]:
        groups = length_groups(batch, max_rows, max_tokens)
        rows = torch.cat(groups).tolist()
        assert sorted(rows) == list(range(len(lens)))
        assert [lens[i] for i in rows] == sorted(lens)
        for g in groups:
            width = max(lens[i] for i in g.tolist())
            assert len(g) <= max_rows and (len(g) == 1 or len(g) * width <= max_tokens)
    assert [len(g) for g in length_groups(batch, 64, 16)] == [4, 2, 1, 1, 1]  # 1,2,3,3 | 5,7 | 8 | 9 | 30
    empty = batch.select(torch.zeros(0, dtype=torch.long))
    assert length_groups(empty, 64, 16) == []


def test_length_grouped_teacher_scores_equal_the_padded_ones_and_forward_fewer_tokens(tokenizer, monkeypatch):
    """``rollout.teacher_batch_tokens``: scoring rows grouped by length, each group cut to its own longest response,
    gives the scores of the padded layout at every real position (float64: the same function, to 1e-12) for
    log q(y_t), the top-K, log-probs at query ids and the entropy; past a group's width the scores hold the
    padding values (log q 0, top-K ids 0 at log-prob −1e30, entropy 0); and the forwards really are narrower."""
    import opd_lab.learner.scoring as scoring

    model = tiny_model(tokenizer, 32, 2, seed=7).double()
    lens = [2, 9, 4, 1, 7, 3]
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 10], [1, 11, 12, 13, 14], [1, 15], [1, 16, 17]]
    responses = [[20 + (3 * i + t) % 50 for t in range(n)] for i, n in enumerate(lens)]
    batch = assemble_batch(prompts, responses, [[0.0] * n for n in lens], [False] * 6, 1, 0, [""] * 6)
    q = torch.randint(0, 60, (6, max(lens), 3), generator=torch.Generator().manual_seed(0))
    widths = []
    real_hidden = scoring.response_hidden
    monkeypatch.setattr(scoring, "response_hidden", lambda m, b: widths.append(b.response_mask_B_T.shape[1])
                        or real_hidden(m, b))
    kw = dict(top_k=4, temperature=0.8, query_ids_B_T_Q=q, chunk_size=3, entropy=True)
    padded = score_teacher(model, batch, batch_size=64, **kw)
    assert widths == [9]
    widths.clear()
    grouped = score_teacher(model, batch, batch_size=2, max_tokens=18, **kw)
    assert sorted(widths) == [2, 4, 9] and sum(w * 2 for w in widths) < 9 * 6  # groups {1, 2} {3, 4} {7, 9}
    m = batch.response_mask_B_T.bool()
    for name in ("logp_B_T", "topk_logp_B_T_K", "query_logp_B_T_Q", "entropy_B_T"):
        a, b = getattr(grouped, name), getattr(padded, name)
        assert a.dtype == torch.float64 and torch.allclose(a[m], b[m], atol=1e-12, rtol=0), name
    assert torch.equal(grouped.topk_ids_B_T_K[m], padded.topk_ids_B_T_K[m])
    short = lens.index(1)  # grouped with the 2-token row: column 1 is inside its group, columns 2.. are past it
    assert grouped.logp_B_T[short, 2:].eq(0).all() and grouped.entropy_B_T[short, 2:].eq(0).all()
    assert grouped.topk_ids_B_T_K[short, 2:].eq(0).all() and grouped.topk_logp_B_T_K[short, 2:].eq(-1e30).all()
    assert grouped.query_logp_B_T_Q[short, 2:].eq(-1e30).all() and grouped.logp_B_T[short, 1] != 0


def test_compiled_body_gives_the_eager_hidden_states_and_gradients_and_leaves_the_module_alone(tokenizer):
    """``trainer.compile``: :func:`compile_body` routes :func:`response_hidden` through an inductor-compiled body
    (really: the compiled callable runs) that gives the eager hidden states (1e-5) and parameter gradients (1e-3 of
    each gradient's largest entry; measured ~1e-4, fused float32 reductions), while the model's parameter names,
    state dict and deep copies are the eager model's."""
    import copy

    from opd_lab.learner.heads import _COMPILED, compile_body

    model = tiny_model(tokenizer, 32, 2, seed=8)
    batch = assemble_batch([[1, 5, 6, 7], [1, 8]], [[20, 21, 22], [23, 24, 25, 26, 27]], [[0.0] * 3, [0.0] * 5],
                           [False, False], 1, 0, ["", ""])
    names = [n for n, _ in model.named_parameters()]

    def forward_backward():
        model.zero_grad(set_to_none=True)
        h = response_hidden(model, batch)
        (h * batch.response_mask_B_T[..., None]).pow(2).sum().backward()
        return h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    h_eager, g_eager = forward_backward()
    compile_body(model)
    calls = []
    compiled = _COMPILED[model]
    _COMPILED[model] = lambda **kw: calls.append(1) or compiled(**kw)
    h_comp, g_comp = forward_backward()
    assert calls and torch.allclose(h_comp, h_eager, atol=1e-5, rtol=1e-5)
    assert g_comp.keys() == g_eager.keys()  # fused float32 reductions: ~1e-4 of each gradient's scale (measured)
    assert all((g_comp[n] - g_eager[n]).abs().max() <= 1e-3 * g_eager[n].abs().max() for n in g_eager)
    assert [n for n, _ in model.named_parameters()] == names and "_orig_mod" not in "".join(model.state_dict())
    assert copy.deepcopy(model) not in _COMPILED  # a copy (the async engine's) is the eager model
