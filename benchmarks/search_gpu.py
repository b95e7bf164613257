"""Issue 23 on one GPU machine start: ``amc_search`` (one Python step) served by tritonserver against the in-process
ceiling of the same graph, with an A/B of each lever of the step, in one process per phase.

    python -m benchmarks.search_gpu --out $OUT                       (bash benchmarks/gpu.sh runs it, every phase)
    python -m benchmarks.search_gpu --out $OUT --phases build ceiling   then   --phases served    (two device calls)
    python -m benchmarks.search_gpu --device cpu --out /tmp/dry --quick  (dry run on a CPU machine, small and short)
    python -m benchmarks.search_gpu --merge RUN_A.json [RUN_B.json]  (here, afterwards: reports/gpu.json and gpu.md)

Phases (state under ``--state``, so that phases of one machine start can run in separate commands):

- **build**: the checkpoint published into two repositories that serve only ``amc_search``, laid out as a publish
  lays it out (``benchmarks.search.add_search``): S, a store of the ``--gallery-size`` synthetic images (float32
  projections: what the 100- and 1,000-id searches and the A/B use), and L, that gallery repeated to
  ``--store-size`` rows with float16 projections (100,000 rows in float32 exceed ONNX's 2 GB limit): whole-store
  search. Candidate ids are drawn from the gallery's rows.
- **ceiling**: the same graph files in this process, onnxruntime's CUDA provider, through ``onnx_runner.BoundSession``
  (IOBinding; CUDA graphs where onnxruntime captures the graph) and through ``session.run`` with host arrays, T
  threads x B queries per call, features (tokens, words) computed beforehand by the step's own code: the graph's
  cost alone. The best point with p99 under the bound (50 ms; 100 ms for the whole store) is the ceiling. Also which
  nodes onnxruntime places off the GPU (its verbose log), the reason CUDA graphs are refused where they are.
- **served**: tritonserver with S and the default settings: parity of the served top 10 against the same graph on
  ORT-CPU (the CPU path), p99 at concurrency 1 through ``AMCClient.search``, perf_analyzer sweeps at 100 and 1,000
  ids and with 8 queries per request (``search_many``), Triton's step statistics and the GPU's utilization; then L:
  parity, c1 and a sweep over the whole store; then each A/B variant of the step's settings
  (``export.repository.SearchSettings``: IOBinding, CUDA graphs, one intra-op thread, instances, batch delay), one
  lever away from the default, by perf_analyzer at a fixed concurrency (in that order: a run cut short loses the
  A/B first).

Everything is written to ``--out``/gpu_search.json (and a summary .md) after each phase. Without perf_analyzer (the
CPU machine) the sweeps use tritonclient threads instead, which the CPU dry run exercises.

Why one module: it is the one entry point of the GPU serving question (``benchmarks/gpu.sh``, docs/benchmarks.md),
and its phases share the state under ``--state`` and one report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from amc_contract import signatures as sig

from . import harness, perf, triton
from .search import SEARCH_MODELS, add_search, gallery_store
from .search_report import SIZES, merge, summarize, summary_md
from .workloads import Request, collection_words, synthetic_gallery

TOP_K = 10


def log(msg: str) -> None:
    print(f"[search-gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gpu_memory_mib() -> dict:
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.used,memory.total", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0].split(", ")
        return {"name": q[0], "used_mib": float(q[1]), "total_mib": float(q[2])}
    except Exception as e:  # noqa: BLE001
        return {"error": str(e)}


# ---- workload ------------------------------------------------------------------------------------------------
def requests(queries: list[str], rows: int, n: int | None, count: int, seed: int) -> list[Request]:
    """``count`` searches: a query and ``n`` distinct store rows (None: the whole store, no ids sent)."""
    rng = np.random.default_rng(seed + (n or 0))
    empty = np.zeros((0,), dtype=np.float32)
    out = []
    for _ in range(count):
        ids = None if n is None else rng.choice(rows, size=n, replace=False).astype(np.int64)
        out.append(Request(queries[int(rng.integers(len(queries)))], ids, empty, empty.astype(bool),
                           np.zeros((0, 0), dtype=object)))
    return out


def perf_data(pool: list[Request], path: Path, top_k: int = TOP_K) -> Path:
    """perf_analyzer's --input-data for amc_search: query, top_k and (when the search has a filter) candidate_ids."""
    rows = []
    for r in pool:
        row = {sig.QUERY.name: {"content": [r.query], "shape": [1]}, sig.TOP_K.name: {"content": [top_k], "shape": [1]}}
        if r.ids is not None:
            row[sig.CANDIDATE_IDS.name] = perf._b64(r.ids)
        rows.append(row)
    path.write_text(json.dumps({"data": rows}))
    return path


