"""The one place that names AMC's tensors: name, dtype and dims of every input and output of every step.

ONNX export takes ``input_names``/``output_names``/``dynamic_axes`` from here, the Triton config generator
builds every ``config.pbtxt`` from here, and the client builds its requests from here. Nothing else spells
a tensor name. The steps here are those a publish writes (what the client calls and what those models run).

Dims are ints (fixed) or strings (symbolic). A symbolic dim listed in :data:`DYNAMIC_AXES` varies per
request (batch, candidates, ...) and is a dynamic axis of the ONNX graph; one listed in :data:`MODEL_AXES`
(``hidden``) is fixed by the trained model's configuration: the exported graph fixes it, so the export checks
the graph against :meth:`TensorSpec.fixed_dims` and the Triton configs write that number there
(:meth:`TensorSpec.triton_dims`), as Triton's ONNX Runtime backend requires. The first dim of every tensor is
``batch`` (queries in one request): Triton's batch dimension.

Axes: B queries, N candidates per query, R regions per image, D region-feature channels, K keywords per
candidate, E text-embedding size (384, all-MiniLM-L6-v2), F lexical features per keyword
(``amc_contract.text.LEXICAL_FEATURES``), L WordPiece tokens of a text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# The wire contract's fixed sizes: EfficientNet-Lite0's last feature map is 7x7x1280.
REGION_FEATURE_DIM = 1280
REGIONS_PER_IMAGE = 49
FEATURE_MAP_SIDE = 7

DYNAMIC_AXES = ("batch", "candidates", "regions", "keywords", "tokens", "query_words")
# Symbolic dims a model version fixes (its AMCConfig: ``query_dim`` = QEN's output, ``hidden`` = the AMC space,
# ``keyword_hidden`` = LAN's output: k^q, and with ``tag_agreement`` its evidence keyword's coherence); their numbers
# come from ``export.onnx_export.model_sizes``.
MODEL_AXES = ("query_dim", "hidden", "keyword_hidden")
# The sentence encoder's embedding size and the lexical features per keyword (fixed by the model).
TEXT_EMBEDDING_DIM = 384
LEXICAL_DIM = 3

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, int64, bool, or "bytes" for Triton's BYTES (strings)
    dims: tuple[Dim, ...]  # full shape, batch first
    doc: str = ""
    optional: bool = False  # an input a request may leave out (Triton's ``optional: true``)

    @property
    def triton_dtype(self) -> str:
        return _TRITON_DTYPE[self.dtype]

    @property
    def triton_datatype(self) -> str:
        """The wire name tritonclient uses (``FP32``, ``BYTES``)."""
        return _TRITON_DTYPE[self.dtype].removeprefix("TYPE_").replace("STRING", "BYTES")

    def fixed_dims(self, sizes: Mapping[str, int] | None = None) -> tuple[int | None, ...]:
        """Full shape, batch first, as a graph of a model of ``sizes`` (the numbers of :data:`MODEL_AXES`) fixes
        it: the number of every fixed dim, None for the per-request ones. ValueError for a model axis not in
        ``sizes``: a config or a check cannot be written without the model's number."""
        out: list[int | None] = []
        for d in self.dims:
            if isinstance(d, str) and d in MODEL_AXES:
                if not sizes or d not in sizes:
                    raise ValueError(f"{self.name}: the model fixes its {d!r} axis; its size is needed (sizes "
                                     f"given: {dict(sizes or {})})")
                d = int(sizes[d])
            out.append(d if isinstance(d, int) else None)
        return tuple(out)

    def triton_dims(self, sizes: Mapping[str, int] | None = None) -> list[int]:
        """Dims after the batch dim for a Triton config: :meth:`fixed_dims`, -1 where per request."""
        return [-1 if d is None else d for d in self.fixed_dims(sizes)[1:]]

    @property
    def onnx_dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str) and d in DYNAMIC_AXES}

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(object) if self.dtype == "bytes" else np.dtype(self.dtype)


_TRITON_DTYPE = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "bool": "TYPE_BOOL",
                 "bytes": "TYPE_STRING"}


