"""``python -m opd_lab [overrides]``: one OPD run (or a sweep with ``--multirun``)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from opd_lab.config import ConfigError, register_configs, to_run_config

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_configs()


def config_error(e: ConfigError) -> None:
    """Report a config error: exit 2 in a single run; in a multirun, mark this job failed and let the others go on."""
    print(f"opd-lab: config error: {e}", file=sys.stderr)
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        sys.exit(2)
    from opd_lab.train import write_status

    out = Path(hc.runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_status(out, "failed", error=f"config error: {e}")
    raise e


def run_job(cfg: DictConfig, evaluate_only: bool = False) -> float:
    """Validate, then train (or only evaluate); config errors are reported by :func:`config_error`."""
    final: dict[str, float] = {}
    try:
        run = to_run_config(cfg)
        if evaluate_only and run.eval.only is None:
            raise ConfigError("eval.only=null is invalid here: allowed student or teacher (python -m "
                              "opd_lab.evaluate trains nothing; set eval.checkpoint to evaluate a trained model)")
        from opd_lab.train import main

        final = main(run, Path(run.output_dir))
    except ConfigError as e:
        config_error(e)
    return final.get("pass@1", float("nan"))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> float:
    return run_job(cfg)


if __name__ == "__main__":
    app()
