"""The main job's building blocks: the evaluation cache key, the stop set and the per-loss rollout top-p."""

import json

import pytest

from opd_lab.learner.evaluation import EvalResult
from tests.conftest import compose, tiny_model


class CountingEngine:
    """Stands in for a rollout engine: every evaluation samples one fixed answer per row and is counted."""

    calls = 0

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def generate(self, prompts, spec):
        from opd_lab.rollout.base import assemble_batch

        CountingEngine.calls += 1
        ids = self.tok("\\boxed{1}", add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        rows = len(prompts) * spec.n
        return assemble_batch(prompts, [ids] * rows, [[0.0] * len(ids)] * rows, [False] * rows, spec.n,
                              self.tok.pad_token_id, ["\\boxed{1}"] * rows)

    def close(self):
        pass


def test_eval_cache_key_covers_precision_and_prompts(tmp_path, tokenizer):
    """Two evaluations that differ only in model.dtype leave two cache entries; identical ones leave one; so do a
    different chat template, device, autocast, vLLM cap or stop set."""
    from opd_lab.learner.evaluation import cached_eval
    from opd_lab.tasks import build_task

    model_dir = tmp_path / "model"
    tiny_model(tokenizer).save_pretrained(model_dir)
    base = [f"cache_dir={tmp_path / 'cache'}", "task.n_eval=3", "eval.n_samples=2", "eval.ks=[1,2]"]
    CountingEngine.calls = 0

    def run(overrides, stop=(2,), device=None):
        cfg = compose(base + overrides)
        res = cached_eval(cfg, str(model_dir), lambda: CountingEngine(tokenizer), tokenizer, build_task(cfg.task),
                          stop, device)
        assert isinstance(res, EvalResult)
        return len(list((tmp_path / "cache" / "evals").iterdir()))

    assert run([]) == 1 and CountingEngine.calls == 1
    assert run([]) == 1 and CountingEngine.calls == 1  # identical: reused
    assert run(["model.dtype=bfloat16"]) == 2  # another precision: evaluated again
    assert run(["model.dtype=bfloat16"]) == 2 and CountingEngine.calls == 2
    assert run(["trainer.autocast_bf16=true"]) == 3
    assert run(["rollout.vllm.max_model_len=512"]) == 4
    assert run(["model.chat_template='{{ messages[0][\"content\"] }}'"]) == 5  # other prompts
    assert run([], stop=(2, 3)) == 6
    assert run(["trainer.device=cuda"]) == 7
    assert run(["model.prepare.student_steps=7"]) == 7  # how the embedded pair is built is in the weights' files
    # an evaluation-only variant and a trained run's baselines (evaluated every N steps or not) share the entry
    assert run(["eval.only=teacher"]) == 7 and run(["eval.baselines=false", "eval.every=5"]) == 7
    assert run(["eval.temperature=0.5"]) == 8  # another evaluation setting: another evaluation
    # a teacher evaluated on its own device (rollout.teacher_device) is another evaluation than on trainer.device
    assert run([], device="cpu") == 8 and CountingEngine.calls == 8 and run([], device="cuda:1") == 9
    assert CountingEngine.calls == 9


def test_stop_set_from_tokenizer_and_generation_config(tmp_path, tokenizer):
    """One stop set: the tokenizer's EOS plus every generation_config eos id (Qwen3: <|im_end|>, <|endoftext|>)."""
    from opd_lab.models.token_ids import ends_with_stop, stop_token_ids

    folder = tmp_path / "m"
    folder.mkdir()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert stop_token_ids(tokenizer, str(folder)) == (eos,)  # no generation config: the tokenizer's EOS
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, pad]}))
    assert stop_token_ids(tokenizer, str(folder)) == tuple(sorted((eos, pad)))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert stop_token_ids(tokenizer, str(folder)) == tuple(sorted((eos, 7)))
    assert ends_with_stop([5, 7], (7,)) and not ends_with_stop([7, 5], (7,)) and not ends_with_stop([], (7,))


@pytest.mark.parametrize("loss,top_p", [("sampled_token", 1.0), ("lsm", 0.9)])
def test_rollout_top_p_follows_the_loss(loss, top_p):
    """docs/methods.md: the sampled-token baseline samples at top-p 1.0 as published, LSM at 0.9."""
    cfg = compose([f"loss={loss}"])
    assert cfg.rollout.top_p == top_p and cfg.loss.rollout_top_p == top_p
    assert compose([f"loss={loss}", "rollout.top_p=0.5"]).rollout.top_p == 0.5  # an explicit value wins
    for variant, expect in (("sampled_token", 1.0), ("sampled_token_block64", 1.0), ("lsm", 0.9),
                            ("lsm_block64", 0.9)):
        assert compose([f"variant={variant}"]).rollout.top_p == expect


def test_model_configs_list_real_special_tokens(tokenizer):
    from opd_lab.models.token_ids import special_token_ids

    cfg = compose([])
    assert list(cfg.model.special_tokens) == ["<think>", "</think>", "<|im_end|>"]
    assert len(special_token_ids(tokenizer, list(cfg.model.special_tokens))) == 3
    for model in ("qwen3_1.7b_8b", "qwen3_0.6b_4b"):
        assert list(compose([f"model={model}"]).model.special_tokens) == ["<think>", "</think>", "<|im_end|>"]
