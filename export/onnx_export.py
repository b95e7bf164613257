"""Export QEN, VAN, LAN and MTN to ONNX from a checkpoint alone, and validate each against PyTorch.

Tensor names, dtypes and dynamic axes come from :mod:`amc_client.signatures`. Each network is wrapped so that
it also emits its model version as a (B, 1) int64 tensor; MTN receives the versions of the tokenizer, QEN,
VAN and LAN and returns ``model_version`` = its own version if all agree, else -1. A response scored by parts
of two versions is therefore visible in the response itself, not only prevented by configuration.

Validation runs onnxruntime on fresh random inputs at several shapes (batch 1/3/5, candidates 1/7/100, and
varied regions, keywords, words and query lengths) and requires every output's relative error
``||ort - torch|| / ||torch||`` under :data:`TOLERANCE`.
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

from amc_client import signatures as sig
from training.model import AMC

OPSET = 17
TOLERANCE = 1e-4
BATCHES = (1, 3, 5)
CANDIDATES = (1, 7, 100)


class ExportError(RuntimeError):
    """Export or its validation failed; nothing was published."""


def _version_column(like: torch.Tensor, version: int) -> torch.Tensor:
    """(B, 1) int64 filled with ``version``; traced from ``like``'s batch size."""
    return torch.zeros_like(like[:, :1], dtype=torch.int64) + version


class QENGraph(nn.Module):
    def __init__(self, model: AMC, version: int) -> None:
        super().__init__()
        self.qen, self.version = model.qen, version

    def forward(self, query_tokens):
        return self.qen(query_tokens), _version_column(query_tokens, self.version)


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

    def forward(self, query_embedding, query_tokens, keyword_tokens):
        keyword, attention = self.lan(query_embedding, query_tokens, keyword_tokens)
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


GRAPHS: dict[str, tuple[sig.StepSignature, type[nn.Module]]] = {
    "qen": (sig.QEN, QENGraph), "van": (sig.VAN, VANGraph), "lan": (sig.LAN, LANGraph), "mtn": (sig.MTN, MTNGraph),
}


@dataclass(frozen=True)
class Shape:
    batch: int
    candidates: int
    regions: int = sig.REGIONS_PER_IMAGE
    keywords: int = 6
    words: int = 3
    query_len: int = 4


VALIDATION_SHAPES = [Shape(b, n, r, k, w, q) for (b, n), (r, k, w, q) in zip(
    itertools.product(BATCHES, CANDIDATES), itertools.cycle([(49, 6, 3, 4), (49, 1, 1, 1), (10, 12, 4, 9)]))]


