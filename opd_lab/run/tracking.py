"""Metrics to ``metrics.jsonl`` in the run directory and to wandb (offline by default)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from opd_lab.common import preemption
from opd_lab.config import Config, as_flat_dict


class Tracker:
    """Appends one JSON line per step and mirrors it to wandb; ``summary`` sets final values. After a SLURM
    pre-emption notice (preemption.py) only ``metrics.jsonl`` is written: the wandb service has been sent SIGTERM
    too, and the resumed job continues the same wandb run."""

    def __init__(self, cfg: Config, run_dir: str | os.PathLike, name: str | None = None,
                 resume_id: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._wandb = None
        w = cfg.logger.wandb
        if w.mode.value != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=w.project, entity=w.entity, group=w.group, name=w.name or name, tags=run_tags(cfg),
                config=as_flat_dict(cfg) | {"overrides": hydra_overrides()}, dir=str(self.run_dir),
                mode=w.mode.value, reinit="finish_previous", id=resume_id,
                resume="allow" if resume_id else None,
            )

    @property
    def run_id(self) -> str | None:
        """The wandb run id (kept in checkpoints so a resumed run continues the same wandb run)."""
        return self._wandb.id if self._wandb is not None else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        rec = {"step": step, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._wandb is not None and not preemption.noticed():
            try:
                self._wandb.log(metrics, step=step)
            except OSError:  # ConnectionResetError, BrokenPipeError: the service died with the SIGTERM
                if not preemption.noticed():
                    raise

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb is not None:
            for k, v in values.items():
                self._wandb.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        if self._wandb is not None:
            run_dir, offline = self._wandb.dir, self._wandb.settings.mode == "offline"
            self._wandb.finish(exit_code=exit_code)
            self._wandb = None
            if offline and os.environ.get("WANDB_SILENT") == "true":  # wandb said nothing: say where the run is
                folder = Path(run_dir).parent
                print(f"wandb: offline run in {folder} (upload: wandb sync {folder})", flush=True)


class NullTracker:
    """The tracker of ranks other than 0 under torchrun: they compute the same metrics and log nothing."""

    run_id = None

    def log(self, step: int, metrics: dict) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (empty if absent), skipping a last line cut short by a kill."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def run_tags(cfg: Config) -> list[str]:
    """wandb tags: the configured ones plus loss, gate, reuse, seed (and the variant when set)."""
    tags = [f"loss={cfg.loss.name}", f"gate={gate_name(cfg)}", f"reuse={cfg.rollout.reuse}",
            f"seed={cfg.trainer.seed}"] + ([f"variant={cfg.variant}"] if cfg.variant else [])
    return list(dict.fromkeys([*cfg.logger.wandb.tags, *tags]))


def hydra_overrides() -> list[str]:
    """The command-line overrides of this Hydra job (empty outside a Hydra app)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # not running under @hydra.main (tests, library use)
        return []


def gate_name(cfg: Config) -> str:
    g = cfg.gate
    return f"block{g.block_size}" if g.kind.value == "block" else g.kind.value
