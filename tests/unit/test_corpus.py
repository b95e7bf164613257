"""Tests of the emoji image-search corpus (training/corpus/) on small seeded subsets."""

from __future__ import annotations

import dataclasses
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from training import corpus
from training.corpus import Corpus, CorpusConfig, MissingDataError, load_corpus

N_IMAGES = 60


def _config(cache_dir: Path, **overrides: object) -> CorpusConfig:
    return CorpusConfig(max_images=N_IMAGES, cache_dir=str(cache_dir), **overrides)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding one complete build (catalog, features, log) of the default config."""
    path = tmp_path_factory.mktemp("corpus-base")
    load_corpus(_config(path), progress=False)
    return path


@pytest.fixture(scope="session")
def base(base_dir: Path) -> Corpus:
    return load_corpus(_config(base_dir), progress=False)


@pytest.fixture
def cache_copy(base_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the base cache directory that a test may damage."""
    path = tmp_path / "cache"
    shutil.copytree(base_dir, path)
    return path


@pytest.fixture
def no_extraction(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("region features were re-extracted")

    monkeypatch.setattr(corpus.render, "extract_region_features", fail)


def _log_of(c: Corpus) -> tuple:
    return (c.chars, c.keywords, c.noisy.tolist(), c.queries)


# --- determinism ----------------------------------------------------------------------------------


def test_same_config_builds_identical_corpus(base: Corpus, tmp_path: Path) -> None:
    again = load_corpus(_config(tmp_path / "fresh"), progress=False)
    assert _log_of(again) == _log_of(base)
    np.testing.assert_allclose(again.regions.astype(np.float32), base.regions.astype(np.float32), atol=1e-2)


def test_different_seed_gives_different_noise(base: Corpus, base_dir: Path, cache_copy: Path) -> None:
    other = load_corpus(_config(cache_copy, seed=1), progress=False)
    assert other.keywords != base.keywords
    # The noise itself, on the same images, depends on the seed too (distractors come from the
    # whole catalog's tag pool, not just the subset's).
    pool = sorted({k for ks in corpus.catalog.load_catalog(base_dir).keywords for k in ks})
    tags0, _ = corpus.autotag.auto_tag(base.true_keywords, pool, base.config)
    tags1, _ = corpus.autotag.auto_tag(base.true_keywords, pool, dataclasses.replace(base.config, seed=1))
    assert tags0 == base.keywords
    assert tags1 != tags0


# --- shape of the corpus --------------------------------------------------------------------------


def test_arrays(base: Corpus) -> None:
    n = len(base.chars)
    assert n == N_IMAGES == len(base.names) == len(base.true_keywords) == len(base.keywords)
    assert len(set(base.chars)) == n
    assert base.regions.shape == (n, 49, 1280) and base.regions.dtype == np.float16
    assert np.isfinite(base.regions.astype(np.float32)).all() and base.regions.any()
    assert f"{N_IMAGES} images" in base.summary()


def test_render_emoji_is_the_feature_canvas() -> None:
    image = corpus.render_emoji("😀")
    assert image.mode == "RGB" and image.size == (136, 128)
    assert np.asarray(image).std() > 10


def test_splits_are_disjoint_by_target_and_non_empty(base: Corpus) -> None:
    targets = {split: {q.target for q in qs} for split, qs in base.queries.items()}
    assert set(targets) == {"train", "val", "test"}
    assert all(targets.values())
    assert not targets["train"] & targets["val"]
    assert not targets["train"] & targets["test"]
    assert not targets["val"] & targets["test"]
    kinds = {q.kind for qs in base.queries.values() for q in qs}
    assert kinds == {"name", "keyword"}


def test_candidates_relevance_and_clicks(base: Corpus) -> None:
    n = len(base.chars)
    for split, qs in base.queries.items():
        for q in qs:
            assert q.candidates.dtype == np.int64 and q.relevance.dtype == np.int64
            assert q.clicks.dtype == bool
            assert len(q.candidates) == min(base.config.candidates_per_query, n)
            assert len(set(q.candidates.tolist())) == len(q.candidates)
            assert ((q.candidates >= 0) & (q.candidates < n)).all()
            assert set(q.relevance.tolist()) <= {0, 1, 2} and (q.relevance == 2).any()
            if split == "train":
                assert (q.clicks & (q.relevance > 0)).any()


def test_name_query_has_exactly_its_own_emoji_as_relevance_2(base: Corpus) -> None:
    names = [q for qs in base.queries.values() for q in qs if q.kind == "name"]
    assert len({q.target for q in names}) == N_IMAGES  # training targets once per logged session
    for q in names:
        best = q.candidates[q.relevance == 2]
        assert len(best) == 1
        assert base.chars[best[0]] == q.target
        assert base.names[best[0]] == q.text


def test_keyword_query_relevance(base: Corpus) -> None:
    keyword_queries = [q for qs in base.queries.values() for q in qs if q.kind == "keyword"]
    assert keyword_queries
    for q in keyword_queries:
        assert q.target == "kw:" + q.text
        holders = [i for i, ks in enumerate(base.true_keywords) if q.text in ks]
        assert len(holders) >= 2
        for i, r in zip(q.candidates, q.relevance, strict=True):
            assert (r == 2) == (i in holders)
            if r == 1:
                assert set(corpus.content_words(q.text)) <= set(corpus.words(base.names[i]))


def test_noisy_images(base: Corpus) -> None:
    cfg = base.config
    assert abs(base.noisy.mean() - cfg.noisy_image_share) <= 1.0 / N_IMAGES
    for truth, tags, noisy in zip(base.true_keywords, base.keywords, base.noisy, strict=True):
        kept = set(truth) & set(tags)
        wrong = set(tags) - set(truth)
        if noisy:
            assert len(kept) <= cfg.noisy_true_keywords_kept
            assert len(wrong) == cfg.noisy_distractors
        else:
            assert kept
            assert len(wrong) == cfg.distractors_per_image


def test_noisy_images_can_keep_some_true_keywords(base_dir: Path, cache_copy: Path) -> None:
    c = load_corpus(_config(cache_copy, noisy_true_keywords_kept=1, noisy_image_share=0.5), progress=False)
    assert abs(c.noisy.mean() - 0.5) <= 1.0 / N_IMAGES
    kept = [len(set(t) & set(k)) for t, k, z in zip(c.true_keywords, c.keywords, c.noisy, strict=True) if z]
    assert max(kept) == 1


# --- caching --------------------------------------------------------------------------------------


def test_second_load_reuses_the_cache(base: Corpus, cache_copy: Path, no_extraction: None) -> None:
    again = load_corpus(_config(cache_copy), progress=False)
    assert _log_of(again) == _log_of(base)


def test_changed_noise_rebuilds_log_but_not_features(
    base: Corpus, cache_copy: Path, no_extraction: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs_before = set(cache_copy.glob("log-*.pkl"))
    other = load_corpus(_config(cache_copy, keyword_drop_rate=0.6), progress=False)
    assert other.chars == base.chars
    assert other.keywords != base.keywords
    np.testing.assert_array_equal(other.regions, base.regions)
    assert len(set(cache_copy.glob("log-*.pkl")) - logs_before) == 1
    assert "search log" in capsys.readouterr().out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_log_is_rebuilt(
    base: Corpus, cache_copy: Path, no_extraction: None, capsys: pytest.CaptureFixture[str]
) -> None:
    (log,) = cache_copy.glob("log-*.pkl")
    _truncate(log)
    again = load_corpus(_config(cache_copy), progress=False)
    assert _log_of(again) == _log_of(base)
    assert "unreadable" in capsys.readouterr().out
    load_corpus(_config(cache_copy), progress=False)  # and the rebuilt file is good
    assert capsys.readouterr().out == ""


def test_stale_log_is_rebuilt(
    base: Corpus, cache_copy: Path, no_extraction: None, capsys: pytest.CaptureFixture[str]
) -> None:
    (log,) = cache_copy.glob("log-*.pkl")
    data = pickle.loads(log.read_bytes())
    data["fingerprint"]["format"] = -1
    data["log"]["keywords"] = [["wrong"] for _ in base.chars]
    log.write_bytes(pickle.dumps(data))
    again = load_corpus(_config(cache_copy), progress=False)
    assert again.keywords == base.keywords
    assert "stale" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncate-array", "garble-header"])
def test_damaged_features_are_rebuilt(
    base: Corpus,
    cache_copy: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    damage: str,
) -> None:
    (header,) = cache_copy.glob("features-*.json")
    if damage == "truncate-array":
        _truncate(header.with_suffix(".npy"))
    else:
        header.write_text("{not json")
    calls = []

    def fake(images: list, *, progress: bool = True) -> np.ndarray:
        calls.append(len(images))
        return base.regions.copy()

    monkeypatch.setattr(corpus.render, "extract_region_features", fake)
    again = load_corpus(_config(cache_copy), progress=False)
    assert calls == [N_IMAGES]
    np.testing.assert_array_equal(again.regions, base.regions)
    assert "rebuilding region features" in capsys.readouterr().out
    load_corpus(_config(cache_copy), progress=False)
    assert calls == [N_IMAGES]


def test_subset_features_are_sliced_from_a_superset_cache(
    base: Corpus, cache_copy: Path, no_extraction: None
) -> None:
    chars = base.chars[5:25][::-1]
    regions, _ = corpus.features.load_features(cache_copy, chars, progress=False)
    np.testing.assert_array_equal(regions, base.regions[5:25][::-1])


# --- missing data ---------------------------------------------------------------------------------


def test_missing_font_names_the_debian_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(corpus.render, "FONT_PATH", str(tmp_path / "NotoColorEmoji.ttf"))
    with pytest.raises(MissingDataError, match="fonts-noto-color-emoji"):
        load_corpus(_config(tmp_path / "cache"), progress=False)
    with pytest.raises(MissingDataError, match="apt-get install fonts-noto-color-emoji"):
        corpus.render_emoji("😀")


def test_missing_cldr_names_the_debian_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(corpus.catalog, "CLDR_DERIVED_ANNOTATIONS", str(tmp_path / "en.xml"))
    with pytest.raises(MissingDataError, match="unicode-cldr-core"):
        load_corpus(_config(tmp_path / "cache"), progress=False)
    assert issubclass(MissingDataError, RuntimeError)


def test_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="val_share"):
        load_corpus(_config(tmp_path, val_share=0.5, test_share=0.5), progress=False)


def test_long_dwell_clicks_are_clicks_and_favour_the_wanted_image(base: Corpus) -> None:
    qs = [q for split in base.queries.values() for q in split]
    assert all(not (q.satisfied & ~q.clicks).any() for q in qs)  # a long click is a click
    clicks = np.concatenate([q.clicks for q in qs])
    satisfied = np.concatenate([q.satisfied for q in qs])
    rel = np.concatenate([q.relevance for q in qs])
    share = {r: satisfied[clicks & (rel == r)].mean() for r in (1, 2)}
    assert share[2] > share[1]  # DWELL = {2: 0.8, 1: 0.3, 0: 0.1}, seeded


def test_more_log_sessions_add_training_lists_only(cache_copy: Path, no_extraction: None) -> None:
    single = load_corpus(_config(cache_copy, log_sessions=1), progress=False)
    busy = load_corpus(_config(cache_copy, log_sessions=3), progress=False)
    # Validation and test lists are the one-session log's, so evaluations stay comparable.
    assert busy.queries["val"] == single.queries["val"] and busy.queries["test"] == single.queries["test"]
    one = single.queries["train"]
    assert busy.queries["train"][: len(one)] == one
    assert len(busy.queries["train"]) == 3 * len(one)
    # The same queries again, each session with candidate lists of its own draw.
    for session in (1, 2):
        more = busy.queries["train"][session * len(one): (session + 1) * len(one)]
        assert [(q.text, q.target) for q in more] == [(q.text, q.target) for q in one]
        assert any(not np.array_equal(a.candidates, b.candidates) for a, b in zip(more, one, strict=True))
    with pytest.raises(ValueError, match="log_sessions"):
        load_corpus(_config(cache_copy, log_sessions=0), progress=False)
