"""Stage 7: validation — zero-shot classification (METHOD.md §4) and bias metrics (§3) on a suite of
image sets, before and after surgery, with gates.

`Evaluator` caches the residual stream before the first layer it may prune, so scoring many head sets
(sweeps, the debias search) re-runs only the remaining blocks; numbers are identical to a full forward."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from surgeon.bias import bias_metrics
from surgeon.errors import GateFailed, InvalidInput
from surgeon.images import open_image
from surgeon.load import LoadedModel
from surgeon.pools import read_lines
from surgeon.progress import progress_bar
from surgeon.surgery import HeadRef, zero_heads
from surgeon.templates import fill, read_templates
from surgeon.zeroshot import build_classifier, metrics_from_logits, uint8_to_tensor


@dataclass
class ClassificationSet:
    name: str
    classnames: list[str]
    templates: list[str]
    images: np.ndarray | list[Path]  # uint8 N x H x W x 3, or image files
    labels: np.ndarray


@dataclass
class BiasSet:
    name: str
    images: np.ndarray | list[Path]
    groups: np.ndarray
    group_names: list[str]
    queries: dict[str, list[str]]  # query name -> prompts averaged into one query
    k: int = 10
    desired: str = "uniform"


@dataclass
class ValidationSuite:
    tasks: list[ClassificationSet]
    bias: BiasSet | None = None
    source: str = "toy"

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
            pick = np.sort(np.random.default_rng(seed).choice(len(bias.groups), n_bias, replace=False))
            images = bias.images[pick] if isinstance(bias.images, np.ndarray) else [bias.images[i] for i in pick]
            bias = BiasSet(bias.name, images, bias.groups[pick], bias.group_names, bias.queries, bias.k, bias.desired)
        return ValidationSuite(tasks, bias, self.source)

    def __post_init__(self):
        for task in self.tasks:
            if len(task.labels) == 0:
                raise InvalidInput(f"validation set {task.name} is empty")
        if self.bias is not None and len(self.bias.groups) == 0:
            raise InvalidInput(f"bias set {self.bias.name} is empty")


def toy_suite(n_per_task: int | None = None, n_scenes: int | None = None) -> ValidationSuite:
    from surgeon.toy import world

    tasks = [
        ClassificationSet(f"toy/{t.name}", list(t.classnames), list(t.templates), t.images, np.asarray(t.labels))
        for t in world.zeroshot_tasks(n=n_per_task)
    ]
    probe = world.bias_probe(n_scenes=n_scenes)
    queries = {shape: list(prompts) for shape, prompts in probe.queries.items()}
    bias = BiasSet("toy/bias-probe", probe.images, np.asarray(probe.groups), list(probe.group_names), queries)
    return ValidationSuite(tasks, bias, "toy")


def _manifest_rows(path: Path, columns: int) -> list[list[str]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [r for r in csv.reader(handle) if r and any(c.strip() for c in r)]
    except FileNotFoundError:
        raise InvalidInput(f"manifest not found: {path}") from None
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


def classification_set(
    data: Path, classnames_file: Path | None = None, templates_file: Path | None = None
) -> ClassificationSet:
    """An ImageFolder (one folder per class) or a CSV manifest (path,label)."""
    templates = read_templates(templates_file)
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
        classes = sorted({r[1].strip() for r in rows})
        paths = [(data.parent / r[0].strip()) for r in rows]
        labels = [classes.index(r[1].strip()) for r in rows]
    if not paths:
        raise InvalidInput(f"validation set {data} is empty")
    names = classes
    if classnames_file:
        names = read_lines(classnames_file, "class names file")
        if len(names) != len(classes):
            raise InvalidInput(f"{classnames_file} has {len(names)} names for {len(classes)} classes")
    return ClassificationSet(data.name, [n.replace("_", " ") for n in names], templates, paths, np.asarray(labels))


def bias_set(
    manifest: Path, queries_file: Path, templates_file: Path | None = None, k: int = 10, desired: str = "uniform"
) -> BiasSet:
    """A CSV manifest (path,group[,...]) and neutral queries, one per line."""
    rows = _manifest_rows(manifest, 2)
    group_names = sorted({r[1].strip() for r in rows})
    templates = read_templates(templates_file)
    queries = {q: [fill(t, q) for t in templates] for q in read_lines(queries_file, "queries file")}
    return BiasSet(
        manifest.name,
        [manifest.parent / r[0].strip() for r in rows],
        np.asarray([group_names.index(r[1].strip()) for r in rows]),
        group_names,
        queries,
        k,
        desired,
    )


def build_suite(
    data: Path | None = None,
    classnames: Path | None = None,
    templates: Path | None = None,
    bias_data: Path | None = None,
    queries: Path | None = None,
    skew_k: int = 10,
    desired: str = "uniform",
    model: str | None = None,
) -> ValidationSuite:
    """The suite the CLI options (and the gRPC ValidationData) describe: files when given, the toy's when
    `data` is "toy", and when nothing is given for the toy model (`model` None or "toy"); a real model
    validated on toy shapes measures nothing, so it needs its data named."""
    toy = data is not None and str(data) == "toy"
    if data is None and bias_data is None and model not in (None, "toy"):
        raise InvalidInput(
            f"{model} is not the toy model: name the data to validate it on",
            hint="pass --data FOLDER|CSV (zero-shot classification: ImageFolder or path,label), "
            "--bias-data CSV --queries FILE (bias), or --data toy for the toy world's suite",
        )
    if toy or (data is None and bias_data is None):
        suite = toy_suite()
        if bias_data is None and suite.bias is not None:
            suite.bias.k, suite.bias.desired = skew_k, desired
            return suite
        suite.bias, data = None, None  # the toy's tasks with the user's bias set
    else:
        suite = ValidationSuite([], None, source="files")
    if bias_data is not None and queries is None:
        raise InvalidInput("--bias-data needs --queries (neutral queries, one per line)")
    tasks = suite.tasks + ([classification_set(data, classnames, templates)] if data is not None else [])
    bias = bias_set(bias_data, queries, templates, skew_k, desired) if bias_data is not None else None
    return ValidationSuite(tasks, bias, source="toy+files" if toy else "files")


@contextmanager
def heads_zeroed(blocks: torch.nn.ModuleList, heads: list[HeadRef]) -> Iterator[None]:
    """Zero-ablate heads for the duration of the block, restoring the exact weights afterwards."""
    layers = sorted({h.layer for h in heads})
    saved = {i: {k: v.detach().clone() for k, v in blocks[i].attn.state_dict().items()} for i in layers}
    zero_heads(blocks, heads)
    try:
        yield
    finally:
        for i in layers:
            blocks[i].attn.load_state_dict(saved[i])


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
        # tasks that share one image array (the toy's factors) share one cached prefix and one forward pass
        self._set_key: dict[str, int] = {}
        self._prefixes: dict[int, torch.Tensor] = {}
        sets = [(t.name, t.images) for t in suite.tasks] + (
            [(suite.bias.name, suite.bias.images)] if suite.bias is not None else []
        )
        self._images = {id(images): images for _, images in sets}
        for name, images in sets:
            self._set_key[name] = id(images)
            if cache and id(images) not in self._prefixes:
                self._prefixes[id(images)] = torch.cat([self._prefix(b) for b in self._pixel_batches(images)])

    def _pixel_batches(self, images: np.ndarray | list[Path]) -> Iterator[torch.Tensor]:
        cfg = self.loaded.preprocess_cfg
        size = tuple(cfg["size"]) if not isinstance(cfg["size"], int) else (cfg["size"], cfg["size"])
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            if isinstance(chunk, np.ndarray) and chunk.shape[1:3] == size:
                yield uint8_to_tensor(chunk, cfg["mean"], cfg["std"])
            else:
                yield torch.stack([self.loaded.preprocess(_as_image(x)) for x in chunk])

    @torch.no_grad()
    def _prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        """Residual stream entering `first_layer` (kept on CPU)."""
        visual = self.loaded.model.visual
        x = visual._embeds(pixels.to(self.loaded.device))
        for block in visual.transformer.resblocks[: self.first_layer]:
            x = block(x)
        return x.cpu()

    @torch.no_grad()
    def embeddings(self, name: str, heads: list[HeadRef] = (), advance=None) -> torch.Tensor:
        """Normalised image embeddings of one set with `heads` ablated; `advance(n)` after each batch."""
        if any(h.layer < self.first_layer for h in heads):
            raise InvalidInput(f"this evaluator only re-runs layers >= {self.first_layer}")
        visual = self.loaded.model.visual
        blocks = visual.transformer.resblocks
        out = []
        key = self._set_key[name]
        if key in self._prefixes:
            prefix = self._prefixes[key]
            batches = (prefix[i : i + self.batch_size] for i in range(0, len(prefix), self.batch_size))
        else:
            batches = (self._prefix(pixels) for pixels in self._pixel_batches(self._images[key]))
        with heads_zeroed(blocks, list(heads)):
            for batch in batches:
                x = batch.to(self.loaded.device)
                for block in blocks[self.first_layer :]:
                    x = block(x)
                pooled, _ = visual._pool(x)
                out.append(F.normalize((pooled @ visual.proj).float(), dim=-1).cpu())
                if advance is not None:
                    advance(len(x))
        return torch.cat(out)

    def evaluate(self, heads: list[HeadRef] = (), bar: str | None = None) -> dict:
        """Metrics per set, and a summary (mean acc1 over tasks, bias MaxSkew@k); with `bar`, a progress bar
        of that name advancing per batch of images."""
        results = []
        done: dict[int, torch.Tensor] = {}
        total = sum(len(images) for images in self._images.values())
        with progress_bar(bar or "", total, quiet=bar is None) as advance:
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
        summary = {"mean_acc1": float(np.mean([r["metrics"]["acc1"] for r in results])) if results else None}
        if self.suite.bias is not None:
            b = self.suite.bias
            sim = (self.queries.float().cpu() @ embed(b.name).T).numpy()
            metrics = bias_metrics(sim, b.groups, len(b.group_names), b.k, b.desired)
            metrics["queries"] = list(b.queries)
            results.append({"dataset": b.name, "task": "bias", "metrics": metrics})
            summary[f"max_skew@{b.k}"] = metrics[f"max_skew@{b.k}"]
            summary["ndkl"] = metrics["ndkl"]
        return {"results": results, "summary": summary}

    def score(self, heads: list[HeadRef]) -> tuple[float, float]:
        """(mean zero-shot acc1, MaxSkew@k) — what the debias policy trades off."""
        summary = self.evaluate(heads)["summary"]
        if self.suite.bias is None:
            raise InvalidInput("the debias policy needs a bias set")
        return summary["mean_acc1"], summary[f"max_skew@{self.suite.bias.k}"]


def _as_image(item) -> Image.Image:
    return open_image(item) if isinstance(item, Path) else Image.fromarray(np.asarray(item))


def validate(loaded: LoadedModel, suite: ValidationSuite, batch_size: int = 256, bar: str | None = None) -> dict:
    """Full validation of a (possibly pruned) model, shaped like clip_benchmark's results (`bar`: see evaluate)."""
    report = Evaluator(loaded, suite, batch_size=batch_size, cache=False).evaluate(bar=bar)
    for entry in report["results"]:
        entry.update(model=loaded.name, pretrained=loaded.pretrained or "")
    report["model"] = loaded.identity
    return report


