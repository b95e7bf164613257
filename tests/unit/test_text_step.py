"""The text step's raw mode (``amc_tokenizer``) without a server: its functions (``serving/backends/text_requests.py``)
and the step's ``TritonPythonModel`` in-process with the shared fake ``pb_utils`` (``tests/fake_pb_utils.py``). Every
bad input that tests/integration/test_server.py and test_serving.py send to this step on a real tritonserver is
refused here with the same message (those the ``amc`` ensemble's catalogue, ``serving.faults.bad_requests``, sends:
``test_network_step.py``); search mode: ``test_search_step.py``."""

from __future__ import annotations

import json

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from amc_contract import RequestError
from amc_contract import signatures as sig
from amc_contract import text as amc_text
from serving.backends import search, text_requests
from serving.backends.admission import InFlight
from tests import fake_pb_utils

NAMES = {"🐱": "cat face"}


def raw_rules(**bounds: int) -> text_requests.RawRules:
    """The raw step's rules: its input names, the given bounds (else the signatures'), text rules 2."""
    normalize = search.QueryText(None, None, amc_text.EmojiNames(NAMES)).normalize
    return text_requests.RawRules(tuple(sig.TOKENIZER.input_names),
                                  text_requests.Bounds.of({k: str(v) for k, v in bounds.items()}), normalize, 2)


def raw(query: bytes = b"cat face", n: int = 2, r: int = 3, k: int = 2, batch: int = 1) -> list[np.ndarray]:
    """A well-formed raw request's query, keywords and region_mask (as ``serving.faults.request`` makes them)."""
    keywords = np.full((batch, n, k), b"", dtype=object)
    if k:
        keywords[..., 0] = b"cat"
    return [np.array([[query]] * batch, dtype=object), keywords, np.ones((batch, n, r), dtype=bool)]


def setting(arrays: list[np.ndarray], which: int, index: tuple, value: object) -> list[np.ndarray]:
    out = [a.copy() for a in arrays]
    out[which][index] = value
    return out


def words(n: int) -> bytes:
    return " ".join(["word"] * n).encode()


