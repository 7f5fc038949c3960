"""SLURM pre-emption: SIGTERM in a SLURM job is a notice (the process lives on), the loop stops at a checkpoint with
``status.json`` = preempted, the tracker stops talking to the (dead) wandb service, and a resumed run ends with the
uninterrupted run's metrics. tests/run/test_slurm.py does the same through a real scheduler."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from opd_lab.common import preemption
from opd_lab.run.directory import recorded_failure
from opd_lab.run.tracking import Tracker
from tests.conftest import compose
from tests.learner.test_resume import _records
from tests.test_e2e import ROOT, TINY, run_cli


@pytest.fixture(autouse=True)
def fresh_notice():
    before = signal.getsignal(signal.SIGTERM)
    preemption.NOTICE.clear()
    yield
    preemption.NOTICE.clear()
    signal.signal(signal.SIGTERM, before)


def test_outside_slurm_sigterm_keeps_its_meaning(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    before = signal.getsignal(signal.SIGTERM)
    assert not preemption.install()
    assert signal.getsignal(signal.SIGTERM) is before


def test_in_a_slurm_job_sigterm_is_a_notice_chained_to_the_previous_handler(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    seen = []
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # submitit's bypass, say
    assert preemption.install() and preemption.install()  # idempotent: one notice handler
    assert not preemption.noticed()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert preemption.noticed() and seen == [signal.SIGTERM]  # alive, noticed, the previous handler ran once


class _Tracker:
    finished = None

    def finish(self, code=0):
        self.finished = code


def test_the_run_directory_says_preempted_not_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    t = _Tracker()
    with pytest.raises(preemption.Preempted), recorded_failure(tmp_path, t):
        raise preemption.Preempted(12)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "preempted" and "step 12" in status["error"] and t.finished is None
    with pytest.raises(SystemExit), recorded_failure(tmp_path, t):  # submitit's exit after it re-queued the job
        sys.exit(-1)
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "preempted"
    with pytest.raises(ValueError), recorded_failure(tmp_path, t):
        raise ValueError("boom")
    status = json.loads((tmp_path / "status.json").read_text())
    assert status == {"status": "failed", "error": "ValueError: boom"} and t.finished == 1
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.raises(SystemExit), recorded_failure(tmp_path, t):  # outside SLURM an exit is an exit
        sys.exit(3)
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"


class _DeadWandb:
    calls = 0

    def log(self, metrics, step):
        self.calls += 1
        raise ConnectionResetError(104, "Connection reset by peer")


def test_the_tracker_writes_metrics_jsonl_alone_after_the_notice(tmp_path):
    cfg = compose(["logger.wandb.mode=disabled"])
    tracker = Tracker(cfg, tmp_path)
    tracker._wandb = dead = _DeadWandb()
    with pytest.raises(ConnectionResetError):  # without a notice, a dead service is an error
        tracker.log(1, {"loss": 1.0})
    preemption.NOTICE.set()
    tracker.log(2, {"loss": 2.0})
    assert dead.calls == 1
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    tracker._wandb = None


@pytest.mark.slow
def test_sigterm_in_a_slurm_job_checkpoints_stops_and_resumes_to_the_uninterrupted_run(tmp_path):
    args = [*TINY, "rollout.engine=hf", "trainer.steps=40", "trainer.checkpoint_every=10",
            f"cache_dir={tmp_path / 'cache'}"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_cli([*args, f"hydra.run.dir={ref}"])
    env = {**os.environ, "WANDB_MODE": "offline", "SLURM_JOB_ID": "4242"}
    proc = subprocess.Popen([sys.executable, "-m", "opd_lab", *args, f"hydra.run.dir={cut}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (cut / "metrics.jsonl").exists() or len((cut / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be signalled"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-2000:] + err[-3000:]
    stopped = int(out.split("opd-lab: pre-empted; checkpoint at step ")[1].split(",")[0])
    assert 3 <= stopped < 40
    status = json.loads((cut / "status.json").read_text())
    assert status["status"] == "preempted" and status["error"].endswith(f"step {stopped}")
    assert (cut / "checkpoints" / f"step_{stopped:06d}").is_dir()

    resumed = run_cli([*args, f"hydra.run.dir={cut}", "trainer.resume=auto"])
    assert f"(step {stopped})" in resumed.stdout
    assert json.loads((cut / "status.json").read_text())["status"] == "completed"
    assert _records(cut) == _records(ref)
