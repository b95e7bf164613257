"""The catalog of renderable emoji with their CLDR names and keywords; subset selection and splits."""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import features

from amc_contract.text import EmojiNames
from training.corpus import render
from training.corpus.cache import check_fingerprint, file_id, key, read_cache, version, write_json
from training.corpus.datatypes import SPLITS, CorpusConfig, MissingDataError

# Data locations (module constants so tests can point them elsewhere).
CLDR_ANNOTATIONS = "/usr/share/unicode/cldr/common/annotations/en.xml"
CLDR_DERIVED_ANNOTATIONS = "/usr/share/unicode/cldr/common/annotationsDerived/en.xml"
CLDR_PACKAGE = "unicode-cldr-core"
# CLDR's character labels (emoji categories: "Smileys & People", "Flags", ...): which annotated characters are emoji.
CLDR_LABELS = "/usr/share/unicode/cldr/common/properties/labels.txt"

# Bump when the build logic changes in a way that makes old cache files wrong.
CATALOG_FORMAT = 1


def check_data_files() -> None:
    render.require(render.FONT_PATH, "Noto Color Emoji font", render.FONT_PACKAGE)
    render.require(CLDR_ANNOTATIONS, "Unicode CLDR English annotations", CLDR_PACKAGE)
    render.require(CLDR_DERIVED_ANNOTATIONS, "Unicode CLDR English derived annotations", CLDR_PACKAGE)


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


def _unicode_set(text: str) -> set[str]:
    """The strings of a CLDR UnicodeSet as labels.txt writes them: ``[a-cd{xyz}]`` (ranges, characters, {strings})."""
    body, out, i = text.strip()[1:-1], set(), 0
    while i < len(body):
        if body[i] == "{":
            end = body.index("}", i)
            out.add(body[i + 1:end])
            i = end + 1
        elif i + 2 < len(body) and body[i + 1] == "-":
            out.update(chr(c) for c in range(ord(body[i]), ord(body[i + 2]) + 1))
            i += 3
        else:
            out.add(body[i])
            i += 1
    return out


def _labelled_emoji() -> set[str]:
    """Every character or sequence labels.txt gives an emoji category, without U+FE0F."""
    out: set[str] = set()
    for line in Path(CLDR_LABELS).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            out.update(s.replace("\ufe0f", "") for s in _unicode_set(line.split(";")[0]))
    return out


@lru_cache(maxsize=1)
def emoji_names() -> EmojiNames:
    """Emoji -> CLDR English name (type="tts") from the annotations (en.xml, then annotationsDerived/en.xml: skin
    tones, flags, keycaps, ZWJ sequences): the table queries are normalized with (``amc_contract.text.normalize_query``,
    text rules 2), in training and in every version publish ships (``emoji_names.json``).

    Only emoji: the annotations also name punctuation, math and currency signs ("_" "low line", "$" "dollar"),
    which stay punctuation. An entry is an emoji where it is a sequence of several code points (every such
    annotation is an emoji sequence), a code point from U+1F000 on (emoji and pictographs), or one CLDR's
    labels.txt gives an emoji category (the older emoji of the BMP: "❤" "red heart", "☕", "™").
    """
    for path, what in ((CLDR_ANNOTATIONS, "Unicode CLDR English annotations"),
                       (CLDR_DERIVED_ANNOTATIONS, "Unicode CLDR English derived annotations"),
                       (CLDR_LABELS, "Unicode CLDR character labels")):
        render.require(path, what, CLDR_PACKAGE)
    labelled = _labelled_emoji()
    names = {}
    for cp, entry in _parse_cldr().items():
        key = cp.replace("\ufe0f", "")
        if "name" in entry and (len(key) > 1 or ord(key) >= 0x1F000 or key in labelled):
            names[key] = entry["name"]
    return EmojiNames(names)


def render_fingerprint() -> dict[str, Any]:
    return {
        "font": file_id(render.FONT_PATH),
        "font_size": render.FONT_SIZE,
        "canvas": list(render.CANVAS_SIZE),
        "background": list(render.BACKGROUND),
        "pillow": version("pillow"),
        "raqm": str(features.version("raqm")),
    }


def load_catalog(cache_dir: Path) -> _Catalog:
    fingerprint = {
        "format": CATALOG_FORMAT,
        "render": render_fingerprint(),
        "cldr": [file_id(CLDR_ANNOTATIONS), file_id(CLDR_DERIVED_ANNOTATIONS)],
        "unassigned": render.UNASSIGNED_CODEPOINT,
    }
    path = cache_dir / f"catalog-{key(fingerprint)}.json"

    def read(p: Path) -> _Catalog:
        data = json.loads(p.read_text(encoding="utf-8"))
        check_fingerprint(data.get("fingerprint"), fingerprint)
        cat = _Catalog(data["chars"], data["names"], data["keywords"])
        if not (len(cat.chars) == len(cat.names) == len(cat.keywords) > 0):
            raise ValueError("inconsistent lengths")
        return cat

    cached = read_cache(path, "emoji catalog", read)
    if cached is not None:
        return cached
    entries = _parse_cldr()
    missing = np.asarray(render.render_emoji(render.UNASSIGNED_CODEPOINT), dtype=np.float32)
    chars, names, keywords = [], [], []
    for cp, entry in entries.items():
        if "name" not in entry or not entry.get("keywords"):
            continue  # e.g. currency symbols: names only, and not emoji anyway
        if not render.is_colour_glyph(render.render_emoji(cp), missing):
            continue
        chars.append(cp)
        names.append(entry["name"])
        keywords.append(entry["keywords"])
    if not chars:
        raise MissingDataError(
            f"no colour emoji rendered from {render.FONT_PATH}; is it the Noto Color Emoji font?"
        )
    catalog = _Catalog(chars, names, keywords)
    write_json(path, {"fingerprint": fingerprint, **asdict(catalog)})
    return catalog


# --------------------------------------------------------------------------------------------------
# Subset selection and splits.


def split_of(target: str, seed: int, config: CorpusConfig) -> str:
    """Seeded, stable hash of the target string -> split (never Python's randomised hash())."""
    digest = hashlib.blake2b(f"{seed}\x00{target}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    if u < config.test_share:
        return "test"
    if u < config.test_share + config.val_share:
        return "val"
    return "train"


def keyword_targets(keywords: list[list[str]]) -> list[str]:
    """Keywords carried by >= 2 images, in first-seen order (these become keyword queries)."""
    counts: dict[str, int] = defaultdict(int)
    for ks in keywords:
        for k in ks:
            counts[k] += 1
    return [k for k, c in counts.items() if c >= 2]


def select_subset(catalog: _Catalog, config: CorpusConfig) -> list[int]:
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
        targets += ["kw:" + k for k in keyword_targets([catalog.keywords[i] for i in subset])]
        if {split_of(t, config.seed, config) for t in targets} == set(SPLITS):
            return subset
    raise ValueError(f"max_images={config.max_images} too small to give queries in every split")
