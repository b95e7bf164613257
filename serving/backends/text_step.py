"""The text step of the ensembles: query and keyword strings to what the steps after it read (sentence-encoder
features and lexical matches; for the fused store graphs, the query's tokens and numbered words).

One module, three Triton models: the ``model.py`` of ``amc_tokenizer/<N>/`` (config parameter ``mode: raw``) and of
``amc_search_step/<N>/`` (``mode: search``: the whole of ``amc_search`` in this one step, whose logic is
``search.py``'s functions) imports :class:`TritonPythonModel` from here, as the benchmarks' ``amc_store_tokenizer/<N>/``
does (``mode: store``: the text step of their store ensembles, ``benchmarks.store_models``). A version folder holds
(written by ``export.repository``):

    model.py             Triton's entry: this folder first on sys.path, then ``from amc_steps.text_step import ...``
    amc_steps/           this package as published (``onnx_runner.py``: provider choice and error responses;
                         ``search.py``: the request rules every mode reads queries by, search mode's logic;
                         ``top_k.py``: the top_k rule; ``admission.py``: the in-flight counter; ``static_shapes.py``:
                         the search graph's fixed-shape copies for CUDA graphs)
    amc_contract/        the contract as published: ``text.py`` (WordPiece ids, words, IDF term weights, lexical
                         matches, query normalization), ``signatures.py`` (the bounds), ``RequestError``
    tokenizer.json       the sentence encoder's WordPiece tokenizer
    text_encoder.onnx    all-MiniLM-L6-v2 (signature TEXT_ENCODER): WordPiece ids -> unit-norm embedding
    term_weights.json    the checkpoint's IDF over the candidate collection (amc_contract.text.TermWeights)
    keyword_table.npz    raw mode: keyword strings and their embeddings, precomputed at export for the
                         training corpus's keywords (texts (U,), vectors (U, E)); may be absent or empty
    store.json           store and search modes: {"version", "size", "ids", "keywords": one list of strings per row}
    search_store.onnx    search mode: the search graph (no text_encoder.onnx: the graph runs the encoder)
    version.json         {"version": N, "text_rules": R} (no "text_rules": R = 1)
    emoji_names.json     from text rules 2 on: the emoji -> CLDR name table queries are normalized with

Tensors (names and order from config.pbtxt, generated from ``amc_contract.signatures``)::

    raw    in:  query BYTES [B, 1], keywords BYTES [B, N, K] ("" pads), region_mask BOOL [B, N, R]
           out: query_text FP32 [B, E], keyword_embeddings FP32 [B, N, K, E] (zero vector on padding),
                keyword_lexical FP32 [B, N, K, 3], tokenizer_version INT64 [B, 1]
    store  in:  query BYTES [B, 1], candidate_ids INT64 [B, N] (optional: absent, every row of the store),
                top_k INT64 [B, 1] (optional)
           out: query_text FP32 [B, E], keyword_lexical FP32 [B, N, K_store, 3] (for the stored rows' keywords),
                tokenizer_version INT64 [B, 1], candidate_rows INT64 [B, N] (the rows scored),
                search_k INT64 [B, 1] (top_k, checked: 1 <= top_k <= N and one value per request; else N),
                query_tokens INT64 [B, L] (WordPiece ids, 0 padded to a multiple of 16),
                query_words INT64 [B, W], query_word_weights FP32 [B, W] (the query's content words numbered as
                the store's keyword words, amc_text.StoreWords, and their IDFs; -1 and 0 padded to a multiple of 8)

    search in:  as store; out: scores FP32 [B, k], modality_weights FP32 [B, k, 2], region_attention FP32 [B, k, R],
                keyword_attention FP32 [B, k, K_store], model_version INT64 [B, 1], candidate_index INT64 [B, k] (store
                rows, best first), stored_ids BYTES [B, k], stored_keywords BYTES [B, k, K_store]

Search mode is one Python step per request (issue 23): it checks the request as store mode does, tokenizes, and runs
the search graph itself; the dynamic batcher's requests that search as many rows share graph calls. It takes no slot
of an in-flight counter (nothing after it would free one): its own queue's bound (Triton's) refuses the excess. Here
it only moves tensors: ``search.py`` checks, tokenizes, runs the graph and cuts the answers, as
functions of numpy arrays; each request gets the outputs it asked for.

Store mode (the benchmarks' ``amc_store`` and ``amc_store_fused``) computes only the outputs a request's ensemble
maps (``requested_output_names``): the 5-step ``amc_store`` reads the query's embedding and the lexical features (its
networks take them); the fused store graph (``amc_store_fused``; the search graph likewise) runs the sentence encoder
and the lexical match itself, on the GPU where there is one, so for it this step only tokenizes: no encoder call,
nothing per candidate.
Token and word widths are padded so that requests of similar queries have equal shapes, which Triton's
dynamic batcher needs to merge them into one execution of the graph.

For ``amc_store``, store mode computes the lexical features with ``amc_text.KeywordIndex`` (the store's keywords
indexed by word at load): one pass over the postings of the query's words and numpy gathers, not a Python loop over
every stored keyword. Its ids are bounded by the store (each row at most once), not by ``max_candidates``.

Queries are read by the text rules the version declares (``text_rules`` in ``version.json``, the rules its
checkpoint was trained with): rules 1 (versions published before rules existed) use a query as sent; rules 2 first
apply ``amc_contract.text.normalize_query`` with the version's ``emoji_names.json`` (an emoji becomes its CLDR name;
case, underscores and stray punctuation are dropped), and every output is computed from the normalized text. A
version whose rules this code does not implement is refused at load with a message naming the rules
(:class:`TextFeatures`), never served with other rules than it was trained with.

Queries are encoded by ``text_encoder.onnx`` (onnxruntime, CUDA provider when available, chosen as
``onnx_runner.py`` chooses). Keywords are looked up in the keyword table; a keyword missing there is encoded
on the fly and kept in a bounded cache (config parameter ``keyword_cache_size``). No query is refused for its
words: WordPiece covers any text, in any script, emoji included (one no table names is kept as text). Refused, with
Triton's INVALID_ARGUMENT and a message naming the problem: an empty or whitespace-only query, a query that
normalizes to nothing (text rules 2: only punctuation and spaces, e.g. "?!"), an empty candidate set, text that is not UTF-8,
candidate ids outside the store or repeated, tensors of inconsistent shapes, and a request over one of the bounds of
``amc_contract.signatures`` (given to this step as config parameters, the limit named in the message):
``max_candidates`` per query, ``max_query_bytes``, ``max_keywords`` slots per candidate, ``max_keyword_words``
and ``max_keyword_bytes`` per keyword.

Overload: each valid request takes a slot of its version's in-flight counter (``admission.py``; config parameters
``admission``, ``max_in_flight``, ``in_flight_expiry_s``), freed by the top-k step at the end of the ensemble;
with ``max_in_flight`` taken, the request is answered UNAVAILABLE "overloaded: ... in flight" at once instead of
waiting in the slow steps' queues. Refusals and the caller's mistakes are sent through each request's response
sender before the batch's admitted queries are encoded (their places in ``execute``'s list are None), so that
a refusal never waits for the encoder. Only raw mode counts: the store and search modes' ensembles end in no step
that frees a slot (search answers in this step; the benchmarks' ``amc_store`` and ``amc_store_fused`` in an ONNX
step).

With dynamic batching Triton hands several requests to one :meth:`TritonPythonModel.execute`: the queries of
those that ask for the query's embedding are encoded in one encoder call; each request is validated and answered
on its own, and the instance never raises out of ``execute``. :class:`TextFeatures` is the step without Triton: the benchmarks' in-process
pipelines run it on a published version directory, so they pay the same text cost.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from amc_contract import RequestError
from amc_contract import signatures as sig
from amc_contract import text as amc_text

from . import search as search_logic
from .admission import InFlight, counter_path, remove_stale
from .onnx_runner import coded_response, error_response, execution_providers, session_options

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (benchmarks, tests): TextFeatures only
    pb_utils = None

MODES = ("raw", "store", "search")
# (data_type, rank after the batch dim) of the step's tensors, in the signatures' order; names come from config.
_KINDS = {
    "search": ((("TYPE_STRING", 1), ("TYPE_INT64", 1), ("TYPE_INT64", 1)),
               (("TYPE_FP32", 1), ("TYPE_FP32", 2), ("TYPE_FP32", 2), ("TYPE_FP32", 2), ("TYPE_INT64", 1),
                ("TYPE_INT64", 1), ("TYPE_STRING", 1), ("TYPE_STRING", 2))),
    "raw": ((("TYPE_STRING", 1), ("TYPE_STRING", 2), ("TYPE_BOOL", 2)),
            (("TYPE_FP32", 1), ("TYPE_FP32", 3), ("TYPE_FP32", 3), ("TYPE_INT64", 1))),
    "store": ((("TYPE_STRING", 1), ("TYPE_INT64", 1), ("TYPE_INT64", 1)),
              (("TYPE_FP32", 1), ("TYPE_FP32", 3), ("TYPE_INT64", 1), ("TYPE_INT64", 1), ("TYPE_INT64", 1),
               ("TYPE_INT64", 1), ("TYPE_INT64", 1), ("TYPE_FP32", 1))),
}
# The query rules this code implements (amc_contract.text.TEXT_RULES): 1, queries as sent; 2, normalize_query.
TEXT_RULES_IMPLEMENTED = tuple(range(1, amc_text.TEXT_RULES + 1))
DEFAULT_KEYWORD_CACHE = 20_000  # keywords encoded on the fly that are kept (384 floats each: 1.5 KB)
ENCODER_CHUNK = 256  # texts per encoder call, sorted by length so that a chunk pads little


_decode = search_logic.decode


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
        if (folder / "store.json").is_file():
            rows = json.loads((folder / "store.json").read_text(encoding="utf-8"))["keywords"]
            self.store_keywords = np.full((len(rows), max([1, *map(len, rows)])), "", dtype=object)
            for g, row in enumerate(rows):
                self.store_keywords[g, : len(row)] = row
        self._store_index: Any = None  # built on first use: only amc_store's lexical features read it
        # The fused store graphs' view of the same keywords: their words numbered (amc_text.StoreWords).
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
        """(B,) query strings -> (B, L) WordPiece ids, padded as the fused store graphs read them."""
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

    def store_lexical(self, queries: Sequence[str], ids: np.ndarray | None, *, normalized: bool = False) -> np.ndarray:
        """(B,) queries against the stored rows ``ids`` (B, N), None for every row -> (B, N, K_store, 3) float32
        (needs ``store.json``); equal to ``lexical(queries, store_rows(ids))``, through the store's keyword index."""
        if self.store_keywords is None:
            raise ValueError("this text step has no candidate store (store.json)")
        if self._store_index is None:
            self._store_index = amc_text.KeywordIndex(self.matcher, self.store_keywords)
        queries = self._read(queries, normalized)
        rows = [None] * len(queries) if ids is None else ids
        features = [self._store_index.features(q, row) for q, row in zip(queries, rows, strict=True)]
        return features[0][None] if len(features) == 1 else np.stack(features)  # one query: no copy

    def store_rows(self, ids: np.ndarray) -> np.ndarray:
        """(B, N) store rows -> their keyword strings (B, N, K_store), "" pads (needs ``store.json``)."""
        if self.store_keywords is None:
            raise ValueError("this text step has no candidate store (store.json)")
        return self.store_keywords[ids]