@dataclass
class Gates:
    max_acc_drop: float | None = None  # points of mean zero-shot top-1
    max_skew: float | None = None
    min_acc: float | None = None  # points, absolute
    failures: list[str] = field(default_factory=list)

    def check_measurable(self, suite: ValidationSuite) -> None:
        if self.max_acc_drop is not None or self.min_acc is not None:
            suite.require_accuracy("an accuracy gate")

    def check(self, before: dict, after: dict) -> list[str]:
        failures = []
        acc_before, acc_after = before["summary"]["mean_acc1"], after["summary"]["mean_acc1"]
        if self.max_acc_drop is not None and (acc_before - acc_after) * 100 > self.max_acc_drop:
            failures.append(
                f"max-acc-drop: mean acc1 fell {100 * (acc_before - acc_after):.2f} points (limit {self.max_acc_drop})"
            )
        if self.min_acc is not None and acc_after * 100 < self.min_acc:
            failures.append(f"min-acc: mean acc1 {100 * acc_after:.2f} < {self.min_acc}")
        skew_key = next((k for k in after["summary"] if k.startswith("max_skew@")), None)
        if self.max_skew is not None:
            if skew_key is None:
                failures.append("max-skew: no bias set was validated")
            elif after["summary"][skew_key] > self.max_skew:
                failures.append(f"max-skew: {skew_key} {after['summary'][skew_key]:.3f} > {self.max_skew}")
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
            else [
                k
                for k in r["metrics"]
                if k.startswith(("max_skew@", "min_skew@", "ndkl")) and not k.endswith(("_per_query", "_sum"))
            ]
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


def enforce(failures: list[str]) -> None:
    if failures:
        raise GateFailed("validation gate failed: " + "; ".join(failures))