# ---- raw mode: a request's checks ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("arrays", "message"), [
    # tests/integration/test_server.py (amc_tokenizer alone)
    (raw(b""), "query is empty"),
    (raw(b"   \t"), "query is empty"),
    (raw(b"cat\xff"), "query is not valid UTF-8 (byte 0xff at position 3)"),
    (raw(n=0), "candidate set is empty"),
    (setting(raw(), 1, (0, 1, 0), b"\xc3\x28 bad"), "keywords[0, 1, 0] is not valid UTF-8 (byte 0xc3 at position 0)"),
    (raw(n=sig.MAX_CANDIDATES + 1, r=1, k=1), f"{sig.MAX_CANDIDATES + 1} candidates exceed the maximum of "
                                             f"{sig.MAX_CANDIDATES}"),
    # tests/integration/test_serving.py and test_reliability.py (through the amc ensemble)
    (raw(b" \t\n"), "query is empty"),
    (raw(b"\xff\xfecat"), "query is not valid UTF-8 (byte 0xff at position 0)"),
    (raw(b"?!"), "query '?!' normalizes to nothing: it has no letter, digit or emoji to search for (text rules 2)"),
    (raw(b" ... "), "query ' ... ' normalizes to nothing"),
    (raw(b"_-_"), "query '_-_' normalizes to nothing"),
    (raw(b"cat " * 262_144), f"query is 1048576 bytes long, more than the maximum of {sig.MAX_QUERY_BYTES} bytes of "
                             "UTF-8"),
    (raw(b"x" * (sig.MAX_QUERY_BYTES + 1)), f"maximum of {sig.MAX_QUERY_BYTES} bytes"),
    (raw(n=5000, r=1, k=1), f"5000 candidates exceed the maximum of {sig.MAX_CANDIDATES}"),
    (raw(k=sig.MAX_KEYWORDS + 1), f"keywords has {sig.MAX_KEYWORDS + 1} keyword slots per candidate, more than the "
                                  f"maximum of {sig.MAX_KEYWORDS}"),
    (raw(n=1, r=1, k=10_000), f"keywords has 10000 keyword slots per candidate, more than the maximum of "
                              f"{sig.MAX_KEYWORDS}"),
    (setting(raw(), 1, (0, 0, 1), words(sig.MAX_KEYWORD_WORDS + 1)),
     f"keywords[0, 0, 1] has {sig.MAX_KEYWORD_WORDS + 1} words, more than the maximum of {sig.MAX_KEYWORD_WORDS} "
     "words per keyword"),
    (setting(raw(), 1, (0, 0, 1), b"x" * (sig.MAX_KEYWORD_BYTES + 1)),
     f"keywords[0, 0, 1] is {sig.MAX_KEYWORD_BYTES + 1} bytes long, more than the maximum of {sig.MAX_KEYWORD_BYTES} "
     "bytes of UTF-8 per keyword"),
    ([raw()[0], raw()[1], raw(n=3)[2]], "keywords has 2 candidates per query but region_mask has 3 (shapes [1, 2, 2] "
                                        "and [1, 3, 3]): every candidate needs regions and a keyword list, padded "
                                        "with '' to equal lengths"),
    (raw(r=0), "region_mask has no region per candidate (shape [1, 2, 0]); every candidate needs at least one region"),
    (raw(k=0), "keywords has no keyword slot per candidate; pad with '' to at least 1"),
    ([raw(batch=2)[0], *raw()[1:]], "keywords must have shape [batch, candidates, keywords] with the query's batch "
                                    "size 2, got [1, 2, 2]"),
    ([raw()[0], None, raw()[2]], "input keywords is missing"),
    # what only a caller of the step itself can send
    ([None, *raw()[1:]], "input query is missing"),
    ([raw()[0], raw()[1], None], "input region_mask is missing"),
    ([np.array([[b"cat", b"dog"]], dtype=object), *raw()[1:]], "query must have shape [batch, 1], got [1, 2]"),
    ([raw()[0], np.full((1, 2), b"cat", dtype=object), raw()[2]], "keywords must have shape [batch, candidates, "
                                                                 "keywords] with the query's batch size 1, got [1, 2]"),
    ([raw()[0], raw()[1], np.ones((1, 2), dtype=bool)], "region_mask has no region per candidate (shape [1, 2])"),
    ([raw()[0], raw()[1], np.ones((1,), dtype=bool)], "keywords has 2 candidates per query but region_mask has ? "
                                                      "(shapes [1, 2, 2] and [1])"),
    ([np.array([[b"cat"], [b"  "]], dtype=object), *raw(batch=2)[1:]], "query 1 of the batch is empty"),
    # the first problem in the order the checks have always run: shapes, bounds, keywords, then the query's text
    (setting(raw(b""), 1, (0, 1, 0), b"\xff"), "keywords[0, 1, 0] is not valid UTF-8"),
    (raw(b"", n=0), "candidate set is empty"),
])
def test_raw_bad_requests_are_refused_naming_the_problem(arrays, message):
    with pytest.raises(RequestError) as info:
        text_requests.parse_raw(*arrays, raw_rules())
    assert message in str(info.value)


def test_raw_bounds_come_from_the_config_and_hold_at_their_limits():
    assert text_requests.Bounds.of({}) == text_requests.Bounds(**sig.REQUEST_BOUNDS)
    assert text_requests.Bounds.of({"max_candidates": "5", "max_keywords": ""}).max_keywords == sig.MAX_KEYWORDS
    with pytest.raises(RequestError, match="^6 candidates exceed the maximum of 5$"):
        text_requests.parse_raw(*raw(n=6), raw_rules(max_candidates=5))
    at = setting(raw(b"y" * sig.MAX_QUERY_BYTES, n=sig.MAX_CANDIDATES, r=1, k=sig.MAX_KEYWORDS), 1, (0, 0, 1),
                 words(sig.MAX_KEYWORD_WORDS))
    at[1][0, 1, 1] = b"x" * sig.MAX_KEYWORD_BYTES
    parsed = text_requests.parse_raw(*at, raw_rules())
    assert parsed.keywords.shape == (1, sig.MAX_CANDIDATES, sig.MAX_KEYWORDS) and parsed.texts == ["y" * 1024]


