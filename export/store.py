"""Candidate store and fused graphs: export-time precomputation of the candidates' features, versioned with the model.

Why: the raw ``amc`` ensemble takes each candidate's 49 x 1280 float32 region features with every query
(25 MB for 100 candidates), so serving time goes into moving and copying those bytes, not into the model.
A search engine's candidates come from its gallery, which is known at export time, so the part of VAN that
depends on the image alone, ``u = W_v PCA(regions)`` (G, R, hidden), and the gallery's keyword tokens can
be computed once per model version. The store-variant graphs hold them as constants (ORT keeps them on the
GPU with the CUDA execution provider) and take ``candidate_ids`` (rows of the store) instead:

    van_store.onnx    (query_embedding, candidate_ids) -> (visual_vector, region_attention, van_version)
    lan_store.onnx    (query_embedding, candidate_ids) -> (keyword_vector, keyword_attention, lan_version)

and the ensemble ``amc_store`` (store tokenizer -> QEN -> VAN store, LAN store -> MTN) serves
``(query, candidate_ids)``. The raw path stays as it was. Also here: ``fused.onnx`` (all four networks in one
graph, tokens in) and ``fused_store.onnx`` (the same over the store), which price the ensemble's steps.

Correctness: :func:`validate_store` compares every store graph with the PyTorch raw path on the same
candidates (the gallery rows gathered by id): relative error < :data:`export.onnx_export.TOLERANCE`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from amc_client import signatures as sig
from amc_client.text import Tokenizer
from export.onnx_export import TOLERANCE, ExportError, _version_column, relative_error, write_onnx
from export.repository import set_store_serving, stage_store_version
from training.model import AMC, masked_softmax

CHUNK = 256  # gallery images projected per torch call at export time


@dataclass
class Store:
    """A version's candidate store: row g is gallery image ``ids[g]``."""

    ids: list[str]
    projected: np.ndarray  # float32 (G, R, hidden): W_v PCA(regions), i.e. VAN's u
    region_mask: np.ndarray  # bool (G, R)
    keyword_tokens: np.ndarray  # int64 (G, K, W)

    def __len__(self) -> int:
        return len(self.ids)

    def manifest(self, version: int) -> str:
        return json.dumps({"version": version, "size": len(self), "ids": self.ids})


def build_store(model: AMC, tokenizer: Tokenizer, regions: np.ndarray, keywords: list[list[str]] | np.ndarray,
                ids: list[str] | None = None, region_mask: np.ndarray | None = None) -> Store:
    """Project a gallery: ``regions`` (G, R, D) float16/32 and per-image keyword lists -> a :class:`Store`."""
    g, r = regions.shape[:2]
    projected = np.empty((g, r, model.config.hidden), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, g, CHUNK):
            chunk = torch.from_numpy(np.asarray(regions[start:start + CHUNK], dtype=np.float32))
            projected[start:start + CHUNK] = model.van.project(model.van.reduce(chunk)).numpy()
    if isinstance(keywords, np.ndarray) and keywords.ndim == 2:
        padded = keywords
    else:
        k = max([1, *(len(kw) for kw in keywords)])
        padded = np.full((g, k), "", dtype=object)
        for i, kw in enumerate(keywords):
            padded[i, :len(kw)] = list(kw)
    mask = np.ones((g, r), dtype=bool) if region_mask is None else region_mask.astype(bool)
    return Store(list(ids) if ids is not None else [str(i) for i in range(g)], projected, mask,
                 tokenizer.encode_keywords(padded))


