"""The search step's own cost on the CPU: ``amc_search_step``'s ``execute`` in-process, on batches of requests.

    python -m benchmarks.search_step --requests 64 --ids 100 --top-k 10 --out /tmp/step.json
    python -m benchmarks.search_step --code 53d43a7 --label before --report reports/search_step_cpu.json

What a GPU profile of ``amc_search`` could not split (``reports/gpu.md``: the step's time per execution against its
graph's) is measured here without a server: the real ``TritonPythonModel`` of the search step (``model.py`` of a
version folder laid out from ``--code``'s ``serving/backends``: this tree, another folder, or a git revision of this
repository, so that an older step is measured by the same script), run in this process with the shared fake
``pb_utils`` (``tests/fake_pb_utils.py``: the wheel's own ``triton_python_backend_utils.py``, so BYTES outputs are
serialized by Triton's ``serialize_byte_tensor`` as in the stub). Each execution gets ``--requests`` requests as the
dynamic batcher hands them over: one query each, ``--ids`` distinct store rows and ``top_k``, every output asked for
(as the ensemble asks). The queries are distinct across the whole run, 1-3 words of the store's keywords, one word
made up in ``--unknown-share`` of them, so that no cache of queries or words can flatter the figure.

The version: ``--source`` (a published ``amc_search_step/<N>`` folder), else one published once from
``--checkpoint`` into ``--state`` with a synthetic gallery of ``--gallery-size`` images (as ``benchmarks.search_gpu``
builds its small store) and reused after. The graph runs on onnxruntime's CPU provider with ``--ort-threads`` in the
warm-up; after it, ``--graph replay`` (default) answers each graph call with the outputs of the first call of its
shape, so that an execution costs what the step's own Python costs (on a GPU the graph is the small part;
``--graph real`` keeps running it).

Figures: ms per execution (median over ``--executions`` after ``--warmup``), timed as they are; then as many
executions with the phases timed (exclusive time of the callables of :data:`PHASES`: parse, tokenize, graph,
outputs; the rest of ``execute`` is "other"). ``outputs_digest`` hashes every response's tensors of the first
execution (the real graph's answers; BYTES as serialized): equal digests, equal answers on the wire. ``--report``
adds the run to a JSON report ``{"command", "before", "after", "runs"}`` under ``--label``.

Why one module: it is the one entry point of the search step's own cost, and its parts (laying a version out from
``--code``, the requests, the timers) serve that measurement only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from amc_contract import signatures as sig

ROOT = Path(__file__).resolve().parent.parent
DATA_FILES = ("store.json", "tokenizer.json", "term_weights.json", "version.json", "emoji_names.json")
GRAPH_FILE = "search_store.onnx"
# The step's code in a tree: the step package and the contract (before the contract package: the client's text.py).
STEP_CODE = ("serving/backends", "client/amc_contract", "client/amc_client/text.py")
# phase -> (owner, attribute) of the callables timed, for this tree's step and older ones (those absent are skipped).
# Owners: "step" the TritonPythonModel, "features" its TextFeatures, "graph" its search graph, "search" the search
# module it loaded, "queries" its QueryText, "pb_utils" the fake backend module.
PHASES = {
    "parse": [("step", "_parse"), ("search", "parse_request")],
    "tokenize": [("features", "query_tokens"), ("features", "query_words"), ("queries", "features")],
    "graph": [("graph", "run")],
    "outputs": [("pb_utils", "Tensor"), ("pb_utils", "InferenceResponse"), ("search", "gather")],
}


def log(msg: str) -> None:
    print(f"[search_step {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fake_backend():
    if str(ROOT) not in sys.path:  # tests/ is not installed: the shared fake is read from this checkout
        sys.path.insert(0, str(ROOT))
    from tests import fake_pb_utils

    return fake_pb_utils


# ---- the version and the step --------------------------------------------------------------------------------
def published(args) -> Path:
    """The search step's version folder to measure: ``--source``, or the one built into ``--state`` (built now
    if missing)."""
    if args.source is not None:
        return args.source
    done = args.state / "build.json"
    if done.is_file():
        return Path(json.loads(done.read_text())["step_dir"])
    from .search import build
    from .workloads import collection_words, synthetic_gallery

    gallery = synthetic_gallery(collection_words(args.checkpoint), size=args.gallery_size)
    repo, version, _, _ = build(args.state / "build", args.checkpoint, gallery, 0, "float32")
    step_dir = repo / sig.SEARCH_STEP.model_name / str(version)
    done.write_text(json.dumps({"step_dir": str(step_dir), "checkpoint": str(args.checkpoint),
                                "gallery_size": args.gallery_size}))
    return step_dir


def lay_out(source: Path, code: Path, dest: Path) -> Path:
    """``dest/amc_search_step/<N>``: ``code``'s step as a publish of that tree lays it out (the step package and the
    contract vendored, ``export.repository.write_step_code``; a tree from before the contract package: ``text_step.py``
    as ``model.py``, every other backend file and the client's ``text.py`` beside it as ``amc_<name>.py``), over
    ``source``'s data."""
    from export.repository import TEXT_STEP_MODULE, write_step_code

    model_dir = dest / sig.SEARCH_STEP.model_name
    shutil.rmtree(model_dir, ignore_errors=True)
    version_dir = model_dir / source.name
    version_dir.mkdir(parents=True)
    backends, contract = code / "serving" / "backends", code / "client" / "amc_contract"
    if contract.is_dir():
        write_step_code(version_dir, TEXT_STEP_MODULE, steps=backends, contract=contract)
    else:
        for path in backends.glob("*.py"):
            shutil.copy(path, version_dir / ("model.py" if path.name == "text_step.py" else f"amc_{path.name}"))
        shutil.copy(code / "client" / "amc_client" / "text.py", version_dir / "amc_text.py")
    for name in DATA_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, version_dir / name)
    (version_dir / GRAPH_FILE).symlink_to((source / GRAPH_FILE).resolve())
    return version_dir


