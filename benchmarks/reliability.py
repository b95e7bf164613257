"""Reliability benchmark (issue 9): bad inputs, a killed stub, a killed server, overload, a soak, TLS.

    python -m benchmarks.reliability [--soak-minutes 10] [--overload-seconds 60] [--out reports/reliability.json]

Serves an untrained AMC (``serving.faults.publish_untrained``: error handling, overload and recovery do not
depend on the weights) from a real tritonserver on the CPU, with the supervisor of ``amc-serve``, and writes
``reports/reliability.json`` in the shape issue 9 asks for; what stands behind each figure goes to
``reports/reliability_details.json``:

- ``bad_inputs``: every malformed request of ``serving.faults.bad_requests()`` sent raw (no client checks):
  how many came back INVALID_ARGUMENT, INTERNAL, and how often the server died (``crashes``).
- ``stub_kill``: ``kill -9`` of the text step's stub under 4 client threads without retries: seconds from the
  kill until requests succeed again for good, and seconds the supervisor's ``/ready`` said ready while a
  request sent then failed.
- ``server_kill``: ``kill -9`` of tritonserver under the same load: seconds until the clients are served again
  (the supervisor restarts it on the same ports).
- ``overload``: 64 closed-loop client threads for ``--overload-seconds``, 20 candidates a request, each thread
  waiting after a rejection as AMCClient's backoff would (``--overload-backoff-s 0``: resending at once, a flood):
  answered, rejected (UNAVAILABLE: the text step's in-flight limit ``signatures.MAX_IN_FLIGHT``, or its full
  queue), p99 of the answered and of the rejected ones (as the clients saw them), RSS growth of server and stubs
  over the run; the details add Triton's statistics of every step over the run (where requests waited). With
  ``--server-cpus``/``--client-cpus``/``--client-processes`` the load generator runs apart from the server
  (``benchmarks/overload_device.sh``: a 2-CPU server on a 16-CPU machine).
- ``soak``: 4 client threads for ``--soak-minutes``; the slope of the server's and stubs' RSS (least squares).
- ``tls``: a mutual-TLS server (certificates from the openssl CLI): a client with a certificate is served, a
  plaintext one is refused.

Why one module: it is the one entry point of the reliability question (``make reliability-report``,
docs/benchmarks.md), and its scenarios share one served version, its supervisor and one report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from amc_client import AMCClient, Candidate, ServerUnavailableError
from amc_client._calls import DEFAULT_BACKOFF_S
from amc_contract import signatures as sig
from serving import faults
from serving.server import TritonServer

from . import triton

ROOT = Path(__file__).resolve().parent.parent


def under_load(server: TritonServer, fault: Callable[[], object], *, candidates: list[Candidate], threads: int = 4,
               settle_s: float = 60.0) -> dict:
    """Run ``threads`` AMCClients (no retries) and a readiness poller, call ``fault()``, and measure until
    requests have succeeded again for 2 s. Returns the timeline's figures."""
    import threading
    import time
    import urllib.error
    import urllib.request

    from amc_client import AMCError
    from serving.supervisor import HealthServer, Supervisor

    supervisor = Supervisor(server, interval_s=1.0).start()
    health = HealthServer(supervisor).start()
    events: list[tuple[float, str]] = []  # (time, "ok" | error class name)
    messages: list[tuple[float, str]] = []
    failed_starts: list[float] = []  # when each failed request was sent
    ready: list[tuple[float, bool]] = []
    stop = threading.Event()

    def client_loop() -> None:
        with AMCClient(server.grpc_url, timeout_s=30, retries=0) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    client.rank("cat face", candidates)
                    events.append((time.monotonic(), "ok"))
                except AMCError as e:
                    events.append((time.monotonic(), type(e).__name__))
                    messages.append((time.monotonic(), str(e)[-90:]))
                    failed_starts.append(started)
                    time.sleep(0.05)

    def ready_loop() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"{health.url}/ready", timeout=5) as r:
                    ready.append((time.monotonic(), r.status == 200))
            except urllib.error.HTTPError:
                ready.append((time.monotonic(), False))
            time.sleep(0.1)

    try:
        end = time.monotonic() + 120
        while not supervisor.ready:
            assert time.monotonic() < end, supervisor.reason
            time.sleep(0.2)
        workers = [threading.Thread(target=client_loop) for _ in range(threads)] + [threading.Thread(target=ready_loop)]
        for w in workers:
            w.start()
        time.sleep(2)
        faulted = time.monotonic()
        fault()
        end = faulted + settle_s
        while time.monotonic() < end:
            time.sleep(0.5)
            failures = [t for t, what in events if t > faulted and what != "ok"]
            last = failures[-1] if failures else faulted
            if supervisor.ready and any(t > last + 2 for t, what in events if what == "ok"):
                break
        stop.set()
        for w in workers:
            w.join(timeout=60)
    finally:
        stop.set()
        supervisor.stop()
        health.stop()
    failures = [t for t, what in events if t > faulted and what != "ok"]
    last_failure = failures[-1] if failures else faulted
    back = min((t for t, what in events if what == "ok" and t > last_failure), default=None)
    # Readiness said "send traffic here" while a request sent then would still fail: the samples (every 0.1 s)
    # that were ready between the fault and the sending of the last request that failed.
    last_sent = max((t for t in failed_starts if t >= faulted - 1), default=faulted)
    ready_while_broken = sum(0.1 for t, ok in ready if ok and faulted <= t <= last_sent)
    return {"recovered_s": None if back is None else back - faulted, "failures": len(failures),
            "errors": {what for t, what in events if t > faulted and what != "ok"},
            "ready_while_broken_s": ready_while_broken, "repairs": list(supervisor.repairs),
            "ready_after": supervisor.ready,
            "timeline": [(round(t - faulted, 2), m) for t, m in messages if t > faulted][-6:]
            + [(round(t - faulted, 2), ok) for t, ok in ready if t > faulted][::10]}


