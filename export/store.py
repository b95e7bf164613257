"""Candidate store: export-time precomputation of the candidates' features, versioned with the model (whole-store
search, ``amc_search``).

Why: the raw ``amc`` ensemble takes each candidate's 49 x 1280 float32 region features with every query
(25 MB for 100 candidates), so serving time goes into moving and copying those bytes, not into the model.
A search engine's candidates come from its gallery, which is known at export time, so the parts of VAN and
LAN that depend on the candidate alone can be computed once per model version: ``u = W_v PCA(regions)``
(G, R, hidden) and ``W_kl k`` of every keyword's sentence embedding (G, K, hidden), with the region and
keyword masks (:func:`build_store`). The graph over the store holds them as constants (ORT keeps them on the GPU
with the CUDA execution provider) and takes ``candidate_ids`` (rows of the store) instead of the candidates' features.

A publish exports it, the search graph ``search_store.onnx`` (:class:`SearchStoreGraph`): the sentence encoder, the
lexical match against every stored keyword, QEN, VAN, LAN and MTN over the store and the top-k selection (ONNX
TopK). It takes the query's WordPiece ids and its content words, numbered as the store's keyword words by
:class:`amc_contract.text.StoreWords`; the stored keywords' word numbers and IDF mass are constants of the graph.
The search step (``serving/backends/text_step.py``, mode search) tokenizes and runs it. (Issue 10's store graphs,
per network and fused without the top-k, were exported by the same code until they left the tree with the
benchmarks' store ensembles: ``git show 1285aea:benchmarks/store_models.py``.)

Correctness: :func:`validate_store` compares the search graph with the PyTorch raw path on the same candidates (the
gallery rows gathered by id, keywords as sentence embeddings): relative error < :data:`export.onnx_export.TOLERANCE`,
and the rows it keeps are the reference's ranking.

Why one module: the store's arrays, the graph that holds them as constants and the check of that graph against
PyTorch change together (a new stored array touches all three), and split in two the halves would import each other
(the graph takes a :class:`Store`, the store's export builds the graph; test_layout counts type-only imports).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from amc_contract import signatures as sig
from amc_contract.text import (
    LexicalMatcher,
    StoreWords,
    TermWeights,
    load_wordpiece,
    padded_keywords,
    query_tokens,
    words,
)
from amc_model.model import AMC, keyword_coherence
from export.onnx_export import (
    TOLERANCE,
    ExportError,
    _version_column,
    model_sizes,
    relative_error,
    write_onnx,
)
from export.reference import keyword_embeddings
from export.repository import (
    SEARCH_GRAPH_FILE,
    SEARCH_STEPS,
    TextStepFiles,
    check_store_configs,
    set_store_serving,
    stage_store_version,
)

CHUNK = 256  # gallery images projected per torch call at export time
SEARCH_GRAPH = SEARCH_GRAPH_FILE.removesuffix(".onnx")  # its name in the graph's metadata and in export errors


@dataclass
class Store:
    """A version's candidate store: row g is gallery image ``ids[g]``."""

    ids: list[str]
    projected: np.ndarray  # float32 (G, R, hidden): W_v PCA(regions), i.e. VAN's u
    region_mask: np.ndarray  # bool (G, R)
    keywords: np.ndarray  # object (G, K): keyword strings, "" pads
    keyword_embeddings: np.ndarray  # float32 (G, K, E): their sentence embeddings, the zero vector on padding
    keyword_projected: np.ndarray  # float32 (G, K, hidden): LAN's W_kl k
    keyword_mask: np.ndarray  # bool (G, K): real keywords

    def __len__(self) -> int:
        return len(self.ids)

    def tiled(self, size: int, *, projected_dtype: str = "float32") -> Store:
        """A store of ``size`` rows repeating this one's (row g is row g mod len(self), id ``"<id>#<copy>"``), its
        projected features (region and keyword) stored as ``projected_dtype``: a benchmark's large store built
        from a small projected gallery (the cost per row is the same); float16 halves what the graphs hold."""
        rows = np.arange(size) % len(self)
        ids = [f"{self.ids[g]}#{i // len(self)}" for i, g in enumerate(rows.tolist())]
        return Store(ids, self.projected[rows].astype(projected_dtype), self.region_mask[rows], self.keywords[rows],
                     self.keyword_embeddings[rows], self.keyword_projected[rows].astype(projected_dtype),
                     self.keyword_mask[rows])

    def manifest(self, version: int) -> str:
        """``store.json`` of the search step: ids and each row's keyword strings."""
        rows = [[k for k in row if k] for row in self.keywords.tolist()]
        return json.dumps({"version": version, "size": len(self), "ids": self.ids, "keywords": rows})


