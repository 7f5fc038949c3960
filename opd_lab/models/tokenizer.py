"""A character-level tokenizer for the embedded default, built with the ``tokenizers`` library.

Every printable ASCII character and the newline is one token; the chat/special tokens of Qwen3 are single
tokens. It is saved as an ordinary HF tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json`` with a
chat template), so transformers and vLLM load it like any hub tokenizer.
"""

from __future__ import annotations

import string

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK = "<think>"
END_THINK = "</think>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]
ADDED_TOKENS = [THINK, END_THINK]

# Qwen3's layout: the generation prompt opens the assistant turn; the model writes <think> itself.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer():
    """Return a ``PreTrainedTokenizerFast`` over printable ASCII + newline + chat tokens (V = 101)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ADDED_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(ADDED_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )
    fast.padding_side = "left"
    return fast
