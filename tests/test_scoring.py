import torch

from opd_lab.rollout.base import assemble_batch
from opd_lab.scoring import dedup_mask, logsumexp_chunked, response_logits, score_teacher
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
