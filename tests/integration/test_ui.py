"""The search page in a real browser: a real tritonserver serving a published store with its thumbnails, the app
(``ui.app``) on a free loopback port, and Debian's headless Chromium typing queries (``ui.browser``).

The model and corpus are conftest's ``trained`` and ``small_corpus`` (160 images); the version is published the way
``--store-corpus`` publishes (``Gallery.of_corpus``: the emoji renders become the store's thumbnails).
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from amc_client import AMCClient, Routing
from export.publish import publish
from export.store import Gallery
from export.thumbnails import has_thumbnails, thumbnail_dir
from serving.server import TritonServer
from tests.unit.test_ui import FakeClient, result
from ui.answers import EMPTY, TOP_K, Searcher
from ui.app import make_server
from ui.browser import chromium, type_and_search, wait_for_search
from ui.report import FIGURES, app_url, measure, running_app, screenshot, search_models


@pytest.fixture(scope="module")
def served(trained, small_corpus, tmp_path_factory):
    repository = tmp_path_factory.mktemp("ui-repository")
    version = publish(trained.checkpoint, repository, store=Gallery.of_corpus(small_corpus), log=lambda *_: None)
    assert has_thumbnails(repository, version)
    with TritonServer(repository, models=search_models(version),
                      log_file=repository.parent / "tritonserver.log") as server:
        yield server, version


@pytest.fixture(scope="module")
def app(served):
    server, _ = served
    with running_app(server.grpc_url, server.repository) as app:
        yield app


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, app):
    browser.get(app_url(app))
    return browser


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_a_query_paints_results_with_their_pictures_and_explanations(page, served):
    assert js(page, "return document.activeElement.id") == "q"  # focused on load: type at once
    answer = type_and_search(page, "cat face")
    assert answer["error"] is None and answer["results"] == TOP_K
    assert answer["images"] == TOP_K and answer["loaded"] == TOP_K  # every picture loaded
    assert js(page, "return [...document.querySelectorAll('#results img')].every(i => i.naturalWidth > 0)")
    alts = js(page, "return [...document.querySelectorAll('#results img')].map(i => i.alt)")
    ids = js(page, "return [...document.querySelectorAll('#results .id')].map(e => e.textContent)")
    chips = js(page, "return [...document.querySelectorAll('#results .keywords')].map(u => "
                     "u.firstChild.firstChild.textContent)")  # each result's strongest tag (its percentage apart)
    assert all(alt.startswith(i) and chip in alt for alt, i, chip in zip(alts, ids, chips, strict=True))
    status = js(page, "return document.getElementById('status').textContent")
    assert f"model version {served[1]}" in status and "whole store" in status and "canary" not in status
    widths = js(page, "return [...document.querySelectorAll('.modality')].map(b => [b.children[0].style.width, "
                      "b.children[1].style.width])")
    assert all(round(float(v[:-1]) + float(w[:-1])) == 100 for v, w in widths)  # the visual vs language bar
    shades = js(page, "return [...document.querySelectorAll('.keywords li')].map(l => "
                      "+l.style.getPropertyValue('--attention'))")
    assert shades and max(shades) == 1 and min(shades) >= 0  # tags shaded by LAN attention, the strongest full


def test_the_heat_map_appears_when_toggled(page):
    type_and_search(page, "red heart")
    visible = "return [...document.querySelectorAll('.heat')].map(c => getComputedStyle(c).display !== 'none')"
    assert not any(js(page, visible))
    page.find_element("id", "heat").click()
    assert all(js(page, visible)) and len(js(page, visible)) == TOP_K
    painted = js(page, "const c = document.querySelector('.heat'); const d = c.getContext('2d')"
                       ".getImageData(0, 0, c.width, c.height).data; let a = 0; for (let i = 3; i < d.length; i += 4) "
                       "a = Math.max(a, d[i]); return [c.width, c.height, a, c.getBoundingClientRect().width, "
                       "c.previousSibling.getBoundingClientRect().width]")
    assert painted[:2] == [7, 7] and painted[2] == 200  # VAN's 7x7 map, the strongest region most opaque
    assert painted[3] == pytest.approx(painted[4], abs=1)  # over the picture, at its size (to the pixel)


def test_an_empty_query_shows_the_message_and_the_page_goes_on(page):
    answer = type_and_search(page, "   ")
    assert answer["error"] == EMPTY
    assert js(page, "return document.getElementById('error').textContent") == EMPTY
    assert js(page, "return document.getElementById('error').hidden") is False
    assert type_and_search(page, "dog")["error"] is None
    assert js(page, "return document.getElementById('error').hidden") is True


@pytest.mark.parametrize("query, reason", [("a" * 1100, "query is 1100 bytes long, more than the maximum"),
                                           ("?! ...", "normalizes to nothing")])
def test_bad_input_shows_the_servers_reason(page, query, reason):
    answer = type_and_search(page, query)
    assert answer["error"].startswith("The server refused the query (INVALID_ARGUMENT): ")
    assert reason in answer["error"] and "amc_search" not in answer["error"]  # the reason, not the plumbing
    assert "Traceback" not in js(page, "return document.body.textContent")
    assert type_and_search(page, "fire")["error"] is None  # the app keeps running


def test_keyboard_only_tab_reaches_the_results_and_enter_refines(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    first = type_and_search(page, "smiling face")
    rows = js(page, "return window.amcLast.results")
    assert first["error"] is None and rows == TOP_K
    for _ in range(5):  # query box -> search button -> heat map toggle -> first result
        ActionChains(page).send_keys(Keys.TAB).perform()
        if js(page, "return document.activeElement.classList.contains('pick')"):
            break
    assert js(page, "return document.activeElement.closest('#results li') !== null")
    before = int(js(page, "return document.body.dataset.searches"))
    shown = js(page, "return [...document.querySelectorAll('#results .id')].map(e => e.textContent)")
    ActionChains(page).send_keys(Keys.ENTER).perform()  # click the focused result: search among these rows
    refined = wait_for_search(page, before)
    assert refined["error"] is None and 1 <= refined["results"] <= TOP_K
    again = js(page, "return [...document.querySelectorAll('#results .id')].map(e => e.textContent)")
    assert set(again) <= set(shown)  # the search ran among the previous results only
    assert f"the {TOP_K} previous results" in js(page, "return document.getElementById('status').textContent")
    assert js(page, "return document.activeElement === document.querySelector('#results .pick')")  # still in the results


def test_a_result_opens_at_full_size(page):
    type_and_search(page, "thumbs up")
    page.find_element("css selector", "#results .full").click()
    assert js(page, "return document.getElementById('full').open")
    size = js(page, "const i = document.getElementById('full-img'); return i.decode().then(() => "
                    "[i.naturalWidth, i.naturalHeight])")
    assert size == [136, 128]  # the emoji render, as the version kept it


def test_a_version_without_thumbnails_shows_ids(served, browser, tmp_path):
    server, _ = served
    with running_app(server.grpc_url, tmp_path) as bare:  # a repository folder without this version's pictures
        browser.get(app_url(bare))
        answer = type_and_search(browser, "cat face")
    assert answer["error"] is None and answer["images"] == 0
    assert len(js(browser, "return [...document.querySelectorAll('.no-picture')]")) == TOP_K
    assert "no pictures: showing ids" in js(browser, "return document.getElementById('status').textContent")


def test_the_canary_and_a_version_rolled_out_under_the_page_are_said(browser):
    """The page's own wording of what the app answers (the app's side: tests/unit/test_ui.py), with a stand-in
    client: version 1 answers, then version 2 as the canary, then a click on a version-2 result finds version 3."""
    canary = Routing(serving_version=1, canary_version=2, canary_share=0.25, canary_search=True)
    client = FakeClient([result(1)], [result(2)], [result(3)], [result(3)], routing=canary)
    server = make_server(client, None, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        browser.get(app_url(server))
        status = "return document.getElementById('status').textContent"
        note = "return document.getElementById('note').hidden ? '' : document.getElementById('note').textContent"
        type_and_search(browser, "cat")
        assert "answered by model version 1 " in js(browser, status) and js(browser, note) == ""
        type_and_search(browser, "cat")
        assert "answered by the canary, model version 2 (25% of searches)" in js(browser, status)
        assert "version 1 answered before, version 2 now" in js(browser, note)
        client.routing_now = Routing(serving_version=3)
        before = int(js(browser, "return document.body.dataset.searches"))
        browser.find_element("css selector", "#results .pick").click()  # rows of version 2; version 3 answers
        assert wait_for_search(browser, before)["error"] is None
        assert "rolled out under the page" in js(browser, note) and "whole store" in js(browser, status)
    finally:
        server.shutdown()
        server.server_close()


def test_a_query_too_long_for_a_url_is_a_line_on_the_page(page):
    from selenium.webdriver.common.keys import Keys

    box, before = page.find_element("id", "q"), int(js(page, "return document.body.dataset.searches"))
    js(page, "arguments[0].value = arguments[1]", box, "cat " * 17_000)  # past http.server's 64 KiB request line
    box.send_keys(Keys.ENTER)
    answer = wait_for_search(page, before)
    assert answer["error"] == "The page's server answered HTTP 414 without results (the query is far too long)."
    assert type_and_search(page, "cat")["error"] is None


def test_a_server_that_is_down_is_a_line_on_the_page(browser, tmp_path):
    with running_app("127.0.0.1:1", tmp_path) as lonely:  # nothing listens on port 1
        browser.get(app_url(lonely))
        answer = type_and_search(browser, "cat face")
        assert "not answering" in answer["error"]
        assert get(app_url(lonely))[0] == 200  # the app is still there


@pytest.mark.parametrize("path", ["/thumb/{v}/../../amc_v{v}/manifest.json", "/thumb/{v}/..%2F..%2Famc_v{v}%2Fmanifest.json",
                                  "/thumb/{v}/%2e%2e/index.json", "/thumb/../amc_v{v}/manifest.json",
                                  "/thumb/{v}/0/../../../../etc/passwd", "/thumb/{v}/999999", "/thumb/{v}/-1",
                                  "/thumb/{v}/index.json", "/thumb/{v}/0.png", "//etc/passwd", "/../ui/app.py",
                                  "/static/../app.py", "/thumb/7/0"])
def test_no_path_outside_a_versions_thumbnails_is_served(app, served, path):
    version = served[1]
    status, body = get(app_url(app).rstrip("/") + path.format(v=version))
    assert status == 404 and b"version" not in body and b"root:" not in body


def test_thumbnails_are_served_from_the_versions_folder(app, served):
    server, version = served
    status, body = get(app_url(app) + f"thumb/{version}/0")
    assert status == 200 and body == (thumbnail_dir(server.repository, version) / "0.png").read_bytes()


def test_the_app_binds_loopback_unless_told(served):
    with AMCClient(served[0].grpc_url) as client:
        server = make_server(client, None, port=0)
        try:
            assert server.server_address[0] == "127.0.0.1"
        finally:
            server.server_close()


def test_searcher_answers_json_without_a_browser(served):
    server, version = served
    with AMCClient(server.grpc_url, timeout_s=30) as client:
        status, body = Searcher(client, server.repository).search("cat face")
    assert status == 200 and body["version"] == version and body["pictures"] and not body["canary"]
    first = body["results"][0]
    assert len(first["regions"]) == 7 and all(len(line) == 7 for line in first["regions"])
    assert first["picture"] == f"/thumb/{version}/{first['row']}"
    json.dumps(body)  # what the page receives


def test_report_figures_and_screenshot(page, app, tmp_path: Path):
    result = measure(page, app_url(app), ["cat face", "red heart", "dog"], warm_up=None)
    assert tuple(result) == FIGURES
    assert result["queries"] == 3 and result["errors"] == 0 and result["images_loaded"] == 3 * TOP_K
    assert 0 < result["p50_ms"] <= result["p95_ms"]
    screenshot(page, tmp_path / "ui.png")
    assert (tmp_path / "ui.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
