"""In-process runners: the exported ONNX graphs under onnxruntime, and the PyTorch model, with the same text step.

Each runner's ``__call__(requests)`` scores a list of same-size requests in one pass (the batch is the
number of requests) and returns scores (B, N) as numpy. The text features come from :class:`TextFeeds`: the
serving text step's own code (``serving/backends/text_features.py``'s :class:`TextFeatures`) on the published
version's files, its sentence encoder under onnxruntime on the runner's device; so text encoding, lexical
matching and host<->device copies are inside, as a serving process would pay them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from amc_contract import signatures as sig
from serving.backends.text_features import TextFeatures

from .workloads import Request

# The CUDA provider's TF32 switch, as the served steps use it (onnx_runner.py's ``use_tf32`` parameter, "0" in the
# search step's generated config): float32 MatMuls stay float32, as on the CPU path.
USE_TF32 = "0"
# What ``AMC.forward`` takes, in its order: the raw text step's outputs with the candidates' regions.
MODEL_INPUTS = (sig.QUERY_TEXT, sig.REGIONS, sig.REGION_MASK, sig.KEYWORD_EMBEDDINGS, sig.KEYWORD_LEXICAL)


def ort_providers(device: str) -> list:
    import onnxruntime as ort

    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(f"onnxruntime has no CUDA provider: {ort.get_available_providers()}")
        return [("CUDAExecutionProvider", {"device_id": 0, "use_tf32": USE_TF32}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _options(threads: int | None = None):
    """onnxruntime's own defaults (in-process, one session per graph: its best), with ``threads`` if given."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return options


def _session(path: Path, device: str, threads: int | None = None):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=_options(threads), providers=ort_providers(device))


def _stack(requests: list[Request]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(requests) == 1:
        r = requests[0]
        return r.regions[None], r.region_mask[None], r.keywords[None]
    k = max(r.keywords.shape[1] for r in requests)
    kw = np.full((len(requests), len(requests[0]), k), "", dtype=object)
    for i, r in enumerate(requests):
        kw[i, :, :r.keywords.shape[1]] = r.keywords
    return np.stack([r.regions for r in requests]), np.stack([r.region_mask for r in requests]), kw


class TextFeeds:
    """What the raw text step hands the networks for ``requests`` (query_text, keyword_embeddings, keyword_lexical),
    computed in-process by the text step's code, with the requests' regions: every input of ``AMC.forward``."""

    def __init__(self, repo: Path, version: int | str, device: str, *, threads: int | None = None) -> None:
        self.text = TextFeatures(repo / sig.TOKENIZER.model_name / str(version), providers=ort_providers(device),
                                 options=_options(threads))

    def __call__(self, requests: list[Request]) -> dict[str, np.ndarray]:
        queries = [r.query for r in requests]
        out = {sig.QUERY_TEXT.name: self.text.query_text(queries)}
        regions, mask, keywords = _stack(requests)
        out.update({sig.REGIONS.name: regions, sig.REGION_MASK.name: mask,
                    sig.KEYWORD_EMBEDDINGS.name: self.text.keyword_embeddings(keywords),
                    sig.KEYWORD_LEXICAL.name: self.text.lexical(queries, keywords)})
        return out


def _feeds(signature: sig.StepSignature, available: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs ``signature`` declares, taken from ``available`` (names from the signatures, never spelled)."""
    return {name: available[name] for name in signature.input_names}


def _score(sessions: dict, have: dict[str, np.ndarray]) -> np.ndarray:
    """QEN -> (VAN, LAN) -> MTN over ``have`` (the text step's outputs and the candidates)."""
    q, qv = sessions[sig.QEN.model_name].run(None, _feeds(sig.QEN, have))
    have = {**have, sig.QUERY_EMBEDDING.name: q}
    visual, _, vv = sessions[sig.VAN.model_name].run(None, _feeds(sig.VAN, have))
    keyword, _, lv = sessions[sig.LAN.model_name].run(None, _feeds(sig.LAN, have))
    scores, _, _ = sessions[sig.MTN.model_name].run(None, {
        sig.QUERY_EMBEDDING.name: q, sig.VISUAL_VECTOR.name: visual, sig.KEYWORD_VECTOR.name: keyword,
        sig.TOKENIZER_VERSION.name: qv, sig.QEN_VERSION.name: qv, sig.VAN_VERSION.name: vv,
        sig.LAN_VERSION.name: lv})
    return scores


class OrtPipeline:
    """QEN -> (VAN, LAN) -> MTN, the four exported graphs, as the raw ``amc`` ensemble runs them. ``onnx_dir`` holds
    ``<model>/model.onnx`` for each of them."""

    def __init__(self, onnx_dir: Path, feeds: TextFeeds, device: str, threads: int | None = None) -> None:
        self.feeds = feeds
        self.s = {s.model_name: _session(onnx_dir / s.model_name / "model.onnx", device, threads)
                  for s in sig.NETWORKS}

    def __call__(self, requests: list[Request]) -> np.ndarray:
        return _score(self.s, self.feeds(requests))


class TorchRunner:
    """``amc_model.model.AMC`` from the checkpoint, in-process on ``device`` (text features from ``feeds``,
    inputs copied from the host)."""

    def __init__(self, checkpoint: Path, feeds: TextFeeds, device: str) -> None:
        import torch

        from amc_model.checkpoint import load_checkpoint

        self.torch, self.device, self.feeds = torch, torch.device(device), feeds
        self.model = load_checkpoint(checkpoint).build_model().to(self.device)

    def __call__(self, requests: list[Request]) -> np.ndarray:
        torch = self.torch
        have = self.feeds(requests)
        with torch.inference_mode():
            args = [torch.from_numpy(have[t.name]).to(self.device) for t in MODEL_INPUTS]
            return self.model(*args).scores.cpu().numpy()
