"""A tiny character-level tokenizer built in-process (no downloads), for tests with tiny random models.

Every printable ASCII character and newline is one token; anything else is `<unk>`. With the four special
tokens the vocabulary is 100 ids, so it fits a test model with `vocab_size=128`.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
CHARS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))  # 94 visible + space + newline


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level fast tokenizer: `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3, then the characters."""
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *CHARS])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
