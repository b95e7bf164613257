"""Canary routing: what the ``amc`` ensemble's config parameters say about which version serves whom.

A rollout writes it (``export.repository.set_routing``), and reads it back (:func:`parse`, ``read_routing``); the
client reads it from the server (``get_model_config``, :func:`parse`) and routes its requests by it
(``amc_client._routing``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from amc_contract import signatures as sig


@dataclass(frozen=True)
class Routing:
    """Canary routing read from the ``amc`` model's config parameters.

    ``canary_share`` of the unpinned queries go to ``amc_v{canary_version}``, the rest to ``amc``; where the
    canary version has a candidate store (``canary_search``), the same share of searches go to its
    ``amc_search_v{canary_version}``, the rest to ``amc_search``.
    """

    serving_version: int | None
    canary_version: int | None = None
    canary_share: float = 0.0
    canary_search: bool = False


def parse(config: Mapping[str, Any]) -> Routing:
    """``get_model_config("amc", as_json=True)`` (or its ``config``) -> :class:`Routing` (missing parameters: no
    canary); ValueError naming a malformed parameter."""
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
            raise ValueError(
                f"model {sig.ENSEMBLE_NAME!r} has a malformed routing parameter {key}={raw!r}"
            ) from None

    serving, canary = version(sig.ROUTING_SERVING_VERSION), version(sig.ROUTING_CANARY_VERSION)
    raw = params.get(sig.ROUTING_CANARY_SHARE, "").strip() or "0"
    try:
        share = float(raw)
    except ValueError:
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"model {sig.ENSEMBLE_NAME!r} has a malformed routing parameter canary_share={raw!r}")
    canary_search = canary is not None and params.get(sig.ROUTING_CANARY_SEARCH, "").strip() == "1"
    return Routing(serving, canary, share if canary is not None else 0.0, canary_search)
