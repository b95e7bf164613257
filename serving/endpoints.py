"""What the served tritonserver exposes: its ports, health and metrics paths, metrics flags, the admin-key
header and the TLS files of its gRPC endpoint. The launcher (``server.py``), the supervisor, ``amc-serve``,
the Kubernetes manifests (``deploy/k8s``) and the Prometheus/Grafana configs (``monitoring/``) read them here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ADMIN_KEY_HEADER",
    "DEFAULT_HEALTH_PORT",
    "DEFAULT_PORTS",
    "GRPC_ADMIN_KEY_HEADER",
    "HEALTH_LIVE_PATH",
    "HEALTH_READY_PATH",
    "LOOPBACK",
    "METRICS_ARGS",
    "METRICS_PATH",
    "TLSFiles",
]

# Header a model-repository request (load / unload / index) must carry when the server has an admin key.
# Triton checks it as given on HTTP but prefixes it with "triton-grpc-protocol-" on gRPC (verified on 2.51:
# "This protocol is restricted, expecting header 'triton-grpc-protocol-amc-admin-key'"), so gRPC clients
# send GRPC_ADMIN_KEY_HEADER.
ADMIN_KEY_HEADER = "amc-admin-key"
GRPC_ADMIN_KEY_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"
LOOPBACK = "127.0.0.1"
# Triton's default ports, what `make serve` uses and what the Kubernetes manifests (deploy/k8s) expose.
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
# The KServe v2 health endpoints on the HTTP port (Kubernetes probes) and the Prometheus endpoint on the metrics port.
HEALTH_LIVE_PATH = "/v2/health/live"
HEALTH_READY_PATH = "/v2/health/ready"
METRICS_PATH = "/metrics"
# The supervisor's readiness endpoint (GET /ready on this port): unlike Triton's /v2/health/ready, it turns false
# when a step cannot serve (serving/supervisor.py).
DEFAULT_HEALTH_PORT = 8003
# Latency summaries (p50/p90/p95/p99/p99.9 per model and version: nv_inference_*_summary_us) besides the default
# counters; the Grafana dashboard (monitoring/) reads them. Every launch passes these, the manifests too.
METRICS_ARGS = ("--metrics-config=summary_latencies=true",)


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for gRPC over TLS: the server's certificate chain and key, and optionally the CA whose
    client certificates are accepted (mutual TLS: clients without one are refused)."""

    cert: Path
    key: Path
    ca: Path | None = None

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            value = getattr(self, name)
            if value is None:
                continue
            path = Path(value).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"TLS {name} file {path} does not exist")
            object.__setattr__(self, name, path)

    def args(self) -> list[str]:
        """tritonserver's flags for these files."""
        out = ["--grpc-use-ssl=true", f"--grpc-server-cert={self.cert}", f"--grpc-server-key={self.key}"]
        if self.ca is not None:
            out += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={self.ca}"]
        return out
