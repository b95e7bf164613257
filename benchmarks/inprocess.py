"""In-process runners: the exported ONNX graphs under onnxruntime, and the PyTorch model, with the same text step.

Each runner's ``__call__(requests)`` scores a list of same-size requests in one pass (the batch is the
number of requests) and returns scores (B, N) as numpy. The text features come from :class:`TextFeeds`: the
serving text step's own code (``serving/backends/text_features.py``'s :class:`TextFeatures`) on the published
version's files, its sentence encoder under onnxruntime on the runner's device; so text encoding, lexical
matching and host<->device copies are inside, as a serving process would pay them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from amc_contract import signatures as sig
from serving.backends.text_features import TextFeatures

from .store_signatures import FUSED, FUSED_STORE, LAN_STORE, STORE_TOKENIZER, VAN_STORE
from .workloads import Request

# The CUDA provider's TF32 switch, as the served steps use it (onnx_runner.py's ``use_tf32`` parameter,
# "0" in the generated store configs): float32 MatMuls stay float32, as on the CPU path.
USE_TF32 = "0"


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
    """What the text step hands the networks for ``requests``, computed in-process by the text step's code.

    ``store=False``: the raw step's outputs (query_text, keyword_embeddings, keyword_lexical) with the requests'
    regions, i.e. every input of ``amc_fused``; ``store=True``: the store step's with the candidate ids: those
    ``amc_store``'s networks read (query_text, keyword_lexical of the stored rows) and those of
    ``amc_fused_store`` (the query's tokens and numbered words), each computed only where ``wanted`` names it
    (default: every one), as the served step computes only what its ensemble maps.
    """

    def __init__(self, repo: Path, version: int | str, device: str, *, store: bool = False,
                 threads: int | None = None) -> None:
        step = STORE_TOKENIZER if store else sig.TOKENIZER
        self.store = store
        self.text = TextFeatures(repo / step.model_name / str(version), providers=ort_providers(device),
                                 options=_options(threads))

    def __call__(self, requests: list[Request], wanted: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        queries = [r.query for r in requests]
        if self.store:
            wants = set(STORE_TOKENIZER.output_names if wanted is None else wanted)
            out = {sig.CANDIDATE_IDS.name: np.stack([r.ids for r in requests])}
            if sig.QUERY_TEXT.name in wants:
                out[sig.QUERY_TEXT.name] = self.text.query_text(queries)
            if sig.KEYWORD_LEXICAL.name in wants:  # the served step's keyword index
                out[sig.KEYWORD_LEXICAL.name] = self.text.store_lexical(queries, out[sig.CANDIDATE_IDS.name])
            if sig.QUERY_TOKENS.name in wants:
                out[sig.QUERY_TOKENS.name] = self.text.query_tokens(queries)
            if {sig.QUERY_WORDS.name, sig.QUERY_WORD_WEIGHTS.name} & wants:
                out[sig.QUERY_WORDS.name], out[sig.QUERY_WORD_WEIGHTS.name] = self.text.query_words(queries)
            return out
        out = {sig.QUERY_TEXT.name: self.text.query_text(queries)}
        regions, mask, keywords = _stack(requests)
        out.update({sig.REGIONS.name: regions, sig.REGION_MASK.name: mask,
                    sig.KEYWORD_EMBEDDINGS.name: self.text.keyword_embeddings(keywords),
                    sig.KEYWORD_LEXICAL.name: self.text.lexical(queries, keywords)})
        return out


def _feeds(signature: sig.StepSignature, available: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs ``signature`` declares, taken from ``available`` (names from the signatures, never spelled)."""
    return {name: available[name] for name in signature.input_names}


def _score(sessions: dict, have: dict[str, np.ndarray], van: sig.StepSignature, lan: sig.StepSignature) -> np.ndarray:
    """QEN -> (VAN, LAN) -> MTN over ``have`` (the text step's outputs and the candidates)."""
    q, qv = sessions[sig.QEN.model_name].run(None, _feeds(sig.QEN, have))
    have = {**have, sig.QUERY_EMBEDDING.name: q}
    visual, _, vv = sessions[van.model_name].run(None, _feeds(van, have))
    keyword, _, lv = sessions[lan.model_name].run(None, _feeds(lan, have))
    scores, _, _ = sessions[sig.MTN.model_name].run(None, {
        sig.QUERY_EMBEDDING.name: q, sig.VISUAL_VECTOR.name: visual, sig.KEYWORD_VECTOR.name: keyword,
        sig.TOKENIZER_VERSION.name: qv, sig.QEN_VERSION.name: qv, sig.VAN_VERSION.name: vv,
        sig.LAN_VERSION.name: lv})
    return scores


class OrtPipeline:
    """QEN -> (VAN, LAN) -> MTN, the four exported graphs, as the raw ``amc`` ensemble runs them; with store
    ``feeds``, QEN -> (VAN store, LAN store) -> MTN over the candidate store, as ``amc_store`` runs them.
    ``onnx_dir`` holds ``<model>/model.onnx`` for each of them."""

    def __init__(self, onnx_dir: Path, feeds: TextFeeds, device: str, threads: int | None = None) -> None:
        self.feeds = feeds
        self.van, self.lan = (VAN_STORE, LAN_STORE) if feeds.store else (sig.VAN, sig.LAN)
        self.s = {s.model_name: _session(onnx_dir / s.model_name / "model.onnx", device, threads)
                  for s in (sig.QEN, self.van, self.lan, sig.MTN)}

    def __call__(self, requests: list[Request]) -> np.ndarray:
        return _score(self.s, self.feeds(requests), self.van, self.lan)


class OrtFused:
    """One graph of all four networks: ``fused.onnx`` (raw features) or ``fused_store.onnx`` (ids)."""

    def __init__(self, path: Path, feeds: TextFeeds, device: str, threads: int | None = None) -> None:
        self.feeds, self.store = feeds, feeds.store
        self.signature = FUSED_STORE if feeds.store else FUSED
        self.session = _session(path, device, threads)

    def __call__(self, requests: list[Request]) -> np.ndarray:
        return self.session.run([sig.SCORES.name], _feeds(self.signature, self.feeds(requests,
                                                                                  self.signature.input_names)))[0]


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
            args = [torch.from_numpy(have[n]).to(self.device) for n in FUSED.input_names]
            return self.model(*args).scores.cpu().numpy()
