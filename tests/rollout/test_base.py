"""rollout/base.py: every engine has its traits, looked up by the name the config allows."""

import pytest

from opd_lab.config import Backend
from opd_lab.rollout.base import ENGINES, TRAITS


def test_every_engine_of_the_config_is_registered_with_its_traits():
    engines = {b.value for b in Backend} - {"auto"}  # auto is resolved to one of them at start-up
    assert set(ENGINES.names()) == engines and set(TRAITS.names()) == engines
    assert [n for n in TRAITS.names() if TRAITS.get(n).in_memory] == ["hf", "static"]
    assert [n for n in TRAITS.names() if TRAITS.get(n).in_process_vllm] == ["vllm"]
    with pytest.raises(KeyError, match=r"available: \['hf', 'static', 'vllm'\]"):
        TRAITS.get("sglang")
