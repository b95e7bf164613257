"""The picture of each row of a version's candidate store, kept with the version (what the search page shows).

Layout: ``<repository>/amc_search_v<N>/thumbnails/`` holds ``index.json`` (``{"version", "rows", "files"}``:
``files[row]`` is the row's file name, or null for a row given no picture) and one image per row, ``<row>.png``
(or ``.jpg`` for a large photo). The folder lives in the version's pinned search ensemble, so it is published,
garbage-collected and quarantined with the version's store (``export.repository.store_paths``); Triton ignores a
model folder's non-numeric entries (its log says so once per load: "ignore version directory 'thumbnails'"). A version published without pictures has no such folder and still serves.

Pictures are fitted into ``MAX_SIDE`` pixels (never enlarged): the corpus's 136x128 emoji renders are kept as they
are, a user's photo is kept at a size a page shows at full size without sending megabytes.

Reading (:func:`thumbnail_file`) is what an HTTP server calls with a row number from a URL: it only ever returns a
file listed in the index that resolves inside the folder (no ``..``, no symbolic link leading out).

No torch here: the search page (``ui``) reads this module. Pillow is imported only where pictures are written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from amc_contract import signatures as sig

FOLDER = "thumbnails"
INDEX = "index.json"
MAX_SIDE = 512
# A picture larger than this on a side, without transparency, is kept as JPEG: a photo as PNG is several times
# larger, and the emoji renders (136x128, flat colours) stay lossless PNG.
JPEG_ABOVE = 256
JPEG_QUALITY = 88

ImageLike = str | os.PathLike | Any  # a file path, or a PIL.Image.Image


def thumbnail_dir(repository: str | Path, version: int) -> Path:
    """Where version ``version``'s store keeps its pictures."""
    return Path(repository) / sig.versioned_search_ensemble_name(version) / FOLDER


def write_thumbnails(folder: Path, images: Sequence[ImageLike | None], *, version: int) -> int:
    """One picture per store row (``images[row]``: a path, a PIL image, or None for no picture) into ``folder``,
    with its ``index.json``; returns how many were written. An unreadable file is an error naming the row."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    files: list[str | None] = []
    for row, source in enumerate(images):
        if source is None:
            files.append(None)
            continue
        try:
            picture = source if isinstance(source, Image.Image) else Image.open(source)
            picture.load()
        except (OSError, ValueError) as e:
            raise ValueError(f"store row {row}: cannot read its picture {source!r}: {e}") from e
        files.append(_save(picture, folder, row))
    index = {"version": version, "rows": len(files), "files": files}
    (folder / INDEX).write_text(json.dumps(index))
    return sum(f is not None for f in files)


def _save(picture: Any, folder: Path, row: int) -> str:
    alpha = picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info
    picture = picture.convert("RGBA" if alpha else "RGB")
    picture.thumbnail((MAX_SIDE, MAX_SIDE))  # keeps the aspect ratio, never enlarges
    if not alpha and max(picture.size) > JPEG_ABOVE:
        name = f"{row}.jpg"
        picture.save(folder / name, "JPEG", quality=JPEG_QUALITY)
    else:
        name = f"{row}.png"
        picture.save(folder / name, "PNG")
    return name


@lru_cache(maxsize=16)
def _index(folder: str, mtime_ns: int) -> tuple[str | None, ...]:
    """The index's file list (cached per folder while index.json is unchanged)."""
    files = json.loads((Path(folder) / INDEX).read_text()).get("files", [])
    return tuple(f if isinstance(f, str) else None for f in files)


def has_thumbnails(repository: str | Path, version: int) -> bool:
    return (thumbnail_dir(repository, version) / INDEX).is_file()


def thumbnail_file(repository: str | Path, version: int, row: int) -> Path | None:
    """The picture of store row ``row`` of version ``version``, or None (no such version, row or picture, or a
    listed name that would lead outside the version's folder)."""
    folder = thumbnail_dir(repository, version)
    index = folder / INDEX
    try:
        files = _index(str(folder), index.stat().st_mtime_ns)
    except (OSError, ValueError):
        return None
    if not 0 <= row < len(files) or files[row] is None:
        return None
    root = folder.resolve()
    path = (folder / files[row]).resolve()
    if path.parent != root or not path.is_file():  # a name with a separator, "..", or a link out: refused
        return None
    return path


class RenderedEmoji(Sequence):
    """The corpus's emoji as pictures, rendered when asked for (3,635 images are not held in memory at once)."""

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = list(chars)

    def __len__(self) -> int:
        return len(self.chars)

    def __getitem__(self, row):  # type: ignore[override]
        from training.corpus.render import render_emoji  # the corpus's own renderer: its features' pictures

        if isinstance(row, slice):
            return RenderedEmoji(self.chars[row])
        return render_emoji(self.chars[row])
