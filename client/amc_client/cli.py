"""``amc-client``: rank a candidate file, search the server's candidate store, show server status, build candidate
files from images.

Exit codes: 0 ok, 1 other error, 2 bad input (arguments, files, rejected request, unknown model version),
3 server unavailable (unreachable, overloaded, not ready, or no answer in time). Errors go to stderr, one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np

from amc_contract.routing import Routing

from ._client import AMCClient
from ._types import Candidate, CandidateArrays, RankedResult
from .errors import (
    AMCError,
    DeadlineExceededError,
    InvalidInputError,
    ModelVersionError,
    ServerUnavailableError,
)

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_UNAVAILABLE = 0, 1, 2, 3
PROG = "amc-client"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message} (see {PROG} --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def load_candidates(path: str | Path) -> CandidateArrays:
    """An ``.npz`` with ``ids`` (N,), ``regions`` (N, R, 1280), ``keywords`` (N, K) ('' pads), optional
    ``region_mask`` (N, R) -> :class:`CandidateArrays`."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"cannot read candidates file {str(path)!r}: {e}") from e
    missing = [k for k in ("ids", "regions", "keywords") if k not in arrays]
    if missing:
        raise InvalidInputError(
            f"candidates file {str(path)!r} lacks the arrays {missing} "
            "(needs ids, regions, keywords; optional region_mask)"
        )
    return CandidateArrays(arrays["ids"], arrays["regions"], arrays["keywords"], arrays.get("region_mask"))


def save_candidates(path: str | Path, candidates: Sequence[Candidate], images: Sequence[str] | None = None) -> None:
    """Write candidates (equal region counts) as the ``.npz`` that :func:`load_candidates` reads; ``images``: each
    candidate's picture file, kept as ``images`` (a store published from the file keeps them as its thumbnails:
    ``export.publish --store-candidates``)."""
    k = max((len(c.keywords) for c in candidates), default=0)
    keywords = np.array([list(c.keywords) + [""] * (k - len(c.keywords)) for c in candidates], dtype=str)
    pictures = {} if images is None else {"images": np.array([str(i) for i in images], dtype=str)}
    np.savez(
        path,
        ids=np.array([c.id for c in candidates], dtype=str),
        regions=np.stack([c.regions for c in candidates]),
        keywords=keywords.reshape(len(candidates), k),
        **pictures,
    )


def format_table(results: Sequence[RankedResult], keywords: int = 3) -> str:
    """A readable table: rank, id, score, visual/language weight, the top keywords with their weights."""
    width = max([len("id"), *(len(r.candidate_id) for r in results)])
    lines = [f"{'rank':>4}  {'id':<{width}}  {'score':>7}  {'visual':>6}  {'language':>8}  top keywords"]
    for r in results:
        kws = ", ".join(f"{k} ({w:.2f})" for k, w in r.top_keywords[:keywords]) or "-"
        lines.append(
            f"{r.rank:>4}  {r.candidate_id:<{width}}  {r.score:>7.4f}  {r.visual_weight:>6.2f}  "
            f"{r.language_weight:>8.2f}  {kws}"
        )
    return "\n".join(lines)


def _as_json(query: str, results: Sequence[RankedResult]) -> str:
    return json.dumps(
        {
            "query": query,
            "model_version": results[0].model_version if results else None,
            "results": [
                {
                    "rank": r.rank,
                    "id": r.candidate_id,
                    "score": r.score,
                    "visual_weight": r.visual_weight,
                    "language_weight": r.language_weight,
                    "top_keywords": r.top_keywords,
                    "model_version": r.model_version,
                    **({} if r.store_row is None else {"store_row": r.store_row}),
                }
                for r in results
            ],
        },
        indent=2,
    )


def _rank(args: argparse.Namespace) -> int:
    candidates = load_candidates(args.candidates)
    with AMCClient(args.url, timeout_s=args.timeout, model_version=args.model_version) as client:
        # --top-k is how many rows to show: a file with fewer candidates shows them all.
        results = client.rank(args.query, candidates, top_k=min(args.top_k, len(candidates)) or None)
    if args.json:
        print(_as_json(args.query, results))
    else:
        version = results[0].model_version if results else "-"
        print(f"query {args.query!r}: {len(candidates)} candidates, model version {version}")
        print(format_table(results))
    return EXIT_OK


