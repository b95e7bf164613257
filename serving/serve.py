"""``amc-serve`` / ``python -m serving.serve`` (``make serve``): serve a model repository until Ctrl-C or SIGTERM,
with the self-healing supervisor (``serving.supervisor``) and its health endpoints unless ``--no-supervise``.

    python -m serving.serve --repository model_repository/python [--load amc ...] [--admin-key KEY]
        [--tls-cert server.crt --tls-key server.key [--tls-ca clients-ca.crt]]

The launcher itself is ``serving.server.TritonServer``; this module only joins it to the supervisor, so that the
supervisor can import the launcher without the launcher importing the supervisor.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from serving.endpoints import (
    ADMIN_KEY_HEADER,
    DEFAULT_HEALTH_PORT,
    DEFAULT_PORTS,
    GRPC_ADMIN_KEY_HEADER,
    LOOPBACK,
    TLSFiles,
)
from serving.server import ServerStartError, TritonServer
from serving.supervisor import HealthServer, Supervisor


def main(argv: list[str] | None = None) -> int:
    """Serve a model repository until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m serving.serve", description=main.__doc__)
    parser.add_argument("--repository", type=Path, required=True, help="Triton model repository")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_PORTS["grpc"],
                        help=f"0 picks a free port (default {DEFAULT_PORTS['grpc']})")
    parser.add_argument("--http-port", type=int, default=DEFAULT_PORTS["http"],
                        help=f"0 picks a free port (default {DEFAULT_PORTS['http']})")
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_PORTS["metrics"],
                        help=f"0 picks a free port (default {DEFAULT_PORTS['metrics']})")
    parser.add_argument("--load", nargs="+", default=["*"], metavar="MODEL",
                        help="models to load at start (default: every model in the repository)")
    parser.add_argument("--admin-key", default=os.environ.get("AMC_ADMIN_KEY"),
                        help=f"restrict model load/unload/index to requests with header {ADMIN_KEY_HEADER} "
                             f"(HTTP) or {GRPC_ADMIN_KEY_HEADER} (gRPC) (default: $AMC_ADMIN_KEY)")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain of the server: gRPC speaks only TLS")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-ca", type=Path,
                        help="PEM CA of the clients: mutual TLS, clients without a certificate it signed are refused")
    parser.add_argument("--log-file", type=Path, help="server log (default: a temporary file)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for readiness")
    parser.add_argument("--no-supervise", dest="supervise", action="store_false",
                        help="do not run the self-healing supervisor (serving/supervisor.py)")
    parser.add_argument("--health-port", type=int, default=DEFAULT_HEALTH_PORT,
                        help=f"the supervisor's GET /ready, /live, /repairs (default {DEFAULT_HEALTH_PORT}; 0: free)")
    parser.add_argument("--health-host", default=LOOPBACK, help=f"address of those endpoints (default {LOOPBACK})")
    parser.add_argument("--probe-interval", type=float, default=2.0,
                        help="seconds between the supervisor's rounds of golden requests (default 2)")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_ca is not None and args.tls_cert is None):
        parser.error("--tls-cert and --tls-key go together; --tls-ca needs them")
    try:
        tls = TLSFiles(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert is not None else None
    except FileNotFoundError as e:
        parser.error(str(e))

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    server = TritonServer(args.repository, grpc_port=args.grpc_port or None, http_port=args.http_port or None,
                          metrics_port=args.metrics_port or None, models=args.load, admin_key=args.admin_key,
                          log_file=args.log_file, tls=tls)
    supervisor = health = None
    try:
        server.start(timeout_s=args.timeout)
        print(f"tritonserver pid {server.pid} ready: grpc {server.grpc_url}  http {server.http_url}  "
              f"metrics {server.metrics_url}  log {server.log_path}", flush=True)
        if not args.supervise:
            while (code := server.poll()) is None:
                time.sleep(0.5)
            print(f"tritonserver exited with code {code}; see {server.log_path}", file=sys.stderr)
            return code or 1
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        supervisor = Supervisor(server, interval_s=args.probe_interval).start()
        health = HealthServer(supervisor, host=args.health_host, port=args.health_port).start()
        print(f"supervisor: golden requests every {args.probe_interval:g} s; readiness {health.url}/ready, "
              f"repairs {health.url}/repairs", flush=True)
        while True:  # the supervisor restarts the server if it dies
            time.sleep(0.5)
    except ServerStartError as e:
        print(e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping tritonserver", flush=True)
        return 0
    finally:
        if supervisor is not None:
            supervisor.stop()
        if health is not None:
            health.stop()
        server.stop()



if __name__ == "__main__":
    sys.exit(main())
