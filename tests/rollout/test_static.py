"""The static-KV-cache engine samples the distribution of the HF ``generate`` reference: the same per-position token
frequencies and sampler log-probs on a fixed prompt set (two-sample statistics calibrated against HF vs HF), exact
log-probs against the learner's forward, per-(prompt, sample) streams, stops and truncation."""

import random

import pytest
import torch
import torch.nn.functional as F

from opd_lab.learner.heads import response_logits
from opd_lab.learner.scoring import score_student_old
from opd_lab.models.loading import load_model, load_tokenizer
from opd_lab.rollout.base import SamplingSpec
from opd_lab.rollout.hf import HFEngine
from opd_lab.rollout.static import StaticEngine, check_supported, decode_attention
from opd_lab.tasks import encode_prompts
from opd_lab.tasks.arith import ArithmeticTask
from tests.test_e2e import ROOT

STUDENT = str(ROOT / "opd_lab/assets/embedded/student")


@pytest.fixture(scope="module")
def student():
    tok = load_tokenizer(STUDENT)
    model = load_model(STUDENT, "float32", "cpu", trainable=False)
    prompts = encode_prompts(tok, ArithmeticTask().train_problems(4, random.Random(3)))
    return tok, model, prompts


def _rows(batch):
    return [batch.response_ids_B_T[i][batch.response_mask_B_T[i].bool()].tolist() for i in range(batch.size)]


def _position_stats(batch, positions):
    """Per position: token counts (Counter over rows that reached it) and the sampler log-probs there."""
    from collections import Counter

    counts = [Counter() for _ in range(positions)]
    logps = [[] for _ in range(positions)]
    for i, ids in enumerate(_rows(batch)):
        for t, tok in enumerate(ids[:positions]):
            counts[t][tok] += 1
            logps[t].append(float(batch.sampler_logp_B_T[i, t]))
    return counts, logps


def _tv(a, b):
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


def _distance(x, y, positions):
    """(mean total-variation distance of the per-position token distributions, max |Δ mean log-prob| / its SE)."""
    (cx, lx), (cy, ly) = _position_stats(x, positions), _position_stats(y, positions)
    tv = [_tv(a, b) for a, b in zip(cx, cy, strict=True) if sum(a.values()) > 30 and sum(b.values()) > 30]
    z = []
    for a, b in zip(lx, ly, strict=True):
        if len(a) > 30 and len(b) > 30:
            ta, tb = torch.tensor(a), torch.tensor(b)
            se = (ta.var() / len(a) + tb.var() / len(b)).sqrt().clamp(min=1e-6)
            z.append(float((ta.mean() - tb.mean()).abs() / se))
    return sum(tv) / len(tv), max(z)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_static_engine_samples_the_hf_reference_distribution(student, top_p):
    tok, model, prompts = student
    stop = (tok.eos_token_id,)
    spec = {"n": 300, "temperature": 1.0, "top_p": top_p, "max_tokens": 40}
    hf_a = HFEngine(model, tok, stop_ids=stop).generate(prompts, SamplingSpec(seed=1, **spec))
    hf_b = HFEngine(model, tok, stop_ids=stop).generate(prompts, SamplingSpec(seed=2, **spec))
    static = StaticEngine(model, tok, stop).generate(prompts, SamplingSpec(seed=3, **spec))
    noise_tv, noise_z = _distance(hf_a, hf_b, 40)  # two samples of the same distribution
    tv, z = _distance(static, hf_a, 40)
    assert tv < 1.5 * noise_tv + 0.01, (tv, noise_tv)
    assert z < 5.0, z  # no position's mean sampler log-prob is off by more than sampling noise
    hot = StaticEngine(model, tok, stop).generate(prompts, SamplingSpec(seed=3, **{**spec, "temperature": 1.4}))
    hot_tv, hot_z = _distance(hot, hf_a, 40)
    assert hot_tv > 1.5 * noise_tv + 0.01 or hot_z > 5.0  # the statistics do tell another distribution apart


