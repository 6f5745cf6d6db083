"""Stage 7: validation — zero-shot classification (docs/METHOD.md §4), bias metrics (§3) and zero-shot
retrieval (image <-> text and text -> video, §6; surgeon.results.retrieval) on a suite of sets, before and after
surgery, with gates.

`Evaluator` caches the residual stream before the first layer it may prune, so scoring many head sets
(sweeps, the debias search) re-runs only the remaining blocks; numbers are identical to a full forward."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from surgeon.core import fallback, limits
from surgeon.core.errors import CorruptInput, InvalidInput, NotFound
from surgeon.core.limits import echo
from surgeon.core.paths import read_lines
from surgeon.core.progress import progress_bar, stop_point
from surgeon.inputs import defaults
from surgeon.inputs.clipbench import dataset_keys, read_json_entry
from surgeon.inputs.images import IMAGE_SUFFIXES, open_image
from surgeon.inputs.templates import fill, read_templates
from surgeon.inputs.video import VIDEO_SUFFIXES, DecodingFrames, VideoFrames, write_video
from surgeon.inputs.webdata import (
    CLASSNAMES_FILE,
    TEMPLATES_FILE,
    ShardImages,
    is_retrieval_webdataset,
    is_webdataset,
    retrieval_webdataset,
    webdataset_set,
)
from surgeon.model.cls_token import block_at_cls
from surgeon.model.heads import HeadRef
from surgeon.model.hooks import attention, image_embeds, residual_in, vision_blocks, vision_tower
from surgeon.model.load import LoadedModel
from surgeon.model.surgery import zero_heads
from surgeon.results.bias import (
    BOOTSTRAP_RESAMPLES,
    PROTOCOLS,
    below_chance,
    bias_intervals,
    bias_metrics,
    bias_protocol,
    canonical_units,
    chance_skews,
    fold_groups,
    headline_keys,
)
from surgeon.results.records import ValidationSummary
from surgeon.results.retrieval import (
    HEADLINE,
    RetrievalSet,
    image_text_metrics,
    pool_frames,
    report_keys,
    text_video_metrics,
)
from surgeon.results.retrieval import TASKS as RETRIEVAL_TASKS
from surgeon.validation.zeroshot import build_classifier, metrics_from_logits, uint8_to_tensor

Images = np.ndarray | list[Path] | ShardImages  # uint8 N x H x W x 3, image files, or webdataset shards


def take_images(images: Images, index: np.ndarray) -> Images:
    """The images at `index` of an array or a list of files (a stream of shards has no random access)."""
    if isinstance(images, ShardImages):
        raise InvalidInput(
            "a webdataset validation set cannot be split into search and held-out halves",
            hint="convert it to an image folder or a CSV manifest for the debias policy",
        )
    return images[index] if isinstance(images, np.ndarray) else [images[i] for i in index]


@dataclass
class ClassificationSet:
    name: str
    classnames: list[str]
    templates: list[str]
    images: Images
    labels: np.ndarray


@dataclass
class BiasSet:
    name: str
    images: Images
    groups: np.ndarray
    group_names: list[str]
    queries: dict[str, list[str]]  # query name -> prompts averaged into one query
    k: int = 10
    desired: str = "uniform"
    protocol: str = "surgeon"  # surgeon.results.bias.PROTOCOLS
    units: np.ndarray | None = None  # what must not straddle a search/held-out split (scene, identity); None: image
    #: per image, the index of the one query that ranks it (the paper's SocialCounterfactuals protocol: an
    #: occupation's query ranks that occupation's images; surgeon.results.bias.query_pools); None: every query,
    #: every image
    ranked_by: np.ndarray | None = None
    #: per image, the independent probe it comes from (a toy search or stop split of several probes): the
    #: debias search ranks each apart and averages their figures (surgeon.selection.policies.BiasMeasure); None: one
    probes: np.ndarray | None = None

    def take(self, index: np.ndarray, name: str | None = None) -> BiasSet:
        images = take_images(self.images, index)
        units = None if self.units is None else self.units[index]
        ranked_by = None if self.ranked_by is None else self.ranked_by[index]
        probes = None if self.probes is None else self.probes[index]
        return replace(
            self,
            name=name or self.name,
            images=images,
            groups=self.groups[index],
            units=units,
            ranked_by=ranked_by,
            probes=probes,
        )


@dataclass
class ValidationSuite:
    tasks: list[ClassificationSet]
    bias: BiasSet | None = None
    source: str = "toy"
    description: str = "toy world: test split, bias probes (seeds 0, 7, 8, 9)"
    retrieval: list[RetrievalSet] = field(default_factory=list)  # image <-> text and text -> video sets

    def require_accuracy(self, what: str) -> None:
        """Refuse, before any work, a use that trades off accuracy when there are no tasks to measure it on."""
        if not self.tasks:
            raise InvalidInput(f"{what} measures accuracy: it needs a classification set (--data) besides the bias set")

    def subset(self, n_task_images: int, n_bias: int | None = None, seed: int = 0) -> ValidationSuite:
        """A smaller suite for searches (the debias policy): the first n images of each task (tasks sharing an
        image array still share it) and a seeded random n of the bias set (keeps its group mix)."""
        sliced: dict[int, tuple] = {}
        tasks = []
        for t in self.tasks:
            if id(t.images) not in sliced:
                sliced[id(t.images)] = (t.images[:n_task_images],)
            tasks.append(
                ClassificationSet(t.name, t.classnames, t.templates, sliced[id(t.images)][0], t.labels[:n_task_images])
            )
        bias = self.bias
        if bias is not None and n_bias is not None and n_bias < len(bias.groups):
            bias = bias.take(np.sort(np.random.default_rng(seed).choice(len(bias.groups), n_bias, replace=False)))
        return ValidationSuite(tasks, bias, self.source, self.description)

    def split_for_search(self, seed: int = 0) -> SearchSplits:
        """Three disjoint suites for a policy that selects on measurements (debias): it searches on one, decides
        when to stop on another, and is reported on the third, which selection never touches. The toy world
        draws the search and stop suites from its own disjoint streams (the 'val' split and fresh probe scenes,
        seeded by `seed`) and keeps this suite, the one every other policy reports on, as the report split.
        Files are split reproducibly (seeded): each task's images in half (search, report: accuracy is
        budgeted on the search half), the bias set in thirds by its units (a manifest column, see bias_set),
        never one unit in two splits."""
        if self.source == "toy":
            n_per_task = len(self.tasks[0].labels) if self.tasks else None
            n_scenes = None if self.bias is None else _scenes_per_probe(self.bias)
            search_seeds, stop_seeds = search_probe_seeds(seed)
            search = ValidationSuite(
                toy_tasks(n_per_task, "val"),
                toy_probes(n_scenes, search_seeds),
                "toy",
                f"toy world: val split, bias probes (seeds {_seeds(search_seeds)})",
            )
            stop = ValidationSuite(
                [], toy_probes(n_scenes, stop_seeds), "toy", f"toy world: bias probes (seeds {_seeds(stop_seeds)})"
            )
            if self.bias is not None:
                for split in (search, stop):
                    assert split.bias is not None  # the toy suite always has its probe
                    split.bias = replace(
                        split.bias, k=self.bias.k, desired=self.bias.desired, protocol=self.bias.protocol
                    )
            return SearchSplits(search, stop, self, seed)
        if self.bias is None:
            raise InvalidInput("a selection by bias measurement needs a bias set (--bias-data)")
        if self.bias.ranked_by is not None:
            raise InvalidInput(
                f"bias set {self.bias.name} ranks within its --bias-within column; the debias search ranks whole sets",
                hint="measure it with validate, prune, sweep or study; search on a set without --bias-within",
            )
        rng = np.random.default_rng(seed)
        halves: tuple[list[ClassificationSet], list[ClassificationSet]] = ([], [])
        # tasks that share one image array (the toy's factors next to a bias file) share its halves, so no image
        # of one task's report half is searched under another task's labels, and they keep one forward pass
        shared: dict[int, list[tuple[np.ndarray, Images]]] = {}
        for task in self.tasks:
            if id(task.images) not in shared:
                order = rng.permutation(len(task.labels))
                shared[id(task.images)] = [
                    (index, take_images(task.images, index)) for index in map(np.sort, np.array_split(order, 2))
                ]
            for side, (index, images) in zip(halves, shared[id(task.images)], strict=True):
                side.append(replace(task, images=images, labels=task.labels[index]))
        search_bias, stop_bias, report_bias = _split_bias(self.bias, rng)
        described = f"{self.description} (%s, seed {seed})"
        return SearchSplits(  # no search selects on retrieval: its sets are reported whole, on the report split
            ValidationSuite(halves[0], search_bias, self.source, described % "search split"),
            ValidationSuite([], stop_bias, self.source, described % "stop split"),
            ValidationSuite(halves[1], report_bias, self.source, described % "report split", self.retrieval),
            seed,
        )

    def __post_init__(self):
        for task in self.tasks:
            if len(task.labels) == 0:
                raise InvalidInput(f"validation set {task.name} is empty")
        if self.bias is not None and len(self.bias.groups) == 0:
            raise InvalidInput(f"bias set {self.bias.name} is empty")


@dataclass
class SearchSplits:
    """Disjoint suites of a selection by measurement: searched on, stopped on, reported on (`seed` drew them)."""

    search: ValidationSuite
    stop: ValidationSuite
    report: ValidationSuite
    seed: int


#: the toy's standard bias set: MaxSkew@10 averaged over four probes of 600 scenes, each ranked apart. One
#: probe's figure has a bootstrap sd of 12% and a head's effect on it varies by 11 points from probe to probe
#: (ten design probes, NOTES.md): one probe cannot tell a 25% change from none. Seed 0 is the probe reported
#: before; 7-9 are the seeds below the design probes (10-19) that no search has read (1-6 were the first
#: debias search's own)
REPORT_PROBES = (0, 7, 8, 9)
#: toy probes in each of the search and stop splits: with six, the search picked the head best on average in 5
#: of 5 design rotations and kept no second head that raised held-out bias; with three, 7 of 10 (NOTES.md)
PROBES_PER_SPLIT = 6
#: the first probe seed of the search and stop splits: below it lie the reported and the first design probes
FIRST_SEARCH_PROBE = 20
#: probe seeds that no split seed below 6 reads: later design probes (100-159) and fresh judge probes (NOTES.md)
DESIGN_PROBES = range(100, 400)


def search_probe_seeds(split_seed: int) -> tuple[list[int], list[int]]:
    """The toy's search and stop probe seeds for a split seed: disjoint from each other, from every other split
    seed's, from the reported probes and (split seeds 0-5) from the probes the search was designed and judged on."""
    first = FIRST_SEARCH_PROBE + 2 * PROBES_PER_SPLIT * split_seed
    return list(range(first, first + PROBES_PER_SPLIT)), list(
        range(first + PROBES_PER_SPLIT, first + 2 * PROBES_PER_SPLIT)
    )


