"""The Python-backend steps' request checks, in-process and without a server (tests/test_serving.py sends the
same mistakes to a real tritonserver)."""

from __future__ import annotations

import numpy as np
import pytest

from serving.backends.onnx_runner import RequestError, TritonPythonModel


def _runner(distinct: list[str]) -> TritonPythonModel:
    runner = TritonPythonModel.__new__(TritonPythonModel)  # no session: only the check under test
    runner.distinct = distinct
    return runner


def test_inputs_named_distinct_repeat_no_value_within_a_query() -> None:
    runner = _runner(["query_words"])
    padded = np.array([[4, 9, -1, -1], [2, -1, -1, -1]], dtype=np.int64)  # repeated padding is fine
    runner._check_distinct({"query_words": padded, "other": np.zeros((2, 4))})
    runner._check_distinct({"query_words": np.array([[3]], dtype=np.int64)})
    with pytest.raises(RequestError, match=r"query_words\[1\] repeats 7; each value may appear once"):
        runner._check_distinct({"query_words": np.array([[1, 2, 3], [7, -1, 7]], dtype=np.int64)})
    _runner([])._check_distinct({"query_words": np.array([[7, 7]], dtype=np.int64)})  # not named: not checked


# ---- the text step's query rules (version.json "text_rules", emoji_names.json) --------------------------------------


def _publish_text_files(folder, *, version: int = 1, text_rules: int = 1, names: dict | None = None):
    """A text-step version directory as export.repository.write_text_step lays it out (a stand-in encoder file)."""
    from amc_client.text import EmojiNames
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
    from serving.backends.text_step import TextFeatures, _load_module

    features = TextFeatures.__new__(TextFeatures)
    features.text = _load_module(folder, "amc_text.py", "amc_client.text")
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
                                         r"rules 1, 2"):
        _rules(folder)
    # A rules-2 version whose text module predates the rules (no TEXT_RULES, no normalize_query):
    (folder / "version.json").write_text(json.dumps({"version": 3, "text_rules": 2}))
    (folder / "amc_text.py").write_text('"""the text rules of an older release"""\nQUERY_MAX_TOKENS = 48\n')
    with pytest.raises(ValueError, match=r"needs text rules 2 .* its text module .*amc_text.py text rules up to 1"):
        _rules(folder)
    (folder / "amc_text.py").unlink()  # the step then uses the installed amc_client.text, which has rules 2
    assert _rules(folder).text_rules == 2
    (folder / "emoji_names.json").unlink()
    with pytest.raises(ValueError, match="needs text rules 2 but has no emoji_names.json"):
        _rules(folder)


def test_publish_refuses_to_write_unknown_text_rules(tmp_path) -> None:
    with pytest.raises(ValueError, match="text rules 3 are not among the rules this release's text step implements"):
        _publish_text_files(tmp_path / "a" / "1", text_rules=3, names={})
    with pytest.raises(ValueError, match="text rules 2 need the emoji names"):
        _publish_text_files(tmp_path / "b" / "1", text_rules=2)