def test_a_good_raw_request_is_read_by_the_versions_rules():
    query = np.array([["🐱 Thumbs_Up!".encode()], [b"dog"]], dtype=object)
    keywords = np.array([[["café".encode(), b""]], [[b"cat", b"dog"]]], dtype=object)
    parsed = text_requests.parse_raw(query, keywords, np.ones((2, 1, 4), bool), raw_rules())
    assert parsed.texts == ["cat face thumbs up", "dog"] and parsed.counted
    assert parsed.keywords.tolist() == [[["café", ""]], [["cat", "dog"]]]


@st.composite
def _random_raw(draw) -> list[np.ndarray]:
    """Random shapes and bytes for the raw step's three inputs (tests/integration/test_reliability.py's fuzz, without
    the regions only VAN reads): mostly wrong, sometimes right."""
    b, n, r, k = draw(st.integers(1, 2)), draw(st.integers(0, 4)), draw(st.integers(0, 3)), draw(st.integers(0, 3))
    text = st.one_of(st.binary(max_size=24), st.text(max_size=12).map(str.encode))

    def strings(shape: tuple[int, ...]) -> np.ndarray:
        out = np.empty(int(np.prod(shape)), dtype=object)
        out[:] = [draw(text) for _ in range(out.size)]
        return out.reshape(shape)

    return [strings((draw(st.sampled_from([b, b, b + 1])), 1)), strings((b, n, k)),
            np.full((b, n + draw(st.integers(-1, 1)) if n else n, r + draw(st.integers(0, 1))), draw(st.booleans()))]


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(arrays=_random_raw())
def test_fuzz_random_raw_requests_are_read_or_refused_by_request_error(arrays):
    """Never another exception (the step would answer INTERNAL): a request is read, or refused naming why."""
    try:
        parsed = text_requests.parse_raw(*arrays, raw_rules())
    except RequestError:
        return
    assert len(parsed.texts) == arrays[0].shape[0] and parsed.keywords.shape == arrays[1].shape


# ---- admission ---------------------------------------------------------------------------------------------------
def test_admission_takes_a_slot_per_valid_request_and_overloads_the_rest(tmp_path):
    counter = InFlight(tmp_path / "counter", limit=2, expiry_s=30)
    parsed = [text_requests.Parsed(["a"]), RequestError("bad"), text_requests.Parsed(["b"]),
              text_requests.Parsed(["c"])]
    out, warning = text_requests.admit(parsed, counter, "amc_tokenizer", 3)
    assert warning is None and out[:3] == parsed[:3] and isinstance(out[3], text_requests.Overloaded)
    assert str(out[3]) == ("amc_tokenizer: overloaded: 2 requests in flight through version 3, the limit is 2; retry "
                           "after a backoff")
    assert counter.in_flight() == 2
    # Without a counter nothing is counted.
    alone = [text_requests.Parsed(["e"])]
    assert text_requests.admit(alone, None, "x", 3) == (alone, None) and not alone[0].counted


def test_an_unusable_counter_admits_uncounted_and_says_so():
    class Broken:
        limit = 1

        def admit(self, n):
            raise OSError("gone")

    parsed = [text_requests.Parsed(["a"]), text_requests.Parsed(["b"])]
    out, warning = text_requests.admit(parsed, Broken(), "amc_tokenizer", 1)
    assert out == parsed and not any(p.counted for p in out)
    assert warning == "amc_tokenizer: in-flight counter unusable (gone); admitting"


# ---- the answers -------------------------------------------------------------------------------------------------
class Features:
    """A stand-in for ``TextFeatures``: records its calls; fails where told ("encoder", or a keyword "boom")."""

    def __init__(self, fail: str = "") -> None:
        self.fail, self.calls = fail, []

    def query_text(self, texts, *, normalized):
        self.calls.append(("query_text", list(texts)))
        if self.fail == "encoder":
            raise RuntimeError("encoder down")
        return np.arange(len(texts) * 2, dtype=np.float32).reshape(len(texts), 2)

    def keyword_embeddings(self, keywords):
        if "boom" in keywords:
            raise ValueError("boom")
        return np.zeros((*keywords.shape, 2), np.float32)

    def lexical(self, texts, keywords, *, normalized):
        return np.zeros((*keywords.shape, 3), np.float32)


