"""Launch the real ``tritonserver`` that ships inside the ``nvidia-pytriton`` wheel, without Docker: pick its
ports, start it (its command line, its log), wait until it and its models are ready, stop it and its stubs.

Finding the wheel's binary, the Python-backend directory it needs and its environment: ``triton_wheel.py``.
What the server exposes (ports, health and metrics paths, the admin-key header, TLS files): ``endpoints.py``.

Usage::

    with TritonServer("model_repository/python", models=["amc"], admin_key="s3cret") as server:
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

From the command line, with the self-healing supervisor: ``python -m serving.serve`` (``amc-serve``,
``make serve``).

TLS: with ``tls=TLSFiles(cert, key, ca)`` (``--tls-cert/--tls-key/--tls-ca``) the gRPC endpoint speaks only TLS
(Triton's ``--grpc-use-ssl``); with a CA it also demands a client certificate signed by it (mutual TLS,
``--grpc-use-ssl-mutual``). A plaintext client is refused (UNAVAILABLE). Triton's HTTP endpoint has no TLS: it
stays on loopback, and this launcher reads readiness there, so it needs no client certificate of its own.

Why one module: it is one class, one tritonserver process from launch to stop; eleven of its definitions are
one-line accessors (ports, URLs, pid, log, headers), and the wheel's binary and the endpoints live apart already
(``triton_wheel.py``, ``endpoints.py``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from .endpoints import (
    ADMIN_KEY_HEADER,
    GRPC_ADMIN_KEY_HEADER,
    HEALTH_LIVE_PATH,
    HEALTH_READY_PATH,
    LOOPBACK,
    METRICS_ARGS,
    METRICS_PATH,
    TLSFiles,
)
from .triton_wheel import (
    EXPECTED_TRITON_VERSION,
    find_tritonserver,
    python_backend_directory,
    server_environment,
)

__all__ = [
    "ServerStartError",
    "TritonServer",
]

_LOG_TAIL_LINES = 40
_START_ATTEMPTS = 3  # fresh free ports after a port clash


class ServerStartError(RuntimeError):
    """tritonserver exited or did not become ready in time; the message ends with the log's last lines."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(f"{message}\n--- last lines of the tritonserver log ---\n{log_tail}" if log_tail
                         else message)
        self.log_tail = log_tail


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free now: each bound to port 0 while the others are still held (one at a time, the kernel
    may hand the port it just released out again: the same port for gRPC and metrics, and tritonserver refuses its
    command line); a clash with another process at server start is retried."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in sockets:
            s.bind((LOOPBACK, 0))
        return [int(s.getsockname()[1]) for s in sockets]


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return ""


