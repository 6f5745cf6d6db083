"""RankHeads end to end: progress, the library's ranking, the statistics cache, generic LRO clients."""

from __future__ import annotations

import time

import pytest

grpc = pytest.importorskip("grpc")

from google.longrunning import operations_pb2, operations_pb2_grpc  # noqa: E402

from surgeon.model.load import TOY_MODEL_DIR  # noqa: E402
from surgeon.ranking.rank import Ranking  # noqa: E402
from surgeon.v1 import surgeon_pb2 as pb  # noqa: E402
from tests.grpc_helpers import (  # noqa: E402
    RPC_TIMEOUT,
    Meta,
    library_ranking,
    meta,
    outcome,
    rank_request,
    wait,
)


def test_rank_heads_streams_progress_and_equals_the_library(stub, world):
    op = stub.RankHeads(rank_request(out="ranked"), timeout=RPC_TIMEOUT)
    assert op.name.startswith("operations/") and not op.done and meta(op).kind == Meta.KIND_RANK_HEADS
    events = list(stub.WatchOperation(pb.WatchOperationRequest(name=op.name), timeout=RPC_TIMEOUT))
    assert events[-1].done and all(not e.done for e in events[:-1])
    stages = [meta(e).stage for e in events]
    assert "loading model" in stages and "head statistics" in stages and stages[-1] == "done"
    statistics = [meta(e).fraction for e in events if meta(e).stage == "head statistics"]
    assert statistics == sorted(statistics) and meta(events[-1]).fraction == 1.0  # a stage's own progress
    final = events[-1]
    assert meta(final).state == Meta.STATE_SUCCEEDED and not final.HasField("error")
    result = outcome(final, pb.RankHeadsResult)
    assert result.run_dir == "ranked" and len(result.heads) == 8 and list(result.layers) == [1, 2]
    assert not result.cached_stats and result.image_count == 24
    assert [h.ccs for h in result.heads] == sorted((h.ccs for h in result.heads), reverse=True)
    for rel in result.files:
        assert (world["exports"] / rel).is_file()
    # the service is a shell over the library: same ranking as the direct call
    expected = library_ranking(world)
    assert result.ranking_sha256 == expected.digest() == Ranking.read(world["exports"] / "ranked").digest()
    # the statistics are cached and shared with the next job; a watch on a finished job yields it once
    again = wait(stub, stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT))
    repeated = outcome(again, pb.RankHeadsResult)
    assert repeated.cached_stats and repeated.ranking_sha256 == expected.digest()
    assert repeated.run_dir.startswith("rank-")
    watched = list(stub.WatchOperation(pb.WatchOperationRequest(name=again.name), timeout=RPC_TIMEOUT))
    assert len(watched) == 1 and watched[0].done


def test_a_generic_operations_client_follows_a_job_to_done(channel, stub):
    """A client that knows only google.longrunning (googleapis-common-protos' stubs) polls a RankHeads job
    the way LRO pollers do and reads its result from `response`."""
    started = stub.RankHeads(rank_request(out="generic"), timeout=RPC_TIMEOUT)
    operations = operations_pb2_grpc.OperationsStub(channel)
    deadline = time.monotonic() + RPC_TIMEOUT
    op = started
    while not op.done:
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.2)
        op = operations.GetOperation(operations_pb2.GetOperationRequest(name=started.name), timeout=RPC_TIMEOUT)
    assert op.name == started.name and not op.HasField("error")
    assert op.response.type_url == "type.googleapis.com/surgeon.v1.RankHeadsResult"
    assert op.metadata.type_url == "type.googleapis.com/surgeon.v1.OperationMetadata"
    ranked = pb.RankHeadsResult()
    op.response.Unpack(ranked)
    assert ranked.run_dir == "generic" and len(ranked.heads) == 8
    # the job-starting RPCs say what their operations hold (AIP-151), for clients that read descriptors
    method = pb.DESCRIPTOR.services_by_name["Surgeon"].methods_by_name["RankHeads"]
    info = method.GetOptions().Extensions[operations_pb2.operation_info]
    assert (info.response_type, info.metadata_type) == ("RankHeadsResult", "OperationMetadata")
    listed = operations.ListOperations(operations_pb2.ListOperationsRequest(name="operations"), timeout=RPC_TIMEOUT)
    assert started.name in [o.name for o in listed.operations]
    operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=started.name), timeout=RPC_TIMEOUT)


@pytest.mark.skipif(not (TOY_MODEL_DIR / "open_clip_config.json").is_file(), reason="the toy model is not trained yet")
def test_toy_defaults_need_no_data(stub):
    done = wait(stub, stub.RankHeads(pb.RankHeadsRequest(images=pb.ImageSource(n_images=64)), timeout=RPC_TIMEOUT))
    assert meta(done).state == Meta.STATE_SUCCEEDED, done.error
    ranked = outcome(done, pb.RankHeadsResult)
    assert ranked.model == "toy" and ranked.image_count == 64