@dataclass(frozen=True)
class Gallery:
    """The images a version's candidate store is built from: what whole-store search ranks."""

    regions: np.ndarray  # (G, R, D) float16/32 region features
    keywords: Sequence[Sequence[str]] | np.ndarray  # per image, its keyword strings
    ids: list[str]  # per image, the id search returns
    # Per image, its picture (a file path or a PIL image; None: none), kept with the version as the store's
    # thumbnails (export.thumbnails) for the search page; None: a store without pictures.
    images: Sequence[Any] | None = None

    def __post_init__(self) -> None:
        if self.images is not None and len(self.images) != len(self.ids):  # before any store is built
            raise ValueError(f"the gallery has {len(self.ids)} images but {len(self.images)} pictures")

    @classmethod
    def of_corpus(cls, corpus) -> Gallery:
        """Every image of a :class:`training.corpus.Corpus`, its id the emoji and the start of its name, its
        picture the emoji's rendering (the one its features were computed from)."""
        from export.thumbnails import RenderedEmoji

        ids = [f"{c} {n[:28]}" for c, n in zip(corpus.chars, corpus.names, strict=True)]
        return cls(corpus.regions, corpus.keywords, ids, RenderedEmoji(corpus.chars))

    @classmethod
    def of_candidates(cls, path: str | Path) -> Gallery:
        """The images of a candidates ``.npz`` (``amc-client make-candidates``: ids, regions, keywords, and the
        picture files it was made from, if it kept them)."""
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        missing = [k for k in ("ids", "regions", "keywords") if k not in arrays]
        if missing:
            raise ValueError(f"candidates file {str(path)!r} lacks the arrays {missing}")
        images = arrays["images"].tolist() if "images" in arrays else None
        return cls(arrays["regions"], arrays["keywords"].astype(object), arrays["ids"].tolist(), images)


def padded(keywords: Sequence[Sequence[str]] | np.ndarray) -> np.ndarray:
    """Per-image keyword lists (or an (G, K) array) -> (G, K) object array, "" pads."""
    if isinstance(keywords, np.ndarray) and keywords.ndim == 2:
        return keywords.astype(object)
    return padded_keywords(keywords)


def pytorch_keywords() -> Callable[[list[str]], np.ndarray]:
    """The reference keyword embedding: the PyTorch encoder, tokenized as the text step tokenizes."""
    from amc_model.text_encoder import TextEncoder

    return TextEncoder().encode_keywords


def keyword_table_embed(table: Path) -> Callable[[list[str]], np.ndarray]:
    """Keyword embeddings from a published text step's ``keyword_table.npz`` (the PyTorch encoder's, computed at
    publish), the PyTorch encoder for keywords missing there: the store of a gallery whose keywords the version's
    table holds is built without encoding them again."""
    with np.load(table, allow_pickle=False) as data:
        known = dict(zip(data["texts"].tolist(), data["vectors"].astype(np.float32), strict=True))

    def embed(texts: list[str]) -> np.ndarray:
        missing = [t for t in texts if t not in known]
        if missing:
            known.update(zip(missing, pytorch_keywords()(missing), strict=True))
        return np.stack([known[t] for t in texts]) if texts else np.zeros((0, sig.TEXT_EMBEDDING_DIM), np.float32)
    return embed


