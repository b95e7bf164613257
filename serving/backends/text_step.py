"""The text step of the ranking ensemble, query and keyword strings to what the steps after it read (sentence-encoder
features and lexical matches), and in mode search the whole of ``amc_search``.

One module, two Triton models: the ``model.py`` of ``amc_tokenizer/<N>/`` (config parameter ``mode: raw``) and of
``amc_search_step/<N>/`` (``mode: search``) imports :class:`TritonPythonModel` from here. Here it only moves tensors
between ``pb_utils`` and numpy; the logic is in functions of numpy arrays, tested without a server:

    text_features.py     :class:`TextFeatures`: the version folder's tokenizer, encoder, keyword table, text rules
    text_requests.py     raw mode: each request's checks, admission, the outputs
    search.py            search mode: the checks (and every mode's reading of a query), tokens and words, the answers
    search_graph.py      search mode: the search graph's calls (fixed-shape copies on CUDA graphs where asked for)

A version folder holds (written by ``export.repository``) ``model.py``, Triton's entry (this folder first on
sys.path, then ``from amc_steps.text_step import ...``); ``amc_steps/``, this package as published; ``amc_contract/``,
the contract as published (``text.py``: WordPiece ids, words, IDF term weights, lexical matches, query
normalization; ``signatures.py``: the bounds; ``RequestError``); the data files ``text_features.py`` lists; and in
mode search ``search_store.onnx``, the search graph.

Tensors (names and order from config.pbtxt, generated from ``amc_contract.signatures``)::

    raw    in:  query BYTES [B, 1], keywords BYTES [B, N, K] ("" pads), region_mask BOOL [B, N, R]
           out: query_text FP32 [B, E], keyword_embeddings FP32 [B, N, K, E] (zero vector on padding),
                keyword_lexical FP32 [B, N, K, 3], tokenizer_version INT64 [B, 1]
    search in:  query BYTES [B, 1], candidate_ids INT64 [B, N] (optional: absent, every row of the store),
                top_k INT64 [B, 1] (optional: 1 <= top_k <= N and one value per request; absent, N)
           out: scores FP32 [B, k], modality_weights FP32 [B, k, 2], region_attention FP32 [B, k, R],
                keyword_attention FP32 [B, k, K_store], model_version INT64 [B, 1], candidate_index INT64 [B, k] (store
                rows, best first), stored_ids BYTES [B, k], stored_keywords BYTES [B, k, K_store]

Search mode is one Python step per request (issue 23): it checks the request, tokenizes the queries and numbers their
words as the store numbers its keywords' (``amc_contract.text.StoreWords``), and runs the search graph itself; the
dynamic batcher's requests that search as many rows share graph calls. It takes no slot of an in-flight counter
(nothing after it would free one): its own queue's bound (Triton's) refuses the excess.

Overload: in raw mode each valid request takes a slot of its version's in-flight counter (``admission.py``; config
parameters ``admission``, ``max_in_flight``, ``in_flight_expiry_s``), freed by the top-k step at the end of the
ensemble; with ``max_in_flight`` taken, the request is answered UNAVAILABLE "overloaded: ... in flight" at once
instead of waiting in the slow steps' queues. Refusals and the caller's mistakes are sent through each request's
response sender before the batch's admitted queries are encoded (their places in ``execute``'s list are None), so
that a refusal never waits for the encoder. Only raw mode counts: search answers in this step, and no later step
could free a slot.

With dynamic batching Triton hands several requests to one :meth:`TritonPythonModel.execute`: each request is
validated and answered on its own (INVALID_ARGUMENT for the caller's mistakes, with the message naming the problem),
and the instance never raises out of ``execute``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from amc_contract import RequestError
from amc_contract import text as amc_text

from . import search as search_logic
from . import search_graph, text_requests
from .admission import InFlight, counter_path, remove_stale
from .onnx_runner import (
    coded_response,
    config_mode,
    config_parameters,
    error_response,
    execution_providers,
    session_options,
)
from .text_features import DEFAULT_KEYWORD_CACHE, TextFeatures

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (benchmarks, tests)
    pb_utils = None


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = config_parameters(config)
        self.model_name = args["model_name"]
        self.mode = config_mode(params, text_requests.MODES, self.model_name)
        self.input_names = text_requests.config_names(config, "input", self.mode, self.model_name)
        self.output_names = text_requests.config_names(config, "output", self.mode, self.model_name)
        here = Path(args["model_repository"]) / args["model_version"]
        self.version = int(json.loads((here / "version.json").read_text())["version"])
        if str(self.version) != args["model_version"]:
            # The version a response reports must be the directory Triton loaded, or MTN's check means nothing.
            raise ValueError(f"{self.model_name}: version.json says {self.version} but the directory is "
                             f"{args['model_version']}")
        bounds = text_requests.Bounds.of(params)  # the config's, else the signatures'
        searching = self.mode == "search"
        self.features = TextFeatures(
            here, providers=execution_providers(params, args, self.model_name),
            options=session_options(params, self.model_name),
            cache_size=int(params.get("keyword_cache_size") or DEFAULT_KEYWORD_CACHE), encoder=not searching)
        if not searching and self.features.dim != config["output"][0]["dims"][0]:
            raise ValueError(f"{self.model_name}: text_encoder.onnx gives {self.features.dim}-d embeddings, the "
                             f"config declares {config['output'][0]['dims'][0]}")
        detail = f"{len(self.features.table)} keywords precomputed"
        # The version's query reading (and, over a store, the search graph's query features).
        self.queries = search_logic.QueryText(
            self.features.wordpiece, self.features.store_words, self.features.emoji_names,
            tokenizer_json=(here / "tokenizer.json").read_text(encoding="utf-8"))
        if self.mode == "raw":
            self.raw_rules = text_requests.RawRules(tuple(self.input_names), bounds, self.queries.normalize,
                                                    self.features.text_rules)
        else:
            store = self.features.store_keywords
            if store is None:
                raise ValueError(f"{self.model_name}: mode search needs store.json in {here}")
            detail = f"store of {len(store)} candidates, {store.shape[1]} keyword slots each"
            # top_k's checks are the top-k step's (top_k.check_top_k): INVALID_ARGUMENT here.
            self.rules = search_logic.Rules(
                names=tuple(self.input_names), version=self.version, store_size=len(store),
                max_query_bytes=bounds.max_query_bytes, normalize=self.queries.normalize,
                text_rules=self.features.text_rules)
            self.search = search_graph.SearchGraph(here, params, args, self.model_name)
            # The store parsed once, by TextFeatures: its rows' strings as the answers carry them.
            self.strings = search_logic.StoreStrings(self.features.store_ids, self.features.store_keywords)
            self.bytes = search_logic.SerializedBytes(pb_utils)
            detail += f", {self.search.describe()}"
        self.in_flight = None
        self.early_refusals = True  # answered through the response sender (_answer_now) until a stub lacks it
        max_in_flight = int(params.get("max_in_flight") or 0)
        counter = params.get("admission", "")
        if counter and max_in_flight > 0:
            remove_stale()
            self.in_flight = InFlight(counter_path(Path(args["model_repository"]).parent, counter, self.version),
                                      limit=max_in_flight, expiry_s=float(params.get("in_flight_expiry_s") or 30))
            detail += f", at most {max_in_flight} requests in flight ({self.in_flight.path})"
        encoder = self.features.session.get_providers() if self.features.session is not None else "the graph"
        pb_utils.Logger.log_info(f"{self.model_name} v{self.version} ({self.mode}): {detail}, encoder on "
                                 f"{encoder}, text rules "
                                 f"{self.features.text_rules} from {amc_text.__file__}")

    # ---- serving: pb_utils tensors to numpy and back; the logic is text_requests' and search's ----------------------
    def execute(self, requests: list[Any]) -> list[Any]:
        if self.mode == "search":
            return self._search(requests)
        parsed: list[Any] = []
        for request in requests:
            try:
                parsed.append(self._parse(request))
            except Exception as e:  # noqa: BLE001 - any problem is this request's error, never the instance's
                parsed.append(e)
        parsed, warning = text_requests.admit(parsed, self.in_flight, self.model_name, self.version)
        if warning is not None:
            pb_utils.Logger.log_warn(warning)
        # Refusals (overload, the caller's mistakes) are answered now, through each request's response sender,
        # not after the batch's queries are encoded: under overload the encoding of the admitted requests
        # would otherwise hold every rejection of the batch. Their place in the returned list is None.
        answered = [self._answer_now(r, p) for r, p in zip(requests, parsed, strict=True)]
        answers = text_requests.answer(parsed, self.features, self.output_names, self.version, self._release)
        responses = []
        for p, done, found in zip(parsed, answered, answers, strict=True):
            if done:
                responses.append(None)
            elif isinstance(found, Exception):
                responses.append(self._refusal(found))
            else:
                try:
                    responses.append(pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor(name, array) for name, array in found.items()]))
                except Exception as e:  # noqa: BLE001
                    self._release(int(p.counted))  # admitted, but it goes no further
                    responses.append(self._error(e))
        return responses

    def _parse(self, request: Any) -> text_requests.Parsed:
        arrays = [pb_utils.get_input_tensor_by_name(request, name) for name in self.input_names]
        return text_requests.parse_raw(*(None if t is None else t.as_numpy() for t in arrays), self.raw_rules)

    def _search(self, requests: list[Any]) -> list[Any]:
        """Mode search: each request checked (refusals answered at once), the others searched together
        (:func:`search_logic.search`), each answered with the outputs it asked for."""
        names = self.input_names
        inputs: list[dict[str, np.ndarray] | Exception] = []
        for request in requests:
            try:
                inputs.append({t.name(): t.as_numpy() for t in request.inputs()})
            except Exception as e:  # noqa: BLE001 - any problem is this request's error, never the instance's
                inputs.append(e)
        proven = search_logic.proven_ids([None if isinstance(i, Exception) else i.get(names[1]) for i in inputs],
                                         self.rules.store_size)
        parsed: list[Any] = []
        for request, found, ok in zip(requests, inputs, proven, strict=True):
            try:
                if isinstance(found, Exception):
                    raise found
                asked = getattr(request, "requested_output_names", None)
                parsed.append(search_logic.parse_request(found.get(names[0]), found.get(names[1]), found.get(names[2]),
                                                         self.rules, wants=None if asked is None else asked(),
                                                         ids_proven=ok))
            except Exception as e:  # noqa: BLE001
                parsed.append(e)
        # Refusals are answered now, through each request's response sender (their place in the list is None).
        responses = [None if self._answer_now(r, p) else self._refusal(p) if isinstance(p, Exception) else p
                     for r, p in zip(requests, parsed, strict=True)]
        todo = [i for i, r in enumerate(responses) if isinstance(r, search_logic.Request)]
        found = search_logic.search([responses[i] for i in todo], self.search, self.queries, self.strings,
                                    self.output_names)
        for i, answer in zip(todo, found, strict=True):
            responses[i] = self._error(answer) if isinstance(answer, Exception) else pb_utils.InferenceResponse(
                output_tensors=[self.bytes.tensor(name, array, answer.serialized[name]) if name in answer.serialized
                                else pb_utils.Tensor(name, array) for name, array in answer.arrays.items()])
        return responses

    def _answer_now(self, request: Any, parsed: Any) -> bool:
        """Send a refused request's error at once (its one response, final); False for a request that goes on
        to be encoded, or where the response sender cannot be used (then :meth:`execute` returns the error)."""
        if not isinstance(parsed, Exception) or not self.early_refusals:
            return False
        try:
            sender = request.get_response_sender()
            final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        except Exception as e:  # noqa: BLE001 - a stub without senders: answer with the batch from now on
            self.early_refusals = False
            pb_utils.Logger.log_warn(f"{self.model_name}: refusals are answered with their batch ({e})")
            return False
        try:
            sender.send(self._refusal(parsed), flags=final)
        except Exception as e:  # noqa: BLE001
            # The sender may count the response as sent before it fails: a second response for this request
            # would fail the whole batch, so none is returned for it.
            pb_utils.Logger.log_warn(f"{self.model_name}: a refusal could not be sent ({e})")
        return True

    def _refusal(self, error: Exception) -> Any:
        """The error response of a refused request: UNAVAILABLE for overload, else as :meth:`_error` says."""
        if isinstance(error, text_requests.Overloaded):
            return coded_response(str(error), "UNAVAILABLE")
        return self._error(error)

    def _release(self, n: int) -> None:
        if self.in_flight is not None and n > 0:
            try:
                self.in_flight.release(n)
            except OSError as e:
                pb_utils.Logger.log_warn(f"{self.model_name}: in-flight counter unusable ({e})")

    def _error(self, error: BaseException) -> Any:
        return error_response(self.model_name, error, invalid_argument=isinstance(error, RequestError))

    def finalize(self) -> None:
        self.features = None
        if self.in_flight is not None:
            self.in_flight.close()
