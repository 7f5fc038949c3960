"""``python -m opd_lab [overrides]``: one OPD run (or a sweep with ``--multirun``)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from opd_lab.config import ConfigError, register_configs, to_run_config

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> float:
    try:
        run = to_run_config(cfg)
    except ConfigError as e:
        print(f"opd-lab: config error: {e}", file=sys.stderr)
        sys.exit(2)
    from opd_lab.train import main

    try:
        final = main(run, Path(run.output_dir))
    except ConfigError as e:
        print(f"opd-lab: config error: {e}", file=sys.stderr)
        sys.exit(2)
    return final.get("pass@1", float("nan"))


if __name__ == "__main__":
    app()
