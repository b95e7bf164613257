"""Export the text encoder, QEN, VAN, LAN and MTN to ONNX from a checkpoint alone, and validate each against PyTorch.

Tensor names, dtypes and dynamic axes come from :mod:`amc_contract.signatures`. Each AMC network is wrapped so
that it also emits its model version as a (B, 1) int64 tensor; MTN receives the versions of the text step,
QEN, VAN and LAN and returns ``model_version`` = its own version if all agree, else -1. A response scored by
parts of two versions is therefore visible in the response itself, not only prevented by configuration.

The text encoder (all-MiniLM-L6-v2, ``amc_model.text_encoder.MiniLM``, frozen) is exported with every version
as ``text_encoder.onnx`` (signature ``TEXT_ENCODER``): the serving text step runs it for queries and for
keywords that are not in the version's precomputed keyword table.

Validation runs onnxruntime on fresh random inputs at several shapes (batch 1/3/5, candidates 1/7/100, and
varied regions, keywords and token lengths) and requires every output's relative error
``||ort - torch|| / ||torch||`` under :data:`TOLERANCE`. The inputs are realistic: sentence embeddings of
unit norm, the zero vector for padded keywords, lexical features in [0, 1] (0 on padding), WordPiece ids
between [CLS] and [SEP] followed by 0 pads.

Why one module: every graph it writes is validated here against the wrapper it was traced from, on inputs made here;
fifteen of its definitions are the five wrappers' class, ``__init__`` and ``forward``.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from amc_contract import signatures as sig
from amc_model.model import AMC, AMCConfig

OPSET = 17
TOLERANCE = 1e-4
BATCHES = (1, 3, 5)
CANDIDATES = (1, 7, 100)
TEXT_ENCODER_FILE = "text_encoder.onnx"
# WordPiece ids of BERT's uncased vocabulary (all-MiniLM-L6-v2's): [CLS], [SEP], and the first ordinary token.
_CLS, _SEP, _FIRST_WORD, _VOCAB = 101, 102, 999, 30522


class ExportError(RuntimeError):
    """Export or its validation failed; nothing was published."""


def _version_column(like: torch.Tensor, version: int) -> torch.Tensor:
    """(B, 1) int64 filled with ``version``; traced from ``like``'s batch size."""
    return torch.zeros_like(like[:, :1], dtype=torch.int64) + version


class QENGraph(nn.Module):
    def __init__(self, model: AMC, version: int) -> None:
        super().__init__()
        self.qen, self.version = model.qen, version

    def forward(self, query_text):
        return self.qen(query_text), _version_column(query_text, self.version)


class VANGraph(nn.Module):
    def __init__(self, model: AMC, version: int) -> None:
        super().__init__()
        self.van, self.version = model.van, version

    def forward(self, query_embedding, regions, region_mask):
        visual, attention = self.van(query_embedding, regions, region_mask)
        return visual, attention, _version_column(query_embedding, self.version)


class LANGraph(nn.Module):
    def __init__(self, model: AMC, version: int) -> None:
        super().__init__()
        self.lan, self.version = model.lan, version

    def forward(self, query_embedding, keyword_embeddings, keyword_lexical):
        keyword, attention = self.lan(query_embedding, keyword_embeddings, keyword_lexical)
        return keyword, attention, _version_column(query_embedding, self.version)


class MTNGraph(nn.Module):
    def __init__(self, model: AMC, version: int) -> None:
        super().__init__()
        self.mtn, self.version = model.mtn, version

    def forward(self, query_embedding, visual_vector, keyword_vector, tokenizer_version, qen_version,
                van_version, lan_version):
        scores, weights = self.mtn(query_embedding, visual_vector, keyword_vector)
        own = _version_column(query_embedding, self.version)
        agree = ((tokenizer_version == own) & (qen_version == own) & (van_version == own) & (lan_version == own))
        return scores, weights, torch.where(agree, own, torch.full_like(own, -1))