def random_inputs(signature: sig.StepSignature, model: AMC, shape: Shape, version: int,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fresh random inputs for one step at ``shape`` (realistic ranges, masks with >= 1 real item)."""
    cfg = model.config
    sizes = {"batch": shape.batch, "candidates": shape.candidates, "regions": shape.regions,
             "keywords": shape.keywords, "words": shape.words, "query_len": shape.query_len,
             "query_dim": cfg.query_dim, "hidden": cfg.hidden}
    out = {}
    for spec in signature.inputs:
        dims = tuple(d if isinstance(d, int) else sizes[d] for d in spec.dims)
        if spec.name.endswith("_version"):
            # Mostly the exported version; some rows another one, so the mixed-version branch is checked too.
            out[spec.name] = np.where(rng.random(dims) < 0.8, version, version + 1).astype(np.int64)
        elif spec.dtype == "int64":
            tokens = rng.integers(0, cfg.vocab_size, size=dims)
            tokens[rng.random(dims) < 0.3] = 0
            tokens[..., 0] = rng.integers(1, cfg.vocab_size, size=dims[:-1])
            out[spec.name] = tokens.astype(np.int64)
        elif spec.dtype == "bool":
            mask = rng.random(dims) < 0.8
            mask[..., 0] = True
            out[spec.name] = mask
        elif spec.name == "regions":
            out[spec.name] = np.abs(rng.normal(0, 1.5, size=dims)).astype(np.float32)  # post-activation features
        else:
            out[spec.name] = rng.normal(0, 1, size=dims).astype(np.float32)
    if sig.QUERY_TOKENS.name in out and sig.KEYWORD_TOKENS.name in out:
        # Let some keyword words be query words, so LAN's exact-match branch is exercised too.
        q, k = out[sig.QUERY_TOKENS.name], out[sig.KEYWORD_TOKENS.name]
        picks = q[np.arange(q.shape[0])[:, None, None, None], rng.integers(0, q.shape[1], size=k.shape)]
        k[:] = np.where((rng.random(k.shape) < 0.3) & (k > 0), picks, k)
    return out


def export_network(model: AMC, name: str, path: Path, *, version: int, fingerprint: str) -> None:
    """Write one network as ONNX with names/axes from the signatures and version metadata, then check it."""
    signature, wrapper = GRAPHS[name]
    example = random_inputs(signature, model, Shape(2, 3), version, np.random.default_rng(0))
    write_onnx(wrapper(model, version), signature, example, path, version=version, fingerprint=fingerprint,
               name=name)


def write_onnx(graph: nn.Module, signature: sig.StepSignature, example: dict[str, np.ndarray], path: Path, *,
               version: int, fingerprint: str, name: str) -> None:
    """Export ``graph`` traced on ``example`` with the signature's names and axes, stamp it, check it."""
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


def validate_network(model: AMC, name: str, path: Path, *, version: int, seed: int = 0,
                     shapes: list[Shape] = VALIDATION_SHAPES) -> list[ParityResult]:
    """Compare onnxruntime with PyTorch on fresh random inputs at every shape; also checks names and dtypes."""
    signature, wrapper = GRAPHS[name]
    graph = wrapper(model, version).eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names_in = [i.name for i in session.get_inputs()]
    names_out = [o.name for o in session.get_outputs()]
    if names_in != signature.input_names or names_out != signature.output_names:
        raise ExportError(f"{name}: graph tensors {names_in} -> {names_out} differ from the signature "
                          f"{signature.input_names} -> {signature.output_names}")
    rng = np.random.default_rng(seed)
    results = []
    for shape in shapes:
        inputs = random_inputs(signature, model, shape, version, rng)
        with torch.no_grad():
            expected = graph(*(torch.from_numpy(inputs[n]) for n in signature.input_names))
        actual = session.run(None, inputs)
        worst = 0.0
        for spec, got, want in zip(signature.outputs, actual, expected):
            want = want.numpy()
            if got.shape != want.shape or got.dtype != spec.numpy_dtype:
                raise ExportError(f"{name}.{spec.name} at {shape}: onnxruntime gave {got.dtype}{got.shape}, "
                                  f"expected {spec.numpy_dtype}{want.shape}")
            err = relative_error(got, want) if spec.dtype.startswith("float") else float(not np.array_equal(got, want))
            worst = max(worst, err)
        results.append(ParityResult(name, shape, worst, worst < TOLERANCE))
    return results


def export_all(model: AMC, out_dir: Path, *, version: int, fingerprint: str) -> dict[str, list[ParityResult]]:
    """Export and validate every network into ``out_dir/<name>.onnx``; raises ExportError on any failure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    for name in GRAPHS:
        path = out_dir / f"{name}.onnx"
        export_network(model, name, path, version=version, fingerprint=fingerprint)
        report[name] = validate_network(model, name, path, version=version)
        failed = [r for r in report[name] if not r.ok]
        if failed:
            raise ExportError(f"{name}: ONNX differs from PyTorch beyond {TOLERANCE:g} at "
                              + ", ".join(f"{r.shape} (error {r.max_relative_error:.2e})" for r in failed))
    return report


def read_metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
