"""google.longrunning.Operations over the job manager, and errors as google.rpc.Status with details.

Generic long-running-operation clients (anything built on googleapis-common-protos' operations stubs) follow
surgeon's jobs with GetOperation/WaitOperation and read the result by unpacking `response`, so an Operation
here is google.longrunning.Operation: metadata is a surgeon.v1.OperationMetadata and response the job's
result, both in google.protobuf.Any, and a done Operation has exactly one of error and response."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import NoReturn

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import empty_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from surgeon.core import limits
from surgeon.core.errors import InvalidInput, PreconditionFailed, SurgeonError
from surgeon.server.jobs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job, JobManager, status_code
from surgeon.v1 import surgeon_pb2 as pb

SERVICE_NAME = operations_pb2.DESCRIPTOR.services_by_name["Operations"].full_name
DOMAIN = "surgeon"  # google.rpc.ErrorInfo.domain of every error
NAME = re.compile(r"operations/[0-9a-f]{32}")
Meta = pb.OperationMetadata
KINDS = {
    "RankHeads": Meta.KIND_RANK_HEADS,
    "Prune": Meta.KIND_PRUNE,
    "Validate": Meta.KIND_VALIDATE,
    "Export": Meta.KIND_EXPORT,
}
STATES = {
    QUEUED: Meta.STATE_QUEUED,
    RUNNING: Meta.STATE_RUNNING,
    SUCCEEDED: Meta.STATE_SUCCEEDED,
    FAILED: Meta.STATE_FAILED,
    CANCELLED: Meta.STATE_CANCELLED,
}
MAX_WAIT_S = 600.0


def rpc_status_of(
    code: grpc.StatusCode,
    message: str,
    hint: str = "",
    reason: str = "",
    field: str | None = None,
    extra: Iterable[Message] = (),
) -> status_pb2.Status:
    """google.rpc.Status: ErrorInfo (reason), Help (the hint), BadRequest (the field to blame), then `extra`."""
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason or code.name, domain=DOMAIN))
    if hint:
        status.details.add().Pack(error_details_pb2.Help(links=[error_details_pb2.Help.Link(description=hint)]))
    if field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    for detail in extra:
        status.details.add().Pack(detail)
    return status


def abort(context: grpc.ServicerContext, error: SurgeonError) -> NoReturn:
    """End the RPC with the error's code, its one-line message, and the details in the status trailer."""
    message = limits.clip(str(error.args[0]) if error.args else type(error).__name__)
    status = rpc_status_of(status_code(error), message, limits.clip(error.hint or ""), error.reason, error.field)
    context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("ServicerContext.abort_with_status returns only by raising")  # for the type checker


def _timestamp(seconds: float | None, target) -> None:
    if seconds is not None:
        target.FromDatetime(datetime.fromtimestamp(seconds, tz=timezone.utc))


def operation(job: Job) -> operations_pb2.Operation:
    """The job as a google.longrunning.Operation. A failed job that has a result (a Prune whose gate failed)
    carries it in the error's details, so the operation still has one of error and response."""
    with job.cond:
        op = operations_pb2.Operation(name=job.name, done=job.done)
        meta = Meta(
            kind=KINDS[job.kind], state=STATES[job.state], stage=job.stage, fraction=job.fraction, message=job.message
        )
        _timestamp(job.create_time, meta.create_time)
        _timestamp(job.start_time, meta.start_time)
        _timestamp(job.end_time, meta.end_time)
        op.metadata.Pack(meta)
        if job.error is not None:
            code, message, hint, reason = job.error
            extra = [job.result] if job.result is not None else []
            op.error.CopyFrom(rpc_status_of(code, message, hint, reason, extra=extra))
        elif job.result is not None:
            op.response.Pack(job.result)
        return op


def find_job(jobs: JobManager, name: str, context) -> Job:
    if not name:
        abort(context, InvalidInput("name is required (operations/...)", field="name"))
    if not NAME.fullmatch(name):
        abort(
            context,
            InvalidInput(f"malformed operation name {limits.echo(name)}", hint="operations/<32 hex>", field="name"),
        )
    try:
        return jobs.get(name)
    except SurgeonError as error:
        abort(context, error)