@dataclass(frozen=True)
class StepSignature:
    """One served step: a Triton model with named inputs and outputs."""

    model_name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, self.model_name)

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, self.model_name)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def _find(specs: tuple[TensorSpec, ...], name: str, model: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(f"{model} has no tensor named {name!r}")


def _t(name: str, dtype: str, *dims: Dim, doc: str = "", optional: bool = False) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(dims), doc, optional)


# ---- public request / response of the `amc` ensemble -------------------------------------------------
QUERY = _t("query", "bytes", "batch", 1, doc="UTF-8 query text")
REGIONS = _t("regions", "float32", "batch", "candidates", "regions", REGION_FEATURE_DIM,
             doc="EfficientNet-Lite0 region features per candidate image")
REGION_MASK = _t("region_mask", "bool", "batch", "candidates", "regions", doc="True for real regions")
KEYWORDS = _t("keywords", "bytes", "batch", "candidates", "keywords",
              doc="UTF-8 keyword strings per candidate; the empty string pads")

SCORES = _t("scores", "float32", "batch", "candidates", doc="cosine relevance in [-1, 1]")
MODALITY_WEIGHTS = _t("modality_weights", "float32", "batch", "candidates", 2,
                      doc="MTN weights (visual, language), summing to 1")
REGION_ATTENTION = _t("region_attention", "float32", "batch", "candidates", "regions",
                      doc="VAN attention over regions, 0 on masked regions")
KEYWORD_ATTENTION = _t("keyword_attention", "float32", "batch", "candidates", "keywords",
                       doc="LAN attention over keywords, 0 on padding")
MODEL_VERSION = _t("model_version", "int64", "batch", 1,
                   doc="version that scored the response; -1 if the steps' versions disagreed")
# Server-side top-k (appended to the ensembles' request and response). With ``top_k`` the response holds the top
# k candidates of each query, best first (scores descending, ties by position), and ``candidate_index`` says which
# candidate each row is; without it, every candidate in request order (``candidate_index`` = 0 .. N-1).
TOP_K = _t("top_k", "int64", "batch", 1, optional=True,
           doc="candidates to return per query, best first: 1 <= top_k <= N, equal across a request's queries")
CANDIDATE_INDEX = _t("candidate_index", "int64", "batch", "results",
                     doc="each returned row's candidate: its position in the request's candidate list (amc) or "
                         "its row in the candidate store (amc_search)")

# ---- internal tensors between steps ------------------------------------------------------------------
# The text step (Python backend: WordPiece + the all-MiniLM-L6-v2 encoder + term-weighted lexical matching)
# turns the request's strings into these; no string reaches the ONNX networks.
QUERY_TEXT = _t("query_text", "float32", "batch", TEXT_EMBEDDING_DIM,
                doc="the query's sentence embedding (all-MiniLM-L6-v2, unit norm)")
KEYWORD_EMBEDDINGS = _t("keyword_embeddings", "float32", "batch", "candidates", "keywords", TEXT_EMBEDDING_DIM,
                        doc="each keyword's sentence embedding; the zero vector pads")
KEYWORD_LEXICAL = _t("keyword_lexical", "float32", "batch", "candidates", "keywords", LEXICAL_DIM,
                     doc="term-weighted lexical matches of each keyword with the query (amc_contract.text)")
QUERY_EMBEDDING = _t("query_embedding", "float32", "batch", "query_dim")
VISUAL_VECTOR = _t("visual_vector", "float32", "batch", "candidates", "hidden")
KEYWORD_VECTOR = _t("keyword_vector", "float32", "batch", "candidates", "keyword_hidden",
                    doc="LAN's output: k^q (hidden dims, plus the lexical axis), then with tag_agreement the coherence "
                        "of its evidence keyword, which MTN takes off (amc_model/model.py)")
TOKENIZER_VERSION = _t("tokenizer_version", "int64", "batch", 1)
QEN_VERSION = _t("qen_version", "int64", "batch", 1)
VAN_VERSION = _t("van_version", "int64", "batch", 1)
LAN_VERSION = _t("lan_version", "int64", "batch", 1)

