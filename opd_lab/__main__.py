"""``python -m opd_lab [overrides]``: one OPD run (or a sweep with ``--multirun``); see opd_lab/train.py."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from opd_lab.common import plugins
from opd_lab.run import jobs
from opd_lab.train import main


@hydra.main(version_base="1.3", config_path=jobs.CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> float:
    return jobs.run_job(cfg, main)


if __name__ == "__main__":
    plugins.load_from_argv()  # before Hydra composes: a plugin may store the schema its YAML names
    app()
