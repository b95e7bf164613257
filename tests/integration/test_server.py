"""Integration tests: a real tritonserver (from the nvidia-pytriton wheel) with the project's Python backends.

One server serves a tiny repository built in a temporary directory:

- ``amc_tokenizer``: the text step (``serving/backends/text_step.py``, mode raw) with the exported MiniLM
  encoder, a small keyword table and term weights, in two versions, each running the code vendored into its own
  folder (``amc_steps/``, ``amc_contract/``: ``export.repository.write_step_code``);
- ``toy_net``: a three-node ONNX graph run by ``serving/backends/onnx_runner.py`` with dynamic batching;
- ``toy_late``: the same, not loaded at start, for the admin-key checks.

The text step's outputs are compared with the PyTorch encoder and ``amc_contract.text.LexicalMatcher`` (what
training computes), and every bad request must be INVALID_ARGUMENT with a message naming the problem.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from amc_contract import signatures as sig
from amc_contract import text as amc_text
from export.configs import step_config
from export.reference import keyword_embeddings
from export.repository import NETWORK_MODULE, TextStepFiles, write_step_code, write_text_step
from serving.endpoints import ADMIN_KEY_HEADER, GRPC_ADMIN_KEY_HEADER
from serving.server import ServerStartError, TritonServer

DOCUMENTS = [["cat", "face", "grinning face with smiling eyes"], ["dog", "red heart"], ["smiling", "eyes"],
             ["heart", "love"], ["kiwi fruit", "food"]]
TABLE = ["cat", "face", "dog", "red heart", "heart"]  # precomputed; every other keyword is encoded when served
ADMIN_KEY = "test-admin-key"
TOY, TOY_LATE = "toy_net", "toy_late"
TOKENIZER = sig.TOKENIZER.model_name
# The toy reuses real tensor names, so its error messages read like the served networks'.
REGIONS, MASK, SCORES = sig.REGIONS.name, sig.REGION_MASK.name, sig.SCORES.name
TOTAL = "total"
TOLERANCE = 1e-4


@functools.cache
def encoder():
    from amc_model.text_encoder import TextEncoder

    return TextEncoder()


@functools.cache
def matcher() -> amc_text.LexicalMatcher:
    return amc_text.LexicalMatcher(amc_text.TermWeights.from_documents(DOCUMENTS))


# ---- repository ----------------------------------------------------------------------------------------
def _toy_onnx(path: Path) -> None:
    """scores[b, n] = mask[b, n] * sum_d regions[b, n, d];  total[b, 0] = sum_n scores[b, n]."""
    nodes = [
        helper.make_node("Cast", [MASK], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", [REGIONS, "axis2"], ["rowsum"], keepdims=0),
        helper.make_node("Mul", ["rowsum", "maskf"], [SCORES]),
        helper.make_node("ReduceSum", [SCORES, "axis1"], [TOTAL], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info(REGIONS, TensorProto.FLOAT, ["batch", "candidates", "dim"]),
         helper.make_tensor_value_info(MASK, TensorProto.BOOL, ["batch", "candidates"])],
        [helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, ["batch", "candidates"]),
         helper.make_tensor_value_info(TOTAL, TensorProto.FLOAT, ["batch", 1])],
        initializer=[helper.make_tensor("axis2", TensorProto.INT64, [1], [2]),
                     helper.make_tensor("axis1", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _toy_config(name: str) -> str:
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=sig.MAX_BATCH)
    config.input.add(name=REGIONS, data_type=mc.TYPE_FP32, dims=[-1, -1])
    config.input.add(name=MASK, data_type=mc.TYPE_BOOL, dims=[-1])
    config.output.add(name=SCORES, data_type=mc.TYPE_FP32, dims=[-1])
    config.output.add(name=TOTAL, data_type=mc.TYPE_FP32, dims=[1])
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    # A long delay so that the concurrent requests of the batching test meet in one execute() call.
    config.dynamic_batching.max_queue_delay_microseconds = 100_000
    config.parameters["onnx_file"].string_value = "model.onnx"
    config.parameters["intra_op_num_threads"].string_value = "1"
    return text_format.MessageToString(config)


def _build_repository(root: Path) -> Path:
    from amc_model.text_encoder import tokenizer_json
    from export.onnx_export import export_text_encoder

    repo = root / "repo"
    export_text_encoder(encoder().model, root / "text_encoder.onnx", version=1, fingerprint="test")
    np.savez(root / "keyword_table.npz", texts=np.array(TABLE), vectors=encoder().encode_keywords(TABLE))
    files = TextStepFiles(tokenizer_json(), matcher().weights.to_json(), root / "text_encoder.onnx",
                          root / "keyword_table.npz")
    (repo / TOKENIZER).mkdir(parents=True)
    # These tests call the text steps alone: a request admitted there is freed only by its ensemble's top-k step,
    # so each valid call would hold an in-flight slot for IN_FLIGHT_EXPIRY_S; admission is tested through the
    # ensembles (tests/test_reliability.py). max_in_flight 0: no limit.
    text_config = step_config(sig.TOKENIZER, "python")
    text_config.parameters["max_in_flight"].string_value = "0"
    (repo / TOKENIZER / "config.pbtxt").write_text(text_format.MessageToString(text_config))
    for version in (1, 2):
        write_text_step(repo / TOKENIZER / str(version), version=version, files=files)
    # What publish wrote into version 1 (code compiled included): serving it must add nothing (Triton would take a
    # new file there, a __pycache__, for a changed version).
    published = sorted(str(p.relative_to(repo)) for p in (repo / TOKENIZER / "1").rglob("*"))
    (root / "published.json").write_text(json.dumps(published))
    for name in (TOY, TOY_LATE):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(_toy_config(name))
        write_step_code(repo / name / "1", NETWORK_MODULE)
        _toy_onnx(repo / name / "1" / "model.onnx")
    return repo


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_repository(tmp_path_factory.mktemp("triton"))


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[TritonServer]:
    srv = TritonServer(repository, models=[TOKENIZER, TOY], admin_key=ADMIN_KEY,
                       log_file=repository.parent / "tritonserver.log")
    srv.start(timeout_s=120)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server: TritonServer) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        yield c


# ---- request helpers -----------------------------------------------------------------------------------
def _bytes_input(name: str, array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def _queries(queries: list[bytes | str]) -> np.ndarray:
    return np.array([[q.encode() if isinstance(q, str) else q] for q in queries], dtype=object)


def _text_step(client: grpcclient.InferenceServerClient, queries: list[bytes | str],
               keywords: np.ndarray, version: str = "") -> dict[str, np.ndarray]:
    mask = grpcclient.InferInput(sig.REGION_MASK.name, [*keywords.shape[:2], 1], "BOOL")
    mask.set_data_from_numpy(np.ones((*keywords.shape[:2], 1), dtype=bool))
    result = client.infer(TOKENIZER, [_bytes_input(sig.QUERY.name, _queries(queries)),
                                      _bytes_input(sig.KEYWORDS.name, keywords), mask],
                          model_version=version, client_timeout=60)
    return {name: result.as_numpy(name) for name in sig.TOKENIZER.output_names}


def _keywords(rows: list[list[list[str]]]) -> np.ndarray:
    return np.array([[[k.encode() for k in cand] for cand in row] for row in rows], dtype=object)


def _strings(rows: list[list[list[str]]]) -> np.ndarray:
    return np.array(rows, dtype=object)


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _expected(queries: list[str], keywords: np.ndarray) -> dict[str, np.ndarray]:
    """What training computes for these strings: the PyTorch encoder and the lexical matcher."""
    return {sig.QUERY_TEXT.name: encoder().encode(queries),
            sig.KEYWORD_EMBEDDINGS.name: keyword_embeddings(keywords, encoder().encode_keywords),
            sig.KEYWORD_LEXICAL.name: np.stack([matcher().features(q, k) for q, k in zip(queries, keywords)])}


def _assert_features_match(out: dict[str, np.ndarray], queries: list[str], keywords: np.ndarray) -> None:
    want = _expected(queries, keywords)
    for name, expected in want.items():
        if name not in out:
            continue
        assert out[name].shape == expected.shape and out[name].dtype == np.float32, name
        if name == sig.KEYWORD_LEXICAL.name:
            np.testing.assert_allclose(out[name], expected, rtol=1e-6, atol=1e-7)
        else:
            assert _relative(out[name], expected) < TOLERANCE, name


def _toy_inputs(regions: np.ndarray, mask: np.ndarray) -> list[grpcclient.InferInput]:
    r = grpcclient.InferInput(REGIONS, list(regions.shape), "FP32")
    r.set_data_from_numpy(regions)
    m = grpcclient.InferInput(MASK, list(mask.shape), "BOOL")
    m.set_data_from_numpy(mask)
    return [r, m]


def _toy_expected(regions: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = regions.sum(axis=2) * mask
    return scores, scores.sum(axis=1, keepdims=True)


def _toy(client: grpcclient.InferenceServerClient, regions: np.ndarray, mask: np.ndarray,
         model: str = TOY) -> tuple[np.ndarray, np.ndarray]:
    result = client.infer(model, _toy_inputs(regions, mask), client_timeout=60)
    return result.as_numpy(SCORES), result.as_numpy(TOTAL)


def _assert_text_step_works(client: grpcclient.InferenceServerClient) -> None:
    rows = [[["cat", "face"], ["red heart", ""]]]
    _assert_features_match(_text_step(client, ["Grinning cat"], _keywords(rows)), ["Grinning cat"], _strings(rows))


def _error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def _error_message(call) -> str:
    return _error(call).message()


# ---- tests ---------------------------------------------------------------------------------------------
def test_is_the_real_tritonserver(server: TritonServer) -> None:
    meta = server.server_metadata()
    assert meta["name"] == "triton" and str(meta["version"]).startswith("2.51"), meta
    assert server.is_real_tritonserver()
    assert server.grpc_url.startswith("127.0.0.1:") and server.http_url.startswith("127.0.0.1:")
    assert Path(f"/proc/{server.pid}/exe").resolve().name == "tritonserver"


def test_text_step_matches_training_code(client: grpcclient.InferenceServerClient, repository: Path) -> None:
    """Embeddings (from the table, and encoded on the fly for keywords it lacks) and lexical features equal
    what training computes for the same strings."""
    rows = [[["cat", "face", ""], ["grinning face with smiling eyes", "dog", "Red"]],
            [["heart", "", ""], ["", "", ""]]]
    queries = ["Grinning CAT face!", "red heart"]
    out = _text_step(client, queries, _keywords(rows), version="1")
    _assert_features_match(out, queries, _strings(rows))
    assert out[sig.KEYWORD_EMBEDDINGS.name].shape == (2, 2, 3, sig.TEXT_EMBEDDING_DIM)
    assert not out[sig.KEYWORD_EMBEDDINGS.name][1, 1].any()  # a candidate of padding: zero vectors
    assert out[sig.KEYWORD_LEXICAL.name][0, 0, 0, 0] == 1.0  # "cat" is all in the query
    np.testing.assert_array_equal(out[sig.TOKENIZER_VERSION.name], [[1], [1]])
    # Serving wrote nothing into the version directory (no bytecode: Triton would see a changed version).
    published = json.loads((repository.parent / "published.json").read_text())
    assert sorted(str(p.relative_to(repository)) for p in (repository / TOKENIZER / "1").rglob("*")) == published


@pytest.mark.parametrize("query", ["kiwifruit", "guardsman", "猫", "кошка", "😺", "grinning cat 😺", "?!"])
def test_any_query_gets_features(client: grpcclient.InferenceServerClient, query: str) -> None:
    """Words outside any vocabulary, other scripts and emoji are encoded (WordPiece covers them), not refused."""
    rows = [[["kiwi fruit", "guardsman"], ["cat", ""]]]
    out = _text_step(client, [query], _keywords(rows))
    _assert_features_match(out, [query], _strings(rows))
    assert abs(float(np.linalg.norm(out[sig.QUERY_TEXT.name])) - 1) < 1e-5


def test_each_version_runs_the_code_published_with_it(
        client: grpcclient.InferenceServerClient, server: TritonServer, repository: Path) -> None:
    log = server.log_path.read_text() if server.log_path else ""
    for version in ("1", "2"):  # what each version's initialize() logged: its own folder's copy of the text rules
        assert f"from {repository.resolve() / TOKENIZER / version / 'amc_contract' / 'text.py'}" in log, log[-3000:]
    # The version policy is `all`, so both versions were loaded at start; the unversioned name gets the latest.
    assert client.is_model_ready(TOKENIZER, "1") and client.is_model_ready(TOKENIZER, "2")
    rows = [[["dog"]]]
    out = _text_step(client, ["smiling dog"], _keywords(rows))
    np.testing.assert_array_equal(out[sig.TOKENIZER_VERSION.name], [[2]])
    _assert_features_match(out, ["smiling dog"], _strings(rows))


@pytest.mark.parametrize(("query", "keywords", "expected"), [
    ("", [[["cat"]]], "amc_tokenizer: query is empty"),
    ("   \t", [[["cat"]]], "amc_tokenizer: query is empty"),
    (b"cat\xff", [[["cat"]]], "amc_tokenizer: query is not valid UTF-8 (byte 0xff at position 3)"),
    ("cat", [[]], "amc_tokenizer: candidate set is empty"),
])
def test_text_step_rejects_bad_requests(client: grpcclient.InferenceServerClient, query: bytes | str,
                                        keywords: list, expected: str) -> None:
    array = _keywords(keywords) if keywords != [[]] else np.empty((1, 0, 1), dtype=object)
    error = _error(lambda: _text_step(client, [query], array))
    assert expected in error.message(), error.message()
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    _assert_text_step_works(client)  # the instance survived


def test_text_step_rejects_bad_keywords_and_too_many_candidates(client: grpcclient.InferenceServerClient) -> None:
    keywords = np.array([[[b"cat"], [b"\xc3\x28 bad"]]], dtype=object)
    message = _error_message(lambda: _text_step(client, ["cat"], keywords))
    assert "keywords[0, 1, 0] is not valid UTF-8 (byte 0xc3 at position 0)" in message, message
    too_many = np.full((1, sig.MAX_CANDIDATES + 1, 1), b"cat", dtype=object)
    error = _error(lambda: _text_step(client, ["cat"], too_many))
    assert f"{sig.MAX_CANDIDATES + 1} candidates exceed the maximum of {sig.MAX_CANDIDATES}" in error.message()
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    _assert_text_step_works(client)


def test_onnx_runner_batches_and_isolates_bad_requests(client: grpcclient.InferenceServerClient) -> None:
    rng = np.random.default_rng(0)
    shapes = [(1, 3, 4), (2, 3, 4), (1, 5, 4), (1, 3, 4), (3, 5, 4), (1, 3, 4)]
    cases = [(rng.standard_normal(s).astype(np.float32), rng.random(s[:2]) > 0.3) for s in shapes]
    cases[3][0][0, 1, 2] = np.nan  # shares its shape group with requests 0, 1 and 5
    answers: queue.Queue[tuple[int, object]] = queue.Queue()

    def callback(i: int, result, error) -> None:
        answers.put((i, error if error is not None else (result.as_numpy(SCORES), result.as_numpy(TOTAL))))

    # Async calls land within the 100 ms batching window, so execute() sees several requests at once.
    for i, (regions, mask) in enumerate(cases):
        client.async_infer(TOY, _toy_inputs(regions, mask), callback=functools.partial(callback, i),
                           client_timeout=30)
    results: list[object] = [None] * len(cases)
    for _ in cases:
        i, answer = answers.get(timeout=30)
        results[i] = answer
    for i, ((regions, mask), got) in enumerate(zip(cases, results, strict=True)):
        if i == 3:
            assert isinstance(got, InferenceServerException)
            assert "toy_net: regions contains NaN or infinite values" in got.message()
            continue
        assert not isinstance(got, Exception), got
        for g, want in zip(got, _toy_expected(regions, mask), strict=True):
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)
    stats = client.get_inference_statistics(TOY, as_json=True)["model_stats"][0]
    # Fewer executions than requests: the dynamic batcher grouped some of them.
    requests = sum(int(stats["inference_stats"][k].get("count", 0)) for k in ("success", "fail"))
    assert int(stats["execution_count"]) < requests, stats


def test_onnx_runner_error_then_recovers(client: grpcclient.InferenceServerClient) -> None:
    regions = np.ones((1, 2, 3), dtype=np.float32)
    regions[0, 0, 0] = np.inf
    mask = np.ones((1, 2), dtype=bool)
    error = _error(lambda: _toy(client, regions, mask))
    assert error.message().endswith("toy_net: regions contains NaN or infinite values"), error.message()
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    scores, total = _toy(client, np.ones((1, 2, 3), dtype=np.float32), mask)
    np.testing.assert_allclose(scores, [[3.0, 3.0]])
    np.testing.assert_allclose(total, [[6.0]])


def test_large_request(client: grpcclient.InferenceServerClient) -> None:
    # 100 candidates x 49 regions x 1280 channels float32 = 25 MB in one gRPC message.
    regions = np.random.default_rng(1).random((1, 100 * sig.REGIONS_PER_IMAGE, sig.REGION_FEATURE_DIM),
                                              dtype=np.float32)
    mask = np.ones(regions.shape[:2], dtype=bool)
    scores, _ = _toy(client, regions, mask)
    np.testing.assert_allclose(scores, _toy_expected(regions, mask)[0], rtol=1e-4)


def _http_index(server: TritonServer, headers: dict[str, str]) -> int:
    request = urllib.request.Request(f"http://{server.http_url}/v2/repository/index", data=b"{}",
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_admin_key_guards_model_repository(client: grpcclient.InferenceServerClient,
                                           server: TritonServer) -> None:
    assert not client.is_model_ready(TOY_LATE)
    for headers in ({}, {GRPC_ADMIN_KEY_HEADER: "wrong"}, {ADMIN_KEY_HEADER: ADMIN_KEY}):
        # The plain header is not enough on gRPC: Triton expects it with its "triton-grpc-protocol-" prefix.
        message = _error_message(lambda h=headers: client.load_model(TOY_LATE, headers=h))
        assert f"restricted, expecting header '{GRPC_ADMIN_KEY_HEADER}'" in message, message
    _error_message(lambda: client.get_model_repository_index())
    _error_message(lambda: client.unload_model(TOY))
    assert not client.is_model_ready(TOY_LATE) and client.is_model_ready(TOY)
    assert _http_index(server, {}) == 403
    assert _http_index(server, {ADMIN_KEY_HEADER: "wrong"}) == 403
    assert _http_index(server, server.http_admin_headers) == 200

    client.load_model(TOY_LATE, headers={GRPC_ADMIN_KEY_HEADER: ADMIN_KEY})
    assert client.is_model_ready(TOY_LATE)
    scores, _ = _toy(client, np.ones((1, 2, 2), dtype=np.float32), np.array([[True, False]]), model=TOY_LATE)
    np.testing.assert_allclose(scores, [[2.0, 0.0]])
    index = client.get_model_repository_index(headers=server.admin_headers, as_json=True)
    assert {m["name"] for m in index["models"]} >= {TOY, TOY_LATE, TOKENIZER}
    client.unload_model(TOY_LATE, headers=server.admin_headers)


def test_start_failure_reports_log(repository: Path) -> None:
    log = repository.parent / "failed-start.log"
    srv = TritonServer(repository, models=["no_such_model"], log_file=log)
    with pytest.raises(ServerStartError) as info:
        srv.start(timeout_s=60)
    assert "no_such_model" in str(info.value) and "failed to load" in info.value.log_tail
    assert srv.poll() is not None and "no_such_model" in log.read_text()


def test_stop_leaves_no_process(repository: Path) -> None:
    srv = TritonServer(repository, models=[TOKENIZER])
    with srv:
        pid = srv.pid
        assert pid is not None
        assert srv.is_real_tritonserver()
    assert srv.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # neither the server nor any Python-backend stub of its group is left
    started = time.monotonic()
    assert srv.stop() is not None and time.monotonic() - started < 1  # stopping twice is harmless
