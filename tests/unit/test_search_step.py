"""The search step (``amc_search_step``) without a server: its functions (``serving/backends/search.py``; its graph
calls, ``search_graph.py``) and its ``TritonPythonModel`` run in-process with the shared fake ``pb_utils``
(``tests/fake_pb_utils.py``) over a stand-in search graph. Every bad input the integration tests send to a real
tritonserver is refused here with the same message (tests/integration/test_serving.py)."""

from __future__ import annotations

import json
import random
import string

import numpy as np
import pytest

from amc_contract import signatures as sig
from amc_contract import text as amc_text
from serving.backends import search
from tests import fake_pb_utils

IDS = ["a", "b", "ç", "d", "e", "🐱 id"]
KEYWORDS = [["cat", "face"], ["dog"], ["red heart", "love", "heart"], ["kiwi fruit"], ["café au lait"],
            ["thumbs up", "ok hand", "🐱"]]
NAMES = {"🐱": "cat face", "👍": "thumbs up", "#\u20e3": "keycap #", "🇯🇵": "flag: Japan"}
STEP_NAMES = tuple(t.name for t in sig.SEARCH_STEP.inputs)


@pytest.fixture(scope="module")
def wordpiece():
    from amc_model.text_encoder import tokenizer_json

    return amc_text.load_wordpiece(tokenizer_json())


@pytest.fixture(scope="module")
def query_text(wordpiece):
    from amc_model.text_encoder import tokenizer_json

    weights = amc_text.TermWeights.from_documents(KEYWORDS)
    words = amc_text.StoreWords(weights, [k for row in KEYWORDS for k in row])
    return search.QueryText(wordpiece, words, amc_text.EmojiNames(NAMES), tokenizer_json=tokenizer_json())


def rules(query_text, **changes) -> search.Rules:
    base = dict(names=STEP_NAMES, version=1, store_size=len(IDS), max_query_bytes=1024,
                normalize=query_text.normalize, text_rules=2)
    return search.Rules(**{**base, **changes})


def q(*texts: bytes) -> np.ndarray:
    return np.array([[t] for t in texts], dtype=object)


def i64(rows) -> np.ndarray:
    return np.asarray(rows, dtype=np.int64)


# ---- the fake backend and BYTES ----------------------------------------------------------------------------------
def test_the_fake_backend_serializes_bytes_with_the_wheels_serializer():
    array = np.array([[b"cat", "caf\u00e9".encode(), b""]], dtype=object)
    with fake_pb_utils.installed() as pb_utils:
        real = pb_utils.serialize_byte_tensor(array)
        assert real == b"\x03\x00\x00\x00cat\x05\x00\x00\x00caf\xc3\xa9\x00\x00\x00\x00"
        assert pb_utils.Tensor("x", array).serialized == real
        pb_utils.serialize_byte_tensor = lambda _: b"seen"  # looked up when each Tensor is made, as the stub does
        assert pb_utils.Tensor("x", array).serialized == b"seen"
        assert pb_utils.Tensor("y", np.zeros((1, 2), np.float32)).serialized is None


def test_store_rows_serialize_as_triton_serializes_their_gathers():
    strings = search.StoreStrings(IDS, KEYWORDS)
    serialize = fake_pb_utils.make().serialize_byte_tensor
    assert strings.keywords.shape == (6, 3) and strings.keywords[4].tolist() == ["café au lait".encode(), b"", b""]
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 4), (3, 2), (2, 6)]:
        kept = np.stack([rng.permutation(6)[: shape[1]] for _ in range(shape[0])])
        assert b"".join(strings.packed_ids[kept.reshape(-1)].tolist()) == serialize(strings.ids[kept])
        assert b"".join(strings.packed_keywords[kept.reshape(-1)].tolist()) == serialize(strings.keywords[kept])


def test_bytes_tensors_take_the_rows_serialization_and_fall_back_to_the_stubs():
    strings = search.StoreStrings(IDS, KEYWORDS)
    kept = np.array([[2, 5, 0]])
    array, packed = strings.keywords[kept], b"".join(strings.packed_keywords[kept.reshape(-1)].tolist())
    with fake_pb_utils.installed() as pb_utils:
        real, calls = pb_utils.serialize_byte_tensor, []
        pb_utils.serialize_byte_tensor = lambda a: calls.append(a) or real(a)
        handoff = search.SerializedBytes(pb_utils)
        tensor = handoff.tensor("stored_keywords", array, packed)
        assert tensor.serialized is packed and calls == []  # the stub's serializer never ran
        assert pb_utils.Tensor("other", strings.ids[kept]).serialized == real(strings.ids[kept])  # others as before
        assert len(calls) == 1 and not handoff.missed
        # An array the stub must copy first (not C-contiguous) is not the one handed over: serialized by the stub.
        strided = strings.keywords[kept][:, ::2]
        tensor = handoff.tensor("stored_keywords", strided, b"never used")
        assert tensor.serialized == real(np.ascontiguousarray(strided)) and handoff.missed
        assert sum(level == "warn" for level, _ in pb_utils.Logger.lines) >= 1
        handoff.tensor("stored_keywords", array, packed)
        assert pb_utils.serialize_byte_tensor.amc_pending == []  # nothing left waiting