# The sentence encoder alone, as the text step runs it (exported to ONNX with every model version).
TEXT_TOKENS = _t("text_tokens", "int64", "batch", "tokens", doc="WordPiece ids with [CLS] and [SEP], 0 pads")
TEXT_EMBEDDING = _t("text_embedding", "float32", "batch", TEXT_EMBEDDING_DIM)
TEXT_ENCODER = StepSignature("amc_text_encoder", (TEXT_TOKENS,), (TEXT_EMBEDDING,))

# ---- the steps ---------------------------------------------------------------------------------------
# The tokenizer also takes region_mask, only to check that regions and keywords agree on the candidates.
TOKENIZER = StepSignature("amc_tokenizer", (QUERY, KEYWORDS, REGION_MASK),
                          (QUERY_TEXT, KEYWORD_EMBEDDINGS, KEYWORD_LEXICAL, TOKENIZER_VERSION))
QEN = StepSignature("amc_qen", (QUERY_TEXT,), (QUERY_EMBEDDING, QEN_VERSION))
VAN = StepSignature("amc_van", (QUERY_EMBEDDING, REGIONS, REGION_MASK), (VISUAL_VECTOR, REGION_ATTENTION, VAN_VERSION))
LAN = StepSignature("amc_lan", (QUERY_EMBEDDING, KEYWORD_EMBEDDINGS, KEYWORD_LEXICAL),
                    (KEYWORD_VECTOR, KEYWORD_ATTENTION, LAN_VERSION))
MTN = StepSignature(
    "amc_mtn",
    (QUERY_EMBEDDING, VISUAL_VECTOR, KEYWORD_VECTOR, TOKENIZER_VERSION, QEN_VERSION, VAN_VERSION, LAN_VERSION),
    (SCORES, MODALITY_WEIGHTS, MODEL_VERSION),
)
# The networks exported to ONNX (the text step is Python around TEXT_ENCODER's graph).
NETWORKS = (QEN, VAN, LAN, MTN)

# The top-k step (Python backend, serving/backends/top_k.py) ends the ensembles: it takes every candidate's
# outputs, under these internal names (the ensemble maps MTN's, VAN's and LAN's outputs onto them), and answers
# the ensemble's outputs for the top k. It also checks top_k (INVALID_ARGUMENT when below 1 or above N).
CANDIDATE_SCORES = _t("candidate_scores", "float32", "batch", "candidates")
CANDIDATE_MODALITY_WEIGHTS = _t("candidate_modality_weights", "float32", "batch", "candidates", 2)
CANDIDATE_REGION_ATTENTION = _t("candidate_region_attention", "float32", "batch", "candidates", "regions")
CANDIDATE_KEYWORD_ATTENTION = _t("candidate_keyword_attention", "float32", "batch", "candidates", "keywords")
# Which step output feeds which top-k input (every other tensor keeps its name across the pipeline).
TOP_K_FEEDS = {SCORES.name: CANDIDATE_SCORES.name, MODALITY_WEIGHTS.name: CANDIDATE_MODALITY_WEIGHTS.name,
               REGION_ATTENTION.name: CANDIDATE_REGION_ATTENTION.name,
               KEYWORD_ATTENTION.name: CANDIDATE_KEYWORD_ATTENTION.name}
TOPK = StepSignature(
    "amc_topk",
    (CANDIDATE_SCORES, CANDIDATE_MODALITY_WEIGHTS, CANDIDATE_REGION_ATTENTION, CANDIDATE_KEYWORD_ATTENTION, TOP_K),
    (SCORES, MODALITY_WEIGHTS, REGION_ATTENTION, KEYWORD_ATTENTION, CANDIDATE_INDEX),
)

ENSEMBLE_NAME = "amc"
ENSEMBLE = StepSignature(
    ENSEMBLE_NAME,
    (QUERY, REGIONS, REGION_MASK, KEYWORDS, TOP_K),
    (SCORES, MODALITY_WEIGHTS, REGION_ATTENTION, KEYWORD_ATTENTION, MODEL_VERSION, CANDIDATE_INDEX),
)


def versioned_ensemble_name(version: int) -> str:
    """Name of the ensemble pinned to one model version (``amc`` itself is pinned to the serving one)."""
    return f"{ENSEMBLE_NAME}_v{version}"


