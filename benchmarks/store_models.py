"""The store ensembles the benchmarks measure, built into a benchmark's own repository (a publish never writes them).

    amc_store_v<N>, amc_store   store text step -> QEN -> (VAN store, LAN store) -> MTN: (query, candidate_ids) ->
                                the candidates' scores and explanations, in request order (5 steps; issue 10)
    amc_store_fused             store text step -> amc_fused_store: the same request and response in 2 steps
    amc_fused                   QEN + VAN + LAN + MTN in one graph over raw features (the text step's outputs in):
                                what the raw ensemble's networks cost as one graph

Their steps: ``amc_store_tokenizer`` (``serving/backends/text_step.py`` in mode store: for ``amc_store`` the query's
embedding and the lexical features of the stored rows' keywords, for ``amc_store_fused`` the query's tokens and
numbered words), the store graphs ``amc_van_store``, ``amc_lan_store``, ``amc_fused_store`` (the store's projected
features held as constants, ``candidate_ids`` in) and ``amc_fused``; QEN and MTN are the version's own.

:func:`add_store_models` adds them to a version a publish wrote (``benchmarks.triton.build_repository`` publishes
into a temp folder and calls it). The client calls none of them: their signatures are in
:mod:`benchmarks.store_signatures`, made of the tensors of :mod:`amc_contract.signatures`; their configs come from the
building blocks of :mod:`export.configs` and their graphs are exported and validated against PyTorch by
:mod:`export.store`'s code: no tensor name is spelled outside a signature.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from torch import nn
from tritonclient.grpc import model_config_pb2 as mc

from amc_contract import signatures as sig
from amc_contract.text import LexicalMatcher, TermWeights
from amc_model.model import AMC
from export import configs
from export.onnx_export import (
    Shape,
    _version_column,
    check_parity,
    model_sizes,
    random_inputs,
    validate_graph,
    write_onnx,
)
from export.repository import (
    NETWORK_MODULE,
    TextStepFiles,
    has_versions,
    repository_flavour,
    write_atomic,
    write_step_code,
    write_text_step,
)
from export.store import (
    FusedStoreGraph,
    Store,
    StoreBuffers,
    StoreText,
    build_store,
    export_store_graphs,
    validate_store,
)

from .store_signatures import (
    CANDIDATE_ROWS,
    FUSED,
    FUSED_STORE,
    LAN_STORE,
    STEPS,
    STORE_BATCH_DELAY_US,
    STORE_ENSEMBLE,
    STORE_ENSEMBLE_NAME,
    STORE_FUSED_ENSEMBLE,
    STORE_FUSED_ENSEMBLE_NAME,
    STORE_MAX_BATCH,
    STORE_TOKENIZER,
    VAN_STORE,
    versioned_store_ensemble_name,
)


# ---- configs -----------------------------------------------------------------------------------------------------
def store_step_config(signature: sig.StepSignature, flavour: str, *, instances: int = 1,
                      max_batch: int | None = None, batch_delay_us: int = STORE_BATCH_DELAY_US,
                      sizes: Mapping[str, int] | None = None, kind: str = "gpu") -> mc.ModelConfig:
    """Config of one of :data:`STEPS`, version-independent: like ``export.configs.step_config``'s, with
    ``instances`` and dynamic batching on every step, the store text step included (it encodes the queries of all
    the requests Triton hands it in one encoder call). ``max_batch`` defaults to :data:`STORE_MAX_BATCH`,
    ``sig.MAX_BATCH`` for ``amc_fused`` (raw features). onnxruntime's CUDA provider runs without TF32
    (``use_tf32: 0``), as fp32 as the CPU path."""
    if signature not in STEPS:
        raise ValueError(f"{signature.model_name} is not one of the benchmarks' store steps")
    if flavour not in configs.FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; expected one of {configs.FLAVOURS}")
    if max_batch is None:
        max_batch = sig.MAX_BATCH if signature is FUSED else STORE_MAX_BATCH
    config = mc.ModelConfig(name=signature.model_name, max_batch_size=max_batch)
    config.version_policy.all.SetInParent()
    configs.declare_tensors(config, signature, configs.template_sizes() if sizes is None else sizes)
    config.dynamic_batching.max_queue_delay_microseconds = batch_delay_us
    if signature is STORE_TOKENIZER:
        configs.queue_policy(config, max_queue_size=max(configs.MAX_QUEUE_SIZE, 2 * max_batch))
        configs.text_step(config, "store", instances=instances)  # counts nothing: no step of its ensembles frees a slot
        config.parameters["use_tf32"].string_value = "0"
    elif flavour == "python":
        config.backend = "python"
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
        config.parameters["onnx_file"].string_value = configs.ONNX_FILE
        config.parameters["use_tf32"].string_value = "0"
        if sig.QUERY_WORDS.name in signature.input_names:
            # The graphs' lexical match scatters the query's word weights by word number: a repeated number
            # would count once, silently. The text step never repeats one; a direct caller gets INVALID_ARGUMENT.
            config.parameters["distinct"].string_value = sig.QUERY_WORDS.name
    else:
        configs.onnxruntime_instances(config, kind, instances)
    return config


def store_ensemble_config(name: str, version: int, max_batch: int = sig.MAX_BATCH) -> mc.ModelConfig:
    """store text step -> QEN -> (VAN store, LAN store) -> MTN, every step pinned to ``version``."""
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch)
    configs.declare_tensors(config, STORE_ENSEMBLE)
    # Of the text step's outputs, the query embedding, the lexical features and the version (not the rows it was
    # sent, search_k, nor what the fused store graphs read); its top_k input is not used either.
    unused = {t.name for t in (CANDIDATE_ROWS, sig.SEARCH_K, sig.QUERY_TOKENS, sig.QUERY_WORDS, sig.QUERY_WORD_WEIGHTS)}
    for step in (STORE_TOKENIZER, sig.QEN, VAN_STORE, LAN_STORE, sig.MTN):
        used = {n: n for n in step.output_names if n not in unused}
        configs.add_step(config, step, version, used, inputs={sig.TOP_K.name: None})
    return config


def store_fused_ensemble_config(name: str, version: int, max_batch: int = STORE_MAX_BATCH) -> mc.ModelConfig:
    """store text step -> ``amc_fused_store`` (2 steps), pinned to ``version``: ``amc_store``'s request and
    response, with one network step instead of four (the text step's version output is not used)."""
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch)
    configs.declare_tensors(config, STORE_FUSED_ENSEMBLE)
    text_features = {n: n for n in STORE_TOKENIZER.output_names if n in FUSED_STORE.input_names}
    configs.add_step(config, STORE_TOKENIZER, version, text_features, inputs={sig.TOP_K.name: None})
    configs.add_step(config, FUSED_STORE, version)
    return config