@dataclass
class _Parsed:
    """One request after validation: its query texts and its candidates."""

    texts: list[str]  # normalized by the version's text rules (TextFeatures.normalize)
    keywords: np.ndarray | None = None  # raw: (B, N, K) decoded keyword strings
    ids: np.ndarray | None = None  # store: (B, N) candidate ids
    whole_store: bool = False  # store: no ids were sent, ``ids`` is every row
    top_k: int | None = None  # store: the request's top_k, checked against N
    counted: bool = True  # takes a slot of the in-flight counter (its ensemble ends in a top-k step)
    wants: frozenset[str] | None = None  # store: the outputs its ensemble maps (None: every output)

    def asks(self, name: str) -> bool:
        return self.wants is None or name in self.wants


class _Overloaded(Exception):
    """A valid request refused by admission control: answered UNAVAILABLE with this message."""


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.model_name = args["model_name"]
        self.mode = params.get("mode", "")
        if self.mode not in MODES:
            raise ValueError(f"{self.model_name}: config parameter mode must be one of {MODES}, got {self.mode!r}")
        kinds_in, kinds_out = _KINDS[self.mode]
        self.input_names = self._names(config, "input", kinds_in)
        self.output_names = self._names(config, "output", kinds_out)
        here = Path(args["model_repository"]) / args["model_version"]
        self.version = int(json.loads((here / "version.json").read_text())["version"])
        if str(self.version) != args["model_version"]:
            # The version a response reports must be the directory Triton loaded, or MTN's check means nothing.
            raise ValueError(f"{self.model_name}: version.json says {self.version} but the directory is "
                             f"{args['model_version']}")
        bounds = {k: int(params.get(k) or v) for k, v in sig.REQUEST_BOUNDS.items()}  # the config's, else these
        self.max_candidates = bounds["max_candidates"]
        self.max_query_bytes = bounds["max_query_bytes"]
        self.max_keywords = bounds["max_keywords"]
        self.max_keyword_words = bounds["max_keyword_words"]
        self.max_keyword_bytes = bounds["max_keyword_bytes"]
        searching = self.mode == "search"
        self.features = TextFeatures(
            here, providers=execution_providers(params, args, self.model_name),
            options=session_options(params, self.model_name),
            cache_size=int(params.get("keyword_cache_size") or DEFAULT_KEYWORD_CACHE), encoder=not searching)
        if not searching and self.features.dim != config["output"][0]["dims"][0]:
            raise ValueError(f"{self.model_name}: text_encoder.onnx gives {self.features.dim}-d embeddings, the "
                             f"config declares {config['output'][0]['dims'][0]}")
        detail = f"{len(self.features.table)} keywords precomputed"
        # The version's query reading (and, over a store, the search graph's query features).
        self.queries = search_logic.QueryText(
            self.features.wordpiece, self.features.store_words, self.features.emoji_names,
            tokenizer_json=(here / "tokenizer.json").read_text(encoding="utf-8"))
        if self.mode != "raw":
            store = self.features.store_keywords
            if store is None:
                raise ValueError(f"{self.model_name}: mode store needs store.json in {here}")
            detail = f"store of {len(store)} candidates, {store.shape[1]} keyword slots each"
            # top_k's checks are the top-k step's (top_k.check_top_k): INVALID_ARGUMENT here.
            self.rules = search_logic.Rules(
                names=tuple(self.input_names), version=self.version, store_size=len(store),
                max_query_bytes=self.max_query_bytes, normalize=self.queries.normalize,
                text_rules=self.features.text_rules)
        if searching:
            self.search_module = search_logic
            self.search = search_logic.SearchGraph(here, params, args, self.model_name)
            self.strings = search_logic.StoreStrings.of((here / "store.json").read_text(encoding="utf-8"))
            self.bytes = search_logic.SerializedBytes(pb_utils)
            detail += f", {self.search.describe()}"
        self.in_flight = None
        self.early_refusals = True  # answered through the response sender (_answer_now) until a stub lacks it
        self.max_in_flight = int(params.get("max_in_flight") or 0)
        counter = params.get("admission", "")
        if counter and self.max_in_flight > 0:
            remove_stale()
            self.in_flight = InFlight(counter_path(Path(args["model_repository"]).parent, counter, self.version),
                                      limit=self.max_in_flight, expiry_s=float(params.get("in_flight_expiry_s") or 30))
            detail += f", at most {self.max_in_flight} requests in flight ({self.in_flight.path})"
        encoder = self.features.session.get_providers() if self.features.session is not None else "the graph"
        pb_utils.Logger.log_info(f"{self.model_name} v{self.version} ({self.mode}): {detail}, encoder on "
                                 f"{encoder}, text rules "
                                 f"{self.features.text_rules} from {amc_text.__file__}")

    def _names(self, config: dict[str, Any], kind: str, expected: tuple[tuple[str, int], ...]) -> list[str]:
        """Tensor names of ``config[kind]`` after checking their count, dtypes and ranks match the mode."""
        tensors = config.get(kind, [])
        found = tuple((t["data_type"], len(t.get("dims", []))) for t in tensors)
        if found != expected:
            raise ValueError(f"{self.model_name}: config {kind}s {[t['name'] for t in tensors]} have (dtype, rank) "
                             f"{found}; the {self.mode} text step needs {expected}")
        return [t["name"] for t in tensors]

    # ---- serving ---------------------------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> list[Any]:
        if self.mode == "search":
            return self._search(requests)
        parsed: list[_Parsed | Exception] = []
        for request in requests:
            try:
                parsed.append(self._parse(request))
            except Exception as e:  # noqa: BLE001 - any problem is this request's error, never the instance's
                parsed.append(e)
        parsed = self._admit(parsed)
        # Refusals (overload, the caller's mistakes) are answered now, through each request's response sender,
        # not after the batch's queries are encoded: under overload the encoding of the admitted requests
        # would otherwise hold every rejection of the batch. Their place in the returned list is None.
        answered = [self._answer_now(r, p) for r, p in zip(requests, parsed, strict=True)]
        # One encoder call for the queries of every request that asks for their embedding (the fused store
        # ensembles do not: their graph runs the encoder).
        encoded = [isinstance(p, _Parsed) and p.asks(self.output_names[0]) for p in parsed]
        texts = [t for p, e in zip(parsed, encoded, strict=True) if e for t in p.texts]
        try:
            query_text = self.features.query_text(texts, normalized=True)
        except Exception as e:  # noqa: BLE001
            self._release(sum(isinstance(p, _Parsed) and p.counted for p, x in zip(parsed, encoded) if x))
            parsed = [e if x else p for p, x in zip(parsed, encoded, strict=True)]
        responses, start = [], 0
        for p, done, e in zip(parsed, answered, encoded, strict=True):
            if done:
                responses.append(None)
                continue
            if isinstance(p, Exception):
                responses.append(self._refusal(p))
                continue
            try:
                responses.append(self._respond(p, query_text[start:start + len(p.texts)] if e else None))
            except Exception as x:  # noqa: BLE001
                self._release(int(p.counted))  # admitted, but it goes no further
                responses.append(self._error(x))
            start += len(p.texts) if e else 0
        return responses

    def _answer_now(self, request: Any, parsed: _Parsed | Exception) -> bool:
        """Send a refused request's error at once (its one response, final); False for a request that goes on
        to be encoded, or where the response sender cannot be used (then :meth:`execute` returns the error)."""
        if not isinstance(parsed, Exception) or not self.early_refusals:
            return False
        try:
            sender = request.get_response_sender()
            final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        except Exception as e:  # noqa: BLE001 - a stub without senders: answer with the batch from now on
            self.early_refusals = False
            pb_utils.Logger.log_warn(f"{self.model_name}: refusals are answered with their batch ({e})")
            return False
        try:
            sender.send(self._refusal(parsed), flags=final)
        except Exception as e:  # noqa: BLE001
            # The sender may count the response as sent before it fails: a second response for this request
            # would fail the whole batch, so none is returned for it.
            pb_utils.Logger.log_warn(f"{self.model_name}: a refusal could not be sent ({e})")
        return True

    def _refusal(self, error: Exception) -> Any:
        """The error response of a refused request: UNAVAILABLE for overload, else as :meth:`_error` says."""
        if isinstance(error, _Overloaded):
            return coded_response(str(error), "UNAVAILABLE")
        return self._error(error)

    def _admit(self, parsed: list[_Parsed | Exception]) -> list[_Parsed | Exception]:
        """Take a slot of the in-flight counter for each valid request that counts; the requests beyond the
        limit become :class:`_Overloaded` (answered UNAVAILABLE, never encoded)."""
        counted = [i for i, p in enumerate(parsed) if isinstance(p, _Parsed) and p.counted]
        if self.in_flight is None or not counted:
            for p in parsed:
                if isinstance(p, _Parsed):
                    p.counted = False
            return parsed
        try:
            taken, before = self.in_flight.admit(len(counted))
        except OSError as e:  # the counter file is gone or unwritable: serve rather than refuse
            pb_utils.Logger.log_warn(f"{self.model_name}: in-flight counter unusable ({e}); admitting")
            for i in counted:
                parsed[i].counted = False
            return parsed
        if taken == len(counted):
            return parsed
        message = (f"{self.model_name}: overloaded: {before + taken} requests in flight through version "
                   f"{self.version}, the limit is {self.max_in_flight}; retry after a backoff")
        out = list(parsed)
        for i in counted[taken:]:
            out[i] = _Overloaded(message)
        return out

    def _release(self, n: int) -> None:
        if self.in_flight is not None and n > 0:
            try:
                self.in_flight.release(n)
            except OSError as e:
                pb_utils.Logger.log_warn(f"{self.model_name}: in-flight counter unusable ({e})")

    def _parse(self, request: Any) -> _Parsed:
        if self.mode == "store":
            return self._parse_store(request)
        query = self._input(request, self.input_names[0])
        qn = self.input_names[0]
        if query.ndim != 2 or query.shape[1] != 1:
            raise RequestError(f"{qn} must have shape [batch, 1], got {list(query.shape)}")
        parsed = self._parse_raw(request, query)
        for b in range(query.shape[0]):
            parsed.texts.append(search_logic.read_query(
                query[b, 0], qn if query.shape[0] == 1 else f"{qn} {b} of the batch", max_bytes=self.max_query_bytes,
                normalize=self.queries.normalize, rules=self.features.text_rules))
        return parsed

    def _check_candidates(self, n: int) -> None:
        if n == 0:
            raise RequestError("candidate set is empty")
        if n > self.max_candidates:
            raise RequestError(f"{n} candidates exceed the maximum of {self.max_candidates}")

    def _parse_raw(self, request: Any, query: np.ndarray) -> _Parsed:
        qn, kn, mn = self.input_names
        keywords = self._input(request, kn)
        if keywords.ndim != 3 or keywords.shape[0] != query.shape[0]:
            raise RequestError(f"{kn} must have shape [batch, candidates, keywords] with the {qn}'s batch "
                               f"size {query.shape[0]}, got {list(keywords.shape)}")
        batch, n, k = keywords.shape
        # This step sees region_mask (small) rather than regions (large) only to catch this early: VAN and
        # LAN would otherwise fail deep in MTN with an opaque shape error.
        mask = self._input(request, mn)
        if mask.shape[:2] != (batch, n):
            raise RequestError(f"{kn} has {n} candidates per query but {mn} has "
                               f"{mask.shape[1] if mask.ndim > 1 else '?'} (shapes {list(keywords.shape)} and "
                               f"{list(mask.shape)}): every candidate needs regions and a keyword list, "
                               "padded with '' to equal lengths")
        self._check_candidates(n)
        if mask.ndim != 3 or mask.shape[2] == 0:
            raise RequestError(f"{mn} has no region per candidate (shape {list(mask.shape)}); every candidate "
                               "needs at least one region")
        if k == 0:
            raise RequestError(f"{kn} has no keyword slot per candidate; pad with '' to at least 1")
        if k > self.max_keywords:
            raise RequestError(f"{kn} has {k} keyword slots per candidate, more than the maximum of "
                               f"{self.max_keywords}")
        # Candidate sets repeat the same tags many times: decode, look up and match each distinct string once.
        distinct, inverse = np.unique(keywords.reshape(-1), return_inverse=True)
        decoded = []
        for u, value in enumerate(distinct):
            try:
                if len(value) > self.max_keyword_bytes:
                    raise RequestError(f"{kn} is {len(value)} bytes long, more than the maximum of "
                                       f"{self.max_keyword_bytes} bytes of UTF-8 per keyword")
                text = _decode(value, kn)
                word_count = len(text.split())
                if word_count > self.max_keyword_words:
                    raise RequestError(f"{kn} has {word_count} words, more than the maximum of "
                                       f"{self.max_keyword_words} words per keyword")
                decoded.append(text)
            except RequestError as e:
                # Name the first place the bad string occurs: keywords[query, candidate, keyword].
                first = np.unravel_index(int(np.argmax(inverse.reshape(-1) == u)), keywords.shape)
                where = ", ".join(str(int(i)) for i in first)
                raise RequestError(str(e).replace(kn, f"{kn}[{where}]", 1)) from None
        return _Parsed([], keywords=np.array(decoded, dtype=object)[inverse.reshape(-1)].reshape(keywords.shape))

    def _parse_store(self, request: Any) -> _Parsed:
        """Store mode: the search step's checks (:func:`search_logic.parse_request`), and the outputs asked for."""
        qn, idn, kn = self.input_names
        found = {t.name(): t.as_numpy() for t in request.inputs()}
        checked = search_logic.parse_request(found.get(qn), found.get(idn), found.get(kn), self.rules)
        names = getattr(request, "requested_output_names", None)
        # No store-path request takes a slot of the in-flight counter: the search step answers its requests itself
        # (Triton's bound on its queue refuses the excess), and the benchmarks' amc_store and amc_store_fused end in
        # an ONNX step, which cannot free one.
        return _Parsed(checked.texts, ids=checked.rows, whole_store=idn not in found, top_k=checked.top_k,
                       counted=False, wants=None if names is None else frozenset(names()))

    def _search(self, requests: list[Any]) -> list[Any]:
        """Mode search: each request checked (refusals answered at once), the others searched together
        (:func:`search_logic.search`), each answered with the outputs it asked for."""
        names = self.input_names
        inputs: list[dict[str, np.ndarray] | Exception] = []
        for request in requests:
            try:
                inputs.append({t.name(): t.as_numpy() for t in request.inputs()})
            except Exception as e:  # noqa: BLE001 - any problem is this request's error, never the instance's
                inputs.append(e)
        proven = search_logic.proven_ids([None if isinstance(i, Exception) else i.get(names[1]) for i in inputs],
                                         self.rules.store_size)
        parsed: list[Any] = []
        for request, found, ok in zip(requests, inputs, proven, strict=True):
            try:
                if isinstance(found, Exception):
                    raise found
                asked = getattr(request, "requested_output_names", None)
                parsed.append(search_logic.parse_request(found.get(names[0]), found.get(names[1]), found.get(names[2]),
                                                         self.rules, wants=None if asked is None else asked(),
                                                         ids_proven=ok))
            except Exception as e:  # noqa: BLE001
                parsed.append(e)
        # Refusals are answered now, through each request's response sender (their place in the list is None).
        responses = [None if self._answer_now(r, p) else self._refusal(p) if isinstance(p, Exception) else p
                     for r, p in zip(requests, parsed, strict=True)]
        todo = [i for i, r in enumerate(responses) if isinstance(r, search_logic.Request)]
        found = search_logic.search([responses[i] for i in todo], self.search, self.queries, self.strings,
                                    self.output_names)
        for i, answer in zip(todo, found, strict=True):
            responses[i] = self._error(answer) if isinstance(answer, Exception) else pb_utils.InferenceResponse(
                output_tensors=[self.bytes.tensor(name, array, answer.serialized[name]) if name in answer.serialized
                                else pb_utils.Tensor(name, array) for name, array in answer.arrays.items()])
        return responses

    def _respond(self, p: _Parsed, query_text: np.ndarray | None) -> Any:
        version = np.full((len(p.texts), 1), self.version, dtype=np.int64)
        if self.mode == "raw":
            arrays = {0: query_text, 1: self.features.keyword_embeddings(p.keywords),  # (B, N, K, E)
                      2: self.features.lexical(p.texts, p.keywords, normalized=True), 3: version}  # (B, N, K, 3)
        else:  # each output only where the request's ensemble maps it
            wanted = [p.asks(name) for name in self.output_names]
            arrays = {}
            if wanted[0]:
                arrays[0] = query_text
            if wanted[1]:  # the lexical features of the stored rows' keywords: (B, N, K_store, 3)
                arrays[1] = self.features.store_lexical(p.texts, None if p.whole_store else p.ids, normalized=True)
            if wanted[2]:
                arrays[2] = version
            if wanted[3]:
                arrays[3] = p.ids
            if wanted[4]:
                arrays[4] = np.full((len(p.texts), 1), p.ids.shape[1] if p.top_k is None else p.top_k, np.int64)
            if wanted[5]:
                arrays[5] = self.features.query_tokens(p.texts, normalized=True)
            if wanted[6] or wanted[7]:
                arrays[6], arrays[7] = self.features.query_words(p.texts, normalized=True)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(self.output_names[i], np.ascontiguousarray(a)) for i, a in arrays.items()])

    @staticmethod
    def _input(request: Any, name: str) -> np.ndarray:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise RequestError(f"input {name} is missing")
        return tensor.as_numpy()

    def _error(self, error: BaseException) -> Any:
        return error_response(self.model_name, error, invalid_argument=isinstance(error, RequestError))

    def finalize(self) -> None:
        self.features = None
        if self.in_flight is not None:
            self.in_flight.close()
