"""Stage 7: validation — zero-shot classification (docs/METHOD.md §4), bias metrics (§3) and zero-shot
retrieval (image <-> text and text -> video, §6; surgeon.retrieval) on a suite of sets, before and after
surgery, with gates.

`Evaluator` caches the residual stream before the first layer it may prune, so scoring many head sets
(sweeps, the debias search) re-runs only the remaining blocks; numbers are identical to a full forward."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from surgeon import defaults, limits
from surgeon.bias import PROTOCOLS, bias_metrics, bias_protocol, headline_keys
from surgeon.clipbench import dataset_keys, read_json_entry
from surgeon.errors import InvalidInput, NotFound
from surgeon.heads import HeadRef
from surgeon.hooks import attention, image_embeds, residual_in, vision_blocks, vision_tower
from surgeon.images import open_image
from surgeon.limits import echo
from surgeon.load import LoadedModel
from surgeon.paths import read_lines
from surgeon.progress import progress_bar, stop_point
from surgeon.records import ValidationSummary
from surgeon.retrieval import (
    HEADLINE,
    RetrievalSet,
    image_text_metrics,
    pool_frames,
    report_keys,
    text_video_metrics,
)
from surgeon.retrieval import TASKS as RETRIEVAL_TASKS
from surgeon.surgery import zero_heads
from surgeon.templates import fill, read_templates
from surgeon.video import VIDEO_SUFFIXES, DecodingFrames, VideoFrames, write_video
from surgeon.webdata import (
    CLASSNAMES_FILE,
    TEMPLATES_FILE,
    ShardImages,
    is_retrieval_webdataset,
    is_webdataset,
    retrieval_webdataset,
    webdataset_set,
)
from surgeon.zeroshot import build_classifier, metrics_from_logits, uint8_to_tensor

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
    protocol: str = "surgeon"  # surgeon.bias.PROTOCOLS
    units: np.ndarray | None = None  # what must not straddle a search/held-out split (scene, identity); None: image

    def take(self, index: np.ndarray, name: str | None = None) -> BiasSet:
        images = take_images(self.images, index)
        units = None if self.units is None else self.units[index]
        return replace(self, name=name or self.name, images=images, groups=self.groups[index], units=units)


@dataclass
class ValidationSuite:
    tasks: list[ClassificationSet]
    bias: BiasSet | None = None
    source: str = "toy"
    description: str = "toy world: test split, bias probe (seed 0)"
    retrieval: list[RetrievalSet] = field(default_factory=list)  # image <-> text and text -> video sets

    def require_accuracy(self, what: str) -> None:
        """Refuse, before any work, a use that trades off accuracy when there are no tasks to measure it on."""
        if not self.tasks:
            raise InvalidInput(f"{what} measures accuracy: it needs a classification set (--data) besides the bias set")

    def subset(self, n_images: int, n_bias: int | None = None, seed: int = 0) -> ValidationSuite:
        """A smaller suite for searches (the debias policy): the first n images of each task (tasks sharing an
        image array still share it) and a seeded random n of the bias set (keeps its group mix)."""
        sliced: dict[int, tuple] = {}
        tasks = []
        for t in self.tasks:
            if id(t.images) not in sliced:
                sliced[id(t.images)] = (t.images[:n_images],)
            tasks.append(
                ClassificationSet(t.name, t.classnames, t.templates, sliced[id(t.images)][0], t.labels[:n_images])
            )
        bias = self.bias
        if bias is not None and n_bias is not None and n_bias < len(bias.groups):
            bias = bias.take(np.sort(np.random.default_rng(seed).choice(len(bias.groups), n_bias, replace=False)))
        return ValidationSuite(tasks, bias, self.source, self.description)

    def split_for_search(self, seed: int = 0) -> tuple[ValidationSuite, ValidationSuite]:
        """(search, held-out): disjoint suites, so that a policy that selects on measurements (debias) is
        reported on data it never saw. The toy world draws its search suite from its own disjoint streams (the
        'val' split, a probe with fresh scenes) and keeps this suite, the one every other policy reports on, as
        the held-out one. Files are split reproducibly (seeded): each task's images in half, the bias set by
        its units (a manifest column, see bias_set), never one unit on both sides."""
        if self.source == "toy":
            n_per_task = len(self.tasks[0].labels) if self.tasks else None
            n_scenes = None if self.bias is None or self.bias.units is None else len(np.unique(self.bias.units))
            search = toy_suite(n_per_task, n_scenes, split="val", probe_seed=SEARCH_PROBE_SEED)
            if search.bias is not None and self.bias is not None:
                search.bias = replace(
                    search.bias, k=self.bias.k, desired=self.bias.desired, protocol=self.bias.protocol
                )
            return search, self
        rng = np.random.default_rng(seed)
        halves: tuple[list[ClassificationSet], list[ClassificationSet]] = ([], [])
        for task in self.tasks:
            order = rng.permutation(len(task.labels))
            for side, index in zip(halves, np.array_split(order, 2), strict=True):
                index = np.sort(index)
                side.append(replace(task, images=take_images(task.images, index), labels=task.labels[index]))
        biases: tuple[BiasSet | None, BiasSet | None] = (None, None)
        if self.bias is not None:
            biases = _split_bias(self.bias, rng)
        held_out = f"{self.description} (held-out half, seed {seed})"
        return (  # no search selects on retrieval: its sets are reported whole, on the held-out side
            ValidationSuite(halves[0], biases[0], self.source, f"{self.description} (search half, seed {seed})"),
            ValidationSuite(halves[1], biases[1], self.source, held_out, self.retrieval),
        )

    def __post_init__(self):
        for task in self.tasks:
            if len(task.labels) == 0:
                raise InvalidInput(f"validation set {task.name} is empty")
        if self.bias is not None and len(self.bias.groups) == 0:
            raise InvalidInput(f"bias set {self.bias.name} is empty")


SEARCH_PROBE_SEED = 1  # the toy search suite's bias probe; the reported one is seed 0


def toy_suite(
    n_per_task: int | None = None, n_scenes: int | None = None, split: str = "test", probe_seed: int = 0
) -> ValidationSuite:
    tasks = [
        ClassificationSet(f"toy/{t.name}", list(t.classnames), list(t.templates), t.images, np.asarray(t.labels))
        for t in defaults.toy_zeroshot_tasks(n=n_per_task, split=split)
    ]
    probe = defaults.toy_bias_probe(n_scenes=n_scenes, seed=probe_seed)
    queries = {shape: list(prompts) for shape, prompts in probe.queries.items()}
    bias = BiasSet(
        "toy/bias-probe",
        probe.images,
        np.asarray(probe.groups),
        list(probe.group_names),
        queries,
        units=np.asarray(probe.scene_ids),  # a scene's renderings (one per group) stay on one side of a split
    )
    return ValidationSuite(tasks, bias, "toy", f"toy world: {split} split, bias probe (seed {probe_seed})")


def _split_bias(bias: BiasSet, rng: np.random.Generator) -> tuple[BiasSet, BiasSet]:
    """Half of the units each (seeded); refuse halves that cannot measure MaxSkew@k for every group."""
    units = bias.units if bias.units is not None else np.arange(len(bias.groups))
    distinct = np.unique(units)
    chosen = set(rng.permutation(distinct)[: len(distinct) // 2].tolist())
    in_search = np.array([u in chosen for u in units.tolist()], dtype=bool)
    sides = []
    for mask, label in ((in_search, "search"), (~in_search, "held-out")):
        index = np.flatnonzero(mask)
        present = len(np.unique(bias.groups[index])) if len(index) else 0
        if len(index) < 2 * bias.k or present < len(bias.group_names):
            raise InvalidInput(
                f"bias set {bias.name} is too small to split into a search and a held-out half: the {label} half "
                f"has {len(index)} images in {present} of {len(bias.group_names)} groups "
                f"(needs >= {2 * bias.k} images, every group)",
                hint="pass a larger bias set, or split units that group fewer images",
            )
        sides.append(bias.take(index, f"{bias.name} ({label} half)"))
    return sides[0], sides[1]


def _manifest_rows(path: Path, columns: int) -> list[list[str]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [r for r in csv.reader(handle) if r and any(c.strip() for c in r)]
    except FileNotFoundError:
        raise NotFound(f"manifest not found: {path}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"manifest {path} is not UTF-8") from None
    if rows and rows[0][0].strip().lower() == "path":
        rows = rows[1:]
    if not rows:
        raise InvalidInput(f"manifest {path} has no rows")
    bad = [i for i, r in enumerate(rows) if len(r) < columns]
    if bad:
        raise InvalidInput(f"manifest {path}: row {bad[0] + 1} has fewer than {columns} columns")
    return rows


def read_classnames(path: Path, dataset: str) -> list[str]:
    """One per line, or clip_benchmark's JSON keyed by dataset name."""
    if path.suffix.lower() == ".json":
        return read_json_entry(path, dataset_keys(dataset), "class names file")
    return read_lines(path, "class names file")