class TritonServer:
    """A tritonserver process on loopback ports, in explicit model-control mode.

    ``models`` are loaded at start (``--load-model``; ``"*"`` loads every model in the repository) and
    :meth:`start` returns once they are ready. With ``admin_key``, the model-repository protocol (load,
    unload, repository index) is restricted to requests carrying the key: header ``amc-admin-key: <key>``
    on HTTP, ``triton-grpc-protocol-amc-admin-key: <key>`` on gRPC (Triton adds that prefix; use
    :attr:`admin_headers`); inference, health and metadata stay open. Requests without it fail with
    gRPC ``UNAVAILABLE`` / HTTP 403. The key is on the server's command line, so other local users can
    read it from the process table.
    """

    def __init__(
        self,
        repository: str | os.PathLike[str],
        *,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        models: Sequence[str] | None = None,
        admin_key: str | None = None,
        log_file: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        backend_directory: str | os.PathLike[str] | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        self.repository = Path(repository).resolve()
        self.tls = tls
        if not self.repository.is_dir():
            raise FileNotFoundError(f"model repository {self.repository} does not exist")
        if admin_key is not None and (not admin_key or any(c in admin_key for c in ",:= \t\n")):
            # The restriction flag is `<protocols>:<header>=<value>`; these characters would break its parsing.
            raise ValueError("admin_key must be non-empty and contain no ',', ':', '=' or whitespace")
        self._fixed_ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self._ports: dict[str, int] = {}
        # "*" means every model folder (one with a config.pbtxt); Triton's own "*" would also try hidden
        # folders such as publish's .staging and the rollout tool's .failed, and refuse to start.
        self.models = (sorted(p.parent.name for p in self.repository.glob("*/config.pbtxt")
                              if not p.parent.name.startswith("."))
                       if list(models or []) == ["*"] else list(models or []))
        self.admin_key = admin_key
        self._log_file = Path(log_file).resolve() if log_file is not None else None
        self.extra_args = list(extra_args)  # relative paths in them resolve against the backends' parent dir
        self._backend_directory = Path(backend_directory) if backend_directory else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self._log_path: Path | None = None
        self._log_offset = 0  # where this launch's lines start in the log (a given log_file is appended to)
        self._failed = False  # start failed: keep a temporary log for the post-mortem

    # ---- properties ------------------------------------------------------------------------------------
    def _port(self, kind: str) -> int:
        if kind not in self._ports:
            raise RuntimeError("the server has not been started")
        return self._ports[kind]

    @property
    def grpc_port(self) -> int:
        return self._port("grpc")

    @property
    def http_port(self) -> int:
        return self._port("http")

    @property
    def metrics_port(self) -> int:
        return self._port("metrics")

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}{METRICS_PATH}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def admin_headers(self) -> dict[str, str]:
        """gRPC headers for model-repository calls (``client.load_model(name, headers=server.admin_headers)``)."""
        return {GRPC_ADMIN_KEY_HEADER: self.admin_key} if self.admin_key else {}

    @property
    def http_admin_headers(self) -> dict[str, str]:
        """HTTP headers for model-repository calls (``POST /v2/repository/models/<m>/load``)."""
        return {ADMIN_KEY_HEADER: self.admin_key} if self.admin_key else {}

    def poll(self) -> int | None:
        """The server's exit code, or None while it runs (or before start)."""
        return self._proc.poll() if self._proc is not None else None

    # ---- command line ----------------------------------------------------------------------------------
    @property
    def backend_directory(self) -> Path:
        if self._backend_directory is None:
            self._backend_directory = python_backend_directory()
        return self._backend_directory

    def command(self) -> list[str]:
        """The tritonserver command line for the current ports (call after ports are chosen)."""
        backends = self.backend_directory
        cmd = [
            str(find_tritonserver()),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.models),
            # Loopback only: this launcher is for local serving and tests, never an open port.
            f"--grpc-address={LOOPBACK}", f"--grpc-port={self._ports['grpc']}",
            f"--http-address={LOOPBACK}", f"--http-port={self._ports['http']}",
            f"--metrics-address={LOOPBACK}", f"--metrics-port={self._ports['metrics']}",
            # In-flight requests get this long to finish after SIGTERM before the server exits anyway.
            "--exit-timeout-secs=10",
            *METRICS_ARGS,
        ]
        if self.tls is not None:
            cmd += self.tls.args()
        if self.admin_key:
            rule = f"model-repository:{ADMIN_KEY_HEADER}={self.admin_key}"
            cmd += [f"--grpc-restricted-protocol={rule}", f"--http-restricted-api={rule}"]
        # Last, so that a caller's flag overrides ours (tritonserver keeps the last occurrence).
        return cmd + self.extra_args

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 120) -> TritonServer:
        """Start tritonserver and wait until it is live, ready and every requested model is ready."""
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"tritonserver already running (pid {self._proc.pid})")
        deadline = time.monotonic() + timeout_s
        for attempt in range(_START_ATTEMPTS):
            fresh = iter(_free_ports(sum(p is None for p in self._fixed_ports.values())))
            self._ports = {k: p if p is not None else next(fresh) for k, p in self._fixed_ports.items()}
            self._launch()
            try:
                self._wait_ready(deadline)
                return self
            except ServerStartError as e:
                self.stop()
                clash = "already in use" in e.log_tail or "Address in use" in e.log_tail
                chosen = any(p is None for p in self._fixed_ports.values())
                if not (clash and chosen and attempt + 1 < _START_ATTEMPTS and time.monotonic() < deadline):
                    raise
            except BaseException:
                # Ctrl-C while waiting: __exit__ does not run when __enter__ raises, so no server may outlive us.
                self.stop()
                raise
        raise AssertionError("unreachable")

    def restart(self, timeout_s: float = 120) -> TritonServer:
        """Stop the server (whatever state it is in) and start it again on the same ports, so that clients
        reconnect to the address they know. Used by the supervisor (``serving/supervisor.py``)."""
        ports = dict(self._ports)
        self.stop()
        if ports:
            self._fixed_ports = ports
        return self.start(timeout_s=timeout_s)

    def _launch(self) -> None:
        self._stopped = False
        if self._log_file is not None:
            self._log_path = self._log_file
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
        else:
            # A temporary log is removed by a clean stop() and kept when the server failed, for the post-mortem.
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        self._failed = False
        cmd = self.command()
        self._log_offset = self._log_path.stat().st_size if self._log_path.exists() else 0
        with open(self._log_path, "ab") as log:
            log.write(("$ " + " ".join(_redact(cmd)) + "\n").encode())
            log.flush()
            # Own session (and so process group): Ctrl-C in the caller's terminal does not reach the server or
            # its stubs directly; stop() shuts them down in order.
            # cwd: the stub puts '' (the server's cwd) first on sys.path, so a project checkout as cwd would let
            # its directories shadow installed packages in every model; the backends' parent holds nothing else.
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          env=server_environment(), cwd=self.backend_directory.parent,
                                          start_new_session=True)

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None and self._log_path is not None
        while True:
            code = self._proc.poll()
            if code is not None:
                self._failed = True
                raise ServerStartError(f"tritonserver exited with code {code} during start "
                                       f"(log: {self._log_path})", _tail(self._log_path))
            wanted = [m for m in self.models if m != "*"]
            # The log check makes sure the server answering on our port is ours, not another one that took the
            # port between _free_ports() and our bind (ours then exits and is retried). Readiness is read over
            # HTTP (loopback, no TLS), so a gRPC endpoint that demands client certificates needs none from us.
            if (self._endpoints_started() and self.http_ok(HEALTH_LIVE_PATH) and self.http_ok(HEALTH_READY_PATH)
                    and all(self.http_ok(f"/v2/models/{m}/ready") for m in wanted)):
                return
            if time.monotonic() >= deadline:
                self._failed = True
                raise ServerStartError(f"tritonserver not ready with models {self.models} in time "
                                       f"(log: {self._log_path})", _tail(self._log_path))
            time.sleep(0.2)

    def http_ok(self, path: str, timeout_s: float = 2.0) -> bool:
        """True if ``GET http://<http_url><path>`` answers 200 (Triton's health and readiness endpoints)."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=timeout_s) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _endpoints_started(self) -> bool:
        assert self._log_path is not None
        with open(self._log_path, "rb") as f:
            f.seek(self._log_offset)
            text = f.read().decode(errors="replace")
        return (f"Started GRPCInferenceService at {self.grpc_url}" in text
                and f"Started HTTPService at {self.http_url}" in text)

    def stop(self, timeout_s: float = 30) -> int | None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``) and any stub left in its group.

        SIGTERM goes to tritonserver alone first: it then unloads its models and ends the Python-backend stubs
        itself, cleanly. Signalling the whole group at once would kill the stubs under it mid-unload. Whatever
        is left of the group afterwards is killed. Returns the exit code (None if never started).
        """
        proc = self._proc
        if proc is None:
            return None
        if self._stopped:
            # Already reaped: its pid (and group id) may belong to another process by now.
            return proc.returncode
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # The group id is the server's pid (own session); no new process can take it while members remain.
        _killpg(proc.pid, signal.SIGKILL)
        self._stopped = True
        if self._log_file is None and self._log_path is not None and proc.returncode == 0 and not self._failed:
            self._log_path.unlink(missing_ok=True)
        return proc.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ---- identity --------------------------------------------------------------------------------------
    def server_metadata(self) -> dict[str, object]:
        """Server metadata: ``{"name": "triton", "version": "2.51.0", "extensions": [...]}`` (over HTTP, which
        carries the same as gRPC's and needs no client certificate when gRPC is mutual TLS)."""
        import json
        import urllib.request

        with urllib.request.urlopen(f"http://{self.http_url}/v2", timeout=5) as response:
            return dict(json.loads(response.read()))

    def is_real_tritonserver(self) -> bool:
        """True if the process answering on ``grpc_url`` is NVIDIA's tritonserver of the wheel's release."""
        meta = self.server_metadata()
        return meta.get("name") == "triton" and str(meta.get("version", "")).startswith(
            EXPECTED_TRITON_VERSION.rsplit(".", 1)[0])


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # group already empty
        os.killpg(pgid, sig)


def _redact(cmd: list[str]) -> list[str]:
    """The command line for the log, without the admin key."""
    out = []
    for arg in cmd:
        if arg.startswith(("--grpc-restricted-protocol=", "--http-restricted-api=")):
            arg = arg.rsplit("=", 1)[0] + "=<redacted>"
        out.append(arg)
    return out