def test_static_logprobs_are_the_learners(student):
    """At T = 1, top-p 1 the sampler's log-probs are the learner's own (π_s = π_old up to float rounding); with a
    temperature they are the tempered distribution's."""
    tok, model, prompts = student
    engine = StaticEngine(model, tok, (tok.eos_token_id,))
    batch = engine.generate(prompts, SamplingSpec(n=3, temperature=1.0, top_p=1.0, max_tokens=200, seed=0))
    old, _ = score_student_old(model, batch)
    m = batch.response_mask_B_T.bool()
    assert (batch.sampler_logp_B_T[m] - old[m]).abs().max() < 1e-4
    hot = engine.generate(prompts, SamplingSpec(n=2, temperature=0.7, top_p=1.0, max_tokens=60, seed=0))
    with torch.no_grad():
        ref = torch.log_softmax(response_logits(model, hot, 0.7), -1).gather(-1, hot.response_ids_B_T[..., None])
    m = hot.response_mask_B_T.bool()
    assert (hot.sampler_logp_B_T[m] - ref[..., 0][m]).abs().max() < 1e-4
    assert not batch.truncated_B.any() and all(r[-1] == tok.eos_token_id for r in _rows(batch))
    short = engine.generate(prompts, SamplingSpec(n=1, temperature=1.0, top_p=1.0, max_tokens=5, seed=0))
    assert short.truncated_B.all() and short.response_mask_B_T.sum(-1).tolist() == [5] * len(prompts)


def test_static_streams_do_not_depend_on_the_batch_split(student):
    tok, model, prompts = student
    engine = StaticEngine(model, tok, (tok.eos_token_id,), batch_size=5)
    spec = {"n": 2, "temperature": 1.0, "top_p": 0.9, "max_tokens": 30, "seed": 9}
    whole = engine.generate(prompts, SamplingSpec(**spec))
    parts = _rows(engine.generate(prompts[:1], SamplingSpec(**spec))) + _rows(
        engine.generate(prompts[1:], SamplingSpec(prompt_offset=1, **spec)))
    assert _rows(whole) == parts
    u = engine._uniforms(SamplingSpec(**spec), range(4), 30)  # rows: (prompt 0, 1) × (sample 0, 1)
    assert len({tuple(r.tolist()) for r in u}) == 4 and bool(((u > 0) & (u <= 1)).all())
    shifted = engine._uniforms(SamplingSpec(prompt_offset=1, **spec), range(2), 30)
    assert torch.equal(shifted, u[2:])  # the stream of (prompt 1, sample j) wherever the prompt sits


def test_unsupported_architectures_are_refused():
    from transformers import LlamaConfig, Qwen3Config

    with pytest.raises(ValueError, match="rollout.engine=static serves plain Qwen3.*model_type='llama'"):
        check_supported(LlamaConfig())
    check_supported(Qwen3Config())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_decode_attention_is_masked_grouped_query_attention(dtype, tol):
    """One query per row over a cache with left padding: the two-matmul decode path equals
    ``scaled_dot_product_attention`` with the boolean mask and ``enable_gqa`` (query head j reads kv head j // 2)."""
    g = torch.Generator().manual_seed(0)
    B, N, G, L, D = 3, 4, 2, 7, 16
    q, k, v = (torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
               for shape in ((B, N, 1, D), (B, G, L, D), (B, G, L, D)))
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, :2] = keep[2, :5] = False  # left padding of two rows
    bias = torch.zeros(B, 1, 1, L, dtype=dtype).masked_fill_(~keep[:, None, None], float("-inf"))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep[:, None, None],
                                         enable_gqa=True)
    out = decode_attention(q, k, v, bias)
    assert out.shape == (B, N, 1, D) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    k2, v2 = k.clone(), v.clone()
    k2[2, :, :5], v2[2, :, :5] = 1e3, -1e3  # what the padded slots hold does not matter
    torch.testing.assert_close(decode_attention(q, k2, v2, bias), out, atol=0, rtol=0)
    # the grouping is the right one: swapping the kv heads changes the answer
    assert not torch.allclose(decode_attention(q, k.flip(1), v.flip(1), bias).double(), ref, atol=1e-3)
