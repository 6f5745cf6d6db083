"""`surgeon study`: the paper's tables as one declared grid (models x policies x modes x data sets).

A study file (TOML) names the models, the policies (random ones with seeds), the surgery modes, the
classification sets and the bias sets. Every cell (one model, one pruned head set, one mode, one data set) is
computed once and stored as its own file under `OUT/cells/`, keyed by what decides its number: the model's
forward identity, the policy and its options and seed, the mode, the data set's content and, for policies
that read a ranking, the ranking's inputs. So an interrupted study resumes, a study that gains a column
computes only that column, and `--shard i/n` (every n-th cell) plus `--collect` spreads a study over any
scheduler. Within one model, the ranking and each data set's cached residual prefix (sweep's Evaluator) are
shared by all its cells: that is where a study beats separate `surgeon prune` runs."""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from surgeon.core import limits
from surgeon.core.errors import CorruptInput, InvalidInput, NotFound, PreconditionFailed, SurgeonError
from surgeon.core.fallback import data_for, is_toy_model
from surgeon.core.options import BIAS_PROTOCOL, IMAGES, N_IMAGES, SKEW_K, TEXTS, RankMethod, from_table, part
from surgeon.core.paths import atomic_file, atomic_write_text, finite, read_json_object
from surgeon.core.progress import kept_on_interrupt, progress_bar, say
from surgeon.inputs.video import VideoFrames
from surgeon.model.heads import HeadRef
from surgeon.model.load import CHECKPOINT_SUFFIXES, LoadedModel, check_activation, normalised_source
from surgeon.model.surgery import SURGERIES
from surgeon.pruning.prune import operate, policy_options, select_heads
from surgeon.results.bias import below_chance
from surgeon.results.records import ValidationSummary, bias_floor
from surgeon.results.retrieval import HEADLINE as RETRIEVAL_HEADLINE
from surgeon.selection.policies import POLICIES, Policy, check_preset, policy_names

TABLE_SCHEMA = "surgeon.studies.study/1"
PERCENT_KINDS = ("accuracy", "retrieval")  # columns shown in %: top-1, and text -> image/video R@1
CELL_SCHEMA = "surgeon.studies.study-cell/1"
BASELINE = "none"  # the unpruned model: the row every change is measured against
# a measuring policy (debias) selects on a search split, so its cells would need held-out halves of every data set
STUDY_POLICIES = tuple(policy_names(lambda p: not p.measures))

if TYPE_CHECKING:
    from surgeon.ranking.rank import Ranking


# ---- the study file ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    pretrained: str | None
    label: str
    activation: str | None = None  # gelu or quickgelu (load.ACTIVATIONS); None: the config's, the tag's, or assumed
    preset: tuple[str, str] | None = None  # (model, tag) whose paper head lists the preset policies read


@dataclass(frozen=True)
class PolicySpec:
    policy: str
    label: str
    k: int | None = None
    seed: int = 0
    seeds: int = 1
    heads: str | None = None
    concept: str | None = None
    min_ccs: int | None = None

    @property
    def selector(self) -> Policy:
        return POLICIES.get(self.policy)

    def options(self, seed: int) -> dict:
        """The options that decide the heads (part of a cell's key)."""
        chosen = {"k": self.k, "seed": seed, "heads": self.heads, "concept": self.concept, "min_ccs": self.min_ccs}
        return {k: v for k, v in chosen.items() if v is not None}


@dataclass(frozen=True)
class DataSpec:
    name: str
    kind: str  # "accuracy" (zero-shot classification), "bias" or "retrieval" (image <-> text, text -> video)
    path: str  # "toy:<factor>" / "toy", or a file or folder
    classnames: str | None = None
    templates: str | None = None
    queries: str | None = None
    n: int | None = None  # toy: images per task / scenes of the probe
    skew_k: int = SKEW_K.field()
    desired: str | None = None
    protocol: str = BIAS_PROTOCOL.field()
    frames: int = limits.DEFAULT_VIDEO_FRAMES  # retrieval: frames per video
    # bias: the manifest's group column, the column naming each image's query, the group folding
    # (surgeon.validation.validate.BiasColumns: --bias-attribute, --bias-within, --bias-groups)
    attribute: str | None = None
    within: str | None = None
    groups: str | None = None


@dataclass(frozen=True)
class StudyRank:
    """The study's [rank] table: how the ranking that ranking-based policies read is made."""

    images: str | None = IMAGES.field()  # None: the toy world's images for the toy model; a real model names them
    n_images: int | None = N_IMAGES.field()
    texts: str | None = TEXTS.field()
    method: RankMethod = part(RankMethod)  # its keys sit in the [rank] table itself


@dataclass(frozen=True)
class Study:
    name: str
    models: list[ModelSpec]
    policies: list[PolicySpec]
    modes: list[str]
    data: list[DataSpec]
    rank: StudyRank
    source: Path
    tables: tuple[TableView, ...] = ()  # [[tables]]: the paper's tables, one per experiment; none: one of all

    def views(self) -> tuple[TableView, ...]:
        return self.tables or (TableView(self.name, tuple(range(len(self.policies))), tuple(range(len(self.data)))),)


@dataclass(frozen=True)
class TableView:
    """One table of a study: some of its policies (rows, after the unpruned model) on some of its data sets
    (columns). Only the cells some table shows are computed."""

    name: str
    policies: tuple[int, ...]
    data: tuple[int, ...]


def _fail(where: str, message: str) -> InvalidInput:
    return InvalidInput(f"{where}: {message}", field=where)


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table"}