def _filter(text: str, context) -> Callable[[Job], bool]:
    """AIP-160's simplest form: terms `done=true|false`, `metadata.kind=KIND_...`, `metadata.state=STATE_...`
    joined by AND."""
    checks = []
    for term in filter(None, (t.strip() for t in re.split(r"\s+AND\s+", text.strip()))):
        key, _, value = (part.strip().strip('"') for part in term.partition("="))
        if key == "done" and value in ("true", "false"):
            checks.append(lambda job, want=value == "true": job.done == want)
        elif key == "metadata.kind" and value in Meta.Kind.keys():
            checks.append(lambda job, want=Meta.Kind.Value(value): KINDS[job.kind] == want)
        elif key == "metadata.state" and value in Meta.State.keys():
            checks.append(lambda job, want=Meta.State.Value(value): STATES[job.state] == want)
        else:
            hint = "done=true|false, metadata.kind=KIND_PRUNE, metadata.state=STATE_RUNNING, joined by AND"
            abort(context, InvalidInput(f"unsupported filter term {limits.echo(term)}", hint=hint, field="filter"))
    return lambda job: all(check(job) for check in checks)


def page(items: list, page_size: int, page_token: str, context) -> tuple[list, str]:
    """(this page, next_page_token) of a list; the token is the offset of the next page."""
    size = page_size or 100
    if not 0 < size <= 1000:
        abort(context, InvalidInput(f"page_size must be 1..1000, got {size}", field="page_size"))
    start = int(page_token) if page_token.isdigit() else -1 if page_token else 0
    if start < 0:
        abort(context, InvalidInput(f"bad page_token {limits.echo(page_token)}", field="page_token"))
    return items[start : start + size], str(start + size) if start + size < len(items) else ""


class OperationsService(operations_pb2_grpc.OperationsServicer):
    def __init__(self, jobs: JobManager):
        self.jobs = jobs

    def GetOperation(self, request, context):
        return operation(find_job(self.jobs, request.name, context))

    def ListOperations(self, request, context):
        """Newest first; `name` is the collection ("operations" or empty)."""
        if request.name not in ("", "operations"):
            abort(context, InvalidInput(f"unknown collection {request.name!r}", hint="use operations", field="name"))
        keep = _filter(request.filter, context)
        matching = [job for job in self.jobs.newest_first() if keep(job)]
        jobs, token = page(matching, request.page_size, request.page_token, context)
        return operations_pb2.ListOperationsResponse(operations=[operation(job) for job in jobs], next_page_token=token)

    def CancelOperation(self, request, context):
        """The job stops at its next step and removes its partial output; a done one, or one that has published
        its output (the final rename), cannot be cancelled."""
        job = find_job(self.jobs, request.name, context)
        if not job.request_cancel():
            done = f"operation {job.name} is already done (or has published its output)"
            abort(context, PreconditionFailed(f"{done}; nothing to cancel"))
        return empty_pb2.Empty()

    def DeleteOperation(self, request, context):
        job = find_job(self.jobs, request.name, context)
        try:
            self.jobs.delete(job.name)
        except SurgeonError as error:
            abort(context, error)
        return empty_pb2.Empty()

    def WaitOperation(self, request, context):
        job = find_job(self.jobs, request.name, context)
        try:
            timeout = request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else 60.0
        except (OverflowError, ValueError):  # beyond what a timedelta holds
            timeout = -1.0 if request.timeout.seconds < 0 else MAX_WAIT_S
        if timeout < 0:
            abort(context, InvalidInput("timeout must not be negative", field="timeout"))
        timeout = min(timeout, MAX_WAIT_S)
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, max(0.0, remaining - 0.05))
        deadline = time.monotonic() + timeout
        with job.cond:
            while not job.done and context.is_active():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                job.cond.wait(min(left, 1.0))
        return operation(job)
