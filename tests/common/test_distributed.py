"""Data parallelism: 2 CPU ranks (torchrun, gloo) on the embedded default equal one process with the same global
batch, in loss, gates, every logged learner metric and the trained weights; FSDP2's sharded checkpoint resumes
to the uninterrupted run's weights."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd_lab.common.distributed import SINGLE, Dist
from tests.test_e2e import ROOT

# A few steps on the embedded default (shipped models), small batches; both ranks get one thread each.
BASE = ["rollout.n_prompts=4", "rollout.n_samples=2", "rollout.mini_batch_size=4", "rollout.reuse=2",
        "rollout.max_tokens=96", "trainer.grad_accum=2", "trainer.steps=3", "trainer.warmup_steps=1",
        "trainer.threads=1", "trainer.lr=1e-3",
        "eval.baselines=false", "eval.n_samples=2", "eval.ks=[1,2]", "eval.max_tokens=64",
        "logger.wandb.mode=disabled", "logger.progress=false"]
LEARNER = ("loss", "ungated_loss", "grad_norm", "gate/mean", "gate/std", "gate/min", "gate/max", "gate/frac_below_0.5",
           "gate/cancel_rate", "drift/mean_abs_delta", "teacher_minus_old_logp", "response/mean_len",
           "mismatch/sampler_old_abs")


def _run(args, world: int, timeout=600):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    cmd = [*(launcher if world > 1 else [sys.executable]), "-m", "opd_lab", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _steps(run: Path):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _weights(path: Path):
    return load_file(path / "model.safetensors")


def _assert_same_run(a: Path, b: Path, atol=1e-5):
    sa, sb = _steps(a), _steps(b)
    assert len(sa) == len(sb) == 3
    for ra, rb in zip(sa, sb, strict=True):
        for k in LEARNER:
            assert ra[k] == pytest.approx(rb[k], rel=1e-3, abs=1e-6), (k, ra["step"], ra[k], rb[k])
    wa, wb = _weights(a / "checkpoint"), _weights(b / "checkpoint")
    assert sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)
    base = load_file(ROOT / "opd_lab/assets/embedded/student/model.safetensors")
    assert max(float((wa[k] - base[k]).abs().max()) for k in base) > 1e-3  # it did train


@pytest.mark.slow
def test_ddp_and_fsdp2_two_ranks_equal_one_process_with_vllm_rollouts(tmp_path):
    """vLLM seeds each prompt by its global index, so the two ranks' rollouts are the single process's; FSDP2
    gathers the full weights for every engine sync."""
    args = [*BASE, "rollout.engine=vllm", "loss=lsm", "gate=token", "trainer.checkpoint_every=2"]
    _run([*args, f"hydra.run.dir={tmp_path / 'one'}"], world=1)
    for strategy in ("ddp", "fsdp2"):
        _run([*args, f"trainer.parallel={strategy}", f"hydra.run.dir={tmp_path / strategy}"], world=2)
        _assert_same_run(tmp_path / strategy, tmp_path / "one")
        assert json.loads((tmp_path / strategy / "status.json").read_text())["status"] == "completed"

    # FSDP2 + vLLM resumed from the sharded step-2 checkpoint: the engines must sample the restored weights
    # (they were synced only from unsharded checkpoints, so step 3 sampled from the base student).
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "fsdp2", cut)
    shutil.rmtree(cut / "checkpoint")
    (cut / "status.json").write_text(json.dumps({"status": "running"}))
    _run([*args, "trainer.parallel=fsdp2", f"trainer.resume={cut}", f"hydra.run.dir={tmp_path / 'other'}"], world=2)
    resumed, ref = _steps(cut)[-1], _steps(tmp_path / "fsdp2")[-1]
    assert resumed["step"] == ref["step"] == 3
    for k in LEARNER:  # the same samples (and sampler/π_old mismatch) as the uninterrupted run's step 3
        assert resumed[k] == pytest.approx(ref[k], rel=1e-3, abs=1e-6), k


@pytest.mark.slow
def test_fsdp2_two_ranks_equal_one_process_and_sharded_resume(tmp_path):
    """HF sampling at top_p → 0 is greedy (rank-independent); sampled-token loss, sequence gate with a clip (the
    normaliser pre-pass). A sharded checkpoint at step 2, resumed, ends at the uninterrupted run's weights."""
    args = [*BASE, "rollout.engine=hf", "rollout.top_p=0.000001", "loss=sampled_token", "gate=sequence",
            "gate.clip_max=2.0", "trainer.checkpoint_every=2"]
    one, two, cut = tmp_path / "one", tmp_path / "two", tmp_path / "cut"
    _run([*args, f"hydra.run.dir={one}"], world=1)
    _run([*args, "trainer.parallel=fsdp2", f"hydra.run.dir={two}"], world=2)
    _assert_same_run(two, one)
    ckpt = two / "checkpoints" / "step_000002"
    assert (ckpt / "shards").is_dir() and not (ckpt / "model.safetensors").exists()
    assert len(list((ckpt / "shards").glob("*.distcp"))) == 2  # one shard file per rank

    # The run as if killed right after its step-2 checkpoint: resume it from there.
    shutil.copytree(two, cut)
    shutil.rmtree(cut / "checkpoint")
    (cut / "status.json").write_text(json.dumps({"status": "running"}))
    _run([*args, "trainer.parallel=fsdp2", f"trainer.resume={cut}", f"hydra.run.dir={tmp_path / 'other'}"], world=2)
    assert [r["loss"] for r in _steps(cut)] == pytest.approx([r["loss"] for r in _steps(two)], rel=1e-6)
    wa, wb = _weights(cut / "checkpoint"), _weights(two / "checkpoint")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.slow