def step_config(source: Path, threads: int) -> dict:
    """The step's config as Triton hands it to ``initialize`` (the source's config.pbtxt, else the CPU settings'),
    with ``threads`` onnxruntime threads."""
    from google.protobuf import json_format

    from export.configs import SEARCH_SETTINGS, parse_config, search_step_config

    path = source.parent / "config.pbtxt"
    config = parse_config(path.read_text()) if path.is_file() else search_step_config(SEARCH_SETTINGS["cpu"])
    config.parameters["intra_op_num_threads"].string_value = str(threads)
    config.parameters["execution_provider"].string_value = "cpu"
    out = json_format.MessageToDict(config, preserving_proto_field_name=True)
    for tensor in out["input"] + out["output"]:  # protobuf's JSON writes int64 as strings, Triton's as numbers
        tensor["dims"] = [int(d) for d in tensor["dims"]]
    return out


def load(version_dir: Path, config: dict, pb):
    step_module = fake_backend().load_step(version_dir / "model.py", f"_search_step_{os.getpid()}_{id(config)}")
    step = step_module.TritonPythonModel()
    step.initialize({"model_config": json.dumps(config), "model_name": sig.SEARCH_STEP.model_name,
                     "model_version": version_dir.name, "model_repository": str(version_dir.parent)})
    return step


# What each ablation turns off in a step that has it (``--ablate``), to measure what that part saves.
ABLATIONS = {
    "bytes": "BYTES outputs serialized by the stub's serialize_byte_tensor, element by element",
    "words": "every query through the tokenizer and StoreWords.query (no table of words)",
    "ids": "each request's ids checked on its own (no check of all requests' ids at once)",
}


def ablate(step, pb, what: list[str]) -> list[str]:
    done = []
    if "bytes" in what and hasattr(step, "bytes"):
        step.bytes.tensor = lambda name, array, serialized: pb.Tensor(name, array)
        done.append("bytes")
    if "words" in what and hasattr(step, "queries"):
        step.queries.cls_sep = None
        done.append("words")
    if "ids" in what and hasattr(step, "search_module"):
        step.search_module.proven_ids = lambda ids, size: [False] * len(ids)
        done.append("ids")
    return done