class _Table:
    """One TOML table being read: every key is checked once, unknown ones are refused with their path."""

    def __init__(self, raw: Any, where: str):
        if not isinstance(raw, dict):
            raise _fail(where, f"must be a table, got {type(raw).__name__}")
        self.raw, self.where = raw, where
        self.seen: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type | tuple, default: Any = None, required: bool = False) -> Any:
        self.seen.add(key)
        if key not in self.raw:
            if required:
                raise _fail(self.path(key), "is required")
            return default
        value = self.raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(_KIND_NAMES[k] for k in kinds)
            raise _fail(self.path(key), f"must be {names}, got {limits.echo(value)}")
        if isinstance(value, str):
            limits.text(self.path(key), value)
        return value

    @overload
    def count(self, key: str, low: int, high: int, default: int) -> int: ...
    @overload
    def count(self, key: str, low: int, high: int, default: None = None) -> int | None: ...
    def count(self, key: str, low: int, high: int, default: int | None = None) -> int | None:
        value = self.get(key, int, default)
        if value is not None and not low <= value <= high:
            raise _fail(self.path(key), f"must be in {low}..{high:,}, got {value}")
        return value

    def table_list(self, key: str, required: bool = True) -> list[_Table]:
        items = self.get(key, list, [], required)
        if required and not items:
            raise _fail(self.path(key), "must list at least one entry")
        return [_Table(item, f"{self.path(key)}[{i}]") for i, item in enumerate(items)]

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        if unknown:
            raise _fail(self.path(unknown[0]), f"unknown key (known: {', '.join(sorted(self.seen))})")


@overload
def _path(value: str, base: Path, where: str) -> str: ...
@overload
def _path(value: None, base: Path, where: str) -> None: ...
@overload
def _path(value: str | None, base: Path, where: str) -> str | None: ...
def _path(value: str | None, base: Path, where: str) -> str | None:
    """Environment variables expanded (the paper study's data paths are `$VAR`s the user sets), `~`, and
    relative paths taken from the study file's folder."""
    if value is None or value == "toy" or value.startswith("toy:"):
        return value
    missing = [m for m in re.findall(r"\$\{?(\w+)\}?", value) if m not in os.environ]
    if missing:
        raise _fail(where, f"environment variable {missing[0]} is not set (in {limits.echo(value)})")
    path = Path(os.path.expanduser(os.path.expandvars(value)))
    return str(path if path.is_absolute() else base / path)


def _model_path(value: str, base: Path, where: str) -> str:
    if value.startswith("local-dir:"):
        return "local-dir:" + _path(value.removeprefix("local-dir:"), base, where)
    return value


