"""In-process runners: the exported ONNX graphs under onnxruntime, and the PyTorch model, with the same tokenizer.

Each runner's ``__call__(requests)`` scores a list of same-size requests in one pass (the batch is the
number of requests) and returns scores (B, N) as numpy; tokenization and host<->device copies are inside,
as a serving process would pay them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from amc_client import signatures as sig
from amc_client.text import Tokenizer

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


def _session(path: Path, device: str, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=ort_providers(device))


def _stack(requests: list[Request]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(requests) == 1:
        r = requests[0]
        return r.regions[None], r.region_mask[None], r.keywords[None]
    k = max(r.keywords.shape[1] for r in requests)
    kw = np.full((len(requests), len(requests[0]), k), "", dtype=object)
    for i, r in enumerate(requests):
        kw[i, :, :r.keywords.shape[1]] = r.keywords
    return np.stack([r.regions for r in requests]), np.stack([r.region_mask for r in requests]), kw


class OrtPipeline:
    """QEN -> (VAN, LAN) -> MTN, the four exported graphs, as the raw ``amc`` ensemble runs them."""

    def __init__(self, onnx_dir: Path, vocab: list[str], device: str, threads: int | None = None) -> None:
        self.tokenizer = Tokenizer(vocab)
        self.s = {n: _session(onnx_dir / n / "model.onnx", device, threads)
                  for n in ("amc_qen", "amc_van", "amc_lan", "amc_mtn")}

    def __call__(self, requests: list[Request]) -> np.ndarray:
        regions, mask, keywords = _stack(requests)
        q_tokens = self.tokenizer.encode_queries([r.query for r in requests])
        kw_tokens = self.tokenizer.encode_keywords(keywords)
        q, qv = self.s["amc_qen"].run(None, {sig.QUERY_TOKENS.name: q_tokens})
        have = {sig.QUERY_EMBEDDING.name: q, sig.QUERY_TOKENS.name: q_tokens, sig.REGIONS.name: regions,
                sig.REGION_MASK.name: mask, sig.KEYWORD_TOKENS.name: kw_tokens}
        visual, _, vv = self.s["amc_van"].run(None, _feeds(sig.VAN, have))
        keyword, _, lv = self.s["amc_lan"].run(None, _feeds(sig.LAN, have))
        tv = np.full_like(qv, qv[0, 0])
        scores, _, _ = self.s["amc_mtn"].run(None, {
            sig.QUERY_EMBEDDING.name: q, sig.VISUAL_VECTOR.name: visual, sig.KEYWORD_VECTOR.name: keyword,
            sig.TOKENIZER_VERSION.name: tv, sig.QEN_VERSION.name: qv, sig.VAN_VERSION.name: vv,
            sig.LAN_VERSION.name: lv})
        return scores


def _feeds(signature: sig.StepSignature, available: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs ``signature`` declares, taken from ``available`` (names from the signatures, never spelled)."""
    return {name: available[name] for name in signature.input_names}


class OrtStorePipeline:
    """QEN -> (VAN store, LAN store) -> MTN: the store graphs, candidates by id."""

    def __init__(self, repo: Path, vocab: list[str], device: str, threads: int | None = None) -> None:
        self.tokenizer = Tokenizer(vocab)
        self.s = {n: _session(repo / n / "model.onnx", device, threads)
                  for n in ("amc_qen", "amc_van_store", "amc_lan_store", "amc_mtn")}

    def __call__(self, requests: list[Request]) -> np.ndarray:
        ids = np.stack([r.ids for r in requests])
        q_tokens = self.tokenizer.encode_queries([r.query for r in requests])
        q, qv = self.s["amc_qen"].run(None, {sig.QUERY_TOKENS.name: q_tokens})
        have = {sig.QUERY_EMBEDDING.name: q, sig.QUERY_TOKENS.name: q_tokens, sig.CANDIDATE_IDS.name: ids}
        visual, _, vv = self.s["amc_van_store"].run(None, _feeds(sig.VAN_STORE, have))
        keyword, _, lv = self.s["amc_lan_store"].run(None, _feeds(sig.LAN_STORE, have))
        scores, _, _ = self.s["amc_mtn"].run(None, {
            sig.QUERY_EMBEDDING.name: q, sig.VISUAL_VECTOR.name: visual, sig.KEYWORD_VECTOR.name: keyword,
            sig.TOKENIZER_VERSION.name: qv, sig.QEN_VERSION.name: qv, sig.VAN_VERSION.name: vv,
            sig.LAN_VERSION.name: lv})
        return scores


class OrtFused:
    """One graph of all four networks: ``fused.onnx`` (raw features) or ``fused_store.onnx`` (ids)."""

    def __init__(self, path: Path, vocab: list[str], device: str, store: bool, threads: int | None = None) -> None:
        self.tokenizer, self.store = Tokenizer(vocab), store
        self.session = _session(path, device, threads)

    def feeds(self, requests: list[Request]) -> dict[str, np.ndarray]:
        q_tokens = self.tokenizer.encode_queries([r.query for r in requests])
        if self.store:
            return {sig.QUERY_TOKENS.name: q_tokens, sig.CANDIDATE_IDS.name: np.stack([r.ids for r in requests])}
        regions, mask, keywords = _stack(requests)
        return {sig.QUERY_TOKENS.name: q_tokens, sig.REGIONS.name: regions, sig.REGION_MASK.name: mask,
                sig.KEYWORD_TOKENS.name: self.tokenizer.encode_keywords(keywords)}

    def __call__(self, requests: list[Request]) -> np.ndarray:
        return self.session.run([sig.SCORES.name], self.feeds(requests))[0]


class TorchRunner:
    """``training.model.AMC`` from the checkpoint, in-process on ``device`` (inputs copied from the host)."""

    def __init__(self, checkpoint: Path, device: str) -> None:
        import torch

        from training.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint)
        self.torch, self.device = torch, torch.device(device)
        self.model = ckpt.build_model().to(self.device)
        self.tokenizer = Tokenizer(ckpt.vocab)

    def __call__(self, requests: list[Request]) -> np.ndarray:
        torch = self.torch
        regions, mask, keywords = _stack(requests)
        q_tokens = self.tokenizer.encode_queries([r.query for r in requests])
        kw_tokens = self.tokenizer.encode_keywords(keywords)
        with torch.inference_mode():
            args = [torch.from_numpy(a).to(self.device, non_blocking=False)
                    for a in (q_tokens, regions, mask, kw_tokens)]
            return self.model(*args).scores.cpu().numpy()
