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

from surgeon import limits
from surgeon.clipbench import finite
from surgeon.errors import InvalidInput, NotFound, PreconditionFailed, SurgeonError
from surgeon.heads import HeadRef
from surgeon.load import CHECKPOINT_SUFFIXES, LoadedModel
from surgeon.paths import atomic_file, atomic_write_text, read_json_object
from surgeon.policies import POLICIES, RANKING_FREE, SEEDED_POLICIES, PolicyOptions
from surgeon.progress import progress_bar
from surgeon.records import ValidationSummary
from surgeon.retrieval import HEADLINE as RETRIEVAL_HEADLINE
from surgeon.surgery import SURGERIES
from surgeon.video import VideoFrames

TABLE_SCHEMA = "surgeon.study/1"
PERCENT_KINDS = ("accuracy", "retrieval")  # columns shown in %: top-1, and text -> image/video R@1
CELL_SCHEMA = "surgeon.study-cell/1"
BASELINE = "none"  # the unpruned model: the row every change is measured against
# debias selects by measuring on a search split, so its cells would need held-out halves of every data set
STUDY_POLICIES = tuple(name for name in POLICIES.names() if name != "debias")

if TYPE_CHECKING:
    from surgeon.rank import Ranking


# ---- the study file ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    pretrained: str | None
    label: str


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
    skew_k: int = 10
    desired: str | None = None
    protocol: str = "surgeon"
    frames: int = limits.DEFAULT_VIDEO_FRAMES  # retrieval: frames per video


@dataclass(frozen=True)
class StudyRank:
    """The study's [rank] table: how the ranking that ranking-based policies read is made."""

    images: str | None = None  # None: the toy world's images for the toy model; a real model needs them named
    n_images: int | None = None
    texts: str | None = None
    judge: str = "lexicon"
    layers: str | None = None
    m: int = limits.DEFAULT_TEXTS_PER_HEAD
    span_rank: int = limits.DEFAULT_SPAN_RANK


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
        label = t.get("label", str, model if not pretrained else f"{model}/{Path(pretrained).name}")
        models.append(ModelSpec(model, pretrained, label))
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
    if len(cells(study)) > limits.MAX_STUDY_CELLS:
        raise _fail("policies", f"the study has {len(cells(study)):,} cells; at most {limits.MAX_STUDY_CELLS:,}")
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
    if seeds > 1 and policy not in SEEDED_POLICIES:
        raise _fail(t.path("seeds"), f"{policy} is deterministic: seeds repeats {', '.join(sorted(SEEDED_POLICIES))}")
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
        skew_k=t.count("skew_k", 1, limits.MAX_SKEW_K, 10) if kind == "bias" else 10,
        desired=t.get("desired", str) if kind == "bias" else None,
        protocol=t.get("protocol", str, "surgeon") if kind == "bias" else "surgeon",
        frames=t.count("frames", 1, limits.MAX_FRAMES_PER_VIDEO, limits.DEFAULT_VIDEO_FRAMES)
        if kind == "retrieval"
        else limits.DEFAULT_VIDEO_FRAMES,
    )
    if kind == "bias" and path != "toy" and spec.queries is None:
        raise _fail(t.path("queries"), "a bias manifest needs its neutral queries file")
    if spec.n is not None and not path.startswith("toy"):
        raise _fail(t.path("n"), "sizes only the toy world's sets")
    t.done()
    return spec


def _templates(value: str | None, base: Path, where: str) -> str | None:
    """A named template set (cifar10, food101, imagenet-a ...: surgeon.templates) as it is, else a file."""
    from surgeon.templates import named_templates

    if value is not None and "/" not in value and named_templates(value) is not None:
        return value
    return _path(value, base, where)


def _rank(t: _Table, base: Path) -> StudyRank:
    images = _path(t.get("images", str), base, t.path("images"))
    spec = StudyRank(
        images=images,
        n_images=t.count("n_images", 1, limits.MAX_TOY_IMAGES if images in (None, "toy") else limits.MAX_IMAGES),
        texts=t.get("texts", str),
        judge=t.get("judge", str, StudyRank.judge),
        layers=t.get("layers", str),
        m=t.count("m", 1, limits.MAX_TEXTS_PER_HEAD, StudyRank.m),
        span_rank=t.count("span_rank", 1, limits.MAX_SPAN_RANK, StudyRank.span_rank),
    )
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
    from surgeon.images import files_digest
    from surgeon.webdata import ShardImages

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
    return _digest(payload)


