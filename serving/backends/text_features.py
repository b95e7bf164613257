"""The text step's computation on one published version folder, without Triton: :class:`TextFeatures`.

The served text step (``text_step.py``, every mode) builds one at load; the benchmarks' in-process pipelines
(``benchmarks.inprocess``, ``benchmarks.search_gpu``) run it on a published version folder, so they pay the same text
cost. What it reads there (written by ``export.repository``):

    tokenizer.json       the sentence encoder's WordPiece tokenizer
    text_encoder.onnx    all-MiniLM-L6-v2 (signature TEXT_ENCODER): WordPiece ids -> unit-norm embedding (absent in
                         the search step's folder: its graph runs the encoder)
    term_weights.json    the checkpoint's IDF over the candidate collection (amc_contract.text.TermWeights)
    keyword_table.npz    raw mode: keyword strings and their embeddings, precomputed at export for the
                         training corpus's keywords (texts (U,), vectors (U, E)); may be absent or empty
    store.json           search mode: {"version", "size", "ids", "keywords": one list of strings per row}
    version.json         {"version": N, "text_rules": R} (no "text_rules": R = 1)
    emoji_names.json     from text rules 2 on: the emoji -> CLDR name table queries are normalized with

Queries are read by the text rules the version declares (``text_rules`` in ``version.json``, the rules its
checkpoint was trained with): rules 1 (versions published before rules existed) use a query as sent; rules 2 first
apply ``amc_contract.text.normalize_query`` with the version's ``emoji_names.json`` (an emoji becomes its CLDR name;
case, underscores and stray punctuation are dropped), and every output is computed from the normalized text. A
version whose rules this code does not implement is refused at load with a message naming the rules, never served
with other rules than it was trained with.

Queries are encoded by ``text_encoder.onnx`` (onnxruntime; the served step passes the providers and session options
``onnx_runner.py`` chooses). Keywords are looked up in the keyword table; a keyword missing there is encoded on the
fly and kept in a bounded cache (config parameter ``keyword_cache_size``). No query is refused for its words:
WordPiece covers any text, in any script, emoji included (one no table names is kept as text).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from amc_contract import text as amc_text

# The query rules this code implements (amc_contract.text.TEXT_RULES): 1, queries as sent; 2, normalize_query.
TEXT_RULES_IMPLEMENTED = tuple(range(1, amc_text.TEXT_RULES + 1))
DEFAULT_KEYWORD_CACHE = 20_000  # keywords encoded on the fly that are kept (384 floats each: 1.5 KB)
ENCODER_CHUNK = 256  # texts per encoder call, sorted by length so that a chunk pads little


class TextFeatures:
    """The step's computation on one published version directory, without Triton.

    ``providers``: onnxruntime execution providers for the encoder (default CPU); ``options``: its
    ``SessionOptions`` (default onnxruntime's; the served step passes ``onnx_runner.session_options``).
    ``encoder=False``: no sentence encoder (the search step's graph runs it; its folder holds no text_encoder.onnx):
    only the tokens, words and lexical matches, no embeddings.
    """

    def __init__(self, folder: str | Path, *, providers: Sequence[Any] | None = None, options: Any = None,
                 cache_size: int = DEFAULT_KEYWORD_CACHE, encoder: bool = True) -> None:
        import onnxruntime as ort

        folder = Path(folder)
        self.text_rules, self.emoji_names = self._text_rules(folder)
        self.wordpiece = amc_text.load_wordpiece((folder / "tokenizer.json").read_text(encoding="utf-8"))
        self.matcher = amc_text.LexicalMatcher(
            amc_text.TermWeights.from_json((folder / "term_weights.json").read_text(encoding="utf-8")))
        self.session = None
        self.dim = 0
        if encoder:
            self.session = ort.InferenceSession(str(folder / "text_encoder.onnx"), sess_options=options,
                                                providers=list(providers or ["CPUExecutionProvider"]))
            self.tokens_name = self.session.get_inputs()[0].name
            self.dim = int(self.session.get_outputs()[0].shape[-1])
        self.table: dict[str, np.ndarray] = {}
        if (folder / "keyword_table.npz").is_file():
            with np.load(folder / "keyword_table.npz", allow_pickle=False) as data:
                vectors = data["vectors"].astype(np.float32)
                self.table = dict(zip(data["texts"].tolist(), vectors, strict=True))
        self.cache: dict[str, np.ndarray] = {}
        self.cache_size = cache_size
        self.encoded_keywords = 0  # keywords encoded on the fly since start (table and cache misses)
        self.store_keywords: np.ndarray | None = None  # (G, K_store) strings of the store rows, "" pads
        self.store_ids: list[str] | None = None  # (G,) the store rows' ids
        if (folder / "store.json").is_file():
            store = json.loads((folder / "store.json").read_text(encoding="utf-8"))
            rows, self.store_ids = store["keywords"], store["ids"]
            self.store_keywords = np.full((len(rows), max([1, *map(len, rows)])), "", dtype=object)
            for g, row in enumerate(rows):
                self.store_keywords[g, : len(row)] = row
        # The search graph's view of the same keywords: their words numbered (amc_text.StoreWords).
        self.store_words = None if self.store_keywords is None else amc_text.StoreWords(
            self.matcher.weights, self.store_keywords.reshape(-1).tolist())

    def _text_rules(self, folder: Path) -> tuple[int, Any]:
        """The version's declared query rules and, from rules 2 on, its emoji names; a ValueError naming the rules
        where this code or its text module does not implement them."""
        declared = json.loads((folder / "version.json").read_text()) if (folder / "version.json").is_file() else {}
        rules = declared.get("text_rules", 1)
        if not isinstance(rules, int) or rules not in TEXT_RULES_IMPLEMENTED:
            raise ValueError(
                f"{folder} needs text rules {rules!r} (version.json), but this text step implements text rules "
                f"{', '.join(map(str, TEXT_RULES_IMPLEMENTED))} (its text module: {amc_text.__file__}): its model was "
                "trained to read queries by those rules, and other rules would score them otherwise; serve it with "
                "the step code of a release that implements them")
        if rules == 1:
            return rules, None
        names = folder / amc_text.EMOJI_NAMES_FILE
        if not names.is_file():
            raise ValueError(f"{folder} needs text rules {rules} but has no {names.name} (its emoji names)")
        return rules, amc_text.load_emoji_names(names.read_text(encoding="utf-8"))

    def normalize(self, queries: Sequence[str]) -> list[str]:
        """(B,) query strings as this version reads them: unchanged under text rules 1, else
        ``amc_contract.text.normalize_query`` with the version's emoji names ("" where nothing is left)."""
        if self.emoji_names is None:
            return list(queries)
        return [amc_text.normalize_query(q, self.emoji_names) for q in queries]

    def _read(self, queries: Sequence[str], normalized: bool) -> list[str]:
        return list(queries) if normalized else self.normalize(queries)

    def encode(self, texts: Sequence[str], max_tokens: int) -> np.ndarray:
        """(n,) texts -> (n, E) float32 sentence embeddings, tokenized by ``amc_contract.text.wordpiece_ids``."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        ids = amc_text.wordpiece_ids(self.wordpiece, texts, max_tokens)  # (n, L), 0 pads
        lengths = (ids > 0).sum(1)
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(texts), ENCODER_CHUNK):
            rows = order[start:start + ENCODER_CHUNK]
            out[rows] = self.session.run(None, {self.tokens_name: ids[rows, : lengths[rows].max()]})[0]
        return out

    # The query methods below read their queries by the version's text rules (:meth:`normalize`); ``normalized``:
    # the caller has already (the served step normalizes each query once, when it checks it).
    def query_text(self, queries: Sequence[str], *, normalized: bool = False) -> np.ndarray:
        """(B,) query strings -> (B, E)."""
        return self.encode(self._read(queries, normalized), amc_text.QUERY_MAX_TOKENS)

    def query_tokens(self, queries: Sequence[str], *, normalized: bool = False) -> np.ndarray:
        """(B,) query strings -> (B, L) WordPiece ids, padded as the search graph reads them."""
        return amc_text.query_tokens(self.wordpiece, self._read(queries, normalized))

    def query_words(self, queries: Sequence[str], *, normalized: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(B,) query strings -> their content words numbered as the store's, (B, W), and their IDFs, (B, W)
        (needs ``store.json``)."""
        if self.store_words is None:
            raise ValueError("this text step has no candidate store (store.json)")
        return self.store_words.query(self._read(queries, normalized))

    def keyword_vectors(self, keywords: Sequence[str]) -> np.ndarray:
        """(U,) keyword strings -> (U, E): the zero vector for "", else the table's, the cache's or a new one."""
        out = np.zeros((len(keywords), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        for i, keyword in enumerate(keywords):
            if not keyword:
                continue
            found = self.table.get(keyword)
            if found is None:
                found = self.cache.get(keyword)
            if found is None:
                missing.setdefault(keyword, []).append(i)
            else:
                out[i] = found
        if missing:
            texts = list(missing)
            vectors = self.encode(texts, amc_text.KEYWORD_MAX_TOKENS)
            self.encoded_keywords += len(texts)
            for text, vector in zip(texts, vectors, strict=True):
                out[missing[text]] = vector
                if self.cache_size > 0:
                    if len(self.cache) >= self.cache_size:  # bounded: drop the oldest entry
                        self.cache.pop(next(iter(self.cache)))
                    self.cache[text] = vector
        return out

    def keyword_embeddings(self, keywords: np.ndarray) -> np.ndarray:
        """(..., K) keyword strings ("" pads) -> (..., K, E), each distinct string looked up or encoded once."""
        distinct, inverse = np.unique(np.asarray(keywords, dtype=object).reshape(-1), return_inverse=True)
        vectors = self.keyword_vectors(distinct.tolist())
        return vectors[inverse.reshape(-1)].reshape(*np.shape(keywords), self.dim)

    def lexical(self, queries: Sequence[str], keywords: np.ndarray, *, normalized: bool = False) -> np.ndarray:
        """(B,) queries against their candidates' keywords (B, N, K) ("" pads) -> (B, N, K, 3) float32."""
        queries = self._read(queries, normalized)
        return np.stack([self.matcher.features(q, k) for q, k in zip(queries, keywords, strict=True)])