def search_worker(url: str, pool: list[Request], batch: int = 1, model: str = sig.SEARCH_ENSEMBLE_NAME):
    """tritonclient threads' load (where perf_analyzer is missing): ``batch`` queries per request, one filter."""
    import tritonclient.grpc as grpcclient

    from amc_client._search import pack_search

    def make(w: int):
        client = grpcclient.InferenceServerClient(url)
        outputs = [grpcclient.InferRequestedOutput(n) for n in sig.SEARCH_ENSEMBLE.output_names]
        prepared = []
        for i in range(0, len(pool) - batch + 1, batch):
            group = pool[i:i + batch]
            arrays = pack_search([r.query for r in group], TOP_K, group[0].ids)
            inputs = []
            for name, array in arrays.items():
                spec = next(t for t in sig.SEARCH_ENSEMBLE.inputs if t.name == name)
                tensor = grpcclient.InferInput(name, list(array.shape), spec.triton_datatype)
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            prepared.append(inputs)

        def call(i: int):
            return client.infer(model, prepared[(i + w) % len(prepared)], outputs=outputs, client_timeout=120)
        return call
    return make


def load_points(url: str, pool: list[Request], n: int, concurrency: list[int], workdir: Path, args, *,
                batch: int = 1, tag: str = "") -> list[dict]:
    """One point per concurrency: perf_analyzer where it runs (GPU machine), else tritonclient threads."""
    if perf.available():
        data = perf_data(pool, workdir / f"search-{tag}-{n}.json")
        return perf.sweep(url, sig.SEARCH_ENSEMBLE_NAME, data, concurrency, n, workdir, log=log, batch=batch,
                          interval_ms=args.interval_ms)
    points = []
    for c in concurrency:
        before = triton.snapshot(url)
        point = harness.closed_loop(search_worker(url, pool, batch), concurrency=c, duration_s=args.duration_s,
                                    items_per_call=batch * n)
        point.update({"queries_per_request": batch, "queries_per_s": point["calls_per_s"] * batch,
                      "load": "tritonclient threads", "steps": triton.breakdown(before, triton.snapshot(url))})
        log(f"threads n{n} c{c} b{batch}: {point['candidates_per_s']:,.0f} cand/s, p99 {point.get('p99_ms', 0):.1f} ms")
        points.append(point)
    return points