def _seeds(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, seeds))


def _scenes_per_probe(bias: BiasSet) -> int | None:
    if bias.units is None:
        return None
    return len(np.unique(bias.units)) // (1 if bias.probes is None else len(np.unique(bias.probes)))


def toy_suite(n_per_task: int | None = None, n_scenes: int | None = None, split: str = "test") -> ValidationSuite:
    """The toy world's standard suite: its zero-shot tasks and the reported bias probes (`n_scenes` each)."""
    return ValidationSuite(
        toy_tasks(n_per_task, split),
        toy_probes(n_scenes, list(REPORT_PROBES)),
        "toy",
        f"toy world: {split} split, bias probes (seeds {_seeds(REPORT_PROBES)})",
    )


def toy_tasks(n_per_task: int | None = None, split: str = "test") -> list[ClassificationSet]:
    """The toy world's zero-shot tasks, one per factor, sharing one image array."""
    return [
        ClassificationSet(f"toy/{t.name}", list(t.classnames), list(t.templates), t.images, np.asarray(t.labels))
        for t in defaults.toy_zeroshot_tasks(n=n_per_task, split=split)
    ]


def toy_probe(n_scenes: int | None = None, seed: int = 0) -> BiasSet:
    """The toy world's counterfactual bias probe: each scene rendered once per group, a scene being a unit."""
    probe = defaults.toy_bias_probe(n_scenes=n_scenes, seed=seed)
    return BiasSet(
        "toy/bias-probe",
        probe.images,
        np.asarray(probe.groups),
        list(probe.group_names),
        {shape: list(prompts) for shape, prompts in probe.queries.items()},
        units=np.asarray(probe.scene_ids),  # a scene's renderings (one per group) stay in one split
    )


def toy_probes(n_scenes: int | None, seeds: list[int]) -> BiasSet:
    """Several toy probes as one bias set, each image marked with its probe (ranked apart by the search), a
    unit being a scene of one probe."""
    probes = [toy_probe(n_scenes, seed) for seed in seeds]
    units = [np.unique(p.units, return_inverse=True)[1] for p in probes if p.units is not None]
    offsets = np.cumsum([0] + [int(u.max()) + 1 for u in units[:-1]])
    return replace(
        probes[0],
        images=np.concatenate([np.asarray(p.images) for p in probes]),
        groups=np.concatenate([p.groups for p in probes]),
        units=np.concatenate([u + offset for u, offset in zip(units, offsets, strict=True)]),
        probes=np.concatenate([np.full(len(p.groups), i) for i, p in enumerate(probes)]),
    )


def _split_bias(bias: BiasSet, rng: np.random.Generator) -> tuple[BiasSet, BiasSet, BiasSet]:
    """A third of the units each (seeded): search, stop, report; refuse splits that cannot measure MaxSkew@k
    for every group."""
    units = bias.units if bias.units is not None else np.arange(len(bias.groups))
    distinct = rng.permutation(np.unique(units))
    part = {u: i for i, chunk in enumerate(np.array_split(distinct, 3)) for u in chunk.tolist()}
    side_of = np.array([part[u] for u in units.tolist()])
    sides = []
    for i, label in enumerate(("search", "stop", "report")):
        index = np.flatnonzero(side_of == i)
        present = len(np.unique(bias.groups[index])) if len(index) else 0
        if len(index) < 2 * bias.k or present < len(bias.group_names):
            raise InvalidInput(
                f"bias set {bias.name} is too small to split into search, stop and report thirds: the {label} "
                f"split has {len(index)} images in {present} of {len(bias.group_names)} groups "
                f"(needs >= {2 * bias.k} images, every group)",
                hint="pass a larger bias set, or split units that group fewer images",
            )
        sides.append(bias.take(index, f"{bias.name} ({label} split)"))
    return sides[0], sides[1], sides[2]


#: folder (or manifest) names that say which split, not which set: reports add the folder above
SPLIT_NAMES = frozenset({"val", "valid", "validation", "test", "testing", "train", "eval", "images", "data"})


def set_name(path: Path) -> str:
    """How reports name a data set: its folder or file name, with the folder above when that name only says
    which split it is (`imagenette/val`, not `val`), and the repository of a Hub cache snapshot (not its
    commit hash)."""
    path = path.resolve()
    if path.parent.name == "snapshots" and "--" in path.parent.parent.name:  # datasets--ORG--NAME/snapshots/HASH
        return "/".join(path.parent.parent.name.split("--")[1:])
    if path.stem.lower() in SPLIT_NAMES and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