def parse_study(path: Path) -> Study:
    """Read and check a study file; every error names the field (`models[1].pretrained: ...`)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the surgery extra installs tomli on 3.10
        import tomli as tomllib
    try:
        if Path(path).stat().st_size > limits.MAX_TEXT_FILE_BYTES:
            raise InvalidInput(f"study file {path} is larger than {limits.MAX_TEXT_FILE_BYTES:,} bytes")
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(f"study file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise InvalidInput(f"study file {path} is not valid TOML: {err}") from None
    base = Path(path).resolve().parent
    top = _Table(raw, "")
    name = top.get("name", str, Path(path).stem)
    modes = top.get("modes", list, ["zero"])
    for i, mode in enumerate(modes):
        if not isinstance(mode, str) or mode not in SURGERIES.names():
            raise _fail(f"modes[{i}]", f"unknown mode {limits.echo(mode)} (choose {', '.join(SURGERIES.names())})")
    if len(set(modes)) != len(modes) or not modes:
        raise _fail("modes", "must list distinct modes")
    rank = _rank(_Table(top.get("rank", dict, {}), "rank"), base)
    models = []
    for t in top.table_list("models"):
        model = _model_path(t.get("name", str, required=True), base, t.path("name"))
        pretrained = t.get("pretrained", str)
        if pretrained is not None and pretrained.endswith(CHECKPOINT_SUFFIXES):
            pretrained = _path(pretrained, base, t.path("pretrained"))
        label = t.get("label", str, normalised_source(model) + (f"/{Path(pretrained).name}" if pretrained else ""))
        activation = t.get("activation", str)
        try:
            check_activation(activation)
        except InvalidInput as err:
            raise _fail(t.path("activation"), f"{err.args[0]} ({err.hint})") from None
        preset = t.get("preset", str)
        try:
            key = check_preset(preset, model) if preset is not None else None
        except SurgeonError as err:
            raise _fail(t.path("preset"), f"{err.args[0]} ({err.hint})") from None
        models.append(ModelSpec(model, pretrained, label, activation, key))
        t.done()
    policies = [_policy(t) for t in top.table_list("policies")]
    data = [_data(t, "accuracy", base) for t in top.table_list("data", required=False)]
    data += [_data(t, "bias", base) for t in top.table_list("bias", required=False)]
    data += [_data(t, "retrieval", base) for t in top.table_list("retrieval", required=False)]
    if not data:
        raise _fail("data", "a study needs at least one data set ([[data]]), bias set ([[bias]]) or retrieval set")
    for what, labels in (
        ("models", [m.label for m in models]),
        ("policies", [p.label for p in policies]),
        ("data", [d.name for d in data]),
    ):
        dup = next((x for x in labels if labels.count(x) > 1), None)
        if dup is not None:
            raise _fail(what, f"two entries are called {limits.echo(dup)}; give each a distinct label/name")
    tables = tuple(_view(t, policies, data) for t in top.table_list("tables", required=False))
    top.done()
    study = Study(name, models, policies, modes, data, rank, Path(path), tables)
    size = count_cells(study)  # counted, not built: a 100 kB file can declare 10^8 cells
    if size > limits.MAX_STUDY_CELLS:
        raise _fail("policies", f"the study has {size:,} cells; at most {limits.MAX_STUDY_CELLS:,}")
    return study


def _view(t: _Table, policies: list[PolicySpec], data: list[DataSpec]) -> TableView:
    """A [[tables]] entry: its policies and data sets by label and name."""
    chosen = []
    for key, labels in (("policies", [p.label for p in policies]), ("data", [d.name for d in data])):
        names = t.get(key, list, required=True)
        unknown = next((n for n in names if n not in labels), None)
        if unknown is not None or not names:
            raise _fail(t.path(key), f"{limits.echo(unknown)} is not one of the study's {key}: {', '.join(labels)}")
        chosen.append(tuple(labels.index(n) for n in names))
    view = TableView(t.get("name", str, required=True), chosen[0], chosen[1])
    t.done()
    return view


def _policy(t: _Table) -> PolicySpec:
    policy = t.get("policy", str, required=True)
    if policy not in STUDY_POLICIES:
        raise _fail(t.path("policy"), f"unknown policy {limits.echo(policy)} (choose {', '.join(STUDY_POLICIES)})")
    seeds = t.count("seeds", 1, limits.MAX_SEEDS, 1)
    if seeds > 1 and not POLICIES.get(policy).seeded:
        seeded = ", ".join(policy_names(lambda p: p.seeded))
        raise _fail(t.path("seeds"), f"{policy} is deterministic: seeds repeats {seeded}")
    spec = PolicySpec(
        policy=policy,
        label=t.get("label", str, policy),
        k=t.count("k", 1, limits.MAX_K),
        seed=t.count("seed", 0, limits.MAX_SEED, 0),
        seeds=seeds,
        heads=t.get("heads", str),
        concept=t.get("concept", str),
        min_ccs=t.count("min_ccs", 0, limits.MAX_CCS),
    )
    t.done()
    return spec


def _data(t: _Table, kind: str, base: Path) -> DataSpec:
    path = _path(t.get("path", str, required=True), base, t.path("path"))
    if kind == "accuracy" and path == "toy":
        raise _fail(t.path("path"), "name one toy task, e.g. toy:shape (toy alone is the bias probe)")
    spec = DataSpec(
        name=t.get("name", str, required=True),
        kind=kind,
        path=path,
        classnames=_path(t.get("classnames", str), base, t.path("classnames")),
        templates=_templates(t.get("templates", str), base, t.path("templates")),
        queries=_path(t.get("queries", str), base, t.path("queries")) if kind == "bias" else None,
        n=t.count("n", 1, limits.MAX_TOY_IMAGES) if path.startswith("toy") else None,
        skew_k=t.count("skew_k", 1, limits.MAX_SKEW_K, SKEW_K.default) if kind == "bias" else SKEW_K.default,
        desired=t.get("desired", str) if kind == "bias" else None,
        protocol=t.get("protocol", str, BIAS_PROTOCOL.default) if kind == "bias" else BIAS_PROTOCOL.default,
        attribute=t.get("attribute", str) if kind == "bias" else None,
        within=t.get("within", str) if kind == "bias" else None,
        groups=t.get("groups", str) if kind == "bias" else None,
        frames=t.count("frames", 1, limits.MAX_FRAMES_PER_VIDEO, limits.DEFAULT_VIDEO_FRAMES)
        if kind == "retrieval"
        else limits.DEFAULT_VIDEO_FRAMES,
    )
    if kind == "bias" and not path.startswith("toy") and spec.queries is None and spec.within is None:
        raise _fail(t.path("queries"), "a bias manifest needs its neutral queries file")
    if spec.n is not None and not path.startswith("toy"):
        raise _fail(t.path("n"), "sizes only the toy world's sets")
    t.done()
    return spec


def _templates(value: str | None, base: Path, where: str) -> str | None:
    """A named template set (cifar10, food101, imagenet-a ...: surgeon.inputs.templates) as it is, else a file."""
    from surgeon.inputs.templates import named_templates

    if value is not None and "/" not in value and named_templates(value) is not None:
        return value
    return _path(value, base, where)


def _rank(t: _Table, base: Path) -> StudyRank:
    """The [rank] table: StudyRank's options and the ranking method's, under their field names."""
    images = _path(t.get("images", str), base, t.path("images"))
    spec = from_table(StudyRank, t, images=images, method=from_table(RankMethod, t))
    t.done()
    return spec


# ---- cells ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    model: int  # index into study.models
    policy: int | None  # index into study.policies; None: the baseline (unpruned) row
    seed: int
    mode: str
    data: int  # index into study.data


def count_cells(study: Study) -> int:
    """len(cells(study)), by arithmetic: what the cell bound is checked against before anything is built."""
    rows = 1 + len(study.modes) * sum(p.seeds for p in study.policies)  # the baseline, then every seed x mode
    return len(study.models) * rows * len(study.data)


def cells(study: Study) -> list[Cell]:
    """Every cell a table shows, in the one order shards count in: model, then row (baseline first), seed, mode,
    data set."""
    views = study.views()
    shown = {(p, d) for v in views for p in v.policies for d in v.data}
    data = sorted({d for v in views for d in v.data})
    out = []
    for m in range(len(study.models)):
        out += [Cell(m, None, 0, BASELINE, d) for d in data]
        for p, spec in enumerate(study.policies):
            for seed in range(spec.seed, spec.seed + spec.seeds):
                out += [Cell(m, p, seed, mode, d) for mode in study.modes for d in data if (p, d) in shown]
    return out


def shard_cells(all_cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """`--shard i/n` (0-based): cells i, i+n, i+2n..."""
    return all_cells if shard is None else all_cells[shard[0] :: shard[1]]


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _images_identity(images) -> object:
    """Content of an image array; path, size and modification time of files (as folder_images' identity)."""
    from surgeon.inputs.images import files_digest
    from surgeon.inputs.webdata import ShardImages

    if isinstance(images, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
    files = images.shards if isinstance(images, ShardImages) else images
    return {"files": files_digest(list(files)), "count": len(images)}


def data_identity(suite) -> str:
    """What decides a data set's number: its images, labels, class names, templates (bias: groups, queries,
    k, the desired distribution and the protocol)."""
    if suite.retrieval:
        r = suite.retrieval[0]
        images = r.images.paths if isinstance(r.images, VideoFrames) else r.images
        payload = {"images": _images_identity(images), "captions": r.captions, "owners": r.owners.tolist(),
                   "frames": r.frames}  # fmt: skip
    elif suite.tasks:
        t = suite.tasks[0]
        payload = {"images": _images_identity(t.images), "labels": t.labels.tolist(), "names": t.classnames,
                   "templates": t.templates}  # fmt: skip
    else:
        b = suite.bias
        payload = {"images": _images_identity(b.images), "groups": b.groups.tolist(), "names": b.group_names,
                   "queries": b.queries, "k": b.k, "desired": b.desired, "protocol": b.protocol}  # fmt: skip
        if b.ranked_by is not None:  # absent otherwise, so the identities of earlier sets stay as they were
            payload["ranked_by"] = b.ranked_by.tolist()
    return _digest(payload)


def load_data(spec: DataSpec):
    """A one-set ValidationSuite for a data set of the study: files and the toy counterfactuals through
    `build_suite`, as `--data`/`--bias-data` are read; one toy task or the toy probe at the study's size."""
    from surgeon.results.bias import bias_protocol
    from surgeon.validation.validate import (
        TOY_COUNTERFACTUALS,
        BiasColumns,
        ValidationSuite,
        build_suite,
        retrieval_set,
        toy_suite,
    )

    if spec.kind == "retrieval":
        retrieval = retrieval_set(Path(spec.path), spec.frames, spec.n)
        return ValidationSuite([], None, "files", f"{spec.name}: {spec.path}", [retrieval])
    if spec.path.startswith("toy") and spec.path != TOY_COUNTERFACTUALS:
        if spec.kind == "bias":
            suite = toy_suite(n_scenes=spec.n)
            _, desired = bias_protocol(spec.protocol, spec.desired)
            assert suite.bias is not None  # the toy suite always has its probe
            bias = replace(suite.bias, k=spec.skew_k, desired=desired, protocol=spec.protocol)
            return ValidationSuite([], bias, "toy", f"toy world bias probe ({spec.name})")
        factor = spec.path.removeprefix("toy:")
        tasks = {t.name.removeprefix("toy/"): t for t in toy_suite(n_per_task=spec.n).tasks}
        if factor not in tasks:
            raise InvalidInput(
                f"data {spec.name}: no toy task {limits.echo(factor)}", hint=f"tasks: {', '.join(tasks)}"
            )
        return ValidationSuite([tasks[factor]], None, "toy", f"toy world: test split, {factor}")
    path, classnames, templates, queries = (
        Path(p) if p else None for p in (spec.path, spec.classnames, spec.templates, spec.queries)
    )
    suite = build_suite(
        data=path if spec.kind == "accuracy" else None,
        classnames=classnames,
        templates=templates,
        bias_data=path if spec.kind == "bias" else None,
        queries=queries,
        skew_k=spec.skew_k,
        desired=spec.desired,
        protocol=spec.protocol,
        bias_columns=BiasColumns(spec.attribute, spec.within, spec.groups),
    )
    if spec.path == TOY_COUNTERFACTUALS:
        return replace(suite, description=f"toy world counterfactuals ({spec.name})")
    return suite


def _is(value: object, kind: type | tuple[type, ...]) -> bool:
    return not isinstance(value, bool) and isinstance(value, kind)


#: a stored cell's fields and their types: a file that lacks one is not a cell (one line, never a KeyError)
CELL_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema": str,
    "model_label": str,
    "row": str,
    "seed": int,
    "mode": str,
    "data": str,
    "heads": list,
}
#: a computed cell's too; a failed one carries "error" (why it could not be computed) instead
RESULT_FIELDS: dict[str, type | tuple[type, ...]] = {"metric": str, "value": (int, float)}


def identity(study: Study, cell: Cell) -> dict:
    """What a stored cell says it is: its model's label, row, seed, mode and data set."""
    return {
        "model_label": study.models[cell.model].label,
        "row": BASELINE if cell.policy is None else study.policies[cell.policy].label,
        "seed": cell.seed,
        "mode": cell.mode,
        "data": study.data[cell.data].name,
    }


class CellStore:
    """One JSON file per cell under `folder`, written atomically: a cell is either whole or absent. A cell that
    could not be computed is stored with its reason ("error"): the table shows it, a rerun tries it again."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def has(self, key: str) -> bool:
        """A cell is stored (computed or failed)."""
        return self.path(key).is_file()

    def finished(self, key: str, identity: dict) -> bool:
        """A computed cell is stored: a failed, corrupt or foreign one is computed again."""
        if not self.has(key):
            return False
        try:
            return "error" not in self.get(key, identity)
        except SurgeonError:
            return False

    def get(self, key: str, identity: dict) -> dict:
        """The cell stored under `key`, which must be the cell `identity` names (its row, seed, mode, data and
        model label): a file copied under another cell's name would put that cell's numbers in this one's place."""
        record = read_json_object(self.path(key), "study cell")
        wanted = {**CELL_FIELDS, **({} if isinstance(record.get("error"), str) else RESULT_FIELDS)}
        wrong = [
            k for k, kind in wanted.items() if isinstance(record.get(k), bool) or not isinstance(record.get(k), kind)
        ]
        if wrong or record["schema"] != CELL_SCHEMA:
            raise CorruptInput(
                f"{self.path(key)} is not a {CELL_SCHEMA} cell (missing or wrong: {', '.join(wrong) or 'schema'})",
                hint="delete it: the next `surgeon study` run (without --collect) computes that cell again",
            )
        other = {k: record[k] for k, v in identity.items() if record[k] != v}
        if other:
            raise CorruptInput(
                f"{self.path(key)} holds another cell ({', '.join(f'{k} {v!r}' for k, v in other.items())}), "
                f"not {identity['row']} / {identity['data']}",
                hint="delete it: the next `surgeon study` run (without --collect) computes that cell again",
            )
        return record

    def put(self, key: str, record: dict) -> None:
        atomic_write_text(self.path(key), json.dumps(record, indent=2, sort_keys=True))


# ---- running ----------------------------------------------------------------------------------------------


@dataclass
class StudyRun:
    """What one `surgeon study` call did: cells computed now, cells found finished, and the table (None for
    a shard, which leaves assembling to `--collect`)."""

    out: Path
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "row / data: reason" of every cell that could not be computed
    table: dict | None = None  # the first (or only) table
    files: list[Path] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)  # every table ([[tables]])