# ---- request bounds ------------------------------------------------------------------------------------
# What one query of a request may carry. The client checks them before sending (``_packing.check_request``)
# and the text step checks them again on the server (the config generator passes them to it as config
# parameters), each with the limit in its message; a request over a bound is INVALID_ARGUMENT, never scored.
# Largest candidate set one query may carry.
MAX_CANDIDATES = 1000
# Longest query, in bytes of UTF-8. The sentence encoder reads its first QUERY_MAX_TOKENS (48) WordPiece
# tokens anyway; the bound keeps the lexical matcher and the decoder from chewing on megabytes.
MAX_QUERY_BYTES = 1024
# Most keyword slots per candidate (the K axis of ``keywords``, "" padding included): LAN attends over all of
# them, so K sets its cost. Auto-taggers give tens of tags per image; the training corpus about 4-10.
MAX_KEYWORDS = 64
# Longest keyword: whitespace-separated words, and bytes of UTF-8 (a keyword is a tag or a short phrase; the
# encoder reads its first KEYWORD_MAX_TOKENS (16) tokens).
MAX_KEYWORD_WORDS = 16
MAX_KEYWORD_BYTES = 256
# Largest number of queries in one request (Triton's max_batch_size for every step).
MAX_BATCH = 8
# The bounds above as the text step's config parameters (name -> limit): the config generator writes them, and the
# step reads them there (these where a config lacks one).
REQUEST_BOUNDS = {"max_candidates": MAX_CANDIDATES, "max_query_bytes": MAX_QUERY_BYTES, "max_keywords": MAX_KEYWORDS,
                  "max_keyword_words": MAX_KEYWORD_WORDS, "max_keyword_bytes": MAX_KEYWORD_BYTES}

# ---- overload -------------------------------------------------------------------------------------------
# Admission control (``serving/backends/admission.py``): most requests in flight through one model version's
# pipeline of one server (admitted by the ensemble's text step, not yet answered by its top-k step); beyond it
# the text step answers UNAVAILABLE "overloaded" at once and the client backs off. It sets the latency of what is
# admitted: about MAX_IN_FLIGHT / throughput. 8 = one full VAN batch (MAX_BATCH): on a 2-CPU server (64 client
# threads, 20 candidates a request, the clients on other CPUs; reports/overload_runs.json, machine B)
# 8 answered as many requests as 16 (4,313 / 5,095 vs 4,398 / 4,681 in 60 s) with the accepted p99 at 216 / 183 ms
# instead of 337 / 350 ms, and the server's RSS +1 % / 0 % over the minute instead of +15 % / +7 % (on a second
# machine, 8: +4 % to +20 %). (Not measured on a GPU, where more requests in flight could fill VAN's batches
# better.)
MAX_IN_FLIGHT = 8
# A request that failed midway (a dead stub) never reaches the step that frees its slot; a slot counts for at
# most this long.
IN_FLIGHT_EXPIRY_S = 30.0

# `model_version` value when the steps of one request reported different versions.
MIXED_VERSION = -1

# Canary routing lives in the `amc` ensemble's config parameters under these names (string values).
ROUTING_SERVING_VERSION = "serving_version"
ROUTING_CANARY_VERSION = "canary_version"
ROUTING_CANARY_SHARE = "canary_share"
ROUTING_CANARY_SEARCH = "canary_search"  # "1" where the canary version also serves whole-store search


def parse_versioned_ensemble_name(name: str) -> int | None:
    """``amc_v3`` -> 3; any other name -> None."""
    prefix = f"{ENSEMBLE_NAME}_v"
    rest = name[len(prefix):] if name.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else None


# ---- candidate store: candidates sent by id, their features resident with the model version -------------------
# At export time each candidate image of a gallery gets its VAN-projected regions ``W_v(PCA(regions))``
# (G, R, hidden) and its keywords' LAN projections ``W_kl k`` (G, K, hidden), stored as constants of the
# search graph of that version; the search step holds the keyword strings and ids. A request then carries the query
# (and optionally store rows) instead of R x D floats per candidate.
CANDIDATE_IDS = _t("candidate_ids", "int64", "batch", "candidates",
                   doc="row of each candidate in the version's candidate store (0 <= id < store size)")
