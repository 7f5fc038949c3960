"""Metrics to ``metrics.jsonl`` in the run directory and to wandb (offline by default)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hydra.types import RunMode

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
        self._first_step = 0  # steps below it are in the (resumed) wandb run already
        w = cfg.logger.wandb
        if w.mode.value != "disabled":
            import wandb

            offline = w.mode.value == "offline"
            superseded = supersede_offline_runs(self.run_dir) if offline else []
            self._wandb = wandb.init(
                project=w.project, entity=w.entity, group=wandb_group(cfg), name=w.name or name, tags=run_tags(cfg),
                config=as_flat_dict(cfg) | {"overrides": hydra_overrides()}, dir=str(self.run_dir),
                mode=w.mode.value, reinit="finish_previous", id=resume_id,
                resume="allow" if resume_id else None,
            )
            if offline and resume_id:  # one offline folder holds the whole run: the kept steps, then the rest
                self._replay(read_metrics(self.path))
            elif resume_id:  # online: the server has the steps logged before the interruption
                self._first_step = int(getattr(self._wandb, "starting_step", 0) or 0)
            if superseded:
                print(f"opd-lab: an earlier attempt's wandb folder moved to {superseded[0].parent} (its steps up to "
                      "the checkpoint are in the new folder)", flush=True)

    def _replay(self, records: list[dict[str, Any]]) -> None:
        """Log the records kept from before a resume (``metrics.jsonl``, cut at the checkpoint) to the new run."""
        for rec in records:
            self._wandb.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

    @property
    def run_id(self) -> str | None:
        """The wandb run id (kept in checkpoints so a resumed run continues the same wandb run)."""
        return self._wandb.id if self._wandb is not None else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        rec = {"step": step, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._wandb is not None and step >= self._first_step and not preemption.noticed():
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
    """wandb tags: the configured ones, then loss, gate, reuse, staleness, steps, engine, seed, the variant when
    set, and every override the sweep varies (``key=value`` of this job; wandb caps a tag at 64 characters)."""
    tags = [f"loss={cfg.loss.name}", f"gate={gate_name(cfg.gate)}", f"reuse={cfg.rollout.reuse}",
            f"staleness={cfg.rollout.staleness}", f"steps={cfg.trainer.steps}",
            f"engine={cfg.rollout.engine.value}", f"seed={cfg.trainer.seed}"]
    tags += [f"variant={cfg.variant}"] if cfg.variant else []
    tags += swept_overrides()
    return list(dict.fromkeys(t[:64] for t in [*cfg.logger.wandb.tags, *tags]))


def wandb_group(cfg: Config) -> str | None:
    """The wandb group: ``logger.wandb.group`` when set; in a multirun, the sweep and its run, from the sweep
    directory (``block_ablation/2026-12-07_01-00-00`` for ``multirun/block_ablation/2026-12-07_01-00-00``; the
    config name is put first when the directory does not name it), so that a smoke test and the real sweep never
    share a group; a single run has none. At most 128 characters (wandb's limit), keeping the end."""
    if cfg.logger.wandb.group:
        return cfg.logger.wandb.group
    hc = _hydra_config()
    if hc is None or hc.mode != RunMode.MULTIRUN:
        return None
    parts = [p for p in Path(hc.sweep.dir).parts if p not in ("/", "multirun")][-2:]
    name = hc.job.config_name
    if name and name != "config" and name not in parts:
        parts.insert(0, name)
    return "/".join(parts)[-128:]


def swept_overrides() -> list[str]:
    """This job's ``key=value`` for every key its multirun sweeps: the sweep file's ``hydra.sweeper.params`` and
    the command line's sweeps (``loss=lsm,sampled_token``, read from the sweep's ``multirun.yaml``)."""
    hc = _hydra_config()
    if hc is None or hc.mode != RunMode.MULTIRUN:
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set((hc.sweeper.get("params") or {}).keys())
    saved = Path(hc.sweep.dir) / "multirun.yaml"
    try:
        import yaml

        given = yaml.safe_load(saved.read_text())["hydra"]["overrides"]["task"]
        keys |= {o.get_key_element() for o in OverridesParser.create().parse_overrides(given) if o.is_sweep_override()}
    except Exception:  # no multirun.yaml (a launcher that writes none): the sweep file's axes only
        pass
    job = OverridesParser.create().parse_overrides(list(hc.overrides.task))
    return [f"{o.get_key_element()}={o.value()}" for o in job if o.get_key_element() in keys]


def _hydra_config():
    """Hydra's config of this job, or ``None`` outside a Hydra app (tests, library use)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def supersede_offline_runs(run_dir: Path) -> list[Path]:
    """Move an earlier attempt's ``wandb/offline-run-*`` folders to ``wandb-superseded/`` (a resumed run replays
    its kept steps into a new folder, so ``wandb sync`` of ``wandb/`` uploads each step once); returns their new
    paths."""
    moved = []
    for old in sorted((run_dir / "wandb").glob("offline-run-*")):
        target = run_dir / "wandb-superseded" / old.name
        target.parent.mkdir(exist_ok=True)
        old.rename(target)
        moved.append(target)
    return moved


def hydra_overrides() -> list[str]:
    """The command-line overrides of this Hydra job (empty outside a Hydra app)."""
    hc = _hydra_config()
    return list(hc.overrides.task) if hc is not None else []


def gate_name(g: Any) -> str:
    """``block64``, ``span``, a plugin's kind (``logblock``, or ``logblock4`` with a block size); a group statistic
    other than the mean is appended (``block64-max_abs``). From a run's ``gate`` section: a ``GateConfig`` or the
    mapping of a ``config.yaml`` (an older file has no ``reduce``: the mean)."""
    get = g.get if isinstance(g, dict) else lambda k, d=None: getattr(g, k, d)
    kind, block_size, reduce = get("kind"), get("block_size"), get("reduce") or "mean"
    name = f"{kind}{block_size}" if block_size is not None else f"{kind}"
    return name if reduce == "mean" else f"{name}-{reduce}"
