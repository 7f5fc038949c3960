"""Nothing lost: a run killed with SIGKILL after a checkpoint resumes to exactly the uninterrupted run's metrics
and weights; damaged checkpoints are skipped with a message; an incompatible config is refused."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd_lab.config import ConfigError
from opd_lab.learner import checkpoint
from opd_lab.learner.loop import make_optimizer
from tests.conftest import compose, tiny_model
from tests.run.wandb_files import assert_history_is_metrics
from tests.test_e2e import ROOT, TINY, run_cli

VOLATILE = ("time/", "tokens_per_s", "learner/tokens_per_s", "rollout/tokens_per_s")


def _records(run_dir: Path):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        keep = {k: v for k, v in rec.items() if not k.startswith(VOLATILE) and not k.endswith(("per_s", "seconds"))}
        out.append(keep)
    return out


def _start_until_checkpoint(args, run_dir: Path, step: int, what: str, **popen) -> subprocess.Popen:
    """Start ``python -m opd_lab`` into ``run_dir`` and return once its step-``step`` checkpoint exists."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "-m", "opd_lab", *args, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                            **popen)
    deadline = time.time() + 600
    while not (run_dir / "checkpoints" / f"step_{step:06d}").exists():
        assert proc.poll() is None, f"the run ended before it could be {what}"
        assert time.time() < deadline
        time.sleep(0.02)
    return proc


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    args = [*TINY, "trainer.steps=12", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=2",
            "eval.every=4", f"cache_dir={tmp_path / 'cache'}"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_cli([*args, f"hydra.run.dir={ref}"])

    proc = _start_until_checkpoint(args, cut, 6, "killed", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    status = json.loads((cut / "status.json").read_text())
    assert status["status"] == "running"  # killed: no final status
    assert not (cut / "checkpoint").exists()

    out = run_cli([*args, f"hydra.run.dir={cut}", "trainer.resume=auto"])
    assert "resuming from" in out.stdout
    assert json.loads((cut / "status.json").read_text())["status"] == "completed"
    a, b = _records(ref), _records(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert a == b  # every logged metric of every step, evaluations included
    wa, wb = load_file(ref / "checkpoint" / "model.safetensors"), load_file(cut / "checkpoint" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (ref / "eval.csv").read_text() == (cut / "eval.csv").read_text()
    # wandb: the same run id continued in one offline folder that holds every step once (the killed attempt's
    # folder is set aside), as the uninterrupted run's does
    (folder,) = (cut / "wandb").glob("offline-run-*")
    (killed,) = (cut / "wandb-superseded").glob("offline-run-*")
    assert folder.name.rsplit("-", 1)[1] == killed.name.rsplit("-", 1)[1]
    for run_dir, offline in ((cut, folder), (ref, next((ref / "wandb").glob("offline-run-*")))):
        assert_history_is_metrics(offline, run_dir / "metrics.jsonl")
    assert len(list((cut / "checkpoints").glob("step_*"))) == 2  # keep_checkpoints

    again = run_cli([*args, f"hydra.run.dir={cut}", "trainer.resume=auto"])  # a finished run is not redone
    assert "already completed" in again.stdout


@pytest.fixture
def saved(tmp_path, tokenizer):
    cfg = compose(["trainer.keep_checkpoints=5", f"output_dir={tmp_path}"])
    model = tiny_model(tokenizer, 32, 1, seed=0)
    opt, sched = make_optimizer(cfg, model)
    rng = random.Random(0)
    for step in (2, 4):
        checkpoint.save(tmp_path, cfg, step, model, tokenizer, opt, sched, rng.getstate(), {"run": 0, "total": step},
                        "abc")
    return cfg, tmp_path


def test_truncated_checkpoint_falls_back_to_the_previous_good_one(saved, capsys):
    cfg, run = saved
    weights = run / "checkpoints" / "step_000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut mid-write
    (run / "checkpoints" / ".tmp_step_000006").mkdir()  # a save that never finished: never considered
    state = checkpoint.latest(run, cfg)
    assert state.step == 2 and state.guard["total"] == 2 and state.wandb_id == "abc"
    err = capsys.readouterr().err
    assert "step_000004 is unusable" in err and "model.safetensors does not match its checksum" in err


def test_corrupted_state_and_no_good_checkpoint(saved, capsys):
    cfg, run = saved
    for step in (2, 4):
        (run / "checkpoints" / f"step_00000{step}" / "trainer_state.pt").write_bytes(b"garbage")
    assert checkpoint.latest(run, cfg) is None
    assert "no usable checkpoint" in capsys.readouterr().err


def test_incompatible_config_is_refused(saved):
    _, run = saved
    other = compose(["trainer.lr=1e-2", "gate=token", f"output_dir={run}"])
    with pytest.raises(ConfigError, match=r"different config \(gate\.block_size: 64 -> None, gate\.kind: 'block' -> "
                                          r"'token'.*trainer\.lr"):
        checkpoint.latest(run, other)
    fine = compose(["trainer.keep_checkpoints=5", "logger.wandb.mode=disabled", "trainer.checkpoint_every=7",
                    f"output_dir={run / 'elsewhere'}"])
    assert checkpoint.latest(run, fine).step == 4  # where and how it logs may change


def test_resume_path_errors(tmp_path):
    cfg = compose([f"trainer.resume={tmp_path / 'nope'}", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="trainer.resume=.*no checkpoints/ folder"):
        checkpoint.find_run_to_resume(cfg, tmp_path)


@pytest.mark.slow
def test_ctrl_c_says_interrupted_and_how_to_resume(tmp_path):
    """SIGINT mid-run: no traceback, status.json ``interrupted``, one line with the command that resumes it (which
    then finishes the run)."""
    cut = tmp_path / "cut"
    args = [*TINY, "trainer.steps=40", "trainer.checkpoint_every=2", "eval.baselines=false",
            f"cache_dir={tmp_path / 'cache'}"]
    proc = _start_until_checkpoint(args, cut, 2, "interrupted", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    status = json.loads((cut / "status.json").read_text())
    assert status["status"] == "interrupted", status
    line = next(x for x in err.splitlines() if x.startswith("opd-lab: interrupted"))
    assert f"hydra.run.dir={cut} trainer.resume=auto" in line and "trainer.steps=40" in line
    out = run_cli([*args, f"hydra.run.dir={cut}", "trainer.resume=auto"])
    assert "resuming from" in out.stdout
    assert json.loads((cut / "status.json").read_text())["status"] == "completed"