def test_raw_answers_encode_the_batch_once_and_fail_alone():
    released: list[int] = []
    keywords = np.array([[["cat", ""]]], dtype=object)
    parsed = [text_requests.Parsed(["a", "b"], keywords=np.concatenate([keywords] * 2)), RequestError("bad"),
              text_requests.Parsed(["c"], keywords=np.array([[["boom", ""]]], dtype=object)),
              text_requests.Parsed(["d"], keywords=keywords, counted=False)]
    features = Features()
    names = sig.TOKENIZER.output_names
    out = text_requests.answer(parsed, features, names, 7, released.append)
    assert features.calls == [("query_text", ["a", "b", "c", "d"])]
    assert list(out[0]) == names and out[0][names[0]].tolist() == [[0, 1], [2, 3]]
    assert out[0][names[3]].tolist() == [[7], [7]] and out[0][names[2]].shape == (2, 1, 2, 3)
    assert out[1] is parsed[1] and isinstance(out[2], ValueError) and released == [1]  # its slot freed
    assert out[3][names[0]].tolist() == [[6, 7]]  # the queries after a failed request keep their embeddings
    broken = text_requests.answer(parsed, Features("encoder"), names, 7, released.append)
    assert [str(x) for x in (broken[0], broken[2], broken[3])] == ["encoder down"] * 3 and released == [1, 2]


def test_a_config_of_other_tensors_than_the_mode_needs_is_refused():
    config = {"input": [{"name": "query", "data_type": "TYPE_STRING", "dims": [1]}]}
    with pytest.raises(ValueError, match=r"amc_tokenizer: config inputs \['query'\] have \(dtype, rank\) "
                                         r"\(\('TYPE_STRING', 1\),\); the raw text step needs"):
        text_requests.config_names(config, "input", "raw", "amc_tokenizer")