# ---- the CPU path's reference and parity ---------------------------------------------------------------------
class CpuPath:
    """The same search graph on ORT-CPU with host arrays, fed by the step's own text code: the CPU serving path."""

    def __init__(self, step_dir: Path) -> None:
        import onnxruntime as ort

        from export.repository import SEARCH_GRAPH_FILE
        from serving.backends.text_features import TextFeatures

        self.features = TextFeatures(step_dir, encoder=False)
        self.session = ort.InferenceSession(str(step_dir / SEARCH_GRAPH_FILE), providers=["CPUExecutionProvider"])
        self.size = len(self.features.store_keywords)

    def feeds(self, queries: list[str], ids: np.ndarray | None, k: int) -> dict[str, np.ndarray]:
        texts = self.features.normalize(queries)
        tokens = self.features.query_tokens(texts, normalized=True)
        words, weights = self.features.query_words(texts, normalized=True)
        rows = np.broadcast_to(np.arange(self.size) if ids is None else ids, (len(queries), self.size if ids is None
                                                                             else len(ids)))
        return dict(zip(sig.SEARCH_STORE.input_names, (tokens, words, weights, np.ascontiguousarray(rows),
                                                      np.full((len(queries), 1), k, np.int64)), strict=True))

    def __call__(self, query: str, ids: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
        out = dict(zip(sig.SEARCH_STORE.output_names, self.session.run(None, self.feeds([query], ids, k)), strict=True))
        return out[sig.SCORES.name][0], out[sig.CANDIDATE_INDEX.name][0]


def parity(client, cpu: CpuPath, pool: list[Request]) -> dict:
    """Served top 10 against the CPU path's: the same rows in the same order, scores within 1e-4 relative."""
    worst, same = 0.0, True
    for r in pool:
        scores, rows = cpu(r.query, r.ids, TOP_K)
        got = client.search(r.query, top_k=TOP_K, ids=r.ids)
        served = np.array([x.score for x in got])
        worst = max(worst, float(np.abs(served - scores).max() / max(1e-12, np.abs(scores).max())))
        same &= [x.store_row for x in got] == rows.tolist()
    return {"requests": len(pool), "max_relative_error": worst, "same_ranking": bool(same),
            "holds": bool(same and worst < 1e-4)}


# ---- in-process ceiling ---------------------------------------------------------------------------------------
def session(path: Path | bytes, device: str, *, cuda_graph: bool, threads: int = 1):
    """A session of the graph file ``path`` (or a serialized model) as the ceiling runs it."""
    import onnxruntime as ort

    path = path if isinstance(path, bytes) else str(path)

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if device != "cuda":
        return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    cuda = {"device_id": 0, "use_tf32": "0", **({"enable_cuda_graph": "1"} if cuda_graph else {})}
    return ort.InferenceSession(path, sess_options=options,
                                providers=[("CUDAExecutionProvider", cuda), "CPUExecutionProvider"])


def placement(path: Path) -> dict:
    """Which nodes onnxruntime's CUDA provider leaves to the CPU (its verbose log, in a child process)."""
    code = ("import onnxruntime as o, sys; s = o.SessionOptions(); s.log_severity_level = 0; "
            f"o.InferenceSession({str(path)!r}, sess_options=s, providers=['CUDAExecutionProvider'])")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    lines = (proc.stdout + proc.stderr).splitlines()
    keep, on = [], False
    for line in lines:
        if "placed on" in line or "Node placements" in line:
            on = True
        elif on and not line.startswith((" ", "\t")) and "Node(s)" not in line:
            on = False
        if on or "placed on" in line or "not assigned to the preferred" in line or "memcpy" in line.lower():
            keep.append(line.strip()[-300:])
    return {"lines": keep[:120], "returncode": proc.returncode}


def ceiling_points(path: Path, device: str, cpu: CpuPath, queries: list[str], n: int | None, combos, args) -> list:
    """The graph alone: T threads x B queries per call, each way of running it; outputs copied to the host. The
    ``cuda_graph`` way runs the step's own fixed-shape copies (``serving.backends.search_graph.StaticGraphs``, one set
    per thread: a captured graph belongs to one session), since onnxruntime refuses to capture the dynamic graph."""
    from serving.backends import static_shapes
    from serving.backends.onnx_runner import BoundSession
    from serving.backends.search_graph import StaticGraphs

    rng = np.random.default_rng(1)
    size = cpu.size
    points = []
    shared = {}
    for way in ("host_arrays", "io_binding", "cuda_graph"):
        if way == "cuda_graph" and device != "cuda":
            continue
        for threads, batch in combos:
            point = {"way": way, "threads": threads, "batch": batch, "n": n or size}
            try:
                if way == "cuda_graph":  # a captured graph belongs to one session: one set of copies per thread
                    if path.stat().st_size > 2**30:  # as the step: no copies of a graph over 1 GB (max_static_graph_mb)
                        raise ValueError(f"{path.name} is over 1 GB: no fixed-shape copies, as in the step")
                    sessions = [StaticGraphs(path, sig.SEARCH_STORE.input_names,
                                             lambda model: session(model, device, cuda_graph=True),
                                             lambda s: BoundSession(s, device=device, cuda_graph=True, max_graphs=1),
                                             static_shapes, limit=8) for _ in range(threads)]
                else:
                    if "plain" not in shared:  # one session for both ways (an IOBinding is the caller's, per thread)
                        shared["plain"] = session(path, device, cuda_graph=False)
                    sessions = [shared["plain"]] * threads
                groups = []
                for _ in range(4):
                    picked = [queries[int(i)] for i in rng.integers(len(queries), size=batch)]
                    ids = None if n is None else rng.choice(size, size=n, replace=False).astype(np.int64)
                    groups.append(cpu.feeds(picked, ids, TOP_K))

                def make(w: int, sessions=sessions, groups=groups, way=way):
                    s = sessions[w]
                    if way == "host_arrays":
                        return lambda j: s.run(None, groups[j % len(groups)])
                    if way == "cuda_graph":
                        def captured(j: int) -> dict:
                            out = s.run(groups[j % len(groups)])
                            if out is None:
                                raise RuntimeError(f"fixed-shape copy failed: {s.error or 'over its limit'}")
                            return out
                        return captured
                    bound = BoundSession(s, device=device, host_inputs=(sig.SEARCH_K.name,),
                                         cuda_graph=way == "cuda_graph")
                    return lambda j: bound.run(groups[j % len(groups)])

                point.update(harness.closed_loop(make, concurrency=threads, duration_s=args.duration_s,
                                                 items_per_call=batch * (n or size), warmup_calls=3))
                log(f"ceiling {way} n{n or size} T{threads} B{batch}: {point['candidates_per_s']:,.0f} cand/s, "
                    f"p99 {point.get('p99_ms', 0):.1f} ms")
            except Exception as e:  # noqa: BLE001 - e.g. onnxruntime refusing CUDA graphs: recorded, the sweep goes on
                point["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                log(f"ceiling {way} n{n or size} T{threads} B{batch}: {point['error']}")
                points.append(point)
                break
            points.append(point)
    return points


# ---- served ---------------------------------------------------------------------------------------------------
class GpuBusy:
    """nvidia-smi's GPU utilization sampled every 100 ms while a measurement runs (mean and samples)."""

    def __enter__(self):
        self.samples: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout.strip()
                self.samples.append(float(out.splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return
            self.stop.wait(0.1)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def summary(self) -> dict:
        return {"gpu_util_mean_pct": float(np.mean(self.samples)) if self.samples else None,
                "samples": len(self.samples)}


def serve(repo: Path, settings, workdir: Path, tag: str):
    from export.repository import search_step_config, to_text, write_atomic
    from serving.server import TritonServer

    write_atomic(repo / sig.SEARCH_STEP.model_name / "config.pbtxt", to_text(search_step_config(settings)))
    return TritonServer(repo, models=SEARCH_MODELS, log_file=workdir / f"tritonserver-{tag}.log")


def step_log(workdir: Path, tag: str) -> list[str]:
    """The search step's own start-up lines (how its graph runs: provider, IOBinding, CUDA graphs or why not)."""
    path = workdir / f"tritonserver-{tag}.log"
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return [line.split("] ", 1)[-1][:600] for line in lines if "search graph on" in line][:4]


def c1(client, pool: list[Request], count: int) -> dict:
    for r in pool[:5]:
        client.search(r.query, top_k=TOP_K, ids=r.ids)
    latencies = []
    for i in range(count):
        r = pool[i % len(pool)]
        t0 = time.perf_counter()
        client.search(r.query, top_k=TOP_K, ids=r.ids)
        latencies.append(time.perf_counter() - t0)
    ms = np.array(latencies) * 1e3
    return {"requests": count, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def variants(args) -> dict:
    """The A/B variants of the step's settings, each one lever away from the base (the kind's defaults)."""
    from export.repository import SEARCH_SETTINGS

    base = SEARCH_SETTINGS["gpu" if args.device == "cuda" else "cpu"]
    r = dataclasses.replace
    # The thread lever flips whichever the base has: since the base took onnxruntime's own pool (None), a variant
    # "ort_threads" of None was the base again under another name, so the A/B compares one thread against it.
    threads = {"ort_threads": r(base, intra_op_threads=None)} if base.intra_op_threads is not None else \
        {"one_thread": r(base, intra_op_threads=1)}
    out = {"base": base, "host_arrays": r(base, io_binding=False, cuda_graph=False),
           "no_graph": r(base, cuda_graph=False), **threads, "delay_0": r(base, batch_delay_us=0)}
    for count in args.instances:
        if count != base.instances:
            out[f"instances_{count}"] = r(base, instances=count)
    return out


def headline(small: Path, large: Path, build: dict, base, pools: dict, ab: dict, ab_c: dict, head: dict,
             workdir: Path, args, results: dict) -> None:
    """The default settings on S (parity, c1, sweeps, several queries per request), then on L (the whole store)."""
    from amc_client import AMCClient

    queries = build["queries"]
    cpu = CpuPath(small / sig.SEARCH_STEP.model_name / str(build["version"]))
    with serve(small, base, workdir, "base") as server, AMCClient(server.grpc_url, timeout_s=120) as client:
        triton.wait_models(server.grpc_url, SEARCH_MODELS, timeout_s=300)
        head["step"] = step_log(workdir, "base")
        head["parity"] = {key: parity(client, cpu, pools[key][:6]) for key in SIZES}
        log(f"parity against the CPU path: {head['parity']}")
        for key, n in SIZES.items():
            head[f"{key}_c1"] = c1(client, pools[key], args.c1_requests)
            log(f"{key} c1: {head[key + '_c1']}")
            ab[f"base_{key}"] = load_points(server.grpc_url, pools[key], n, [ab_c[key]], workdir, args, tag="base")[0]
            with GpuBusy() as busy:
                head[f"{key}_sweep"] = load_points(server.grpc_url, pools[key], n, args.concurrency[key], workdir, args,
                                                   tag="base")
            head[f"{key}_gpu"] = busy.summary()
            write(results, args)
        # Several queries per request (search_many): as many queries in flight as the single-query A/B point.
        batch = args.many_batch
        head["n100_many"] = load_points(server.grpc_url, pools["n100"], 100, [max(1, ab_c["n100"] // batch)], workdir,
                                        args, batch=batch, tag="many")[0]
    write(results, args)
    cpu = CpuPath(large / sig.SEARCH_STEP.model_name / str(build["version"]))
    whole = requests(queries, cpu.size, None, 32, seed=5)
    with serve(large, base, workdir, "whole") as server, AMCClient(server.grpc_url, timeout_s=120) as client:
        triton.wait_models(server.grpc_url, SEARCH_MODELS, timeout_s=600)
        head["whole_step"] = step_log(workdir, "whole")
        head["whole_parity"] = parity(client, cpu, whole[:2])
        head["whole_c1"] = c1(client, whole, args.c1_requests)
        log(f"whole store c1: {head['whole_c1']}")
        with GpuBusy() as busy:
            head["whole_sweep"] = load_points(server.grpc_url, whole, cpu.size, args.concurrency["whole"], workdir,
                                              args, tag="whole")
        head["whole_gpu"] = busy.summary()
    write(results, args)


def measure_served(state: Path, args, results: dict) -> None:

    build = json.loads((state / "build.json").read_text())
    queries = build["queries"]
    small, large = Path(build["small"]), Path(build["large"])
    workdir = state / "served"
    workdir.mkdir(exist_ok=True)
    pools = {key: requests(queries, build["gallery_size"], n, 64, seed=3) for key, n in SIZES.items()}
    served: dict = results.setdefault("served", {})
    ab: dict = served.setdefault("variants", {})
    settings = variants(args)
    ab_c = {"n100": args.ab_concurrency[0], "n1000": args.ab_concurrency[1]}
    # The headline first (the default settings), then the whole store, then the A/B: what a cut-off run loses last.
    base = settings["base"]
    head: dict = served.setdefault("base", {"settings": dataclasses.asdict(base)})
    try:
        headline(small, large, build, base, pools, ab, ab_c, head, workdir, args, results)
    except Exception as e:  # noqa: BLE001 - recorded; the A/B still runs
        head["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        log(f"headline: {head['error']}")
    write(results, args)
    for tag, s in settings.items():
        if tag == "base" or args.headline_only:
            continue
        try:
            with serve(small, s, workdir, tag) as server:
                triton.wait_models(server.grpc_url, SEARCH_MODELS, timeout_s=300)
                ab[tag] = {"settings": dataclasses.asdict(s), "step": step_log(workdir, tag)}
                for key, n in SIZES.items():
                    ab[tag][key] = load_points(server.grpc_url, pools[key], n, [ab_c[key]], workdir, args, tag=tag)[0]
        except Exception as e:  # noqa: BLE001
            ab[tag] = {"settings": dataclasses.asdict(s), "error": f"{type(e).__name__}: {str(e)[:400]}"}
            log(f"variant {tag}: {ab[tag]['error']}")
        write(results, args)


# ---- phases ---------------------------------------------------------------------------------------------------
def phase_build(state: Path, args, results: dict) -> None:
    from amc_model.checkpoint import load_checkpoint
    from export.publish import publish

    gallery = synthetic_gallery(collection_words(args.checkpoint), size=args.gallery_size)
    ckpt = load_checkpoint(args.checkpoint)
    small, large = state / "small", state / "large"
    t0 = time.perf_counter()
    keywords = sorted({k for kws in gallery.keywords for k in kws if k})
    version = publish(args.checkpoint, small, flavour="python", keywords=keywords, log=log)
    text_dir = small / sig.TOKENIZER.model_name / str(version)
    add_search(small, version, ckpt, gallery_store(ckpt, gallery, text_dir, 0, "float32"), text_dir)
    add_search(large, version, ckpt, gallery_store(ckpt, gallery, text_dir, args.store_size, "float16"), text_dir)
    (state / "build.json").write_text(json.dumps({
        "version": version, "small": str(small), "large": str(large), "gallery_size": len(gallery),
        "store_size": max(args.store_size, len(gallery)), "queries": gallery.queries}))
    results["build"] = {"seconds": round(time.perf_counter() - t0, 1), "gallery_size": len(gallery),
                        "store_size": max(args.store_size, len(gallery)), "checkpoint": str(args.checkpoint)}
    log(f"built in {results['build']['seconds']} s")


def phase_ceiling(state: Path, args, results: dict) -> None:
    from export.repository import SEARCH_GRAPH_FILE

    build = json.loads((state / "build.json").read_text())
    out: dict = results.setdefault("ceiling", {})
    for key, repo, n, combos in (("n100", build["small"], 100, args.ceiling_combos["n100"]),
                                 ("n1000", build["small"], 1000, args.ceiling_combos["n1000"]),
                                 ("whole", build["large"], None, args.ceiling_combos["whole"])):
        step_dir = Path(repo) / sig.SEARCH_STEP.model_name / str(build["version"])
        cpu = CpuPath(step_dir)
        if args.device == "cuda" and "placement" not in out:
            out["placement"] = placement(step_dir / SEARCH_GRAPH_FILE)
            log("placement: " + " | ".join(out["placement"].get("lines", [])[:6]))
        out[key] = ceiling_points(step_dir / SEARCH_GRAPH_FILE, args.device, cpu, build["queries"], n, combos, args)
        write(results, args)


def write(results: dict, args) -> None:
    results["elapsed_s"] = round(time.monotonic() - START, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_search.json").write_text(triton.dump(results))
    (args.out / "gpu_search.md").write_text(summary_md(summarize(results)))


START = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.search_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/amc/checkpoint.pt"))
    parser.add_argument("--out", type=Path, default=Path("reports/search_gpu"))
    parser.add_argument("--state", type=Path, default=Path(tempfile.gettempdir()) / "amc-search-gpu")
    parser.add_argument("--phases", nargs="+", default=["build", "ceiling", "served"],
                        choices=["build", "ceiling", "served"])
    parser.add_argument("--gallery-size", type=int, default=2000)
    parser.add_argument("--store-size", type=int, default=100_000)
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 4], help="instance counts of the A/B")
    parser.add_argument("--duration-s", type=float, default=2.0, help="each in-process / thread-load point")
    parser.add_argument("--interval-ms", type=int, default=1000, help="perf_analyzer's measurement interval")
    parser.add_argument("--c1-requests", type=int, default=200)
    parser.add_argument("--many-batch", type=int, default=8, help="queries per request of the search_many point")
    parser.add_argument("--ab-concurrency", type=int, nargs=2, default=[64, 16], metavar=("N100", "N1000"))
    parser.add_argument("--headline-only", action="store_true", help="served: the default settings only, no A/B "
                                                                      "(a second run of the headline)")
    parser.add_argument("--quick", action="store_true", help="a CPU dry run: small store, short and few points")
    parser.add_argument("--merge", type=Path, nargs="+", help="gpu_search.json of runs -> reports/gpu.json, gpu.md")
    parser.add_argument("--reports", type=Path, default=Path("reports"), help="--merge: where gpu.json and gpu.md are")
    parser.add_argument("--readme", type=Path, default=None, help="--merge: the README to regenerate (default the "
                                                                   "project's)")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.reports, args.readme)
    # Sized for the device tool's 10-minute calls (build + ceiling in one, served in another).
    args.concurrency = {"n100": [16, 64, 128, 256], "n1000": [8, 16, 32, 64], "whole": [1, 2, 4]}
    args.ceiling_combos = {"n100": [(1, 64), (2, 64), (4, 64)], "n1000": [(1, 32), (2, 32), (4, 16)],
                           "whole": [(1, 1), (2, 1)]}
    if args.quick:
        args.store_size, args.gallery_size, args.c1_requests, args.duration_s = 3000, 1200, 20, 1.0
        args.concurrency = {"n100": [2, 4], "n1000": [2], "whole": [1]}
        args.ceiling_combos = {"n100": [(1, 4)], "n1000": [(1, 2)], "whole": [(1, 1)]}
        args.instances, args.ab_concurrency, args.many_batch = [2], [4, 2], 2
    args.state.mkdir(parents=True, exist_ok=True)
    path = args.state / "results.json"
    results = json.loads(path.read_text()) if path.exists() and "build" not in args.phases else {}
    if args.headline_only:  # a run of its own, on the state (the build, the ceiling) of the same machine start
        results = {k: v for k, v in results.items() if k in ("build", "ceiling")}
        path = args.state / "results-headline.json"
    results.setdefault("date", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    results.setdefault("machine", f"{platform.node()} ({os.environ.get('MACHINE_NOTE', 'one machine start')})")
    results["gpu"] = gpu_memory_mib().get("name") if args.device == "cuda" else None
    results.setdefault("command", []).append("python -m benchmarks.search_gpu " + " ".join(argv or sys.argv[1:]))
    try:
        import onnxruntime

        results["onnxruntime"] = onnxruntime.__version__
        for phase in args.phases:
            log(f"phase {phase}")
            {"build": phase_build, "ceiling": phase_ceiling, "served": measure_served}[phase](args.state, args, results)
            path.write_text(triton.dump(results))
            write(results, args)
    finally:
        path.write_text(triton.dump(results))
        write(results, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
