"""surgeon.v1.Surgeon: rank, prune, validate and export as long-running jobs over gRPC.

A thin shell over surgeon.api, as the CLI is: each RPC maps its request to the job's spec (server/specs.py:
defaults from the spec, every path confined to the server's roots), queues it as a job and renders the result
(server/messages.py). Whatever the spec builder refuses (bad options, unknown models, paths outside the roots)
is an immediate error status; what can only fail while the job runs (a layer spec beyond the model, a gate)
ends up in the Operation's error, with the same code mapping (SurgeonError.grpc_code)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from google.longrunning import operations_pb2
from google.protobuf.message import Message

from surgeon.api import ExportSpec, PruneSpec, RankSpec, ValidateSpec, run_export, run_prune, run_rank, run_validate
from surgeon.core.errors import GateFailed, InvalidInput, SurgeonError
from surgeon.server.catalogue import ModelCatalogue, policy_choices
from surgeon.server.jobs import Job, JobManager, Outcome
from surgeon.server.messages import export_result, prune_result, rank_result, validate_result
from surgeon.server.operations import abort, find_job, operation, page
from surgeon.server.specs import ServerConfig, SpecBuilder, SuiteBuilder, check_string_lengths
from surgeon.v1 import surgeon_pb2 as pb
from surgeon.v1 import surgeon_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Surgeon"].full_name
JobBody = Callable[[Job], Outcome]


class SurgeonService(pb_grpc.SurgeonServicer):
    def __init__(self, config: ServerConfig, jobs: JobManager):
        self.config, self.jobs = config, jobs
        self.specs = SpecBuilder(config)
        self.models = ModelCatalogue(config.models)

    def _submit(
        self,
        context: grpc.ServicerContext,
        kind: str,
        request: Message,
        plan: Callable[[], tuple[JobBody, list[Path]]],
    ) -> operations_pb2.Operation:
        """Check the request, build its job and queue it; a refusal is the RPC's error status."""
        try:
            check_string_lengths(request)
            body, outputs = plan()
            job = self.jobs.submit(kind, body, outputs)
        except SurgeonError as error:
            abort(context, error)
        except OSError as error:  # e.g. a path too long for the file system: still the client's input
            abort(context, InvalidInput(f"{error.strerror or error}: {error.filename or ''}".rstrip(": ")))
        return operation(job)

    # -- jobs --

    def RankHeads(self, request: pb.RankHeadsRequest, context: grpc.ServicerContext) -> operations_pb2.Operation:
        def plan() -> tuple[JobBody, list[Path]]:
            spec, out = self.specs.rank_spec(request)
            return self._rank_job(spec, out), [out]

        return self._submit(context, "RankHeads", request, plan)

    def Prune(self, request: pb.PruneRequest, context: grpc.ServicerContext) -> operations_pb2.Operation:
        def plan() -> tuple[JobBody, list[Path]]:
            spec, suite_for, out = self.specs.prune_spec(request)
            return self._prune_job(spec, suite_for, out), [out]

        return self._submit(context, "Prune", request, plan)

    def Validate(self, request: pb.ValidateRequest, context: grpc.ServicerContext) -> operations_pb2.Operation:
        def plan() -> tuple[JobBody, list[Path]]:
            spec, suite_for, out = self.specs.validate_spec(request)
            return self._validate_job(spec, suite_for, out), [out] if out is not None else []

        return self._submit(context, "Validate", request, plan)

    def Export(self, request: pb.ExportRequest, context: grpc.ServicerContext) -> operations_pb2.Operation:
        def plan() -> tuple[JobBody, list[Path]]:
            spec, out = self.specs.export_spec(request)
            return self._export_job(spec, out), [out]

        return self._submit(context, "Export", request, plan)

    def _rank_job(self, spec: RankSpec, out: Path) -> JobBody:
        def body(job: Job) -> Outcome:
            ranking = run_rank(spec).ranking
            if ranking is None:  # only a non-zero torchrun rank gets none, and the server is no torchrun
                raise RuntimeError("run_rank returned no ranking")
            job.created(out)
            return Outcome(rank_result(ranking, out, self.config.exports))

        return body

    def _prune_job(self, spec: PruneSpec, suite_for: SuiteBuilder, out: Path) -> JobBody:
        def body(job: Job) -> Outcome:
            result = run_prune(spec, suite=suite_for(spec.model.model))
            job.created(out)
            error = None
            if result.gate_failures:
                error = GateFailed("; ".join(result.gate_failures), hint="see report.md; export_anyway exports anyway")
            return Outcome(prune_result(result, spec, out, self.config.exports), error)

        return body

    def _validate_job(self, spec: ValidateSpec, suite_for: SuiteBuilder, out: Path | None) -> JobBody:
        def body(job: Job) -> Outcome:
            report, files = run_validate(spec, suite=suite_for(spec.model.model))
            if out is not None:
                job.created(out)
            return Outcome(validate_result(report, files, out, self.config.exports))

        return body

    def _export_job(self, spec: ExportSpec, out: Path) -> JobBody:
        def body(job: Job) -> Outcome:
            files = run_export(spec)
            job.created(out)
            return Outcome(export_result(files, out, self.config.exports))

        return body

    # -- operations (the rest is google.longrunning.Operations: server/operations.py) --

    def WatchOperation(
        self, request: pb.WatchOperationRequest, context: grpc.ServicerContext
    ) -> Iterator[operations_pb2.Operation]:
        job = find_job(self.jobs, request.name, context)
        seen = -1
        while context.is_active():
            with job.cond:
                if job.version == seen and not job.done:
                    job.cond.wait(0.5)
                changed, seen = job.version != seen, job.version
            if changed:
                op = operation(job)
                yield op
                if op.done:
                    return

    # -- catalogue --

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        models, token = page(self.models.all(), request.page_size, request.page_token, context)
        return pb.ListModelsResponse(models=models, next_page_token=token)

    def ListPolicies(self, request: pb.ListPoliciesRequest, context: grpc.ServicerContext) -> pb.ListPoliciesResponse:
        return policy_choices()
