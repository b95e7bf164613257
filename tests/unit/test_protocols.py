"""Evaluation protocols and metrics: lists hold their target, are seeded, and regional names stay out of training."""

import numpy as np
import pytest

from amc_contract.text import words
from training import protocols
from training.metrics import reciprocal_rank_fusion, target_metrics, target_rank


def test_target_metrics_by_hand():
    scores = [np.array([0.1, 0.9, 0.5]), np.array([0.3, 0.2, 0.1])]
    relevance = [np.array([2, 0, 1]), np.array([2, 0, 0])]
    assert target_rank(scores[0], 0) == 3 and target_rank(scores[1], 0) == 1
    m = target_metrics(scores, relevance, [0, 0])
    assert m["r@1"] == 0.5 and m["r@10"] == 1.0 and m["mrr"] == pytest.approx((1 / 3 + 1) / 2)


def test_reciprocal_rank_fusion_rewards_agreement():
    fused = reciprocal_rank_fusion([np.array([3.0, 2.0, 1.0]), np.array([1.0, 3.0, 2.0])])
    assert fused.argmax() == 1 and fused[0] > fused[2]  # ranks (1,3) and (2,1) beat (3,2)


def test_random100_lists_hold_their_target_once_and_are_seeded(small_corpus):
    lists = protocols.random100(small_corpus)
    assert len(lists) == len(small_corpus.queries["test"])
    size = min(protocols.LIST_SIZE, len(small_corpus.chars))
    for rl in lists:
        assert len(rl.candidates) == len(set(rl.candidates.tolist())) == size
        assert rl.relevance[rl.target] == 2 and (rl.relevance == 2).sum() == 1
        assert rl.noisy == bool(small_corpus.noisy[rl.candidates[rl.target]])
    again = protocols.random100(small_corpus)
    assert all(np.array_equal(a.candidates, b.candidates) for a, b in zip(lists, again, strict=True))


def test_regional_names_are_test_targets_named_otherwise(small_corpus):
    char = next(q.target for q in small_corpus.queries["test"] if q.kind == "name")
    i = small_corpus.chars.index(char)
    en = small_corpus.names[i]
    train_char = next(q.target for q in small_corpus.queries["train"] if q.kind == "name")
    table = {char: [en.upper(), "a wholly different name"], train_char: ["another name"]}
    lists = protocols.regional_names(small_corpus, table)
    # The same words as the en name do not count; a training target's names never enter the test set.
    assert [rl.text for rl in lists] == ["a wholly different name"]
    assert lists[0].candidates[lists[0].target] == i
    real = protocols.regional_name_table()
    assert real and all(words(n) for names in real.values() for n in names)


def test_resumed_evaluation_refuses_a_partial_run_of_another_configuration(tmp_path):
    import dataclasses
    import json

    from training.evaluate import LEARNED, _resumed
    from training.train_config import TrainConfig

    base = TrainConfig()
    assert _resumed(tmp_path, base, [0, 1], LEARNED) == ({}, {}, {}, [])  # nothing to resume: start afresh
    details = {"config": json.loads(json.dumps(dataclasses.asdict(base))), "seeds_requested": [0, 1], "seeds": [0],
               "per_seed": {"test_lists": {}}, "train_seconds": {m: [1.0] for m in LEARNED},
               "list_counts": {"0": {"test_lists": 3}}}
    (tmp_path / "eval_details.json").write_text(json.dumps(details))
    per_seed, timings, sizes, done = _resumed(tmp_path, base, [0, 1], LEARNED)
    assert done == [0] and sizes == {0: {"test_lists": 3}} and per_seed == {"test_lists": {}}
    with pytest.raises(ValueError, match="another configuration"):
        _resumed(tmp_path, dataclasses.replace(base, margin=0.3), [0, 1], LEARNED)
    with pytest.raises(ValueError, match="another configuration"):
        _resumed(tmp_path, base, [0, 1, 2], LEARNED)
    # a progress bar changes no figure: a run started without one resumes one started with it
    assert _resumed(tmp_path, dataclasses.replace(base, progress=not base.progress), [0, 1], LEARNED)[3] == [0]


