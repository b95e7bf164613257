"""Evaluation protocols: which candidate lists each test query is ranked over.

* ``test_lists``: the search log's own test lists (30 candidates: relevant images, lexical and visual hard
  negatives, random others), graded relevance; the protocol of the paper's tables and of issue 2.
* ``random100``: what a user of a search box meets: each test query's target among 99 images drawn at
  random (seeded) from the images that are not a second target; graded relevance for NDCG.
* ``regional_names``: the same, with queries that name the target in other words: the names CLDR's regional
  English annotations (``en_GB``, ``en_AU``, ``en_CA``, ``en_001``) give an emoji where they differ from
  ``en.xml``'s ("full stop" for "period", "shooshing face" for "shushing face"), for test-split targets
  only. These texts never appear in training: a generalization set.
* ``whole_store``: what ``AMCClient.search`` does: each test query against every image of the corpus. Graded
  relevance: the log's rules (:func:`training.corpus.relevance_oracle`), with a name query's target 2 and its
  skin-tone variants (:func:`variant_key`) at least 1. Measured by the first result of grade >= 1
  (:func:`training.metrics.store_metrics`), so keyword queries count too.

A list's ``target`` is the candidate whose rank R@k and MRR measure; ``noisy`` says whether the target's
auto-tagger keywords are noise (results are split by it). A test-log keyword query has no single target
(every image carrying the tag is one), so it has neither and counts in NDCG only.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amc_contract.text import words
from training.corpus import CLDR_ANNOTATIONS, CLDR_DERIVED_ANNOTATIONS, Corpus, relevance_oracle, split_of

PROTOCOLS = ("test_lists", "random100", "regional_names", "whole_store")
REGIONAL_LOCALES = ("en_GB", "en_AU", "en_CA", "en_001")
LIST_SIZE = 100


@dataclass(frozen=True)
class RankingList:
    text: str  # the query
    candidates: np.ndarray  # int64 (C,) image indices
    relevance: np.ndarray  # int64 (C,) graded relevance
    target: int | None  # position in ``candidates`` of the target image, None if the query has no single one
    noisy: bool | None  # whether the target's keywords are noise


def _target_position(candidates: np.ndarray, image: int) -> int:
    return int(np.flatnonzero(candidates == image)[0])


def test_lists(corpus: Corpus) -> list[RankingList]:
    out = []
    char_index = {c: i for i, c in enumerate(corpus.chars)}
    for q in corpus.queries["test"]:
        image = char_index.get(q.target) if q.kind == "name" else None
        target = _target_position(q.candidates, image) if image is not None else None
        out.append(RankingList(q.text, q.candidates, q.relevance, target,
                               bool(corpus.noisy[image]) if image is not None else None))
    return out


def _random_list(text: str, relevance: np.ndarray, image: int, noisy: np.ndarray,
                 rng: np.random.Generator) -> RankingList:
    """``image`` plus LIST_SIZE - 1 random images that are not rel 2, in random order."""
    pool = np.flatnonzero(relevance < 2)
    others = rng.choice(pool, size=min(LIST_SIZE - 1, len(pool)), replace=False)
    candidates = rng.permutation(np.concatenate([[image], others])).astype(np.int64)
    rel = relevance[candidates].copy()
    rel[candidates == image] = 2
    return RankingList(text, candidates, rel, _target_position(candidates, image), bool(noisy[image]))


def random100(corpus: Corpus) -> list[RankingList]:
    rng = np.random.default_rng([corpus.config.seed, 100])
    oracle = relevance_oracle(corpus)
    char_index = {c: i for i, c in enumerate(corpus.chars)}
    out = []
    for q in corpus.queries["test"]:
        relevance = oracle(q)
        # A keyword query's target: one of the images carrying the tag.
        image = char_index[q.target] if q.kind == "name" else int(rng.choice(np.flatnonzero(relevance == 2)))
        out.append(_random_list(q.text, relevance, image, corpus.noisy, rng))
    return out


def regional_name_table(paths: list[Path] | None = None) -> dict[str, list[str]]:
    """emoji -> its distinct regional English names (tts), in locale order."""
    base = Path(CLDR_ANNOTATIONS).parent
    derived = Path(CLDR_DERIVED_ANNOTATIONS).parent
    if paths is None:
        paths = [folder / f"{loc}.xml" for loc in REGIONAL_LOCALES for folder in (base, derived)]
    names: dict[str, list[str]] = {}
    for path in paths:
        if not path.is_file():
            continue
        for node in ET.parse(path).getroot().iter("annotation"):
            cp, text = node.get("cp"), (node.text or "").strip()
            if cp and text and node.get("type") == "tts" and text not in names.setdefault(cp, []):
                names[cp].append(text)
    return names


def regional_names(corpus: Corpus, table: dict[str, list[str]] | None = None) -> list[RankingList]:
    """Test-split targets named in words that differ from their en.xml name (and from every other en name)."""
    table = regional_name_table() if table is None else table
    rng = np.random.default_rng([corpus.config.seed, 101])
    oracle = relevance_oracle(corpus)
    en_names = {tuple(words(n)) for n in corpus.names}
    by_char = {q.target: q for q in corpus.queries["test"] if q.kind == "name"}
    out = []
    for i, char in enumerate(corpus.chars):
        q = by_char.get(char)
        if q is None or split_of(char, corpus.config) != "test":
            continue
        relevance = oracle(q)
        for text in table.get(char, []):
            if tuple(words(text)) in en_names:
                continue  # the same name in other spelling/case, or another emoji's en name
            out.append(_random_list(text, relevance, i, corpus.noisy, rng))
    return out


def variant_key(name: str) -> str:
    """A CLDR name without its skin-tone qualifiers: "thumbs up: light skin tone" and "thumbs up" share
    "thumbs up", "kiss: person, person, light skin tone, dark skin tone" is "kiss: person, person"; "flag: Japan"
    stays itself (a flag is not a variant of another flag)."""
    head, colon, rest = name.partition(":")
    kept = [part.strip() for part in rest.split(",") if part.strip() and "skin tone" not in part]
    return f"{head.strip()}: {', '.join(kept)}" if colon and kept else head.strip()


def store_relevance(corpus: Corpus):
    """query -> graded relevance (G,) of every image: the log's rules, a name query's target 2 and its skin-tone
    variants at least 1. The whole-store protocol's judgments, and what training against the collection masks."""
    oracle = relevance_oracle(corpus)
    char_index = {c: i for i, c in enumerate(corpus.chars)}
    variants: dict[str, list[int]] = {}
    for i, name in enumerate(corpus.names):
        variants.setdefault(variant_key(name), []).append(i)

    def relevance(q) -> np.ndarray:
        out = oracle(q).copy()
        image = char_index.get(q.target) if q.kind == "name" else None
        if image is not None:
            same = variants[variant_key(corpus.names[image])]
            out[same] = np.maximum(out[same], 1)
            out[image] = 2
        return out

    return relevance


def whole_store(corpus: Corpus) -> list[RankingList]:
    """Every test query against every image (in one seeded random order, so that ties are not broken by the
    catalog's order, which keeps related emoji together); relevance by :func:`store_relevance`."""
    relevance = store_relevance(corpus)
    char_index = {c: i for i, c in enumerate(corpus.chars)}
    order = np.random.default_rng([corpus.config.seed, 102]).permutation(len(corpus.chars)).astype(np.int64)
    out = []
    for q in corpus.queries["test"]:
        image = char_index.get(q.target) if q.kind == "name" else None
        out.append(RankingList(q.text, order, relevance(q)[order],
                               _target_position(order, image) if image is not None else None,
                               bool(corpus.noisy[image]) if image is not None else None))
    return out


def build(corpus: Corpus) -> dict[str, list[RankingList]]:
    return {"test_lists": test_lists(corpus), "random100": random100(corpus), "regional_names": regional_names(corpus),
            "whole_store": whole_store(corpus)}
