"""surgeon.v1.Surgeon: rank, prune, validate and export as long-running jobs over gRPC.

A thin shell over surgeon.api, as the CLI is: each RPC maps its request to the job's spec (defaults from the
spec, every path confined to the server's roots) and runs it in a job. Each RPC checks its spec at once (bad options,
unknown models, paths outside the server's roots: an immediate error status), then queues a job and returns
its Operation; what can only fail while the job runs (a layer spec beyond the model, a gate) ends up in the
Operation's error, with the same code mapping (SurgeonError.grpc_code)."""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import grpc
from google.longrunning import operations_pb2
from google.protobuf import json_format, struct_pb2

from surgeon import limits
from surgeon.api import (
    EXPORT_FORMATS,
    ExportSpec,
    ModelSpec,
    PruneSpec,
    RankSpec,
    ValidateSpec,
    ValidationSpec,
    run_export,
    run_prune,
    run_rank,
    run_validate,
)
from surgeon.errors import InvalidInput, NotFound, PreconditionFailed, SurgeonError
from surgeon.hooks import TOWERS
from surgeon.judges.base import JUDGES
from surgeon.load import (
    CHECKPOINT_SUFFIXES,
    TOY_MODEL_DIR,
    TOY_MODEL_NAME,
    cached_pretrained_tags,
)
from surgeon.paths import newest_run, refuse_temporary
from surgeon.policies import POLICIES
from surgeon.rank import Ranking
from surgeon.server.jobs import Job, JobManager, Outcome
from surgeon.server.operations import abort, find_job, operation, page
from surgeon.server.paths import Root, inside, resolve_in
from surgeon.surgery import SURGERIES
from surgeon.v1 import surgeon_pb2 as pb
from surgeon.v1 import surgeon_pb2_grpc as pb_grpc
from surgeon.validate import ValidationSuite

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Surgeon"].full_name
CACHE_CHECK_S = 60.0  # how old ListModels' view of the local weights cache may be
REMOTE_JUDGES = ("lexicon", "embedding")  # llm would make the server call a client-chosen URL
POLICY_INFO = {  # what ListPolicies says about each policy, and the PruneRequest fields it reads
    "top-k": ("the k heads with the highest CCS", ["k"]),
    "bottom-k": ("the k heads with the lowest CCS", ["k"]),
    "high": ("every head with the maximum CCS (= m)", []),
    "low": ("every head with CCS <= 1", []),
    "random": ("k random heads that are not high-CCS (the paper's control)", ["k", "seed", "seeds"]),
    "heads": ("the heads listed in `heads`", ["heads"]),
    "concept": ("every head labelled with `concept`", ["concept"]),
    "threshold": ("every head with CCS >= min_ccs", ["min_ccs"]),
    "debias": (
        "greedy: the heads whose removal lowers MaxSkew most per point of accuracy (needs a bias set)",
        ["k", "max_acc_drop"],
    ),
    "paper-high": ("the paper's high-CCS heads for this model (presets for a few open_clip models)", []),
    "paper-low": ("the paper's low-CCS heads for this model", []),
}
log = logging.getLogger("surgeon.server")


@dataclass(frozen=True)
class Config:
    exports: Root
    models: Root
    data: Root
    device: str | None = None


def _opt(message, field: str, default=None):
    return getattr(message, field) if message.HasField(field) else default


def _struct(data: dict) -> struct_pb2.Struct:
    clean = json.loads(json.dumps(data, default=str), parse_constant=lambda _c: None)  # NaN/inf -> null
    return json_format.ParseDict(clean, struct_pb2.Struct())


