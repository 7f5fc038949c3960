"""Sweeps on a real SLURM cluster: a one-node cluster from Debian's packages (scripts/slurm_local.sh), submitted to
through Hydra's submitit launcher as a user would (`hydra/launcher=slurm`, `slurm_multigpu`).

- a sweep (4 jobs and one bad grid point) completes, the bad point is marked failed, and the report on the sweep
  directory equals the report of the same sweep run locally;
- pre-emption: `scontrol requeue` of a running job; the re-queued job resumes from its checkpoint and ends with
  the uninterrupted run's metrics at every step;
- time-out: a job longer than its `timeout_min` is re-queued by submitit (`max_num_timeout`) and finishes with the
  same metrics;
- `slurm_multigpu` with 2 tasks on CPU (gloo DDP through SLURM's task variables) equals one process.

Skipped, with the reason printed, where the cluster cannot start (no apt-get, not root, daemons refused).
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.common.test_distributed import BASE, _assert_same_run
from tests.learner.test_resume import _records
from tests.test_e2e import ROOT, TINY, run_cli

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the 'cluster' extra is not installed")
pytestmark = pytest.mark.slow

SCRIPT = ROOT / "scripts" / "slurm_local.sh"
# per job: no GPU, small memory; the node has every CPU of this machine
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.mem_gb=2",
            "hydra.launcher.partition=local", "hydra.launcher.timeout_min=15"]
# a run long enough to be interrupted: ~0.2 s per step on the tiny models
LONG = [*TINY, "rollout.engine=hf", "rollout.n_prompts=4", "trainer.steps=300", "trainer.checkpoint_every=20",
        "trainer.keep_checkpoints=2", "trainer.resume=auto"]


def _free_port_pair() -> int:
    for port in range(16817, 17817, 2):
        ok = True
        for p in (port, port + 1):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no free port pair for slurmctld/slurmd")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster for this module (stopped afterwards); the environment that reaches it."""
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "OPD_SLURM_DIR": str(folder / "cluster"), "OPD_SLURM_PORT": str(_free_port_pair())}
    start = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=600)
    if start.returncode == 3:
        pytest.skip(start.stderr.strip().splitlines()[-1])
    assert start.returncode == 0, start.stdout + start.stderr
    env = {**env, "SLURM_CONF": str(folder / "cluster" / "etc" / "slurm.conf"), "WANDB_MODE": "offline"}
    yield env
    stop = subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not (folder / "cluster").exists()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The tiny embedded pair, built once by a local run (parallel SLURM jobs then only read it)."""
    path = tmp_path_factory.mktemp("cache")
    run_cli([*TINY, "rollout.engine=hf", f"cache_dir={path}", f"hydra.run.dir={path.parent / 'warm'}"])
    return path


def _multirun(args, env, timeout=900, check=True):
    proc = subprocess.run([sys.executable, "-m", "opd_lab", "--multirun", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _job_logs(sweep: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(sweep.glob(".submitit/*/*_log.*")))


def _report(sweep: Path, out: Path) -> Path:
    rep = subprocess.run([sys.executable, "-m", "opd_lab.report.cli", str(sweep), "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    return out


def _timeless(csv: Path) -> pd.DataFrame:
    df = pd.read_csv(csv)
    return df[[c for c in df.columns if "time/" not in c and not c.endswith(("per_s_mean", "per_s_std",
                                                                            "per_s_ci95"))]]


def test_a_sweep_on_slurm_reports_like_the_same_sweep_run_locally(slurm, cache, tmp_path):
    variants = tmp_path / "conf" / "variant"
    variants.mkdir(parents=True)
    (variants / "broken.yaml").write_text("# @package _global_\nmodel:\n  student: /nonexistent/student\n"
                                          "variant: broken\n")
    sweep = ["--config-dir", str(ROOT / "sweeps"), "--config-name", "six_variant", *TINY, "rollout.engine=hf",
             f"cache_dir={cache}", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
             "variant=sampled_token,lsm_block64,broken", "trainer.seed=0,1"]
    local = _multirun([*sweep, f"hydra.sweep.dir={tmp_path / 'local'}"], slurm, check=False)
    on_slurm = _multirun([*sweep, *LAUNCHER, "hydra.launcher.cpus_per_task=1",
                          f"hydra.sweep.dir={tmp_path / 'slurm'}"], slurm, check=False)
    for proc in (local, on_slurm):  # the bad grid point's error is re-raised once the whole sweep ran
        assert proc.returncode != 0 and "model.student='/nonexistent/student'" in proc.stderr, proc.stderr[-3000:]
    assert list((tmp_path / "slurm" / ".submitit").iterdir())  # it did go through SLURM

    statuses = {p.parent.name: json.loads(p.read_text())["status"] for p in (tmp_path / "slurm").glob("*/status.json")}
    assert statuses == {"0": "completed", "1": "completed", "2": "completed", "3": "completed", "4": "failed",
                        "5": "failed"}, _job_logs(tmp_path / "slurm")[-3000:]
    for job in "0123":  # every job's run directory is a normal one, with the local run's records
        run = tmp_path / "slurm" / job
        assert (run / "config.yaml").exists() and (run / "eval.csv").exists() and (run / "checkpoint").is_dir()
        assert _records(run) == _records(tmp_path / "local" / job)

    a, b = _report(tmp_path / "local", tmp_path / "rep_local"), _report(tmp_path / "slurm", tmp_path / "rep_slurm")
    pd.testing.assert_frame_equal(_timeless(a / "summary.csv"), _timeless(b / "summary.csv"))
    runs = pd.read_csv(b / "runs.csv").set_index("job")
    assert runs.loc[[4, 5], "status"].tolist() == ["failed", "failed"]
    assert runs.loc[4, "error"].startswith("config error: model.student")
    md = (b / "summary.md").read_text()
    assert "Runs that did not complete" in md and "broken" in md
    assert md.replace(str(tmp_path / "slurm"), "") == (a / "summary.md").read_text().replace(
        str(tmp_path / "local"), "")


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """The uninterrupted run of LONG, locally."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_cli([*LONG, f"cache_dir={cache}", f"hydra.run.dir={run}"])
    return run


