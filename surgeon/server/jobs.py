"""Jobs behind the long-running operations: a fixed pool of worker threads, a bounded queue, progress,
cancellation at the next step, and a drain for shutdown.

A job body is a function of the Job; library calls inside it report their steps through surgeon.core.progress
(an Observer that calls `job.step(...)`), which is also where a
cancelled job stops (JobCancelled). Paths a job has written are registered with `job.created(path)` and are
removed when the job is cancelled or fails afterwards, so a stopped job leaves nothing half-written."""

from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import Message

from surgeon.core.errors import NotFound, PreconditionFailed, SurgeonError
from surgeon.core.limits import clip, echo
from surgeon.core.paths import publish_check, remove_path
from surgeon.core.progress import observed
from surgeon.results.runfolder import is_run_folder

log = logging.getLogger("surgeon.server")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
Status = tuple[grpc.StatusCode, str, str, str]  # an operation's error: code, message, hint, reason
NOTIFY_EVERY_S = 0.2  # progress inside a stage wakes watchers at most this often (or every 1%)


class ResourceExhausted(SurgeonError):
    grpc_code = "RESOURCE_EXHAUSTED"


class Unavailable(SurgeonError):
    grpc_code = "UNAVAILABLE"


class JobCancelled(Exception):
    """Raised inside a job at its next step once cancellation was requested."""


def status_code(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, SurgeonError):
        return getattr(grpc.StatusCode, error.grpc_code, grpc.StatusCode.INTERNAL)
    if isinstance(error, JobCancelled):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