# ---- the step in-process -----------------------------------------------------------------------------------------
def stand_in_encoder(path) -> None:
    """An ONNX graph with the sentence encoder's input and output (text_tokens -> 384-d text_embedding): what it
    computes does not matter here, only that the step loads and runs it."""
    import onnx
    from onnx import TensorProto, helper

    tokens, embedding = sig.TEXT_TOKENS.name, sig.TEXT_EMBEDDING.name
    nodes = [helper.make_node("Cast", [tokens], ["as_float"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["as_float", "axis1"], ["total"], keepdims=1),
             helper.make_node("Mul", ["total", "ones"], [embedding])]
    graph = helper.make_graph(
        nodes, "stand_in_encoder",
        [helper.make_tensor_value_info(tokens, TensorProto.INT64, ["batch", "tokens"])],
        [helper.make_tensor_value_info(embedding, TensorProto.FLOAT, ["batch", sig.TEXT_EMBEDDING_DIM])],
        initializer=[helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
                     helper.make_tensor("ones", TensorProto.FLOAT, [1, sig.TEXT_EMBEDDING_DIM],
                                        [1.0] * sig.TEXT_EMBEDDING_DIM)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def load_step(pb_utils, here, config, name: str):
    """The version 1 of the model folder ``here`` loaded as a stub loads it, with ``config`` (a ModelConfig)."""
    from google.protobuf import json_format

    config = json_format.MessageToDict(config, preserving_proto_field_name=True)
    for tensor in config["input"] + config["output"]:  # protobuf's JSON writes int64 as strings, Triton's as numbers
        tensor["dims"] = [int(d) for d in tensor["dims"]]
    step = fake_pb_utils.load_step(here / "1" / "model.py").TritonPythonModel()
    step.initialize({"model_config": json.dumps(config), "model_name": name, "model_version": "1",
                     "model_repository": str(here)})
    return step


@pytest.fixture
def ranking_step(tmp_path):
    """The raw text step (amc_tokenizer) as publish lays it out, text rules 2, over a stand-in encoder."""
    from amc_contract.text import EmojiNames, TermWeights
    from amc_model.text_encoder import tokenizer_json
    from export.configs import step_config
    from export.repository import TextStepFiles, write_text_step

    here = tmp_path / sig.TOKENIZER.model_name
    stand_in_encoder(tmp_path / "text_encoder.onnx")
    files = TextStepFiles(tokenizer_json(), TermWeights.from_documents([["cat", "face"], ["thumbs up"]]).to_json(),
                          tmp_path / "text_encoder.onnx", text_rules=2,
                          emoji_names_json=EmojiNames(NAMES).to_json())
    write_text_step(here / "1", version=1, files=files)
    config = step_config(sig.TOKENIZER, "python")
    config.parameters["max_in_flight"].string_value = "0"  # no top-k step frees slots here
    with fake_pb_utils.installed() as pb_utils:
        step = load_step(pb_utils, here, config, sig.TOKENIZER.model_name)
        yield step, pb_utils
        step.finalize()


def ask_raw(pb_utils, arrays):
    return pb_utils.InferenceRequest({n: a for n, a in zip(sig.TOKENIZER.input_names, arrays, strict=True)
                                      if a is not None})


def test_the_ranking_text_step_reads_queries_by_its_rules_in_process(ranking_step) -> None:
    """A query is read by the version's text rules (emoji names, case, punctuation); the bad ones are refused at
    once, through their senders, with the message and code a server gives, and the good ones still answered."""
    step, pb_utils = ranking_step
    keywords, mask = np.array([[[b"cat face", b""]]], dtype=object), np.ones((1, 1, 2), dtype=bool)
    requests = [ask_raw(pb_utils, [np.array([[q]], dtype=object), keywords, mask])
                for q in ("🐱 Thumbs_Up!".encode(), b"?!", b"\xff\xfecat")]
    requests.append(ask_raw(pb_utils, raw(r=0)))
    requests.append(ask_raw(pb_utils, [raw()[0], None, raw()[2]]))
    returned = step.execute(requests)
    assert returned[0] is not None and all(r is None for r in returned[1:])  # refused at once
    answers = [fake_pb_utils.answer(r, a) for r, a in zip(requests, returned, strict=True)]
    assert not answers[0].has_error()
    out = fake_pb_utils.outputs(answers[0])
    assert list(out) == sig.TOKENIZER.output_names and out[sig.TOKENIZER_VERSION.name].tolist() == [[1]]
    lexical = out[sig.KEYWORD_LEXICAL.name]  # "cat face" read in the query
    assert lexical.shape == (1, 1, 2, 3) and lexical[0, 0, 0, 0] == 1.0
    assert out[sig.KEYWORD_EMBEDDINGS.name].shape == (1, 1, 2, sig.TEXT_EMBEDDING_DIM)
    for answer, message in zip(answers[1:], ["query '?!' normalizes to nothing",
                                             "query is not valid UTF-8 (byte 0xff at position 0)",
                                             "region_mask has no region per candidate", "input keywords is missing"],
                               strict=True):
        assert answer.error().message().startswith(f"{sig.TOKENIZER.model_name}: {message}")
        assert answer.error().code() == pb_utils.TritonError.INVALID_ARG


def test_the_ranking_text_step_refuses_the_excess_as_unavailable(ranking_step, tmp_path) -> None:
    step, pb_utils = ranking_step
    step.in_flight = InFlight(tmp_path / "counter", limit=1, expiry_s=30)
    requests = [ask_raw(pb_utils, raw()), ask_raw(pb_utils, raw(b"dog"))]
    returned = step.execute(requests)
    assert not returned[0].has_error() and returned[1] is None
    refusal = fake_pb_utils.answer(requests[1], None).error()
    assert refusal.code() == pb_utils.TritonError.UNAVAILABLE
    assert refusal.message() == ("amc_tokenizer: overloaded: 1 requests in flight through version 1, the limit is 1; "
                                 "retry after a backoff")
    assert step.in_flight.in_flight() == 1  # the admitted one holds its slot until the top-k step frees it
