"""Which token ids are special: the loss mask's special tokens, the stop set, newline tokens.

One place decides these ids, for every engine, the learner, the evaluator and the diagnostic:

- :func:`special_token_ids`: each configured string (``model.special_tokens``) must be exactly one token of the
  tokenizer, or start-up stops with an error naming it (docs/methods.md, "Special-token masking").
- :func:`stop_token_ids`: a response ends at the first of these ids: the tokenizer's EOS and every id of the
  model's ``generation_config.eos_token_id`` (Qwen3: ``<|im_end|>`` and ``<|endoftext|>``). Both engines stop at
  exactly this set, and a response that does not end with one of them is truncated.
- :func:`special_mask_B_T`: m_t = 0 at special tokens, mode ``first`` (the first occurrence of EACH special id
  per response) or ``all`` (every occurrence).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from opd_lab.config import ConfigError


@dataclass(frozen=True)
class TokenIds:
    """The ids a run treats specially, decided once at start-up from the tokenizer and the model config."""

    special: tuple[int, ...]  # masked out of the loss (loss.mask_special)
    stop: tuple[int, ...]  # a response ends at the first of these
    newline_V: torch.Tensor  # bool [V]: tokens containing a newline (span gate), over the model's V rows

    @classmethod
    def build(cls, tokenizer, special_tokens: list[str], model_path: str | None = None) -> TokenIds:
        newline = newline_table(tokenizer)
        return cls(tuple(special_token_ids(tokenizer, special_tokens)), stop_token_ids(tokenizer, model_path),
                   padded_to(newline, model_vocab_size(model_path) if model_path is not None else None))


def model_vocab_size(model_path: str) -> int | None:
    """The model's ``vocab_size`` (its embedding rows) from its ``config.json``; None when it cannot be read."""
    local = Path(model_path).expanduser() / "config.json"
    if local.is_file():
        return json.loads(local.read_text()).get("vocab_size")
    try:
        from transformers import AutoConfig

        return getattr(AutoConfig.from_pretrained(model_path), "vocab_size", None)
    except (OSError, ValueError):
        return None


def padded_to(table_V: torch.Tensor, V: int | None) -> torch.Tensor:
    """A per-token table over the model's ``V`` rows: a model may have more rows than its tokenizer has tokens
    (Qwen3: 151,936 against 151,669); the extra ids have no text, so False."""
    if V is None or V <= table_V.shape[0]:
        return table_V
    return torch.cat([table_V, torch.zeros(V - table_V.shape[0], dtype=table_V.dtype)])


def special_token_ids(tokenizer, strings: list[str], field: str = "model.special_tokens") -> list[int]:
    """The id of each configured special string; a string that is not exactly one token is a :class:`ConfigError`."""
    ids = []
    for s in strings:
        enc = tokenizer.encode(s, add_special_tokens=False)
        if len(enc) != 1 or tokenizer.decode(enc) != s:
            raise ConfigError(f"{field}: {s!r} is not a token of the tokenizer (it encodes to {len(enc)} tokens "
                              f"{enc[:8]}); allowed: strings that are single tokens, e.g. '<think>', '</think>', "
                              f"'{tokenizer.eos_token}'")
        ids.append(int(enc[0]))
    return list(dict.fromkeys(ids))


def stop_token_ids(tokenizer, model_path: str | None = None) -> tuple[int, ...]:
    """The tokenizer's EOS id plus the model's ``generation_config.eos_token_id`` (an id or a list), sorted.

    ``model_path``: a local model folder or hub id whose ``generation_config.json`` is read when present.
    """
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    if model_path is not None:
        gen = _generation_eos(model_path)
        ids |= {int(i) for i in (gen if isinstance(gen, list) else [gen]) if i is not None}
    if not ids:
        raise ConfigError("the tokenizer has no eos_token and the model no generation_config.eos_token_id: "
                          "set model.tokenizer to a tokenizer with an end-of-sequence token")
    return tuple(sorted(ids))


def _generation_eos(model_path: str):
    local = Path(model_path).expanduser() / "generation_config.json"
    if local.is_file():
        return json.loads(local.read_text()).get("eos_token_id")
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(model_path).eos_token_id
    except (OSError, ValueError):  # no generation config (or offline): the tokenizer's EOS alone
        return None


def ends_with_stop(response_ids: list[int], stop_ids) -> bool:
    """Whether a response ended on its own (its last token is a stop id) rather than at the length cap."""
    return bool(response_ids) and response_ids[-1] in stop_ids


def token_table(tokenizer, predicate) -> torch.Tensor:
    """Bool ``[V]``: ``predicate(decoded token string)`` for every id of ``tokenizer``."""
    V = len(tokenizer)
    strings = tokenizer.convert_ids_to_tokens(list(range(V)))
    decoded = [tokenizer.convert_tokens_to_string([s]) if s is not None else "" for s in strings]
    return torch.tensor([bool(predicate(d)) for d in decoded], dtype=torch.bool)


def newline_table(tokenizer) -> torch.Tensor:
    """Bool ``[V]``: tokens whose text contains a newline (the span gate's step ends)."""
    return token_table(tokenizer, lambda s: "\n" in s)


def special_mask_B_T(response_ids_B_T: torch.Tensor, response_mask_B_T: torch.Tensor, special_ids: list[int],
                     mode: str) -> torch.Tensor:
    """1 where a sampled token is masked as special: ``all`` its occurrences, or (``first``) the first occurrence
    of each special id in each response; ``none`` masks nothing."""
    if mode == "none" or not special_ids:
        return torch.zeros_like(response_mask_B_T)
    ids_S = torch.tensor(special_ids, dtype=response_ids_B_T.dtype, device=response_ids_B_T.device)
    hit_B_T_S = (response_ids_B_T.unsqueeze(-1) == ids_S) & response_mask_B_T.bool().unsqueeze(-1)
    if mode == "all":
        return hit_B_T_S.any(-1).long()
    first_B_T_S = hit_B_T_S & (torch.cumsum(hit_B_T_S.long(), dim=1) == 1)
    return first_B_T_S.any(-1).long()