# ---- graphs ------------------------------------------------------------------------------------------------------
class VANStoreGraph(StoreBuffers):
    def __init__(self, model: AMC, store: Store, version: int) -> None:
        super().__init__(store, with_keywords=False)
        self.model, self.version = model, version

    def forward(self, query_embedding, candidate_ids):
        u = self.projected[candidate_ids]  # (B, N, R, H)
        visual, attention = self.model.van.forward_projected(query_embedding, u, self.region_mask[candidate_ids])
        return visual, attention, _version_column(query_embedding, self.version)


class LANStoreGraph(StoreBuffers):
    def __init__(self, model: AMC, store: Store, version: int) -> None:
        super().__init__(store, with_visual=False)
        self.model, self.version = model, version

    def forward(self, query_embedding, keyword_lexical, candidate_ids):
        keyword, attention = self.model.lan.forward_projected(
            query_embedding, self.keyword_projected[candidate_ids], self.keyword_mask[candidate_ids], keyword_lexical,
            self.coherence(self.model, candidate_ids))
        return keyword, attention, _version_column(query_embedding, self.version)


class FusedGraph(nn.Module):
    """QEN + VAN + LAN + MTN in one graph over raw features (text features in)."""

    def __init__(self, model: AMC, version: int) -> None:
        super().__init__()
        self.model, self.version = model, version

    def forward(self, query_text, regions, region_mask, keyword_embeddings, keyword_lexical):
        out = self.model(query_text, regions, region_mask, keyword_embeddings, keyword_lexical)
        return (out.scores, out.modality_weights, out.region_attention, out.keyword_attention,
                _version_column(query_text, self.version))


# The store graphs, for export.store's export and validation (against the PyTorch raw path on the store's rows).
STORE_GRAPHS = {"van_store": (VAN_STORE, VANStoreGraph), "lan_store": (LAN_STORE, LANStoreGraph),
                "fused_store": (FUSED_STORE, FusedStoreGraph)}
FUSED_SHAPES = [Shape(1, 1), Shape(3, 7, 10, 12), Shape(2, 100, 49, 1)]


