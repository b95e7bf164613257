"""Unit tests of the search page's answers (no server, no browser): each failure of a search is one line a person
can act on, the app imports no torch, and the figures of docs/search.md are generated from reports/ui.json."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from amc_client import (
    DeadlineExceededError,
    InvalidInputError,
    MixedVersionError,
    ModelVersionError,
    RankedResult,
    Routing,
    ServerUnavailableError,
)
from ui.answers import EMPTY, Searcher


class FakeClient:
    """Answers ``search`` from a queue of results or exceptions; routing as given."""

    url, timeout_s = "127.0.0.1:9", 10.0

    def __init__(self, *answers, routing: Routing | None = None) -> None:
        self.answers, self.routing_now, self.calls = list(answers), routing or Routing(serving_version=1), []

    def search(self, query, top_k=10, ids=None, *, validate=True):
        self.calls.append((query, top_k, ids, validate))
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def routing(self):
        return self.routing_now


def result(version: int, row: int = 0) -> RankedResult:
    return RankedResult(candidate_id=f"s{row}", score=0.5, rank=1, visual_weight=0.7, language_weight=0.3,
                        top_keywords=[("cat", 0.6), ("face", 0.4)], region_attention=np.full((7, 7), 1 / 49),
                        model_version=version, store_row=row)


def test_a_blank_query_is_answered_without_a_request() -> None:
    client = FakeClient()
    assert Searcher(client, None).search("  \t") == (400, {"error": EMPTY, "kind": "empty"})
    assert client.calls == []


def test_queries_go_to_the_server_unchecked_and_results_carry_their_explanation(tmp_path) -> None:
    client = FakeClient([result(1, 4)])
    status, body = Searcher(client, tmp_path).search("cat")
    assert client.calls == [("cat", 12, None, False)]  # validate=False: the server's reason, not the client's
    assert status == 200 and body["version"] == 1 and not body["canary"] and not body["pictures"]
    first = body["results"][0]
    assert first["alt"] == "s4 - cat, face" and first["picture"] is None and first["row"] == 4
    assert first["visual"] == 0.7 and first["keywords"] == [["cat", 0.6], ["face", 0.4]]


def test_the_canary_is_named() -> None:
    client = FakeClient([result(2)], routing=Routing(1, canary_version=2, canary_share=0.1, canary_search=True))
    _, body = Searcher(client, None).search("cat")
    assert body["canary"] and body["canary_share"] == 0.1


@pytest.mark.parametrize("error, status, words", [
    (InvalidInputError("server rejected the request to 'amc_search' (INVALID_ARGUMENT): in ensemble 'amc_search', "
                       "amc_search_step: query '?!' normalizes to nothing"), 400,
     "The server refused the query (INVALID_ARGUMENT): query '?!' normalizes to nothing"),
    (ServerUnavailableError("overloaded: 8 requests in flight", status="UNAVAILABLE"), 503, "busy (overloaded)"),
    (ServerUnavailableError("Exceeds maximum queue size", status="UNAVAILABLE"), 503, "busy (overloaded)"),
    (ServerUnavailableError("failed to connect to all addresses"), 503, "127.0.0.1:9 is not answering"),
    (DeadlineExceededError("no answer in 10 s"), 504, "did not answer within 10 s"),
    (ModelVersionError("unknown model amc_search"), 503, "No model with a candidate store is loaded"),
    (MixedVersionError("version -1"), 503, "rolled out during this search"),
])
def test_each_failure_is_one_line(error, status, words) -> None:
    got, body = Searcher(FakeClient(error), None).search("cat")
    assert got == status and words in body["error"] and "\n" not in body["error"]


def test_rows_of_a_version_rolled_out_under_the_page_search_the_whole_store() -> None:
    client = FakeClient([result(2, 7)], [result(2, 3)], routing=Routing(serving_version=2))
    status, body = Searcher(client, None).search("cat", rows=[7, 8], rows_version=1)
    assert status == 200 and body["among"] is None and "rolled out under the page" in body["note"]
    assert [c[2] for c in client.calls] == [[7, 8], None]
    refused = InvalidInputError("store row 3600 is outside the store")
    client = FakeClient(refused, [result(2, 3)], routing=Routing(serving_version=2))
    assert Searcher(client, None).search("cat", rows=[3600], rows_version=1)[1]["note"]


def test_the_app_imports_no_torch() -> None:
    code = "import sys, ui.app, ui.answers; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_readme_figures_are_generated_from_ui_json(tmp_path) -> None:
    from ui import readme

    assert readme.main(["--check"]) == 0
    text = readme.PAGE.read_text(encoding="utf-8")
    stale = tmp_path / "README.md"
    stale.write_text(text.replace(readme.END, "p50 1 ms, typed by hand\n" + readme.END), encoding="utf-8")
    assert readme.main(["--check", "--readme", str(stale)]) == 1
