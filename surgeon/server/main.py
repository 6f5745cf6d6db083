"""`surgeon serve`: the gRPC server (surgeon.v1.Surgeon, grpc.health.v1 health checking, server reflection),
optional bearer-token auth and TLS, and a SIGTERM drain."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
from google.longrunning import operations_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from surgeon.core import limits
from surgeon.core.errors import InvalidInput, NotFound, PermissionDenied, PreconditionFailed
from surgeon.server.auth import TokenAuth
from surgeon.server.jobs import JobManager
from surgeon.server.operations import SERVICE_NAME as OPERATIONS_SERVICE
from surgeon.server.operations import OperationsService
from surgeon.server.paths import Root
from surgeon.server.service import SERVICE_NAME, SurgeonService
from surgeon.server.specs import ServerConfig
from surgeon.v1 import surgeon_pb2_grpc as pb_grpc

log = logging.getLogger("surgeon.server")


class SurgeonServer:
    """One server: start() binds and serves; stop() drains (NOT_SERVING, jobs finish or are cancelled)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 50051,
        exports_root: Path | str | None = None,
        models_root: Path | str | None = None,
        data_root: Path | str | None = None,
        max_jobs: int = 2,
        queue_size: int = 16,
        token: str | None = None,
        tls_cert: Path | str | None = None,
        tls_key: Path | str | None = None,
        device: str | None = None,
        rpc_threads: int = 64,
    ):
        from surgeon.core.paths import exports_dir

        limits.count("--port", port, 0, limits.MAX_PORT)  # 70000 would otherwise listen on 70000 % 65536
        if max_jobs < 1:
            raise InvalidInput(f"--max-jobs must be at least 1, got {max_jobs}")
        if queue_size < 0:
            raise InvalidInput(f"--queue-size must be >= 0, got {queue_size}")
        if (tls_cert is None) != (tls_key is None):
            raise InvalidInput("TLS needs both --tls-cert and --tls-key")
        if token is not None and not token:
            raise InvalidInput("the bearer token is empty")
        self.config = ServerConfig(
            exports=Root.create("exports", exports_root or exports_dir(), make=True),
            models=Root.create("models", models_root),
            data=Root.create("data", data_root),
            device=device,
        )
        from surgeon.model.load import parse_device

        parse_device(device)  # `--device tpu` fails at start, not in every job
        self._clean_stale()
        self.host = host
        self.health = health.HealthServicer(experimental_non_blocking=True)
        for name in ("", SERVICE_NAME, OPERATIONS_SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        interceptors = [TokenAuth(token)] if token else []
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=rpc_threads, thread_name_prefix="surgeon-rpc"),
            interceptors=interceptors,
            options=[("grpc.so_reuseport", 0)],
        )
        address = f"{host}:{port}"
        try:
            if tls_cert is not None and tls_key is not None:  # both or neither: checked above
                try:
                    pair = (Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())
                except OSError as err:
                    raise NotFound(f"cannot read the TLS key or certificate: {err}") from None
                self.port = self.server.add_secure_port(address, grpc.ssl_server_credentials([pair]))
            else:
                self.port = self.server.add_insecure_port(address)
        except (OSError, RuntimeError) as err:
            raise PreconditionFailed(f"cannot listen on {address}: {err}") from None
        from surgeon.server.store import FILENAME, OperationStore

        try:
            store = OperationStore(self.config.exports.folder / FILENAME)
        except sqlite3.Error as err:
            raise PermissionDenied(f"cannot keep operation records in {self.config.exports.folder}: {err}") from None
        aborted = store.abort_unfinished()
        if aborted:
            log.warning("%d operation(s) of a previous server were unfinished: now reported as failed", aborted)
        self.jobs = JobManager(max_jobs, queue_size, store=store)
        pb_grpc.add_SurgeonServicer_to_server(SurgeonService(self.config, self.jobs), self.server)
        operations_pb2_grpc.add_OperationsServicer_to_server(OperationsService(self.jobs), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        services = (SERVICE_NAME, OPERATIONS_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, self.server)
        self.tls = tls_cert is not None
        self._stopped = threading.Event()

    def _clean_stale(self, depth: int = 2) -> None:
        """Temporary outputs of jobs killed with an earlier server (run folders and their export folders)."""
        from surgeon.core.paths import remove_stale_temporaries

        level = [self.config.exports.folder]
        for _ in range(depth + 1):
            for folder in level:
                for path in remove_stale_temporaries(folder):
                    log.info("removed %s, left by a writer that is gone", path)
            level = [d for f in level for d in f.iterdir() if d.is_dir() and not d.is_symlink()]

    def start(self) -> SurgeonServer:
        self.server.start()
        # the library is imported and the roots are usable: models can be loaded
        for name in ("", SERVICE_NAME, OPERATIONS_SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on %s:%d", self.host, self.port)
        return self

    def stop(self, grace: float = 20.0, cancel_wait: float = 10.0) -> int:
        """Drain: NOT_SERVING at once, no new jobs, running ones get `grace` seconds then are cancelled.
        Returns how many jobs did not stop (their threads are still inside library code)."""
        if self._stopped.is_set():
            return 0
        self.health.enter_graceful_shutdown()
        stuck = self.jobs.drain(grace, cancel_wait)
        if stuck:
            log.warning("%d job(s) did not stop in time; their partial outputs were removed", len(stuck))
        self.server.stop(grace=1.0).wait()
        if not stuck:  # a stuck job may still record its end; the process exit closes the file then
            self.jobs.store.close()
        self._stopped.set()
        return len(stuck)

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def serve(
    host: str = "127.0.0.1",
    port: int = 50051,
    exports_root: Path | None = None,
    models_root: Path | None = None,
    data_root: Path | None = None,
    max_jobs: int = 2,
    queue_size: int = 16,
    token_env: str | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    grace: float = 20.0,
    device: str | None = None,
) -> None:
    """Run until SIGTERM/SIGINT, then drain within the grace period and return."""
    limits.number("--grace", grace, 0.0, limits.MAX_GRACE_S)  # before listening: nan or -1 would drain at once
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = limits.token_from_env(token_env)
    server = SurgeonServer(
        host, port, exports_root, models_root, data_root, max_jobs, queue_size, token, tls_cert, tls_key, device
    ).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(
        f"surgeon serve: listening on {host}:{server.port} ({'TLS' if server.tls else 'plaintext'}"
        f"{', token auth' if token else ''}), exports root {server.config.exports.path}, "
        f"{max_jobs} job(s) at once, {queue_size} waiting at most",
        flush=True,
    )
    while not stop.wait(0.5):
        pass
    print(f"surgeon serve: draining (grace {grace:g}s)", file=sys.stderr, flush=True)
    stuck = server.stop(grace)
    print("surgeon serve: stopped", file=sys.stderr, flush=True)
    if stuck:  # a job thread still inside torch would abort the interpreter's exit ("terminate called...")
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)
