"""The server process: health checks, draining on shutdown and SIGTERM, bearer-token auth, TLS."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

grpc = pytest.importorskip("grpc")

from grpc_health.v1 import health_pb2  # noqa: E402

from surgeon.server.main import SurgeonServer  # noqa: E402
from surgeon.v1 import surgeon_pb2 as pb  # noqa: E402
from surgeon.v1 import surgeon_pb2_grpc as pb_grpc  # noqa: E402
from tests.grpc_helpers import (  # noqa: E402
    RPC_TIMEOUT,
    Code,
    code_of,
    health_status,
    meta,
    rank_request,
    watch_until,
)


def test_health_and_drain_on_shutdown(world, monkeypatch):
    import surgeon.inputs.images

    real_open = surgeon.inputs.images.open_image
    monkeypatch.setattr(surgeon.inputs.images, "open_image", lambda p: (time.sleep(0.2), real_open(p))[1])
    srv = SurgeonServer(
        port=0, exports_root=world["exports"], models_root=world["models"], data_root=world["data"], max_jobs=1
    ).start()
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = pb_grpc.SurgeonStub(ch)
        assert health_status(ch) == health_status(ch, "surgeon.v1.Surgeon") == health_pb2.HealthCheckResponse.SERVING
        running = stub.RankHeads(rank_request(out="drained", no_cache=True, batch_size=1), timeout=RPC_TIMEOUT)
        waiting = stub.RankHeads(rank_request(out="never"), timeout=RPC_TIMEOUT)
        watch_until(stub, running, lambda e: meta(e).stage == "head statistics")
        stopper = threading.Thread(target=srv.stop, kwargs={"grace": 1.0, "cancel_wait": 20})
        stopper.start()
        deadline = time.monotonic() + 10
        while health_status(ch) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert code_of(lambda: stub.RankHeads(rank_request(), timeout=10)) == Code.UNAVAILABLE
        stopper.join(60)
        assert not stopper.is_alive()
        with pytest.raises(grpc.RpcError) as info:
            health_status(ch)
        assert info.value.code() == Code.UNAVAILABLE
    for op, name in ((running, "drained"), (waiting, "never")):
        job = srv.jobs.get(op.name)
        assert job.state == "CANCELLED" and not (world["exports"] / name).exists()
    assert not list(world["exports"].glob(".drained*"))


def test_token_auth(world, monkeypatch):
    srv = SurgeonServer(port=0, exports_root=world["exports"], models_root=world["models"], token="s3cret").start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.SurgeonStub(ch)
            request = pb.ListPoliciesRequest()
            assert code_of(lambda: stub.ListPolicies(request, timeout=10)) == Code.UNAUTHENTICATED
            wrong = [("authorization", "Bearer nope")]
            assert code_of(lambda: stub.ListPolicies(request, metadata=wrong, timeout=10)) == Code.UNAUTHENTICATED
            watch = lambda: stub.WatchOperation(pb.WatchOperationRequest(name="operations/x"), timeout=10)  # noqa: E731
            assert code_of(watch) == Code.UNAUTHENTICATED
            right = [("authorization", "Bearer s3cret")]
            assert stub.ListPolicies(request, metadata=right, timeout=10).policies
            assert health_status(ch) == health_pb2.HealthCheckResponse.SERVING  # probes need no token
    finally:
        srv.stop(grace=1)
    from surgeon.core.errors import InvalidInput
    from surgeon.server.main import serve

    monkeypatch.delenv("SURGEON_TEST_TOKEN", raising=False)
    with pytest.raises(InvalidInput, match="SURGEON_TEST_TOKEN"):
        serve(port=0, exports_root=world["exports"], token_env="SURGEON_TEST_TOKEN")


def test_tls(world, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
        timeout=60,
    )
    if made.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {made.stderr[-200:]!r}")
    srv = SurgeonServer(port=0, exports_root=world["exports"], tls_cert=cert, tls_key=key).start()
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{srv.port}", credentials) as ch:
            assert pb_grpc.SurgeonStub(ch).ListPolicies(pb.ListPoliciesRequest(), timeout=10).policies
    finally:
        srv.stop(grace=1)


@pytest.mark.slow  # a real server process and its signal
def test_surgeon_serve_command_drains_on_sigterm(world, tmp_path):
    env = {**os.environ, "SURGEON_CACHE_DIR": str(tmp_path / "cache")}
    args = ["serve", "--port", "0", "--exports-root", str(world["exports"]), "--models-root", str(world["models"])]
    process = subprocess.Popen(
        [sys.executable, "-m", "surgeon", *args, "--max-jobs", "1", "--grace", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(120)
        assert lines and "listening on" in lines[0], process.stderr.read() if process.poll() is not None else lines
        port = int(re.search(r":(\d+) \(", lines[0]).group(1))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert health_status(ch) == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert "stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
