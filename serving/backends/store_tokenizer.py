"""Triton Python-backend model of the ``amc_store_tokenizer`` step: query text to ids, candidate ids checked.

The store variant of ``tokenizer.py``: the candidates' keyword tokens are already in the version's candidate
store (constants of ``amc_lan_store``), so only the query is tokenized. ``candidate_ids`` comes in only to be
checked against the store's size (``store.json`` beside this file), so that an id outside the store is a
clear error of this request rather than a failed gather deep in VAN/LAN. Files beside this one (written by
``export.repository.stage_store_version``): ``vocab.json``, ``version.json``, ``store.json``, ``amc_text.py``.

Tensors (names read from config.pbtxt, generated from ``amc_client.signatures.STORE_TOKENIZER``)::

    query             BYTES [B, 1]   UTF-8 query text
    candidate_ids     INT64 [B, N]   rows of the candidate store
    query_tokens      INT64 [B, L]   ids, 0 pads (L >= 1; L = parameter query_len when that is set)
    tokenizer_version INT64 [B, 1]

With dynamic batching Triton hands several requests to one :meth:`execute`; each is validated and answered on
its own. Imports only numpy and ``triton_python_backend_utils`` (the stub does not see the project).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

_SHOW = 80


class RequestError(ValueError):
    """A problem with one request's inputs; becomes that request's error response."""


def _load_text_module(here: Path) -> Any:
    local = here / "amc_text.py"
    spec = importlib.util.spec_from_file_location(f"_amc_store_text_{abs(hash(str(local)))}", local)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    before, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = before
    return module


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.model_name = args["model_name"]
        kinds_in = [(t["data_type"], len(t.get("dims", []))) for t in config["input"]]
        kinds_out = [(t["data_type"], len(t.get("dims", []))) for t in config["output"]]
        if kinds_in != [("TYPE_STRING", 1), ("TYPE_INT64", 1)] or kinds_out != [("TYPE_INT64", 1)] * 2:
            raise ValueError(f"{self.model_name}: config tensors {kinds_in} -> {kinds_out} are not the store "
                             "tokenizer's (query BYTES, candidate_ids INT64) -> (query_tokens, version) INT64")
        self.query_name, self.ids_name = (t["name"] for t in config["input"])
        self.output_names = [t["name"] for t in config["output"]]
        here = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = _load_text_module(here).Tokenizer(json.loads((here / "vocab.json").read_text("utf-8")))
        self.version = int(json.loads((here / "version.json").read_text())["version"])
        if str(self.version) != args["model_version"]:
            raise ValueError(f"{self.model_name}: version.json says {self.version} but the directory is "
                             f"{args['model_version']}")
        self.store_size = int(json.loads((here / "store.json").read_text())["size"])
        self.max_candidates = int(params.get("max_candidates") or 1000)
        # query_len > 0: pad query_tokens with 0 to this many words, so that every request has the same shape
        # and Triton's dynamic batcher can merge any requests in the next step (QEN ignores the 0 padding).
        self.query_len = int(params.get("query_len") or 0)
        pb_utils.Logger.log_info(f"{self.model_name} v{self.version}: store of {self.store_size} candidates")

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(self._tokenize(request))
            except Exception as e:  # noqa: BLE001 - any problem is this request's error, never the instance's
                message = str(e) if isinstance(e, RequestError) else f"{type(e).__name__}: {e}"
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{self.model_name}: {message}")))
        return responses

    def _tokenize(self, request: Any) -> Any:
        query = self._input(request, self.query_name)
        ids = self._input(request, self.ids_name)
        if query.ndim != 2 or query.shape[1] != 1:
            raise RequestError(f"{self.query_name} must have shape [batch, 1], got {list(query.shape)}")
        if ids.ndim != 2 or ids.shape[0] != query.shape[0]:
            raise RequestError(f"{self.ids_name} must have shape [batch, candidates] with the query's batch size "
                               f"{query.shape[0]}, got {list(ids.shape)}")
        if ids.shape[1] == 0:
            raise RequestError("candidate set is empty")
        if ids.shape[1] > self.max_candidates:
            raise RequestError(f"{ids.shape[1]} candidates exceed the maximum of {self.max_candidates}")
        bad = (ids < 0) | (ids >= self.store_size)
        if bad.any():
            where = np.argwhere(bad)[0]
            raise RequestError(f"{self.ids_name}[{where[0]}, {where[1]}] = {int(ids[tuple(where)])} is outside "
                               f"the candidate store of version {self.version} (0 .. {self.store_size - 1})")
        texts = []
        for b in range(query.shape[0]):
            value = query[b, 0]
            try:
                text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            except UnicodeDecodeError:
                raise RequestError(f"{self.query_name} {b} is not valid UTF-8") from None
            if not text.strip():
                raise RequestError(f"{self.query_name} {b} is empty")
            texts.append(text)
        tokens = self.tokenizer.encode_queries(texts)
        if tokens.shape[1] < self.query_len:
            tokens = np.pad(tokens, ((0, 0), (0, self.query_len - tokens.shape[1])))
        for b, text in enumerate(texts):
            if not tokens[b].any():
                shown = text if len(text) <= _SHOW else text[:_SHOW] + "..."
                raise RequestError(f"{self.query_name} {shown!r} has no word in the model's vocabulary")
        version = np.full((query.shape[0], 1), self.version, dtype=np.int64)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.ascontiguousarray(a, dtype=np.int64))
            for name, a in zip(self.output_names, (tokens, version), strict=True)])

    @staticmethod
    def _input(request: Any, name: str) -> np.ndarray:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise RequestError(f"input {name} is missing")
        return tensor.as_numpy()

    def finalize(self) -> None:
        self.tokenizer = None
