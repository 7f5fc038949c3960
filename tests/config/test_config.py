"""Every group composes; bad overrides fail at start-up with a message naming the field and allowed values."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from opd_lab.config import ConfigError, GateKind, LSMLossConfig, SampledTokenLossConfig
from tests.conftest import CONF_DIR, compose

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("group", ["loss", "gate", "rollout", "model", "task", "trainer", "logger"])
def test_every_option_composes(group):
    for f in sorted(Path(CONF_DIR, group).glob("*.yaml")):
        # a model with several teachers needs a routing rule for them (routing=single refuses two teachers)
        extra = ["routing=mixture"] if group == "model" and "teachers:" in f.read_text() else []
        cfg = compose([f"{group}={f.stem}", *extra])
        assert getattr(cfg, group) is not None


def test_every_routing_option_composes_with_two_teachers():
    for f in sorted(Path(CONF_DIR, "routing").glob("*.yaml")):
        if f.stem == "single":
            assert compose(["routing=single"]).routing.rule == "single"
            continue
        extra = ["++routing.by_tag={ops3: ops3, ops4: ops4}"] if f.stem == "per_sample" else []
        cfg = compose([f"routing={f.stem}", "model=embedded_specialists", *extra])
        assert cfg.routing.rule == f.stem and list(cfg.model.teachers) == ["ops3", "ops4"]


def test_defaults_are_lsm_block64_reuse2():
    cfg = compose()
    assert isinstance(cfg.loss, LSMLossConfig) and cfg.loss.top_k == 32
    assert cfg.gate.kind == GateKind.block and cfg.gate.block_size == 64
    assert cfg.rollout.reuse == 2
    assert isinstance(compose(["loss=sampled_token"]).loss, SampledTokenLossConfig)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("rollout.reuse=0", "rollout.reuse=0"),
        ("loss.top_k=-1", "loss.top_k=-1"),
        ("rollout.mini_batch_size=5", "divisor"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("gate.tau=-1", "gate.tau"),
        ("trainer.lr=0", "trainer.lr"),
        ("trainer.grad_accum=0", "trainer.grad_accum"),
        ("trainer.device=tpu", "trainer.device"),
        ("eval.ks=[1,16]", "eval.ks"),
        ("loss.tail=true", "loss.tail"),
        ("task.min_operands=5", "task.min_operands"),
        ("model.dtype=int8", "model.dtype"),
        ("loss.is_cap=1.0", "loss.is_cap=1.0"),
        ("loss=sampled_token loss.is_cap=0.5", "loss.is_cap=0.5"),
        ("gate=none gate.reduce=max_abs", "gate.reduce='max_abs'"),  # no gate has no statistic
        ("gate.block_size=0", "gate.block_size"),
        ("rollout.teacher_batch_tokens=-1", "rollout.teacher_batch_tokens"),
        ("trainer.compile=true trainer.loss_path=plain", "trainer.loss_path=plain"),
        ("trainer.compile=true trainer.parallel=fsdp2", "trainer.parallel=fsdp2"),
    ],
)
def test_range_errors_name_the_field(override, needle):
    with pytest.raises(ConfigError, match="allowed") as e:
        compose(override.split())
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("gate=block65", "block64"),  # unknown group option lists the available ones
        ("loss.foo=1", "loss.foo"),  # unknown key
        ("rollout.reuse=abc", "rollout.reuse"),  # wrong type
        ("rollout.engine=tgi", "hf, vllm"),  # closed choice lists its values
        ("loss.support=bad", "teacher, student, union"),
        ("loss=sampled_token loss.top_k=4", "loss.top_k"),  # key of another loss's schema
        ("loss.off_policy=clipped", "none, decoupled, masked"),
        ("loss=sampled_token loss.reward_reference=old", "behaviour, proximal, current"),
        ("gate.reference=sampler", "behaviour, proximal"),
        ("loss=lsm loss.reward_reference=current", "loss.reward_reference"),  # a sampled-token field
        ("correction=bogus", "current_decoupled"),
        ("gate=base_gate", "Could not find 'gate/base_gate'"),  # schemas are not options
        ("loss=base_loss_lsm", "Could not find 'loss/base_loss_lsm'"),
    ],
)
def test_hydra_errors_name_the_field(override, needle):
    with pytest.raises((HydraException, OmegaConfBaseException)) as e:
        compose(override.split())
    text = str(e.value) + str(getattr(e.value, "__cause__", ""))
    assert needle in text


def test_smoke_test_sizes_run_on_the_defaults():
    """``trainer.steps=2 eval.n_samples=2`` composes: the unset warm-up and ks shrink to fit (an explicit value that
    does not fit is still refused); a full-size run keeps warm-up 3 and pass@1/pass@8."""
    small = compose(["trainer.steps=2", "eval.n_samples=2"])
    assert (small.trainer.warmup_steps, small.eval.ks) == (1, [1, 2])
    full = compose([])
    assert (full.trainer.warmup_steps, full.eval.ks) == (3, [1, 8])
    assert compose(["trainer.steps=1", "eval.n_samples=1"]).eval.ks == [1]
    assert compose(["trainer.steps=1"]).trainer.warmup_steps == 0
    for bad in (["trainer.steps=2", "trainer.warmup_steps=3"], ["eval.n_samples=2", "eval.ks=[1,8]"]):
        with pytest.raises(ConfigError, match="allowed"):
            compose(bad)


def test_help_lists_options_and_no_schema():
    """``--help`` lists each group's YAML options; the structured-config schemas (``base_*``) are not options."""
    proc = subprocess.run([sys.executable, "-m", "opd_lab", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gate: block128, block32, block64, none, sequence, span, token" in proc.stdout
    assert not re.search(r"\bbase_(gate|loss|rollout|config|trainer|task|model)", proc.stdout)


def test_cli_bad_override_fails_before_loading_models(tmp_path):
    """The real CLI: exit code 2, a one-line message, no traceback and no model work."""
    proc = subprocess.run(
        [sys.executable, "-m", "opd_lab", "rollout.reuse=0", f"cache_dir={tmp_path}/cache",
         f"hydra.run.dir={tmp_path}/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "rollout.reuse=0 is invalid: allowed an integer >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_lsm_tail_with_a_log_space_mixture_of_teachers_is_refused():
    """The geometric mixture Π_i q_i^{w_i} is not normalised, so its tail bucket is not a probability: refused at
    start-up; a probability-space mixture, or one teacher, is fine."""
    tail = ["loss=lsm", "loss.renormalise=false", "loss.tail=true"]
    for rule in ("mixture", "alignment"):
        with pytest.raises(ConfigError, match="routing.mixture_space=prob") as e:
            compose([*tail, "model=embedded_specialists", f"routing={rule}"])
        assert str(e.value).startswith("loss.tail=True is invalid")
    assert compose([*tail, "model=embedded_specialists", "routing=mixture", "routing.mixture_space=prob"]).loss.tail
    assert compose(tail).loss.tail


def test_a_correction_on_a_synchronous_run_says_it_is_a_no_op():
    from opd_lab.config import staleness_notes

    assert staleness_notes(compose()) == []
    notes = staleness_notes(compose(["loss=sampled_token", "correction=masked", "gate.reference=proximal"]))
    assert notes == ["loss.off_policy=masked, gate.reference=proximal: a no-op with rollout.staleness=0 "
                     "(π_prox = π_b); the run equals the uncorrected one"]
    assert "reuse drift" in staleness_notes(compose(["loss=sampled_token", "correction=current_decoupled"]))[-1]
    assert staleness_notes(compose(["correction=decoupled", "rollout.staleness=1"])) == []  # LSM: safe as it is
    warn = staleness_notes(compose(["loss=sampled_token", "rollout.staleness=2"]))
    assert len(warn) == 1 and "correction=current_decoupled" in warn[0]
    assert staleness_notes(compose(["loss=sampled_token", "rollout.staleness=2", "correction=current_decoupled"])) == []