# ---- a request's checks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("query", "ids", "top_k", "message"), [
    (None, None, None, "input query is missing"),
    (np.array([[b"cat", b"dog"]], dtype=object), None, None, "query must have shape [batch, 1], got [1, 2]"),
    (q(b"cat"), i64([[3, 6]]), None, "candidate_ids[0, 1] = 6 is outside the candidate store of version 1 (0 .. 5)"),
    (q(b"cat"), i64([[-1]]), None, "candidate_ids[0, 0] = -1 is outside the candidate store of version 1 (0 .. 5)"),
    (q(b"cat"), i64([[4, 2, 4]]), None, "candidate_ids[0] repeats store row 4 (at positions 0 and 2); each candidate "
                                        "may appear once"),
    (q(b"cat", b"dog"), i64([[1, 2], [3, 3]]), None, "candidate_ids[1] repeats store row 3 (at positions 0 and 1)"),
    (q(b"cat"), np.empty((1, 0), np.int64), None, "candidate set is empty"),
    (q(b"cat"), i64([3, 4]), None, "candidate_ids must have shape [batch, candidates] with the query's batch size 1, "
                                   "got [2]"),
    (q(b"cat"), None, i64([[0]]), "top_k is 0; it must be at least 1"),
    (q(b"cat"), None, i64([[7]]), "top_k is 7, more than the 6 candidates of the request"),
    (q(b"cat"), i64([[1, 2]]), i64([[3]]), "top_k is 3, more than the 2 candidates of the request"),
    (q(b"cat"), None, i64([[1, 2]]), "top_k must have shape [batch, 1] = [1, 1], got [1, 2]"),
    (q(b"cat", b"dog"), None, i64([[2], [3]]), "top_k differs between the queries of one request ([2, 3])"),
    (q(b"cat", b"dog"), None, i64([[2], [0]]), "top_k is 0 (query 1 of the batch); it must be at least 1"),
    (q(b""), None, None, "query is empty"),
    (q(b" \t\n"), None, None, "query is empty"),
    (q(b"cat", b"  "), None, None, "query 1 of the batch is empty"),
    (q(b"?!"), None, None, "query '?!' normalizes to nothing: it has no letter, digit or emoji to search for (text "
                           "rules 2)"),
    (q(b"_-_"), None, None, "query '_-_' normalizes to nothing"),
    (q(b"\xff\xfecat"), None, None, "query is not valid UTF-8 (byte 0xff at position 0)"),
    (q(b"a" * 1025), None, None, "query is 1025 bytes long, more than the maximum of 1024 bytes of UTF-8"),
    # the first problem in the order the checks have always run: ids, then top_k, then the text
    (q(b""), i64([[9]]), i64([[0]]), "candidate_ids[0, 0] = 9 is outside the candidate store"),
    (q(b""), i64([[1]]), i64([[0]]), "top_k is 0; it must be at least 1"),
])
def test_bad_requests_are_refused_naming_the_problem(query_text, query, ids, top_k, message):
    for proven in search.proven_ids([ids], len(IDS)) + [False]:
        with pytest.raises(search.RequestError) as info:
            search.parse_request(query, ids, top_k, rules(query_text), ids_proven=proven)
        assert message in str(info.value)


def test_a_good_request_is_read_by_the_versions_rules(query_text):
    r = search.parse_request(q("🐱 Thumbs_Up!".encode(), b"dog"), None, i64([[2], [2]]), rules(query_text),
                             wants=["scores", "stored_ids"])
    assert r.texts == ["cat face thumbs up", "dog"] and r.top_k == 2 and r.wants == {"scores", "stored_ids"}
    assert r.rows.shape == (2, 6) and r.rows[1].tolist() == list(range(6))
    r = search.parse_request(q(b"Cat"), i64([[5, 0]]), None, rules(query_text, normalize=lambda t: t, text_rules=1),
                             wants=[])
    assert r.texts == ["Cat"] and r.top_k is None and r.wants is None and r.rows.tolist() == [[5, 0]]


