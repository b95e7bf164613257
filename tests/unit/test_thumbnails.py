"""Unit tests of export/thumbnails.py: a store's pictures are written per row and read back only from its folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from export.thumbnails import (
    FOLDER,
    INDEX,
    MAX_SIDE,
    has_thumbnails,
    thumbnail_dir,
    thumbnail_file,
    write_thumbnails,
)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (1600, 900), (10, 120, 200)).save(photo)
    pictures = [Image.new("RGB", (136, 128), (255, 0, 0)), None, str(photo),
                Image.new("RGBA", (40, 30), (0, 0, 0, 0))]
    repo = tmp_path / "repo"
    assert write_thumbnails(thumbnail_dir(repo, 3), pictures, version=3) == 3
    return repo


def test_each_row_keeps_its_picture_fitted_into_max_side(repository: Path) -> None:
    assert thumbnail_dir(repository, 3) == repository / "amc_search_v3" / FOLDER
    assert has_thumbnails(repository, 3) and not has_thumbnails(repository, 4)
    emoji, photo, clear = (thumbnail_file(repository, 3, row) for row in (0, 2, 3))
    assert Image.open(emoji).size == (136, 128) and emoji.suffix == ".png"  # small: kept as it is, lossless
    assert Image.open(photo).size == (MAX_SIDE, 288) and photo.suffix == ".jpg"  # a photo: fitted, as JPEG
    assert Image.open(clear).mode == "RGBA" and clear.suffix == ".png"  # transparency kept
    index = json.loads((thumbnail_dir(repository, 3) / INDEX).read_text())
    assert index == {"version": 3, "rows": 4, "files": ["0.png", None, "2.jpg", "3.png"]}


@pytest.mark.parametrize("version, row", [(3, 1), (3, 4), (3, -1), (4, 0)])
def test_a_row_without_picture_or_unknown_is_none(repository: Path, version: int, row: int) -> None:
    assert thumbnail_file(repository, version, row) is None


@pytest.mark.parametrize("name", ["../../amc_v3/manifest.json", "/etc/passwd", "sub/0.png", "link.png"])
def test_an_index_entry_leading_outside_the_folder_is_never_returned(repository: Path, name: str) -> None:
    folder = thumbnail_dir(repository, 3)
    (repository / "amc_v3").mkdir()
    (repository / "amc_v3" / "manifest.json").write_text("{}")
    (folder / "sub").mkdir()
    (folder / "sub" / "0.png").write_bytes(b"x")
    (folder / "link.png").symlink_to(repository / "amc_v3" / "manifest.json")
    (folder / INDEX).write_text(json.dumps({"version": 3, "rows": 1, "files": [name]}))
    assert thumbnail_file(repository, 3, 0) is None


def test_an_unreadable_picture_names_its_row(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="store row 1"):
        write_thumbnails(tmp_path / "t", [None, tmp_path / "bad.png"], version=1)


def test_make_candidates_keeps_its_picture_files_for_the_stores_thumbnails(tmp_path: Path) -> None:
    """``amc-client make-candidates`` records the files; ``Gallery.of_candidates`` (``export.publish
    --store-candidates``) hands them to the store's thumbnails."""
    from amc_client import cli
    from export.store import Gallery

    files = []
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        Image.new("RGB", (64, 48), colour).save(tmp_path / f"{name}.png")
        files.append(str(tmp_path / f"{name}.png"))
    (tmp_path / "keywords.txt").write_text("red | warm\nblue\n")
    out = tmp_path / "mine.npz"
    assert cli.main(["make-candidates", *files, "--keywords-file", str(tmp_path / "keywords.txt"), "-o", str(out)]) == 0
    gallery = Gallery.of_candidates(out)
    assert gallery.ids == ["red", "blue"] and gallery.images == files and gallery.regions.shape == (2, 49, 1280)
    assert gallery.keywords.tolist() == [["red", "warm"], ["blue", ""]]
    assert cli.load_candidates(out).ids == ("red", "blue")  # the file still reads as candidates
    repo = tmp_path / "repo"
    assert write_thumbnails(thumbnail_dir(repo, 1), gallery.images, version=1) == 2
    assert Image.open(thumbnail_file(repo, 1, 1)).getpixel((0, 0)) == (0, 0, 255)


def test_a_gallery_with_pictures_for_some_rows_only_is_refused_at_once() -> None:
    import numpy as np

    from export.store import Gallery

    with pytest.raises(ValueError, match="2 images but 1 pictures"):
        Gallery(np.zeros((2, 49, 1280), np.float16), [["a"], ["b"]], ["x", "y"], images=[None])