def test_an_ablation_trains_only_the_methods_asked_for(tmp_path):
    """``--methods amc``: AMC alone (and the text baselines, which cost no training), for an ablation of one flag."""
    import json

    from tests.conftest import SMALL_CORPUS
    from training.evaluate import main

    common = ["--seeds", "0", "--out-dir", str(tmp_path), "--epochs", "1", "--batch_size", "32", "--progress", "false",
              "--corpus.max_images", "60", "--corpus.cache_dir", SMALL_CORPUS.cache_dir]
    with pytest.raises(SystemExit):  # the report's MTN weights and attention examples need AMC
        main([*common, "--methods", "keywords_only"])
    assert main([*common, "--methods", "amc", "--visual_agreement", "false"]) == 0
    details = json.loads((tmp_path / "eval_details.json").read_text())
    assert list(details["train_seconds"]) == ["amc"] and details["config"]["visual_agreement"] is False
    assert set(json.loads((tmp_path / "eval.json").read_text())["ndcg@10"]) == {"amc", "bm25", "dense", "hybrid"}


def test_variant_key_groups_skin_tones_but_not_flags():
    assert protocols.variant_key("thumbs up: light skin tone") == protocols.variant_key("thumbs up") == "thumbs up"
    assert protocols.variant_key("kiss: person, person, light skin tone, dark skin tone") == "kiss: person, person"
    assert protocols.variant_key("flag: Japan") != protocols.variant_key("flag: France")


def test_whole_store_ranks_every_image_with_the_target_and_its_variants_relevant(small_corpus):
    lists = protocols.whole_store(small_corpus)
    assert len(lists) == len(small_corpus.queries["test"])
    for rl in lists:
        assert sorted(rl.candidates.tolist()) == list(range(len(small_corpus.chars)))
        if rl.target is not None:
            image = rl.candidates[rl.target]
            assert rl.relevance[rl.target] == 2 and rl.noisy == bool(small_corpus.noisy[image])
            key = protocols.variant_key(small_corpus.names[image])
            variants = [i for i, n in enumerate(small_corpus.names) if protocols.variant_key(n) == key]
            assert (rl.relevance[np.isin(rl.candidates, variants)] >= 1).all()
        else:
            assert (rl.relevance == 2).any()  # a keyword query: every image carrying the tag


def test_store_metrics_by_hand():
    from training.metrics import store_metrics

    relevance = [np.array([2, 1, 0, 0]), np.array([0, 2, 0, 0]), np.array([2, 0, 0, 0])]
    scores = [np.array([0.1, 0.9, 0.5, 0.2]),  # a variant first: a hit, not the target
              np.array([0.1, 0.2, 0.9, 0.3]),  # image 2 first, wrong; the target third
              np.array([0.1, 0.2, 0.9, 0.3])]  # image 2 first again, wrong; the target last
    spam = [np.zeros(4, bool), np.array([0, 0, 1, 0], bool), np.zeros(4, bool)]
    m = store_metrics(scores, relevance, [0, 1, None], spam)
    assert m["r@1"] == pytest.approx(1 / 3) and m["r@10"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 4) / 3)
    assert m["target_r@1"] == 0.0  # of the two queries with a target, neither had it first
    assert m["tag_spam_top1_rate"] == pytest.approx(1 / 3)  # query 2 only: its wrong first result carries the words
    assert m["hub_share"] == 1.0  # both wrong first results are image 2


def test_bm25_scores_every_document_as_one_at_a_time():
    from training.metrics import BM25

    docs = [["cat", "face"], ["cat", "cat", "pet"], ["dog"], []]
    bm25 = BM25(docs)
    for query in (["cat"], ["cat", "pet", "unknown"], []):
        assert np.allclose(bm25.score_all(query), [bm25.score(query, d) for d in range(len(docs))])


def test_readme_evaluation_table_is_generated_from_eval_json(tmp_path):
    from training import readme_eval

    assert readme_eval.main(["--check"]) == 0
    readme = readme_eval.PAGE.read_text(encoding="utf-8")
    stale = tmp_path / "README.md"
    stale.write_text(readme.replace(readme_eval.END, "| typed by hand | 0.999 |\n" + readme_eval.END), encoding="utf-8")
    assert readme_eval.main(["--check", "--readme", str(stale)]) == 1
    assert readme_eval.main(["--readme", str(stale)]) == 0 and stale.read_text(encoding="utf-8") == readme
    with pytest.raises(ValueError, match="no generated evaluation block"):
        readme_eval.render("# a README\n", {"protocols": {}})
