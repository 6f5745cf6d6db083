"""Hostile and unlucky inputs over loopback gRPC: bounds before allocation, short error details, force
replacements that a cancel cannot lose, verified exports, temporary folders, stale-temporary cleanup and a
clean SIGTERM exit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")

from google.longrunning import operations_pb2  # noqa: E402
from google.rpc import error_details_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

import surgeon.server.service as service_module  # noqa: E402
from surgeon.server.main import SurgeonServer  # noqa: E402
from surgeon.v1 import surgeon_pb2 as pb  # noqa: E402
from tests.grpc_helpers import (  # noqa: E402
    RPC_TIMEOUT,
    Client,
    Code,
    Meta,
    code_of,
    detail,
    meta,
    outcome,
    rank_request,
    validation,
    wait,
)


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.mark.parametrize(
    "make",
    [
        lambda: rank_request(images=pb.ImageSource(images="images", n_images=2147483647)),
        lambda: rank_request(images=pb.ImageSource(n_images=2147483647)),  # the toy world draws them in memory
        lambda: rank_request(batch_size=2147483647),
        lambda: rank_request(span_rank=-1),
        lambda: rank_request(layers="1," * 40_000),
        lambda: pb.PruneRequest(ranking="ranking", policy="top-k", k=2147483647),
        lambda: pb.PruneRequest(ranking="ranking", policy="random", k=1, seeds=100_000),
        lambda: pb.PruneRequest(ranking="ranking", policy="top-k", k=1, seed=-1),
        lambda: pb.PruneRequest(ranking="ranking", policy="top-k", k=1, max_skew=float("inf")),
        lambda: pb.PruneRequest(ranking="ranking", policy="top-k", k=1, min_acc=float("nan")),
        lambda: pb.ExportRequest(run_dir="x", atol=float("nan")),
        lambda: pb.ValidateRequest(validation=pb.ValidationData(skew_k=2147483647)),
    ],
    ids=[
        "n-images-folder",
        "n-images-toy",
        "batch",
        "rank",
        "layers-long",
        "k",
        "seeds",
        "seed",
        "skew",
        "acc",
        "atol",
        "skew-k",
    ],
)
def test_counts_and_numbers_are_bounded_at_once(stub, world, make):
    request = make()
    rpc = {pb.RankHeadsRequest: "RankHeads", pb.PruneRequest: "Prune", pb.ExportRequest: "Export"}.get(
        type(request), "Validate"
    )
    error = _error(lambda: getattr(stub, rpc)(request, timeout=RPC_TIMEOUT))
    assert error.code() == Code.INVALID_ARGUMENT, error.details()
    status = rpc_status.from_call(error)  # the details travel in the trailer as google.rpc.Status
    assert status.code == Code.INVALID_ARGUMENT.value[0] and status.message == error.details()
    assert detail(status, error_details_pb2.ErrorInfo).reason == "INVALID_INPUT"


def test_a_huge_layer_span_is_refused_in_the_request(stub, world):
    """A 14-byte layer spec naming a trillion layers is refused before it is queued: no job, nothing allocated."""
    for layers in ("0-999999999999", "last99999999", "1,x"):
        error = _error(lambda layers=layers: stub.RankHeads(rank_request(layers=layers), timeout=RPC_TIMEOUT))
        assert error.code() == Code.INVALID_ARGUMENT and "layer" in error.details()  # the RPC's status: no job


def test_echoed_input_is_truncated_so_the_status_fits(stub, world):
    """An error echoes only part of a huge input, so its status stays within the client's metadata limit."""
    heads = "L1.H0," + "x" * 3_900_000
    error = _error(lambda: stub.Prune(pb.PruneRequest(policy="heads", heads=heads), timeout=RPC_TIMEOUT))
    assert error.code() == Code.INVALID_ARGUMENT and len(error.details()) < 300
    malformed = "L1.H0,L" + "9" * 50_000  # within the length limit, malformed: echoed in part
    error = _error(lambda: stub.Prune(pb.PruneRequest(policy="heads", heads=malformed), timeout=RPC_TIMEOUT))
    assert error.code() == Code.INVALID_ARGUMENT and len(error.details()) < 300


def _prune(ranking: str, out: str, heads: str, force: bool = False) -> pb.PruneRequest:
    return pb.PruneRequest(
        model=pb.ModelRef(model="local-dir:tiny"),
        ranking=ranking,
        policy="heads",
        heads=heads,
        validation=validation(),
        out=out,
        force=force,
    )