#: first-column names that mark a manifest's first row as its header (any row whose first cell is neither an
#: image file nor an image name is one too: `image,race` was read as a row and failed a minute later)
HEADER_NAMES = {"path", "image", "file", "filename", "filepath", "image_path", "img"}


@dataclass(frozen=True)
class Manifest:
    """A CSV manifest (path,label[,...]) read and checked whole before any model loads."""

    path: Path
    header: list[str]  # [] when the first row is data
    rows: list[list[str]]  # stripped cells
    lines: list[int]  # each row's line in the file, for errors

    def images(self) -> list[Path]:
        return [self.path.parent / r[0] for r in self.rows]

    def fail(self, index: int, problem: str, hint: str) -> InvalidInput:
        return InvalidInput(f"manifest {self.path} line {self.lines[index]}: {problem}", hint=hint)


def _is_header(row: list[str], base: Path) -> bool:
    first = row[0].strip()
    if first.lower() in HEADER_NAMES:
        return True
    if Path(first).suffix.lower() in IMAGE_SUFFIXES:
        return False
    confine = _confine.get()
    if confine is not None:  # confined before it is looked at, like every image path (_confine below)
        confine(base / first)
    return not (base / first).is_file()


#: a server's check that a path a manifest names is inside its data root, run before the file is looked at: an
#: existence check first would tell a client which files exist outside the root (surgeon.server.specs sets it)
_confine: ContextVar[Callable[[Path], None] | None] = ContextVar("confine_manifest_images", default=None)


@contextmanager
def confined_images(check: Callable[[Path], None]) -> Iterator[None]:
    token = _confine.set(check)
    try:
        yield
    finally:
        _confine.reset(token)


def read_manifest(path: Path, columns: int, layout: str) -> Manifest:
    """Every row has `columns` non-empty cells and names an image file that exists (relative to the
    manifest's folder); a first row that names no image is the header. `layout` is what to write (errors)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's byte-order mark
            reader = csv.reader(handle)
            numbered = [(reader.line_num, r) for r in reader if r and any(c.strip() for c in r)]
    except FileNotFoundError:
        raise NotFound(f"manifest not found: {path}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"manifest {path} is not UTF-8", hint="re-save it as UTF-8") from None
    except csv.Error as err:
        raise InvalidInput(f"manifest {path} is not CSV: {err}", hint=f"write one {layout} row per line") from None
    header = [c.strip() for c in numbered.pop(0)[1]] if numbered and _is_header(numbered[0][1], path.parent) else []
    if not numbered:
        raise InvalidInput(f"manifest {path} has no rows", hint=f"write one {layout} row per image")
    manifest = Manifest(path, header, [[c.strip() for c in r] for _, r in numbered], [n for n, _ in numbered])
    for i, row in enumerate(manifest.rows):
        if len(row) < columns:
            raise manifest.fail(i, f"{len(row)} column(s), {columns} needed: {echo(','.join(row))}", f"write {layout}")
        if not all(row[:columns]):
            empty = row[:columns].index("") + 1
            raise manifest.fail(
                i, f"{len(row)} column(s), column {empty} is empty: {echo(','.join(row))}", f"write {layout}"
            )
    confine = _confine.get()
    for i, image in enumerate(manifest.images()):
        if confine is not None:
            confine(image)
        if not image.is_file():
            raise manifest.fail(
                i,
                f"image {echo(manifest.rows[i][0])} not found in {path.parent}",
                f"paths are relative to the manifest's folder; a header row names its first column path or image "
                f"({layout})",
            )
    return manifest


def read_classnames(path: Path, dataset: str) -> list[str]:
    """One per line, or clip_benchmark's JSON keyed by dataset name."""
    if path.suffix.lower() == ".json":
        return read_json_entry(path, dataset_keys(dataset), "class names file")
    return read_lines(path, "class names file")


def webdataset_classification(
    data: Path, classnames_file: Path | None = None, templates_file: Path | None = None
) -> ClassificationSet:
    """clip_benchmark's webdataset layout: test/*.tar, with its classnames.txt and templates unless given."""
    key = f"wds/{data.name}"  # what clip_benchmark's JSON files are keyed by
    own_templates = data / TEMPLATES_FILE
    templates = read_templates(templates_file or (own_templates if own_templates.is_file() else None), key)
    if classnames_file is None and not (data / CLASSNAMES_FILE).is_file():
        raise NotFound(f"{data} has no {CLASSNAMES_FILE}", hint="pass --classnames")
    names = read_classnames(classnames_file or data / CLASSNAMES_FILE, key)
    name = f"wds/{set_name(data)}"
    images, labels = webdataset_set(data)
    beyond = next((label for label in labels if not 0 <= label < len(names)), None)
    if beyond is not None:
        raise InvalidInput(f"{data}: class index {beyond} but {len(names)} class names (indices 0..{len(names) - 1})")
    return ClassificationSet(name, names, templates, images, np.asarray(labels))


def classification_set(
    data: Path, classnames_file: Path | None = None, templates_file: Path | None = None
) -> ClassificationSet:
    """An ImageFolder (one folder per class), a CSV manifest (path,label) or clip_benchmark's webdataset layout."""
    if not data.exists():
        raise NotFound(f"validation data not found: {data}")
    if data.is_dir() and is_webdataset(data):
        return webdataset_classification(data, classnames_file, templates_file)
    templates = read_templates(templates_file, data.name)
    if data.is_dir():
        classes = sorted(p.name for p in data.iterdir() if p.is_dir())
        paths, labels = [], []
        for index, cls in enumerate(classes):
            for p in sorted((data / cls).rglob("*")):
                if p.is_file():
                    paths.append(p)
                    labels.append(index)
    else:
        manifest = read_manifest(data, 2, "path,label (a class name, or an index into --classnames)")
        paths = manifest.images()
        # a manifest's JSON entry is keyed by the file's stem (cifar10.csv -> "cifar10"), as a folder's by its name
        names = read_classnames(classnames_file, data.stem) if classnames_file else None
        classes, label_array = _manifest_labels(data, [r[1] for r in manifest.rows], names, classnames_file)
        return ClassificationSet(set_name(data), [n.replace("_", " ") for n in classes], templates, paths, label_array)
    if not paths:
        raise InvalidInput(f"validation set {data} is empty")
    names = classes
    if classnames_file:
        names = read_classnames(classnames_file, data.name)
        if len(names) != len(classes):
            raise InvalidInput(f"{classnames_file} has {len(names)} names for {len(classes)} classes")
    return ClassificationSet(set_name(data), [n.replace("_", " ") for n in names], templates, paths, np.asarray(labels))