def load_data(spec: DataSpec):
    """A one-set ValidationSuite for a data set of the study (every format `--data`/`--bias-data` read)."""
    from surgeon.bias import bias_protocol
    from surgeon.validate import ValidationSuite, bias_set, classification_set, retrieval_set, toy_suite

    if spec.kind == "retrieval":
        retrieval = retrieval_set(Path(spec.path), spec.frames, spec.n)
        return ValidationSuite([], None, "files", f"{spec.name}: {spec.path}", [retrieval])
    if spec.path.startswith("toy"):
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
    path = Path(spec.path)
    classnames, templates, queries = (Path(p) if p else None for p in (spec.classnames, spec.templates, spec.queries))
    if spec.kind == "bias":
        if queries is None:  # refused when the study was read
            raise InvalidInput(f"data {spec.name}: a bias manifest needs its neutral queries file")
        _, desired = bias_protocol(spec.protocol, spec.desired)
        bias = bias_set(path, queries, templates, spec.skew_k, desired, spec.protocol)
        return ValidationSuite([], bias, "files", str(path))
    return ValidationSuite([classification_set(path, classnames, templates)], None, "files", str(path))


class CellStore:
    """One JSON file per finished cell under `folder`, written atomically: a cell is either whole or absent."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> dict:
        return read_json_object(self.path(key), "study cell")

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
    table: dict | None = None  # the first (or only) table
    files: list[Path] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)  # every table ([[tables]])


class _ModelWork:
    """One model's shared state: its ranking (made once) and, per data set, an Evaluator holding the residual
    prefix of its images (computed once, reused by every pruned head set)."""

    def __init__(self, study: Study, loaded: LoadedModel, quiet: bool):
        self.study, self.loaded, self.quiet = study, loaded, quiet
        self._ranking: Ranking | None = None
        self._rank_inputs: dict | None = None
        self._selections: dict[tuple[int, int], list[HeadRef]] = {}
        self._evaluators: dict[int, Any] = {}
        self._pruned: dict[tuple[int, int, str], LoadedModel] = {}

    def rank_inputs(self) -> dict:
        """What the ranking depends on besides the model: part of the key of cells whose policy reads it."""
        from surgeon.images import resolve_images
        from surgeon.pools import load_pool

        if self._rank_inputs is None:
            r = self.study.rank
            if r.images is None and not self.loaded.is_toy:
                raise _fail(
                    "rank.images", f"{self.loaded.identity} is not the toy model: name the images to rank it on"
                )
            self.images = resolve_images(r.images, r.n_images, self.loaded.name)
            self.pool = load_pool(r.texts, self.loaded.is_toy)
            self._rank_inputs = {"images": self.images.identity, "pool": self.pool.digest, "judge": r.judge,
                                 "layers": r.layers, "m": r.m, "span_rank": r.span_rank}  # fmt: skip
        return self._rank_inputs

    def ranking(self) -> Ranking | None:
        from surgeon.rank import rank_heads

        if self._ranking is None:
            self.rank_inputs()
            r = self.study.rank
            self._ranking = rank_heads(self.loaded, self.images, self.pool, judge=r.judge, layers=r.layers, m=r.m,
                                       span_rank=r.span_rank, quiet=self.quiet)  # fmt: skip
        return self._ranking

    def heads(self, p: int, seed: int) -> list[HeadRef]:
        if (p, seed) not in self._selections:
            spec = self.study.policies[p]
            ranking = None if spec.policy in RANKING_FREE else self.ranking()
            options = PolicyOptions(model_name=self.loaded.name, pretrained=self.loaded.pretrained,
                                    **spec.options(seed))  # fmt: skip
            if spec.policy == "random" and spec.k is None:  # the paper's control: as many as the high-CCS set
                options.k = len(POLICIES.get("high")(ranking, PolicyOptions()).heads)
            try:
                self._selections[(p, seed)] = POLICIES.get(spec.policy)(ranking, options).heads
            except SurgeonError as err:  # say which entry of the study, on which model
                where = f"policies[{p}] ({spec.label}) on {self.loaded.identity}"
                raise type(err)(f"{where}: {err.args[0]}", hint=err.hint, field=f"policies[{p}]") from None
        return self._selections[(p, seed)]

    def evaluate(self, cell: Cell, suite, first_layer: int) -> tuple[list[HeadRef], dict]:
        from surgeon.validate import Evaluator

        heads = [] if cell.policy is None else self.heads(cell.policy, cell.seed)
        if cell.mode in (BASELINE, "zero"):  # zero ablation of a cached prefix: equal to a pruned forward
            if cell.data not in self._evaluators:
                self._evaluators[cell.data] = Evaluator(self.loaded, suite, first_layer=first_layer)
            return heads, self._evaluators[cell.data].evaluate(heads)
        assert cell.policy is not None  # the baseline is zero ablation of no heads, above
        return heads, Evaluator(self._pruned_model(cell.policy, cell), suite, cache=False).evaluate()

    def _pruned_model(self, policy: int, cell: Cell) -> LoadedModel:
        """hard/mean surgery on a copy of the model, made once per head set and mode."""
        from surgeon.prune import mean_ablation
        from surgeon.surgery import SurgeryRequest, apply_surgery

        key = (policy, cell.seed, cell.mode)
        if key not in self._pruned:
            pruned = replace(
                self.loaded,
                model=copy.deepcopy(self.loaded.model),
                pruned_layout=copy.deepcopy(self.loaded.pruned_layout),
            )
            if cell.mode == "mean":
                self.rank_inputs()
                means = mean_ablation(pruned, self.images)
            else:
                means = None
            apply_surgery(pruned.model, SurgeryRequest(self.heads(policy, cell.seed), cell.mode, "vision", means))
            self._pruned = {key: pruned}  # one pruned copy at a time: a ViT-L copy is ~1.7 GB
        return self._pruned[key]


def cell_key(study: Study, cell: Cell, loaded: LoadedModel, data_id: str, rank_inputs: dict | None) -> str:
    spec = None if cell.policy is None else study.policies[cell.policy]
    payload = {
        "model": loaded.forward_identity,
        "preset": [loaded.name, loaded.pretrained] if spec is not None and spec.policy.startswith("paper-") else None,
        "policy": BASELINE if spec is None else spec.policy,
        "options": {} if spec is None else spec.options(cell.seed),
        "random_k": "high-CCS count" if spec is not None and spec.policy == "random" and spec.k is None else None,
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
    `collect` computes nothing: it assembles the table from the stored cells, or says how many are missing."""
    from surgeon.load import load_model

    store = CellStore(out / "cells")
    wanted = shard_cells(cells(study), None if collect else shard)
    run = StudyRun(out)
    keys: dict[Cell, str] = {}
    by_model: dict[int, list[Cell]] = {}
    for cell in wanted:
        by_model.setdefault(cell.model, []).append(cell)
    suites: dict[int, Any] = {}  # data set index -> its one-set ValidationSuite, read once
    data_ids: dict[int, str] = {}
    with progress_bar("study cells", len(wanted), quiet) as advance:
        for m, model_cells in by_model.items():
            spec = study.models[m]
            work = _ModelWork(study, load_model(spec.name, spec.pretrained, device), quiet)
            pending = []
            for cell in model_cells:
                if cell.data not in data_ids:
                    suites[cell.data] = load_data(study.data[cell.data])
                    data_ids[cell.data] = data_identity(suites[cell.data])
                # the ranking's inputs key cells that read a ranking; mean ablation averages over the same images
                reads = cell.mode == "mean" or (
                    cell.policy is not None and study.policies[cell.policy].policy not in RANKING_FREE
                )
                keys[cell] = cell_key(
                    study, cell, work.loaded, data_ids[cell.data], work.rank_inputs() if reads else None
                )
                if store.has(keys[cell]):
                    run.reused.append(keys[cell])
                    advance(1)
                else:
                    pending.append(cell)
            if collect or not pending:
                continue
            layers = [h.layer for c in pending if c.policy is not None for h in work.heads(c.policy, c.seed)]
            first_layer = min(layers, default=0)
            for cell in pending:
                heads, result = work.evaluate(cell, suites[cell.data], first_layer)
                metric, value = _headline(result)
                store.put(keys[cell], {
                    "schema": CELL_SCHEMA, "model": work.loaded.record(), "model_label": spec.label,
                    "row": BASELINE if cell.policy is None else study.policies[cell.policy].label,
                    "seed": cell.seed, "mode": cell.mode, "data": study.data[cell.data].name,
                    "heads": [h.name for h in heads], "metric": metric, "value": value, "result": result,
                })  # fmt: skip
                run.computed.append(keys[cell])
                advance(1)
    if shard is not None and not collect:
        return run
    missing = [c for c in cells(study) if not store.has(keys[c])]
    if missing:
        raise PreconditionFailed(
            f"{len(missing)} of {len(keys)} cells are not computed yet",
            hint=f"run every shard first (surgeon study {study.source} --shard i/n)",
        )
    records = {c: store.get(keys[c]) for c in cells(study)}
    run.tables = [build_table(study, records, view) for view in study.views()]
    run.table = run.tables[0]
    run.files = write_tables(run.tables, out, plot_format)
    return run