def build_store(model: AMC, regions: np.ndarray, keywords: Sequence[Sequence[str]] | np.ndarray,
                ids: list[str] | None = None, region_mask: np.ndarray | None = None, *,
                embed: Callable[[list[str]], np.ndarray] | None = None) -> Store:
    """Project a gallery: ``regions`` (G, R, D) float16/32 and per-image keyword lists -> a :class:`Store`.

    ``embed``: keyword strings -> (n, E) sentence embeddings; default the PyTorch encoder.
    """
    g, r = regions.shape[:2]
    projected = np.empty((g, r, model.config.hidden), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, g, CHUNK):
            chunk = torch.from_numpy(np.asarray(regions[start:start + CHUNK], dtype=np.float32))
            projected[start:start + CHUNK] = model.van.project(model.van.reduce(chunk)).numpy()
    strings = padded(keywords)
    embeddings = keyword_embeddings(strings, embed or pytorch_keywords())
    with torch.no_grad():
        keyword_projected = model.lan.project(torch.from_numpy(embeddings)).numpy()
    mask = np.ones((g, r), dtype=bool) if region_mask is None else region_mask.astype(bool)
    return Store(list(ids) if ids is not None else [str(i) for i in range(g)], projected, mask, strings,
                 embeddings, keyword_projected, strings != "")


def _fp32(gathered: torch.Tensor) -> torch.Tensor:
    """Rows of a store held in float16 (``Store.tiled``) computed on in float32; a float32 store traces no cast."""
    return gathered if gathered.dtype == torch.float32 else gathered.float()


def lexical_match(words: torch.Tensor, weights: torch.Tensor, vocabulary: int, keyword_words: torch.Tensor,
                  keyword_mass: torch.Tensor, keyword_real: torch.Tensor, row_words: torch.Tensor) -> torch.Tensor:
    """:meth:`amc_contract.text.LexicalMatcher.features` as tensor operations, for candidates whose keywords'
    words are numbered (:class:`amc_contract.text.StoreWords`, ``vocabulary`` words): the search graph's lexical match.
    The graph holds no strings, so it finds the shared words by number, then takes the same three ratios as
    :func:`amc_contract.text.lexical_features`, the numpy definition (``tests/unit/test_text.py`` holds the two equal).

    ``words``, ``weights``: (B, W) the query's word numbers (distinct, as :meth:`StoreWords.query` gives them: a
    number repeated would count once, with one of its weights; ``vocabulary`` and up for words the store lacks, -1
    pads) and IDFs (0 on padding); per candidate, ``keyword_words`` (B, N, K, Wk) its keywords' word numbers,
    ``keyword_mass`` (B, N, K) their IDF mass, ``keyword_real`` (B, N, K) True for real keywords, ``row_words``
    (B, N, Wc) the distinct words of all its keywords (-1 pads) -> (B, N, K, 3).

    Each query's weights are scattered into a table by word number (B, vocabulary + 2), which every stored word
    then looks up: memory grows with the candidates' words, not with candidates x query words (a 1 KB query
    has hundreds of words). Slot ``vocabulary`` takes what no stored word reads (words the store lacks, padding,
    numbers out of range), slot ``vocabulary + 1`` stays 0 for the stored words' padding.
    """
    readable = (words >= 0) & (words < vocabulary)
    slots = torch.where(readable, words, torch.full_like(words, vocabulary))
    table = weights.new_zeros((words.shape[0], vocabulary + 2)).scatter(1, slots, weights)

    def weight_of(numbers: torch.Tensor) -> torch.Tensor:  # (B, ...) stored word numbers -> the query's IDF of each
        at = torch.where(numbers >= 0, numbers, torch.full_like(numbers, vocabulary + 1))
        return torch.gather(table, 1, at.reshape(at.shape[0], -1)).reshape(at.shape)

    matched = weight_of(keyword_words).sum(-1)  # (B, N, K): IDF mass of the query words the keyword has
    total = weights.sum(-1)[:, None, None]  # (B, 1, 1): the query's IDF mass
    tiny = torch.finfo(weights.dtype).tiny
    in_query = torch.where(matched > 0, matched / keyword_mass.clamp_min(tiny), torch.zeros_like(matched))
    of_query = matched / total.clamp_min(tiny)
    covered = weight_of(row_words).sum(-1, keepdim=True) / total.clamp_min(tiny)  # (B, N, 1)
    in_candidate = torch.where(keyword_real, covered, torch.zeros_like(covered))  # (B, N, K)
    return torch.stack([in_query, of_query, in_candidate], dim=-1)


