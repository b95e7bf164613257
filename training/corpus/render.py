"""Emoji images and their region features: Noto Color Emoji rendering, EfficientNet-Lite0 feature maps.

The other submodules read this module's names as ``render.NAME``, so a test that replaces ``FONT_PATH``
or ``extract_region_features`` here replaces it wherever the corpus code uses it.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from training.corpus.datatypes import MissingDataError

# Data location (a module constant so tests can point it elsewhere).
FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_PACKAGE = "fonts-noto-color-emoji"

# Rendering: Noto Color Emoji is a bitmap (CBDT) font whose only strike is 109 px, giving
# 136x128 glyphs; any other size would be a rescale of that bitmap anyway.
FONT_SIZE = 109
CANVAS_SIZE = (136, 128)  # (width, height)
BACKGROUND = (255, 255, 255)
# A codepoint that is unassigned in Unicode, hence absent from the font: whatever Pillow draws for it
# is the "missing glyph" look that renderable emoji must differ from.
UNASSIGNED_CODEPOINT = "\u0378"

# Region features.
FEATURE_INPUT_SIZE = 224  # amc_client.images.INPUT_SIZE; in the features cache's fingerprint
FEATURE_GRID = 7
N_REGIONS = FEATURE_GRID * FEATURE_GRID
FEATURE_DIM = 1280


def require(path: str, what: str, package: str) -> None:
    if not os.path.isfile(path):
        raise MissingDataError(
            f"{what} not found at {path}: install the Debian package {package} (apt-get install {package})"
        )


@lru_cache(maxsize=4)
def _font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, FONT_SIZE)


def render_emoji(char: str) -> Image.Image:
    """The emoji as an RGB 136x128 image on white: the rendering the features are computed from."""
    require(FONT_PATH, "Noto Color Emoji font", FONT_PACKAGE)
    image = Image.new("RGB", CANVAS_SIZE, BACKGROUND)
    # Pillow's raqm layout shapes ZWJ sequences, skin tones and flags into their single glyph.
    ImageDraw.Draw(image).text((0, 0), char, font=_font(FONT_PATH), embedded_color=True)
    return image


def is_colour_glyph(image: Image.Image, missing: np.ndarray) -> bool:
    """False for glyphs that render blank, near-uniform, or as the font's missing-glyph look."""
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.std() < 2.0:
        return False
    return float(np.abs(pixels - missing).mean()) > 1.0


def extract_region_features(images: list[Image.Image], *, progress: bool = True) -> np.ndarray:
    """EfficientNet-Lite0 7x7 feature maps as float16 (n, 49, 1280), region r = row * 7 + col.

    The client's :func:`amc_client.extract_region_features` (the features a served model is given: RGB, 224x224
    bilinear, ``(x - 127) / 128``), one of its batches at a time for the progress bar, cast to float16 for the cache.
    """
    from tqdm import tqdm

    from amc_client import extract_region_features as client_features
    from amc_client.images import BATCH

    out = np.zeros((len(images), N_REGIONS, FEATURE_DIM), dtype=np.float16)
    with tqdm(total=len(images), desc="EfficientNet-Lite0 regions", unit="img", disable=not progress) as bar:
        for start in range(0, len(images), BATCH):
            batch = images[start : start + BATCH]
            out[start : start + len(batch)] = client_features(batch).astype(np.float16)
            bar.update(len(batch))
    return out