def _squeue(env) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=60)
    return out.stdout.split()


def test_a_requeued_job_resumes_from_its_checkpoint_to_the_uninterrupted_metrics(slurm, cache, reference, tmp_path):
    """`scontrol requeue` of a running job: SLURM sends SIGTERM to every process of the job; the run saves a
    checkpoint at the end of its step, says `preempted`, and the re-queued job continues from there."""
    sweep = tmp_path / "sweep"
    run = sweep / "0"
    args = [*LONG, f"cache_dir={cache}", *LAUNCHER, "hydra.launcher.cpus_per_task=2", f"hydra.sweep.dir={sweep}"]
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(proc=_multirun(args, slurm, check=False)))
    thread.start()
    deadline = time.time() + 600
    while not (run / "checkpoints" / "step_000040").exists():
        assert thread.is_alive() and time.time() < deadline, "the job ended before it could be pre-empted"
        time.sleep(0.1)
    jobs = _squeue(slurm)
    assert len(jobs) == 1
    subprocess.run(["scontrol", "requeue", jobs[0]], env=slurm, check=True, timeout=60)
    thread.join(900)
    proc = result["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    logs = _job_logs(sweep)
    assert "DUE TO JOB REQUEUE" in logs and "opd-lab: pre-empted; checkpoint at step" in logs, logs[-3000:]
    stopped = int(logs.split("opd-lab: pre-empted; checkpoint at step ")[1].split(",")[0])
    assert 40 <= stopped < 300
    assert f"resuming from {run / 'checkpoints' / f'step_{stopped:06d}'}" in logs
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    assert _records(run) == _records(reference)


def test_a_job_past_its_time_limit_is_requeued_by_submitit_and_finishes(slurm, cache, reference, tmp_path):
    """timeout_min=1 with submitit's USR2 45 s before the limit: the job is signalled, re-queued by submitit
    (max_num_timeout), resumes from its last checkpoint, and ends with the uninterrupted run's metrics. Each
    attempt gets ~15–30 s, most of it start-up, and makes 20–40 steps of the 300 on this machine: 16 re-queues
    leave room for a slower one (8 ran out once, at step 260, with nothing else running)."""
    sweep = tmp_path / "sweep"
    args = [*LONG, f"cache_dir={cache}", *LAUNCHER, "hydra.launcher.cpus_per_task=2", "hydra.launcher.timeout_min=1",
            "hydra.launcher.signal_delay_s=45", "hydra.launcher.max_num_timeout=16", f"hydra.sweep.dir={sweep}"]
    _multirun(args, slurm)
    logs = _job_logs(sweep)
    assert "this job is timed-out" in logs and "remaining timeouts" in logs, logs[-3000:]
    assert "resuming from" in logs
    assert json.loads((sweep / "0" / "status.json").read_text())["status"] == "completed"
    assert _records(sweep / "0") == _records(reference)


def test_slurm_multigpu_two_tasks_on_cpu_equal_one_process(slurm, tmp_path):
    """Two SLURM tasks of one job (slurm_multigpu, gloo): opd_lab.common.distributed reads the ranks from SLURM."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*BASE, "rollout.engine=static", "loss=lsm", "gate=token", "trainer.parallel=ddp"]
    run_cli([*args, f"hydra.run.dir={one}"])
    _multirun([*args, "hydra/launcher=slurm_multigpu", "hydra.launcher.nodes=1", "hydra.launcher.tasks_per_node=2",
               "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4",
               "hydra.launcher.partition=local", "hydra.launcher.timeout_min=15", f"hydra.sweep.dir={two}"], slurm)
    logs = _job_logs(two)
    for rank in (0, 1):  # two SLURM tasks ran the job, as global ranks 0 and 1 of 2
        assert f"global_rank={rank}(2)" in logs, logs[-3000:]
    assert json.loads((two / "0" / "status.json").read_text())["status"] == "completed"
    _assert_same_run(two / "0", one)
