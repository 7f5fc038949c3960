"""Every job of every sweep in sweeps/ composes and validates (structured configs), before anything runs."""

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from opd_lab.config import register_configs, to_run_config

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))
EXPECTED_JOBS = {"six_variant": 18, "six_variant_qwen3": 18, "block_ablation": 42, "tau_grid": 36, "reuse_grid": 36,
                 "drift_map": 96, "multi_teacher": 18, "staleness_map": 36,
                 "drift_by_position": 12}


def sweep_jobs(name):
    """The sweep's jobs as override lists (the basic sweeper's cartesian product of hydra.sweeper.params)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "sweeps"), version_base="1.3"):
        cfg = compose(name, overrides=[f"hydra.searchpath=[file://{ROOT / 'conf'}]"], return_hydra_config=True)
        params = cfg.hydra.sweeper.params
    axes = [[f"{k}={v.strip()}" for v in str(vals).split(",")] for k, vals in params.items()]
    return [list(job) for job in itertools.product(*axes)]


def test_every_sweep_is_listed():
    assert set(SWEEPS) == set(EXPECTED_JOBS)


@pytest.mark.parametrize("name", SWEEPS)
def test_every_job_composes_and_validates(name):
    register_configs()
    jobs = sweep_jobs(name)
    assert len(jobs) == EXPECTED_JOBS[name]
    assert f"dir: multirun/{name}/${{now:" in (ROOT / "sweeps" / f"{name}.yaml").read_text()
    seen = set()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "sweeps"), version_base="1.3"):
        for job in jobs:
            cfg = compose(name, overrides=[f"hydra.searchpath=[file://{ROOT / 'conf'}]", "output_dir=/tmp/x", *job])
            run = to_run_config(cfg)
            assert run.logger.wandb.group is None  # the wandb group is the sweep directory, which names the sweep
            assert run.rollout.reuse >= 1
            if name.startswith("six_variant"):
                assert run.trainer.steps == 200 and run.rollout.reuse == 2
                assert run.eval.seed == run.trainer.seed
            seen.add((run.variant, getattr(run.loss, "name", None), run.gate.kind, run.gate.block_size,
                      run.gate.tau, run.rollout.reuse, run.eval.only))
    if name.startswith("six_variant"):
        variants = {s[0] for s in seen}
        assert variants == {"base_student", "teacher", "sampled_token", "sampled_token_block64", "lsm",
                            "lsm_block64"}
        assert {(s[0], s[1], s[2], s[3]) for s in seen if s[6] is None} == {
            ("sampled_token", "sampled_token", "none", None), ("sampled_token_block64", "sampled_token", "block", 64),
            ("lsm", "lsm", "none", None), ("lsm_block64", "lsm", "block", 64)}
    if name == "block_ablation":
        assert len({(s[1], s[2], s[3]) for s in seen}) == 14
    if name == "staleness_map":  # the default grid: sampled-token, ungated, U = 4, k ≥ 1 × every correction
        assert {(s[1], s[2], s[5]) for s in seen} == {("sampled_token", "none", 2)}
    if name == "multi_teacher":
        assert {s[0] for s in seen} == {"mt_generalist", "mt_per_sample", "mt_mixture", "mt_min_kl",
                                        "mt_max_confidence", "mt_alignment"}


def test_multi_teacher_sweep_compares_the_generalist_with_the_routed_specialists():
    register_configs()
    jobs = sweep_jobs("multi_teacher")
    GlobalHydra.instance().clear()
    rules = {}
    with initialize_config_dir(str(ROOT / "sweeps"), version_base="1.3"):
        for job in jobs:
            run = to_run_config(compose("multi_teacher", overrides=[f"hydra.searchpath=[file://{ROOT / 'conf'}]",
                                                                    "output_dir=/tmp/x", *job]))
            assert run.trainer.steps == 200 and run.eval.every == 50
            rules[run.variant] = (run.routing.rule, tuple(run.model.teachers), dict(run.routing.by_tag))
    assert rules["mt_generalist"] == ("single", (), {})
    assert rules["mt_per_sample"] == ("per_sample", ("ops3", "ops4"), {"ops3": "ops3", "ops4": "ops4"})
    for rule in ("mixture", "min_kl", "max_confidence", "alignment"):
        assert rules[f"mt_{rule}"] == (rule, ("ops3", "ops4"), {})


@pytest.mark.parametrize("name", ["six_variant", "block_ablation", "tau_grid", "reuse_grid"])
def test_benchmark_sweeps_take_the_drift_regime(name):
    """``experiment=drift`` reaches every job of each embedded benchmark sweep: no sweep pins the rollout settings
    that make the regime (updates per rollout batch, staleness), except the axis the sweep varies."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        regime = to_run_config(compose("config", overrides=["experiment=drift", "output_dir=/tmp/x"])).rollout
        default = to_run_config(compose("config", overrides=["output_dir=/tmp/x"])).rollout
        point = to_run_config(compose("config", overrides=["drift=u8", "output_dir=/tmp/x"])).rollout
    assert (regime.reuse, regime.mini_batch_size, regime.staleness) == (point.reuse, point.mini_batch_size,
                                                                        point.staleness)  # the map's U = 8 point
    assert (regime.reuse, regime.mini_batch_size, regime.staleness) != (default.reuse, default.mini_batch_size,
                                                                        default.staleness)
    jobs = sweep_jobs(name)
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "sweeps"), version_base="1.3"):
        for job in jobs:
            cfg = compose(name, overrides=[f"hydra.searchpath=[file://{ROOT / 'conf'}]", "output_dir=/tmp/x",
                                           "experiment=drift", *job])
            run = to_run_config(cfg).rollout
            assert run.mini_batch_size == regime.mini_batch_size and run.staleness == regime.staleness
            if name != "reuse_grid":
                assert run.reuse == regime.reuse


def test_staleness_map_parts_compose():
    """The staleness map's other parts (its header's commands): LSM with its corrections, the k = 0 references and the
    on-batch drift points, whose drift=... group sets U (the sweep file leaves reuse and mini-batch alone)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "sweeps"), version_base="1.3"):
        def run(*job):
            return to_run_config(compose("staleness_map", overrides=[f"hydra.searchpath=[file://{ROOT / 'conf'}]",
                                                                      "output_dir=/tmp/x", *job]))

        lsm = run("loss=lsm", "correction=masked", "rollout.staleness=2")
        assert lsm.loss.name == "lsm" and lsm.loss.off_policy.value == "masked" and lsm.rollout.staleness == 2
        cur = run("correction=current_decoupled", "rollout.staleness=0")
        assert (cur.loss.reward_reference.value, cur.loss.off_policy.value) == ("current", "decoupled")
        u16 = run("drift=u16", "rollout.staleness=0", "correction=none")
        assert (u16.rollout.reuse, u16.rollout.mini_batch_size, u16.rollout.staleness) == (4, 8, 0)
        assert (run().rollout.reuse, run().rollout.mini_batch_size, run().rollout.engine.value) == (2, 16, "static")