class TextEncoderGraph(nn.Module):
    """The frozen sentence encoder as the text step runs it: WordPiece ids (B, L) -> embeddings (B, E)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, text_tokens):
        return self.encoder(text_tokens)


GRAPHS: dict[str, tuple[sig.StepSignature, type[nn.Module]]] = {
    "qen": (sig.QEN, QENGraph), "van": (sig.VAN, VANGraph), "lan": (sig.LAN, LANGraph), "mtn": (sig.MTN, MTNGraph),
}


@dataclass(frozen=True)
class Shape:
    batch: int
    candidates: int
    regions: int = sig.REGIONS_PER_IMAGE
    keywords: int = 6
    tokens: int = 5  # WordPiece ids per text, [CLS] and [SEP] included (the text encoder's input)


VALIDATION_SHAPES = [Shape(b, n, r, k, t) for (b, n), (r, k, t) in zip(
    itertools.product(BATCHES, CANDIDATES), itertools.cycle([(49, 6, 5), (49, 1, 3), (10, 12, 48)]))]


def model_sizes(config: AMCConfig) -> dict[str, int]:
    """The numbers of ``sig.MODEL_AXES`` for a model of ``config``: what its exported graphs fix there, and so
    what its Triton configs declare (``export.repository``)."""
    return {"query_dim": config.query_embedding_dim, "hidden": config.hidden,
            "keyword_hidden": config.keyword_vector_dim}


def graph_dims(proto: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Every input's and output's shape as the graph declares it: the number where it fixes a dim, None where the
    dim is symbolic (or unknown)."""
    def dims(value: onnx.ValueInfoProto) -> tuple[int | None, ...]:
        return tuple(d.dim_value if d.HasField("dim_value") else None
                     for d in value.type.tensor_type.shape.dim)

    return {v.name: dims(v) for v in (*proto.graph.input, *proto.graph.output)}


def dims_disagree(declared: tuple[int | None, ...], graph: tuple[int | None, ...]) -> bool:
    """Triton's ONNX Runtime backend's rule (``declared`` None for -1): the same rank, and every dim the graph
    fixes declared as that same number (a symbolic dim of the graph accepts any)."""
    return len(declared) != len(graph) or any(g is not None and d != g for d, g in zip(declared, graph))


def check_graph_dims(proto: onnx.ModelProto, signature: sig.StepSignature, sizes: dict[str, int], name: str) -> None:
    """Every tensor of ``signature``, with the model axes of ``sizes``, has the shape the exported graph declares
    (:func:`dims_disagree`): what the config generator writes from the same signature and sizes is what the
    graph takes and gives. Raises ExportError naming the tensor."""
    have = graph_dims(proto)
    for spec in (*signature.inputs, *signature.outputs):
        want = spec.fixed_dims(sizes)
        if dims_disagree(want, have[spec.name]):
            raise ExportError(f"{name}.{spec.name}: the graph's shape {_shape(have[spec.name])} differs from the "
                              f"signature's {_shape(want)} (sizes {sizes})")