def webdataset_classification(
    data: Path, classnames_file: Path | None = None, templates_file: Path | None = None
) -> ClassificationSet:
    """clip_benchmark's webdataset layout: test/*.tar, with its classnames.txt and templates unless given."""
    name = f"wds/{data.name}"
    own_templates = data / TEMPLATES_FILE
    templates = read_templates(templates_file or (own_templates if own_templates.is_file() else None), name)
    if classnames_file is None and not (data / CLASSNAMES_FILE).is_file():
        raise NotFound(f"{data} has no {CLASSNAMES_FILE}", hint="pass --classnames")
    names = read_classnames(classnames_file or data / CLASSNAMES_FILE, name)
    images, labels = webdataset_set(data)
    if max(labels) >= len(names) or min(labels) < 0:
        raise InvalidInput(f"{data}: class index {max(labels)} but {len(names)} class names")
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
        rows = _manifest_rows(data, 2)
        paths = [(data.parent / r[0].strip()) for r in rows]
        names = read_lines(classnames_file, "class names file") if classnames_file else None
        classes, label_array = _manifest_labels(data, [r[1].strip() for r in rows], names, classnames_file)
        return ClassificationSet(data.name, [n.replace("_", " ") for n in classes], templates, paths, label_array)
    if not paths:
        raise InvalidInput(f"validation set {data} is empty")
    names = classes
    if classnames_file:
        names = read_classnames(classnames_file, data.name)
        if len(names) != len(classes):
            raise InvalidInput(f"{classnames_file} has {len(names)} names for {len(classes)} classes")
    return ClassificationSet(data.name, [n.replace("_", " ") for n in names], templates, paths, np.asarray(labels))


