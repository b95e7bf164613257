"""Plain data in and out of the client: candidates (two input forms), ranked results (routing:
:class:`amc_contract.routing.Routing`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from amc_contract import signatures as sig

from .errors import InvalidInputError

D = sig.REGION_FEATURE_DIM


@dataclass(frozen=True, eq=False)
class Candidate:
    """One candidate image: its region features and its keywords.

    ``regions``: (R, 1280) EfficientNet-Lite0 region features (float32; float64 is cast), R = 49 for a 7x7 map,
    region r = row * 7 + col. ``keywords``: the image's tags (non-empty strings; may be empty).
    ``region_mask``: optional (R,) bool, True for real regions (default: all True).
    """

    id: str
    regions: np.ndarray
    keywords: Sequence[str] = ()
    region_mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise InvalidInputError(f"candidate id must be a non-empty string, got {self.id!r}")
        what = f"candidate {self.id!r}"
        regions = _regions(self.regions, what, "(R, 1280)")
        object.__setattr__(self, "regions", regions)
        object.__setattr__(self, "keywords", _keyword_list(self.keywords, what))
        if self.region_mask is not None:
            object.__setattr__(self, "region_mask", _mask(self.region_mask, regions.shape[:1], what, "(R,)"))


@dataclass(frozen=True, eq=False)
class CandidateArrays:
    """A whole candidate set as arrays (the form an ``.npz`` file or a feature cache holds).

    ``ids``: (N,) strings; ``regions``: (N, R, 1280) float32 (float64 is cast); ``keywords``: (N, K) strings
    with ``""`` padding the shorter lists; ``region_mask``: optional (N, R) bool (default: all True).
    """

    ids: Sequence[str]
    regions: np.ndarray
    keywords: Any
    region_mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        ids = [
            i.item() if isinstance(i, np.str_) else i for i in np.asarray(self.ids, dtype=object).reshape(-1)
        ]
        bad = [i for i in ids if not isinstance(i, str) or not i]
        if bad:
            raise InvalidInputError(f"candidate ids must be non-empty strings, got {bad[0]!r}")
        regions = _regions(self.regions, "candidate arrays", "(N, R, 1280)")
        if regions.shape[0] != len(ids):
            raise InvalidInputError(
                f"candidate arrays: {len(ids)} ids but regions has {regions.shape[0]} candidates"
            )
        keywords = _keyword_array(self.keywords, len(ids))
        object.__setattr__(self, "ids", tuple(ids))
        object.__setattr__(self, "regions", regions)
        object.__setattr__(self, "keywords", keywords)
        if self.region_mask is not None:
            mask = _mask(self.region_mask, regions.shape[:2], "candidate arrays", "(N, R)")
            object.__setattr__(self, "region_mask", mask)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, eq=False)
class RankedResult:
    """One ranked candidate with the model's explanation of its score.

    ``top_keywords``: the candidate's keywords with their LAN attention, highest first. ``region_attention``:
    VAN attention over the regions, a (7, 7) map when the candidate has 49 regions, else (R,).
    ``model_version``: the model version that scored it. ``store_row``: its row in the server's candidate store
    (results of :meth:`AMCClient.search`; pass it back in ``search(..., ids=[...])`` to search among those rows).
    """

    candidate_id: str
    score: float
    rank: int
    visual_weight: float
    language_weight: float
    top_keywords: list[tuple[str, float]]
    region_attention: np.ndarray = field(repr=False)
    model_version: int
    store_row: int | None = None


# ---- validation helpers ----------------------------------------------------------------------------------


def _regions(x: Any, what: str, shape: str) -> np.ndarray:
    ndim = shape.count(",") + 1
    if not isinstance(x, np.ndarray):
        raise InvalidInputError(
            f"{what}: regions must be a numpy array of shape {shape}, got {type(x).__name__}"
        )
    if x.dtype == np.float64:
        with np.errstate(over="ignore"):  # overflow becomes inf, reported below
            x = x.astype(np.float32)
    elif x.dtype != np.float32:
        raise InvalidInputError(f"{what}: regions must be float32 (float64 is cast), got {x.dtype}")
    if x.ndim != ndim or x.shape[-1] != D:
        raise InvalidInputError(f"{what}: regions must have shape {shape} with {D} features, got {x.shape}")
    if x.shape[-2] == 0:
        raise InvalidInputError(f"{what}: regions has no regions (shape {x.shape})")
    if not np.isfinite(x).all():
        where = np.argwhere(~np.isfinite(x))[0][:-1].tolist()
        raise InvalidInputError(f"{what}: regions contain NaN or inf (first at index {where})")
    return x


def _mask(x: Any, shape: tuple[int, ...], what: str, named: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.bool_:
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise InvalidInputError(f"{what}: region_mask must be a bool numpy array, got {got}")
    if x.shape != shape:
        raise InvalidInputError(f"{what}: region_mask must have shape {named} = {shape}, got {x.shape}")
    if not x.any(axis=-1).all():
        raise InvalidInputError(f"{what}: region_mask masks every region of a candidate; keep at least one")
    return x


def _keyword_list(x: Any, what: str) -> tuple[str, ...]:
    if isinstance(x, str | bytes):
        raise InvalidInputError(f"{what}: keywords must be a list of strings, not a single string {x!r}")
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if not isinstance(x, list | tuple):
        raise InvalidInputError(f"{what}: keywords must be a list of strings, got {type(x).__name__}")
    for i, k in enumerate(x):
        if not isinstance(k, str):
            raise InvalidInputError(f"{what}: keyword {i} is {type(k).__name__} {k!r}, not a string")
        if not k:
            raise InvalidInputError(f"{what}: keyword {i} is empty ('' is reserved for padding)")
    return tuple(x)


def _keyword_array(x: Any, n: int) -> np.ndarray:
    """(N, K) object array of str, '' padding; K may be 0."""
    if isinstance(x, list | tuple) and x and all(isinstance(row, list | tuple) for row in x):
        lengths = sorted({len(row) for row in x})
        if len(lengths) > 1:
            raise InvalidInputError(
                f"candidate arrays: the keyword lists have different lengths ({', '.join(map(str, lengths))}); "
                f"pad each list with '' to {lengths[-1]} keywords, or pass a list of Candidate objects"
            )
    try:
        arr = np.asarray(x, dtype=object)
    except ValueError as e:  # ragged nesting deeper than one level
        raise InvalidInputError(f"candidate arrays: keywords must be an (N, K) array of strings: {e}") from e
    if arr.ndim != 2 or arr.shape[0] != n:
        raise InvalidInputError(
            f"candidate arrays: keywords must have shape (N, K) with N = {n}, got {arr.shape}"
        )
    flat = arr.reshape(-1)
    for i, k in enumerate(flat):
        if isinstance(k, np.str_):
            flat[i] = str(k)
        elif not isinstance(k, str):
            raise InvalidInputError(
                f"candidate arrays: keyword at {np.unravel_index(i, arr.shape)} is {k!r}, not a string"
            )
    return arr
