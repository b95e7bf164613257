"""Canary routing on the client's side: the `amc` model's config parameters read (:mod:`amc_contract.routing`), the model
picked for one request, the versions a server has loaded."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from amc_contract import signatures as sig
from amc_contract.routing import Routing
from amc_contract.routing import parse as parse_parameters

from .errors import AMCError


def parse(config: Mapping[str, Any]) -> Routing:
    """``get_model_config("amc", as_json=True)`` -> :class:`Routing` (missing parameters: no canary); a malformed
    parameter is an :class:`AMCError` (the contract's :func:`amc_contract.routing.parse` reads it)."""
    try:
        return parse_parameters(config)
    except ValueError as e:
        raise AMCError(str(e)) from None


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
