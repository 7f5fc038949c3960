"""Start-up checks of the student/teacher pair (models.py)."""

import copy

import pytest


def test_startup_tokenizer_checks(tokenizer):
    from opd_lab.config import ConfigError
    from opd_lab.models.loading import check_same_vocab

    check_same_vocab(tokenizer, copy.deepcopy(tokenizer))
    other = copy.deepcopy(tokenizer)
    other.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    with pytest.raises(ConfigError, match="vocabulary"):
        check_same_vocab(tokenizer, other)
    swapped = copy.deepcopy(tokenizer)
    swapped.pad_token = "<|im_start|>"
    with pytest.raises(ConfigError, match="pad_token_id"):
        check_same_vocab(tokenizer, swapped)
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ConfigError, match="chat templates"):
        check_same_vocab(tokenizer, templated)
