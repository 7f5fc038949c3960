"""rollout.staleness (pipeline.py): batch s is sampled by the weights of step s − k while the learner trains; π_old
is that policy (snapshots); concurrency changes nothing but time; a resumed run regenerates its in-flight batches
exactly; k = 0 is the synchronous loop."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opd_lab.learner.heads import Policy
from opd_lab.rollout.pipeline import Rollouts
from tests.test_e2e import ROOT, TINY, run_cli

FAST = [o for o in TINY if not o.startswith(("trainer.steps", "rollout.max_tokens"))] + [
    "rollout.engine=static", "rollout.max_tokens=40", "loss=sampled_token", "gate=block32", "rollout.reuse=2",
    "rollout.mini_batch_size=2", "trainer.lr=3e-3", "logger.wandb.mode=disabled", "eval.baselines=false"]


def _train_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _learner(records: list[dict]) -> list[dict]:
    """Everything but timings (and the waits that only timing decides)."""
    return [{k: v for k, v in r.items() if not (k.startswith("time/") or k.endswith(("per_s", "seconds")))}
            for r in records]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
def test_staleness_drifts_from_the_first_update_and_pi_old_is_the_sampler(cache, tmp_path):
    runs = {}
    for k in (0, 1, 2):
        run_cli([*FAST, "trainer.steps=5", f"rollout.staleness={k}", f"cache_dir={cache}",
                 f"hydra.run.dir={tmp_path / str(k)}"])
        runs[k] = _train_records(tmp_path / str(k))
    for k, recs in runs.items():
        assert [r["rollout/staleness"] for r in recs] == [min(s, k) for s in range(5)]
        assert [r["rollout/staleness_updates"] for r in recs] == [min(s, k) * 4 for s in range(5)]
        for r in recs:
            first = [v for key, v in r.items() if key.startswith("drift/first_update/by_block/")]
            last = [v for key, v in r.items() if key.startswith("drift/last_update/by_block/")]
            assert first and len(first) == len(last)  # by response position, every block with a token
            if r["rollout/staleness"] == 0:  # sampled by the current weights: π_θ = π_old on the first update
                assert r["drift/first_update_mean_abs_delta"] == 0.0 and set(first) == {0.0}
            else:  # stale: the first update already sees the drift of the updates made since
                assert r["drift/first_update_mean_abs_delta"] > 1e-4 and min(first) > 0
            assert min(last) > 0  # after an update every block has drifted
            for when in ("first_update", "last_update"):  # token shares: the blocks' means recombine to the update's
                share = {key.split("/")[-1]: v for key, v in r.items() if key.startswith(f"tokens/{when}/by_block/")}
                assert sum(share.values()) == pytest.approx(1.0)
                whole = sum(v * r[f"drift/{when}/by_block/{b}"] for b, v in share.items())
                assert whole == pytest.approx(r[f"drift/{when}_mean_abs_delta"], rel=1e-4, abs=1e-9)
            # π_old is the policy that sampled the batch (its snapshot), not the current one: at top-p 1 the
            # sampler's log-probs equal π_old's up to float rounding
            assert r["mismatch/sampler_old_abs"] < 1e-4


class StubEngine:
    """Records, for every batch, the weight (one scalar: the learner's version) it was sampled with."""

    def __init__(self):
        self.held = None

    def sync_weights(self, lm, state_dict=None):
        self.held = float(lm.weight.detach())
        return 0.0

    def generate(self, prompts, spec):
        time.sleep(0.01)
        return SimpleNamespace(prompts=prompts, seed=spec.seed, weight=self.held, stats={"rollout/seconds": 0.01})


def _drive(k: int, concurrent: bool, steps: int, start: int = 0, restored=None):
    """The loop's use of Rollouts with a one-parameter 'policy' whose weight is the version (steps done)."""
    policy = Policy(torch.nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        policy.lm.weight.fill_(float(start))
    sampler = random.Random(5)
    if restored is not None:
        sampler.setstate(restored["sampler"])
    engine = StubEngine()
    engine.held = 0.0 if restored is None else -1.0
    rollouts = Rollouts(engine, policy, k, sampler, lambda rng: [[rng.randrange(1000)]], lambda s: SimpleNamespace(
        seed=s), concurrent=concurrent)
    rollouts.start(start, restored["snapshots"] if restored else {}, engine_version=None if restored else 0)
    seen, behaviour, state = [], [], None
    for step in range(start, steps):
        batch, stats = rollouts.get(step)
        with rollouts.behaviour(step):
            behaviour.append(float(policy.lm.weight.detach()))
        seen.append((step, batch.prompts, batch.weight, stats["rollout/staleness"]))
        with torch.no_grad():
            policy.lm.weight.add_(1.0)  # one step of training: v_{step+1}
        rollouts.after_step(step)
        if step == 2:
            state = rollouts.state()
    rollouts.close()
    return seen, behaviour, state


@pytest.mark.parametrize("k", [0, 1, 3])
def test_rollouts_sample_each_batch_from_version_s_minus_k(k):
    seen, behaviour, state = _drive(k, concurrent=True, steps=7)
    assert [w for _, _, w, _ in seen] == [float(max(0, s - k)) for s in range(7)]
    assert behaviour == [float(max(0, s - k)) for s in range(7)]  # π_old: the sampling weights' snapshot
    assert [st for *_, st in seen] == [float(min(s, k)) for s in range(7)]
    assert seen == _drive(k, concurrent=False, steps=7)[0]  # threads move time, never the batches
    # resume after step 2: the pending batches 3 .. 3 + k come back from the checkpoint's snapshots
    resumed, behaviour3, _ = _drive(k, concurrent=True, steps=7, start=3, restored=state)
    assert resumed == seen[3:] and behaviour3 == behaviour[3:]
    assert set(state["snapshots"]) == set(range(max(0, 3 - k), 3))


@pytest.mark.slow
@pytest.mark.parametrize("correction", [[], ["loss.off_policy=masked", "loss.reward_reference=current",
                                             "gate.reference=proximal"]], ids=["none", "corrected"])
def test_sigkill_then_resume_with_staleness_equals_uninterrupted(cache, tmp_path, correction):
    """A checkpoint holds the sampler before the first pending batch and the snapshots those batches were sampled
    from: the resumed run regenerates its in-flight batches and logs the uninterrupted run's metrics (with a
    staleness correction too: π_prox is the restored weights)."""
    args = [*FAST, "trainer.steps=8", "rollout.staleness=2", "trainer.checkpoint_every=2", "eval.every=4",
            f"cache_dir={cache}", *correction]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_cli([*args, f"hydra.run.dir={ref}"])
    proc = subprocess.Popen([sys.executable, "-m", "opd_lab", *args, f"hydra.run.dir={cut}"], cwd=ROOT,
                            env={**os.environ, "WANDB_MODE": "disabled"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (cut / "checkpoints" / "step_000004").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_cli([*args, f"hydra.run.dir={cut}", "trainer.resume=auto"])
    a, b = _learner(_train_records(ref)), _learner(_train_records(cut))
    assert [r["step"] for r in b] == list(range(1, 9)) and a == b
    assert (ref / "eval.csv").read_text() == (cut / "eval.csv").read_text()


def _without_staleness_metrics(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("staleness/")} for r in _learner(records)]


@pytest.mark.slow
def test_at_k0_every_correction_is_the_uncorrected_run_bit_for_bit(cache, tmp_path):
    """rollout.staleness=0: π_prox = π_b, so every correction (and the proximal references) leaves a multi-step
    sampled-token run's every logged learner metric and its evaluation identical; reward_reference=current does not
    (it follows π_θ through the step's 4 updates), which shows the comparison can fail."""
    args = [*FAST, "trainer.steps=4", "gate=block32", f"cache_dir={cache}"]
    options = {"none": [], "decoupled": ["loss.off_policy=decoupled", "gate.reference=proximal"],
               "masked": ["loss.off_policy=masked", "loss.reward_reference=proximal", "loss.is_cap=1.01"],
               "current": ["loss.reward_reference=current"]}
    runs = {}
    for name, extra in options.items():
        proc = run_cli([*args, *extra, f"hydra.run.dir={tmp_path / name}"])
        runs[name] = _train_records(tmp_path / name)
        assert ("a no-op with rollout.staleness=0" in proc.stdout) == (name in ("decoupled", "masked"))
    base = _without_staleness_metrics(runs["none"])
    for name in ("decoupled", "masked"):
        assert _without_staleness_metrics(runs[name]) == base, name
        assert all(r["staleness/w_mean"] == 1.0 and r["staleness/w_dropped_frac"] == 0.0 for r in runs[name])
        assert (tmp_path / name / "eval.csv").read_text() == (tmp_path / "none" / "eval.csv").read_text()
    assert not any(k.startswith("staleness/") for r in runs["none"] for k in r)
    current = _without_staleness_metrics(runs["current"])
    assert current[0]["drift/first_update_mean_abs_delta"] == 0.0 and current != base


@pytest.mark.slow
def test_a_stale_run_with_a_correction_logs_the_behaviour_gap(cache, tmp_path):
    """k = 1 with decoupled PPO: from step 2 on (a stale batch) π_prox is scored and mean |log π_prox − log π_b| is
    logged; the weights w_t are logged every step (exactly 1 on step 1, whose batch the current weights sampled)."""
    run_cli([*FAST, "trainer.steps=4", "rollout.staleness=1", "loss.off_policy=decoupled", f"cache_dir={cache}",
             f"hydra.run.dir={tmp_path}"])
    recs = _train_records(tmp_path)
    assert "staleness/prox_behaviour_abs" not in recs[0] and recs[0]["staleness/w_mean"] == 1.0
    for r in recs[1:]:
        assert r["staleness/prox_behaviour_abs"] > 1e-4
        assert r["staleness/prox_behaviour_abs"] == pytest.approx(r["drift/first_update_mean_abs_delta"], rel=0.5)
        assert r["staleness/w_mean"] != 1.0