class _ModelWork:
    """One model's shared state: its ranking (made once) and, per data set, an Evaluator holding the residual
    prefix of its images (computed once, reused by every pruned head set)."""

    def __init__(
        self, study: Study, model: ModelSpec, loaded: LoadedModel, quiet: bool, rankings: Path, sources: tuple | None
    ):
        self.study, self.model, self.loaded, self.quiet, self.rankings = study, model, loaded, quiet, rankings
        self.sources = sources  # (images, pool) of the ranking, read before the model loaded
        self._ranking: Ranking | None = None
        self._rank_inputs: dict | None = None
        self._selections: dict[tuple[int, int], list[HeadRef]] = {}
        self._evaluators: dict[int, Any] = {}
        self._pruned: dict[tuple[int, int, str], LoadedModel] = {}

    def rank_inputs(self) -> dict:
        """What the ranking depends on besides the model: part of the key of cells whose policy reads it."""
        if self._rank_inputs is None:
            r = self.study.rank
            self.images, self.pool = self.sources or rank_sources(self.study, self.loaded.name)
            self._rank_inputs = {"images": self.images.identity, "pool": self.pool.digest, **r.method.identity()}
        return self._rank_inputs

    def ranking(self) -> Ranking | None:
        """Made once per model and kept in the study folder (rankings/), so a resumed study ranks no model twice."""
        from surgeon.ranking.rank import Ranking, rank_heads

        if self._ranking is None:
            path = self.rankings / f"{_digest([self.loaded.forward_identity, self.rank_inputs()])}.json"
            if path.is_file():
                kept = Ranking.read(path)
                kept.check_model(self.loaded)
                self._ranking = kept
                return kept
            r = self.study.rank
            self._ranking = rank_heads(self.loaded, self.images, self.pool, r.method, quiet=self.quiet)
            if self._ranking is not None:
                atomic_write_text(path, json.dumps(self._ranking.to_dict(), indent=2))
        return self._ranking

    def heads(self, p: int, seed: int) -> list[HeadRef]:
        if (p, seed) not in self._selections:
            spec = self.study.policies[p]
            ranking = self.ranking() if spec.selector.reads_ranking else None
            options = policy_options(self.loaded, self.model.preset, **spec.options(seed))
            try:
                self._selections[(p, seed)] = select_heads(ranking, spec.selector, options).heads
            except SurgeonError as err:  # say which entry of the study, on which model
                where = f"policies[{p}] ({spec.label}) on {self.loaded.identity}"
                raise type(err)(f"{where}: {err.args[0]}", hint=err.hint, field=f"policies[{p}]") from None
        return self._selections[(p, seed)]

    def evaluate(self, cell: Cell, suite, first_layer: int) -> tuple[list[HeadRef], dict]:
        from surgeon.validation.validate import Evaluator

        heads = [] if cell.policy is None else self.heads(cell.policy, cell.seed)
        if cell.mode in (BASELINE, "zero"):  # zero ablation of a cached prefix: equal to a pruned forward
            if cell.data not in self._evaluators:
                self._evaluators[cell.data] = Evaluator(self.loaded, suite, first_layer=first_layer)
            return heads, self._evaluators[cell.data].evaluate(heads)
        assert cell.policy is not None  # the baseline is zero ablation of no heads, above
        return heads, Evaluator(self._pruned_model(cell.policy, cell), suite, cache=False).evaluate()

    def _pruned_model(self, policy: int, cell: Cell) -> LoadedModel:
        """hard/mean surgery (prune's) on a copy of the model, made once per head set and mode; mean ablation
        averages over the ranking's images."""
        key = (policy, cell.seed, cell.mode)
        if key not in self._pruned:
            pruned = replace(
                self.loaded,
                model=copy.deepcopy(self.loaded.model),
                pruned_layout=copy.deepcopy(self.loaded.pruned_layout),
            )
            if cell.mode == "mean":
                self.rank_inputs()
            reference = self.images if cell.mode == "mean" else None
            operate(pruned, self.heads(policy, cell.seed), cell.mode, reference=reference)
            self._pruned = {key: pruned}  # one pruned copy at a time: a ViT-L copy is ~1.7 GB
        return self._pruned[key]


