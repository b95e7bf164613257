"""Self-healing for a served replica: notice a dead or stuck step, repair it, and say honestly when it cannot serve.

Why: a Python-backend step whose stub process dies (``kill -9``, the OOM killer) stays dead in Triton 2.51:
every request through it fails with ``INTERNAL: Stub process 'amc_tokenizer_0_0' is not healthy`` while
``/v2/health/ready`` and the model's ready endpoint keep answering 200. A Triton batcher can also freeze
(``export/repository.py`` on queue policies). So readiness must come from serving, not from Triton's flags.

What :class:`Supervisor` does, every ``interval_s`` (a thread of ``amc-serve``):

1. **Server process.** If tritonserver exited, restart it on the same ports (cause: its exit code).
2. **Stub processes.** Each Python-backend model instance has a stub process (``amc_<model>_<g>_<i>``). One that
   is known (there when a healthy round began, or started by a reload since) and is gone now is dead: its model
   is reloaded at once, before any request has to fail on it.
3. **Golden requests.** One small, valid request (one candidate, one region, one keyword) through every probed
   ensemble (``amc`` and each ``amc_v<N>`` loaded; for ``amc_search`` / ``amc_search_v<N>``, a query and the top
   1 of the whole store), over loopback HTTP (no TLS, no client certificate needed).
   A failure other than overload ("Exceeds maximum queue size", or the text step's "overloaded: N requests in
   flight": the replica is busy, not broken) is repaired:
   the step named in the error (``Stub process '<instance>' ...``) is reloaded, or every step of that ensemble
   when the error names none (a stuck step times out without saying which).

Repair by reload: Triton's repository API loads a model again only when its config changed, so the
supervisor loads the model's own config with one parameter added (``supervisor_reload``: a timestamp), which
Triton swaps in with a fresh stub while the old instance is drained (about 1.6 s for the text step here).
When a repaired ensemble still fails ``failures_before_restart`` rounds in a row, the whole server is restarted
on the same ports.

Readiness: :attr:`Supervisor.ready` is False from the moment a fault is seen until a round of golden requests
succeeds again with every known stub still there; :class:`HealthServer` serves it as ``GET /ready`` (200 or 503, with JSON) and ``GET /live``
for Kubernetes probes, and ``GET /repairs`` lists every repair. Each repair is logged (logger
``amc.supervisor``) with its cause, its action, whether it worked and how long it took.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from amc_contract import signatures as sig

from .endpoints import LOOPBACK
from .faults import instance_model
from .server import TritonServer

__all__ = ["HealthServer", "Repair", "Supervisor", "golden_request", "is_search_ensemble"]

log = logging.getLogger("amc.supervisor")
_STUB_NAME = re.compile(r"Stub process '([A-Za-z0-9_.-]+)_(\d+)_(\d+)' is not healthy")
RELOAD_PARAMETER = "supervisor_reload"


@dataclass
class Repair:
    """One repair: when, why, what was done, whether serving came back, and how long it took."""

    at: float  # time.time()
    cause: str
    action: str
    ok: bool = False
    took_s: float = 0.0


@dataclass
class _Probe:
    ok: bool
    status: int = 200
    message: str = ""
    busy: bool = False


def is_search_ensemble(name: str) -> bool:
    """``amc_search`` or ``amc_search_v<N>``: the whole-store search ensembles."""
    prefix = f"{sig.SEARCH_ENSEMBLE_NAME}_v"
    return name == sig.SEARCH_ENSEMBLE_NAME or (name.startswith(prefix) and name[len(prefix):].isdigit())


def golden_request(ensemble: str = sig.ENSEMBLE_NAME) -> dict[str, Any]:
    """Triton's HTTP/JSON inference request for ``ensemble``: for the raw ensembles one query, one candidate, one
    region; for the search ensembles one query and the top 1 of the whole store (every step of it runs)."""
    query = {"name": sig.QUERY.name, "datatype": "BYTES", "shape": [1, 1], "data": ["cat face"]}
    outputs = [{"name": sig.SCORES.name}, {"name": sig.MODEL_VERSION.name}]
    if is_search_ensemble(ensemble):
        return {"inputs": [query, {"name": sig.TOP_K.name, "datatype": "INT64", "shape": [1, 1], "data": [1]}],
                "outputs": outputs}
    return {"inputs": [
        query,
        {"name": sig.REGIONS.name, "datatype": "FP32", "shape": [1, 1, 1, sig.REGION_FEATURE_DIM],
         "data": [0.5] * sig.REGION_FEATURE_DIM},
        {"name": sig.REGION_MASK.name, "datatype": "BOOL", "shape": [1, 1, 1], "data": [True]},
        {"name": sig.KEYWORDS.name, "datatype": "BYTES", "shape": [1, 1, 1], "data": ["cat"]},
    ], "outputs": outputs}


class Supervisor:
    """Watches one :class:`TritonServer` and repairs it (see the module docstring)."""

    def __init__(self, server: TritonServer, *, interval_s: float = 2.0, probe_timeout_s: float = 20.0,
                 failures_before_restart: int = 2, ensembles: list[str] | None = None,
                 watch_interval_s: float = 0.25) -> None:
        self.server = server
        self.interval_s = interval_s
        self.probe_timeout_s = probe_timeout_s
        self.failures_before_restart = failures_before_restart
        self._ensembles = ensembles
        self.repairs: list[Repair] = []
        self.ready = False
        self.reason = "not checked yet"
        self.rounds = 0
        self._known_stubs: dict[str, int] = {}  # instance name -> pid of the stubs that must stay (_golden_round)
        self._failures = 0
        self.watch_interval_s = watch_interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()  # the stub watcher saw a fault: start a round now
        self._thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> Supervisor:
        self._thread = threading.Thread(target=self._run, name="amc-supervisor", daemon=True)
        self._watcher = threading.Thread(target=self._watch, name="amc-stub-watch", daemon=True)
        self._thread.start()
        self._watcher.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in (self._thread, self._watcher):
            if thread is not None:
                thread.join(timeout=self.probe_timeout_s + 30)

    def _watch(self) -> None:
        """Between rounds (which take a while under load), look at the stub processes every
        ``watch_interval_s``: a dead one turns readiness false at once and starts a repair round."""
        while not self._stop.wait(self.watch_interval_s):
            try:
                gone = self._gone_stubs()
                if self.server.poll() is not None:
                    self._set_ready(False, f"tritonserver exited with code {self.server.poll()}")
                    self._wake.set()
                elif gone:
                    self._set_ready(False, _gone_message(gone))
                    self._wake.set()
            except Exception:  # noqa: BLE001 - the watcher only hastens the round; the round decides
                log.exception("stub watcher failed")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception as e:  # noqa: BLE001 - the supervisor must outlive anything a round throws
                self._set_ready(False, f"supervisor round failed: {type(e).__name__}: {e}")
                log.exception("supervisor round failed")
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"ready": self.ready, "reason": self.reason, "rounds": self.rounds,
                    "repairs": len(self.repairs), "server_pid": self.server.pid}

    def _set_ready(self, ready: bool, reason: str) -> None:
        with self._lock:
            if ready != self.ready:
                log.info("readiness %s: %s", "true" if ready else "false", reason)
            self.ready, self.reason = ready, reason

    # ---- one round -----------------------------------------------------------------------------------------
    def check(self) -> bool:
        """One round of checks and repairs; returns whether the replica serves."""
        self.rounds += 1
        code = self.server.poll()
        if code is not None:
            self._set_ready(False, f"tritonserver exited with code {code}")
            self._restart(f"tritonserver exited with code {code}")
            return self._golden_round()
        gone = self._gone_stubs()
        reloaded: set[str] = set()  # models whose reload worked this round
        fresh: dict[str, int] = {}  # their stubs as each reload ended
        if gone:
            cause = _gone_message(gone)
            self._set_ready(False, cause)
            for model in sorted({model for _, model in gone}):
                if self._reload(model, cause).ok:
                    reloaded.add(model)
                    fresh.update({s.name: s.pid for s in _stubs(self.server) if s.model == model})
        return self._golden_round(reloaded, fresh)

    def _golden_round(self, reloaded: set[str] | None = None, fresh: dict[str, int] | None = None) -> bool:
        # The stubs as the probes begin. A healthy round makes them known, not the stubs left when the probes end:
        # a stub killed while they ran (they take a while under load, and a probe can pass before the kill) would
        # otherwise drop out unseen, and readiness would stay true until a later probe failed on it. Also kept:
        # known stubs of models this round did not reload (or failed to), and the stubs each of its reloads
        # started (``fresh``), so that one that died during a later reload of the round (seconds each) is seen too.
        stubs_before = {s.name: s.pid for s in _stubs(self.server)}
        failed: dict[str, _Probe] = {}
        busy = False
        for ensemble in self.ensembles():
            probe = self._probe(ensemble)
            if probe.busy:
                busy = True
            elif not probe.ok:
                failed[ensemble] = probe
        if not failed:
            self._failures = 0
            kept = {n: p for n, p in self._known_stubs.items() if instance_model(n) not in (reloaded or set())}
            self._known_stubs = {**kept, **(fresh or {}), **stubs_before}
            gone = self._gone_stubs()
            if gone:  # died during this round: not ready; the next round (started now) reloads it
                self._set_ready(False, _gone_message(gone))
                self._wake.set()
                return False
            self._set_ready(True, "overloaded: queue full, still serving" if busy else "golden requests answered")
            return True
        first = next(iter(failed.items()))
        cause = f"golden request to {first[0]} failed (HTTP {first[1].status}): {first[1].message}"
        self._set_ready(False, cause)
        self._failures += 1
        if self._failures > self.failures_before_restart:
            self._restart(f"still failing after {self._failures - 1} repair(s): {cause}")
            return False
        reloads: dict[str, str] = {}  # model -> cause; ensembles share steps: each is reloaded once a round
        for ensemble, probe in failed.items():
            named = _STUB_NAME.search(probe.message)
            for model in [named.group(1)] if named else self._steps(ensemble):
                reloads.setdefault(model, f"golden request to {ensemble} failed (HTTP {probe.status}): "
                                          f"{probe.message}")
        for model, why in reloads.items():
            self._reload(model, why)
        return False

    def ensembles(self) -> list[str]:
        if self._ensembles is not None:
            return self._ensembles
        names = [m for m in self.server.models if m == sig.ENSEMBLE_NAME
                 or sig.parse_versioned_ensemble_name(m) is not None or is_search_ensemble(m)]
        return names or [sig.ENSEMBLE_NAME]

    def _gone_stubs(self) -> dict[tuple[str, str], int]:
        """Known instances (see :meth:`_golden_round`) whose stub is not there now: {(instance, model): pid}."""
        if not self._known_stubs:
            return {}
        now = {s.name for s in _stubs(self.server)}
        return {(name, instance_model(name)): pid for name, pid in self._known_stubs.items() if name not in now}

    # ---- HTTP helpers -----------------------------------------------------------------------------------------
    def _http(self, method: str, path: str, body: Any = None, timeout_s: float | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://{self.server.http_url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.probe_timeout_s) as response:
                text = response.read()
                return response.status, json.loads(text) if text else {}
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                return e.code, json.loads(text)
            except ValueError:
                return e.code, {"error": text.decode(errors="replace")}

    def _probe(self, ensemble: str) -> _Probe:
        try:
            status, answer = self._http("POST", f"/v2/models/{ensemble}/infer", golden_request(ensemble))
        except (OSError, ValueError) as e:  # refused, timed out (a stuck step), reset
            return _Probe(False, 0, f"{type(e).__name__}: {e}")
        if status == 200:
            outputs = {o["name"]: o.get("data") for o in answer.get("outputs", [])}
            version = (outputs.get(sig.MODEL_VERSION.name) or [None])[0]
            if version == sig.MIXED_VERSION:
                return _Probe(False, status, "model_version -1: the steps ran different versions")
            return _Probe(True)
        message = " ".join(str(answer.get("error", answer)).split())
        # Overload is not a fault: a full entrance queue, or the text step's in-flight limit (admission.py).
        return _Probe(False, status, message, busy="queue size" in message or "requests in flight" in message)

    def _steps(self, ensemble: str) -> list[str]:
        try:
            status, config = self._http("GET", f"/v2/models/{ensemble}/config")
        except OSError:
            return []
        steps = config.get("ensemble_scheduling", {}).get("step", []) if status == 200 else []
        return [s["model_name"] for s in steps]

    # ---- repairs ------------------------------------------------------------------------------------------------
    def _reload(self, model: str, cause: str) -> Repair:
        """Load ``model`` again with its own config plus a new ``supervisor_reload`` parameter: a changed config
        is what makes Triton load it again (fresh stub processes); the same config would be a no-op."""
        repair = Repair(time.time(), cause, f"reload {model}")
        started = time.perf_counter()
        try:
            status, config = self._http("GET", f"/v2/models/{model}/config")
            if status != 200:
                raise RuntimeError(f"cannot read the config of {model} (HTTP {status}): {config}")
            config.setdefault("parameters", {})[RELOAD_PARAMETER] = {"string_value": f"{time.time():.6f}"}
            status, answer = self._http("POST", f"/v2/repository/models/{model}/load",
                                        {"parameters": {"config": json.dumps(config)}}, timeout_s=300,
                                        headers=self.server.http_admin_headers)
            repair.ok = status == 200
            if not repair.ok:
                repair.action += f" (HTTP {status}: {answer})"
        except (OSError, ValueError, RuntimeError) as e:
            repair.action += f" ({type(e).__name__}: {e})"
        repair.took_s = round(time.perf_counter() - started, 3)
        self._record(repair)
        return repair

    def _restart(self, cause: str) -> Repair:
        repair = Repair(time.time(), cause, "restart tritonserver on the same ports")
        started = time.perf_counter()
        try:
            self.server.restart()
            repair.ok = True
        except Exception as e:  # noqa: BLE001 - recorded; the next round tries again
            repair.action += f" ({type(e).__name__}: {str(e)[:300]})"
        repair.took_s = round(time.perf_counter() - started, 3)
        self._failures = 0
        self._known_stubs = {}
        self._record(repair)
        return repair

    def _record(self, repair: Repair) -> None:
        with self._lock:
            self.repairs.append(repair)
        (log.warning if repair.ok else log.error)(
            "repair: %s -> %s in %.2f s; cause: %s", repair.action, "done" if repair.ok else "FAILED",
            repair.took_s, repair.cause)


def _gone_message(gone: dict[tuple[str, str], int]) -> str:
    return "; ".join(f"stub process {name} (pid {pid}) is gone" for (name, _), pid in gone.items())


def _stubs(server: TritonServer) -> list[Any]:
    from .faults import stubs

    return list(stubs(server.pid)) if server.pid is not None and server.poll() is None else []


class HealthServer:
    """``GET /ready`` (200 when the supervisor's last round served, else 503), ``GET /live`` (200 while the
    supervisor runs) and ``GET /repairs`` (JSON), on ``host:port`` (port 0 picks a free one)."""

    def __init__(self, supervisor: Supervisor, *, host: str = LOOPBACK, port: int = 0) -> None:
        sup = supervisor

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path == "/ready":
                    body, code = sup.status(), 200 if sup.ready and sup.alive else 503
                elif self.path == "/live":
                    body, code = {"live": sup.alive}, 200 if sup.alive else 503
                elif self.path == "/repairs":
                    body, code = [asdict(r) for r in list(sup.repairs)], 200
                else:
                    body, code = {"error": "not found"}, 404
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # probes every few seconds: not worth a log line
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = int(self._httpd.server_address[1])
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="amc-health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