def export_graphs(model: AMC, store: Store, matcher: LexicalMatcher, regions: np.ndarray, out_dir: Path, *,
                  version: int, fingerprint: str, text: StoreText | None = None) -> float:
    """Write ``van_store.onnx``, ``lan_store.onnx``, ``fused_store.onnx`` and ``fused.onnx`` into ``out_dir`` and
    validate them against PyTorch (raises ``ExportError`` beyond the tolerance); returns the worst relative error."""
    text = text or StoreText.of(store, matcher.weights)
    export_store_graphs(model, store, matcher, out_dir, version=version, fingerprint=fingerprint, graphs=STORE_GRAPHS,
                        text=text)
    worst = validate_store(model, store, matcher, regions, out_dir, graphs=STORE_GRAPHS, text=text)
    example = random_inputs(FUSED, model, Shape(2, 3), version, np.random.default_rng(0))
    fused = FusedGraph(model, version)
    write_onnx(fused, FUSED, example, out_dir / "fused.onnx", version=version, fingerprint=fingerprint, name="fused",
               sizes=model_sizes(model.config))
    results = validate_graph(fused, FUSED, "fused", out_dir / "fused.onnx",
                             lambda shape, rng: random_inputs(FUSED, model, shape, version, rng), shapes=FUSED_SHAPES)
    check_parity("fused", results)
    return max([worst, *(r.max_relative_error for r in results)])


# ---- into a repository -------------------------------------------------------------------------------------------
def add_store_models(repository: Path, version: int, model: AMC, term_weights: str, regions: np.ndarray, keywords, *,
                     fingerprint: str, ids: list[str] | None = None, flavour: str | None = None,
                     instances: int = 1, kind: str | None = None,
                     embed: Callable[[list[str]], np.ndarray] | None = None, log=print) -> Store:
    """Add :data:`STEPS` of version ``version`` (a store built from the gallery ``regions``/``keywords``, graphs
    validated against PyTorch) and the ensembles ``amc_store_v<N>``, ``amc_store``, ``amc_store_fused`` pinned to it
    to ``repository``, a benchmark's repository a publish made; returns the store.

    ``flavour``: the repository's (default: read from it); ``instances`` of each step where its config is new (the
    benchmarks set them per run; ``store_signatures.STORE_INSTANCES`` is what the GPU runs found best); ``kind``: the machine of
    the onnxruntime flavour's instances (default this one's); ``embed``: the keywords' sentence embeddings (default
    the PyTorch encoder). The store text step takes the files of the version's raw text step.
    """
    flavour = flavour or repository_flavour(repository)
    kind = kind or configs.device_kind()
    sizes = model_sizes(model.config)
    matcher = LexicalMatcher(TermWeights.from_json(term_weights))
    store = build_store(model, regions, keywords, ids, embed=embed)
    text = TextStepFiles.of_version(repository / sig.TOKENIZER.model_name / str(version))
    with tempfile.TemporaryDirectory(prefix="amc-bench-store-") as tmp:
        onnx_dir = Path(tmp)
        worst = export_graphs(model, store, matcher, regions, onnx_dir, version=version, fingerprint=fingerprint)
        log(f"benchmark store models of {len(store)} candidates for version {version} (worst relative error against "
            f"PyTorch {worst:.1e})")
        for step in STEPS:
            config_path = repository / step.model_name / "config.pbtxt"
            if not config_path.exists() or not has_versions(config_path.parent):
                write_atomic(config_path, configs.to_text(store_step_config(step, flavour, instances=instances,
                                                                            sizes=sizes, kind=kind)))
            version_dir = repository / step.model_name / str(version)
            if step is STORE_TOKENIZER:
                write_text_step(version_dir, version=version, files=text, store_json=store.manifest(version))
            else:
                version_dir.mkdir(parents=True)
                shutil.copy(onnx_dir / f"{step.model_name.removeprefix('amc_')}.onnx", version_dir / configs.ONNX_FILE)
                if flavour == "python":
                    write_step_code(version_dir, NETWORK_MODULE)
    ensembles = {versioned_store_ensemble_name(version): store_ensemble_config,
                 STORE_ENSEMBLE_NAME: store_ensemble_config, STORE_FUSED_ENSEMBLE_NAME: store_fused_ensemble_config}
    for name, make in ensembles.items():
        (repository / name / "1").mkdir(parents=True, exist_ok=True)
        write_atomic(repository / name / "config.pbtxt", configs.to_text(make(name, version)))
    return store