def test_per_token_routing_shares_per_tag_over_two_ranks_equal_one_process(tmp_path):
    """The shipped specialists with min_kl routing under DDP: the teachers' token shares, overall and on each
    problem tag's rows (``routing/by_tag``: the ranks' tag sets joined, counts summed), are the single process's.
    Greedy HF sampling (top_p → 0) keeps the rollouts rank-independent."""
    args = [*BASE, "model=embedded_specialists", "routing=min_kl", "rollout.engine=hf", "rollout.top_p=0.000001",
            "loss=sampled_token", "gate=sequence"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([*args, f"hydra.run.dir={one}"], world=1)
    _run([*args, "trainer.parallel=ddp", f"hydra.run.dir={two}"], world=2)
    tags = set()
    for ra, rb in zip(_steps(two), _steps(one), strict=True):
        shares = sorted(k for k in rb if k.startswith("routing/"))
        assert sorted(k for k in ra if k.startswith("routing/")) == shares
        tags |= {k.split("/")[2] for k in shares if k.startswith("routing/by_tag/")}
        for k in shares:
            assert ra[k] == pytest.approx(rb[k], rel=1e-3, abs=1e-6), (k, ra["step"], ra[k], rb[k])
    assert tags == {"ops3", "ops4"}  # some step's batch holds both tags


@pytest.mark.slow
def test_fsdp2_with_stale_rollouts_scores_pi_old_with_the_sampling_weights(tmp_path):
    """staleness k = 1 under FSDP2: π_old comes from the snapshot of the weights that sampled the batch (copied
    into FSDP2's own sharded storage), so the first update's δ measures the staleness, as in one process; the
    engine's own copy of a tied student gets the gathered weights with its head restored."""
    args = [*BASE, "rollout.engine=hf", "rollout.top_p=0.000001", "rollout.staleness=1", "loss=lsm", "gate=block32"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([*args, f"hydra.run.dir={one}"], world=1)
    _run([*args, "trainer.parallel=fsdp2", f"hydra.run.dir={two}"], world=2)
    _assert_same_run(two, one)
    for ra, rb in zip(_steps(two), _steps(one), strict=True):
        assert ra["drift/first_update_mean_abs_delta"] == pytest.approx(rb["drift/first_update_mean_abs_delta"],
                                                                        rel=1e-3, abs=1e-6)
    assert _steps(two)[-1]["drift/first_update_mean_abs_delta"] > 1e-4  # a stale batch: δ > 0 before any update


def test_rank_shares_and_single_process_reductions():
    d = Dist(rank=1, world=2)
    assert d.shard(8) == slice(4, 8) and SINGLE.shard(8) == slice(0, 8)
    assert SINGLE.sum(1, 2.5) == [1.0, 2.5] and SINGLE.max(3) == [3.0] and SINGLE.broadcast("x") == "x"
    assert SINGLE.gather("x") == ["x"]


def test_a_rank_with_fewer_rows_pads_with_zero_weight_micro_batches():
    from opd_lab.learner.update import micro_batches

    class OtherRankHasThree(Dist):
        def max(self, *values):
            return [3.0]

    micro = micro_batches(torch.arange(2), 4, OtherRankHasThree(rank=0, world=2))
    assert [m.tolist() if m is not None else None for m in micro] == [[0], [1], None]
    assert micro_batches(torch.arange(5), 2, SINGLE)[1].tolist() == [3, 4]


@pytest.mark.slow
def test_a_multirun_under_torchrun_runs_every_job(tmp_path):
    """The process group is created once per process and reused by the sweep's later jobs (HF rollouts; a second
    vLLM engine in the same processes is refused up front)."""
    args = [*BASE, "rollout.engine=hf", "trainer.steps=1", "trainer.warmup_steps=0", "trainer.seed=0,1",
            f"hydra.sweep.dir={tmp_path}"]
    _run(["--multirun", *args], world=2)
    for job in ("0", "1"):
        assert json.loads((tmp_path / job / "status.json").read_text())["status"] == "completed"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "opd_lab", "--multirun", *args[:-1], "rollout.engine=vllm",
                           f"hydra.sweep.dir={tmp_path / 'vllm'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "hydra/launcher=slurm_multigpu" in proc.stderr


@pytest.mark.slow
def test_ddp_and_fsdp2_with_a_staleness_correction_equal_one_process(tmp_path):
    """k = 1 with masked importance sampling, the current-policy reward and the proximal gate reference: π_prox (the
    weights at the start of the step, one no-grad forward under the ranks' shared micro-batch plan; the first
    update's rows from that update) and the behaviour weights give the one-process run's metrics and weights."""
    args = [*BASE, "rollout.engine=hf", "rollout.top_p=0.000001", "rollout.staleness=1", "loss=sampled_token",
            "gate=block32", "gate.reference=proximal", "loss.off_policy=masked", "loss.reward_reference=current"]
    one = tmp_path / "one"
    _run([*args, f"hydra.run.dir={one}"], world=1)
    for parallel in ("ddp", "fsdp2"):
        two = tmp_path / parallel
        _run([*args, f"trainer.parallel={parallel}", f"hydra.run.dir={two}"], world=2)
        _assert_same_run(two, one)
        for ra, rb in zip(_steps(two), _steps(one), strict=True):
            for k in ("staleness/w_mean", "staleness/w_dropped_frac", "staleness/prox_behaviour_abs"):
                assert (k in ra) == (k in rb), k
                if k in rb:
                    assert ra[k] == pytest.approx(rb[k], rel=1e-3, abs=1e-6), (k, ra["step"])
    assert _steps(one)[-1]["staleness/prox_behaviour_abs"] > 1e-4  # a stale batch: π_prox ≠ π_b