def rank_sources(study: Study, model: str) -> tuple:
    """(images, text pool) the study's [rank] table names for this model, read and checked (cheap: no model)."""
    from surgeon.inputs.images import resolve_images
    from surgeon.inputs.pools import load_pool

    r = study.rank
    try:
        images = data_for(model, r.images, "images to rank it on")
    except InvalidInput as err:  # said of the study's entry
        raise _fail("rank.images", err.args[0]) from None
    return resolve_images(images, r.n_images, model), load_pool(r.texts, is_toy_model(model))


def reads_ranking(study: Study, cell: Cell) -> bool:
    """The cell's policy reads the ranking, or its mode (mean) averages over the ranking's images."""
    return cell.mode == "mean" or (cell.policy is not None and study.policies[cell.policy].selector.reads_ranking)


def preset_owner(loaded: LoadedModel, preset: tuple[str, str] | None) -> list:
    """[model, tag] whose paper head lists a preset policy reads on `loaded` (part of its cells' keys)."""
    options = policy_options(loaded, preset)
    return [options.model_name, options.pretrained]


def cell_key(study: Study, cell: Cell, loaded: LoadedModel, data_id: str, rank_inputs: dict | None) -> str:
    spec = None if cell.policy is None else study.policies[cell.policy]
    model = study.models[cell.model]
    payload = {
        "model": loaded.forward_identity,
        "preset": preset_owner(loaded, model.preset) if spec is not None and spec.selector.preset else None,
        "policy": BASELINE if spec is None else spec.policy,
        "options": {} if spec is None else spec.options(cell.seed),
        "random_k": spec.selector.default_k if spec is not None and spec.k is None else None,
        "ranking": rank_inputs,
        "mode": cell.mode,
        "data": data_id,
    }
    return _digest(payload)