def _manifest_labels(
    manifest: Path, raw: list[str], names: list[str] | None, names_file: Path | None
) -> tuple[list[str], np.ndarray]:
    """(class names, label indices) of a CSV manifest. Integer labels are indices into --classnames (sorting
    them as text would put "10" before "2"); name labels are looked up in --classnames when given (its order
    is the class order), else sorted. Mixing both kinds, or names missing from --classnames, is an error."""
    numeric = [label.isdigit() for label in raw]
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
        beyond = next((i for i in indices if i >= len(names)), None)
        if beyond is not None:
            raise InvalidInput(f"manifest {manifest} has label {beyond}, but {names_file} names {len(names)} classes")
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
    queries_file: Path,
    templates_file: Path | None = None,
    k: int = 10,
    desired: str = "uniform",
    protocol: str = "surgeon",
    split_by: str | None = None,
) -> BiasSet:
    """A CSV manifest (path,group[,...]) and neutral queries, one per line. `split_by` names a column of the
    manifest's header (e.g. an identity or scene id): images sharing its value stay on one side of a
    search/held-out split."""
    rows = _manifest_rows(manifest, 2)
    units = None
    if split_by is not None:
        header = _manifest_header(manifest)
        if split_by not in header:
            raise InvalidInput(
                f"--bias-split-by {split_by[:80]!r} is not a column of {manifest.name}",
                hint=f"its header names: {', '.join(header) or 'none (the first row must be a header)'}",
            )
        column = header.index(split_by)
        if any(len(r) <= column for r in rows):
            raise InvalidInput(f"manifest {manifest}: some rows have no {split_by!r} column")
        units = np.unique([r[column].strip() for r in rows], return_inverse=True)[1]
    group_names = sorted({r[1].strip() for r in rows})
    templates = read_templates(templates_file, manifest.name)
    queries = {q: [fill(t, q) for t in templates] for q in read_lines(queries_file, "queries file")}
    return BiasSet(
        manifest.name,
        [manifest.parent / r[0].strip() for r in rows],
        np.asarray([group_names.index(r[1].strip()) for r in rows]),
        group_names,
        queries,
        k,
        desired,
        units=units,
        protocol=protocol,
    )


def caption_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """A retrieval manifest (CSV, header `path,caption`, one row per caption) -> (items in order of first
    appearance, each item's captions in file order)."""
    items: dict[str, list[str]] = {}
    for row in _manifest_rows(path, 2):
        caption = row[1].strip()
        if not caption:
            raise InvalidInput(f"manifest {path}: {row[0].strip()[:80]!r} has an empty caption")
        items.setdefault(row[0].strip(), []).append(caption)
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