class Job:
    def __init__(self, kind: str, body: Callable[[Job], Outcome], reserved: Sequence[Path]):
        self.name = f"operations/{uuid.uuid4().hex}"
        self.kind = kind
        self.body = body
        self.reserved = list(reserved)  # output paths no other job may target while this one lives
        self.cond = threading.Condition()
        self.state = QUEUED
        self.stage, self.fraction, self.message = "queued", 0.0, ""
        self.create_time = time.time()
        self.start_time: float | None = None
        self.end_time: float | None = None
        self.error: Status | None = None
        self.result: Message | None = None  # the result message
        self.version = 0
        self._cancel = False
        self._committed = False  # an output was renamed into place: too late to cancel without losing data
        self._cancel_reason = "cancelled"
        self._created: list[Path] = []
        self._last_notify = 0.0
        self.on_state: Callable[[Job], None] | None = None  # called under self.cond on each state change

    @property
    def done(self) -> bool:
        return self.state in (SUCCEEDED, FAILED, CANCELLED)

    # -- called from the job body --

    def step(self, stage: str, fraction: float, message: str = "") -> None:
        """Report progress; stop here when the job was cancelled."""
        with self.cond:
            if self._cancel:
                raise JobCancelled()
            new_stage = stage != self.stage
            now = time.monotonic()
            significant = new_stage or fraction - self.fraction >= 0.01 or now - self._last_notify >= NOTIFY_EVERY_S
            self.stage, self.fraction, self.message = stage, max(0.0, min(1.0, fraction)), message
            if significant:
                self._last_notify = now
                self._bump()

    def _commit(self, final: Path) -> None:
        """Right before an output is renamed into place (replacing, with force, a previous one): the last
        point where a cancel can stop the job and leave the previous output as it was. A cancel that comes
        later is refused: the output is published. Whatever took `final` since the request was checked, only a
        surgeon run folder is replaced: never the server's own files or anything else."""
        with self.cond:  # reentrant: _stop_point takes it again
            self._stop_point()
            if (final.exists() or final.is_symlink()) and not is_run_folder(final):
                raise PreconditionFailed(
                    f"{final.name} is not a surgeon run folder (it changed while the job ran): "
                    "force replaces only those",
                    hint="choose another out name",
                )
            self._committed = True

    def _stop_point(self) -> None:
        with self.cond:
            if self._cancel:
                raise JobCancelled()

    def created(self, path: Path) -> None:
        """`path` now exists because of this job: remove it if the job ends cancelled or failed."""
        with self.cond:
            self._created.append(path)

    # -- called by the manager and the service --

    def _bump(self) -> None:
        self.version += 1
        self.cond.notify_all()

    def request_cancel(self, why: str = "cancelled by the client") -> bool:
        """Returns False when the job is already done or has published its output."""
        with self.cond:
            if self.done or self._committed:
                return False
            if self.state == QUEUED:
                self._finish(CANCELLED, _cancelled(why))
            else:
                self._cancel = True
                self.stage, self._cancel_reason = "cancelling", why
                self._bump()
            return True

    def run(self) -> None:
        with self.cond:
            if self.done:
                return
            self.state, self.start_time, self.stage = RUNNING, time.time(), "starting"
            self._bump()
            self._record()
        log.info("%s %s started", self.kind, self.name)
        try:
            with publish_check(self._commit), observed(_JobObserver(self)):
                outcome = self.body(self)
            with self.cond:
                if self._cancel:
                    raise JobCancelled()
                self.result = outcome.message
                if outcome.error is None:
                    self._finish(SUCCEEDED, None)
                else:
                    self._finish(FAILED, _status(outcome.error))
        except JobCancelled:
            with self.cond:
                self._finish(CANCELLED, _cancelled(self._cancel_reason))
        except SurgeonError as error:
            with self.cond:
                self._finish(FAILED, _status(error))
        except ImportError as error:  # an optional dependency (the onnx extra) is not installed
            with self.cond:
                message = f"this server lacks {error.name or 'a module'} needed for the job: {error}"
                status = (grpc.StatusCode.FAILED_PRECONDITION, message, "install the onnx extra", "MISSING_DEPENDENCY")
                self._finish(FAILED, status)
        except Exception as error:  # a bug, not a bad request: keep the traceback in the server log
            log.error("%s %s crashed:\n%s", self.kind, self.name, traceback.format_exc())
            with self.cond:
                message = f"internal error: {type(error).__name__}: {error}"
                self._finish(FAILED, (grpc.StatusCode.INTERNAL, message, "", "INTERNAL"))
        log.info("%s %s %s", self.kind, self.name, self.state.lower())

    def _finish(self, state: str, error: Status | None) -> None:
        """Under self.cond. A job that failed without a result, or was cancelled, keeps none of its outputs."""
        if self.done:
            return
        if state == CANCELLED or (state == FAILED and self.result is None):
            self.result = None
            self.remove_created()
        self.state, self.error, self.end_time = state, error, time.time()
        if state == SUCCEEDED:
            self.stage, self.fraction, self.message = "done", 1.0, ""
        else:
            self.stage, self.message = state.lower(), ""
        self._bump()
        self._record()

    def _record(self) -> None:
        if self.on_state is not None:
            try:
                self.on_state(self)
            except Exception:  # noqa: BLE001 - a full disk must not fail the job: the record is a convenience
                log.warning("could not record %s:\n%s", self.name, traceback.format_exc())

    def remove_created(self) -> None:
        for path in self._created:
            remove_path(path)
        self._created.clear()


class _JobObserver:
    """The library's steps as operation metadata: `stage` names the step, `fraction` and `message` its progress
    (items done of the step's total); a cancelled job stops at the next step or stop point."""

    def __init__(self, job: Job):
        self.job = job

    def step(self, stage: str, done: int, total: int | None) -> None:
        fraction = done / total if total else 0.0
        self.job.step(stage, fraction, f"{done}/{total}" if total else (f"{done}" if done else ""))

    def check(self) -> None:
        self.job._stop_point()


def _status(error: SurgeonError) -> Status:
    message = str(error.args[0]) if error.args else type(error).__name__
    return status_code(error), clip(message), clip(error.hint or ""), error.reason


def _cancelled(why: str) -> Status:
    return grpc.StatusCode.CANCELLED, why, "", "CANCELLED"


@dataclass
class Outcome:
    """What a job body returns: the Operation's result message, and an error to report with it (a Prune whose
    gate failed: the run folder exists, the job failed)."""

    message: Message
    error: SurgeonError | None = None


