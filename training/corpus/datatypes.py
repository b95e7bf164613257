"""The corpus's public data types (re-exported by ``training.corpus``): its configuration, a query of the log,
the corpus itself, and the error for missing Debian data. A module of its own so that the package's submodules
import them without importing the package's ``__init__``, which imports those submodules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class MissingDataError(RuntimeError):
    """A Debian package or data file the corpus is built from is not installed."""


@dataclass(frozen=True)
class CorpusConfig:
    # Seeds every random choice: subset, auto-tagger noise, candidates, clicks and the split hash.
    seed: int = 0
    # Number of images to keep (a seeded subset of related images); None keeps every colour emoji.
    max_images: int | None = None
    # Probability that the auto-tagger misses each true CLDR keyword of a normal image.
    keyword_drop_rate: float = 0.3
    # Wrong tags (CLDR keywords of other emoji) the auto-tagger adds to every normal image.
    distractors_per_image: int = 2
    # Share of images whose auto-tagger keywords are almost all noise.
    noisy_image_share: float = 0.3
    # At most this many true keywords survive on a noisy image.
    noisy_true_keywords_kept: int = 0
    # Wrong tags added to a noisy image.
    noisy_distractors: int = 5
    # Length of each query's candidate list (all images if the corpus is smaller).
    candidates_per_query: int = 30
    # Share of query targets held out for validation.
    val_share: float = 0.1
    # Share of query targets held out for testing.
    test_share: float = 0.2
    # Search sessions logged per training query: each a fresh candidate list with its own clicks and dwell
    # (a busier search engine's log). Validation and test keep one session, so their lists never change.
    # 4 rather than 1: +0.04 test NDCG@1 and +0.04 regional-name R@1 on seed 0 (reports/eval_history.md).
    log_sessions: int = 4
    # Cache directory (relative paths are taken from the current working directory).
    cache_dir: str = ".cache/amc"

    def validate(self) -> None:
        for name in ("keyword_drop_rate", "noisy_image_share", "val_share", "test_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"CorpusConfig.{name} must be in [0, 1], got {value}")
        if self.val_share + self.test_share >= 1.0:
            raise ValueError("CorpusConfig.val_share + test_share must leave a training share")
        for name in (
            "distractors_per_image",
            "noisy_true_keywords_kept",
            "noisy_distractors",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"CorpusConfig.{name} must be >= 0")
        if self.candidates_per_query < 1:
            raise ValueError("CorpusConfig.candidates_per_query must be >= 1")
        if self.log_sessions < 1:
            raise ValueError("CorpusConfig.log_sessions must be >= 1")
        if self.max_images is not None and self.max_images < 10:
            raise ValueError("CorpusConfig.max_images must be >= 10 (queries are needed in every split)")


@dataclass(frozen=True, eq=False)
class Query:
    text: str  # what the user typed: a CLDR name or a CLDR keyword
    kind: str  # "name" | "keyword"
    target: str  # the emoji char (name query) or "kw:" + keyword; the split is by target
    candidates: np.ndarray  # int64 (C,) image indices, in presentation order
    relevance: np.ndarray  # int64 (C,) graded relevance in {0, 1, 2}
    clicks: np.ndarray  # bool (C,) simulated clicks
    satisfied: np.ndarray  # bool (C,) clicks with a long dwell (the user stayed): see searchlog.DWELL

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Query):
            return NotImplemented
        return (
            (self.text, self.kind, self.target) == (other.text, other.kind, other.target)
            and np.array_equal(self.candidates, other.candidates)
            and np.array_equal(self.relevance, other.relevance)
            and np.array_equal(self.clicks, other.clicks)
            and np.array_equal(self.satisfied, other.satisfied)
        )

    def __hash__(self) -> int:
        return hash((self.text, self.kind, self.target))


SPLITS = ("train", "val", "test")


@dataclass(eq=False)
class Corpus:
    config: CorpusConfig
    chars: list[str]  # the emoji string of each image
    names: list[str]  # CLDR tts name
    true_keywords: list[list[str]]  # CLDR keywords
    keywords: list[list[str]]  # auto-tagger keywords (noisy), what the model sees
    noisy: np.ndarray  # bool (n_images,), images whose keywords are mostly noise
    regions: np.ndarray  # float16 (n_images, 49, 1280): 7x7 feature map, region r = row*7+col
    queries: dict[str, list[Query]]  # "train" / "val" / "test"

    def summary(self) -> str:
        n = len(self.chars)
        lines = [
            f"AMC emoji corpus (seed {self.config.seed}): {n} images, "
            f"{int(self.noisy.sum())} noisy ({self.noisy.mean():.0%}); "
            f"{len({k for ks in self.true_keywords for k in ks})} distinct true tags, "
            f"{len({k for ks in self.keywords for k in ks})} distinct auto-tagger tags "
            f"(mean {np.mean([len(k) for k in self.keywords]):.1f} per image)",
            f"  regions {self.regions.shape} {self.regions.dtype}",
            f"  {'split':<6} {'name':>6} {'keyword':>8} {'total':>6} {'cands':>6} "
            f"{'rel>0':>6} {'rel2':>5} {'rel1':>5} {'clicks':>6} {'long':>5}",
        ]
        for split in SPLITS:
            qs = self.queries[split]
            if not qs:
                lines.append(f"  {split:<6} {0:>6} {0:>8} {0:>6}")
                continue

            def mean(f: Callable[[Query], float], qs: list[Query] = qs) -> float:
                return float(np.mean([f(q) for q in qs]))

            lines.append(
                f"  {split:<6} {sum(q.kind == 'name' for q in qs):>6} "
                f"{sum(q.kind == 'keyword' for q in qs):>8} {len(qs):>6} "
                f"{mean(lambda q: len(q.candidates)):>6.1f} "
                f"{mean(lambda q: (q.relevance > 0).sum()):>6.2f} "
                f"{mean(lambda q: (q.relevance == 2).sum()):>5.2f} "
                f"{mean(lambda q: (q.relevance == 1).sum()):>5.2f} "
                f"{mean(lambda q: q.clicks.sum()):>6.2f} "
                f"{mean(lambda q: q.satisfied.sum()):>5.2f}"
            )
        lines.append("  (cands, rel>0, rel2, rel1, clicks, long-dwell clicks: means per query over its candidate list)")
        return "\n".join(lines)
