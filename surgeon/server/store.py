"""Operation records in SQLite (stdlib) under the exports root, so a restarted server still answers for them.

A pipeline polling its operation across a server restart gets the record instead of NOT_FOUND: finished jobs
keep their result, and jobs that were queued or running when the server stopped are reported as failed
(ABORTED) with a message saying so. Records are written on state changes, not on progress."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import grpc
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.symbol_database import Default as default_symbols

from surgeon.server.jobs import FAILED, QUEUED, RUNNING, Job, Outcome
from surgeon.v1 import surgeon_pb2  # noqa: F401  (registers the result message types)

FILENAME = ".surgeon-operations.sqlite"  # a dot-name: never taken for a run folder
COLUMNS = (
    "name",
    "kind",
    "state",
    "stage",
    "fraction",
    "message",
    "create_time",
    "start_time",
    "end_time",
    "error",
    "result_field",
    "result_type",
    "result",
)
SCHEMA = f"CREATE TABLE IF NOT EXISTS operations ({', '.join(COLUMNS)}, PRIMARY KEY (name))"
RESTARTED = "the server restarted before the job finished; its partial output was removed"


class OperationStore:
    """One SQLite file; every method is safe to call from any thread."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(SCHEMA)

    def save(self, job: Job) -> None:
        """Called under job.cond on each state change."""
        # the error: [code name, message, hint, reason]
        error = None if job.error is None else json.dumps([job.error[0].name, *job.error[1:]])
        field, kind, blob = None, None, None
        if job.result is not None:  # the result message (google.longrunning: Operation.response, or an error detail)
            field, kind, blob = "response", job.result.DESCRIPTOR.full_name, job.result.SerializeToString()
        row: tuple[object, ...] = (job.name, job.kind, job.state, job.stage, job.fraction, job.message, job.create_time)
        row += (job.start_time, job.end_time, error, field, kind, blob)
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO operations VALUES ({', '.join('?' * len(COLUMNS))})", row)

    def load(self, name: str) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM operations WHERE name = ?", (name,)).fetchone()
        return None if row is None else _job(row)

    def all(self) -> list[Job]:
        """Newest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM operations ORDER BY create_time DESC").fetchall()
        return [_job(row) for row in rows]

    def delete(self, name: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM operations WHERE name = ?", (name,))

    def abort_unfinished(self) -> int:
        """At start: the jobs a previous server left queued or running failed (ABORTED). Returns how many."""
        error = json.dumps([grpc.StatusCode.ABORTED.name, RESTARTED, "submit the request again", "ABORTED"])
        with self._lock:
            cursor = self._db.execute(
                "UPDATE operations SET state = ?, stage = ?, error = ?, end_time = ? WHERE state IN (?, ?)",
                (FAILED, FAILED.lower(), error, time.time(), QUEUED, RUNNING),
            )
        return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _recorded(job: Job) -> Outcome:
    """The body of a job loaded from the store: it ran under an earlier server and never runs again."""
    raise RuntimeError(f"{job.name} is the record of an earlier server's job")


def _job(row: tuple) -> Job:
    record = dict(zip(COLUMNS, row, strict=True))
    job = Job(record["kind"], body=_recorded, reserved=[])
    job.name, job.state, job.stage = record["name"], record["state"], record["stage"]
    job.fraction, job.message = record["fraction"], record["message"]
    job.create_time, job.start_time, job.end_time = record["create_time"], record["start_time"], record["end_time"]
    if record["error"]:
        code, message, hint, *reason = json.loads(record["error"])  # records written before reasons: 3 items
        code = getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN)
        job.error = (code, message, hint, reason[0] if reason else code.name)
    if record["result_type"]:
        cls = GetMessageClass(default_symbols().pool.FindMessageTypeByName(record["result_type"]))
        job.result = cls.FromString(record["result"])
    return job
