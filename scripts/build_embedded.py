"""Rebuild the embedded tokenizer/teacher/student shipped in ``opd_lab/assets/embedded`` from a seed.

    .venv/bin/python scripts/build_embedded.py [hydra overrides, e.g. model.prepare.seed=1]
    .venv/bin/python scripts/build_embedded.py --check     # rebuild into a temp dir, compare with the shipped

Training is deterministic on CPU with ``model.prepare.threads`` fixed (2), so the rebuild is bit-for-bit:
``--check`` compares SHA-256 of every weight file and exits non-zero on any difference.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

from opd_lab.config import register_configs, to_run_config
from opd_lab.prepare import ASSETS, build_embedded, prepare_key

ROOT = Path(__file__).resolve().parent.parent


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    overrides = [a for a in argv if a != "--check"]
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    cfg.output_dir = "unused"
    run = to_run_config(cfg)
    print(f"prepare key {prepare_key(run.model.prepare, run.task)}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="embedded-"))
    build_embedded(run.model.prepare, run.task, tmp)
    new = digests(tmp)
    print(json.dumps(new, indent=2))
    if check:
        old = digests(ASSETS)
        shutil.rmtree(tmp)
        same = old == new
        print("bit-for-bit identical to the shipped weights" if same else f"DIFFERENT from shipped: {old}")
        return 0 if same else 1
    if ASSETS.exists():
        shutil.rmtree(ASSETS)
    shutil.copytree(tmp, ASSETS)
    shutil.rmtree(tmp)
    print(f"wrote {ASSETS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
