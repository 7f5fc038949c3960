"""Writes that a kill at any moment cannot leave half done: into a temporary name, then renamed into place.

A reader sees the old file (or folder) or the new one, never a partial one: ``os.replace`` is atomic on one file
system. :func:`write_text` for files, :func:`replace_dir` to move a finished temporary folder over its target.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through ``<path>.tmp`` and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under ``folder`` to disk (before a rename makes the folder visible)."""
    for f in Path(folder).rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the finished folder ``tmp`` to ``final``, replacing any folder there (moved aside first, then
    deleted, so ``final`` is at every moment the old folder or the new one)."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