class SearchStoreGraph(nn.Module):
    """The search graph: the sentence encoder, the lexical match and QEN + VAN + LAN + MTN in one graph over the
    candidate store (the query's WordPiece ids and numbered content words in, nothing computed per candidate outside
    the graph), then the top-k selection: the ``search_k`` best rows of each query, best first (ONNX TopK: equal
    scores in row order), with their explanations and store rows (``candidate_index``). One k per call
    (``search_k[0, 0]``): the search step makes a request's k one value and calls the graph with one k for the
    requests it groups (``serving/backends/search_graph.graph_k``).

    The store's projected features are buffers, constants of the export. ``encoder``: the sentence encoder
    (``amc_model.text_encoder.MiniLM``); ``words``: the store's word numbering under the version's term weights
    (which give each stored keyword's IDF mass)."""

    def __init__(self, model: AMC, store: Store, version: int, *, encoder: nn.Module, words: StoreWords) -> None:
        super().__init__()
        self.model, self.version, self.encoder = model, version, encoder
        self.register_buffer("projected", torch.from_numpy(store.projected))
        self.register_buffer("region_mask", torch.from_numpy(store.region_mask))
        self.register_buffer("keyword_projected", torch.from_numpy(store.keyword_projected))
        self.register_buffer("keyword_mask", torch.from_numpy(store.keyword_mask))
        # Each stored keyword's agreement with the row's other keywords (AMCConfig.tag_agreement): query-free, so
        # computed here once; a graph whose model does not read it leaves it out of its trace.
        coherence = [keyword_coherence(torch.from_numpy(store.keyword_embeddings[s:s + CHUNK]))
                     for s in range(0, len(store), CHUNK)]
        self.register_buffer("keyword_coherence", torch.cat(coherence) if coherence else
                             torch.zeros(store.keyword_mask.shape))
        numbers, mass = words.keyword_words(store.keywords)
        self.vocabulary = words.unknown
        self.register_buffer("keyword_words", torch.from_numpy(numbers))
        self.register_buffer("keyword_mass", torch.from_numpy(mass))
        self.register_buffer("row_words", torch.from_numpy(StoreWords.row_words(numbers)))

    def forward(self, query_tokens, query_words, query_word_weights, candidate_ids, search_k):
        query_text = self.encoder(query_tokens)
        keyword_lexical = lexical_match(query_words, query_word_weights, self.vocabulary,
                                        self.keyword_words[candidate_ids], self.keyword_mass[candidate_ids],
                                        self.keyword_mask[candidate_ids], self.row_words[candidate_ids])
        q = self.model.qen(query_text)
        visual, region_attention = self.model.van.forward_projected(q, _fp32(self.projected[candidate_ids]),
                                                                    self.region_mask[candidate_ids])
        coherence = self.keyword_coherence[candidate_ids] if self.model.config.tag_agreement else None
        keyword, keyword_attention = self.model.lan.forward_projected(
            q, _fp32(self.keyword_projected[candidate_ids]), self.keyword_mask[candidate_ids], keyword_lexical,
            coherence)
        scores, weights = self.model.mtn(q, visual, keyword)
        best, order = torch.topk(scores, search_k[0, 0], dim=1)  # (B, k), best first

        def rows(x: torch.Tensor) -> torch.Tensor:  # (B, N, ...) -> (B, k, ...)
            return torch.gather(x, 1, order.view(*order.shape, 1).expand(-1, -1, x.shape[2]))

        return (best, rows(weights), rows(region_attention), rows(keyword_attention),
                _version_column(query_text, self.version), torch.gather(candidate_ids, 1, order))


@dataclass(frozen=True)
class StoreText:
    """What the search graph holds beside the model: the sentence encoder, the WordPiece tokenizer that feeds it, and
    the store's word numbering under the version's term weights."""

    encoder: nn.Module
    tokenizer: Any
    words: StoreWords

    @classmethod
    def of(cls, store: Store, weights: TermWeights, encoder: nn.Module | None = None) -> StoreText:
        """``encoder`` defaults to the pretrained MiniLM every checkpoint of this release was trained with."""
        from amc_model.text_encoder import load_minilm, tokenizer_json

        return cls(encoder if encoder is not None else load_minilm(), load_wordpiece(tokenizer_json()),
                   StoreWords(weights, store.keywords.reshape(-1).tolist()))


