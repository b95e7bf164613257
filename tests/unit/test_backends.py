"""The Python-backend steps' load and packaging, in-process and without a server: the text rules a version declares,
``onnx_runner.BoundSession``, and the code vendored into each version folder. (Each step's request logic has its own
test file: ``test_text_step.py``, ``test_network_step.py``, ``test_top_k_step.py``, ``test_search_step.py``.)"""

from __future__ import annotations

import numpy as np
import pytest

# ---- the text step's query rules (version.json "text_rules", emoji_names.json) --------------------------------------


def _publish_text_files(folder, *, version: int = 1, text_rules: int = 1, names: dict | None = None):
    """A text-step version directory as export.repository.write_text_step lays it out (a stand-in encoder file)."""
    from amc_contract.text import EmojiNames
    from export.repository import TextStepFiles, write_text_step

    folder.parent.mkdir(parents=True, exist_ok=True)
    encoder = folder.parent / "encoder.onnx"
    encoder.write_bytes(b"not a real graph")
    files = TextStepFiles("{}", '{"documents": 1, "document_frequency": {}}', encoder, text_rules=text_rules,
                          emoji_names_json=None if names is None else EmojiNames(names).to_json())
    write_text_step(folder, version=version, files=files)
    return files


def _rules(folder):
    """TextFeatures' rules check alone (the encoder is not loaded)."""
    from serving.backends.text_features import TextFeatures

    features = TextFeatures.__new__(TextFeatures)
    features.text_rules, features.emoji_names = features._text_rules(folder)
    return features


def test_a_version_of_text_rules_2_normalizes_its_queries(tmp_path) -> None:
    import json

    from export.repository import TextStepFiles

    folder = tmp_path / "amc_tokenizer" / "1"
    _publish_text_files(folder, text_rules=2, names={"🐱": "cat face"})
    assert json.loads((folder / "version.json").read_text()) == {"version": 1, "text_rules": 2}
    features = _rules(folder)
    assert features.text_rules == 2
    assert features.normalize(["🐱", "Thumbs_Up!", "?!"]) == ["cat face", "thumbs up", ""]
    again = TextStepFiles.of_version(folder)  # what the store text step copies
    assert again.text_rules == 2 and json.loads(again.emoji_names_json)["names"] == {"🐱": "cat face"}


def test_a_version_of_text_rules_1_is_served_as_before(tmp_path) -> None:
    """Versions published before the rules: version.json without text_rules, no emoji table, queries as sent."""
    from export.repository import TextStepFiles

    folder = tmp_path / "amc_tokenizer" / "1"
    _publish_text_files(folder, text_rules=1)
    assert (folder / "version.json").read_text() == '{"version": 1}' and not (folder / "emoji_names.json").exists()
    features = _rules(folder)
    assert features.text_rules == 1 and features.emoji_names is None
    assert features.normalize(["🐱", "Thumbs_Up!", "?!"]) == ["🐱", "Thumbs_Up!", "?!"]
    assert TextStepFiles.of_version(folder).text_rules == 1


def test_a_version_needing_rules_the_step_code_lacks_is_refused(tmp_path) -> None:
    import json

    folder = tmp_path / "amc_tokenizer" / "3"
    _publish_text_files(folder, version=3, text_rules=2, names={"🐱": "cat face"})
    # A newer release's version (rules 3) met by this step code:
    (folder / "version.json").write_text(json.dumps({"version": 3, "text_rules": 3}))
    with pytest.raises(ValueError, match=r"needs text rules 3 \(version.json\), but this text step implements text "
                                         r"rules 1, 2 \(its text module: .*amc_contract/text.py\)"):
        _rules(folder)
    (folder / "version.json").write_text(json.dumps({"version": 3, "text_rules": 2}))
    assert _rules(folder).text_rules == 2
    (folder / "emoji_names.json").unlink()
    with pytest.raises(ValueError, match="needs text rules 2 but has no emoji_names.json"):
        _rules(folder)


def test_publish_refuses_to_write_unknown_text_rules(tmp_path) -> None:
    with pytest.raises(ValueError, match="text rules 3 are not among the rules this release's text step implements"):
        _publish_text_files(tmp_path / "a" / "1", text_rules=3, names={})
    with pytest.raises(ValueError, match="text rules 2 need the emoji names"):
        _publish_text_files(tmp_path / "b" / "1", text_rules=2)


