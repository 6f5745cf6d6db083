"""Jobs as operations: the queue's bounds, cancelling running and waiting jobs, clashing outputs."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

grpc = pytest.importorskip("grpc")

from google.longrunning import operations_pb2  # noqa: E402

import surgeon.server.service as service_module  # noqa: E402
from surgeon.v1 import surgeon_pb2 as pb  # noqa: E402
from tests.grpc_helpers import (  # noqa: E402
    RPC_TIMEOUT,
    Code,
    Meta,
    code_of,
    meta,
    outcome,
    rank_request,
    validation,
    wait,
    watch_until,
)


def test_twenty_concurrent_requests_finish_or_are_refused(stub, world, server, gate):
    gate.set()
    first = wait(stub, stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT))
    baseline = outcome(first, pb.RankHeadsResult).ranking_sha256
    gate.clear()
    barrier = threading.Barrier(20)

    def submit(_):
        barrier.wait(timeout=30)
        try:
            return stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT)
        except grpc.RpcError as error:
            return error.code()

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(submit, range(20)))
    accepted = [a for a in answers if isinstance(a, operations_pb2.Operation)]
    refused = [a for a in answers if not isinstance(a, operations_pb2.Operation)]
    assert set(refused) <= {Code.RESOURCE_EXHAUSTED}
    assert len(accepted) == 6 and len(refused) == 14  # 2 running + 4 waiting (max-jobs 2, queue 4)
    gate.set()
    finished = [wait(stub, op) for op in accepted]
    assert all(meta(op).state == Meta.STATE_SUCCEEDED for op in finished)
    assert {outcome(op, pb.RankHeadsResult).ranking_sha256 for op in finished} == {baseline}
    assert len({outcome(op, pb.RankHeadsResult).run_dir for op in finished}) == 6
    known = {
        o.name for o in stub.ListOperations(operations_pb2.ListOperationsRequest(), timeout=RPC_TIMEOUT).operations
    }
    assert {op.name for op in accepted} <= known  # none lost


def test_cancel_stops_at_the_next_step_and_leaves_nothing(stub, world, monkeypatch):
    import surgeon.inputs.images

    real_open = surgeon.inputs.images.open_image

    def slow_open(path):
        time.sleep(0.1)
        return real_open(path)

    monkeypatch.setattr(surgeon.inputs.images, "open_image", slow_open)
    op = stub.RankHeads(rank_request(out="cancelled", no_cache=True, batch_size=1), timeout=RPC_TIMEOUT)
    seen = watch_until(stub, op, lambda e: meta(e).stage == "head statistics" and meta(e).message.startswith("3/"))
    assert not seen.done
    stub.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name), timeout=RPC_TIMEOUT)
    final = wait(stub, op, timeout=30)
    assert meta(final).state == Meta.STATE_CANCELLED and final.error.code == Code.CANCELLED.value[0]
    assert not final.HasField("response")
    assert not (world["exports"] / "cancelled").exists()
    assert not list(world["exports"].glob(".cancelled*"))
    # a finished operation cannot be cancelled
    cancel_again = lambda: stub.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name), timeout=10)  # noqa: E731
    assert code_of(cancel_again) == Code.FAILED_PRECONDITION


def test_a_cancel_after_publishing_is_refused_and_keeps_the_output(stub, world, monkeypatch):
    """Once the output is renamed into place the job is done: removing it could not bring back what a force
    replaced, so a late cancel is refused."""
    written, release = threading.Event(), threading.Event()
    real = service_module.run_prune

    def prune_then_hold(*args, **kwargs):
        result = real(*args, **kwargs)
        written.set()
        release.wait(RPC_TIMEOUT)
        return result

    monkeypatch.setattr(service_module, "run_prune", prune_then_hold)
    ranked = wait(stub, stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT))
    request = pb.PruneRequest(
        model=pb.ModelRef(model="local-dir:tiny"),
        ranking=outcome(ranked, pb.RankHeadsResult).run_dir,
        policy="heads",
        heads="L1.H0",
        validation=validation(),
        out="half",
    )
    op = stub.Prune(request, timeout=RPC_TIMEOUT)
    assert written.wait(RPC_TIMEOUT) and (world["exports"] / "half" / "plan.json").is_file()
    cancel = lambda: stub.CancelOperation(  # noqa: E731
        operations_pb2.CancelOperationRequest(name=op.name), timeout=RPC_TIMEOUT
    )
    assert code_of(cancel) == Code.FAILED_PRECONDITION
    release.set()
    final = wait(stub, op)
    assert meta(final).state == Meta.STATE_SUCCEEDED
    assert (world["exports"] / "half" / "plan.json").is_file()


def test_cancel_a_waiting_job(stub, gate):
    running = [stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT) for _ in range(2)]
    waiting = stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT)
    stub.CancelOperation(operations_pb2.CancelOperationRequest(name=waiting.name), timeout=RPC_TIMEOUT)
    cancelled = stub.GetOperation(operations_pb2.GetOperationRequest(name=waiting.name), timeout=RPC_TIMEOUT)
    assert cancelled.done and meta(cancelled).state == Meta.STATE_CANCELLED
    # its place in the queue (4 here) is free again at once
    more = [stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT) for _ in range(4)]
    assert code_of(lambda: stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT)) == Code.RESOURCE_EXHAUSTED
    gate.set()
    assert all(meta(wait(stub, op)).state == Meta.STATE_SUCCEEDED for op in running + more)


def test_nested_outputs_clash_like_equal_ones(tmp_path):
    """A Prune replacing run1 would delete what an Export writes into run1/export-onnx."""
    from surgeon.core.errors import PreconditionFailed
    from surgeon.server.jobs import JobManager

    jobs = JobManager(max_jobs=1)
    release = threading.Event()
    jobs.submit("Prune", lambda job: release.wait(10), [tmp_path / "run1"])
    try:
        for path in (tmp_path / "run1", tmp_path / "run1" / "export-onnx", tmp_path):
            with pytest.raises(PreconditionFailed, match="another operation"):
                jobs.submit("Export", lambda job: None, [path])
        jobs.submit("Export", lambda job: None, [tmp_path / "run2" / "export-onnx"])  # unrelated: accepted
    finally:
        release.set()