def _shape(dims: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def unit_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 vectors of unit L2 norm along the last axis, as the sentence encoder emits them."""
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def wordpiece_like(rng: np.random.Generator, batch: int, tokens: int) -> np.ndarray:
    """(batch, tokens) int64: [CLS] ids [SEP] then 0 pads, one row at the full length, the others shorter."""
    ids = np.zeros((batch, tokens), dtype=np.int64)
    for b in range(batch):
        n = tokens if b == 0 else int(rng.integers(min(2, tokens), tokens + 1))
        ids[b, :n] = rng.integers(_FIRST_WORD, _VOCAB, size=n)
        ids[b, 0], ids[b, n - 1] = _CLS, _SEP
    return ids


def random_inputs(signature: sig.StepSignature, model: AMC, shape: Shape, version: int,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fresh random inputs for one step at ``shape`` (realistic ranges, masks with >= 1 real item).

    Sentence embeddings have unit norm; about a third of the keyword slots are padding (the zero vector), the
    first slot of every candidate is a real keyword; lexical features lie in [0, 1] and are 0 on padding, the
    third one equal over a candidate's keywords (it is the candidate's share of the query).
    """
    sizes = {"batch": shape.batch, "candidates": shape.candidates, "regions": shape.regions,
             "keywords": shape.keywords, "tokens": shape.tokens, **model_sizes(model.config)}
    out = {}
    for spec in signature.inputs:
        dims = tuple(d if isinstance(d, int) else sizes[d] for d in spec.dims)
        if spec.name.endswith("_version"):
            # Mostly the exported version; some rows another one, so the mixed-version branch is checked too.
            out[spec.name] = np.where(rng.random(dims) < 0.8, version, version + 1).astype(np.int64)
        elif spec.name == sig.TEXT_TOKENS.name:
            out[spec.name] = wordpiece_like(rng, *dims)
        elif spec.dtype == "bool":
            mask = rng.random(dims) < 0.8
            mask[..., 0] = True
            out[spec.name] = mask
        elif spec.name == sig.REGIONS.name:
            out[spec.name] = np.abs(rng.normal(0, 1.5, size=dims)).astype(np.float32)  # post-activation features
        elif spec.name in (sig.QUERY_TEXT.name, sig.KEYWORD_EMBEDDINGS.name):
            out[spec.name] = unit_rows(rng, dims)
        elif spec.name == sig.KEYWORD_LEXICAL.name:
            lexical = rng.random(dims) * (rng.random(dims) < 0.4)
            lexical[..., 2] = lexical[..., :1, 2]  # one value per candidate
            out[spec.name] = lexical.astype(np.float32)
        else:
            out[spec.name] = rng.normal(0, 1, size=dims).astype(np.float32)
    embeddings, lexical = out.get(sig.KEYWORD_EMBEDDINGS.name), out.get(sig.KEYWORD_LEXICAL.name)
    if embeddings is not None:
        padding = rng.random(embeddings.shape[:-1]) < 0.3
        padding[..., 0] = False
        embeddings[padding] = 0.0
        if lexical is not None:
            lexical[padding] = 0.0
    return out


def export_network(model: AMC, name: str, path: Path, *, version: int, fingerprint: str) -> None:
    """Write one network as ONNX with names/axes from the signatures and version metadata, then check it."""
    signature, wrapper = GRAPHS[name]
    example = random_inputs(signature, model, Shape(2, 3), version, np.random.default_rng(0))
    write_onnx(wrapper(model, version), signature, example, path, version=version, fingerprint=fingerprint,
               name=name, sizes=model_sizes(model.config))


def export_text_encoder(encoder: nn.Module, path: Path, *, version: int, fingerprint: str) -> None:
    """Write the sentence encoder as ONNX (signature ``TEXT_ENCODER``), stamped like the networks."""
    example = {sig.TEXT_TOKENS.name: wordpiece_like(np.random.default_rng(0), 2, 7)}
    write_onnx(TextEncoderGraph(encoder), sig.TEXT_ENCODER, example, path, version=version,
               fingerprint=fingerprint, name="text_encoder")


def write_onnx(graph: nn.Module, signature: sig.StepSignature, example: dict[str, np.ndarray], path: Path, *,
               version: int, fingerprint: str, name: str, sizes: dict[str, int] | None = None) -> None:
    """Export ``graph`` traced on ``example`` with the signature's names and axes, stamp it, check it (its
    tensors' shapes against the signature's, with ``sizes`` for the model axes: :func:`check_graph_dims`)."""
    graph = graph.eval()
    args = tuple(torch.from_numpy(example[n]) for n in signature.input_names)
    dynamic_axes = {t.name: t.onnx_dynamic_axes for t in (*signature.inputs, *signature.outputs) if t.onnx_dynamic_axes}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of dynamo, but it needs no extra packages and
        # handles these small static graphs fully; the parity check below is what guards correctness.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, args, str(path), input_names=signature.input_names,
                          output_names=signature.output_names, dynamic_axes=dynamic_axes, opset_version=OPSET,
                          dynamo=False, do_constant_folding=True)
    proto = onnx.load(str(path))
    meta = {"amc_fingerprint": fingerprint, "amc_version": str(version), "amc_network": name}
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    check_graph_dims(proto, signature, sizes or {}, name)
    onnx.save(proto, str(path))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    if not np.all(np.isfinite(actual)):
        return float("inf")
    denom = np.linalg.norm(expected)
    diff = np.linalg.norm(actual - expected)
    return float(diff / denom) if denom > 0 else float(diff)


@dataclass
class ParityResult:
    network: str
    shape: Shape
    max_relative_error: float
    ok: bool