# ---- the table --------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def build_table(study: Study, records: dict[Cell, dict], view: TableView | None = None) -> dict:
    """The paper's layout: rows model x policy (x mode), columns data sets, cells the value and its change
    from the unpruned model; a seeded policy's cell is the mean ± sample std over its seeds. `view`: one of the
    study's tables (default: all policies on all data sets)."""
    view = view or study.views()[0]
    columns = [{"name": study.data[d].name, "kind": study.data[d].kind} for d in view.data]
    for d, column in zip(view.data, columns, strict=True):
        column["metric"] = next(r["metric"] for c, r in records.items() if c.data == d)
    rows = []
    for m, model in enumerate(study.models):
        baseline = {c.data: r["value"] for c, r in records.items() if c.model == m and c.policy is None}
        groups: list[tuple[str, str, int | None]] = [(BASELINE, BASELINE, None)]
        groups += [(study.policies[i].label, mode, i) for i in view.policies for mode in study.modes]
        for label, mode, p in groups:
            row: dict[str, Any] = {"model": model.label, "policy": label, "mode": mode, "cells": {}}
            mine = {
                c: r
                for c, r in records.items()
                if c.model == m and c.policy == p and c.mode == mode and c.data in view.data
            }
            row["heads"] = _mean_std([len(r["heads"]) for r in mine.values()])[0]
            for d, column in zip(view.data, columns, strict=True):
                values = [r["value"] for c, r in sorted(mine.items(), key=lambda cr: cr[0].seed) if c.data == d]
                mean, std = _mean_std(values)
                row["cells"][column["name"]] = {
                    "value": mean,
                    "std": std,
                    "seeds": len(values),
                    "change": None if p is None else mean - baseline[d],
                    "values": values,
                }
            rows.append(row)
    return {"schema": TABLE_SCHEMA, "name": view.name, "columns": columns, "rows": rows}