def _example(model: AMC, store: Store, matcher: LexicalMatcher, text: StoreText, *, batch: int, candidates: int,
             rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The search graph's inputs and what the reference needs beside them: real gallery rows as candidates; queries
    of words from the store's keywords (so that lexical features are not all 0; every third one with a word the store
    lacks), as their WordPiece ids and numbered words, with their embeddings by ``text.encoder`` and their lexical
    features by ``matcher``; ``search_k`` every row, so that all are compared."""
    ids = rng.integers(0, len(store), size=(batch, candidates)).astype(np.int64)
    vocabulary = sorted({w for k in store.keywords.reshape(-1).tolist() for w in words(k)}) or ["cat"]
    texts = [" ".join(rng.choice(vocabulary, size=int(rng.integers(1, 4)))) + (" quokka" if b % 3 == 2 else "")
             for b in range(batch)]
    lexical = np.stack([matcher.features(t, store.keywords[row]) for t, row in zip(texts, ids, strict=True)])
    tokens = query_tokens(text.tokenizer, texts)
    values = {sig.CANDIDATE_IDS.name: ids, sig.KEYWORD_LEXICAL.name: lexical.astype(np.float32),
              sig.SEARCH_K.name: np.full((batch, 1), candidates, dtype=np.int64), sig.QUERY_TOKENS.name: tokens}
    values[sig.QUERY_WORDS.name], values[sig.QUERY_WORD_WEIGHTS.name] = text.words.query(texts)
    with torch.no_grad():
        values[sig.QUERY_TEXT.name] = text.encoder(torch.from_numpy(tokens)).numpy()
    return values


def _raw_reference(model: AMC, store: Store, values: dict[str, np.ndarray], regions: np.ndarray) -> dict:
    """PyTorch raw path on the same candidates (gallery regions and keyword embeddings gathered by id, the
    lexical features by ``LexicalMatcher``): the search graph's reference. ``values``: :func:`_example`'s."""
    ids = values[sig.CANDIDATE_IDS.name]
    reg = torch.from_numpy(np.asarray(regions[ids], dtype=np.float32))  # (B, N, R, D)
    mask = torch.from_numpy(store.region_mask[ids])
    kw = torch.from_numpy(store.keyword_embeddings[ids])  # (B, N, K, E)
    lexical = torch.from_numpy(values[sig.KEYWORD_LEXICAL.name])
    with torch.no_grad():
        out = model(torch.from_numpy(values[sig.QUERY_TEXT.name]), reg, mask, kw, lexical)
    return {sig.SCORES.name: out.scores, sig.MODALITY_WEIGHTS.name: out.modality_weights,
            sig.REGION_ATTENTION.name: out.region_attention, sig.KEYWORD_ATTENTION.name: out.keyword_attention}


def export_search_graph(model: AMC, store: Store, matcher: LexicalMatcher, out_dir: Path, *, version: int,
                        fingerprint: str, text: StoreText | None = None) -> None:
    """Write the search graph over ``store``, ``search_store.onnx``, into ``out_dir``. ``text``: the store's text
    (default ``StoreText.of``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = text or StoreText.of(store, matcher.weights)
    example = _example(model, store, matcher, text, batch=2, candidates=3, rng=np.random.default_rng(0))
    graph = SearchStoreGraph(model, store, version, encoder=text.encoder, words=text.words)
    write_onnx(graph, sig.SEARCH_STORE, example, out_dir / SEARCH_GRAPH_FILE,
               version=version, fingerprint=fingerprint, name=SEARCH_GRAPH, sizes=model_sizes(model.config))


def validate_store(model: AMC, store: Store, matcher: LexicalMatcher, regions: np.ndarray, onnx_dir: Path, *,
                   seed: int = 0, shapes: tuple[tuple[int, int], ...] = ((1, 1), (3, 7), (2, 100)),
                   text: StoreText | None = None) -> float:
    """The search graph in ``onnx_dir`` (ORT CPU) against the PyTorch raw path on the same gallery candidates; returns
    the worst relative error. It is fed query strings as the search step feeds them (WordPiece ids, numbered
    words): the reference embeds the queries with ``text.encoder`` in PyTorch and matches their words with
    :class:`LexicalMatcher`.

    Raises :class:`ExportError` when any output differs by more than ``TOLERANCE`` (relative), or the graph keeps
    other rows or ranks them otherwise than the reference.
    """
    rng = np.random.default_rng(seed)
    text = text or StoreText.of(store, matcher.weights)
    session = ort.InferenceSession(str(onnx_dir / SEARCH_GRAPH_FILE), providers=["CPUExecutionProvider"])
    signature, name = sig.SEARCH_STORE, SEARCH_GRAPH
    worst = 0.0
    for batch, n in shapes:
        inputs = _example(model, store, matcher, text, batch=batch, candidates=n, rng=rng)
        expected = _raw_reference(model, store, inputs, regions)
        inputs = {k: inputs[k] for k in signature.input_names}
        got = dict(zip(signature.output_names, session.run(None, inputs)))
        # Every row kept, best first: the reference in the graph's order.
        ids, kept = inputs[sig.CANDIDATE_IDS.name], got[sig.CANDIDATE_INDEX.name]
        if any(sorted(a.tolist()) != sorted(b.tolist()) for a, b in zip(ids, kept, strict=True)):
            raise ExportError(f"{name} at batch {batch}, {n} candidates: the rows kept are not the rows sent")
        where = [{r: j for j, r in enumerate(row.tolist())} for row in ids]  # a repeated row: any copy
        pos = np.array([[where[b][r] for r in kept[b].tolist()] for b in range(batch)])
        expected = {k: np.ascontiguousarray(v.numpy()[np.arange(batch)[:, None], pos]) for k, v in expected.items()}
        ranked = expected[sig.SCORES.name]  # the reference's scores in the graph's order
        if (np.diff(ranked, axis=1) > TOLERANCE * max(1e-6, float(np.abs(ranked).max()))).any():
            raise ExportError(f"{name} at batch {batch}, {n} candidates: its ranking differs from the raw path's")
        for out_name, want in expected.items():
            err = relative_error(got[out_name], want)
            worst = max(worst, err)
            if not err < TOLERANCE:
                raise ExportError(f"{name}.{out_name} at batch {batch}, {n} candidates: relative error "
                                  f"{err:.2e} against the raw path (tolerance {TOLERANCE:g})")
    return worst


def publish_store(repository: Path, version: int, model: AMC, term_weights: str, regions: np.ndarray,
                  keywords, *, fingerprint: str, ids: list[str] | None = None, serve: bool = True,
                  embed: Callable[[list[str]], np.ndarray] | None = None, instances: int | None = None,
                  kind: str | None = None, log=print) -> Store:
    """Add whole-store search (built from the gallery ``regions``/``keywords``) to published version ``version``:
    the search graph, validated against the PyTorch raw path, in ``amc_search_step/<N>`` and ``amc_search_v<N>``
    (``serve``: ``amc_search`` pinned to it too).

    ``term_weights``: the checkpoint's :class:`amc_contract.text.TermWeights` JSON; the search step reuses the
    version's tokenizer and text rules (``amc_tokenizer/<version>/``). ``instances``: of the search step where its
    config is new (default by device kind, ``export.configs.SEARCH_SETTINGS``); ``kind`` ("gpu", "cpu"; default
    this machine's): the machine that serves, for that config. Its dims are the model's (``model_sizes``).
    """
    import tempfile

    sizes = model_sizes(model.config)
    check_store_configs(repository, SEARCH_STEPS, sizes=sizes)  # fail early
    matcher = LexicalMatcher(TermWeights.from_json(term_weights))
    store = build_store(model, regions, keywords, ids, embed=embed)
    text = TextStepFiles.of_version(repository / sig.TOKENIZER.model_name / str(version))
    with tempfile.TemporaryDirectory(prefix="amc-store-") as tmp:
        onnx_dir = Path(tmp)
        store_text = StoreText.of(store, matcher.weights)
        export_search_graph(model, store, matcher, onnx_dir, version=version, fingerprint=fingerprint, text=store_text)
        worst = validate_store(model, store, matcher, regions, onnx_dir, text=store_text)
        log(f"store of {len(store)} candidates exported for version {version} "
            f"(worst relative error against the raw path {worst:.1e})")
        stage_store_version(repository, version=version, onnx_dir=onnx_dir, text=text,
                            store_json=store.manifest(version), instances=instances, sizes=sizes, kind=kind)
    if serve:
        set_store_serving(repository, version)
    return store