def validate_graph(graph: nn.Module, signature: sig.StepSignature, name: str, path: Path, inputs, *,
                   shapes: list[Shape], seed: int = 0) -> list[ParityResult]:
    """onnxruntime on ``path`` against ``graph`` in PyTorch on ``inputs(shape, rng)`` at every shape; also
    checks the graph's tensor names and every output's dtype and shape."""
    graph = graph.eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names_in = [i.name for i in session.get_inputs()]
    names_out = [o.name for o in session.get_outputs()]
    if names_in != signature.input_names or names_out != signature.output_names:
        raise ExportError(f"{name}: graph tensors {names_in} -> {names_out} differ from the signature "
                          f"{signature.input_names} -> {signature.output_names}")
    rng = np.random.default_rng(seed)
    results = []
    for shape in shapes:
        feeds = inputs(shape, rng)
        with torch.no_grad():
            expected = graph(*(torch.from_numpy(feeds[n]) for n in signature.input_names))
        expected = expected if isinstance(expected, tuple) else (expected,)
        actual = session.run(None, feeds)
        worst = 0.0
        for spec, got, want in zip(signature.outputs, actual, expected, strict=True):
            want = want.numpy()
            if got.shape != want.shape or got.dtype != spec.numpy_dtype:
                raise ExportError(f"{name}.{spec.name} at {shape}: onnxruntime gave {got.dtype}{got.shape}, "
                                  f"expected {spec.numpy_dtype}{want.shape}")
            err = relative_error(got, want) if spec.dtype.startswith("float") else float(not np.array_equal(got, want))
            worst = max(worst, err)
        results.append(ParityResult(name, shape, worst, worst < TOLERANCE))
    return results


def validate_network(model: AMC, name: str, path: Path, *, version: int, seed: int = 0,
                     shapes: list[Shape] = VALIDATION_SHAPES) -> list[ParityResult]:
    """Compare onnxruntime with PyTorch on fresh random inputs at every shape; also checks names and dtypes."""
    signature, wrapper = GRAPHS[name]
    return validate_graph(wrapper(model, version), signature, name, path,
                          lambda shape, rng: random_inputs(signature, model, shape, version, rng),
                          shapes=shapes, seed=seed)


# The text encoder at the batch sizes of the networks and at short, keyword-sized and query-budget token lengths.
TEXT_ENCODER_SHAPES = [Shape(b, 1, tokens=t) for b, t in itertools.product(BATCHES, (3, 16, 48))]


def validate_text_encoder(encoder: nn.Module, path: Path, *, seed: int = 0,
                          shapes: list[Shape] = TEXT_ENCODER_SHAPES) -> list[ParityResult]:
    return validate_graph(TextEncoderGraph(encoder), sig.TEXT_ENCODER, "text_encoder", path,
                          lambda shape, rng: {sig.TEXT_TOKENS.name: wordpiece_like(rng, shape.batch, shape.tokens)},
                          shapes=shapes, seed=seed)


def check_parity(name: str, results: list[ParityResult]) -> None:
    failed = [r for r in results if not r.ok]
    if failed:
        raise ExportError(f"{name}: ONNX differs from PyTorch beyond {TOLERANCE:g} at "
                          + ", ".join(f"{r.shape} (error {r.max_relative_error:.2e})" for r in failed))


def export_all(model: AMC, out_dir: Path, *, version: int, fingerprint: str,
               encoder: nn.Module | None = None) -> dict[str, list[ParityResult]]:
    """Export and validate the text encoder and every network into ``out_dir``; raises ExportError on any failure.

    Files: ``text_encoder.onnx`` and ``<network>.onnx``. ``encoder`` defaults to the pretrained MiniLM
    (``amc_model.text_encoder.load_minilm``), the one every checkpoint of this release was trained with.
    """
    if encoder is None:
        from amc_model.text_encoder import load_minilm

        encoder = load_minilm()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    path = out_dir / TEXT_ENCODER_FILE
    export_text_encoder(encoder, path, version=version, fingerprint=fingerprint)
    report["text_encoder"] = validate_text_encoder(encoder, path)
    check_parity("text_encoder", report["text_encoder"])
    for name in GRAPHS:
        path = out_dir / f"{name}.onnx"
        export_network(model, name, path, version=version, fingerprint=fingerprint)
        report[name] = validate_network(model, name, path, version=version)
        check_parity(name, report[name])
    return report