class JobManager:
    """`max_jobs` workers; at most `queue_size` jobs waiting; finished jobs kept (newest `retention`)."""

    def __init__(self, max_jobs: int = 2, queue_size: int = 16, retention: int = 1000, store=None):
        if max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        if queue_size < 0:
            raise ValueError("queue_size must be >= 0")
        self.max_jobs, self.queue_size, self.retention = max_jobs, queue_size, retention
        self.store = store  # server.store.OperationStore: records that outlive this process (None: memory only)
        self._lock = threading.Condition()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._queue: collections.deque[Job] = collections.deque()
        self._running: set[Job] = set()
        self.draining = False
        self._workers = [
            threading.Thread(target=self._work, name=f"surgeon-job-{i}", daemon=True) for i in range(max_jobs)
        ]
        for worker in self._workers:
            worker.start()

    def submit(self, kind: str, body: Callable[[Job], Outcome], reserved: Sequence[Path] = ()) -> Job:
        with self._lock:
            if self.draining:
                raise Unavailable("the server is shutting down and takes no new jobs", hint="retry on another replica")
            waiting = sum(1 for job in self._queue if not job.done)  # cancelled ones leave at the next pop
            if waiting + len(self._running) >= self.max_jobs + self.queue_size:
                raise ResourceExhausted(
                    f"the job queue is full ({len(self._running)} running, {waiting} waiting)",
                    hint="retry later (with backoff)",
                )
            busy = [p for job in self._jobs.values() if not job.done for p in job.reserved]
            # nested paths clash too: a Prune replacing run1 would delete an Export writing run1/export-onnx
            clash = next((p for p in reserved for b in busy if p == b or p in b.parents or b in p.parents), None)
            if clash is not None:
                raise PreconditionFailed(f"another operation is writing {clash.name}", hint="choose another out path")
            job = Job(kind, body, reserved)
            if self.store is not None:
                job.on_state = self.store.save
                with job.cond:
                    job._record()
            self._jobs[job.name] = job
            self._queue.append(job)
            self._lock.notify()
        log.info("%s %s queued", kind, job.name)
        return job

    def get(self, name: str) -> Job:
        with self._lock:
            job = self._jobs.get(name)
        if job is None and self.store is not None:  # finished long ago, or before a restart
            job = self.store.load(name)
        if job is None:
            raise NotFound(f"unknown operation {echo(name)}", hint="ListOperations lists the ones this server knows")
        return job

    def newest_first(self) -> list[Job]:
        with self._lock:
            jobs = list(reversed(self._jobs.values()))
        if self.store is not None:
            live = {job.name for job in jobs}
            jobs += [job for job in self.store.all() if job.name not in live]
            jobs.sort(key=lambda job: job.create_time, reverse=True)
        return jobs

    def delete(self, name: str) -> None:
        job = self.get(name)
        with job.cond:
            if not job.done:
                raise PreconditionFailed(f"operation {name} is not done", hint="cancel it first, or wait for it")
        with self._lock:
            self._jobs.pop(name, None)
        if self.store is not None:
            self.store.delete(name)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._lock.wait()
                job = self._queue.popleft()
                if job.done:  # cancelled while waiting
                    continue
                self._running.add(job)
            try:
                job.run()
            finally:
                with self._lock:
                    self._running.discard(job)
                    self._retire()
                    self._lock.notify_all()

    def _retire(self) -> None:
        """Under self._lock: forget the oldest finished jobs beyond `retention`."""
        finished = [name for name, job in self._jobs.items() if job.done]
        for name in finished[: max(0, len(finished) - self.retention)]:
            del self._jobs[name]

    def running(self) -> list[Job]:
        with self._lock:
            return list(self._running)

    def drain(self, grace: float, cancel_wait: float = 10.0) -> list[Job]:
        """Take no new jobs, cancel the waiting ones, give running ones `grace` seconds to finish, then cancel
        them and wait up to `cancel_wait` seconds for them to stop. Returns the jobs that did not stop; their
        registered outputs and temporary folders are removed."""
        with self._lock:
            self.draining = True
            waiting = list(self._queue)
            self._queue.clear()
        for job in waiting:
            job.request_cancel("the server is shutting down")
        self._wait_idle(grace)
        for job in self.running():
            job.request_cancel("the server is shutting down (grace period over)")
        self._wait_idle(cancel_wait)
        stuck = self.running()
        for job in stuck:
            with job.cond:
                for path in job.reserved:
                    for tmp in path.parent.glob(f".{path.name}.tmp-*"):  # atomic_dir folders, atomic_write files
                        remove_path(tmp)
                job.remove_created()
                job._finish(CANCELLED, _cancelled("the server shut down before the job stopped"))
        return stuck

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._lock.wait(left)
