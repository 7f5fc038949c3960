import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose(overrides=()):
    """Compose the app config with Hydra's compose API and validate it into dataclasses."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from opd_lab.config import register_configs, to_run_config

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=False)
    cfg.output_dir = "/tmp/unused"
    return to_run_config(cfg)


@pytest.fixture(scope="session")
def tokenizer():
    from opd_lab.models.tokenizer import build_tokenizer

    return build_tokenizer()


def tiny_model(tokenizer, hidden=32, layers=1, seed=0):
    from transformers import Qwen3ForCausalLM

    from opd_lab.config import EmbeddedModelSize
    from opd_lab.models.embedded import qwen3_config

    torch.manual_seed(seed)
    m = Qwen3ForCausalLM(qwen3_config(EmbeddedModelSize(hidden, 2 * hidden, layers, 2, 1, 32), tokenizer))
    return m.eval()
