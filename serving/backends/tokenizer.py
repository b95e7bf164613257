"""Triton Python-backend model of the ``amc_tokenizer`` step: query and keyword strings to vocabulary ids.

Copied by the config generator as ``amc_tokenizer/<N>/model.py`` beside ``vocab.json`` (a JSON list of
words, ``"<pad>"`` first), ``version.json`` (``{"version": N}``) and ``amc_text.py`` (a copy of
``amc_client/text.py``). Tensors (names from ``amc_client.signatures.TOKENIZER``)::

    query             BYTES [B, 1]         UTF-8 query text
    keywords          BYTES [B, N, K]      UTF-8 keyword strings per candidate, "" pads
    query_tokens      INT64 [B, L]         ids, 0 pads (L >= 1)
    keyword_tokens    INT64 [B, N, K, W]   ids of each keyword's words, 0 pads (W >= 1)
    tokenizer_version INT64 [B, 1]         N of the version directory, for MTN's version-agreement check

Which tokenizer code runs: the ``amc_text.py`` published beside this file, i.e. the text rules the vocabulary
was built with, frozen with the model version; only when it is absent, the installed ``amc_client.text``
(the stub sees this venv's site-packages, editable installs included, when the server was started by
``serving.server``). Both are the same code as training's.

Each request is validated on its own; a bad one gets an error response naming the problem, the others in
the same call are answered, and the instance keeps running. The consistency of ``N`` between ``keywords``
and ``regions`` is not checked here (this step never sees ``regions``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

# The step's tensors, in amc_client.signatures.TOKENIZER's order, as (data_type, rank after the batch dim):
# names are read from config.pbtxt (generated from the signatures), never spelled here.
_INPUT_KINDS = (("TYPE_STRING", 1), ("TYPE_STRING", 2), ("TYPE_BOOL", 2))  # query, keywords, region_mask
_OUTPUT_KINDS = (("TYPE_INT64", 1), ("TYPE_INT64", 3), ("TYPE_INT64", 1))  # query/keyword tokens, version
DEFAULT_MAX_CANDIDATES = 1000  # amc_client.signatures.MAX_CANDIDATES; config parameter max_candidates wins
_SHOW = 80  # characters of a query quoted in an error message


class RequestError(ValueError):
    """A problem with one request's inputs; becomes that request's error response."""


def _load_text_module(here: Path) -> Any:
    """``amc_text.py`` beside this file if published there, else the installed ``amc_client.text``."""
    local = here / "amc_text.py"
    if local.is_file():
        # Loaded by path under a private name: independent of sys.path and of other models' modules.
        spec = importlib.util.spec_from_file_location(f"_amc_text_{abs(hash(str(local)))}", local)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        # No __pycache__ in the version directory: Triton would count a new file there as a changed version
        # and re-initialize it on the next load_model.
        before, sys.dont_write_bytecode = sys.dont_write_bytecode, True
        try:
            spec.loader.exec_module(module)
        finally:
            sys.dont_write_bytecode = before
        return module
    try:
        from amc_client import text
    except ImportError as e:
        raise ImportError(f"no amc_text.py in {here} and amc_client is not importable by the Python backend "
                          "stub (start the server with serving.server so the stub uses the project venv)") from e
    return text


def _decode(value: bytes | str, what: str) -> str:
    """UTF-8 text of one BYTES element; ``what`` names it in the error ("query", "keywords[0, 2, 1]")."""
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{what} is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at position {e.start})") \
            from None


def _names(config: dict[str, Any], kind: str, expected: tuple[tuple[str, int], ...], model: str) -> list[str]:
    """Tensor names of ``config[kind]`` after checking their count, dtypes and ranks match this step."""
    tensors = config.get(kind, [])
    found = tuple((t["data_type"], len(t.get("dims", []))) for t in tensors)
    if found != expected:
        raise ValueError(f"{model}: config {kind}s {[t['name'] for t in tensors]} have (dtype, rank) {found}; "
                         f"the tokenizer step needs {expected}")
    return [t["name"] for t in tensors]


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.model_name = args["model_name"]
        self.query_name, self.keywords_name, self.mask_name = _names(config, "input", _INPUT_KINDS, self.model_name)
        self.output_names = _names(config, "output", _OUTPUT_KINDS, self.model_name)
        here = Path(args["model_repository"]) / args["model_version"]
        text = _load_text_module(here)
        self.tokenizer = text.Tokenizer(json.loads((here / "vocab.json").read_text(encoding="utf-8")))
        self.version = int(json.loads((here / "version.json").read_text())["version"])
        if str(self.version) != args["model_version"]:
            # The version a response reports must be the directory Triton loaded, or MTN's check means nothing.
            raise ValueError(f"{self.model_name}: version.json says {self.version} but the directory is "
                             f"{args['model_version']}")
        self.max_candidates = int(params.get("max_candidates") or DEFAULT_MAX_CANDIDATES)
        pb_utils.Logger.log_info(f"{self.model_name} v{self.version}: {len(self.tokenizer.vocab)} words, "
                                 f"text rules from {text.__file__}")

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
        keywords = self._input(request, self.keywords_name)
        qn, kn = self.query_name, self.keywords_name
        if query.ndim != 2 or query.shape[1] != 1:
            raise RequestError(f"{qn} must have shape [batch, 1], got {list(query.shape)}")
        if keywords.ndim != 3 or keywords.shape[0] != query.shape[0]:
            raise RequestError(f"{kn} must have shape [batch, candidates, keywords] with the {qn}'s batch "
                               f"size {query.shape[0]}, got {list(keywords.shape)}")
        batch, n, k = keywords.shape
        # The tokenizer sees region_mask (small) rather than regions (large) only to catch this early: VAN
        # and LAN would otherwise fail deep in MTN with an opaque shape error.
        mask = self._input(request, self.mask_name)
        if mask.shape[:2] != (batch, n):
            raise RequestError(f"{kn} has {n} candidates per query but {self.mask_name} has "
                               f"{mask.shape[1] if mask.ndim > 1 else '?'} (shapes {list(keywords.shape)} and "
                               f"{list(mask.shape)}): every candidate needs regions and a keyword list, "
                               "padded with '' to equal lengths")
        if n == 0:
            raise RequestError("candidate set is empty")
        if n > self.max_candidates:
            raise RequestError(f"{n} candidates exceed the maximum of {self.max_candidates}")
        if k == 0:
            raise RequestError(f"{kn} has no keyword slot per candidate; pad with '' to at least 1")

        texts = []
        for b in range(batch):
            where = qn if batch == 1 else f"{qn} {b} of the batch"
            text = _decode(query[b, 0], where)
            if not text.strip():
                raise RequestError(f"{where} is empty")
            texts.append(text)
        query_tokens = self.tokenizer.encode_queries(texts)
        for b, text in enumerate(texts):
            if not query_tokens[b].any():
                shown = text if len(text) <= _SHOW else text[:_SHOW] + "..."
                where = qn if batch == 1 else f"{qn} {b} of the batch"
                raise RequestError(f"{where} {shown!r} has no word in the model's vocabulary")

        # Candidate sets repeat the same tags many times: tokenize each distinct string once.
        flat = keywords.reshape(-1)
        distinct, inverse = np.unique(flat, return_inverse=True)
        decoded = []
        for u, value in enumerate(distinct):
            try:
                decoded.append(_decode(value, kn))
            except RequestError as e:
                # Name the first place the bad string occurs: keywords[query, candidate, keyword].
                first = np.unravel_index(int(np.argmax(inverse.reshape(-1) == u)), keywords.shape)
                where = ", ".join(str(int(i)) for i in first)
                raise RequestError(str(e).replace(kn, f"{kn}[{where}]", 1)) from None
        ids = self.tokenizer.encode_keywords(np.array(decoded, dtype=object))  # (U, W)
        keyword_tokens = ids[inverse.reshape(-1)].reshape(batch, n, k, ids.shape[-1])

        version = np.full((batch, 1), self.version, dtype=np.int64)
        arrays = (query_tokens, keyword_tokens, version)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.ascontiguousarray(a, dtype=np.int64))
            for name, a in zip(self.output_names, arrays, strict=True)])

    @staticmethod
    def _input(request: Any, name: str) -> np.ndarray:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise RequestError(f"input {name} is missing")
        return tensor.as_numpy()

    def finalize(self) -> None:
        self.tokenizer = None