def test_cancelling_a_force_prune_keeps_the_previous_run(stub, world, monkeypatch):
    """A cancel takes effect right before the rename, so the run a `force` prune would replace stays as it
    was (a cancel after publishing would lose both runs)."""
    ranked = outcome(wait(stub, stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT)), pb.RankHeadsResult)
    first = wait(stub, stub.Prune(_prune(ranked.run_dir, "kept", "L1.H0"), timeout=RPC_TIMEOUT))
    assert meta(first).state == Meta.STATE_SUCCEEDED, first.error
    before = (world["exports"] / "kept" / "plan.json").read_text()
    started, cancelled = threading.Event(), threading.Event()
    real = service_module.run_prune

    def prune_after_cancel(*args, **kwargs):
        started.set()
        assert cancelled.wait(RPC_TIMEOUT)
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module, "run_prune", prune_after_cancel)
    op = stub.Prune(_prune(ranked.run_dir, "kept", "L1.H1", force=True), timeout=RPC_TIMEOUT)
    assert started.wait(RPC_TIMEOUT)
    stub.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name), timeout=RPC_TIMEOUT)
    cancelled.set()
    final = wait(stub, op)
    assert meta(final).state == Meta.STATE_CANCELLED and final.error.code == Code.CANCELLED.value[0]
    assert (world["exports"] / "kept" / "plan.json").read_text() == before
    assert not list(world["exports"].glob(".kept*"))


def test_export_refuses_a_tampered_run_and_temporary_folders(stub, world):
    ranked = outcome(wait(stub, stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT)), pb.RankHeadsResult)
    done = wait(stub, stub.Prune(_prune(ranked.run_dir, "tampered", "L2.H1"), timeout=RPC_TIMEOUT))
    assert meta(done).state == Meta.STATE_SUCCEEDED, done.error
    report = world["exports"] / "tampered" / "report.md"
    report.write_text(report.read_text() + "\nall heads kept\n")
    failed = wait(stub, stub.Export(pb.ExportRequest(run_dir="tampered", format="safetensors"), timeout=60))
    assert meta(failed).state == Meta.STATE_FAILED and "does not match the sha256" in failed.error.message
    assert not (world["exports"] / "tampered" / "export-safetensors").exists()
    hidden = world["exports"] / f".run.tmp-{os.getpid()}-x"
    os.rename(world["exports"] / "tampered", hidden)
    request = pb.ExportRequest(run_dir=hidden.name, format="safetensors")
    assert code_of(lambda: stub.Export(request, timeout=RPC_TIMEOUT)) == Code.FAILED_PRECONDITION


def test_a_new_server_removes_the_temporaries_of_a_killed_one(world, tmp_path):
    exports = tmp_path / "exports"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = [exports / f".run.tmp-{child.pid}-ab", exports / "run2" / f".export-onnx.tmp-{child.pid}-cd"]
    for path in stale:
        (path / "onnx").mkdir(parents=True)
        os.utime(path, (time.time() - 7200,) * 2)
    srv = SurgeonServer(port=0, exports_root=exports, models_root=world["models"], data_root=world["data"])
    try:
        assert not any(p.exists() for p in stale) and (exports / "run2").is_dir()
    finally:
        srv.stop(grace=0)


SLOW_SERVER = textwrap.dedent(
    """
    import sys, torch
    import surgeon.inputs.images
    def busy(path):  # a job that cannot stop: inside torch for a minute, never reaching its next step
        x = torch.randn(512, 512)
        for _ in range(100000):
            x = torch.tanh(x @ x)
    surgeon.inputs.images.open_image = busy
    from surgeon.cli import main
    sys.argv = ["surgeon", *sys.argv[1:]]
    main()
    """
)


