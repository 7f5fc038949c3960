"""Rebuild the embedded tokenizer/teacher/student shipped in ``opd_lab/assets/embedded`` from a seed.

    .venv/bin/python scripts/build_embedded.py [hydra overrides, e.g. model.prepare.seed=1]
    .venv/bin/python scripts/build_embedded.py --check     # rebuild into a temp dir, compare with the shipped
    .venv/bin/python scripts/build_embedded.py --student-only   # (or --teacher-only) one role
    .venv/bin/python scripts/build_embedded.py model=embedded_specialists --specialists [--check]
        # the teachers of model.teachers trained on a slice of the task → assets/embedded/teacher_<name>
    .venv/bin/python scripts/build_embedded.py experiment=long [--check]
        # the long-horizon pair (model=embedded_long, task=arith_long) → assets/embedded/{teacher,student}_long

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
from opd_lab.models.embedded import ASSETS, ROLES, build_role, role_key
from opd_lab.models.loading import train_slice_task

ROOT = Path(__file__).resolve().parent.parent


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    overrides = [a for a in argv if not a.startswith("--")]
    if "--specialists" in argv and not any(o.lstrip("+").startswith("routing") for o in overrides):
        overrides.append("routing=mixture")   # several teachers need a multi-teacher rule; the build ignores it
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    cfg.output_dir = "unused"
    run = to_run_config(cfg)
    # (folder name under assets/embedded, role, the task it is trained on)
    if "--specialists" in argv:
        builds = [(f"teacher_{name}", "teacher", train_slice_task(run.task, spec))
                  for name, spec in run.model.teachers.items() if spec.model == "embedded" and spec.train_slice]
        if not builds:
            print("no embedded teacher with a train_slice in model.teachers (try model=embedded_specialists)")
            return 2
    else:
        suffix = "" if run.model.name == "embedded" else "_" + run.model.name.removeprefix("embedded_")
        builds = [(r + suffix, r, run.task) for r in [r for r in ROLES if f"--{r}-only" in argv] or list(ROLES)]
    status = 0
    for folder, role, task in builds:
        print(f"{folder}: key {role_key(run.model.prepare, task, role)}", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"embedded-{folder}-"))
        build_role(run.model.prepare, task, role, tmp)
        new = digests(tmp)
        print(json.dumps(new, indent=2))
        if check:
            old = digests(ASSETS / folder)
            same = old == new
            print(f"{folder}: " + ("bit-for-bit identical to the shipped weights" if same else f"DIFFERENT: {old}"))
            status |= 0 if same else 1
        else:
            shutil.rmtree(ASSETS / folder, ignore_errors=True)
            ASSETS.mkdir(parents=True, exist_ok=True)
            shutil.copytree(tmp, ASSETS / folder)
            print(f"wrote {ASSETS / folder}")
        shutil.rmtree(tmp)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