def _headline(result: dict) -> tuple[str, float]:
    entry = result["results"][0]
    if entry["task"] in RETRIEVAL_HEADLINE:
        return RETRIEVAL_HEADLINE[entry["task"]], entry["metrics"][RETRIEVAL_HEADLINE[entry["task"]]]
    if entry["task"] == "bias":
        skew = ValidationSummary.from_dict(result["summary"]).headline_skew()
        assert skew is not None  # a bias entry always has its MaxSkew in the summary
        return skew
    return "acc1", entry["metrics"]["acc1"]


def compute_study(
    study: Study,
    out: Path,
    shard: tuple[int, int] | None = None,
    collect: bool = False,
    device: str | None = None,
    quiet: bool = True,
    plot_format: str = "png",
) -> StudyRun:
    """Compute the missing cells of this shard (all cells without one) and, unless sharded, write the table.
    `collect` computes nothing: it assembles the table from the stored cells, or says how many are missing.
    A cell that cannot be computed (a policy that selects nothing on this model...) is stored with its reason
    and the others go on; the table shows it and `PartialResult` says so once the table is written."""
    run = StudyRun(out)
    finished = f"{out / 'cells'}; run the same command to resume"
    with kept_on_interrupt(lambda: f"{len(run.computed) + len(run.reused)} finished cell(s) are kept in {finished}"):
        return _compute(study, out, shard, collect, device, quiet, plot_format, run)


def _compute(
    study: Study,
    out: Path,
    shard: tuple[int, int] | None,
    collect: bool,
    device: str | None,
    quiet: bool,
    plot_format: str,
    run: StudyRun,
) -> StudyRun:
    from surgeon.model.load import load_model

    store = CellStore(out / "cells")
    wanted = shard_cells(cells(study), None if collect else shard)
    keys: dict[Cell, str] = {}
    by_model: dict[int, list[Cell]] = {}
    for cell in wanted:
        by_model.setdefault(cell.model, []).append(cell)
    # every data set is read and checked before any model loads: a bad manifest costs seconds, not a ranking
    used = sorted({cell.data for cell in wanted})
    suites = {d: load_data(study.data[d]) for d in used}  # data set index -> its one-set ValidationSuite
    data_ids = {d: data_identity(suites[d]) for d in used}
    ranked = sorted({c.model for c in wanted if reads_ranking(study, c)})
    sources = {m: rank_sources(study, study.models[m].name) for m in ranked}  # ranking inputs checked now too
    say(plan_line(study, wanted), quiet)
    with progress_bar("study cells", len(wanted), quiet) as advance:
        for m, model_cells in by_model.items():
            spec = study.models[m]
            loaded = load_model(spec.name, spec.pretrained, device, spec.activation)
            work = _ModelWork(study, spec, loaded, quiet, out / "rankings", sources.get(m))
            pending = []
            for cell in model_cells:
                # the ranking's inputs key cells that read a ranking; mean ablation averages over the same images
                inputs = work.rank_inputs() if reads_ranking(study, cell) else None
                keys[cell] = cell_key(study, cell, work.loaded, data_ids[cell.data], inputs)
                if store.has(keys[cell]) if collect else store.finished(keys[cell], identity(study, cell)):
                    run.reused.append(keys[cell])
                    advance(1)
                else:
                    pending.append(cell)
            if collect or not pending:
                continue
            first_layer = min((h.layer for c in pending for h in _selected(work, c)), default=0)
            for cell in pending:
                record = {"schema": CELL_SCHEMA, "model": work.loaded.record(), **identity(study, cell), "heads": []}
                try:
                    heads, result = work.evaluate(cell, suites[cell.data], first_layer)
                except SurgeonError as err:  # this cell cannot be computed; the others can
                    record["error"] = limits.clip(err.args[0] + (f" ({err.hint})" if err.hint else ""), 500)
                else:
                    metric, value = _headline(result)
                    record |= {"heads": [h.name for h in heads], "metric": metric, "value": value, "result": result}
                store.put(keys[cell], record)
                run.computed.append(keys[cell])
                advance(1)
    if shard is not None and not collect:
        run.failed = _failures({c: store.get(keys[c], identity(study, c)) for c in wanted})
        return run
    missing = [c for c in cells(study) if not store.has(keys[c])]
    if missing:
        raise PreconditionFailed(
            f"{len(missing)} of {len(keys)} cells are not computed yet",
            hint=f"run every shard first (surgeon study {study.source} --shard i/n)",
        )
    records = {c: store.get(keys[c], identity(study, c)) for c in cells(study)}
    run.failed = _failures(records)
    run.tables = [build_table(study, records, view) for view in study.views()]
    run.table = run.tables[0]
    run.files = write_tables(run.tables, out, plot_format)
    return run