# ---- the requests --------------------------------------------------------------------------------------------
def queries(store: dict, count: int, seed: int, unknown_share: float) -> list[str]:
    """``count`` distinct queries of 1-3 words of the store's keywords; in ``unknown_share`` of them one word is made
    up (8 random letters: a word no store or table has, so its WordPiece ids are looked up while the step runs)."""
    from amc_contract.text import content_words

    words = sorted({w for row in store["keywords"] for k in row for w in content_words(k)})
    rng, out = np.random.default_rng(seed), {}
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    while len(out) < count:
        chosen = list(rng.choice(words, size=int(rng.integers(1, 4))))
        if rng.random() < unknown_share:
            chosen[int(rng.integers(len(chosen)))] = "".join(rng.choice(letters, size=8))
        out.setdefault(" ".join(chosen), None)
    return list(out)


def make_requests(pb, names: list[str], texts: list[str], size: int, n: int, k: int, outputs: list[str],
                  rng) -> list:
    qn, idn, kn = names
    return [pb.InferenceRequest({qn: np.array([[t.encode()]], dtype=object),
                                 idn: rng.choice(size, size=n, replace=False).astype(np.int64)[None],
                                 kn: np.array([[k]], dtype=np.int64)}, requested_output_names=outputs)
            for t in texts]


# ---- timing --------------------------------------------------------------------------------------------------
class Phases:
    """Exclusive time per phase of the wrapped callables (a callable's time less that of those it calls)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.stack: list[float] = []  # per open call: time spent in wrapped callees

    def wrap(self, phase: str, fn: Callable) -> Callable:
        def timed(*a: Any, **kw: Any) -> Any:
            self.stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                elapsed = time.perf_counter() - t0
                inner = self.stack.pop()
                self.totals[phase] = self.totals.get(phase, 0.0) + elapsed - inner
                if self.stack:
                    self.stack[-1] += elapsed
        return timed


def instrument(step, pb, phases: Phases) -> list[str]:
    owners = {"step": step, "features": getattr(step, "features", None), "graph": getattr(step, "search", None),
              "search": getattr(step, "search_module", None), "queries": getattr(step, "queries", None),
              "pb_utils": pb}
    found = []
    for phase, targets in PHASES.items():
        for owner, attr in targets:
            obj = owners.get(owner)
            if obj is not None and callable(getattr(obj, attr, None)):
                setattr(obj, attr, phases.wrap(phase, getattr(obj, attr)))
                found.append(f"{phase}: {owner}.{attr}")
    return found


def digest(fake, requests: list, responses: list) -> str:
    h = hashlib.sha256()
    for request, returned in zip(requests, responses, strict=True):
        response = fake.answer(request, returned)
        if response.has_error():
            raise RuntimeError(f"a request failed: {response.error().message()}")
        for t in response.output_tensors():
            a = t.as_numpy()
            h.update(f"{t.name()} {a.dtype} {a.shape}".encode())
            h.update(t.serialized if t.serialized is not None else np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class Replay:
    """The graph's outputs of its first call per input shape, replayed for later calls of that shape (``--graph
    replay``): an execution then costs what the step's Python costs, as on a GPU where the graph is short."""

    def __init__(self, run: Callable) -> None:
        self.real, self.seen = run, {}

    def record(self, feeds: dict) -> dict:
        key = tuple((n, a.shape) for n, a in feeds.items())
        out = self.real(feeds)
        self.seen.setdefault(key, out)
        return out

    def replay(self, feeds: dict) -> dict:
        key = tuple((n, a.shape) for n, a in feeds.items())
        found = self.seen.get(key)
        return self.real(feeds) if found is None else {n: a.copy() for n, a in found.items()}