def test_ids_are_proven_for_many_requests_at_once_exactly_where_their_checks_pass(query_text):
    rng = np.random.default_rng(1)
    batch = [None, i64([3, 4]), np.empty((1, 0), np.int64), np.empty((0, 3), np.int64), np.array([[1.0]])]
    for _ in range(40):
        n, b = int(rng.integers(1, 5)), int(rng.integers(1, 3))
        batch.append(i64(rng.integers(-1, 8, size=(b, n))))
    proven = search.proven_ids(batch, len(IDS))
    for ids, ok in zip(batch, proven, strict=True):
        if ids is None or ids.ndim != 2 or 0 in ids.shape or ids.dtype.kind != "i":
            assert not ok
            continue
        try:
            search.check_ids(ids, rules(query_text))
            assert ok
        except search.RequestError:
            assert not ok


# ---- the queries' reading, tokens and words ----------------------------------------------------------------------
def test_queries_normalize_as_the_text_rules_say(query_text):
    rng = random.Random(0)
    alphabet = string.printable + "_-_!?"
    samples = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(2000)]
    samples += ["🐱", "Thumbs_Up!", "👍🏽 ok", "#\u20e3 1", "#️⃣", "café", "ÉCOLE", "™", "Ⅻ", "ﬁsh", "🇯🇵 flag", "?!",
                "a\u0301", "x" * 100, "CAT\tFACE"]
    for text in samples:
        assert query_text.normalize(text) == amc_text.normalize_query(text, query_text.emoji_names), text


def test_query_features_equal_the_reference(query_text, wordpiece):
    rng = random.Random(2)
    vocabulary = ["cat", "face", "dog", "heart", "red", "love", "kiwi", "of", "the", "a", "s", "zebra", "unknownword",
                  "x" * 120, "1", "42", "caf", "naïve", "🐱", "thumbs", "up", "Dog"]
    queries = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 6))) for _ in range(300)]
    queries += [" ".join(["red heart"] * 40), "cat  face", " cat", "[CLS] cat", "dog-cat", "a" * 5]
    for start in range(0, len(queries), 37):  # batches that mix the shortcut and the tokenizer
        batch = queries[start:start + 37]
        tokens, words, weights = query_text.features(batch)
        want_words, want_weights = query_text.store_words.query(batch)
        np.testing.assert_array_equal(tokens, amc_text.query_tokens(wordpiece, batch))
        np.testing.assert_array_equal(words, want_words)
        np.testing.assert_array_equal(weights, want_weights)
        assert tokens.dtype == np.int64 and words.dtype == np.int64 and weights.dtype == np.float32
    assert query_text.cls_sep is not None  # the shortcut was on


def test_words_queries_bring_are_kept_within_a_bound(query_text, wordpiece):
    from amc_model.text_encoder import tokenizer_json

    small = search.QueryText(wordpiece, query_text.store_words, None, tokenizer_json=tokenizer_json(),
                             max_words=3)
    fixed = len(small.fixed)
    batch = ["qqa qqb qqc qqd qqe", "cat qqf"]
    tokens, _, _ = small.features(batch)
    np.testing.assert_array_equal(tokens, amc_text.query_tokens(wordpiece, batch))
    assert len(small.learned) == 3 and len(small.fixed) == fixed and "cat" in small.fixed
    # A word learned earlier that the table drops while this batch's new words go in is still answered.
    for later in (["qqx"], ["qqy qqz"], ["qqx", "qqw"]):
        np.testing.assert_array_equal(small.features(later)[0], amc_text.query_tokens(wordpiece, later))
    # Without a store (the ranking's text step): the reading alone.
    assert search.QueryText(wordpiece, None, None, tokenizer_json=tokenizer_json()).normalize("A b") == "A b"
    # Not BERT's tokenizer: every query goes through the tokenizer.
    other = search.QueryText(wordpiece, query_text.store_words, None, tokenizer_json="{}")
    assert other.cls_sep is None
    np.testing.assert_array_equal(other.features(batch)[0], tokens)


