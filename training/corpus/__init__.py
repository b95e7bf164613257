"""The image-search corpus: emoji images, noisy auto-tagger keywords, and a graded click log.

No click log of a real image engine can be downloaded here, so this package builds one from data that
installs offline (see shared/design/amc.md, "Real data that installs offline"):

* images: every colour glyph of the Noto Color Emoji font (Debian ``fonts-noto-color-emoji``),
  rendered by :func:`render_emoji` and turned into a 7x7 EfficientNet-Lite0 feature map
  (:func:`extract_region_features`), both in ``render``;
* names and keywords: Unicode CLDR English annotations (Debian ``unicode-cldr-core``): a spoken name
  ("grinning cat with smiling eyes") and a human keyword list ("cat | face | pet") per emoji.
  (Text is embedded later, by the sentence encoder: ``amc_model.text_encoder.TextEmbeddings``.)

From these, :func:`load_corpus` derives (deterministically from ``CorpusConfig.seed``):

* auto-tagger keywords: the CLDR keywords with some dropped and wrong tags added; a share of
  "noisy" images keep (almost) none of their true keywords, which is what makes the visual modality
  necessary;
* queries: every CLDR name, and every CLDR keyword that at least two images carry, each with a
  candidate list, graded relevance (0/1/2), simulated clicks and their dwell (long = satisfied);
* a train / val / test split by query target, so no target is in two splits.

Relevance rules (``rel`` of an image for a query; see ``_name_query_relevant`` and
``_keyword_query_relevant`` in ``searchlog``):

* Name query (text = the CLDR name of emoji ``e``; target = ``e``): ``rel 2`` for ``e`` only.
  ``rel 1`` for another image ``j`` when all three hold:
  (a) one of ``j``'s true keywords has all its content words among the query's content words
  ("pregnant" or "light skin tone" for "pregnant man: light skin tone");
  (b) the query content words found in ``j``'s name + true keywords carry at least
  ``REL1_MIN_IDF_SHARE`` (50%) of the IDF mass of all the query's content words;
  (c) the same holds for the words of the name's head, the part before ":" in CLDR's
  "base: qualifiers" names ("man judge" in "man judge: dark skin tone", "kiss" in
  "kiss: person, person, light skin tone, ..."); without a colon the head is the whole name.
  IDF is ``log(N / df)`` with df counted over the images' name + true-keyword word sets. Why weighted,
  and why (c): CLDR names are full of frequent modifiers. Counting words, "man surfing: light skin
  tone" would make every light-skinned man relevant (4 of 5 words shared) and "flag: France" every
  flag (1 of 2); by IDF the rare word ("surfing", "france") must usually be shared, and (c) stops a
  pile of skin-tone words from outweighing the head ("kiss: ..., medium skin tone, dark skin tone"
  is not about any person with those skin tones). On the full corpus this gives a median of 7
  relevance-1 images per name query (a quarter have none); the few broad names ("man",
  "light skin tone") keep large sets, of which a candidate list shows at most 8.
  Content words are :func:`words` minus ``STOPWORDS`` (function words only; "face" is content).
* Keyword query (text = CLDR keyword ``k``; target = ``"kw:" + k``): ``rel 2`` for images whose true
  keywords contain ``k``; ``rel 1`` for images whose name contains all content words of ``k`` but whose
  true keywords lack ``k``; ``rel 0`` otherwise.

Caching (under ``CorpusConfig.cache_dir``): a catalog of renderable emoji, the region features and the
search log are three separate files, each named by a key and carrying a fingerprint of everything it
was built from. Changing the noise settings therefore rebuilds only the (seconds-cheap) log, never the
(minutes-expensive) features. A missing, unreadable or stale cache file is rebuilt with a one-line
message; writes are atomic (temporary file + ``os.replace``).

Where things are (this module: :func:`load_corpus`, which caches the log, and the public names):

* ``datatypes``: the public data types (``CorpusConfig``, ``Query``, ``Corpus``, ``MissingDataError``);
* ``render``: font and canvas constants, :func:`render_emoji`, EfficientNet-Lite0 region features;
* ``cache``: cache keys, fingerprints, atomic writes, and reading a cache file or saying why not;
* ``catalog``: the data-file check, the cached catalog of renderable emoji, subset selection, splits;
* ``features``: the cached region features (sliced from a superset's cache where one exists);
* ``autotag``: the simulated noisy auto-tagger;
* ``searchlog``: content words, the relevance rules, candidate lists and clicks of the queries.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from amc_contract.text import words  # the serving text step's word rules: relevance and queries split alike
from training.corpus.autotag import auto_tag
from training.corpus.cache import atomic_write, check_fingerprint, key, read_cache, sha
from training.corpus.catalog import (
    CLDR_ANNOTATIONS,
    CLDR_DERIVED_ANNOTATIONS,
    check_data_files,
    load_catalog,
    select_subset,
)
from training.corpus.catalog import split_of as _split_of
from training.corpus.datatypes import SPLITS, Corpus, CorpusConfig, MissingDataError, Query
from training.corpus.features import load_features
from training.corpus.render import extract_region_features, render_emoji
from training.corpus.searchlog import LOG_FORMAT, build_queries, content_words, relevance_of_all

__all__ = [
    "CLDR_ANNOTATIONS",
    "CLDR_DERIVED_ANNOTATIONS",
    "SPLITS",
    "Corpus",
    "CorpusConfig",
    "MissingDataError",
    "Query",
    "content_words",
    "extract_region_features",
    "load_corpus",
    "relevance_oracle",
    "render_emoji",
    "split_of",
    "words",
]


def split_of(target: str, config: CorpusConfig) -> str:
    """The split ("train", "val", "test") a query target (emoji, or "kw:" + keyword) belongs to."""
    return _split_of(target, config.seed, config)


def relevance_oracle(corpus: Corpus) -> Callable[[Query], np.ndarray]:
    """query -> graded relevance (0/1/2) of every image of ``corpus`` (not only its candidate list)."""
    return relevance_of_all(corpus.names, corpus.true_keywords, corpus.chars)


# --------------------------------------------------------------------------------------------------
# Entry point.


def load_corpus(config: CorpusConfig = CorpusConfig(), *, progress: bool = True) -> Corpus:  # noqa: B008 - frozen
    """Build (or load from ``config.cache_dir``) the corpus; identical for identical configs."""
    config.validate()
    check_data_files()
    cache_dir = Path(config.cache_dir)
    catalog = load_catalog(cache_dir)
    subset = select_subset(catalog, config)
    chars = [catalog.chars[i] for i in subset]
    names = [catalog.names[i] for i in subset]
    true_keywords = [list(catalog.keywords[i]) for i in subset]
    regions, features_key = load_features(cache_dir, chars, progress)

    log_config = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "cache_dir"}
    if config.log_sessions == 1:
        del log_config["log_sessions"]  # the one-session log predates the option: its cached copies stay valid
    fingerprint = {
        "format": LOG_FORMAT,
        "config": log_config,
        "chars": sha("\n".join(chars)),
        "features": features_key,  # visual hard negatives depend on the features
        "catalog": sha(json.dumps([catalog.names, catalog.keywords])),  # distractor pool
    }
    path = cache_dir / f"log-{key(fingerprint)}.pkl"

    def read(p: Path) -> dict[str, Any]:
        with open(p, "rb") as f:
            data = pickle.load(f)
        check_fingerprint(data.get("fingerprint"), fingerprint)
        log = data["log"]
        if len(log["keywords"]) != len(chars):
            raise ValueError("inconsistent log")
        return log

    log = read_cache(path, "search log", read)
    if log is None:
        pool = sorted({k for ks in catalog.keywords for k in ks})
        keywords, noisy = auto_tag(true_keywords, pool, config)
        queries = build_queries(names, true_keywords, chars, regions, config)
        for session in range(1, config.log_sessions):
            queries["train"] += build_queries(names, true_keywords, chars, regions, config, session)["train"]
        log = {"keywords": keywords, "noisy": noisy, "queries": queries}
        atomic_write(path, lambda f: pickle.dump({"fingerprint": fingerprint, "log": log}, f, protocol=5))
    return Corpus(
        config=config,
        chars=chars,
        names=names,
        true_keywords=true_keywords,
        regions=regions,
        **log,
    )