def measure(args) -> dict:
    fake = fake_backend()
    source = published(args).resolve()
    store = json.loads((source / "store.json").read_text(encoding="utf-8"))
    work = Path(tempfile.mkdtemp(prefix="amc-search-step-"))
    try:
        tree, code = checkout(args.code, work / "code")
        version_dir = lay_out(source, tree, work)
        config = step_config(source, args.ort_threads)
        with fake.installed() as pb:
            step = load(version_dir, config, pb)
            ablated = ablate(step, pb, args.ablate)
            try:
                plain, timed, per, found, first_digest = rounds(args, step, pb, config, store)
            finally:
                step.finalize()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ms = np.array(plain)
    return {
        "label": args.label, "code": code, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average_1m": os.getloadavg()[0], "source": str(source), "store_rows": store["size"],
        "keyword_slots": max(map(len, store["keywords"])), "requests": args.requests, "ids": args.ids,
        "top_k": args.top_k, "unknown_share": args.unknown_share, "graph": args.graph,
        "outputs": args.outputs or "every one", "ablated": {a: ABLATIONS[a] for a in ablated},
        "executions": args.executions, "warmup": args.warmup, "ort_threads": args.ort_threads,
        "ms_per_execution": {"median": float(np.median(ms)), "mean": float(ms.mean()), "min": float(ms.min()),
                             "p90": float(np.percentile(ms, 90))},
        "us_per_request": float(np.median(ms)) * 1e3 / args.requests,
        # The timers add their own cost to each wrapped call: compare phases with each other, and these executions'
        # total with the uninstrumented ones above.
        "instrumented": {"ms_per_execution_median": float(np.median(timed)),
                         "breakdown_ms": {p: float(np.median([t[p] for t in per])) for p in per[0]},
                         "breakdown_of": found},
        "outputs_digest": first_digest,
    }


def rounds(args, step, pb, config: dict, store: dict):
    """The warm-up executions (the first one's answers digested), ``--executions`` timed as they are, then as many
    with the phases timed. Returns the plain ms, the instrumented ms, their phases' ms, what was wrapped, the digest."""
    fake = fake_backend()
    names, outputs = [t["name"] for t in config["input"]], args.outputs or [t["name"] for t in config["output"]]
    count = args.warmup + 2 * args.executions
    texts = queries(store, count * args.requests, args.seed, args.unknown_share)
    rng = np.random.default_rng(args.seed)
    replay = Replay(step.search.run)
    step.search.run = replay.record
    plain, timed, per, found, phases, first_digest = [], [], [], [], Phases(), ""
    for r in range(count):
        requests = make_requests(pb, names, texts[r * args.requests:(r + 1) * args.requests], store["size"],
                                 args.ids, args.top_k, outputs, rng)
        if r == args.warmup and args.graph == "replay":
            step.search.run = replay.replay
        if r == args.warmup + args.executions:  # the second half: phases timed
            found = instrument(step, pb, phases)
        before = dict(phases.totals)
        t0 = time.perf_counter()
        responses = step.execute(requests)
        elapsed = (time.perf_counter() - t0) * 1e3
        if r == 0:  # the real graph's answers
            first_digest = digest(fake, requests, responses)
        for request, returned in zip(requests, responses, strict=True):
            if fake.answer(request, returned).has_error():
                raise RuntimeError(fake.answer(request, returned).error().message())
        if args.warmup <= r < args.warmup + args.executions:
            plain.append(elapsed)
        elif r >= args.warmup + args.executions:
            timed.append(elapsed)
            spent = {p: (v - before.get(p, 0.0)) * 1e3 for p, v in phases.totals.items()}
            per.append({**{p: spent.get(p, 0.0) for p in PHASES}, "other": elapsed - sum(spent.values())})
    return plain, timed, per, found, first_digest


def checkout(code: str, dest: Path) -> tuple[Path, dict]:
    """The tree to measure: ``code`` itself where it is a folder, else this repository's files at revision ``code``
    (``git archive``: the step's and the text rules' files only); and what it is."""
    def git(*a: str, cwd: Path = ROOT) -> str:
        return subprocess.run(["git", "-C", str(cwd), *a], capture_output=True, text=True).stdout.strip()

    if Path(code).is_dir():
        tree = Path(code).resolve()
        return tree, {"tree": str(tree), "commit": git("rev-parse", "HEAD", cwd=tree),
                      "changed": git("status", "--porcelain", "--", *STEP_CODE, cwd=tree) != ""}
    dest.mkdir(parents=True)
    paths = [p for p in STEP_CODE if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{code}:{p}"],
                                                     capture_output=True).returncode == 0]
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", code, *paths], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest, {"revision": code, "commit": git("rev-parse", code)}


