"""Cluster sweeps: the SLURM launcher configs compose (Hydra's compose API) with the main config and with a sweep,
and a multi-task SLURM job's variables become torch.distributed's."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from opd_lab.common.distributed import env_from_slurm
from opd_lab.config import register_configs
from tests.conftest import compose as conftest_compose

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the 'cluster' extra is not installed")


def _compose(config_dir: Path, name: str, overrides):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_composes_with_the_main_config():
    cfg = _compose(ROOT / "conf", "config", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.partition) == (1, 1, "gpu")
    assert launcher.timeout_min == 720 and launcher.max_num_timeout == 3
    run = conftest_compose(["hydra/launcher=slurm", "trainer.parallel=fsdp2"])  # the job config still validates
    assert run.trainer.parallel.value == "fsdp2"


def test_multigpu_launcher_composes_with_a_sweep():
    cfg = _compose(ROOT / "sweeps", "six_variant_qwen3", [
        f"hydra.searchpath=[file://{ROOT / 'conf'}]", "hydra/launcher=slurm_multigpu", "trainer.parallel=fsdp2",
        "hydra.launcher.nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert launcher.submitit_folder.endswith(".submitit/%j")
    assert cfg.trainer.parallel == "fsdp2" and "variant" in cfg.hydra.sweeper.params


def test_slurm_job_variables_become_torch_distributed_ones(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "unset")
        monkeypatch.delenv(k)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for k, v in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
                 "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2"}.items():
        monkeypatch.setenv(k, v)
    import os

    assert env_from_slurm()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("9", "16", "1")
    assert os.environ["MASTER_ADDR"] == "gpu017" and os.environ["MASTER_PORT"] == str(20000 + 4242)
    assert not env_from_slurm()  # torchrun's (here: already set) variables win


def test_single_task_slurm_job_is_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not env_from_slurm()
