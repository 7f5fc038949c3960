"""CUDA paths of the learner: chunked vs plain on the GPU, bf16 autocast, a short CLI run (skipped on CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tokenizer):
    import random

    from opd_lab.learner.scoring import HFTeacherScorer
    from opd_lab.models.token_ids import TokenIds
    from opd_lab.rollout.base import SamplingSpec
    from opd_lab.rollout.hf import HFEngine
    from opd_lab.tasks import encode_prompts
    from opd_lab.tasks.arith import ArithmeticTask
    from tests.conftest import tiny_model

    student = tiny_model(tokenizer, 64, 2, seed=0).cuda()
    teacher = HFTeacherScorer(tiny_model(tokenizer, 96, 2, seed=1).cuda())
    task = ArithmeticTask(min_operands=2, max_operands=2, min_digits=1, max_digits=2)
    batch = HFEngine(student, tokenizer).generate(encode_prompts(tokenizer, task.train_problems(4, random.Random(0))),
                                                 SamplingSpec(2, 1.0, 1.0, 40, 0))
    return student, teacher, batch, TokenIds.build(tokenizer, ["<|im_end|>"])


@pytest.mark.parametrize("loss", ["sampled_token", "lsm"])
def test_cuda_chunked_equals_plain_and_bf16_is_close(setup, loss):
    from opd_lab.learner.scoring import score_batch
    from opd_lab.learner.teachers import Teachers
    from opd_lab.learner.update import optimizer_update
    from tests.conftest import compose
    from tests.test_learner import RecordingOptimizer, _drifted

    student, teacher, batch, tokens = setup
    drifted = _drifted(student)
    base = [f"loss={loss}", "gate=block32", "rollout.n_prompts=4", "rollout.n_samples=2",
            "rollout.mini_batch_size=8", "trainer.device=cuda", "trainer.grad_accum=2"]
    out = {}
    for name, extra in {"plain": ["trainer.loss_path=plain"], "chunked": ["trainer.chunk_size=7"],
                        "bf16": ["trainer.autocast_bf16=true"]}.items():
        cfg = compose(base + extra)
        data = score_batch(cfg, student, Teachers.one(teacher), batch, tokens)
        opt = RecordingOptimizer(drifted)
        out[name] = (optimizer_update(cfg, drifted, opt, data, torch.arange(8)), opt.grads)
    (a, ga), (b, gb), (c, gc) = out["plain"], out["chunked"], out["bf16"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    for x, y in zip(ga, gb, strict=True):
        assert torch.allclose(x, y, rtol=1e-3, atol=1e-6)
    assert c["loss"] == pytest.approx(a["loss"], rel=5e-2)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in ga]),
                                                torch.cat([g.flatten() for g in gc]), dim=0)
    assert cos > 0.98


def test_cuda_cli_run(tmp_path):
    from tests.test_e2e import TINY

    args = [*TINY, f"cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run", "rollout.engine=hf",
            "trainer.device=cuda", "trainer.autocast_bf16=true", "logger.wandb.mode=disabled"]
    proc = subprocess.run([sys.executable, "-m", "opd_lab", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "completed"