def _manifest_labels(
    manifest: Path, raw: list[str], names: list[str] | None, names_file: Path | None
) -> tuple[list[str], np.ndarray]:
    """(class names, label indices) of a CSV manifest. Integer labels are indices into --classnames (sorting
    them as text would put "10" before "2"); name labels are looked up in --classnames when given (its order
    is the class order), else sorted. Mixing both kinds, or names missing from --classnames, is an error."""
    numeric = [label.removeprefix("-").isdigit() for label in raw]
    if any(numeric) and not all(numeric):
        first = raw[numeric.index(True)] if not numeric[0] else raw[numeric.index(False)]
        raise InvalidInput(
            f"manifest {manifest} mixes class indices and class names (e.g. {echo(raw[0])} and {echo(first)})",
            hint="use integer indices into --classnames, or class names, throughout",
        )
    if all(numeric):
        if names is None:
            raise InvalidInput(
                f"manifest {manifest} has integer labels: they index --classnames, which is missing",
                hint="pass --classnames FILE (one name per line, line 0 = label 0)",
            )
        indices = [int(label) for label in raw]
        beyond = next((i for i in indices if not 0 <= i < len(names)), None)
        if beyond is not None:
            raise InvalidInput(
                f"manifest {manifest} has label {beyond}, but {names_file} names {len(names)} classes "
                f"(indices 0..{len(names) - 1})"
            )
        return names, np.asarray(indices)
    if names is None:
        names = sorted(set(raw))
    else:
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise InvalidInput(
                f"manifest {manifest} has labels not in {names_file}: {echo(', '.join(unknown[:5]))}",
                hint="--classnames lists the manifest's class names (in any order), one per line",
            )
    index = {name: i for i, name in enumerate(names)}
    return names, np.asarray([index[label] for label in raw])


def bias_set(
    manifest: Path,
    queries_file: Path | None,
    templates_file: Path | None = None,
    k: int = 10,
    desired: str = "uniform",
    protocol: str = "surgeon",
    split_by: str | None = None,
    attribute: str | None = None,
    within: str | None = None,
    groups: str | None = None,
) -> BiasSet:
    """A CSV manifest (path,group[,...]) and neutral queries, one per line. Header columns it may name:
    `split_by` (an identity or scene id: images sharing its value stay on one side of a search/held-out split),
    `attribute` (the group column; default the second), `within` (e.g. occupation: each image is ranked only
    by the query its value names, as the paper ranks SocialCounterfactuals; the queries default to the
    column's values, and `queries_file` picks some of them). `groups` names a folding of the group labels
    (surgeon.results.bias.GROUP_FOLDINGS, e.g. fairface-race6)."""
    if within is None and queries_file is None:
        raise InvalidInput(
            "--bias-data needs --queries (neutral queries, one per line)",
            hint="or --bias-within COLUMN: each image ranked by the query its column names",
        )
    read = read_manifest(manifest, 2, "path,group (e.g. image,race)")
    rows = read.rows
    attribute_values = _column(read, attribute, "--bias-attribute") if attribute is not None else [r[1] for r in rows]
    labels = fold_groups(attribute_values, groups) if groups is not None else attribute_values
    split = _column(read, split_by, "--bias-split-by") if split_by is not None else None
    units = canonical_units([tuple(row) for row in rows], split)  # without a column, each image is a unit
    if len(rows) < k:
        raise InvalidInput(
            f"bias manifest {manifest} lists {len(rows)} images; MaxSkew@{k} ranks the top {k} of them",
            hint=f"list at least {k} images, or pass a smaller --skew-k",
        )
    group_names = sorted(set(labels))
    if len(group_names) < 2:
        raise InvalidInput(
            f"bias manifest {manifest}: every image is in group {group_names[0]!r}; MaxSkew compares two or more",
            hint="the second column (or --bias-attribute's) names each image's group (e.g. path,race)",
        )
    templates = read_templates(templates_file, manifest.name)
    group_index = np.asarray([group_names.index(label) for label in labels])
    images = read.images()
    ranked_by = None
    if within is not None:
        owners = _column(read, within, "--bias-within")
        names = read_lines(queries_file, "queries file") if queries_file is not None else sorted(set(owners))
        ranked_by, kept = _pools(manifest, owners, names, group_index, group_names, k)
        images, group_index = [images[i] for i in kept], group_index[kept]
        units = units[kept]
    else:
        assert queries_file is not None  # refused above
        names = read_lines(queries_file, "queries file")
    return BiasSet(
        set_name(manifest),
        images,
        group_index,
        group_names,
        {q: [fill(t, q) for t in templates] for q in names},
        k,
        desired,
        units=units,
        protocol=protocol,
        ranked_by=ranked_by,
    )


def _column(read: Manifest, name: str, option: str) -> list[str]:
    """Every row's value in the header column `name`; refused, naming the header, when it has none."""
    if name not in read.header:
        raise InvalidInput(
            f"{option} {name[:80]!r} is not a column of {read.path.name}",
            hint=f"its header names: {', '.join(read.header) or 'none (the first row must be a header)'}",
        )
    column = read.header.index(name)
    short = next((i for i, r in enumerate(read.rows) if len(r) <= column or not r[column]), None)
    if short is not None:
        raise read.fail(short, f"no {name!r} value", f"every row fills the {name} column")
    return [r[column] for r in read.rows]


