"""``--keep-runs``: copy the small files the report reads of each sweep directory (and each ``runs.csv`` source)
under the report's ``runs/``, so that a sweep run over several sessions is reported again from the kept parts."""

from __future__ import annotations

import shutil
from pathlib import Path

from opd_lab.report.sources import is_csv

KEPT = (".hydra/overrides.yaml", ".hydra/hydra.yaml", ".hydra/config.yaml", "config.yaml", "status.json",
        "metrics.jsonl", "eval_per_problem.csv")


def keep_runs(sweep_dirs: list[Path], out: Path) -> list[Path]:
    """Copy what the report reads of each sweep directory into ``out/runs/<part>/`` (the part named
    ``<parent>_<name>`` after the sweep directory, or ``<name>`` for a part an earlier report kept under its own
    ``runs/``; a directory already under ``out/runs`` is left where it is), and each ``runs.csv`` source
    to ``out/runs/<its folder>_runs.csv``. Returns the kept sources."""

    kept, written = [], set()
    for d in sweep_dirs:
        d = Path(d).resolve()
        if (out / "runs").resolve() in d.parents:
            kept.append(d)
            continue
        # a part kept by an earlier report (<report>/runs/<part>) keeps its name: parts do not grow "runs_" prefixes
        dest = out / "runs" / (d.name if d.parent.name == "runs" else f"{d.parent.name}_{d.name}")
        if dest in written:
            raise ValueError(f"two sources would be kept as {dest} (the second: {d}); rename one sweep directory")
        written.add(dest)
        if is_csv(d):  # an earlier report's runs.csv: kept whole (as runs/<its folder>_runs.csv, or its kept name)
            if dest.exists() and dest.read_bytes() != d.read_bytes():
                own = d == (out / "runs.csv").resolve()  # this report's output: it holds every source it was made of
                raise ValueError(f"{d} is {'the output of an earlier report into ' + str(out) if own else 'not'} "
                                 f"the runs.csv kept as {dest}; pass the kept sources ({out / 'runs'}/*) and the "
                                 "new parts instead")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(d, dest)
            kept.append(dest)
            continue
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        if (d / "multirun.yaml").exists():
            shutil.copy2(d / "multirun.yaml", dest / "multirun.yaml")
        for ov in sorted(d.rglob(".hydra/overrides.yaml")):
            run_dir = ov.parent.parent
            if "wandb" in run_dir.parts:
                continue
            target = dest / run_dir.relative_to(d)
            for name in KEPT:
                if (run_dir / name).exists():
                    (target / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(run_dir / name, target / name)
            for f in sorted((run_dir / "evals").glob("*.csv")):
                (target / "evals").mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target / "evals" / f.name)
        kept.append(dest)
    return kept
