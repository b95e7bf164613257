"""Measure the search page in a real browser: ``reports/ui.json`` and the screenshot ``reports/ui.png``.

    python -m ui.report --repository runs/ui-repository          (make ui-report)

Serves the repository's serving version (with its candidate store) from a real tritonserver, starts the page's
app on a free loopback port, and drives headless Chromium: one search to warm the server up (not counted), then
:data:`QUERIES` typed into the query box one by one, each timed by the page from Enter to the results painted with
every picture decoded (``window.amcLast.ms``, ``ui/static/app.js``). Writes ``{"queries", "p50_ms", "p95_ms",
"images_loaded", "errors"}``: searches timed, the median and 95th percentile (inclusive quantiles) of those times,
result pictures that loaded (``naturalWidth > 0``; every answer shows ``answers.TOP_K``, so all loaded is
``queries * TOP_K``; the run prints both), and searches that ended with an error line. Then the screenshot: one more search with the heat map on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from amc_client import AMCClient
from amc_contract import signatures as sig
from export.repository import STEPS, read_routing
from export.thumbnails import has_thumbnails
from serving.server import TritonServer
from ui.app import AppServer, make_server
from ui.browser import chromium, type_and_search

# As people type them: names, single words, a plural, a misspelling-free mix of visual and tag-led queries.
QUERIES = ["thumbs up", "red heart", "cat face", "smiling face with sunglasses", "dog", "pizza", "rocket",
           "rainbow", "fire", "birthday cake", "crying face", "flag of france", "hot coffee", "christmas tree",
           "snowman", "soccer ball", "musical notes", "light bulb", "ghost", "grinning cat"]
WARM_UP = "hello"
SCREENSHOT_QUERY = "cat face"
FIGURES = ("queries", "p50_ms", "p95_ms", "images_loaded", "errors")


def search_models(version: int) -> list[str]:
    """What serves whole-store search of ``version`` (and ``amc``, whose config carries the routing)."""
    return ([s.model_name for s in STEPS] + [sig.versioned_ensemble_name(version), sig.ENSEMBLE_NAME]
            + [sig.SEARCH_STEP.model_name, sig.versioned_search_ensemble_name(version), sig.SEARCH_ENSEMBLE_NAME])


@contextmanager
def running_app(grpc_url: str, repository: Path | None, **options: Any) -> Iterator[AppServer]:
    """The page's app on a free loopback port, served from a thread; its URL is ``app_url(server)``."""
    client = AMCClient(grpc_url, timeout_s=30, retries=1)
    server = make_server(client, repository, port=0, **options)
    thread = threading.Thread(target=server.serve_forever, name="amc-ui", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        client.close()


def app_url(server: AppServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def figures(answers: Sequence[dict]) -> dict[str, Any]:
    """The page's own timings of ``answers`` (``window.amcLast`` of each search) -> ``ui.json``'s figures."""
    ms = [a["ms"] for a in answers]
    return {"queries": len(answers), "p50_ms": round(statistics.median(ms), 1),
            "p95_ms": round(statistics.quantiles(ms, n=20, method="inclusive")[18], 1),
            "images_loaded": sum(a["loaded"] for a in answers),
            "errors": sum(a["error"] is not None for a in answers)}


def measure(driver: Any, url: str, queries: Sequence[str] = QUERIES, *, warm_up: str | None = WARM_UP) -> dict:
    """Search ``queries`` in the page at ``url`` as a person would; the figures of ``ui.json``."""
    driver.get(url)
    if warm_up:
        type_and_search(driver, warm_up)
    answers = []
    for query in queries:
        answers.append(type_and_search(driver, query))
        print(f"  {query!r}: {answers[-1]['ms']:.0f} ms, {answers[-1]['loaded']}/{answers[-1]['images']} pictures"
              + (f", error: {answers[-1]['error']}" if answers[-1]["error"] else ""), flush=True)
    result = figures(answers)
    print(f"  {result['images_loaded']} of {sum(a['images'] for a in answers)} result pictures loaded", flush=True)
    return result


def screenshot(driver: Any, path: Path, query: str = SCREENSHOT_QUERY) -> None:
    """The page with ``query``'s results and the heat map on."""
    from selenium.webdriver.common.by import By

    heat = driver.find_element(By.ID, "heat")
    if not heat.is_selected():
        heat.click()
    type_and_search(driver, query)
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ui.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True,
                        help="a repository whose serving version has a candidate store (export.publish --store-corpus)")
    parser.add_argument("--out", type=Path, default=Path("reports/ui.json"))
    parser.add_argument("--screenshot", type=Path, default=Path("reports/ui.png"))
    args = parser.parse_args(argv)
    version = read_routing(args.repository).serving_version
    if version is None or not (args.repository / sig.versioned_search_ensemble_name(version)).is_dir():
        print(f"error: {args.repository}'s serving version ({version}) has no candidate store: publish one with "
              "python -m export.publish --store-corpus", file=sys.stderr)
        return 2
    if not has_thumbnails(args.repository, version):
        print(f"error: version {version} of {args.repository} was published without thumbnails (before the search "
              "page, or from a gallery without pictures): publish the checkpoint into a new repository with "
              "--store-corpus", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="amc-ui-report-") as tmp, \
            TritonServer(args.repository, models=search_models(version), log_file=Path(tmp) / "tritonserver.log"
                         ) as triton, running_app(triton.grpc_url, args.repository) as app:
        print(f"tritonserver at {triton.grpc_url}, page at {app_url(app)}; {len(QUERIES)} searches", flush=True)
        driver = chromium()
        try:
            result = measure(driver, app_url(app))
            screenshot(driver, args.screenshot)
        finally:
            driver.quit()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} and {args.screenshot}: {json.dumps(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