def _candidates(n: int, keywords: tuple[str, ...] = ("cat", "face")) -> list[Candidate]:
    rng = np.random.default_rng(0)
    return [Candidate(f"c{i}", np.abs(rng.normal(size=(sig.REGIONS_PER_IMAGE, sig.REGION_FEATURE_DIM)))
                      .astype(np.float32), list(keywords[: i % len(keywords) + 1])) for i in range(n)]


def bad_inputs(server: TritonServer) -> dict:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    counts = {"tried": 0, "invalid_argument": 0, "internal": 0, "crashes": 0}
    details = {}
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        for name, (arrays, _) in faults.bad_requests().items():
            inputs = faults.raw_inputs(arrays)
            counts["tried"] += 1
            try:
                client.infer(sig.ENSEMBLE_NAME, inputs, client_timeout=120)
                status = "OK"
            except InferenceServerException as e:
                status = str(e.status()).removeprefix("StatusCode.")
            counts["invalid_argument"] += status == "INVALID_ARGUMENT"
            counts["internal"] += status == "INTERNAL"
            if server.poll() is not None:
                counts["crashes"] += 1
                server.restart()
            details[name] = status
    return {**counts, "_details": details}


def _rss_series(server: TritonServer, stop: threading.Event, every_s: float, out: list[tuple[float, float]]) -> None:
    while not stop.wait(every_s):
        if server.pid is not None:
            out.append((time.monotonic(), faults.server_rss_mb(server.pid)))