def _selected(work: _ModelWork, cell: Cell) -> list[HeadRef]:
    """The heads a cell prunes, or none when its policy cannot select (the cell records why when evaluated)."""
    if cell.policy is None:
        return []
    try:
        return work.heads(cell.policy, cell.seed)
    except SurgeonError:
        return []


def _failures(records: dict[Cell, dict]) -> list[str]:
    return [f"{r['model_label']} / {r['row']} / {r['mode']} / {r['data']}: {r['error']}" for r in records.values()
            if "error" in r]  # fmt: skip


def plan_line(study: Study, wanted: list[Cell]) -> str:
    """What the run is about to do, before it pays for it: models, cells, and whether a ranking is made."""
    ranked = any(p.selector.reads_ranking for p in study.policies) or "mean" in study.modes
    rank = study.rank
    ranking = f"; ranks each model first (TextSpan on {rank.images or 'the toy images'})" if ranked else ""
    return (
        f"study {study.name}: {len(wanted):,} cell(s) over {len(study.models)} model(s) x {len(study.data)} data "
        f"set(s){ranking}; finished cells are reused"
    )


# ---- the table --------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def build_table(study: Study, records: dict[Cell, dict], view: TableView | None = None) -> dict:
    """The paper's layout: rows model x policy (x mode), columns data sets, cells the value and its change
    from the unpruned model; a seeded policy's cell is the mean ± sample std over its seeds. `view`: one of the
    study's tables (default: all policies on all data sets). A cell that could not be computed has no value and
    its reason ("error"); the table lists every such reason ("failures")."""
    view = view or study.views()[0]
    records = {c: r for c, r in records.items() if c.data in view.data}
    computed = {c: r for c, r in records.items() if "error" not in r}
    columns: list[dict[str, Any]] = [{"name": study.data[d].name, "kind": study.data[d].kind} for d in view.data]
    for d, column in zip(view.data, columns, strict=True):
        fallback = {"accuracy": "acc1", "bias": f"max_skew@{study.data[d].skew_k}"}.get(study.data[d].kind, "recall@1")
        column["metric"] = next((r["metric"] for c, r in computed.items() if c.data == d), fallback)
        floors = (bias_floor(r.get("result", {})).get(column["metric"]) for c, r in computed.items() if c.data == d)
        floor = next((f for f in floors if f is not None), None)
        if floor is not None:  # a property of the data set: the same in every row
            column["floor"] = floor
    rows = []
    for m, model in enumerate(study.models):
        baseline = {c.data: r["value"] for c, r in computed.items() if c.model == m and c.policy is None}
        groups: list[tuple[str, str, int | None]] = [(BASELINE, BASELINE, None)]
        groups += [(study.policies[i].label, mode, i) for i in view.policies for mode in study.modes]
        for label, mode, p in groups:
            row: dict[str, Any] = {"model": model.label, "policy": label, "mode": mode, "cells": {}}
            mine = {c: r for c, r in records.items() if c.model == m and c.policy == p and c.mode == mode}
            heads = [float(len(r["heads"])) for c, r in mine.items() if c in computed]
            row["heads"] = _mean_std(heads)[0] if heads else None
            for d, column in zip(view.data, columns, strict=True):
                ordered = [r for c, r in sorted(mine.items(), key=lambda cr: cr[0].seed) if c.data == d]
                values = [r["value"] for r in ordered if "error" not in r]
                error = next((r["error"] for r in ordered if "error" in r), None)
                mean, std = _mean_std(values) if values else (None, None)
                change = None if p is None or mean is None or d not in baseline else mean - baseline[d]
                row["cells"][column["name"]] = {
                    "value": mean,
                    "std": std,
                    "seeds": len(values),
                    "change": change,
                    "values": values,
                    "error": error,
                }
            rows.append(row)
    failures = _failures(records)
    return {"schema": TABLE_SCHEMA, "name": view.name, "columns": columns, "rows": rows, "failures": failures}


def _scaled(column: dict, value: float) -> float:
    return 100 * value if column["kind"] in PERCENT_KINDS else value


