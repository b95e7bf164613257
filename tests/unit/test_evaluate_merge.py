"""training.evaluate.add_earlier_baselines: a run of AMC alone completed with an earlier run's learned baselines, only
where the premise holds (the configurations differ in AMC-only fields, the text baselines agree)."""

from __future__ import annotations

import json

import pytest

from training.evaluate import add_earlier_baselines


def _details(methods, config, bm25=0.5, amc=0.7):
    values = {"amc": [amc], "bm25": [bm25], **{m: [0.6] for m in methods if m != "amc"}}
    return {"seeds": [0], "list_counts": {"0": {"whole_store": 10}}, "config": config,
            "per_seed": {"whole_store": {"all": {"r@1": dict(values)}}},
            "train_seconds": {m: [1.0] for m in methods}}


def _write(path, details):
    path.write_text(json.dumps(details))
    return path


def test_baselines_are_taken_where_only_amc_only_fields_differ(tmp_path):
    out = tmp_path / "now"
    out.mkdir()
    _write(out / "eval_details.json", _details(["amc"], {"lr": 0.002, "tag_agreement": True}, amc=0.8))
    earlier = _write(tmp_path / "then.json", _details(["amc", "keywords_only", "visual_only", "equal_fusion"],
                                                      {"lr": 0.002}))
    assert add_earlier_baselines(out, earlier) == ["keywords_only", "visual_only", "equal_fusion"]
    merged = json.loads((out / "eval_details.json").read_text())
    assert merged["per_seed"]["whole_store"]["all"]["r@1"] == {"amc": [0.8], "bm25": [0.5], "keywords_only": [0.6],
                                                               "visual_only": [0.6], "equal_fusion": [0.6]}
    assert merged["baselines_from"]["differing_fields"] == ["tag_agreement"]


@pytest.mark.parametrize(("now_config", "bm25", "message"), [
    ({"lr": 0.001}, 0.5, r"differs in \['lr'\]"),
    ({"lr": 0.002}, 0.4, "bm25's whole_store all r@1 differs"),
])
def test_other_runs_are_refused(tmp_path, now_config, bm25, message):
    out = tmp_path / "now"
    out.mkdir()
    _write(out / "eval_details.json", _details(["amc"], now_config, bm25=bm25))
    earlier = _write(tmp_path / "then.json", _details(["amc", "keywords_only"], {"lr": 0.002}))
    with pytest.raises(ValueError, match=message):
        add_earlier_baselines(out, earlier)
