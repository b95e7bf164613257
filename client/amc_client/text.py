"""Text normalisation shared by training and the serving tokenizer.

Training builds its vocabulary with :func:`words`, and the Triton tokenizer step uses the same function,
so a query is split identically offline and online. Pure Python on purpose: the client and the Python
backend import it without torch.
"""

from __future__ import annotations

import re
import unicodedata

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words of ``text`` after NFKC normalisation ("Man’s hat" -> man, s, hat)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


# Caps that keep one request's tensors bounded; longer queries/keywords are truncated, not rejected.
MAX_QUERY_WORDS = 32
MAX_KEYWORD_WORDS = 8


class Tokenizer:
    """Maps text to vocabulary ids (0 pads; words outside the vocabulary are dropped)."""

    def __init__(self, vocab: list[str]) -> None:
        if not vocab or vocab[0] != "<pad>":
            raise ValueError("vocabulary must start with the padding token '<pad>'")
        self.vocab = list(vocab)
        self.index = {word: i for i, word in enumerate(self.vocab)}

    def ids(self, text: str, limit: int) -> list[int]:
        found = (self.index.get(w, 0) for w in words(text))
        return [i for i in found if i > 0][:limit]

    def encode_queries(self, texts: list[str]):
        """(B,) texts -> (B, L) int64 ids, L >= 1."""
        import numpy as np

        rows = [self.ids(t, MAX_QUERY_WORDS) for t in texts]
        out = np.zeros((len(rows), max([1, *map(len, rows)])), dtype=np.int64)
        for b, row in enumerate(rows):
            out[b, : len(row)] = row
        return out

    def encode_keywords(self, keywords):
        """(..., K) array of keyword strings ('' pads) -> (..., K, W) int64 ids, W >= 1."""
        import numpy as np

        keywords = np.asarray(keywords, dtype=object)
        flat = [self.ids(k, MAX_KEYWORD_WORDS) if k else [] for k in keywords.reshape(-1)]
        out = np.zeros((len(flat), max([1, *map(len, flat)])), dtype=np.int64)
        for i, row in enumerate(flat):
            out[i, : len(row)] = row
        return out.reshape(*keywords.shape, out.shape[-1])
