"""What the page asks the model, and how its answers and failures are put to a person (plain functions, no HTTP).

:class:`Searcher` turns one search of the page into ``(HTTP status, JSON body)``: the results with their
explanations (score, visual vs language weight, keywords with LAN attention, VAN's 7x7 region attention, the
picture's URL), the model version that answered and whether it was the canary; or an ``error`` line a person can
act on, never a stack trace. It talks to Triton only through :class:`amc_client.AMCClient`.

Queries go to the server unchecked (``validate=False``): a query over the bounds or one that normalizes to nothing
is refused by the server, and its INVALID_ARGUMENT reason is what the page shows. Only a blank query is answered
here, without a request.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from amc_client import (
    AMCClient,
    AMCError,
    DeadlineExceededError,
    InvalidInputError,
    MixedVersionError,
    ModelVersionError,
    RankedResult,
    Routing,
    ServerUnavailableError,
)
from export.thumbnails import has_thumbnails

log = logging.getLogger("amc-ui")

TOP_K = 12  # results a search shows: three rows of four on a laptop screen
KEYWORDS_SHOWN = 6
ROUTING_MAX_AGE_S = 1.0  # the canary routing is read at most this often (one gRPC call), as the client reads it
EMPTY = "Type something to search for: the query is empty."


def picture_url(version: int, row: int) -> str:
    return f"/thumb/{version}/{row}"


def result_json(r: RankedResult, pictures: bool) -> dict[str, Any]:
    keywords = [[k, round(w, 4)] for k, w in r.top_keywords[:KEYWORDS_SHOWN]]
    alt = r.candidate_id + (" - " + ", ".join(k for k, _ in keywords[:3]) if keywords else "")
    return {"id": r.candidate_id, "row": r.store_row, "rank": r.rank, "score": round(r.score, 4),
            "visual": round(r.visual_weight, 4), "language": round(r.language_weight, 4), "keywords": keywords,
            "regions": [[round(float(a), 4) for a in line] for line in r.region_attention.reshape(-1, 7)],
            "picture": picture_url(r.model_version, r.store_row) if pictures and r.store_row is not None else None,
            "alt": alt}


class Searcher:
    """One page's searches against one server (thread-safe: the HTTP server calls it from several threads)."""

    def __init__(self, client: AMCClient, repository: Path | None, *, top_k: int = TOP_K) -> None:
        self.client, self.repository, self.top_k = client, repository, top_k
        self._routing: Routing | None = None
        self._routing_at = -float("inf")
        self._lock = threading.Lock()

    def routing(self) -> Routing | None:
        """The server's canary routing, at most ``ROUTING_MAX_AGE_S`` old (None where it cannot be read)."""
        with self._lock:
            if time.monotonic() - self._routing_at < ROUTING_MAX_AGE_S:
                return self._routing
        try:
            routing = self.client.routing()
        except AMCError:
            routing = None
        with self._lock:
            self._routing, self._routing_at = routing, time.monotonic()
        return routing

    def pictures(self, version: int) -> bool:
        return self.repository is not None and has_thumbnails(self.repository, version)

    def search(self, query: str, rows: Sequence[int] | None = None, rows_version: int | None = None
               ) -> tuple[int, dict[str, Any]]:
        """The page's search: ``rows`` (store rows of ``rows_version``'s results) narrows it to those rows."""
        if not query.strip():
            return 400, {"error": EMPTY, "kind": "empty"}
        note = None
        try:
            started = time.perf_counter()
            try:
                results = self._search(query, rows)
            except InvalidInputError:
                if rows is None or not self._rolled_out_since(rows_version):
                    raise
                results, rows = None, None  # rows of another version's store: search the whole store instead
            if rows is not None and results and rows_version is not None and results[0].model_version != rows_version:
                results, rows = None, None
            if results is None:
                note = (f"The model was rolled out under the page (the clicked results came from version "
                        f"{rows_version}): searched the whole store instead.")
                results = self._search(query, None)
            server_ms = (time.perf_counter() - started) * 1000
        except InvalidInputError as e:
            return 400, {"error": f"The server refused the query{_refusal(e)}", "kind": "invalid"}
        except ModelVersionError as e:
            return 503, {"error": "No model with a candidate store is loaded on the server, so there is nothing "
                                  f"to search ({_reason(e)}).", "kind": "version"}
        except MixedVersionError:
            return 503, {"error": "A new model version was being rolled out during this search: search again.",
                         "kind": "version"}
        except DeadlineExceededError:
            return 504, {"error": f"The server did not answer within {self.client.timeout_s:g} s: it may be busy; "
                                  "search again in a moment.", "kind": "timeout"}
        except ServerUnavailableError as e:
            # The server's own words for a full queue or in-flight limit (as amc_client._calls.overloaded reads them).
            busy = e.status == "RESOURCE_EXHAUSTED" or any(
                words in str(e) for words in ("overloaded", "queue size", "requests in flight"))
            what = ("The server is busy (overloaded)" if busy
                    else f"The search server at {self.client.url} is not answering")
            return 503, {"error": f"{what}: search again in a moment. ({_reason(e)})", "kind": "unavailable"}
        except AMCError as e:
            log.exception("search %r failed", query)
            return 502, {"error": f"The search failed: {_reason(e)}", "kind": "internal"}
        return 200, self._answer(query, rows, results, server_ms, note)

    def _search(self, query: str, rows: Sequence[int] | None) -> list[RankedResult]:
        top_k = self.top_k if rows is None else min(self.top_k, len(rows))
        return self.client.search(query, top_k=top_k, ids=None if rows is None else list(rows), validate=False)

    def _rolled_out_since(self, rows_version: int | None) -> bool:
        routing = self.routing()
        return routing is not None and rows_version is not None and routing.serving_version != rows_version

    def _answer(self, query: str, rows: Sequence[int] | None, results: list[RankedResult], server_ms: float,
                note: str | None) -> dict[str, Any]:
        version = results[0].model_version if results else None
        routing = self.routing()
        canary = bool(routing and routing.canary_search and version is not None
                      and version == routing.canary_version and version != routing.serving_version)
        pictures = version is not None and self.pictures(version)
        return {"query": query, "among": None if rows is None else len(rows), "version": version,
                "canary": canary, "canary_share": routing.canary_share if canary and routing else 0.0,
                "pictures": pictures, "note": note, "server_ms": round(server_ms, 1),
                "results": [result_json(r, pictures) for r in results]}


# The client's wording around the server's reason: "server rejected the request to 'amc_search' (INVALID_ARGUMENT):
# in ensemble 'amc_search', amc_search_step: <reason>". A person needs the status and the reason only.
_PLUMBING = re.compile(r"^server rejected the request to '[^']*' \((?P<status>[A-Z_]+)\): (in ensemble '[^']*', \w+: )?")


def _refusal(e: InvalidInputError) -> str:
    """The end of a refused query's line: ``" (INVALID_ARGUMENT): <the server's reason>"`` where the server
    refused it, else ``": <the client's reason>"``."""
    reason = _reason(e)
    match = _PLUMBING.match(reason)
    return f" ({match['status']}): {reason[match.end():]}" if match else f": {reason}"


def _reason(e: BaseException) -> str:
    """The message of an error on one line (the server's reason, as the client passed it on)."""
    return " ".join(str(e).split())