def closed_loop(server: TritonServer, *, threads: int, seconds: float, candidates: int, rss_every_s: float = 5.0,
                backoff_s: float = 0.0, processes: int = 1, client_cpus: set[int] | None = None) -> dict:
    """``threads`` AMCClients without retries, each sending the next request (``candidates`` candidates) when the
    last is answered; after a rejection (ServerUnavailableError) a thread first waits as the client would between
    two attempts (``amc_client._calls.backoff``: ``backoff_s`` doubled per rejection in a row, at most 2 s, with
    jitter) when ``backoff_s`` > 0, else sends again at once.

    ``processes`` > 1 spreads the threads over that many client processes: one Python process packing 5 MB
    requests for 64 threads is GIL-bound, so it would measure its own queueing, not the server's. They all
    measure the same window (from a common start, after their imports). ``client_cpus``: where the clients run."""
    if processes < 1 or threads < processes:
        raise ValueError(f"need 1 <= processes <= threads, got {processes} processes for {threads} threads")
    start_at = time.time() + (10.0 if processes > 1 else 0.0)  # spawned processes import numpy and grpc first
    window = (start_at, start_at + seconds)
    shares = [threads // processes + (i < threads % processes) for i in range(processes)]
    stop = threading.Event()
    rss: list[tuple[float, float]] = []
    sampler = threading.Thread(target=_rss_series, args=(server, stop, rss_every_s, rss))
    try:
        if processes == 1:
            results: list[dict] = []
            # a thread of its own, so that pinning it to the clients' CPUs leaves this thread where it was
            runner = threading.Thread(target=lambda: results.append(
                _client_threads(server.grpc_url, threads, window, candidates, backoff_s, client_cpus)))
            rss.append((time.monotonic(), faults.server_rss_mb(server.pid)))
            sampler.start()
            runner.start()
            runner.join()
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: the benchmark process has threads (the RSS sampler); fork would copy their locks.
            with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_client_threads, server.grpc_url, share, window, candidates, backoff_s,
                                       client_cpus) for share in shares]
                time.sleep(max(0.0, start_at - time.time()))
                rss.append((time.monotonic(), faults.server_rss_mb(server.pid)))
                sampler.start()
                results = [f.result() for f in futures]
    finally:
        stop.set()
        if sampler.is_alive():
            sampler.join(timeout=60)
    rss.append((time.monotonic(), faults.server_rss_mb(server.pid)))
    lat = np.array([x for r in results for x in r["ok"]]) * 1e3
    rej = np.array([x for r in results for x in r["rejected"]]) * 1e3
    other = [x for r in results for x in r["other"]]
    return {"ok": len(lat), "rejected": len(rej), "other_errors": other[:5], "other_count": len(other),
            "client_processes": processes,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else 0.0,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else 0.0,
            "rejected_p50_ms": float(np.percentile(rej, 50)) if len(rej) else 0.0,
            "rejected_p99_ms": float(np.percentile(rej, 99)) if len(rej) else 0.0,
            "client_phases_ms": {kind: _phase_percentiles([p for r in results for p in r["phases"][kind]])
                                 for kind in ("ok", "rejected")} | {"percentiles": [50, 90, 99]},
            "rss_mb": rss}


class _PhaseTimedClient(AMCClient):
    """An AMCClient that notes, per request, when its gRPC calls were started and answered, so that a latency
    splits into the client's own work and the wire + server: ``routing`` (reading the ensemble's routing config
    when a request must wait for it: the first, or one that found it older than ``routing_refresh_s``; reads in
    the background are no request's time), ``pack`` (validation, padding, tensors: the rest of
    the time before the inference call), ``serialize`` (tritonclient building and serializing the 5 MB message,
    in this thread), ``wire_server`` (sent until gRPC's callback: transport, the server, deserializing the
    answer), ``wake`` (callback until this thread runs again) and ``unpack`` (results). Marks are per client:
    each overload thread has its own. Under GIL contention the answer can arrive before ``async_infer`` returns;
    the wire time is then counted in ``serialize``."""

    class _Calls:
        def __init__(self, inner: object, marks: dict[str, float], owner: int) -> None:
            self._inner, self._marks, self._owner = inner, marks, owner

        def __getattr__(self, name: str) -> object:
            call = getattr(self._inner, name)
            if name != "get_model_config" or threading.get_ident() != self._owner:
                return call  # a refresh in the background is no request's time

            def timed(*args: object, **kwargs: object) -> object:
                started = time.perf_counter()
                try:
                    return call(*args, **kwargs)
                finally:
                    self._marks["routing"] = self._marks.get("routing", 0.0) + time.perf_counter() - started

            return timed

        def async_infer(self, callback: Callable, **kwargs: object) -> object:
            def answered(result: object, error: object) -> None:
                self._marks["answered"] = time.perf_counter()
                callback(result, error)

            started = self._inner.async_infer(callback=answered, **kwargs)
            self._marks.setdefault("sent", time.perf_counter())  # the answer may already be in
            return started

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.marks: dict[str, float] = {}
        self._owner = threading.get_ident()  # the overload thread that sends this client's requests

    def _client_of(self, replica: object) -> object:
        return self._Calls(super()._client_of(replica), self.marks, self._owner)

    def _infer(self, inner: object, remaining: float, **kwargs: object) -> object:
        for mark in ("sent", "answered"):  # a second inference in one request (a canary re-read): its own marks
            self.marks.pop(mark, None)
        self.marks["infer"] = time.perf_counter()
        try:
            return super()._infer(inner, remaining, **kwargs)
        finally:
            self.marks["returned"] = time.perf_counter()

    def phases_ms(self, started: float, ended: float) -> dict[str, float] | None:
        m = self.marks
        if not all(k in m for k in ("infer", "sent", "answered", "returned")):
            return None
        sent = min(m["sent"], m["answered"])
        edges = (started, m["infer"], sent, m["answered"], m["returned"], ended)
        phases = {name: (b - a) * 1e3 for name, a, b in zip(CLIENT_PHASES[1:], edges[:-1], edges[1:], strict=True)}
        routing = m.get("routing", 0.0) * 1e3
        return {"routing": routing} | phases | {"pack": phases["pack"] - routing}


