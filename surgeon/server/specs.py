"""Requests -> surgeon.api specs: every check that needs no model happens here, before a job is queued.

Request fields map to the spec fields of the same names (surgeon.core.options.from_message): each one left unset
takes the spec's default. Paths are never mapped by name: every path a request names is confined here to one
of the server's roots (server/paths.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from surgeon.api import ExportSpec, ModelSpec, PruneSpec, RankSpec, ValidateSpec, ValidationSpec
from surgeon.core import limits
from surgeon.core.errors import InvalidInput, NotFound, PermissionDenied, PreconditionFailed
from surgeon.core.options import OnnxExport, RankMethod, check_bounds, from_message, message_values
from surgeon.core.paths import newest_run, refuse_temporary
from surgeon.inputs.templates import named_templates
from surgeon.inputs.video import VideoFrames
from surgeon.model.load import CHECKPOINT_SUFFIXES, TOY_MODEL_DIR, TOY_MODEL_NAME
from surgeon.ranking.judges.base import JUDGES
from surgeon.results.runfolder import is_run_folder
from surgeon.server.paths import Root, resolve_in
from surgeon.v1 import surgeon_pb2 as pb
from surgeon.validation.validate import ValidationSuite, confined_images

REMOTE_JUDGES = ("lexicon", "embedding")  # llm would make the server call a client-chosen URL
SuiteBuilder = Callable[[str | None], ValidationSuite]  # the validation suite for a model name


@dataclass(frozen=True)
class ServerConfig:
    exports: Root
    models: Root
    data: Root
    device: str | None = None


def check_string_lengths(message: Message) -> None:
    """Every string of a request (nested messages too) within limits.MAX_SPEC_CHARS, before anything else."""
    for field, value in message.ListFields():
        for item in value if field.is_repeated else [value]:
            if field.type == field.TYPE_MESSAGE:
                check_string_lengths(item)
            elif field.type == field.TYPE_STRING:
                limits.text(field.name, item)


class SpecBuilder:
    """Maps each request to its checked spec and the output paths its job will write."""

    def __init__(self, config: ServerConfig):
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

    def model_spec(self, ref: pb.ModelRef, model: str | None, pretrained: str | None) -> ModelSpec:
        return from_message(ModelSpec, ref, model=model, pretrained=pretrained, device=self.config.device)

    def data_file(self, raw: str, what: str) -> Path | None:
        return resolve_in([self.config.data], raw, what, "file") if raw else None

    def images(self, source: pb.ImageSource) -> dict[str, Any]:
        """The image options of a spec (`images`, the count): the count checked, then the folder confined."""
        values = message_values(RankSpec, source)
        toy = source.images in ("", "toy")
        check_bounds(RankSpec(**values, images=None if toy else source.images))
        if toy:
            return values
        folder = resolve_in([self.config.data], source.images, "image folder", "dir")
        self.config.data.check_tree(folder, "image folder")
        return {**values, "images": str(folder)}

    def texts(self, spec: str) -> str | None:
        if spec in ("", "toy", "general"):
            return spec or None
        return str(self.data_file(spec, "text pool"))

    def suite(self, data: pb.ValidationData, language: str = "") -> tuple[ValidationSpec, SuiteBuilder]:
        """The validation spec, and a builder of its suite for a model: file-based suites are built (and their
        manifests checked against the data root) now, the toy's in the job."""
        root = self.config.data
        folder = resolve_in([root], data.data, "validation data", "any") if data.data else None
        if folder is not None and folder.is_dir():
            root.check_tree(folder, "validation data")
        spec = from_message(
            ValidationSpec,
            data,
            data=folder,
            classnames=self.data_file(data.classnames, "classnames"),
            templates=self._templates(data.templates),
            bias_data=self.data_file(data.bias_data, "bias_data"),
            queries=self.data_file(data.queries, "queries"),
            retrieval_data=self._retrieval_data(data.retrieval_data),
            **({"language": language} if language else {}),  # ValidateRequest's, not ValidationData's
        )
        spec.check()
        if spec.is_toy:
            return spec, spec.build  # a real model without data fails there, as in the CLI: no toy fallback
        with confined_images(lambda path: root.check_inside(path, "validation image")):
            suite = spec.build(None)
        retrieval = [r.images.paths if isinstance(r.images, VideoFrames) else r.images for r in suite.retrieval]
        for images in [t.images for t in suite.tasks] + ([suite.bias.images] if suite.bias else []) + retrieval:
            for path in images if isinstance(images, list) else []:
                root.check_inside(path, "validation image")  # manifests may not point outside the data root
        return spec, lambda _model: suite

    def _templates(self, raw: str) -> Path | None:
        """A templates file under the data root, or a named set (surgeon.inputs.templates: cifar10, imagenet-a ...)."""
        if raw and "/" not in raw and named_templates(raw) is not None:
            return Path(raw)
        return self.data_file(raw, "templates")

    def _retrieval_data(self, raw: str) -> Path | None:
        """A retrieval manifest or webdataset folder under the data root."""
        if not raw:
            return None
        path = resolve_in([self.config.data], raw, "retrieval data", "any")
        if path.is_dir():
            self.config.data.check_tree(path, "retrieval data")
        return path

    def out(self, raw: str, kind: str, force: bool, default: Path | None = None) -> Path:
        """A job's output: a new run folder, one name directly under the exports root (`default`: the server's
        own choice, an export's folder inside its run). It can never name the server's files (dot-names: the
        operations store and its -wal/-shm, temporaries) nor anything inside another run; `force` replaces only
        a surgeon run folder (runfolder.is_run_folder), never another file or folder."""
        exports = self.config.exports
        if raw:
            path = exports.folder / self._output_name(raw)
        elif default is not None:
            path = default
        else:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
            path = exports.folder / f"{kind}-{stamp}-{uuid.uuid4().hex[:6]}"
        if path.exists() or path.is_symlink():
            shown = path.relative_to(exports.folder).as_posix()
            if not force:
                raise PreconditionFailed(f"output {shown} already exists", hint="set force to replace it")
            if not is_run_folder(path):
                raise PreconditionFailed(
                    f"output {shown} exists and is not a surgeon run folder: force replaces only those",
                    hint="choose another out name",
                )
        return path

    def _output_name(self, raw: str) -> str:
        """`raw` as one new name under the exports root: a bare name, or an absolute path whose folder is the
        root itself."""
        if "\x00" in raw:
            raise InvalidInput(f"out: invalid path {raw!r}")
        path = Path(raw)
        if path.is_absolute():
            if Path(os.path.realpath(path.parent)) != self.config.exports.folder:
                raise PermissionDenied(f"out {raw!r} is not a name directly under the exports root")
            path = Path(path.name)
        if len(path.parts) != 1 or path.name == "..":
            raise PermissionDenied(
                f"out {raw!r} must be one name directly under the exports root, not a path into another folder",
                hint='outputs are new run folders: name one, e.g. out="my-run"',
            )
        if path.name.startswith("."):
            raise PermissionDenied(
                f"out {raw!r}: names starting with '.' are the server's own (its operations store, temporaries)",
                hint="choose a name that does not start with '.'",
            )
        return path.name

    @staticmethod
    def judge(name: str) -> str:
        name = name or RankMethod().judge
        JUDGES.get(name)
        if name not in REMOTE_JUDGES:
            raise InvalidInput(
                f"the {name} judge is not offered over gRPC", hint=f"choose one of {', '.join(REMOTE_JUDGES)}"
            )
        return name

    # -- specs --

    def rank_spec(self, request: pb.RankHeadsRequest) -> tuple[RankSpec, Path]:
        """The spec and its output folder."""
        model, pretrained = self.model(request.model)
        images = self.images(request.images)
        taxonomy = self.data_file(request.taxonomy, "taxonomy")
        spec = from_message(
            RankSpec,
            request,
            model=self.model_spec(request.model, model, pretrained),
            **images,
            texts=self.texts(request.texts),
            taxonomy=str(taxonomy) if taxonomy else None,
            method=from_message(RankMethod, request, judge=self.judge(request.judge), use_cache=not request.no_cache),
        )
        spec.check()
        out = self.out(request.out, "rank", request.force)
        return replace(spec, out_dir=out), out

    def prune_spec(self, request: pb.PruneRequest) -> tuple[PruneSpec, SuiteBuilder, Path]:
        """The spec, the builder of its validation suite and its output folder."""
        data = request.validation
        spec = from_message(  # the options first: a bad number is INVALID_ARGUMENT whatever the paths say
            PruneSpec,
            request,
            model=self.model_spec(request.model, request.model.model or None, request.model.pretrained or None),
            **({"export": request.export_format} if request.export_format else {}),  # the proto's name
            onnx=from_message(OnnxExport, request),
            images=request.images.images or None,
            **message_values(PruneSpec, request.images),
            method=from_message(RankMethod, request, judge=RankMethod().judge),
            validation=from_message(ValidationSpec, data),
        )
        spec.check()
        model, pretrained = self.model(request.model)
        ranking = None
        if request.ranking:
            roots = [self.config.exports, self.config.data]
            ranking = resolve_in(roots, request.ranking, "ranking")
            if ranking.is_dir():  # resolve the file actually read, so a symlink in the folder cannot lead out
                ranking = resolve_in(roots, f"{request.ranking.rstrip('/')}/ranking.json", "ranking", "file")
        images = self.images(request.images)
        validation, suite_for = self.suite(data)
        spec = replace(
            spec,
            model=self.model_spec(request.model, model, pretrained),
            ranking=ranking,
            onnx=replace(spec.onnx, labels=self.data_file(request.labels, "labels file")),
            **images,
            texts=self.texts(request.texts),
            method=replace(spec.method, judge=RankMethod().judge if request.ranking else self.judge(request.judge)),
            validation=validation,
        )
        spec.check()
        out = self.out(request.out, "prune", request.force)
        return replace(spec, out_dir=out), suite_for, out

    def validate_spec(self, request: pb.ValidateRequest) -> tuple[ValidateSpec, SuiteBuilder, Path | None]:
        """The spec, the builder of its suite and its output folder (None: the report is only returned)."""
        model, pretrained = self.model(request.model)
        validation, suite_for = self.suite(request.validation, request.language)
        out = self.out(request.out, "validate", request.force) if request.out else None
        spec = ValidateSpec(self.model_spec(request.model, model, pretrained), validation, out, request.force)
        spec.check()
        return spec, suite_for, out

    def export_spec(self, request: pb.ExportRequest) -> tuple[ExportSpec, Path]:
        """The spec and its output folder; no run_dir means the newest run folder, as in the CLI."""
        exports = self.config.exports
        spec = from_message(
            ExportSpec, request, run_dir=Path(), onnx=from_message(OnnxExport, request), device=self.config.device
        )
        spec.check()  # the options first, then the run folder
        raw = request.run_dir
        if not raw:
            newest = newest_run(hint="run Prune first, or set run_dir", root=exports.folder)
            raw = newest.relative_to(exports.folder).as_posix()  # resolve_in checks where it leads
        run_dir = resolve_in([exports], raw, "run folder", "dir")
        refuse_temporary(run_dir, "run folder")  # a killed job's hidden folder is no run
        exports.check_tree(run_dir, "run folder")
        onnx = replace(spec.onnx, labels=self.data_file(request.labels, "labels file"))
        spec = replace(spec, run_dir=run_dir, onnx=onnx)
        out = self.out(request.out, "export", request.force, default=spec.target)
        return replace(spec, out_dir=out), out