SEARCH_IDS = TensorSpec(CANDIDATE_IDS.name, CANDIDATE_IDS.dtype, CANDIDATE_IDS.dims, optional=True,
                        doc="optional filter: the store rows to search (distinct); absent: the whole store")
# How many rows the search graph keeps per query: the request's top_k (checked by the search step: 1 <= top_k
# <= rows searched, one value per request), or every row searched when the request gave none.
SEARCH_K = _t("search_k", "int64", "batch", 1)
# What the search graph takes instead of the query's embedding and the lexical features: the query's WordPiece ids
# (the graph runs the sentence encoder) and its content words, numbered as the store numbers its keywords' words
# (amc_contract.text.StoreWords), with their IDFs (the graph matches them against the stored keywords). Both padded to
# widths that let Triton batch requests of similar queries together.
QUERY_TOKENS = _t("query_tokens", "int64", "batch", "tokens",
                  doc="the query's WordPiece ids with [CLS] and [SEP], 0 pads (to a multiple of 16)")
QUERY_WORDS = _t("query_words", "int64", "batch", "query_words",
                 doc="the query's distinct content words numbered as the store's keyword words (StoreWords), "
                     "-1 pads (a repeated number would count once)")
QUERY_WORD_WEIGHTS = _t("query_word_weights", "float32", "batch", "query_words",
                        doc="the IDF of each of query_words, 0 on padding")


# ---- whole-store search (appended): a query, an optional filter of store rows, top_k -> the top k with explanations ----
# amc_search answers the kept rows with the store's id and keyword strings (the client holds no copy of the store).
STORED_IDS = _t("stored_ids", "bytes", "batch", "results", doc="the candidate store's id of each returned row")
STORED_KEYWORDS = _t("stored_keywords", "bytes", "batch", "results", "keywords",
                     doc="the stored keywords of each returned row, '' pads (keyword_attention's order)")
# The search graph: the sentence encoder, the lexical match and the four networks over the store plus the top-k
# selection (ONNX TopK, k = search_k), so that only k rows leave the GPU; candidate_index holds the store rows kept,
# best first. The search step (SEARCH_STEP below) runs it and adds the store's strings.
SEARCH_STORE = StepSignature("amc_search_store", (QUERY_TOKENS, QUERY_WORDS, QUERY_WORD_WEIGHTS, CANDIDATE_IDS,
                                                    SEARCH_K),
                             (SCORES, MODALITY_WEIGHTS, REGION_ATTENTION, KEYWORD_ATTENTION, MODEL_VERSION,
                              CANDIDATE_INDEX))
SEARCH_ENSEMBLE_NAME = "amc_search"
SEARCH_ENSEMBLE = StepSignature(SEARCH_ENSEMBLE_NAME, (QUERY, TOP_K, SEARCH_IDS),
                                (*ENSEMBLE.outputs, STORED_IDS, STORED_KEYWORDS))


def versioned_search_ensemble_name(version: int) -> str:
    """Name of the search ensemble pinned to one model version (``amc_search_v3``)."""
    return f"{SEARCH_ENSEMBLE_NAME}_v{version}"


# ---- one-step search (issue 23): what amc_search runs since, in one Python step per request ---------------------
# amc_search_step (serving/backends/text_step.py, mode search): checks the request, tokenizes the query and numbers
# its words, runs the search graph (SEARCH_STORE's: the sentence encoder, the lexical match, the four networks and
# TopK over the rows searched) through onnxruntime with its inputs and outputs bound on the device, and answers the
# kept rows with their store ids and keywords: amc_search's request and response, one Python step instead of three.
# Its inputs in the order that module parses (query, candidate_ids, top_k).
SEARCH_STEP = StepSignature("amc_search_step", (QUERY, SEARCH_IDS, TOP_K), SEARCH_ENSEMBLE.outputs)
# Most queries one search request carries (the step's and the search ensembles' max_batch_size): the step carries
# query strings and store rows, not region features, so merging many requests into one graph call is cheap.
# ``AMCClient.search_many`` sends a queue of queries in requests of at most this many.
SEARCH_MAX_BATCH = 64