CLIENT_PHASES = ("routing", "pack", "serialize", "wire_server", "wake", "unpack")


def _phase_percentiles(rows: list[dict[str, float]]) -> dict[str, list[float]]:
    """Per client phase, p50/p90/p99 in ms over ``rows`` (one dict of phase -> ms per request)."""
    if not rows:
        return {}
    return {name: [round(float(np.percentile([r[name] for r in rows], q)), 1) for q in (50, 90, 99)]
            for name in CLIENT_PHASES}


def _client_threads(url: str, threads: int, window: tuple[float, float], candidates: int, backoff_s: float,
                    cpus: set[int] | None = None) -> dict:
    """One client process's share of :func:`closed_loop`: the latencies (s) of the answered and the rejected
    requests sent within ``window`` (wall-clock start and end, ``time.time()``)."""
    import random

    from amc_client._calls import backoff

    if cpus:
        os.sched_setaffinity(0, cpus)  # this thread; the loop threads it starts inherit it
    request = _candidates(candidates)
    ok: list[float] = []
    rejected: list[float] = []
    phases: dict[str, list[dict[str, float]]] = {"ok": [], "rejected": []}
    other: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        rng, in_a_row = random.Random(), 0
        with _PhaseTimedClient(url, timeout_s=120, retries=0) as client:
            while not stop.is_set():
                client.marks.clear()
                started = time.perf_counter()
                try:
                    client.rank("cat face", request)
                    ended = time.perf_counter()
                    ok.append(ended - started)
                    phases["ok"].append(client.phases_ms(started, ended))
                    in_a_row = 0
                except ServerUnavailableError:
                    ended = time.perf_counter()
                    rejected.append(ended - started)
                    phases["rejected"].append(client.phases_ms(started, ended))
                    if backoff_s > 0:
                        stop.wait(backoff(backoff_s, in_a_row, rng))
                        in_a_row += 1
                except Exception as e:  # noqa: BLE001 - counted
                    other.append(f"{type(e).__name__}: {str(e)[:120]}")

    time.sleep(max(0.0, window[0] - time.time()))
    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    time.sleep(max(0.0, window[1] - time.time()))
    stop.set()
    for w in workers:
        w.join(timeout=300)
    return {"ok": ok, "rejected": rejected, "other": other,
            "phases": {k: [p for p in v if p is not None] for k, v in phases.items()}}


def step_statistics(server: TritonServer) -> dict[str, dict[str, int]]:
    """Triton's cumulative statistics of every loaded model: requests answered and failed, and their ns."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        answer = client.get_inference_statistics(as_json=True)
    out = {}
    for model in answer.get("model_stats", []):
        stats = model.get("inference_stats", {})
        out[model["name"]] = {f"{key}_{what}": int(stats.get(key, {}).get(what, 0) or 0)
                              for key in ("success", "fail", "queue", "compute_infer") for what in ("count", "ns")}
        out[model["name"]]["executions"] = int(model.get("execution_count", 0) or 0)
    return out


def statistics_between(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per model, over the interval: requests ok and failed, executions, mean ms per request in the queue and
    computing (successes), and mean ms from arrival to failure (failures: e.g. the text step's rejections)."""
    out = {}
    for name, b in after.items():
        a = before.get(name, {})
        d = {k: v - a.get(k, 0) for k, v in b.items()}
        if not d["success_count"] and not d["fail_count"]:
            continue
        ok = max(d["success_count"], 1)
        out[name] = {"ok": d["success_count"], "failed": d["fail_count"], "executions": d["executions"],
                     "queue_ms": round(d["queue_ns"] / ok / 1e6, 1),
                     "compute_ms": round(d["compute_infer_ns"] / ok / 1e6, 1),
                     "failed_ms": round(d["fail_ns"] / max(d["fail_count"], 1) / 1e6, 1)}
    return out