def _visual_from_projected(model: AMC, query_embedding: torch.Tensor, u: torch.Tensor,
                           mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAN after its projection (``VisualAttention.forward_reduced`` from ``u`` on): (B, N, H), (B, N, R)."""
    s_q = model.van.kernel(query_embedding)[:, None, None, :]  # (B, 1, 1, H)
    logits = (torch.tanh(u) * s_q).sum(-1)  # (B, N, R)
    attention = masked_softmax(logits, mask)  # (B, N, R)
    return (attention.unsqueeze(-1) * u).sum(2), attention  # (B, N, H), (B, N, R)


class _StoreBuffers(nn.Module):
    def __init__(self, store: Store, with_visual: bool = True, with_keywords: bool = True) -> None:
        super().__init__()
        if with_visual:
            self.register_buffer("projected", torch.from_numpy(store.projected))
            self.register_buffer("region_mask", torch.from_numpy(store.region_mask))
        if with_keywords:
            self.register_buffer("keyword_tokens", torch.from_numpy(store.keyword_tokens))


class VANStoreGraph(_StoreBuffers):
    def __init__(self, model: AMC, store: Store, version: int) -> None:
        super().__init__(store, with_keywords=False)
        self.model, self.version = model, version

    def forward(self, query_embedding, candidate_ids):
        u = self.projected[candidate_ids]  # (B, N, R, H)
        visual, attention = _visual_from_projected(self.model, query_embedding, u, self.region_mask[candidate_ids])
        return visual, attention, _version_column(query_embedding, self.version)


class LANStoreGraph(_StoreBuffers):
    def __init__(self, model: AMC, store: Store, version: int) -> None:
        super().__init__(store, with_visual=False)
        self.model, self.version = model, version

    def forward(self, query_embedding, query_tokens, candidate_ids):
        keyword, attention = self.model.lan(query_embedding, query_tokens, self.keyword_tokens[candidate_ids])
        return keyword, attention, _version_column(query_embedding, self.version)


class FusedGraph(nn.Module):
    """QEN + VAN + LAN + MTN in one graph over raw features (tokens in)."""

    def __init__(self, model: AMC, version: int) -> None:
        super().__init__()
        self.model, self.version = model, version

    def forward(self, query_tokens, regions, region_mask, keyword_tokens):
        out = self.model(query_tokens, regions, region_mask, keyword_tokens)
        return (out.scores, out.modality_weights, out.region_attention, out.keyword_attention,
                _version_column(query_tokens, self.version))


class FusedStoreGraph(_StoreBuffers):
    """QEN + VAN + LAN + MTN in one graph over the candidate store (tokens and candidate ids in)."""

    def __init__(self, model: AMC, store: Store, version: int) -> None:
        super().__init__(store)
        self.model, self.version = model, version

    def forward(self, query_tokens, candidate_ids):
        q = self.model.qen(query_tokens)
        visual, region_attention = _visual_from_projected(self.model, q, self.projected[candidate_ids],
                                                          self.region_mask[candidate_ids])
        keyword, keyword_attention = self.model.lan(q, query_tokens, self.keyword_tokens[candidate_ids])
        scores, weights = self.model.mtn(q, visual, keyword)
        return scores, weights, region_attention, keyword_attention, _version_column(query_tokens, self.version)


def _example(signature: sig.StepSignature, model: AMC, store: Store, tokenizer: Tokenizer, *, batch: int,
             candidates: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs for ``signature``: real gallery rows as candidates, queries of vocabulary words."""
    ids = rng.integers(0, len(store), size=(batch, candidates)).astype(np.int64)
    words = tokenizer.vocab[1:]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 4)))) for _ in range(batch)]
    q_tokens = tokenizer.encode_queries(texts)
    with torch.no_grad():
        q = model.qen(torch.from_numpy(q_tokens)).numpy()
    values = {sig.CANDIDATE_IDS.name: ids, sig.QUERY_TOKENS.name: q_tokens, sig.QUERY_EMBEDDING.name: q}
    return {n: values[n] for n in signature.input_names}


def _raw_reference(model: AMC, store: Store, inputs: dict[str, np.ndarray], regions: np.ndarray) -> dict:
    """PyTorch raw path on the same candidates (gallery regions gathered by id): the store graphs' reference."""
    ids = inputs[sig.CANDIDATE_IDS.name]
    reg = torch.from_numpy(np.asarray(regions[ids], dtype=np.float32))  # (B, N, R, D)
    mask = torch.from_numpy(store.region_mask[ids])
    kw = torch.from_numpy(store.keyword_tokens[ids])
    with torch.no_grad():
        if sig.QUERY_EMBEDDING.name not in inputs:
            out = model(torch.from_numpy(inputs[sig.QUERY_TOKENS.name]), reg, mask, kw)
            return {sig.SCORES.name: out.scores, sig.MODALITY_WEIGHTS.name: out.modality_weights,
                    sig.REGION_ATTENTION.name: out.region_attention, sig.KEYWORD_ATTENTION.name: out.keyword_attention}
        q = torch.from_numpy(inputs[sig.QUERY_EMBEDDING.name])
        if sig.QUERY_TOKENS.name not in inputs:  # the VAN store step: no keywords involved
            visual, ra = model.van(q, reg, mask)
            return {sig.VISUAL_VECTOR.name: visual, sig.REGION_ATTENTION.name: ra}
        keyword, ka = model.lan(q, torch.from_numpy(inputs[sig.QUERY_TOKENS.name]), kw)
        return {sig.KEYWORD_VECTOR.name: keyword, sig.KEYWORD_ATTENTION.name: ka}