def cell_text(column: dict, cell: dict) -> str:
    """`81.2 (-3.4)`, `80.1 ± 0.5 (-4.5)` for a seeded row; accuracy and retrieval in %, bias as is; `failed`
    (reasons below the table) for a cell that could not be computed, `(k of n seeds)` when some seeds could not."""
    if cell["value"] is None:
        return "failed"
    digits = 1 if column["kind"] in PERCENT_KINDS else 3
    text = f"{_scaled(column, cell['value']):.{digits}f}"
    if cell["std"] is not None:
        text += f" ± {_scaled(column, cell['std']):.{digits}f}"
    if cell["change"] is not None:
        text += f" ({_scaled(column, cell['change']):+.{digits}f})"
    if cell.get("error"):
        text += f" ({cell['seeds']} seeds computed; see failures)"
    return text


def column_title(column: dict) -> str:
    from surgeon.results.plots import metric_name

    if column["kind"] in PERCENT_KINDS:
        return f"{column['name']} ({'top-1' if column['kind'] == 'accuracy' else 'R@1'} %)"
    return f"{column['name']} ({metric_name(column['metric'])})"


def markdown_table(table: dict) -> str:
    multi_mode = len({r["mode"] for r in table["rows"] if r["mode"] != BASELINE}) > 1
    head = ["model", "policy", *(["mode"] if multi_mode else []), "heads", *map(column_title, table["columns"])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        mode = [r["mode"] if r["mode"] != BASELINE else ""] if multi_mode else []
        heads = "" if r["heads"] is None else f"{r['heads']:g}"
        values = [cell_text(c, r["cells"][c["name"]]) for c in table["columns"]]
        lines.append("| " + " | ".join([r["model"], r["policy"], *mode, heads, *values]) + " |")
    note = "Cells: value (change from the unpruned model); seeded policies: mean ± sample std over seeds."
    for column in table["columns"]:
        if "floor" in column:  # chance: the column's floor only where no row scores below it
            figures = {i: r["cells"][column["name"]]["value"] for i, r in enumerate(table["rows"])}
            above = not below_chance(column["floor"], figures)
            note += (
                f"\n\nA ranking that ignores the images scores {column['metric']} {column['floor']:.3f} on "
                f"{column['name']}: "
                + ("that column's floor, not 0." if above else "rows below it rank more evenly than chance.")
            )
    failures = table.get("failures") or []
    if failures:
        note += "\n\nCells that could not be computed (model / policy / mode / data: why):\n\n"
        note += "\n".join(f"- {line}" for line in failures)
    return f"# Study: {table['name']}\n\n" + "\n".join(lines) + f"\n\n{note}\n"


def csv_table(table: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = ["model", "policy", "mode", "heads", "data", "metric", "value", "std", "change", "seeds", "error"]
    writer.writerow(columns)
    for r in table["rows"]:
        for c in table["columns"]:
            cell = r["cells"][c["name"]]
            heads = "" if r["heads"] is None else f"{r['heads']:g}"
            row = [r["model"], r["policy"], r["mode"], heads, c["name"], c["metric"]]
            numbers = [_num(cell["value"]), _num(cell["std"]), _num(cell["change"]), cell["seeds"]]
            writer.writerow(row + numbers + [cell.get("error") or ""])
    return buffer.getvalue()


def _plottable(table: dict) -> dict:
    """The table with a failed cell's missing value as NaN: no bar, the others drawn."""
    plotted = copy.deepcopy(table)
    for row in plotted["rows"]:
        for cell in row["cells"].values():
            cell["value"] = math.nan if cell["value"] is None else cell["value"]
    return plotted


def _num(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else repr(value)


def write_tables(tables: list[dict], out: Path, plot_format: str = "png") -> list[Path]:
    """One table: `write_table`. Several ([[tables]]): table.md with one section each, table.csv with a
    `table` column, table.json listing them, and a plot per table (study-1.png ...), each written atomically."""
    if len(tables) == 1:
        return write_table(tables[0], out, plot_format)
    from surgeon.results.plots import study_plot

    files = [out / "table.md", out / "table.csv", out / "table.json"]
    atomic_write_text(files[0], "\n".join(markdown_table(t) for t in tables))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for i, table in enumerate(tables):
        lines = list(csv.reader(io.StringIO(csv_table(table))))
        writer.writerows(([["table", *lines[0]]] if i == 0 else []) + [[table["name"], *line] for line in lines[1:]])
    atomic_write_text(files[1], buffer.getvalue())
    atomic_write_text(
        files[2], json.dumps(finite({"schema": TABLE_SCHEMA, "tables": tables}), indent=2, sort_keys=True)
    )
    for i, table in enumerate(tables, 1):
        files.append(out / f"study-{i}.{plot_format}")
        with atomic_file(files[-1], suffix=files[-1].suffix) as tmp:
            study_plot(table, tmp)
    return files


def write_table(table: dict, out: Path, plot_format: str = "png") -> list[Path]:
    """table.md, table.csv, table.json and the accuracy/bias plot, each written atomically."""
    from surgeon.results.plots import study_plot

    files = [out / "table.md", out / "table.csv", out / "table.json", out / f"study.{plot_format}"]
    atomic_write_text(files[0], markdown_table(table))
    atomic_write_text(files[1], csv_table(table))
    atomic_write_text(files[2], json.dumps(finite(table), indent=2, sort_keys=True))
    with atomic_file(files[3], suffix=files[3].suffix) as tmp:  # matplotlib picks the format from the suffix
        study_plot(_plottable(table), tmp)
    return files