# ---- the step in-process -----------------------------------------------------------------------------------------
def stand_in_graph(path, keyword_slots: int, version: int = 1) -> None:
    """The search graph's inputs and outputs (sig.SEARCH_STORE) over a trivial score: the query's word weights summed
    less the row number, so the top k are the smallest rows searched, and the scores show the features arrived."""
    import onnx
    from onnx import TensorProto, helper

    names = sig.SEARCH_STORE.input_names
    tokens, words, weights, rows, k = names
    nodes = [
        helper.make_node("Cast", [rows], ["rows_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", [weights, "axis1"], ["mass"], keepdims=1),
        helper.make_node("Sub", ["mass", "rows_f"], ["all_scores"]),
        helper.make_node("Gather", [k, "scalar0"], ["k0"], axis=1),
        helper.make_node("Gather", ["k0", "zero"], ["k1"], axis=0),
        helper.make_node("TopK", ["all_scores", "k1"], ["scores", "at"], axis=1),
        helper.make_node("GatherElements", [rows, "at"], ["candidate_index"], axis=1),
        helper.make_node("Unsqueeze", ["scores", "axis2"], ["s3"]),
        helper.make_node("Concat", ["s3", "s3"], ["modality_weights"], axis=2),
        helper.make_node("Tile", ["s3", "regions"], ["region_attention"]),
        helper.make_node("Tile", ["s3", "slots"], ["keyword_attention"]),
        helper.make_node("Mul", [k, "zero_i"], ["k_zero"]),
        helper.make_node("Add", ["k_zero", "version"], ["model_version"]),
    ]
    dims = {tokens: ["b", "t"], words: ["b", "w"], weights: ["b", "w"], rows: ["b", "n"], k: ["b", 1]}
    types = {weights: TensorProto.FLOAT}
    inputs = [helper.make_tensor_value_info(n, types.get(n, TensorProto.INT64), dims[n]) for n in names]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["b", "k"]),
               helper.make_tensor_value_info("modality_weights", TensorProto.FLOAT, ["b", "k", 2]),
               helper.make_tensor_value_info("region_attention", TensorProto.FLOAT, ["b", "k", sig.REGIONS_PER_IMAGE]),
               helper.make_tensor_value_info("keyword_attention", TensorProto.FLOAT, ["b", "k", keyword_slots]),
               helper.make_tensor_value_info("model_version", TensorProto.INT64, ["b", 1]),
               helper.make_tensor_value_info("candidate_index", TensorProto.INT64, ["b", "k"])]
    constants = [helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
                 helper.make_tensor("axis2", TensorProto.INT64, [1], [2]),
                 helper.make_tensor("scalar0", TensorProto.INT64, [], [0]),
                 helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
                 helper.make_tensor("zero_i", TensorProto.INT64, [], [0]),
                 helper.make_tensor("version", TensorProto.INT64, [], [version]),
                 helper.make_tensor("regions", TensorProto.INT64, [3], [1, 1, sig.REGIONS_PER_IMAGE]),
                 helper.make_tensor("slots", TensorProto.INT64, [3], [1, 1, keyword_slots])]
    graph = helper.make_graph(nodes, "stand_in_search", inputs, outputs, constants)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


@pytest.fixture
def step_dir(tmp_path):
    """A search step's model directory as publish lays it out (its generated config, version 1), over the stand-in
    graph and a 6-row store."""
    from google.protobuf import json_format

    from amc_model.text_encoder import tokenizer_json
    from export.configs import SEARCH_SETTINGS, search_step_config
    from export.repository import SEARCH_GRAPH_FILE, TextStepFiles, write_text_step

    here = tmp_path / sig.SEARCH_STEP.model_name
    files = TextStepFiles(tokenizer_json(), amc_text.TermWeights.from_documents(KEYWORDS).to_json(),
                          tmp_path / "no_encoder.onnx", text_rules=2,
                          emoji_names_json=amc_text.EmojiNames(NAMES).to_json())
    store = {"version": 1, "size": len(IDS), "ids": IDS, "keywords": KEYWORDS}
    write_text_step(here / "1", version=1, files=files, store_json=json.dumps(store), encoder=False)
    stand_in_graph(here / "1" / SEARCH_GRAPH_FILE, keyword_slots=3)
    config = search_step_config(SEARCH_SETTINGS["cpu"])
    config.parameters["intra_op_num_threads"].string_value = "1"
    config = json_format.MessageToDict(config, preserving_proto_field_name=True)
    for tensor in config["input"] + config["output"]:  # protobuf's JSON writes int64 as strings, Triton's as numbers
        tensor["dims"] = [int(d) for d in tensor["dims"]]
    return here, config


@pytest.fixture
def step(step_dir):
    here, config = step_dir
    with fake_pb_utils.installed() as pb_utils:
        model = fake_pb_utils.load_step(here / "1" / "model.py").TritonPythonModel()
        model.initialize({"model_config": json.dumps(config), "model_name": sig.SEARCH_STEP.model_name,
                          "model_version": "1", "model_repository": str(here)})
        yield model, pb_utils
        model.finalize()