WHAT = ("The search step's execute in-process (tests/fake_pb_utils.py: Triton's own serialize_byte_tensor for BYTES), "
        "on batches of requests of one query each, every output asked for; after the warm-up the graph's outputs are "
        "replayed, so an execution costs the step's own Python. Per run: the median and fastest of the executions "
        "timed as they are, and the per-phase medians of as many executions timed with wrapped callables (which add "
        "their own cost). 'other' holds ablations of the step of 'after' and a run asking three outputs. Runs "
        "alternate before/after on one machine; each run records its load average.")


def add_to_report(path: Path, run: dict, argv: list[str]) -> dict:
    """``run`` added to the report at ``path`` (made if missing); its label's summary (each figure over that label's
    runs) updated: ``before`` and ``after`` at the top, other labels (ablations) under ``other``."""
    command = "python -m benchmarks.search_step " + " ".join(_without(argv, ("--code", "--label", "--ablate")))
    report = json.loads(path.read_text()) if path.is_file() else {
        "command": command + " --code REVISION --label before|after [--ablate PART]", "what": WHAT, "before": {},
        "after": {}, "runs": []}
    report["runs"].append(run)
    same = [r for r in report["runs"] if r["label"] == run["label"]]
    summary = {
        "runs": len(same), "code": sorted({r["code"]["commit"] for r in same}),
        "ablated": run["ablated"], "ms_per_execution_median": [r["ms_per_execution"]["median"] for r in same],
        "ms_per_execution_min": [r["ms_per_execution"]["min"] for r in same],
        "us_per_request": [r["us_per_request"] for r in same],
        "instrumented_breakdown_ms": {p: [r["instrumented"]["breakdown_ms"][p] for r in same]
                                      for p in run["instrumented"]["breakdown_ms"]},
        "outputs_digests": sorted({r["outputs_digest"] for r in same}),
    }
    if run["label"] in ("before", "after"):
        report[run["label"]] = summary
    else:
        report.setdefault("other", {})[run["label"]] = summary
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` less ``options`` and their values."""
    out, skipping = [], False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg in options
        if not skipping:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.search_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64, help="requests per execution (one query each)")
    parser.add_argument("--ids", type=int, default=100, help="store rows each request searches among")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--executions", type=int, default=20, help="timed executions (as many again with phases)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--graph", choices=("real", "replay"), default="replay",
                        help="after the warm-up, run the graph (real) or replay its outputs (replay)")
    parser.add_argument("--ort-threads", type=int, default=1, help="onnxruntime's intra-op threads for the graph")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outputs", nargs="+", help="the outputs each request asks for (default: every one, as the "
                                                     "ensemble asks)")
    parser.add_argument("--ablate", nargs="+", default=[], choices=sorted(ABLATIONS),
                        help="turn a part of the step off: " + "; ".join(f"{k}: {v}" for k, v in ABLATIONS.items()))
    parser.add_argument("--code", default=str(ROOT), help="the tree whose step is measured, or a git revision")
    parser.add_argument("--unknown-share", type=float, default=0.1,
                        help="share of queries with one made-up word (looked up while the step runs)")
    parser.add_argument("--source", type=Path, help="a published amc_search_step/<N> folder to measure over")
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/amc/checkpoint.pt"))
    parser.add_argument("--gallery-size", type=int, default=2000)
    parser.add_argument("--state", type=Path, default=Path(tempfile.gettempdir()) / "amc-search-step")
    parser.add_argument("--label", default="run")
    parser.add_argument("--out", type=Path, help="this run's JSON")
    parser.add_argument("--report", type=Path, help="a report to add this run to, under --label")
    args = parser.parse_args(argv)
    args.state.mkdir(parents=True, exist_ok=True)
    run = measure(args)
    argv = sys.argv[1:] if argv is None else argv
    run["command"] = "python -m benchmarks.search_step " + " ".join(argv)
    b = run["instrumented"]["breakdown_ms"]
    log(f"{args.requests} requests x {args.ids} ids, top {args.top_k}, graph {args.graph}: "
        f"{run['ms_per_execution']['median']:.2f} ms per execution (median of {args.executions}); instrumented "
        f"{run['instrumented']['ms_per_execution_median']:.2f} ms: " + ", ".join(f"{p} {v:.2f}" for p, v in b.items()))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(run, indent=2) + "\n")
    if args.report is not None:
        add_to_report(args.report, run, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
