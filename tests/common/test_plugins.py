"""A researcher's own gate and loss from a folder outside the package (docs/extending.md), through the real CLI:
imported before composition, validated, logged, labelled and reported like a built-in one."""

import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch

from opd_lab.common import plugins
from tests.run.wandb_files import assert_history_is_metrics, read_run
from tests.test_e2e import ROOT, TINY

DOC = ROOT / "docs" / "extending.md"

LOSS_PLUGIN = '''
"""A plain importance-weighted policy gradient on the teacher−old log-ratio: a loss of my own."""
from dataclasses import dataclass

import torch
from hydra.core.config_store import ConfigStore

from opd_lab.config import LossConfig
from opd_lab.core.losses import LOSSES, LossSpec


@dataclass
class PGLossConfig(LossConfig):
    name: str = "pg"
    scale: float = 1.0


ConfigStore.instance().store(name="base_loss_pg", node=PGLossConfig)


def pg(out, scored, cfg):
    advantage = (scored.teacher_logp_B_T - scored.old_logp_B_T).detach()
    ratio = torch.exp(out.logp_B_T - scored.old_logp_B_T)
    return -cfg.scale * advantage * ratio, {"pg/advantage": advantage}


LOSSES.add("pg", LossSpec(pg))
'''


def doc_files() -> dict[str, str]:
    """The files of docs/extending.md: each fenced block whose first line is ``# file: <path>``."""
    blocks = re.findall(r"```[a-z]*\n# file: (\S+)\n(.*?)```", DOC.read_text(), flags=re.S)
    return dict(blocks)


@pytest.fixture
def folder(tmp_path):
    """The walk-through's files, and the loss plugin, in a temporary folder outside the package."""
    files = doc_files()
    assert set(files) == {"my_gates.py", "my_conf/gate/logblock.yaml"}
    for name, text in {**files, "my_loss.py": LOSS_PLUGIN, "my_conf/loss/pg.yaml":
                       "defaults:\n  - /base_loss_pg@_here_\nscale: 0.5\n"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert not str(tmp_path).startswith(str(ROOT))
    return tmp_path


def run(folder, args, check=True):
    proc = subprocess.run([sys.executable, "-m", "opd_lab", *args], cwd=folder, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "WANDB_MODE": "offline", "OPD_LAB_PLUGINS": ""})
    assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_doc_grouping_and_statistic_by_hand(folder, monkeypatch):
    """The walk-through's functions on a hand-computed case, loaded through :func:`plugins.load` by path."""
    monkeypatch.setattr(plugins, "_loaded", {})
    from opd_lab.core import gates

    monkeypatch.setattr(gates.GROUPINGS, "_entries", dict(gates.GROUPINGS._entries))
    monkeypatch.setattr(gates.REDUCERS, "_entries", dict(gates.REDUCERS._entries))
    monkeypatch.delitem(sys.modules, "my_gates", raising=False)
    assert plugins.load([str(folder / "my_gates.py")]) == ["my_gates"]
    resp = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1]])  # one left pad, 8 response tokens
    groups = gates.GROUPINGS.get("logblock")(response_mask_B_T=resp, block_size=1)
    assert groups.tolist() == [[-1, 0, 1, 1, 2, 2, 2, 2, 3]]  # [0,1) [1,3) [3,7) [7,15)
    delta = torch.tensor([[9.0, 0.3, -1.0, 2.0, 0.0, 0.0, 0.0, 0.0, -4.0]])
    m_G, cancel = gates.group_drift(delta, resp.float(), resp, "logblock", 1, None, "signed_rms")
    want = [0.0, 0.3, (2.5) ** 0.5, (2.5) ** 0.5, 0.0, 0.0, 0.0, 0.0, -4.0]
    assert torch.allclose(m_G[0], torch.tensor(want))
    assert cancel[0].tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0]  # −1.0 against a positive group drift


@pytest.mark.slow
def test_a_plugin_gate_and_loss_run_validate_log_and_report(folder, tmp_path_factory):
    """From the temporary folder: a typo in the plugin's statistic fails at start-up with the names (exit 2); a
    multirun of the plugin gate × (built-in and plugin loss) completes, logs the plugins, labels and tags each run
    by its gate and loss, and the report has their rows."""
    cache = tmp_path_factory.mktemp("cache")
    common = [*TINY, f"cache_dir={cache}", "plugins=[./my_gates.py,./my_loss.py]",
              f"hydra.searchpath=[file://{folder / 'my_conf'}]", "gate=logblock", "rollout.engine=hf"]
    bad = run(folder, [*common, "gate.reduce=signed_rsm"], check=False)
    assert bad.returncode == 2
    assert "gate.reduce='signed_rsm' is invalid: allowed one of ['max_abs', 'mean', 'signed_rms']" in bad.stderr
    helped = run(folder, [*common, "loss=pg", "--help"])  # the composed config, with the plugin's schema
    assert all(line in helped.stdout for line in ["  name: pg", "  scale: 0.5", "  kind: logblock",
                                                  "  reduce: signed_rms"]), helped.stdout

    sweep = folder / "sweep"
    run(folder, ["-m", *common, "loss=sampled_token,pg", "gate.tau=0.5,1", f"hydra.sweep.dir={sweep}"])
    labels = {}
    for job in sorted(sweep.glob("[0-9]*")):
        status = json.loads((job / "status.json").read_text())
        assert status["status"] == "completed", status
        cfg = (job / "config.yaml").read_text()
        assert "my_gates.py" in cfg and "kind: logblock" in cfg and "reduce: signed_rms" in cfg
        recs = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
        assert any("gate/cancel_rate" in r for r in recs)
        labels.setdefault(status["variant"], []).extend(recs)
        # wandb, from the offline run files: the group names the sweep and its directory, the tags the gate, the
        # loss, steps, engine and each swept override
        (offline,) = (job / "wandb").glob("offline-run-*")
        logged = read_run(offline)
        assert logged.group == f"{folder.name}/sweep"
        tau = next(line.split(": ")[1] for line in cfg.splitlines() if line.startswith("  tau: "))
        assert {"gate=logblock8-signed_rms", "steps=2", "engine=hf", f"gate.tau={float(tau):g}"} <= set(logged.tags)
        assert f"loss={status['variant'].split('-')[0]}" in logged.tags
        assert_history_is_metrics(offline, job / "metrics.jsonl")
    assert set(labels) == {"sampled_token-logblock8-signed_rms", "pg-logblock8-signed_rms"}
    assert any("pg/advantage" in r for r in labels["pg-logblock8-signed_rms"])
    out = folder / "report"
    rep = subprocess.run([sys.executable, "-m", "opd_lab.report.cli", str(sweep), "--out", str(out)], cwd=folder,
                         capture_output=True, text=True, timeout=600)
    assert rep.returncode == 0, rep.stderr[-3000:]
    table = pd.read_csv(out / "runs.csv")
    assert len(table) == 4 and (table["status"] == "completed").all()
    assert set(table["gate"]) == {"logblock8-signed_rms"} and set(table["loss"]) == {"sampled_token", "pg"}