def _slope_mb_per_min(rss: list[tuple[float, float]]) -> float:
    t = np.array([x for x, _ in rss])
    y = np.array([v for _, v in rss])
    return float(np.polyfit((t - t[0]) / 60, y, 1)[0]) if len(rss) >= 2 else 0.0


def tls_check(repository: Path, models: list[str], folder: Path) -> dict:
    from serving.endpoints import TLSFiles

    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=amc bench CA")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (folder / f"{name}.ext").write_text(ext + "\n")
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=amc {name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext")
    tls = TLSFiles(folder / "server.crt", folder / "server.key", folder / "ca.crt")
    with TritonServer(repository, models=models, tls=tls) as server:
        with AMCClient(server.grpc_url, timeout_s=60, ssl=True, root_certificates=str(folder / "ca.crt"),
                       private_key=str(folder / "client.key"), certificate_chain=str(folder / "client.crt")) as c:
            ok = len(c.rank("cat", _candidates(3))) == 3
        with AMCClient(server.grpc_url, timeout_s=5, retries=0) as plain:
            try:
                plain.rank("cat", _candidates(3))
                refused = False
            except ServerUnavailableError:
                refused = True
    return {"ok": ok, "plaintext_refused": refused}


SECTIONS = ("bad_inputs", "stub_kill", "server_kill", "overload", "soak", "tls")  # the report's keys, in issue 9's order


def _cpus(text: str) -> set[int]:
    """``"0,1"`` / ``"2-15"`` / ``"0,4-7"`` -> the CPU numbers."""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _positive(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return int(text)


def _machine() -> str:
    import platform

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} CPUs ({model}); tritonserver 2.51 (nvidia-pytriton wheel), python flavour, on the CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak-minutes", type=float, default=10)
    parser.add_argument("--overload-seconds", type=float, default=60)
    parser.add_argument("--overload-backoff-s", type=float, default=DEFAULT_BACKOFF_S,
                        help="after a rejection an overload thread waits as AMCClient's backoff would, from this "
                             "first wait (default: the client's own, %(default)s s); 0: sends again at once, a "
                             "flood no shipped client sends")
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help=f"override the text step's in-flight limit (default: as published, "
                             f"signatures.MAX_IN_FLIGHT = {sig.MAX_IN_FLIGHT})")
    parser.add_argument("--client-processes", type=_positive, default=1,
                        help="spread the overload's 64 client threads over this many processes (1: one process, "
                             "which on few cores measures its own GIL as much as the server)")
    parser.add_argument("--server-cpus", type=_cpus, default=None, metavar="LIST",
                        help="pin tritonserver and its stubs to these CPUs (e.g. 0,1): a server of that size")
    parser.add_argument("--client-cpus", type=_cpus, default=None, metavar="LIST",
                        help="run the overload and soak clients on these CPUs (e.g. 2-15; with --server-cpus, "
                             "default: the CPUs this process had), apart from the server's, as clients on other "
                             "machines would be")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="what to run (default: all; a subset needs its own --out, and the report then has "
                             "only these keys)")
    parser.add_argument("--repository", type=Path, default=None,
                        help="serve this repository (made by serving.faults.publish_untrained where the training "
                             "stack is, e.g. for a machine without it) instead of publishing an untrained model")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "reliability.json")
    args = parser.parse_args(argv)
    if set(args.sections) != set(SECTIONS) and args.out == parser.get_default("out"):
        parser.error("a run of some --sections needs its own --out: reports/reliability.json holds a full run")

    def on_sigterm(signum: int, frame: object) -> None:  # `timeout` stops a run: stop its tritonserver too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    work = Path(tempfile.mkdtemp(prefix="amc-reliability-"))
    try:
        return _run(args, work, "python -m benchmarks.reliability " + " ".join(argv or sys.argv[1:]))
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the published repository: 100 MB a run