def _scaled(column: dict, value: float) -> float:
    return 100 * value if column["kind"] in PERCENT_KINDS else value


def cell_text(column: dict, cell: dict) -> str:
    """`81.2 (-3.4)`, `80.1 ± 0.5 (-4.5)` for a seeded row; accuracy in %, bias as is."""
    digits = 1 if column["kind"] in PERCENT_KINDS else 3
    text = f"{_scaled(column, cell['value']):.{digits}f}"
    if cell["std"] is not None:
        text += f" ± {_scaled(column, cell['std']):.{digits}f}"
    if cell["change"] is not None:
        text += f" ({_scaled(column, cell['change']):+.{digits}f})"
    return text


def column_title(column: dict) -> str:
    from surgeon.plots import metric_name

    if column["kind"] in PERCENT_KINDS:
        return f"{column['name']} ({'top-1' if column['kind'] == 'accuracy' else 'R@1'} %)"
    return f"{column['name']} ({metric_name(column['metric'])})"


def markdown_table(table: dict) -> str:
    multi_mode = len({r["mode"] for r in table["rows"] if r["mode"] != BASELINE}) > 1
    head = ["model", "policy", *(["mode"] if multi_mode else []), "heads", *map(column_title, table["columns"])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        mode = [r["mode"] if r["mode"] != BASELINE else ""] if multi_mode else []
        heads = f"{r['heads']:g}"
        values = [cell_text(c, r["cells"][c["name"]]) for c in table["columns"]]
        lines.append("| " + " | ".join([r["model"], r["policy"], *mode, heads, *values]) + " |")
    note = "Cells: value (change from the unpruned model); seeded policies: mean ± sample std over seeds."
    return f"# Study: {table['name']}\n\n" + "\n".join(lines) + f"\n\n{note}\n"


def csv_table(table: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "policy", "mode", "heads", "data", "metric", "value", "std", "change", "seeds"])
    for r in table["rows"]:
        for c in table["columns"]:
            cell = r["cells"][c["name"]]
            row = [r["model"], r["policy"], r["mode"], f"{r['heads']:g}", c["name"], c["metric"]]
            writer.writerow(row + [_num(cell["value"]), _num(cell["std"]), _num(cell["change"]), cell["seeds"]])
    return buffer.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else repr(value)


def write_tables(tables: list[dict], out: Path, plot_format: str = "png") -> list[Path]:
    """One table: `write_table`. Several ([[tables]]): table.md with one section each, table.csv with a
    `table` column, table.json listing them, and a plot per table (study-1.png ...), each written atomically."""
    if len(tables) == 1:
        return write_table(tables[0], out, plot_format)
    from surgeon.plots import study_plot

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
    from surgeon.plots import study_plot

    files = [out / "table.md", out / "table.csv", out / "table.json", out / f"study.{plot_format}"]
    atomic_write_text(files[0], markdown_table(table))
    atomic_write_text(files[1], csv_table(table))
    atomic_write_text(files[2], json.dumps(finite(table), indent=2, sort_keys=True))
    with atomic_file(files[3], suffix=files[3].suffix) as tmp:  # matplotlib picks the format from the suffix
        study_plot(table, tmp)
    return files
