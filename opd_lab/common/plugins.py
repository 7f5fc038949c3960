"""A researcher's own pieces from outside the package: ``plugins=[my_gates]`` (docs/extending.md).

A plugin is a Python module, named by its import name (``my_lab.gates``) or by the path of its file
(``/path/to/my_gates.py``, ``./my_gates.py``). Importing it runs its registrations: a gate grouping or group
statistic (``opd_lab.core.gates.GROUPINGS`` / ``REDUCERS``), a loss (``opd_lab.core.losses.LOSSES``), a routing rule
(``opd_lab.learner.teachers.RULES``), a task (``opd_lab.tasks.TASKS``), and the schema of its config node in Hydra's
ConfigStore (:func:`opd_lab.config.register_configs` shows how). Its YAML files come in through Hydra's own
``hydra.searchpath=[file://<folder>]``.

The modules must be imported before Hydra composes the config (a YAML file may name a schema that the plugin
stores), so each entry point reads ``plugins=`` from the command line (:func:`load_from_argv`) before Hydra starts;
a job started elsewhere (a SLURM launcher's worker) imports them again from the composed config
(:func:`load`). ``OPD_LAB_PLUGINS`` (comma-separated) adds plugins to every run. The run's config logs the list,
so a run that used a plugin says so.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

ENV = "OPD_LAB_PLUGINS"
_loaded: dict[str, str] = {}  # spec → module name


class PluginError(ImportError):
    """A plugin could not be imported; the message names the plugin and the cause."""


def _import(spec: str) -> str:
    path = Path(spec).expanduser()
    if spec.endswith(".py") or os.sep in spec:
        if not path.is_file():
            raise PluginError(f"plugins: {spec!r} is not a Python file (give a module name or a path to a .py file)")
        folder, name = str(path.resolve().parent), path.stem
        if folder not in sys.path:  # importable by name, so pickled configs and workers find it too
            sys.path.insert(0, folder)
        existing = os.environ.get("PYTHONPATH", "")
        if folder not in existing.split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (folder, existing) if p)
        spec = name
    try:
        importlib.import_module(spec)
    except ImportError as e:
        raise PluginError(f"plugins: cannot import {spec!r}: {e}") from e
    return spec


def load(specs: Sequence[str] | None) -> list[str]:
    """Import every plugin of ``specs`` and of ``$OPD_LAB_PLUGINS`` once; returns the module names, in order."""
    names = []
    extra = [s for s in os.environ.get(ENV, "").split(",") if s.strip()]
    for spec in [*extra, *(specs or [])]:
        spec = spec.strip()
        if spec not in _loaded:
            _loaded[spec] = _import(spec)
        names.append(_loaded[spec])
    return names


def parse_override(value: str) -> list[str]:
    """``[a,b]``, ``a`` or ``'[a, "b"]'`` (the value of a ``plugins=`` override) → ``['a', 'b']``."""
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    return [v.strip().strip("'\"") for v in value.split(",") if v.strip().strip("'\"")]


def load_from_argv(argv: Sequence[str] | None = None) -> list[str]:
    """Import the plugins named by a ``plugins=``/``+plugins=``/``++plugins=`` override of the command line (and
    ``$OPD_LAB_PLUGINS``) before Hydra composes the config. A sweep over plugin lists is not supported: every job
    of a multirun gets the union."""
    specs: list[str] = []
    for arg in sys.argv[1:] if argv is None else argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "plugins":
            specs += parse_override(value)
    try:
        return load(specs)
    except PluginError as e:
        print(f"opd-lab: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
