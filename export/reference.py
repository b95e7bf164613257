"""The PyTorch reference of a served request: what the served ensemble must answer, computed without Triton.

The text features are computed as the serving text step (``serving/backends/text_step.py``) computes them:
WordPiece ids by ``amc_contract.text.wordpiece_ids`` (inside :class:`amc_model.text_encoder.TextEncoder`), the
zero vector for padded ("") keywords, lexical features by ``amc_contract.text.LexicalMatcher`` with the
checkpoint's term weights, after the query rules the checkpoint was trained with (``Checkpoint.text_rules``: from
rules 2 on, ``amc_contract.text.normalize_query`` with CLDR's emoji names, as the version's text step applies them).
Only the engine differs: the sentence encoder and the networks run in PyTorch here,
in onnxruntime there. Golden requests (``export.publish``), the integration tests and the export of the
candidate store use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from amc_contract import signatures as sig
from amc_contract.text import EmojiNames, LexicalMatcher, TermWeights, normalize_query
from amc_model.checkpoint import Checkpoint
from amc_model.model import AMCOutput


def keyword_embeddings(keywords: np.ndarray, embed: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """(..., K) keyword strings -> (..., K, E) float32: ``embed`` of each distinct string, 0 for ""."""
    distinct = sorted({k for k in keywords.reshape(-1).tolist() if k})
    vectors = embed(distinct) if distinct else np.zeros((0, sig.TEXT_EMBEDDING_DIM), np.float32)
    table = dict(zip(distinct, np.asarray(vectors, dtype=np.float32), strict=True))
    out = np.zeros((*keywords.shape, sig.TEXT_EMBEDDING_DIM), dtype=np.float32)
    for index, k in np.ndenumerate(keywords):
        if k:
            out[index] = table[k]
    return out


class Reference:
    """A checkpoint's model with the PyTorch sentence encoder and the checkpoint's term weights.

    ``emoji_names``: the table queries are normalized with where the checkpoint's text rules are 2 or more
    (default CLDR's, ``training.corpus.catalog.emoji_names``: what publish ships); None for rules 1.
    """

    def __init__(self, ckpt: Checkpoint, *, emoji_names: EmojiNames | None = None) -> None:
        from amc_model.text_encoder import TextEncoder

        self.model = ckpt.build_model()
        self.encoder = TextEncoder()
        self.matcher = LexicalMatcher(TermWeights.from_json(ckpt.term_weights))
        self.text_rules = ckpt.text_rules
        self.emoji_names = None
        if self.text_rules >= 2:
            if emoji_names is None:  # CLDR's, read by the corpus builder's CLDR parser (the corpus's names too)
                from training.corpus.catalog import emoji_names as cldr_emoji_names

                emoji_names = cldr_emoji_names()
            self.emoji_names = emoji_names if isinstance(emoji_names, EmojiNames) else EmojiNames(emoji_names)

    def queries(self, queries: Sequence[str]) -> list[str]:
        """The queries as the version's text step reads them (its text rules)."""
        if self.emoji_names is None:
            return list(queries)
        return [normalize_query(q, self.emoji_names) for q in queries]

    def text_features(self, queries: Sequence[str], keywords: np.ndarray) -> dict[str, np.ndarray]:
        """B queries and their candidates' keywords (B, N, K) ("" pads) -> query_text (B, E), keyword_embeddings
        (B, N, K, E), keyword_lexical (B, N, K, 3), keyed by the signatures' names."""
        keywords = np.asarray(keywords, dtype=object)
        queries = self.queries(queries)
        lexical = np.stack([self.matcher.features(q, kw) for q, kw in zip(queries, keywords, strict=True)])
        return {sig.QUERY_TEXT.name: self.encoder.encode(list(queries)),
                sig.KEYWORD_EMBEDDINGS.name: keyword_embeddings(keywords, self.encoder.encode_keywords),
                sig.KEYWORD_LEXICAL.name: lexical}

    @torch.no_grad()
    def __call__(self, queries: Sequence[str], regions: np.ndarray, region_mask: np.ndarray,
                 keywords: np.ndarray) -> AMCOutput:
        """The model's outputs for a raw ``amc`` request (regions (B, N, R, D), region_mask (B, N, R))."""
        text = self.text_features(queries, keywords)
        return self.model(torch.from_numpy(text[sig.QUERY_TEXT.name]), torch.from_numpy(regions),
                          torch.from_numpy(region_mask), torch.from_numpy(text[sig.KEYWORD_EMBEDDINGS.name]),
                          torch.from_numpy(text[sig.KEYWORD_LEXICAL.name]))
