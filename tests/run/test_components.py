"""components.py: ``rollout.engine=auto`` resolves, before anything is written, to the engine that fits the device and
the student, and says so; a named engine is left alone."""

import json

import pytest

from opd_lab.config import Backend, ConfigError
from opd_lab.run import components
from tests.conftest import compose
from tests.test_e2e import ROOT

STUDENT = ROOT / "opd_lab/assets/embedded/student"


def test_auto_is_the_default_and_picks_the_static_engine_for_the_embedded_student_on_a_cpu():
    cfg = compose()
    assert cfg.rollout.engine == Backend.auto
    line = components.resolve_engine(cfg)
    assert cfg.rollout.engine == Backend.static and "auto → static" in line and "CPU" in line
    assert components.resolve_engine(cfg) is None  # resolved once: idempotent


def test_auto_reads_a_local_students_config(tmp_path):
    cfg = compose([f"model.student={STUDENT}"])
    components.resolve_engine(cfg)
    assert cfg.rollout.engine == Backend.static
    other = tmp_path / "llama"  # a student the static engine does not serve → HF generate, with the reason
    other.mkdir()
    conf = json.loads((STUDENT / "config.json").read_text())
    conf |= {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (other / "config.json").write_text(json.dumps(conf))
    cfg = compose([f"model.student={other}"])
    line = components.resolve_engine(cfg)
    assert cfg.rollout.engine == Backend.hf and "model_type='llama'" in line


def test_auto_on_cuda_is_vllm_when_installed(monkeypatch):
    import importlib.util

    cfg = compose()
    cfg.trainer.device = "cuda"  # the choice only: nothing is loaded
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    components.resolve_engine(cfg)
    assert cfg.rollout.engine == Backend.vllm
    cfg = compose(["rollout.max_tokens=1024"])  # vLLM's length check runs on the resolved engine
    cfg.trainer.device = "cuda"
    with pytest.raises(ConfigError, match="rollout.vllm.max_model_len"):
        components.resolve_engine(cfg)
    cfg = compose()
    cfg.trainer.device = "cuda"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    components.resolve_engine(cfg)
    assert cfg.rollout.engine == Backend.static


@pytest.mark.parametrize("name", ["hf", "static", "vllm"])
def test_a_named_engine_is_kept(name):
    cfg = compose([f"rollout.engine={name}"])
    assert components.resolve_engine(cfg) is None and cfg.rollout.engine.value == name
