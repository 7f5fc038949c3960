"""Building the embedded models: a role started from trained weights (``model.prepare.<role>_init``)."""

import json

import pytest
import torch

from opd_lab.config import ConfigError
from opd_lab.models.embedded import ASSETS, build_role, resolve_role, role_key
from tests.conftest import compose
from tests.test_e2e import TINY

PREP = [o for o in TINY if o.startswith(("model.prepare", "task."))]


def weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_init_starts_from_the_folder_and_enters_the_key(tmp_path):
    cfg = compose(PREP)
    start = tmp_path / "start"
    build_role(cfg.model.prepare, cfg.task, "teacher", start, progress=False)
    scratch_key = role_key(cfg.model.prepare, cfg.task, "teacher")
    # 1 step at a vanishing lr: the fine-tuned weights are the starting ones, not a fresh initialisation
    tuned = compose([*PREP, f"model.prepare.teacher_init={start}", "model.prepare.teacher_steps=1",
                     "model.prepare.lr=1e-12", "model.prepare.warmup_steps=0"])
    key = role_key(tuned.model.prepare, tuned.task, "teacher")
    info = build_role(tuned.model.prepare, tuned.task, "teacher", tmp_path / "tuned", progress=False)
    assert info["settings"]["init"] == json.loads((start / "prepare.json").read_text())["key"]
    a, b = weights(start), weights(tmp_path / "tuned")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-8) for k in a)
    fresh = compose([*PREP, "model.prepare.teacher_steps=1", "model.prepare.lr=1e-12", "model.prepare.warmup_steps=0"])
    build_role(fresh.model.prepare, fresh.task, "teacher", tmp_path / "fresh", progress=False)
    c = weights(tmp_path / "fresh")
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-3  # 4 SFT steps from the same seed
    # the key names the starting weights: other weights there, another key; and it differs from scratch
    assert key != scratch_key
    (start / "prepare.json").unlink()  # a plain model folder: its weight files identify it
    key_plain = role_key(tuned.model.prepare, tuned.task, "teacher")
    w = weights(start)
    w["model.norm.weight"] = w["model.norm.weight"] + 1
    from safetensors.torch import save_file

    save_file(w, start / "model.safetensors")
    assert len({key, key_plain, role_key(tuned.model.prepare, tuned.task, "teacher")}) == 3


def test_init_errors_name_the_field(tmp_path):
    cfg = compose([*PREP, f"model.prepare.student_init={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match=r"model\.prepare\.student_init=.*allowed a folder under .*teacher_long"):
        role_key(cfg.model.prepare, cfg.task, "student")
    # the shipped embedded teacher (192 wide) cannot start a 32-wide tiny teacher
    cfg = compose([*PREP, "model.prepare.teacher_init=teacher"])
    with pytest.raises(ConfigError, match=r"teacher_init='teacher': its shape differs.*hidden_size': \(32, 192\)"):
        build_role(cfg.model.prepare, cfg.task, "teacher", tmp_path / "t", progress=False)


def test_shipped_pairs_resolve_by_key(tmp_path):
    """The default pair and the long-horizon pair (experiment=long: fine-tuned from the default pair's weights)
    resolve to the shipped folders with no training."""
    for overrides, suffix in (([], ""), (["experiment=long"], "_long")):
        cfg = compose(overrides)
        for role in ("teacher", "student"):
            assert resolve_role(cfg.model.prepare, cfg.task, role, tmp_path, progress=False) == ASSETS / (role + suffix)
    long = json.loads((ASSETS / "teacher_long" / "prepare.json").read_text())
    assert long["settings"]["init"] == json.loads((ASSETS / "teacher" / "prepare.json").read_text())["key"]
    assert not (tmp_path / "embedded").exists()
