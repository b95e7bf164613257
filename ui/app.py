"""The search page's HTTP server: the page's three files, the search API and the store's pictures.

    amc-ui --url 127.0.0.1:8001 --repository runs/repository      (make ui)

Python's own ``http.server`` (``ThreadingHTTPServer``): the app serves three static files, one JSON endpoint and
image files, which needs no framework, and every script and style is shipped in ``ui/static`` (no CDN: the page
works without internet; its Content-Security-Policy allows nothing from elsewhere). Routes:

    GET /, /app.js, /style.css        the page (a fixed list: no file name from a URL reaches the file system)
    GET /api/search?q=...[&rows=1,5,9&v=N]
                                      ``answers.Searcher.search``: JSON results with explanations, or {"error"}
    GET /thumb/<version>/<row>        store row ``row``'s picture, as version ``version`` kept it
                                      (``export.thumbnails.thumbnail_file``: only files inside that version's
                                      thumbnail folder; anything else is 404)

It binds 127.0.0.1 unless ``--host`` says otherwise, and keeps running whatever a request does: every failure of
a search is an answer with an ``error`` line (``answers``), an unexpected exception in a handler is logged and
answered 500 with a one-line message.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from amc_client import AMCClient
from export.thumbnails import thumbnail_file
from ui.answers import Searcher

log = logging.getLogger("amc-ui")

STATIC = Path(__file__).resolve().parent / "static"
PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
         "/app.js": ("app.js", "text/javascript; charset=utf-8"), "/style.css": ("style.css", "text/css; charset=utf-8")}
PICTURE_TYPES = {".png": "image/png", ".jpg": "image/jpeg"}
THUMB = re.compile(r"^/thumb/(\d{1,9})/(\d{1,9})$")
MAX_ROWS = 1000  # a narrowed search names at most this many rows (the page sends its current results: 12)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Handler(BaseHTTPRequestHandler):
    """One request; the server's ``searcher`` and ``repository`` are set by :func:`make_server`."""

    server: AppServer
    protocol_version = "HTTP/1.1"  # keep-alive: the page's API call and pictures reuse connections

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):  # the browser went away mid-answer
            pass
        except Exception:  # noqa: BLE001 - the app keeps running; the trace goes to the log, not to the page
            log.exception("request %s failed", self.path)
            self._json(500, {"error": "The page's server failed on this request (see its log).", "kind": "internal"})

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _route(self) -> None:
        url = urlsplit(self.path)
        if url.path in PAGES:
            name, kind = PAGES[url.path]
            self._send(200, (STATIC / name).read_bytes(), kind, cache="no-cache")
        elif url.path == "/api/search":
            self._search(parse_qs(url.query, keep_blank_values=True))
        elif match := THUMB.match(url.path):
            self._picture(int(match[1]), int(match[2]))
        elif url.path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _search(self, params: dict[str, list[str]]) -> None:
        query = params.get("q", [""])[0]
        rows, version = None, None
        try:
            if params.get("rows", [""])[0]:
                rows = [int(r) for r in params["rows"][0].split(",")]
                if len(rows) > MAX_ROWS:
                    raise ValueError(f"at most {MAX_ROWS} rows")
            if params.get("v", [""])[0]:
                version = int(params["v"][0])
        except ValueError as e:
            self._json(400, {"error": f"Bad search parameters ({e}).", "kind": "invalid"})
            return
        status, body = self.server.searcher.search(query, rows, version)
        self._json(status, body)

    def _picture(self, version: int, row: int) -> None:
        path = None if self.server.repository is None else thumbnail_file(self.server.repository, version, row)
        if path is None or path.suffix not in PICTURE_TYPES:
            self._send(404, b"no such picture\n", "text/plain; charset=utf-8")
            return
        # A version's pictures never change (a new version is a new folder): the browser may keep them.
        self._send(200, path.read_bytes(), PICTURE_TYPES[path.suffix], cache="max-age=86400, immutable")

    def _json(self, status: int, body: dict) -> None:
        self._send(status, json.dumps(body, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8",
                   cache="no-store")

    def _send(self, status: int, data: bytes, kind: str, cache: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        if cache:
            self.send_header("Cache-Control", cache)
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s %s", self.address_string(), format % args)


class AppServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung browser connection never keeps the app from stopping
    searcher: Searcher
    repository: Path | None


def make_server(client: AMCClient, repository: Path | None, *, host: str = "127.0.0.1", port: int = 8080,
                top_k: int | None = None) -> AppServer:
    """The app on ``host:port`` (port 0: a free one; ``server.server_address`` says which), not yet serving."""
    server = AppServer((host, port), Handler)
    server.searcher = Searcher(client, repository) if top_k is None else Searcher(client, repository, top_k=top_k)
    server.repository = repository
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="amc-ui", description="The AMC search page: whole-store search with the "
                                     "model's explanations, in a browser.")
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address (default: %(default)s)")
    parser.add_argument("--repository", type=Path, default=Path("runs/repository"),
                        help="the model repository the server serves, for the store's pictures (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="(default: %(default)s; 0: any free port)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per search (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="amc-ui: %(message)s")
    if not args.repository.is_dir():
        log.warning("%s is not a folder: results are shown without pictures", args.repository)
    # One retry: a page should say "not answering" within seconds, not after the client's full backoff.
    client = AMCClient(args.url, timeout_s=args.timeout, retries=1)
    try:
        server = make_server(client, args.repository, host=args.host, port=args.port)
    except OSError as e:
        print(f"amc-ui: error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"amc-ui: open http://{host}:{port}/ (searching {args.url}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
