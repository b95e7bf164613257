"""Canary routing: parse the `amc` model's config parameters and pick the model for one request."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from . import signatures as sig
from ._types import Routing
from .errors import AMCError


def parse(config: Mapping[str, Any]) -> Routing:
    """``get_model_config("amc", as_json=True)`` -> :class:`Routing` (missing parameters: no canary)."""
    cfg = config.get("config", config)
    params = {
        k: (v.get("string_value", "") if isinstance(v, Mapping) else str(v))
        for k, v in cfg.get("parameters", {}).items()
    }

    def version(key: str) -> int | None:
        raw = params.get(key, "").strip()
        if not raw:
            return None
        try:
            return int(raw)
        except ValueError:
            raise AMCError(
                f"model {sig.ENSEMBLE_NAME!r} has a malformed routing parameter {key}={raw!r}"
            ) from None

    serving, canary = version(sig.ROUTING_SERVING_VERSION), version(sig.ROUTING_CANARY_VERSION)
    raw = params.get(sig.ROUTING_CANARY_SHARE, "").strip() or "0"
    try:
        share = float(raw)
    except ValueError:
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise AMCError(f"model {sig.ENSEMBLE_NAME!r} has a malformed routing parameter canary_share={raw!r}")
    canary_search = canary is not None and params.get(sig.ROUTING_CANARY_SEARCH, "").strip() == "1"
    return Routing(serving, canary, share if canary is not None else 0.0, canary_search)


def pick(routing: Routing, rng: random.Random) -> tuple[str, int | None]:
    """The model one unpinned request goes to, and the version it is pinned to (None for ``amc``)."""
    if routing.canary_version is not None and rng.random() < routing.canary_share:
        return sig.versioned_ensemble_name(routing.canary_version), routing.canary_version
    return sig.ENSEMBLE_NAME, None


def pick_search(routing: Routing, rng: random.Random) -> tuple[str, int | None]:
    """The search ensemble one unpinned search goes to, and its pinned version (None for ``amc_search``)."""
    if routing.canary_search and routing.canary_version is not None and rng.random() < routing.canary_share:
        return sig.versioned_search_ensemble_name(routing.canary_version), routing.canary_version
    return sig.SEARCH_ENSEMBLE_NAME, None


version_of = sig.parse_versioned_ensemble_name


def loaded_versions(index: Mapping[str, Any]) -> list[int]:
    """``get_model_repository_index(as_json=True)`` -> the versions whose ``amc_v{N}`` ensemble is READY."""
    found = {version_of(m.get("name", "")) for m in index.get("models", []) if m.get("state") == "READY"}
    return sorted(v for v in found if v is not None)