STORE_GRAPHS = {"van_store": (sig.VAN_STORE, VANStoreGraph), "lan_store": (sig.LAN_STORE, LANStoreGraph),
                "fused_store": (sig.FUSED_STORE, FusedStoreGraph)}


def export_store_graphs(model: AMC, store: Store, tokenizer: Tokenizer, out_dir: Path, *, version: int,
                        fingerprint: str, fused: bool = True) -> None:
    """Write ``van_store.onnx``, ``lan_store.onnx`` (and ``fused.onnx``, ``fused_store.onnx``) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (signature, cls) in STORE_GRAPHS.items():
        if name == "fused_store" and not fused:
            continue
        example = _example(signature, model, store, tokenizer, batch=2, candidates=3, rng=rng)
        write_onnx(cls(model, store, version), signature, example, out_dir / f"{name}.onnx", version=version,
                fingerprint=fingerprint, name=name)
    if fused:
        example = {sig.QUERY_TOKENS.name: np.array([[1, 2], [3, 0]], dtype=np.int64),
                   sig.REGIONS.name: np.abs(rng.normal(size=(2, 3, sig.REGIONS_PER_IMAGE, sig.REGION_FEATURE_DIM)))
                   .astype(np.float32),
                   sig.REGION_MASK.name: np.ones((2, 3, sig.REGIONS_PER_IMAGE), dtype=bool),
                   sig.KEYWORD_TOKENS.name: rng.integers(1, 50, size=(2, 3, 4, 2)).astype(np.int64)}
        write_onnx(FusedGraph(model, version), sig.FUSED, example, out_dir / "fused.onnx", version=version,
                fingerprint=fingerprint, name="fused")


def validate_store(model: AMC, store: Store, tokenizer: Tokenizer, regions: np.ndarray, onnx_dir: Path, *,
                   seed: int = 0, shapes: tuple[tuple[int, int], ...] = ((1, 1), (3, 7), (2, 100))) -> float:
    """Store graphs (ORT CPU) against the PyTorch raw path on the same gallery candidates; returns the worst error.

    Raises :class:`ExportError` when any output differs by more than ``TOLERANCE`` (relative).
    """
    rng = np.random.default_rng(seed)
    worst = 0.0
    for name, (signature, _) in STORE_GRAPHS.items():
        path = onnx_dir / f"{name}.onnx"
        if not path.exists():
            continue
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for batch, n in shapes:
            inputs = _example(signature, model, store, tokenizer, batch=batch, candidates=n, rng=rng)
            expected = _raw_reference(model, store, inputs, regions)
            got = dict(zip(signature.output_names, session.run(None, inputs)))
            for out_name, want in expected.items():
                if out_name not in got:
                    continue
                err = relative_error(got[out_name], want.numpy())
                worst = max(worst, err)
                if not err < TOLERANCE:
                    raise ExportError(f"{name}.{out_name} at batch {batch}, {n} candidates: relative error "
                                      f"{err:.2e} against the raw path (tolerance {TOLERANCE:g})")
    return worst


def publish_store(repository: Path, version: int, model: AMC, vocab: list[str], regions: np.ndarray,
                  keywords, *, fingerprint: str, ids: list[str] | None = None, flavour: str = "python",
                  fused: bool = True, serve: bool = True, log=print) -> Store:
    """Add the store variant (built from the gallery ``regions``/``keywords``) to published version ``version``."""
    import tempfile

    tokenizer = Tokenizer(vocab)
    store = build_store(model, tokenizer, regions, keywords, ids)
    with tempfile.TemporaryDirectory(prefix="amc-store-") as tmp:
        onnx_dir = Path(tmp)
        export_store_graphs(model, store, tokenizer, onnx_dir, version=version, fingerprint=fingerprint,
                            fused=fused)
        worst = validate_store(model, store, tokenizer, regions, onnx_dir)
        log(f"store of {len(store)} candidates exported for version {version} "
            f"(worst relative error against the raw path {worst:.1e})")
        stage_store_version(repository, version=version, flavour=flavour, onnx_dir=onnx_dir,
                            vocab_json=json.dumps(vocab), store_json=store.manifest(version), fused=fused)
    if serve:
        set_store_serving(repository, version)
    return store
