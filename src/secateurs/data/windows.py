"""Documents -> one token stream -> fixed-length windows for calibration (random) and evaluation (contiguous).

The stream is every document tokenised without special tokens, with the tokenizer's EOS between
documents (nothing between them if it has no EOS). Streams are cached in memory per tokenizer and
document content, since tokenising the ~600k-token default text takes seconds.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict

import torch

from secateurs.data.text import fingerprint
from secateurs.errors import DataError

log = logging.getLogger(__name__)

_STREAM_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_STREAM_CACHE_SIZE = 8  # a few (tokenizer, text) pairs: calib + eval of one or two runs


def _tokenizer_key(tokenizer) -> tuple:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha1(repr(sorted(vocab.items())).encode("utf-8")).hexdigest()[:16]
    return (getattr(tokenizer, "name_or_path", ""), len(tokenizer), h, tokenizer.eos_token_id)


def token_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """1-D LongTensor: all documents tokenised (no special tokens), EOS between documents. Cached."""
    key = (_tokenizer_key(tokenizer), fingerprint(docs))
    hit = _STREAM_CACHE.get(key)
    if hit is not None:
        _STREAM_CACHE.move_to_end(key)
        return hit
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError("no text to tokenise")
    ids_per_doc = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i, doc_ids in enumerate(ids_per_doc):
        if i and eos is not None:
            ids.append(eos)
        ids.extend(doc_ids)
    stream = torch.tensor(ids, dtype=torch.long)
    _STREAM_CACHE[key] = stream
    while len(_STREAM_CACHE) > _STREAM_CACHE_SIZE:
        _STREAM_CACHE.popitem(last=False)
    return stream


def _check_shape(n: int, seq_len: int) -> None:
    if n < 1:
        raise DataError(f"number of windows must be at least 1, got {n}")
    if seq_len < 2:
        raise DataError(f"sequence length must be at least 2 (one input and one target), got {seq_len}")


def sample_windows(tokenizer, docs: list[str], n: int, seq_len: int, seed: int) -> torch.Tensor:
    """`n` non-overlapping windows of `seq_len` tokens at seeded random positions: LongTensor [n, seq_len].

    The free tokens (stream length minus n * seq_len) are spread as random gaps between the windows, so
    every placement of non-overlapping windows is possible; the windows are then shuffled. Same tokenizer,
    text and seed give the same windows.
    """
    _check_shape(n, seq_len)
    stream = token_stream(tokenizer, docs)
    need = n * seq_len
    if need > stream.numel():
        raise DataError(
            f"{n} windows of {seq_len} tokens need {need} tokens, but the text has only {stream.numel()}; "
            "use fewer/shorter windows or more text"
        )
    g = torch.Generator().manual_seed(seed)
    slack = stream.numel() - need
    gaps = torch.sort(torch.randint(0, slack + 1, (n,), generator=g)).values
    starts = gaps + torch.arange(n) * seq_len
    starts = starts[torch.randperm(n, generator=g)]
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def eval_windows(tokenizer, docs: list[str], seq_len: int, max_tokens: int = 32768) -> torch.Tensor:
    """Contiguous non-overlapping windows from the start of the stream: LongTensor [k, seq_len].

    k = max_tokens // seq_len (at least 1), fewer if the text is shorter. Deterministic.
    """
    _check_shape(1, seq_len)
    if max_tokens < 1:
        raise DataError(f"max_tokens must be at least 1, got {max_tokens}")
    stream = token_stream(tokenizer, docs)
    want = max(1, max_tokens // seq_len)
    k = min(want, stream.numel() // seq_len)
    if k == 0:
        raise DataError(
            f"one evaluation window of {seq_len} tokens needs {seq_len} tokens, but the text has only "
            f"{stream.numel()}"
        )
    if k < want:
        log.warning("evaluation text gives %d windows of %d tokens, not the %d asked for", k, seq_len, want)
    return stream[: k * seq_len].view(k, seq_len).clone()