def _numbers(summary: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in summary.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


class Requests:
    """Turns requests into job bodies: every check that needs no model happens here, before queueing."""

    def __init__(self, config: Config):
        self.config = config

    # -- inputs --

    def model(self, ref: pb.ModelRef) -> tuple[str | None, str | None]:
        """(model, pretrained) for load_model, every path confined to the models (or exports) root."""
        name, pretrained = ref.model.strip(), ref.pretrained.strip() or None
        if name in ("", TOY_MODEL_NAME):
            if pretrained:
                raise InvalidInput("the toy model takes no pretrained weights")
            if not (TOY_MODEL_DIR / "open_clip_config.json").is_file():
                raise NotFound(
                    "the bundled toy model is missing from this server's installation",
                    hint="name a local-dir: model or an open_clip architecture (ListModels)",
                )
            return None, None
        if name.startswith("local-dir:"):
            if pretrained:
                raise InvalidInput("a local-dir: model carries its own weights; leave pretrained empty")
            raw = name.removeprefix("local-dir:")
            roots = [self.config.models, self.config.exports]
            folder = resolve_in(roots, raw, "model folder", "dir")
            owner = next(r for r in roots if r.path is not None and folder.is_relative_to(r.path))
            owner.check_tree(folder, "model folder")
            if not (folder / "open_clip_config.json").is_file():
                raise NotFound(f"{raw} is not an open_clip local-dir folder (no open_clip_config.json)")
            return f"local-dir:{folder}", None
        import open_clip

        if name not in open_clip.list_models():
            raise NotFound(
                f"unknown model {name!r}",
                hint="use an open_clip architecture name or local-dir:PATH under the models root (ListModels)",
            )
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained and pretrained not in tags:
            if "/" not in pretrained and Path(pretrained).suffix not in CHECKPOINT_SUFFIXES:
                raise NotFound(
                    f"unknown pretrained tag {pretrained!r} for {name}",
                    hint=f"known tags: {', '.join(tags) or 'none'}; or a checkpoint file under the models root",
                )
            pretrained = str(resolve_in([self.config.models], pretrained, "checkpoint", "file"))
        return name, pretrained

    def data_file(self, raw: str, what: str) -> Path | None:
        return resolve_in([self.config.data], raw, what, "file") if raw else None

    def images(self, source: pb.ImageSource) -> tuple[str | None, int | None]:
        n_images = limits.images(_opt(source, "n_images"), source.images in ("", "toy"))
        if source.images in ("", "toy"):
            return None, n_images
        folder = resolve_in([self.config.data], source.images, "image folder", "dir")
        self.config.data.check_tree(folder, "image folder")
        return str(folder), n_images

    def texts(self, spec: str) -> str | None:
        if spec in ("", "toy", "general"):
            return spec or None
        return str(self.data_file(spec, "text pool"))

    def suite(
        self, data: pb.ValidationData, language: str = ""
    ) -> tuple[ValidationSpec, Callable[[str | None], ValidationSuite]]:
        """The validation spec, and a builder of its suite for a model: file-based suites are built (and their
        manifests checked against the data root) now, the toy's in the job."""
        root = self.config.data
        folder = resolve_in([root], data.data, "validation data", "any") if data.data else None
        if folder is not None and folder.is_dir():
            root.check_tree(folder, "validation data")
        files = [self.data_file(getattr(data, f), f) for f in ("classnames", "templates", "bias_data", "queries")]
        spec = ValidationSpec(
            folder,
            *files,
            skew_k=_opt(data, "skew_k", ValidationSpec.skew_k),
            desired=data.desired or None,
            bias_protocol=data.bias_protocol or ValidationSpec.bias_protocol,
            bias_split_by=data.bias_split_by or None,
            language=language or ValidationSpec.language,
        )
        spec.check()
        if spec.is_toy:
            return spec, spec.build  # a real model without data fails there, as in the CLI: no toy fallback
        suite = spec.build(None)
        for images in [t.images for t in suite.tasks] + ([suite.bias.images] if suite.bias else []):
            for path in images if isinstance(images, list) else []:
                root.check_inside(path, "validation image")  # manifests may not point outside the data root
        return spec, lambda _model: suite

    def out(self, raw: str, kind: str, force: bool, default: Path | None = None) -> Path:
        """An output folder (or file) inside the exports root; new ones get a unique name."""
        exports = self.config.exports
        if raw:
            path = exports.resolve(raw, "out")
        elif default is not None:
            path = default
        else:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
            path = exports.path / f"{kind}-{stamp}-{uuid.uuid4().hex[:6]}"
        if path == exports.path:
            raise InvalidInput("out may not be the exports root itself")
        if path.exists() and not force:
            raise PreconditionFailed(f"output {exports.relative(path)} already exists", hint="set force to replace it")
        return path

    @staticmethod
    def judge(name: str) -> str:
        name = name or "lexicon"
        JUDGES.get(name)
        if name not in REMOTE_JUDGES:
            raise InvalidInput(
                f"the {name} judge is not offered over gRPC", hint=f"choose one of {', '.join(REMOTE_JUDGES)}"
            )
        return name

    # -- jobs --

    def rank_heads(self, request: pb.RankHeadsRequest) -> tuple[Callable[[Job], Outcome], list[Path]]:
        model, pretrained = self.model(request.model)
        images, n_images = self.images(request.images)
        taxonomy = self.data_file(request.taxonomy, "taxonomy")
        spec = RankSpec(
            model=ModelSpec(model, pretrained, self.config.device),
            images=images,
            n_images=n_images,
            texts=self.texts(request.texts),
            taxonomy=str(taxonomy) if taxonomy else None,
            judge=self.judge(request.judge),
            layers=request.layers or None,
            m=_opt(request, "m", RankSpec.m),
            span_rank=_opt(request, "rank", RankSpec.span_rank),
            batch_size=_opt(request, "batch_size", RankSpec.batch_size),
            use_cache=not request.no_cache,
            force=request.force,
        )
        spec.check()
        spec = replace(spec, out_dir=self.out(request.out, "rank", request.force))

        def body(job: Job) -> Outcome:
            ranking = run_rank(spec).ranking
            job.created(spec.out_dir)
            return Outcome(self._rank_result(ranking, spec.out_dir))

        return body, [spec.out_dir]

    def _rank_result(self, ranking: Ranking, out: Path) -> pb.RankHeadsResult:
        exports = self.config.exports
        return pb.RankHeadsResult(
            run_dir=exports.relative(out),
            files=[exports.relative(out / f) for f in ("ranking.json", "ranking.csv", "ccs_heatmap.png")],
            model=ranking.model["name"],
            weights_sha256=ranking.model["weights_sha256"],
            layers=ranking.layers,
            m=ranking.m,
            heads=[
                pb.HeadScore(
                    name=h.name,
                    layer=h.layer,
                    head=h.head,
                    label=h.label,
                    ccs=h.ccs,
                    texts=h.texts,
                    verdicts=h.verdicts,
                    variance=h.variance,
                )
                for h in ranking.sorted_heads()
            ],
            ccs_distribution=ranking.ccs_distribution(),
            cached_stats=ranking.cached_stats,
            image_count=ranking.images["count"],
            skipped_images=ranking.images["skipped"],
            ranking_sha256=ranking.digest(),
        )

    def prune(self, request: pb.PruneRequest) -> tuple[Callable[[Job], Outcome], list[Path]]:
        data = request.validation
        spec = PruneSpec(  # the options first: a bad number is INVALID_ARGUMENT whatever the paths say
            model=ModelSpec(request.model.model or None, request.model.pretrained or None, self.config.device),
            policy=request.policy or PruneSpec.policy,
            k=_opt(request, "k"),
            heads=request.heads or None,
            concept=request.concept or None,
            min_ccs=_opt(request, "min_ccs"),
            seed=request.seed,
            seeds=_opt(request, "seeds", PruneSpec.seeds),
            mode=request.mode or PruneSpec.mode,
            tower=request.tower or PruneSpec.tower,
            max_acc_drop=_opt(request, "max_acc_drop"),
            max_skew=_opt(request, "max_skew"),
            min_acc=_opt(request, "min_acc"),
            export_anyway=request.export_anyway,
            export=request.export_format or PruneSpec.export,
            atol=_opt(request, "atol", PruneSpec.atol),
            images=request.images.images or None,
            n_images=_opt(request.images, "n_images"),
            layers=request.layers or None,
            validation=ValidationSpec(skew_k=_opt(data, "skew_k", ValidationSpec.skew_k)),
            force=request.force,
        )
        spec.check()
        model, pretrained = self.model(request.model)
        ranking = None
        if request.ranking:
            roots = [self.config.exports, self.config.data]
            ranking = resolve_in(roots, request.ranking, "ranking")
            if ranking.is_dir():  # resolve the file actually read, so a symlink in the folder cannot lead out
                ranking = resolve_in(roots, f"{request.ranking.rstrip('/')}/ranking.json", "ranking", "file")
        images, n_images = self.images(request.images)
        validation, suite_for = self.suite(data)
        spec = replace(
            spec,
            model=ModelSpec(model, pretrained, self.config.device),
            ranking=ranking,
            labels=self.data_file(request.labels, "labels file"),
            images=images,
            n_images=n_images,
            texts=self.texts(request.texts),
            judge=PruneSpec.judge if request.ranking else self.judge(request.judge),
            validation=validation,
        )
        spec.check()
        if ranking is not None and spec.k is not None:
            heads = len(Ranking.read(ranking).heads)
            if spec.k > heads:
                raise InvalidInput(f"k={spec.k} out of range: choose 1..{heads} (heads in the ranking)")
        out = self.out(request.out, "prune", request.force)
        spec = replace(spec, out_dir=out)

        def body(job: Job) -> Outcome:
            result = run_prune(spec, suite=suite_for(model))
            job.created(out)
            exports = self.config.exports
            message = pb.PruneResult(
                run_dir=exports.relative(out),
                files=sorted(exports.relative(p) for p in out.rglob("*") if p.is_file()),
                policy=spec.policy,
                mode=spec.mode,
                tower=spec.tower,
                heads=[
                    pb.PrunedHead(
                        name=h.head, layer=h.layer, head=h.index, reason=h.reason, label=h.label or "", ccs=h.ccs
                    )
                    for h in result.plan.heads
                ],
                before=_numbers(result.before["summary"]),
                after=_numbers(result.after["summary"]),
                gate_failures=result.gate_failures,
                exported=result.exported,
                plan=_struct(result.plan.to_dict()),
            )
            error = None
            if result.gate_failures:
                from surgeon.errors import GateFailed

                error = GateFailed("; ".join(result.gate_failures), hint="see report.md; export_anyway exports anyway")
            return Outcome(message, error)

        return body, [out]

    def validate(self, request: pb.ValidateRequest) -> tuple[Callable[[Job], Outcome], list[Path]]:
        model, pretrained = self.model(request.model)
        validation, suite_for = self.suite(request.validation, request.language)
        out = self.out(request.out, "validate", request.force) if request.out else None
        spec = ValidateSpec(ModelSpec(model, pretrained, self.config.device), validation, out, request.force)
        spec.check()

        def body(job: Job) -> Outcome:
            report, files = run_validate(spec, suite=suite_for(model))
            message = pb.ValidateResult(
                model=report["model"], summary=_numbers(report["summary"]), report=_struct(report)
            )
            if out is not None:
                job.created(out)
                message.out = self.config.exports.relative(out)
                message.files.extend(self.config.exports.relative(f) for f in files)
            return Outcome(message)

        return body, [out] if out is not None else []

    def export(self, request: pb.ExportRequest) -> tuple[Callable[[Job], Outcome], list[Path]]:
        exports = self.config.exports
        spec = ExportSpec(
            Path(),
            format=request.format or ExportSpec.format,
            atol=_opt(request, "atol", ExportSpec.atol),
            force=request.force,
            device=self.config.device,
        )
        spec.check()  # the options first, then the run folder
        raw = request.run_dir
        if not raw:  # as the CLI: the newest run folder
            newest = newest_run(hint="run Prune first, or set run_dir", root=exports.path)
            raw = newest.relative_to(exports.path).as_posix()  # resolve_in checks where it leads
        run_dir = resolve_in([exports], raw, "run folder", "dir")
        refuse_temporary(run_dir, "run folder")  # a killed job's hidden folder is no run
        exports.check_tree(run_dir, "run folder")
        spec = replace(spec, run_dir=run_dir, labels=self.data_file(request.labels, "labels file"))
        out = self.out(request.out, "export", request.force, default=spec.target)
        spec = replace(spec, out_dir=out)

        def body(job: Job) -> Outcome:
            files = run_export(spec)
            job.created(out)
            return Outcome(pb.ExportResult(out_dir=exports.relative(out), files=[exports.relative(p) for p in files]))

        return body, [out]


def _check_strings(message) -> None:
    """Every string of a request (nested messages too) within limits.MAX_SPEC_CHARS, before anything else."""
    for field, value in message.ListFields():
        for item in value if field.is_repeated else [value]:
            if field.type == field.TYPE_MESSAGE:
                _check_strings(item)
            elif field.type == field.TYPE_STRING:
                limits.text(field.name, item)


class SurgeonService(pb_grpc.SurgeonServicer):
    def __init__(self, config: Config, jobs: JobManager):
        self.config, self.jobs, self.requests = config, jobs, Requests(config)
        self._architectures: list[pb.ModelInfo] | None = None
        self._listed_at = 0.0

    # -- helpers --

    def _submit(self, context, kind: str, plan: Callable[[], tuple], request) -> operations_pb2.Operation:
        try:
            _check_strings(request)
            body, reserved = plan()
            job = self.jobs.submit(kind, body, reserved)
        except SurgeonError as error:
            abort(context, error)
        except OSError as error:  # e.g. a path too long for the file system: still the client's input
            abort(context, InvalidInput(f"{error.strerror or error}: {error.filename or ''}".rstrip(": ")))
        return operation(job)

    # -- jobs --

    def RankHeads(self, request, context):
        return self._submit(context, "RankHeads", lambda: self.requests.rank_heads(request), request)

    def Prune(self, request, context):
        return self._submit(context, "Prune", lambda: self.requests.prune(request), request)

    def Validate(self, request, context):
        return self._submit(context, "Validate", lambda: self.requests.validate(request), request)

    def Export(self, request, context):
        return self._submit(context, "Export", lambda: self.requests.export(request), request)

    # -- operations (the rest is google.longrunning.Operations: server/operations.py) --

    def WatchOperation(self, request, context) -> Iterator[operations_pb2.Operation]:
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

    def ListModels(self, request, context):
        models = [
            pb.ModelInfo(
                name=TOY_MODEL_NAME,
                kind=pb.ModelInfo.KIND_TOY,
                available=(TOY_MODEL_DIR / "open_clip_config.json").is_file(),
                description="the bundled toy CLIP (the default)",
            )
        ]
        models += self._local_dirs()
        models += self._architecture_list()
        models, token = page(models, request.page_size, request.page_token, context)
        return pb.ListModelsResponse(models=models, next_page_token=token)

    def _local_dirs(self, max_depth: int = 3) -> list[pb.ModelInfo]:
        root = self.config.models
        if root.path is None:
            return []
        found = []
        for dirpath, dirnames, filenames in os.walk(root.path):  # symlinked folders are not followed
            rel = Path(dirpath).relative_to(root.path)
            dirnames.sort()
            if len(rel.parts) >= max_depth:
                dirnames[:] = []
            if "open_clip_config.json" not in filenames or not rel.parts:
                continue
            if not inside(os.path.realpath(os.path.join(dirpath, "open_clip_config.json")), root.path):
                continue
            found.append(
                pb.ModelInfo(
                    name=f"local-dir:{rel.as_posix()}",
                    kind=pb.ModelInfo.KIND_LOCAL_DIR,
                    available=any(Path(f).suffix in CHECKPOINT_SUFFIXES for f in filenames),
                    description="open_clip folder under the models root",
                )
            )
        return found

    def _architecture_list(self) -> list[pb.ModelInfo]:
        """Rebuilt at most once a minute: weights copied into the hub cache show up without a restart."""
        if self._architectures is None or time.monotonic() - self._listed_at > CACHE_CHECK_S:
            import open_clip

            entries = []
            for name in open_clip.list_models():
                cfg = open_clip.get_model_config(name) or {}
                if "timm_model_name" in cfg.get("vision_cfg", {}) or "multimodal_cfg" in cfg:
                    continue  # surgeon needs an open_clip VisionTransformer tower
                cached = cached_pretrained_tags(name)
                entries.append(
                    pb.ModelInfo(
                        name=name,
                        kind=pb.ModelInfo.KIND_ARCHITECTURE,
                        available=bool(cached),
                        pretrained_tags=open_clip.list_pretrained_tags_by_model(name),
                        cached_pretrained_tags=cached,
                        description="open_clip architecture (weights from the local hub cache or the models root)",
                    )
                )
            self._architectures, self._listed_at = entries, time.monotonic()
        return self._architectures

    def ListPolicies(self, request, context):
        policies = []
        for name in POLICIES.names():
            description, options = POLICY_INFO.get(name, ("", []))
            if not description:
                doc = (POLICIES.get(name).__doc__ or "").strip()
                description = doc.splitlines()[0] if doc else ""
            policies.append(pb.PolicyInfo(name=name, description=description, options=options))
        return pb.ListPoliciesResponse(
            policies=policies,
            modes=SURGERIES.names(),
            towers=list(TOWERS),
            judges=[j for j in JUDGES.names() if j in REMOTE_JUDGES],
            export_formats=list(EXPORT_FORMATS),
        )


class TokenAuth(grpc.ServerInterceptor):
    """`authorization: Bearer <token>` on every call but health checks (load balancers and Docker probe those)."""

    OPEN = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        if details.method.startswith(self.OPEN):
            return continuation(details)
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(sent.encode(), self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None

        def deny(request_or_iterator, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata authorization)")

        if handler.response_streaming:
            if handler.request_streaming:
                return grpc.stream_stream_rpc_method_handler(deny)
            return grpc.unary_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)