def ask(pb_utils, query, ids=None, top_k=None, outputs=()):
    inputs = {sig.QUERY.name: query}
    if ids is not None:
        inputs[sig.CANDIDATE_IDS.name] = ids
    if top_k is not None:
        inputs[sig.TOP_K.name] = top_k
    return pb_utils.InferenceRequest(inputs, requested_output_names=list(outputs))


def test_the_step_answers_a_batch_and_refuses_its_bad_requests_alone(step):
    model, pb_utils = step
    serialize = fake_pb_utils.make().serialize_byte_tensor
    everything = [t.name for t in sig.SEARCH_STEP.outputs]
    requests = [
        ask(pb_utils, q(b"cat"), i64([[5, 1, 3]]), i64([[2]]), everything),      # as the ensemble asks
        ask(pb_utils, q(b"red heart"), None, i64([[3]])),                        # the whole store
        ask(pb_utils, q(b"cat"), i64([[4, 2, 4]]), i64([[2]])),                  # repeated id
        ask(pb_utils, q(b"dog", "🐱".encode()), i64([[0, 4], [2, 3]]), i64([[1], [1]])),  # two queries, one request
        ask(pb_utils, q(b"?!"), None, i64([[1]])),                               # normalizes to nothing
        ask(pb_utils, q(b"kiwi"), i64([[5, 4, 0]]), None, ["scores", "stored_ids"]),      # two outputs asked
    ]
    returned = model.execute(requests)
    answers = [fake_pb_utils.answer(r, x) for r, x in zip(requests, returned, strict=True)]
    assert returned[2] is None and returned[4] is None  # refused at once, through their senders
    for bad, message in [(2, "candidate_ids[0] repeats store row 4 (at positions 0 and 2)"),
                         (4, "query '?!' normalizes to nothing")]:
        error = answers[bad].error()
        assert error.code() == pb_utils.TritonError.INVALID_ARG
        assert error.message().startswith(f"{sig.SEARCH_STEP.model_name}: ") and message in error.message()
    first = fake_pb_utils.outputs(answers[0])
    assert list(first) == everything and first["candidate_index"].tolist() == [[1, 3]]
    assert first["stored_ids"].tolist() == [[b"b", b"d"]] and first["model_version"].tolist() == [[1]]
    assert first["stored_keywords"].tolist() == [[[b"dog", b"", b""], [b"kiwi fruit", b"", b""]]]
    mass = float(query_text_mass(model, "cat"))
    np.testing.assert_allclose(first["scores"], [[mass - 1, mass - 3]], rtol=1e-6)
    assert first["region_attention"].shape == (1, 2, sig.REGIONS_PER_IMAGE)
    assert first["keyword_attention"].shape == (1, 2, 3) and first["modality_weights"].shape == (1, 2, 2)
    assert fake_pb_utils.outputs(answers[1])["candidate_index"].tolist() == [[0, 1, 2]]
    two = fake_pb_utils.outputs(answers[3])
    assert two["candidate_index"].tolist() == [[0], [2]] and two["stored_ids"].tolist() == [[b"a"], [b"\xc3\xa7"]]
    assert list(fake_pb_utils.outputs(answers[5])) == ["scores", "stored_ids"]
    assert fake_pb_utils.outputs(answers[5])["stored_ids"].tolist() == [[b"a", b"e", b"\xf0\x9f\x90\xb1 id"]]
    for answer in (answers[0], answers[1], answers[3], answers[5]):  # BYTES on the wire as the stub would send them
        for tensor in answer.output_tensors():
            assert tensor.as_numpy().flags.c_contiguous
            if tensor.serialized is not None:
                assert tensor.serialized == serialize(tensor.as_numpy())


def query_text_mass(model, query: str) -> float:
    return float(model.queries.features([query])[2].sum())


def test_a_failing_graph_call_fails_its_group_only(step, monkeypatch):
    model, pb_utils = step
    real = model.search.run

    def run(feeds):
        if feeds[sig.CANDIDATE_IDS.name].shape[1] == 2:
            raise RuntimeError("graph down")
        return real(feeds)

    monkeypatch.setattr(model.search, "run", run)
    requests = [ask(pb_utils, q(b"cat"), i64([[5, 1]])), ask(pb_utils, q(b"dog"), i64([[0, 1, 2]])),
                ask(pb_utils, q(b"love"), i64([[3, 2]]))]
    answers = model.execute(requests)
    assert [a.has_error() for a in answers] == [True, False, True]
    assert answers[0].error().code() == pb_utils.TritonError.INTERNAL
    assert "RuntimeError: graph down" in answers[0].error().message()
    assert fake_pb_utils.outputs(answers[1])["candidate_index"].tolist() == [[0, 1, 2]]