@pytest.mark.slow  # a real server process and its signal
def test_sigterm_with_a_job_that_cannot_stop_exits_cleanly(world, tmp_path):
    """The drain cancels the job and the process exits 0, though a thread is still inside torch."""
    code = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])  # this checkout
    env = {**os.environ, "SURGEON_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": code}
    args = ["serve", "--port", "0", "--exports-root", str(tmp_path / "exports"), "--data-root", str(world["data"])]
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SERVER, *args, "--max-jobs", "1", "--grace", "0.5", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        line = process.stdout.readline()
        assert "listening on" in line, process.stderr.read() if process.poll() is not None else line
        port = int(re.search(r":(\d+) \(", line).group(1))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            remote = Client(ch)
            request = pb.RankHeadsRequest(images=pb.ImageSource(images="images"), no_cache=True)
            op = remote.RankHeads(request, timeout=RPC_TIMEOUT)
            get = operations_pb2.GetOperationRequest(name=op.name)
            deadline = time.monotonic() + RPC_TIMEOUT
            while meta(remote.GetOperation(get, timeout=RPC_TIMEOUT)).stage != "head statistics":
                assert time.monotonic() < deadline
                time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0
        stderr = process.stderr.read()
        assert "stopped" in stderr and "terminate called" not in stderr
        assert not [p for p in (tmp_path / "exports").glob(".*") if ".tmp-" in p.name]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_operations_survive_a_restart(world, tmp_path, monkeypatch):
    """Operations are kept in SQLite under the exports root, so a polling pipeline finds them after a restart:
    finished ones with their result, unfinished ones reported as aborted."""
    from surgeon.server.store import RESTARTED

    roots = {"exports_root": tmp_path / "exports", "models_root": world["models"], "data_root": world["data"]}
    first = SurgeonServer(port=0, **roots).start()
    started, release = threading.Event(), threading.Event()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{first.port}") as ch:
            remote = Client(ch)
            finished = wait(remote, remote.RankHeads(rank_request(), timeout=RPC_TIMEOUT))
            assert meta(finished).state == Meta.STATE_SUCCEEDED, finished.error
            real = service_module.run_rank

            def held(*args, **kwargs):
                started.set()
                release.wait(RPC_TIMEOUT)
                return real(*args, **kwargs)

            monkeypatch.setattr(service_module, "run_rank", held)
            running = remote.RankHeads(rank_request(), timeout=RPC_TIMEOUT)
            assert started.wait(RPC_TIMEOUT)  # its RUNNING record is written before the next server reads them
        second = SurgeonServer(port=0, **roots).start()  # what a restarted server finds
        try:
            with grpc.insecure_channel(f"127.0.0.1:{second.port}") as ch:
                remote = Client(ch)
                get = remote.GetOperation
                again = get(operations_pb2.GetOperationRequest(name=finished.name), timeout=RPC_TIMEOUT)
                assert again.done and not again.HasField("error")
                assert again.response.type_url == finished.response.type_url  # Any bytes: map order may differ
                assert outcome(again, pb.RankHeadsResult) == outcome(finished, pb.RankHeadsResult)
                assert meta(again).kind == Meta.KIND_RANK_HEADS and meta(again).state == Meta.STATE_SUCCEEDED
                lost = get(operations_pb2.GetOperationRequest(name=running.name), timeout=RPC_TIMEOUT)
                assert lost.done and meta(lost).state == Meta.STATE_FAILED and not lost.HasField("response")
                assert lost.error.code == Code.ABORTED.value[0] and lost.error.message == RESTARTED
                assert detail(lost.error, error_details_pb2.Help).links[0].description  # what to do about it
                listed = remote.ListOperations(operations_pb2.ListOperationsRequest(), timeout=RPC_TIMEOUT).operations
                assert [o.name for o in listed] == [running.name, finished.name]
                cancel = lambda: remote.CancelOperation(  # noqa: E731
                    operations_pb2.CancelOperationRequest(name=lost.name), timeout=10
                )
                assert code_of(cancel) == Code.FAILED_PRECONDITION
                remote.DeleteOperation(operations_pb2.DeleteOperationRequest(name=finished.name), timeout=RPC_TIMEOUT)
                gone = lambda: get(operations_pb2.GetOperationRequest(name=finished.name), timeout=10)  # noqa: E731
                assert code_of(gone) == Code.NOT_FOUND
        finally:
            second.stop(grace=0)
    finally:
        release.set()
        first.stop(grace=5)


def test_a_cancel_takes_effect_inside_a_long_step(stub, world, monkeypatch):
    """A Prune cancel stops validation at the next image instead of waiting for prune() to return. Each
    validation image here takes 0.5 s: the whole prune would take over 12 s."""
    import surgeon.validation.validate

    ranked = outcome(wait(stub, stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT)), pb.RankHeadsResult)
    real, started = surgeon.validation.validate._as_image, threading.Event()

    def slow(x):
        started.set()
        time.sleep(0.5)
        return real(x)

    monkeypatch.setattr(surgeon.validation.validate, "_as_image", slow)
    op = stub.Prune(_prune(ranked.run_dir, "long", "L1.H0"), timeout=RPC_TIMEOUT)
    assert started.wait(RPC_TIMEOUT)
    cancelled_at = time.monotonic()
    stub.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name), timeout=RPC_TIMEOUT)
    final = wait(stub, op)
    assert meta(final).state == Meta.STATE_CANCELLED and time.monotonic() - cancelled_at < 5
    assert not (world["exports"] / "long").exists()


def test_serve_checks_its_device_at_start(world, tmp_path):
    from surgeon.core.errors import InvalidInput

    with pytest.raises(InvalidInput, match="unknown device 'tpu'"):
        SurgeonServer(port=0, exports_root=tmp_path / "exports", device="tpu")