def _pools(
    manifest: Path, owners: list[str], queries: list[str], groups: np.ndarray, group_names: list[str], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(each kept image's query index, the kept rows): the rows whose `within` value is a query, each query
    owning at least k images and every group (MaxSkew@k of one query ranks only its own images)."""
    index = {q: i for i, q in enumerate(queries)}
    missing = [q for q in queries if q not in set(owners)]
    if missing:
        raise InvalidInput(
            f"bias manifest {manifest}: no image for the quer(ies) {', '.join(repr(q[:40]) for q in missing[:5])}",
            hint="each query ranks the images whose --bias-within value it is: list the column's values",
        )
    kept = np.asarray([i for i, owner in enumerate(owners) if owner in index])
    ranked_by = np.asarray([index[owners[i]] for i in kept])
    for q, query in enumerate(queries):
        present = groups[kept[ranked_by == q]]
        absent = [group_names[g] for g in range(len(group_names)) if g not in set(present.tolist())]
        if len(present) < k or absent:
            raise InvalidInput(
                f"bias manifest {manifest}: {query[:40]!r} has {len(present)} images"
                + (f", none in group(s) {', '.join(absent[:5])}" if absent else "")
                + f"; ranking within it needs >= {k} and every group",
                hint="each query's images are one counterfactual pool: give it every group, or drop it from --queries",
            )
    return ranked_by, kept


def caption_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """A retrieval manifest (CSV, header `path,caption`, one row per caption) -> (items in order of first
    appearance, each item's captions in file order)."""
    items: dict[str, list[str]] = {}
    for row in read_manifest(path, 2, "path,caption (one row per caption)").rows:
        items.setdefault(row[0], []).append(row[1])
    limits.count("items of a retrieval set", len(items), 1, limits.MAX_IMAGES)
    return list(items), list(items.values())


#: the toy world's retrieval sets (`--retrieval-data toy:captions`) and their default sizes
TOY_RETRIEVAL = {"toy:captions": 500, "toy:videos": 60}


def retrieval_set(data: Path, frames: int = limits.DEFAULT_VIDEO_FRAMES, n: int | None = None) -> RetrievalSet:
    """clip_benchmark's retrieval webdataset export, a CSV manifest of images or of videos (by extension;
    videos take the paper's protocol with `frames` frames each, decoded once and cached), or a toy set by name
    (`n` images or videos)."""
    if str(data) in TOY_RETRIEVAL:
        return _toy_retrieval(str(data), frames, n or TOY_RETRIEVAL[str(data)])
    if not data.exists():
        raise NotFound(f"retrieval data not found: {data}")
    if data.is_dir():
        if not (is_webdataset(data) and is_retrieval_webdataset(data)):
            raise InvalidInput(
                f"{data} is not a retrieval set",
                hint="pass clip_benchmark's retrieval export (test/*.tar, dataset_type.txt 'retrieval') "
                "or a CSV manifest path,caption",
            )
        images, captions = retrieval_webdataset(data)
        return _image_set(f"wds/{data.name}", images, captions)
    names, captions = caption_rows(data)
    is_video = [Path(name).suffix.lower() in VIDEO_SUFFIXES for name in names]
    if any(is_video) and not all(is_video):
        raise InvalidInput(f"manifest {data} mixes videos and images", hint="one retrieval set holds one kind")
    paths = [data.parent / name for name in names]
    if all(is_video):
        return RetrievalSet(
            data.name, VideoFrames(paths, frames), [c[0] for c in captions], np.arange(len(paths)), len(paths), frames
        )
    return _image_set(data.name, paths, captions)


def _toy_retrieval(name: str, frames: int, n: int) -> RetrievalSet:
    """Held-out toy images with two captions each, or toy videos (real MP4 files, written once into the cache)."""
    if name == "toy:captions":
        limits.count("n (toy images)", n, 1, limits.MAX_TOY_IMAGES)
        images, captions = defaults.toy_caption_set(n)
        return _image_set("toy/captions", images, captions)
    limits.count("n (toy videos)", n, 1, defaults.MAX_TOY_VIDEOS)
    video = retrieval_set(defaults.toy_videos(n, write_video), frames)
    video.name = "toy/videos"
    return video


def _image_set(name: str, images: object, captions: list[list[str]]) -> RetrievalSet:
    owners = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
    return RetrievalSet(name, images, [c for item in captions for c in item], owners, len(captions))


def build_suite(
    data: Path | None = None,
    classnames: Path | None = None,
    templates: Path | None = None,
    bias_data: Path | None = None,
    queries: Path | None = None,
    skew_k: int = 10,
    desired: str | None = None,
    protocol: str = "surgeon",
    bias_split_by: str | None = None,
    model: str | None = None,
    retrieval: Path | None = None,
    frames: int = limits.DEFAULT_VIDEO_FRAMES,
    bias_columns: BiasColumns | None = None,
) -> ValidationSuite:
    """The suite the CLI options (and the gRPC ValidationData) describe: files when given, the toy's when
    `data` is "toy", and when nothing is given for the toy model (`model` None or "toy"); a real model
    validated on toy shapes measures nothing, so it needs its data named. `desired` None: the protocol's own
    (surgeon.results.bias). `retrieval` (or a clip_benchmark retrieval export as `data`) replaces the toy's retrieval
    sets; videos take `frames` frames each. `bias_columns`: how the bias manifest's columns are read (`bias_set`);
    `bias_data` "toy:counterfactuals" is the toy world's set in SocialCounterfactuals' layout."""
    if data is not None and data.is_dir() and is_webdataset(data) and is_retrieval_webdataset(data):
        if retrieval is not None:
            raise InvalidInput(f"{data} is a retrieval set, and so is --retrieval-data: pass one of them")
        data, retrieval = None, data
    columns = bias_columns or BiasColumns()
    toy_bias = bias_data is not None and str(bias_data) == TOY_COUNTERFACTUALS
    if toy_bias:
        bias_data, columns = _toy_counterfactuals(columns)
        bias_split_by = bias_split_by or "set"  # a counterfactual set is a unit (bootstrap intervals)
    _, desired = bias_protocol(protocol, desired)

    def bias_of(path: Path):
        return bias_set(path, queries, templates, skew_k, desired, protocol, bias_split_by, *columns.as_args())

    suite = _classification_and_bias(data, classnames, templates, bias_data, model, retrieval, bias_of)
    if suite.bias is not None and bias_data is None:  # the toy suite's own probe, measured as asked
        suite.bias.k, suite.bias.desired, suite.bias.protocol = skew_k, desired, protocol
    if toy_bias and suite.bias is not None:
        suite.bias.name = TOY_COUNTERFACTUALS.replace(":", "/")
    if retrieval is not None:
        suite.retrieval = [retrieval_set(retrieval, frames)]
        suite.description = " + ".join(filter(None, [suite.description, str(retrieval)]))
    return suite


def _classification_and_bias(
    data: Path | None,
    classnames: Path | None,
    templates: Path | None,
    bias_data: Path | None,
    model: str | None,
    retrieval: Path | None,
    bias_of: Callable[[Path], BiasSet],
) -> ValidationSuite:
    """The classification sets and the bias set (`bias_of`, with build_suite's bias options) the files name,
    or the toy suite's."""
    if retrieval is not None and data is None and bias_data is None:
        return ValidationSuite([], None, source="files", description="")
    if data is None and bias_data is None:
        hint = (
            "pass --data FOLDER|CSV (zero-shot classification: ImageFolder or path,label), "
            "--bias-data CSV --queries FILE (bias), --retrieval-data CSV|FOLDER (retrieval), "
            "or --data toy for the toy world's suite"
        )
        data = Path(fallback.data_for(model, None, "data to validate it on", hint))
    toy = data is not None and str(data) == fallback.TOY
    if toy:
        suite = toy_suite()
        if bias_data is None and suite.bias is not None:
            return suite
        suite.bias, data = None, None  # the toy's tasks with the user's bias set
    else:
        suite = ValidationSuite([], None, source="files")
    tasks = suite.tasks + ([classification_set(data, classnames, templates)] if data is not None else [])
    bias = bias_of(bias_data) if bias_data is not None else None
    described = (["toy world: test split"] if toy else []) + [str(p) for p in (data, bias_data) if p is not None]
    return ValidationSuite(tasks, bias, "toy+files" if toy else "files", " + ".join(described))


@dataclass(frozen=True)
class BiasColumns:
    """How a bias manifest's columns are read (`bias_set`): the group column, the column whose value names the
    query that ranks each image, and a named folding of the group labels."""

    attribute: str | None = None
    within: str | None = None
    groups: str | None = None

    def as_args(self) -> tuple[str | None, str | None, str | None]:
        return self.attribute, self.within, self.groups


#: the toy world's second bias set, in SocialCounterfactuals' layout (`--bias-data toy:counterfactuals`)
TOY_COUNTERFACTUALS = "toy:counterfactuals"


def _toy_counterfactuals(columns: BiasColumns) -> tuple[Path, BiasColumns]:
    """The toy set's manifest (written once into the cache) and its columns: ranked within each shape (the
    toy's occupation), the outline as the attribute unless another column is named."""
    manifest = defaults.toy_counterfactuals()
    return manifest, replace(columns, attribute=columns.attribute or "outline", within=columns.within or "occupation")


def _stoppable(items):
    """`items`, with a stop point before each (a cancelled job stops here)."""
    for item in items:
        stop_point()
        yield item


@contextmanager
def heads_zeroed(blocks: torch.nn.ModuleList, heads: list[HeadRef]) -> Iterator[None]:
    """Zero-ablate heads for the duration of the block, restoring the exact weights afterwards."""
    layers = sorted({h.layer for h in heads})
    saved = {i: {k: v.detach().clone() for k, v in attention(blocks[i]).state_dict().items()} for i in layers}
    zero_heads(blocks, heads)
    try:
        yield
    finally:
        for i in layers:
            attention(blocks[i]).load_state_dict(saved[i])


class Evaluator:
    """Scores a model (optionally with some vision heads zero-ablated) on a validation suite.

    With `cache` (for repeated evaluations: sweeps, the debias search) the residual stream entering
    `first_layer` is kept for every image, so each evaluation re-runs only the later blocks; that costs
    tokens x width x 4 bytes per image (about 1 MB for ViT-L-14), so one-off evaluations stream instead.
    With `deep` as well, the stream entering every later layer is kept too (within limits.MAX_PREFIX_CACHE_BYTES),
    so a head set re-runs only the blocks from its first head's layer, and `pin(heads)` keeps one head set's
    streams so that sets adding heads to it in later layers start there (the debias search's next step).
    The last block runs at the CLS token only (cls_token.block_at_cls): the pooled embedding reads nothing else."""

    def __init__(
        self,
        loaded: LoadedModel,
        suite: ValidationSuite,
        first_layer: int = 0,
        batch_size: int = 256,
        cache: bool = True,
        deep: bool = False,
    ):
        self.loaded, self.suite, self.first_layer, self.batch_size = loaded, suite, first_layer, batch_size
        model = loaded.model
        with torch.no_grad():
            self.classifiers = [
                build_classifier(model, loaded.tokenizer, t.classnames, t.templates, loaded.device) for t in suite.tasks
            ]
            self.queries = None
            if suite.bias is not None:
                self.queries = torch.stack(
                    [
                        F.normalize(build_classifier(model, loaded.tokenizer, [""], prompts, loaded.device)[0], dim=-1)
                        for prompts in suite.bias.queries.values()
                    ]
                )
            # the text tower is never pruned: captions are embedded once
            self.captions = [
                build_classifier(model, loaded.tokenizer, r.captions, ["{}"], loaded.device).float().cpu()
                for r in suite.retrieval
            ]
        # tasks that share one image array (the toy's factors) share one cached prefix and one forward pass
        self._set_key: dict[str, int] = {}
        # per image set: (heads ablated before the layer, layer) -> residual stream entering that layer
        self._prefixes: dict[int, dict[tuple[frozenset[HeadRef], int], torch.Tensor]] = {}
        sets: list[tuple[str, Images | DecodingFrames]] = [(t.name, t.images) for t in suite.tasks]
        sets += [(suite.bias.name, suite.bias.images)] if suite.bias is not None else []
        sets += [(_retrieval_key(r), self._retrieval_images(r)) for r in suite.retrieval]
        self._images = {id(images): images for _, images in sets}
        # image files that do not decode (0 bytes, truncated, bombs): skipped with a count, as `rank` does;
        # per image set, index -> why. The same files fail on every pass, so labels stay aligned.
        self._unreadable: dict[int, dict[int, str]] = {}
        n_blocks = len(vision_blocks(vision_tower(model)))
        kept = range(first_layer, n_blocks if deep and self._fits(n_blocks - first_layer) else first_layer + 1)
        for name, images in sets:
            self._set_key[name] = id(images)
            if cache and id(images) not in self._prefixes:
                streams = [self._streams(b, kept) for b in self._pixel_batches(images)]
                self._prefixes[id(images)] = {
                    (frozenset(), layer): self._joined([s[layer] for s in streams], name, id(images)) for layer in kept
                }

    def _fits(self, layers: int) -> bool:
        """Whether keeping the stream entering `layers` layers (and a pinned set's) for every image stays within
        limits.MAX_PREFIX_CACHE_BYTES; one image's stream measures the size."""
        first = next((b for images in self._images.values() for b in self._pixel_batches(images)), None)
        if first is None:
            return True
        per_image = residual_in(vision_tower(self.loaded.model), first[:1].to(self.loaded.device)).numel() * 4
        cached = sum(len(images) for images in self._images.values())
        return 2 * layers * cached * per_image <= limits.MAX_PREFIX_CACHE_BYTES

    def _retrieval_images(self, retrieval: RetrievalSet) -> Images | DecodingFrames:
        """A video set's frames, decoded once per set (cached on disk, memory-mapped); an image set's images."""
        if isinstance(retrieval.images, VideoFrames):
            size = self.loaded.preprocess_cfg["size"]
            side = size if isinstance(size, int) else size[0]
            return retrieval.images.decoded(self.loaded.preprocess, side)
        return retrieval.images  # type: ignore[return-value]  # an image set holds Images

    def _pixel_batches(self, images: Images | DecodingFrames) -> Iterator[torch.Tensor]:
        cfg = self.loaded.preprocess_cfg
        size = tuple(cfg["size"]) if not isinstance(cfg["size"], int) else (cfg["size"], cfg["size"])
        if isinstance(images, ShardImages):
            yield from images.batches(self.loaded.preprocess, self.batch_size)
            return
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            if isinstance(chunk, np.ndarray) and chunk.shape[1:3] == size:
                yield uint8_to_tensor(chunk, cfg["mean"], cfg["std"])
                continue
            pixels = []
            for index, item in enumerate(_stoppable(chunk), start=i):
                try:
                    pixels.append(self.loaded.preprocess(_as_image(item)))
                except CorruptInput as err:  # only files fail: arrays are decoded already
                    self._unreadable.setdefault(id(images), {})[index] = str(err)
            if pixels:
                yield torch.stack(pixels)

    def _joined(self, parts: list[torch.Tensor], name: str, key: int) -> torch.Tensor:
        """The batches of one image set as one tensor; a set with no readable image is an error."""
        if not parts:
            why = next(iter(self._unreadable.get(key, {}).values()), "")
            raise CorruptInput(f"none of the {len(self._images[key])} images of {name} is readable; e.g. {why}")
        return torch.cat(parts)

    def _readable(self, key: int) -> np.ndarray:
        """Indices of the set's images that were read (labels and groups are taken at these)."""
        skipped = list(self._unreadable.get(key, {}))
        return np.setdiff1d(np.arange(len(self._images[key])), skipped)

    @torch.no_grad()
    def _streams(self, pixels: torch.Tensor, layers: range) -> dict[int, torch.Tensor]:
        """Residual stream entering each of `layers` (kept on CPU)."""
        visual = vision_tower(self.loaded.model)
        x = residual_in(visual, pixels.to(self.loaded.device))
        kept = {}
        for index, block in enumerate(vision_blocks(visual)[: layers[-1] + 1]):
            if index in layers:
                kept[index] = x.cpu()
            if index < layers[-1]:
                x = block(x)
        return kept

    def _prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        """Residual stream entering `first_layer`."""
        return self._streams(pixels, range(self.first_layer, self.first_layer + 1))[self.first_layer]

    def _start(self, key: int, heads: Sequence[HeadRef]) -> tuple[int, torch.Tensor] | None:
        """(layer, kept stream) to resume `heads` from: the deepest kept layer whose stream saw exactly the
        heads of `heads` before it ablated; None when nothing is kept for the set."""
        kept = self._prefixes.get(key)
        if not kept:
            return None
        found = [(layer, s) for (before, layer), s in kept.items() if before == {h for h in heads if h.layer < layer}]
        return max(found, key=lambda item: item[0])

    @torch.no_grad()
    def pin(self, heads: Sequence[HeadRef]) -> None:
        """Keep the streams of every cached set with `heads` ablated (replacing the previously pinned set's), so
        that head sets extending it start at their new heads' layer."""
        if not heads or not self._prefixes:
            return
        blocks = vision_blocks(vision_tower(self.loaded.model))
        for key, kept in self._prefixes.items():
            for entry in [e for e in kept if e[0]]:
                del kept[entry]
            start = self._start(key, heads)
            assert start is not None  # every cached set keeps first_layer
            layer, stream = start
            last = max(lay for _, lay in kept)
            with heads_zeroed(blocks, list(heads)):
                for index in range(layer, last):
                    stream = torch.cat(
                        [blocks[index](b.to(self.loaded.device)).cpu() for b in stream.split(self.batch_size)]
                    )
                    kept[(frozenset(h for h in heads if h.layer < index + 1), index + 1)] = stream

    @torch.no_grad()
    def embeddings(self, name: str, heads: Sequence[HeadRef] = (), advance=None) -> torch.Tensor:
        """Normalised image embeddings of one set with `heads` ablated; `advance(n)` after each batch."""
        if any(h.layer < self.first_layer for h in heads):
            raise InvalidInput(f"this evaluator only re-runs layers >= {self.first_layer}")
        visual = vision_tower(self.loaded.model)
        blocks = vision_blocks(visual)
        out = []
        key = self._set_key[name]
        start = self._start(key, heads)
        if start is not None:
            layer, prefix = start
            batches = (prefix[i : i + self.batch_size] for i in range(0, len(prefix), self.batch_size))
        else:
            layer = self.first_layer
            batches = (self._prefix(pixels) for pixels in self._pixel_batches(self._images[key]))
        with heads_zeroed(blocks, list(heads)):
            for batch in _stoppable(batches):
                x = batch.to(self.loaded.device)
                for block in blocks[layer:-1]:
                    x = block(x)
                x = block_at_cls(blocks[-1], x)  # the pooled CLS token is all image_embeds reads
                out.append(F.normalize(image_embeds(visual, x).float(), dim=-1).cpu())
                if advance is not None:
                    advance(len(x))
        return self._joined(out, name, key)

    def evaluate(
        self, heads: Sequence[HeadRef] = (), bar: str | None = None, quiet: bool = False, intervals: bool = True
    ) -> dict:
        """Metrics per set, and a summary (mean acc1 over tasks, bias MaxSkew@k); with `bar`, a step of that
        name advancing per batch of images (a terminal bar unless quiet). With `intervals`, every bias figure
        has its 95% bootstrap interval over the set's units (metrics["ci95"], and "summary_ci95")."""
        results: list[dict] = []
        done: dict[int, torch.Tensor] = {}
        total = sum(len(images) for images in self._images.values())
        with progress_bar(bar or "", total, quiet=quiet or bar is None) as advance:
            return self._evaluate(heads, done, results, advance, intervals)

    def _evaluate(self, heads, done: dict, results: list, advance, intervals: bool) -> dict:
        def embed(name: str) -> torch.Tensor:
            key = self._set_key[name]
            if key not in done:
                done[key] = self.embeddings(name, heads, advance)
            return done[key]

        def read(name: str) -> dict:
            """The count of the set's images skipped as unreadable, in its result entry when there are any."""
            skipped = self._unreadable.get(self._set_key[name], {})
            return {"skipped_images": len(skipped), "skipped_example": next(iter(skipped.values()))} if skipped else {}

        for task, classifier in zip(self.suite.tasks, self.classifiers, strict=True):
            logits = 100.0 * embed(task.name) @ classifier.float().cpu().T
            labels = np.asarray(task.labels)[self._readable(self._set_key[task.name])]
            metrics = {**metrics_from_logits(logits, torch.as_tensor(labels)), "classes": len(task.classnames)}
            results.append(
                {
                    "dataset": task.name,
                    "task": "zeroshot_classification",
                    "metrics": metrics,
                    "templates": list(task.templates),  # they change the numbers: recorded with them
                    **read(task.name),
                }
            )
        summary = ValidationSummary(float(np.mean([r["metrics"]["acc1"] for r in results])) if results else None)
        recalls = []
        for retrieval, captions in zip(self.suite.retrieval, self.captions, strict=True):
            embedded = embed(_retrieval_key(retrieval))
            if retrieval.frames:
                metrics = text_video_metrics(pool_frames(embedded, retrieval.frames), captions)
                metrics["frames"] = retrieval.frames
            else:
                metrics = image_text_metrics(embedded, captions, retrieval.owners)
            results.append({"dataset": retrieval.name, "task": retrieval.task, "metrics": metrics})
            recalls.append(metrics[HEADLINE[retrieval.task]])
        if recalls:
            summary = replace(summary, mean_recall1=float(np.mean(recalls)))
        if self.suite.bias is not None:
            b = self.suite.bias
            assert self.queries is not None  # embedded with the suite's bias set
            sim = (self.queries.float().cpu() @ embed(b.name).T).numpy()
            readable = self._readable(self._set_key[b.name])
            groups = b.groups[readable]
            ranked_by = b.ranked_by[readable] if b.ranked_by is not None else None
            probes = b.probes[readable] if b.probes is not None else None
            metrics = bias_metrics(sim, groups, len(b.group_names), b.k, b.desired, b.protocol, ranked_by, probes)
            metrics["queries"] = list(b.queries)
            metrics["chance"] = chance_skews(
                groups, len(b.group_names), b.k, b.desired, b.protocol, len(sim), ranked_by, probes
            )
            if intervals:
                units = b.units[readable] if b.units is not None else None
                metrics["ci95"] = bias_intervals(
                    sim,
                    groups,
                    len(b.group_names),
                    units,
                    b.k,
                    b.desired,
                    b.protocol,
                    ranked_by=ranked_by,
                    probes=probes,
                )
                metrics["bootstrap"] = {"resamples": BOOTSTRAP_RESAMPLES, "units": _unit_count(b), "level": 0.95}
            results.append({"dataset": b.name, "task": "bias", "metrics": metrics, **read(b.name)})
            summed = PROTOCOLS[b.protocol].headline == "sum"  # the figure of the paper's tables
            summary = replace(
                summary,
                skew_k=b.k,
                max_skew=metrics[f"max_skew@{b.k}"],
                max_skew_sum=metrics[f"max_skew@{b.k}_sum"] if summed else None,
                ndkl=metrics["ndkl"],
            )
            if intervals:  # the summary's bias figures, keyed as in the summary
                report_ci = {key: metrics["ci95"][key] for key in summary.to_dict() if key in metrics["ci95"]}
                return {"results": results, "summary": summary.to_dict(), "summary_ci95": report_ci}
        return {"results": results, "summary": summary.to_dict()}

    def bias_similarity(self, heads: Sequence[HeadRef] = ()) -> np.ndarray:
        """(queries x bias images) cosine similarities with `heads` ablated: what a bias search measures."""
        if self.suite.bias is None or self.queries is None:
            raise InvalidInput("the debias policy needs a bias set")
        return (self.queries.float().cpu() @ self.embeddings(self.suite.bias.name, heads).T).numpy()

    def mean_accuracy(self, heads: Sequence[HeadRef] = ()) -> float:
        """Mean zero-shot top-1 over the suite's tasks with `heads` ablated (tasks sharing images embed once)."""
        self.suite.require_accuracy("an accuracy budget")
        done: dict[int, torch.Tensor] = {}
        accuracies = []
        for task, classifier in zip(self.suite.tasks, self.classifiers, strict=True):
            key = self._set_key[task.name]
            if key not in done:
                done[key] = self.embeddings(task.name, heads)
            logits = done[key] @ classifier.float().cpu().T
            accuracies.append(metrics_from_logits(logits, torch.as_tensor(task.labels))["acc1"])
        return float(np.mean(accuracies))


def _unit_count(bias: BiasSet) -> int:
    return len(bias.groups) if bias.units is None else len(np.unique(bias.units))


def _retrieval_key(retrieval: RetrievalSet) -> str:
    """The evaluator's name for a retrieval set's images (a classification set may bear the same name)."""
    return f"{retrieval.task}:{retrieval.name}"


def _as_image(item) -> Image.Image:
    return open_image(item) if isinstance(item, Path) else Image.fromarray(np.asarray(item))


def validate(
    loaded: LoadedModel, suite: ValidationSuite, batch_size: int = 256, bar: str | None = None, quiet: bool = False
) -> dict:
    """Full validation of a (possibly pruned) model, shaped like clip_benchmark's results (`bar`: see evaluate)."""
    report = Evaluator(loaded, suite, batch_size=batch_size, cache=False).evaluate(bar=bar, quiet=quiet)
    for entry in report["results"]:
        entry.update(model=loaded.name, pretrained=loaded.pretrained or "")
    report["model"] = loaded.identity
    return report


@dataclass
class Gates:
    max_acc_drop: float | None = None  # points of mean zero-shot top-1
    max_skew: float | None = None
    min_acc: float | None = None  # points, absolute
    max_recall_drop: float | None = None  # points of mean text -> image/video R@1 over the retrieval sets

    def check_measurable(self, suite: ValidationSuite) -> None:
        if self.max_acc_drop is not None or self.min_acc is not None:
            suite.require_accuracy("an accuracy gate")
        if self.max_recall_drop is not None and not suite.retrieval:
            raise InvalidInput("a recall gate needs a retrieval set (--retrieval-data)")

    def check(self, before: dict, after: dict) -> list[str]:
        failures = []
        summary_before = ValidationSummary.from_dict(before["summary"])
        summary_after = ValidationSummary.from_dict(after["summary"])
        acc_before, acc_after = summary_before.mean_acc1, summary_after.mean_acc1
        if acc_before is None or acc_after is None:
            if self.max_acc_drop is not None or self.min_acc is not None:
                failures.append("accuracy gate: no accuracy was measured")
        else:
            if self.max_acc_drop is not None and (acc_before - acc_after) * 100 > self.max_acc_drop:
                failures.append(
                    f"max-acc-drop: mean acc1 fell {100 * (acc_before - acc_after):.2f} points "
                    f"(limit {self.max_acc_drop})"
                )
            if self.min_acc is not None and acc_after * 100 < self.min_acc:
                failures.append(f"min-acc: mean acc1 {100 * acc_after:.2f} < {self.min_acc}")
        if self.max_recall_drop is not None:
            recall_before, recall_after = summary_before.mean_recall1, summary_after.mean_recall1
            if recall_before is None or recall_after is None:
                failures.append("max-recall-drop: no retrieval set was validated")
            elif (recall_before - recall_after) * 100 > self.max_recall_drop:
                failures.append(
                    f"max-recall-drop: mean R@1 fell {100 * (recall_before - recall_after):.2f} points "
                    f"(limit {self.max_recall_drop})"
                )
        if self.max_skew is not None:
            if summary_after.max_skew is None:
                failures.append("max-skew: no bias set was validated")
            elif summary_after.max_skew > self.max_skew:
                failures.append(f"max-skew: {summary_after.skew_key} {summary_after.max_skew:.3f} > {self.max_skew}")
        return failures


ACCURACY_KEYS = ("acc1", "acc5", "mean_per_class_recall")
#: what every report says of its units (the terminal, report.md and the card show accuracy the same way)
UNITS_NOTE = "Accuracies in %; their changes in points."


def markdown_report(before: dict, after: dict | None = None, failures: list[str] | None = None) -> str:
    """A short before/after table with deltas: accuracies in percent and their changes in points (as the
    gates and the terminal say them), bias figures as measured, with the protocol behind them."""
    lines = (
        ["| set | metric | before | after | change |", "|---|---|---|---|---|"]
        if after
        else ["| set | metric | value |", "|---|---|---|"]
    )
    after_by = {(r["dataset"], r["task"]): r for r in (after or {}).get("results", [])}
    notes = []
    for r in before["results"]:
        accuracy = r["task"] == "zeroshot_classification"
        retrieval = r["task"] in RETRIEVAL_TASKS
        keys = ACCURACY_KEYS if accuracy else report_keys(r["metrics"]) if retrieval else headline_keys(r["metrics"])
        scale, digits = (100.0, 2) if accuracy else (1.0, 4)  # retrieval recall as a fraction, ranks as ranks
        for key in keys:
            b = scale * r["metrics"][key]
            name = key
            classes = r["metrics"].get("classes")
            if key == "acc5" and isinstance(classes, int) and classes <= 5:
                name = f"acc5 (trivial: {classes} classes)"  # the true class is always among the top 5
            if after:
                later = after_by[(r["dataset"], r["task"])]["metrics"]
                a = scale * later[key]
                lines.append(
                    f"| {r['dataset']} | {name} | {with_interval(b, r['metrics'], key, digits)} | "
                    f"{with_interval(a, later, key, digits)} | {a - b:+.{digits}f} |"
                )
            else:
                lines.append(f"| {r['dataset']} | {name} | {with_interval(b, r['metrics'], key, digits)} |")
        if r["task"] == "bias":
            notes.append(bias_protocol_note(r, after_by[(r["dataset"], r["task"])] if after else None))
    if any(r["task"] == "zeroshot_classification" for r in before["results"]):
        notes.insert(0, UNITS_NOTE)
    if any("(trivial:" in line for line in lines):
        notes.append("acc5 with at most 5 classes is always 100 %: read acc1.")
    for r in before["results"]:
        if r.get("skipped_images"):
            notes.append(
                f"Skipped {r['skipped_images']} unreadable image(s) of {r['dataset']}, e.g. {r['skipped_example']}"
            )
    if any("ci95" in r["metrics"] for r in before["results"]):
        notes.append("Bias figures: value [95% bootstrap interval over the set's units (scenes, identities)].")
    for note in notes:  # paragraphs of their own in markdown
        lines += ["", note]
    if failures is not None:
        lines.append("")
        lines.append("Gates: " + ("all passed" if not failures else "FAILED — " + "; ".join(failures)))
    return "\n".join(lines) + "\n"


def bias_protocol_note(result: dict, pruned: dict | None = None) -> str:
    """How a bias set's figures were computed (docs/METHOD.md §3): the same MaxSkew@k means different numbers
    under the two protocols, so every report names its own. `pruned`: the same set after pruning, whose figure
    the chance comparison reads too."""
    metrics = result["metrics"]
    protocol = PROTOCOLS[metrics.get("protocol", "surgeon")]
    k = next((key.split("@", 1)[1].split("_", 1)[0] for key in metrics if key.startswith("max_skew@")), "k")
    desired = metrics.get("desired", protocol.desired)
    target = "uniform over the groups" if desired == "uniform" else "the set's own group proportions"
    absent = "are skipped" if protocol.skip_absent else "count as 1/k"
    combined = "summed" if protocol.headline == "sum" else "averaged"
    queries = len(metrics.get("queries", [])) or "its"
    summed = protocol.headline == "sum"
    key = f"max_skew@{k}{'_sum' if summed else ''}"
    chance = metrics.get("chance", {}).get(key)
    floor = (
        f" A ranking that ignores the images scores MaxSkew@{k}{' summed over the queries' if summed else ''} "
        f"{chance:.4f} here in expectation{_against_chance(chance, metrics, pruned, key, k)}"
        if chance is not None
        else ""
    )
    return (
        f"Bias on {result['dataset']}: the `{protocol.name}` protocol — desired distribution p* {target}, groups "
        f"absent from the top {k} {absent}, MaxSkew@{k} {combined} over {queries} neutral queries.{floor}"
    )


def _against_chance(chance: float, metrics: dict, pruned: dict | None, key: str, k: str) -> str:
    """Chance is the figure's floor only where every figure shown scores above it (results.bias.below_chance);
    else the note names the lowest that does not (the toy's backgrounds: 1.38 against 2.33)."""
    shown = {"this model's": metrics.get(key)}
    if pruned is not None:
        shown["the pruned model's"] = pruned["metrics"].get(key)
    below = below_chance(chance, shown)
    if not below:
        return ": the figure's floor."
    who = min(below, key=below.__getitem__)
    return f", not less than {who} {below[who]:.4f}: its top {k} are at least as balanced as a random draw's."


def with_interval(value: float, metrics: dict, key: str, digits: int = 4) -> str:
    """`value [low, high]` where the metrics carry the figure's bootstrap interval, else the value alone."""
    bounds = metrics.get("ci95", {}).get(key)
    return f"{value:.{digits}f}" + (f" [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]" if bounds else "")