def _manifest_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        first = next(csv.reader(handle), [])
    return [c.strip() for c in first] if first and first[0].strip().lower() == "path" else []


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
) -> ValidationSuite:
    """The suite the CLI options (and the gRPC ValidationData) describe: files when given, the toy's when
    `data` is "toy", and when nothing is given for the toy model (`model` None or "toy"); a real model
    validated on toy shapes measures nothing, so it needs its data named. `desired` None: the protocol's own
    (surgeon.bias). `retrieval` (or a clip_benchmark retrieval export as `data`) replaces the toy's retrieval
    sets; videos take `frames` frames each."""
    if data is not None and data.is_dir() and is_webdataset(data) and is_retrieval_webdataset(data):
        if retrieval is not None:
            raise InvalidInput(f"{data} is a retrieval set, and so is --retrieval-data: pass one of them")
        data, retrieval = None, data
    suite = _classification_and_bias(
        data, classnames, templates, bias_data, queries, skew_k, desired, protocol, bias_split_by, model, retrieval
    )
    if retrieval is not None:
        suite.retrieval = [retrieval_set(retrieval, frames)]
        suite.description = " + ".join(filter(None, [suite.description, str(retrieval)]))
    return suite


def _classification_and_bias(
    data: Path | None,
    classnames: Path | None,
    templates: Path | None,
    bias_data: Path | None,
    queries: Path | None,
    skew_k: int,
    desired: str | None,
    protocol: str,
    bias_split_by: str | None,
    model: str | None,
    retrieval: Path | None,
) -> ValidationSuite:
    _, desired = bias_protocol(protocol, desired)
    toy = data is not None and str(data) == "toy"
    if retrieval is not None and data is None and bias_data is None:
        return ValidationSuite([], None, source="files", description="")
    if data is None and bias_data is None and model not in (None, "toy"):
        raise InvalidInput(
            f"{model} is not the toy model: name the data to validate it on",
            hint="pass --data FOLDER|CSV (zero-shot classification: ImageFolder or path,label), "
            "--bias-data CSV --queries FILE (bias), --retrieval-data CSV|FOLDER (retrieval), "
            "or --data toy for the toy world's suite",
        )
    if toy or (data is None and bias_data is None):
        suite = toy_suite()
        if bias_data is None and suite.bias is not None:
            suite.bias.k, suite.bias.desired, suite.bias.protocol = skew_k, desired, protocol
            return suite
        suite.bias, data = None, None  # the toy's tasks with the user's bias set
    else:
        suite = ValidationSuite([], None, source="files")
    if bias_data is not None and queries is None:
        raise InvalidInput("--bias-data needs --queries (neutral queries, one per line)")
    tasks = suite.tasks + ([classification_set(data, classnames, templates)] if data is not None else [])
    bias = (
        bias_set(bias_data, queries, templates, skew_k, desired, protocol, bias_split_by)
        if bias_data is not None and queries is not None  # --bias-data without --queries was refused above
        else None
    )
    described = (["toy world: test split"] if toy else []) + [str(p) for p in (data, bias_data) if p is not None]
    return ValidationSuite(tasks, bias, "toy+files" if toy else "files", " + ".join(described))


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
    tokens x width x 4 bytes per image (about 1 MB for ViT-L-14), so one-off evaluations stream instead."""

    def __init__(
        self,
        loaded: LoadedModel,
        suite: ValidationSuite,
        first_layer: int = 0,
        batch_size: int = 256,
        cache: bool = True,
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
        self._prefixes: dict[int, torch.Tensor] = {}
        sets: list[tuple[str, Images | DecodingFrames]] = [(t.name, t.images) for t in suite.tasks]
        sets += [(suite.bias.name, suite.bias.images)] if suite.bias is not None else []
        sets += [(_retrieval_key(r), self._retrieval_images(r)) for r in suite.retrieval]
        self._images = {id(images): images for _, images in sets}
        for name, images in sets:
            self._set_key[name] = id(images)
            if cache and id(images) not in self._prefixes:
                self._prefixes[id(images)] = torch.cat([self._prefix(b) for b in self._pixel_batches(images)])

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
            else:
                yield torch.stack([self.loaded.preprocess(_as_image(x)) for x in _stoppable(chunk)])

    @torch.no_grad()
    def _prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        """Residual stream entering `first_layer` (kept on CPU)."""
        visual = vision_tower(self.loaded.model)
        x = residual_in(visual, pixels.to(self.loaded.device))
        for block in vision_blocks(visual)[: self.first_layer]:
            x = block(x)
        return x.cpu()

    @torch.no_grad()
    def embeddings(self, name: str, heads: Sequence[HeadRef] = (), advance=None) -> torch.Tensor:
        """Normalised image embeddings of one set with `heads` ablated; `advance(n)` after each batch."""
        if any(h.layer < self.first_layer for h in heads):
            raise InvalidInput(f"this evaluator only re-runs layers >= {self.first_layer}")
        visual = vision_tower(self.loaded.model)
        blocks = vision_blocks(visual)
        out = []
        key = self._set_key[name]
        if key in self._prefixes:
            prefix = self._prefixes[key]
            batches = (prefix[i : i + self.batch_size] for i in range(0, len(prefix), self.batch_size))
        else:
            batches = (self._prefix(pixels) for pixels in self._pixel_batches(self._images[key]))
        with heads_zeroed(blocks, list(heads)):
            for batch in _stoppable(batches):
                x = batch.to(self.loaded.device)
                for block in blocks[self.first_layer :]:
                    x = block(x)
                out.append(F.normalize(image_embeds(visual, x).float(), dim=-1).cpu())
                if advance is not None:
                    advance(len(x))
        return torch.cat(out)

    def evaluate(self, heads: Sequence[HeadRef] = (), bar: str | None = None, quiet: bool = False) -> dict:
        """Metrics per set, and a summary (mean acc1 over tasks, bias MaxSkew@k); with `bar`, a step of that
        name advancing per batch of images (a terminal bar unless quiet)."""
        results: list[dict] = []
        done: dict[int, torch.Tensor] = {}
        total = sum(len(images) for images in self._images.values())
        with progress_bar(bar or "", total, quiet=quiet or bar is None) as advance:
            return self._evaluate(heads, done, results, advance)

    def _evaluate(self, heads, done: dict, results: list, advance) -> dict:
        def embed(name: str) -> torch.Tensor:
            key = self._set_key[name]
            if key not in done:
                done[key] = self.embeddings(name, heads, advance)
            return done[key]

        for task, classifier in zip(self.suite.tasks, self.classifiers, strict=True):
            logits = 100.0 * embed(task.name) @ classifier.float().cpu().T
            metrics = metrics_from_logits(logits, torch.as_tensor(task.labels))
            results.append({"dataset": task.name, "task": "zeroshot_classification", "metrics": metrics})
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
            metrics = bias_metrics(sim, b.groups, len(b.group_names), b.k, b.desired, b.protocol)
            metrics["queries"] = list(b.queries)
            results.append({"dataset": b.name, "task": "bias", "metrics": metrics})
            summed = PROTOCOLS[b.protocol].headline == "sum"  # the figure of the paper's tables
            summary = replace(
                summary,
                skew_k=b.k,
                max_skew=metrics[f"max_skew@{b.k}"],
                max_skew_sum=metrics[f"max_skew@{b.k}_sum"] if summed else None,
                ndkl=metrics["ndkl"],
            )
        return {"results": results, "summary": summary.to_dict()}

    def score(self, heads: list[HeadRef]) -> tuple[float, float]:
        """(mean zero-shot acc1, MaxSkew@k) — what the debias policy trades off."""
        if self.suite.bias is None:
            raise InvalidInput("the debias policy needs a bias set")
        summary = ValidationSummary.from_dict(self.evaluate(heads)["summary"])
        assert summary.mean_acc1 is not None and summary.max_skew is not None  # accuracy required, bias present
        return summary.mean_acc1, summary.max_skew


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


def markdown_report(before: dict, after: dict | None = None, failures: list[str] | None = None) -> str:
    """A short before/after table with deltas."""
    lines = (
        ["| set | metric | before | after | delta |", "|---|---|---|---|---|"]
        if after
        else ["| set | metric | value |", "|---|---|---|"]
    )
    after_by = {(r["dataset"], r["task"]): r for r in (after or {}).get("results", [])}
    for r in before["results"]:
        keys = (
            ["acc1", "acc5", "mean_per_class_recall"]
            if r["task"] == "zeroshot_classification"
            else report_keys(r["metrics"])
            if r["task"] in RETRIEVAL_TASKS
            else headline_keys(r["metrics"])
        )
        for key in keys:
            b = r["metrics"][key]
            if after:
                a = after_by[(r["dataset"], r["task"])]["metrics"][key]
                lines.append(f"| {r['dataset']} | {key} | {b:.4f} | {a:.4f} | {a - b:+.4f} |")
            else:
                lines.append(f"| {r['dataset']} | {key} | {b:.4f} |")
    if failures is not None:
        lines.append("")
        lines.append("Gates: " + ("all passed" if not failures else "FAILED — " + "; ".join(failures)))
    return "\n".join(lines) + "\n"