# ---- onnx_runner.BoundSession: the search step's device-resident I/O, on the CPU provider ---------------------------
def _topk_graph(path) -> None:
    """scores = x * 2; the k best of each row (ONNX TopK, k read on the host): the shape of the search graph's end."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Mul", ["x", "two"], ["scaled"]),
             helper.make_node("Gather", ["k", "scalar0"], ["k0"], axis=1),
             helper.make_node("Gather", ["k0", "zero"], ["k1"], axis=0),
             helper.make_node("TopK", ["scaled", "k1"], ["best", "rows"], axis=1)]
    graph = helper.make_graph(
        nodes, "topk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n"]),
                        helper.make_tensor_value_info("k", TensorProto.INT64, ["b", 1])],
        [helper.make_tensor_value_info("best", TensorProto.FLOAT, ["b", "k"]),
         helper.make_tensor_value_info("rows", TensorProto.INT64, ["b", "k"])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]), helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
         helper.make_tensor("scalar0", TensorProto.INT64, [], [0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_bound_session_answers_what_session_run_does_and_keeps_no_alias(tmp_path) -> None:
    """Bound buffers per shape bucket (and per host input value: k), reused call after call: each call's outputs are
    session.run's, and the arrays of an earlier call are not overwritten by a later one."""
    import onnxruntime as ort

    from serving.backends.onnx_runner import BoundSession, bucket

    _topk_graph(tmp_path / "topk.onnx")
    session = ort.InferenceSession(str(tmp_path / "topk.onnx"), providers=["CPUExecutionProvider"])
    bound = BoundSession(session, host_inputs=("k",))
    rng = np.random.default_rng(0)
    kept = []
    for batch, n, k in [(3, 10, 4), (3, 10, 4), (2, 10, 4), (3, 10, 2), (3, 12, 4)]:
        feeds = {"x": rng.normal(size=(batch, n)).astype(np.float32), "k": np.full((batch, 1), k, np.int64)}
        got, want = bound.run(feeds), dict(zip(["best", "rows"], session.run(None, feeds), strict=True))
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
        kept.append((got, want))
    for got, want in kept:  # earlier answers intact after later calls into the same buffers
        np.testing.assert_array_equal(got["best"], want["best"])
    assert len(bound.buckets) == 4  # (3, 10, k 4) twice: one bucket
    assert [bucket(n) for n in (1, 5, 7, 13, 64, 65, 300)] == [1, 6, 8, 16, 64, 96, 300]


# ---- a version folder carries its code: the step package and the contract, vendored whole ---------------------------
def test_a_version_folder_runs_the_code_vendored_into_it(tmp_path) -> None:
    """write_step_code copies serving/backends (as amc_steps) and amc_contract whole; the version's model.py imports
    TritonPythonModel from those copies (here a copy marked after publish), never from elsewhere."""
    import sys

    import amc_contract
    from export.repository import BACKENDS_DIR, CONTRACT_DIR
    from tests import fake_pb_utils

    folder = tmp_path / "amc_tokenizer" / "1"
    _publish_text_files(folder, text_rules=2, names={"🐱": "cat face"})
    for source, copy in ((BACKENDS_DIR, folder / "amc_steps"), (CONTRACT_DIR, folder / "amc_contract")):
        assert sorted(p.name for p in source.glob("*.py")) == sorted(p.name for p in copy.glob("*.py"))
        for path in source.glob("*.py"):
            assert (copy / path.name).read_bytes() == path.read_bytes(), path.name
    assert not list(folder.glob("amc_*.py"))
    with (folder / "amc_contract" / "signatures.py").open("a") as f:
        f.write('\nVENDORED = "version 1"\n')
    with fake_pb_utils.installed():
        model = fake_pb_utils.load_step(folder / "model.py").TritonPythonModel
    code = model.initialize.__code__.co_filename
    assert code == str(folder.resolve() / "amc_steps" / "text_step.py")
    assert model.initialize.__globals__["text_requests"].sig.VENDORED == "version 1"
    assert model.initialize.__globals__["amc_text"].__file__ == str(folder.resolve() / "amc_contract" / "text.py")
    # This process keeps its own modules of those names.
    assert sys.modules["amc_contract"] is amc_contract and "amc_steps" not in sys.modules


def test_a_version_entry_refuses_other_code_of_its_packages_names(tmp_path) -> None:
    """model.py run where amc_contract is already imported from elsewhere (never so in a stub process, one version
    each): an ImportError naming it, not a step that runs other code than its version's."""
    import runpy
    import sys

    folder = tmp_path / "amc_topk" / "1"
    from export.repository import TOP_K_MODULE, write_step_code

    write_step_code(folder, TOP_K_MODULE)
    path_before, bytecode_before = list(sys.path), sys.dont_write_bytecode
    try:
        with pytest.raises(ImportError, match="is not this version's copy"):
            runpy.run_path(str(folder / "model.py"))  # this process's amc_contract is the tree's
    finally:
        for name in [m for m in sys.modules if m.partition(".")[0] == "amc_steps"]:
            del sys.modules[name]
        sys.path[:] = path_before
        sys.dont_write_bytecode = bytecode_before