def read_queries(path: str) -> list[str]:
    """One query per line of a UTF-8 file (``-``: standard input); blank lines are skipped."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"cannot read queries from {path}: {e}") from e
    queries = [line.strip() for line in text.splitlines() if line.strip()]
    if not queries:
        raise InvalidInputError(f"{path} holds no query (one per line)")
    return queries


def _search(args: argparse.Namespace) -> int:
    if (args.query is None) == (args.queries_file is None):
        raise InvalidInputError("give one query, or --queries-file with one query per line (not both)")
    queries = [args.query] if args.queries_file is None else read_queries(args.queries_file)
    with AMCClient(args.url, timeout_s=args.timeout, model_version=args.model_version) as client:
        # A file's queries go in requests of many queries each (search_many): each request's cost once per request.
        found = ([client.search(args.query, top_k=args.top_k, ids=args.ids)] if args.queries_file is None
                 else client.search_many(queries, top_k=args.top_k, ids=args.ids))
    if args.json:
        docs = [json.loads(_as_json(q, results)) for q, results in zip(queries, found, strict=True)]
        print(json.dumps(docs[0] if args.queries_file is None else docs, indent=2))
        return EXIT_OK
    where = "the whole candidate store" if args.ids is None else f"{len(args.ids)} store rows"
    for query, results in zip(queries, found, strict=True):
        version = results[0].model_version if results else "-"
        print(f"query {query!r}: top {len(results)} of {where}, model version {version}")
        print(format_table(results))
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    with AMCClient(args.url, timeout_s=args.timeout) as client:
        if not client.server_ready():
            client.routing()  # raises the precise error when the server cannot be reached
            raise ServerUnavailableError(f"server at {args.url} is up but not ready")
        ready = client.model_ready()
        routing = client.routing() if ready else Routing(None)
        try:
            versions = client.model_versions()
        except AMCError:
            # The repository index is restricted when the server runs with an admin key: ask the versions
            # the routing names instead.
            named = {routing.serving_version, routing.canary_version} - {None}
            versions = sorted(v for v in named if client.model_ready(v))
    if args.json:
        doc = {"url": args.url, "server_ready": True, "model_ready": ready, "versions": versions}
        print(json.dumps({**doc, **dataclasses.asdict(routing)}, indent=2))
    else:
        serving = routing.serving_version if routing.serving_version is not None else "?"
        canary = "none"
        if routing.canary_version is not None:
            canary = f"version {routing.canary_version} gets {routing.canary_share:.0%} of queries"
        print(f"server   {args.url}: ready")
        print(f"model    amc: {'ready' if ready else 'NOT READY'}")
        print(f"versions {', '.join(map(str, versions)) or 'none'} loaded")
        print(f"serving  version {serving}")
        print(f"canary   {canary}")
    return EXIT_OK if ready else EXIT_UNAVAILABLE


def _make_candidates(args: argparse.Namespace) -> int:
    from .images import candidates_from_images

    keywords = None
    if args.keywords_file:
        try:
            lines = Path(args.keywords_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise InvalidInputError(f"cannot read keywords file {args.keywords_file!r}: {e}") from e
        keywords = [[k.strip() for k in line.split("|") if k.strip()] for line in lines]
    candidates = candidates_from_images(args.images, keywords=keywords)
    save_candidates(args.output, candidates, images=[str(Path(p).resolve()) for p in args.images])
    print(f"wrote {len(candidates)} candidates to {args.output}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Query the AMC image-search ranker served by Triton.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def server_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default="127.0.0.1:8001",
                       help="Triton gRPC address, or a comma list of a fleet's replicas (default: %(default)s)")
        p.add_argument(
            "--timeout", type=float, default=10.0, help="seconds per request (default: %(default)s)"
        )
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    rank = commands.add_parser("rank", help="rank the candidates in an .npz file for a query")
    rank.add_argument("query")
    rank.add_argument(
        "--candidates",
        required=True,
        metavar="FILE",
        help=".npz with ids (N,), regions (N,R,1280), keywords (N,K) ('' pads), optional region_mask",
    )
    rank.add_argument("--top-k", type=int, default=10, help="results to show (default: %(default)s)")
    rank.add_argument("--model-version", type=int, default=None, metavar="N", help="pin to amc_vN")
    server_options(rank)
    rank.set_defaults(run=_rank)

    search = commands.add_parser("search", help="the best images of the server's candidate store for a query")
    search.add_argument("query", nargs="?", help="the query (or --queries-file)")
    search.add_argument("--queries-file", metavar="FILE", help="one query per line (- for stdin), searched in "
                                                               "requests of many queries each")
    search.add_argument("--top-k", type=int, default=10, help="results (default: %(default)s)")
    search.add_argument("--ids", type=int, nargs="+", metavar="ROW", help="search only these store rows")
    search.add_argument("--model-version", type=int, default=None, metavar="N", help="pin to amc_search_vN")
    server_options(search)
    search.set_defaults(run=_search)

    status = commands.add_parser("status", help="server and model readiness, loaded versions, canary routing")
    server_options(status)
    status.set_defaults(run=_status)

    make = commands.add_parser("make-candidates", help="build a candidates .npz from images (extra: images)")
    make.add_argument("images", nargs="+", help="image files; ids are their file-name stems")
    make.add_argument("--keywords-file", metavar="FILE", help="one line per image, keywords separated by '|'")
    make.add_argument("-o", "--output", required=True, metavar="OUT.npz")
    make.set_defaults(run=_make_candidates)
    return parser


def exit_code(e: BaseException) -> int:
    if isinstance(e, InvalidInputError | ModelVersionError | ImportError):
        return EXIT_BAD_INPUT
    if isinstance(e, ServerUnavailableError | DeadlineExceededError):
        return EXIT_UNAVAILABLE
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (AMCError, ImportError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