def _run(args: argparse.Namespace, work: Path, command: str) -> int:
    sections = set(args.sections)
    from export.repository import STEPS, published_versions

    if args.repository is None:
        repository = work / "repository"
        version = faults.publish_untrained(repository)
    else:  # a copy: --max-in-flight changes its configs
        repository = work / "repository"
        shutil.copytree(args.repository, repository)
        versions = published_versions(repository)
        if not versions:
            raise SystemExit(f"--repository {args.repository}: no published version ({sig.ENSEMBLE_NAME}_v<N>) in it")
        version = versions[-1]

    models = [step.model_name for step in STEPS] + [sig.versioned_ensemble_name(version), sig.ENSEMBLE_NAME]
    if args.max_in_flight is not None:
        triton.set_parameter(repository, [sig.TOKENIZER.model_name], "max_in_flight", str(args.max_in_flight))
    details: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": _machine(),
                     "command": command}
    report: dict = {}

    def step(name: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)

    # This thread takes the server's CPUs: tritonserver and its stubs inherit them, and so do the supervisor's
    # threads (a server they restart) and the TLS server; the clients run on theirs (closed_loop).
    client_cpus = args.client_cpus or (os.sched_getaffinity(0) if args.server_cpus else None)
    if args.server_cpus:
        os.sched_setaffinity(0, args.server_cpus)
    with TritonServer(repository, models=models, log_file=work / "tritonserver.log") as server:
        details["server_cpus"] = sorted(os.sched_getaffinity(server.pid))
        details["client_cpus"] = sorted(client_cpus) if client_cpus else "as the server"
        if "bad_inputs" in sections:
            step("bad inputs")
            bad = bad_inputs(server)
            details["bad_inputs"] = bad.pop("_details")
            report["bad_inputs"] = bad
        if "overload" in sections:
            load = {"threads": 64, "candidates": 20, "processes": args.client_processes, "client_cpus": client_cpus}
            step("warm-up: 64 threads for 10 s (the server's and stubs' memory pools grow to their working size)")
            closed_loop(server, seconds=10, **load)
            step(f"overload: 64 threads for {args.overload_seconds:g} s")
            stats_before = step_statistics(server)
            over = closed_loop(server, seconds=args.overload_seconds, backoff_s=args.overload_backoff_s, **load)
            start, end = over["rss_mb"][0][1], over["rss_mb"][-1][1]
            details["overload"] = {k: v for k, v in over.items() if k != "rss_mb"} | {
                "rss_mb_start_end": [start, end], "candidates": 20,
                "max_in_flight": int(triton.parameter(repository, sig.TOKENIZER.model_name, "max_in_flight")),
                "backoff_s": args.overload_backoff_s,
                "steps": statistics_between(stats_before, step_statistics(server))}
            report["overload"] = {"threads": 64, "ok": over["ok"], "rejected": over["rejected"],
                                  "p99_ms": round(over["p99_ms"], 1),  # rejections' p99 and the limit: the details
                                  "rss_growth": round((end - start) / start, 4)}
        if "soak" in sections:
            step(f"soak: 4 threads for {args.soak_minutes:g} min")
            soak = closed_loop(server, threads=4, seconds=args.soak_minutes * 60, candidates=20, rss_every_s=10,
                               client_cpus=client_cpus)
            details["soak"] = {k: v for k, v in soak.items() if k != "rss_mb"} | {
                "rss_mb": [round(v, 1) for _, v in soak["rss_mb"]]}
            report["soak"] = {"minutes": args.soak_minutes,
                              "rss_slope_mb_per_min": round(_slope_mb_per_min(soak["rss_mb"]), 3)}
        if "stub_kill" in sections:
            step("stub kill")
            stub = next(s for s in faults.stubs(server.pid) if s.model == sig.TOKENIZER.model_name)
            killed = under_load(server, lambda: faults.kill(stub.pid), candidates=_candidates(3))
            details["stub_kill"] = _timeline(killed)
            report["stub_kill"] = {"recovered_s": round(killed["recovered_s"] or -1.0, 2),
                                   "ready_while_broken_s": round(killed["ready_while_broken_s"], 2)}
        if "server_kill" in sections:
            step("server kill")
            pid = server.pid
            killed = under_load(server, lambda: faults.kill(pid), candidates=_candidates(3), settle_s=180)
            details["server_kill"] = _timeline(killed)
            report["server_kill"] = {"client_recovered_s": round(killed["recovered_s"] or -1.0, 2)}
    if "tls" in sections:
        step("tls")
        report["tls"] = tls_check(repository, models, work / "pki")
    report = {name: report[name] for name in SECTIONS if name in report}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_name(args.out.stem + "_details.json").write_text(json.dumps(details, indent=2, default=str) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def _timeline(result: dict) -> dict:
    return {k: (str(v) if k in ("repairs", "errors") else v) for k, v in result.items()}


if __name__ == "__main__":
    sys.exit(main())
