"""A gRPC job's output is a new run folder: one name under the exports root, never the server's own files (the
operations store and its -wal/-shm) nor a file inside another run; `force` replaces only a surgeon run folder,
checked when the request arrives and again right before the rename."""

from __future__ import annotations

import sqlite3
import threading

import pytest

grpc = pytest.importorskip("grpc")

import surgeon.server.service as service_module  # noqa: E402
from surgeon.server.store import FILENAME  # noqa: E402
from surgeon.v1 import surgeon_pb2 as pb  # noqa: E402
from tests.grpc_helpers import RPC_TIMEOUT, Code, Meta, code_of, meta, rank_request, wait  # noqa: E402


def _validate(out: str) -> pb.ValidateRequest:
    return pb.ValidateRequest(out=out, force=True)  # the toy model on the toy suite: a job that would run


def _records(exports) -> int:
    with sqlite3.connect(exports / FILENAME) as db:
        return db.execute("SELECT COUNT(*) FROM operations").fetchone()[0]


@pytest.mark.parametrize(
    "out",
    [FILENAME, f"{FILENAME}-wal", f"{FILENAME}-shm", "run0/surgery.json", "run0/onnx", ".hidden"],
)
def test_force_never_names_the_servers_files_or_a_file_inside_a_run(stub, world, out):
    exports = world["exports"]
    if not _records(exports):  # a job, so that the store holds a record
        wait(stub, stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT))
    run = exports / "run0"
    (run / "onnx").mkdir(parents=True, exist_ok=True)
    (run / "surgery.json").write_text('{"sha256": {}}')
    (run / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in exports.rglob("*") if p.is_file() and FILENAME not in p.name}
    records = _records(exports)
    code = code_of(lambda: stub.Validate(_validate(out), timeout=RPC_TIMEOUT))
    assert code in (Code.PERMISSION_DENIED, Code.FAILED_PRECONDITION)
    assert (exports / FILENAME).is_file() and _records(exports) == records  # the store is intact
    assert {p: p.read_bytes() for p in before} == before and (run / "onnx").is_dir()


def test_out_is_one_name_under_the_exports_root(stub, world):
    exports = world["exports"]
    for out in ("a/b", str(exports / "a" / "b"), ".", "..", str(exports)):
        assert code_of(lambda out=out: stub.Validate(_validate(out), timeout=RPC_TIMEOUT)) == Code.PERMISSION_DENIED
    assert not (exports / "a").exists()


def test_force_replaces_a_run_folder_but_nothing_else(stub, world):
    exports = world["exports"]
    (exports / "mine").mkdir(exist_ok=True)
    (exports / "mine" / "thesis.tex").write_text("years of work")
    (exports / "file-out").write_text("a file")
    for out in ("mine", "file-out"):
        assert code_of(lambda out=out: stub.RankHeads(rank_request(out=out, force=True), timeout=RPC_TIMEOUT)) == (
            Code.FAILED_PRECONDITION
        )
    assert (exports / "mine" / "thesis.tex").read_text() == "years of work"
    assert (exports / "file-out").read_text() == "a file"
    first = wait(stub, stub.RankHeads(rank_request(out="ranked"), timeout=RPC_TIMEOUT))
    assert meta(first).state == Meta.STATE_SUCCEEDED, first.error
    again = wait(stub, stub.RankHeads(rank_request(out="ranked", force=True), timeout=RPC_TIMEOUT))
    assert meta(again).state == Meta.STATE_SUCCEEDED, again.error  # a run folder: replaced
    assert (exports / "ranked" / "ranking.json").is_file()


def test_a_run_folder_swapped_for_another_folder_while_the_job_runs_is_kept(stub, world, monkeypatch):
    """The check is repeated right before the rename: whatever took the name meanwhile, only a run folder goes."""
    exports = world["exports"]
    done = wait(stub, stub.RankHeads(rank_request(out="swapped"), timeout=RPC_TIMEOUT))
    assert meta(done).state == Meta.STATE_SUCCEEDED, done.error
    started, swapped = threading.Event(), threading.Event()
    real = service_module.run_rank

    def rank_after_swap(*args, **kwargs):
        started.set()
        assert swapped.wait(RPC_TIMEOUT)
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module, "run_rank", rank_after_swap)
    op = stub.RankHeads(rank_request(out="swapped", force=True), timeout=RPC_TIMEOUT)
    assert started.wait(RPC_TIMEOUT)
    for path in (exports / "swapped").iterdir():
        path.unlink()
    (exports / "swapped" / "precious.txt").write_text("keep me")
    swapped.set()
    final = wait(stub, op)
    assert meta(final).state == Meta.STATE_FAILED and final.error.code == Code.FAILED_PRECONDITION.value[0]
    assert "swapped is not a surgeon run folder (it changed while the job ran)" in final.error.message
    assert [p.name for p in (exports / "swapped").iterdir()] == ["precious.txt"]
    assert not list(exports.glob(".swapped*"))
