"""Special-token ids and masks, the stop set (tokens.py)."""

import pytest
import torch


def test_special_token_masking(tokenizer):
    """Mode ``first`` masks the first occurrence of EACH special id (docs/methods.md), ``all`` every occurrence."""
    from opd_lab.models.token_ids import special_mask_B_T, special_token_ids

    ids = tokenizer.convert_tokens_to_ids
    im_end, think, end_think, x = ids("<|im_end|>"), ids("<think>"), ids("</think>"), ids("x")
    special = special_token_ids(tokenizer, ["<think>", "</think>", "<|im_end|>"])
    assert special == [think, end_think, im_end]
    resp = torch.tensor([[think, x, think, end_think, x, im_end, 0], [x, end_think, x, im_end, x, im_end, x]])
    rmask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    first = special_mask_B_T(resp, rmask, special, "first")
    assert first.tolist() == [[1, 0, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 0, 0]]
    every = special_mask_B_T(resp, rmask, special, "all")
    assert every.tolist() == [[1, 0, 1, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1, 0]]
    assert special_mask_B_T(resp, rmask, special, "none").sum() == 0
    padded = special_mask_B_T(torch.tensor([[x, im_end]]), torch.tensor([[1, 0]]), special, "all")
    assert padded.tolist() == [[0, 0]]  # padding is never a special token


def test_special_strings_must_be_tokens(tokenizer):
    """A configured string that is no token of the tokenizer stops start-up with an error naming it."""
    from opd_lab.config import ConfigError
    from opd_lab.models.token_ids import special_token_ids

    with pytest.raises(ConfigError, match=r"model.special_tokens: 'think' is not a token"):
        special_token_ids(tokenizer, ["<|im_end|>", "think"])
    assert special_token_ids(tokenizer, ["<"]) == [tokenizer.convert_tokens_to_ids("<")]  # a real (char) token


def test_token_tables_cover_every_row_of_a_model_larger_than_its_tokenizer(tokenizer, tmp_path):
    """Qwen3 has 151,936 embedding rows for 151,669 tokens: an id past the tokenizer has no text (no newline),
    and indexing the table with it must not fail."""
    import json

    from opd_lab.models.token_ids import TokenIds, newline_table

    base = newline_table(tokenizer)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": len(tokenizer) + 27}))
    ids = TokenIds.build(tokenizer, ["<|im_end|>"], str(tmp_path))
    assert ids.newline_V.shape == (len(tokenizer) + 27,)
    assert torch.equal(ids.newline_V[: len(tokenizer)], base) and not ids.newline_V[len(tokenizer):].any()
    assert base.any()  # the tokenizer has newline tokens: the prefix comparison means something
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": len(tokenizer)}))
    assert torch.equal(TokenIds.build(tokenizer, ["<|im_end|>"], str(tmp_path)).newline_V, base)
