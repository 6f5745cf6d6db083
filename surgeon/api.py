"""One library API under both shells: a spec per job and one function that runs it.

Each spec holds its defaults once (the CLI's option defaults read them) and checks itself, bounds included
(`check()`: cheap, no model loaded, the same for every caller). `run_*` does the work. The CLI maps options
to a spec and renders what `run_*` returns; the gRPC service maps a request to a spec, confines its paths to
the server's roots, checks it before queueing and runs it in a job. Progress and cancellation reach the
shells through surgeon.progress (terminal bars, or an Observer the service installs), never through here.

This module stays light to import (torch only inside the functions): the CLI imports it at start-up."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from surgeon import defaults, limits
from surgeon.errors import InvalidInput, PreconditionFailed
from surgeon.quantize import DEFAULT_MAX_ACCURACY_DROP, check_scheme

if TYPE_CHECKING:
    from surgeon.images import ImageSet
    from surgeon.load import LoadedModel
    from surgeon.pools import TextPool
    from surgeon.prune import PruneResult
    from surgeon.rank import Ranking
    from surgeon.study import StudyRun
    from surgeon.validate import ValidationSuite

#: --export / ExportRequest.format -> the exporters that run (the checkpoint travels with every prune anyway)
EXPORT_FORMATS = {"safetensors": ["safetensors"], "onnx": ["onnx"], "both": ["safetensors", "onnx"]}
DESIRED = (None, "uniform", "set")


def _choice(what: str, value: str | None, choices) -> None:
    if value not in choices:
        shown = ", ".join(str(c) for c in choices if c is not None)
        raise InvalidInput(f"unknown {what} {limits.echo(value)}", hint=f"choose {shown}")


def _check_labels(labels: Path | None) -> None:
    """A classifier's labels file is read before any work: a repeated label must not cost a whole run."""
    from surgeon.templates import read_labels

    if labels is not None:
        read_labels(labels)


def check_plot_format(plot_format: str) -> None:
    from surgeon.plots import PLOT_FORMATS

    _choice("plot format", plot_format, PLOT_FORMATS)


def suite_cost(suite: ValidationSuite) -> str:
    """What validating on `suite` costs, said before it is paid: images, classes x templates, bias queries."""
    parts = [
        f"{t.name}: {len(t.images):,} images, {len(t.classnames)} classes x {len(t.templates)} templates"
        for t in suite.tasks
    ]
    if suite.bias is not None:
        b = suite.bias
        parts.append(
            f"bias {b.name}: {len(b.images):,} images in {len(b.group_names)} groups, {len(b.queries)} queries"
        )
    return "; ".join(parts)


@dataclass(frozen=True)
class ValidationSpec:
    """The validation suite: files when given, else the toy world's (for the toy model only)."""

    data: Path | None = None
    classnames: Path | None = None
    templates: Path | None = None
    bias_data: Path | None = None
    queries: Path | None = None
    skew_k: int = 10
    desired: str | None = None
    bias_protocol: str = "surgeon"
    bias_split_by: str | None = None
    bias_attribute: str | None = None  # surgeon.validate.BiasColumns
    bias_within: str | None = None
    bias_groups: str | None = None
    language: str = "en"
    retrieval_data: Path | None = None  # image <-> text or text -> video (surgeon.retrieval)
    frames: int = limits.DEFAULT_VIDEO_FRAMES  # per video of a video retrieval set

    def check(self) -> None:
        from surgeon.bias import bias_protocol

        limits.validation_options(self.skew_k)
        limits.count("frames (per video)", self.frames, 1, limits.MAX_FRAMES_PER_VIDEO)
        limits.texts(
            bias_split_by=self.bias_split_by,
            bias_attribute=self.bias_attribute,
            bias_within=self.bias_within,
            language=self.language,
        )
        if self.bias_groups is not None:
            from surgeon.bias import GROUP_FOLDINGS

            _choice("bias group folding", self.bias_groups, tuple(GROUP_FOLDINGS))
        if self.bias_data is None and any((self.bias_attribute, self.bias_within, self.bias_groups)):
            raise InvalidInput("--bias-attribute, --bias-within and --bias-groups read a --bias-data manifest")
        _choice("desired distribution", self.desired, DESIRED)
        bias_protocol(self.bias_protocol, self.desired)  # an unknown protocol, or a desired it fixes otherwise
        if self.is_toy and any((self.classnames, self.templates, self.queries)):
            raise InvalidInput("classnames, templates and queries need data or bias_data")

    @property
    def is_toy(self) -> bool:
        return self.data is None and self.bias_data is None and self.retrieval_data is None

    def require_bias(self, what: str) -> None:
        """Refuse, before any model loads, a use that measures bias on a suite that has no bias set (the toy
        suite has its probe; files need --bias-data) or accuracy on one without a classification set."""
        toy = self.is_toy or str(self.data) == defaults.TOY
        if self.bias_data is None and not toy:
            raise InvalidInput(
                f"{what} needs a bias set to measure bias on",
                hint="pass --bias-data CSV (path,group per image) --queries FILE (one neutral query per line); "
                "gRPC: validation.bias_data and validation.queries",
                field="bias_data",
            )
        if self.data is None and self.bias_data is not None:
            raise InvalidInput(
                f"{what} measures accuracy too: it needs a classification set (--data) besides the bias set",
                hint="pass --data FOLDER|CSV (ImageFolder or path,label); gRPC: validation.data",
                field="data",
            )

    def build(self, model: str | None) -> ValidationSuite:
        from surgeon.validate import BiasColumns, build_suite

        return build_suite(
            self.data,
            self.classnames,
            self.templates,
            self.bias_data,
            self.queries,
            self.skew_k,
            self.desired,
            self.bias_protocol,
            self.bias_split_by,
            model=model,
            retrieval=self.retrieval_data,
            frames=self.frames,
            bias_columns=BiasColumns(self.bias_attribute, self.bias_within, self.bias_groups),
        )


@dataclass(frozen=True)
class ModelSpec:
    """Which model: an open_clip name (+ pretrained tag or checkpoint file), local-dir:PATH, or None: the toy."""

    model: str | None = None
    pretrained: str | None = None
    device: str | None = None
    activation: str | None = None  # gelu or quickgelu; None: the config's, the tag's, or GELU assumed (said)

    def check(self) -> None:
        from surgeon.load import check_activation

        limits.texts(model=self.model, pretrained=self.pretrained, device=self.device)
        check_activation(self.activation)

    @property
    def is_toy(self) -> bool:
        return defaults.is_toy_model(self.model)

    def load(self) -> LoadedModel:
        from surgeon.load import load_model
        from surgeon.progress import stage

        stage("loading model")
        return load_model(self.model, self.pretrained, self.device, self.activation)


@dataclass(frozen=True)
class RankSpec:
    model: ModelSpec = field(default_factory=ModelSpec)
    images: str | None = None  # a folder, or "toy" (None: toy, for the toy model only)
    n_images: int | None = None
    texts: str | None = None  # "toy", "general" or a file
    taxonomy: str | None = None
    judge: str = "lexicon"
    layers: str | None = None
    m: int = limits.DEFAULT_TEXTS_PER_HEAD
    span_rank: int = limits.DEFAULT_SPAN_RANK
    batch_size: int = 64
    use_cache: bool = True
    checkpoint_every: int | None = None
    llm_url: str | None = None
    llm_models: tuple[str, ...] = ()
    llm_key_env: str = "OPENAI_API_KEY"
    out_dir: Path | None = None  # None: nothing written
    force: bool = False
    plot_format: str = "png"

    def check(self) -> None:
        from surgeon.judges.base import JUDGES

        self.model.check()
        limits.rank_options(
            self.n_images,
            defaults.toy_data(self.images),
            self.m,
            self.span_rank,
            self.batch_size,
            self.checkpoint_every,
            self.layers,
        )
        limits.texts(images=self.images, texts=self.texts, taxonomy=self.taxonomy, llm_url=self.llm_url)
        JUDGES.get(self.judge)
        check_plot_format(self.plot_format)

    def image_set(self) -> ImageSet:
        from surgeon.images import resolve_images

        return resolve_images(self.images, self.n_images, self.model.model)


@dataclass
class RankOutcome:
    ranking: Ranking | None  # None on a non-zero torchrun rank (rank 0 writes the outputs)
    images: ImageSet
    out_dir: Path | None = None


def run_rank(spec: RankSpec, quiet: bool = True) -> RankOutcome:
    from surgeon.pools import load_pool
    from surgeon.progress import stage
    from surgeon.rank import rank_heads

    image_set = spec.image_set()  # before the (slow) load: a missing folder or a bad pool fails fast
    pool = load_pool(spec.texts, spec.model.is_toy, spec.taxonomy)
    loaded = spec.model.load()
    llm = {"llm_url": spec.llm_url, "llm_models": spec.llm_models, "llm_key_env": spec.llm_key_env}
    ranking = rank_heads(
        loaded,
        image_set,
        pool,
        judge=spec.judge,
        layers=spec.layers,
        m=spec.m,
        span_rank=spec.span_rank,
        batch_size=spec.batch_size,
        quiet=quiet,
        use_cache=spec.use_cache,
        llm_options=llm if spec.judge == "llm" else None,
        checkpoint_every=spec.checkpoint_every,
    )
    if ranking is None or spec.out_dir is None:
        return RankOutcome(ranking, image_set)
    stage("writing")
    return RankOutcome(ranking, image_set, ranking.write(spec.out_dir, force=spec.force, plot_format=spec.plot_format))


@dataclass(frozen=True)
class PruneSpec:
    model: ModelSpec = field(default_factory=ModelSpec)
    ranking: Path | None = None  # ranking.json (or its folder); ranks first when None and the policy reads one
    policy: str = "debias"
    k: int | None = None
    heads: str | None = None
    concept: str | None = None
    min_ccs: int | None = None
    seed: int = 0
    seeds: int = 1
    mode: str = "zero"
    tower: str = "vision"
    max_acc_drop: float | None = None
    max_skew: float | None = None
    min_acc: float | None = None
    max_recall_drop: float | None = None
    export_anyway: bool = False
    export: str = "safetensors"
    labels: Path | None = None
    atol: float = 1e-4
    onnx_exporter: str | None = None
    # ranking first, and the reference images of mean ablation
    images: str | None = None
    n_images: int | None = None
    texts: str | None = None
    judge: str = "lexicon"
    layers: str | None = None
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    out_dir: Path | None = None  # None: nothing written
    force: bool = False
    preset: str | None = None  # "MODEL/TAG": whose paper head lists paper-* policies apply (a checkpoint file's)

    def check(self) -> None:
        from surgeon.export import check_exporter
        from surgeon.heads import parse_heads
        from surgeon.hooks import TOWERS
        from surgeon.judges.base import JUDGES
        from surgeon.policies import POLICIES, check_paper_preset
        from surgeon.surgery import SURGERIES

        self.model.check()
        policy = POLICIES.get(self.policy)
        SURGERIES.get(self.mode)
        _choice("tower", self.tower, TOWERS)
        _choice("export format", self.export, EXPORT_FORMATS)
        limits.prune_options(
            self.k,
            self.seed,
            self.seeds,
            self.min_ccs,
            self.max_acc_drop,
            self.max_skew,
            self.min_acc,
            self.atol,
            self.heads,
            self.concept,
        )
        limits.number("max_recall_drop", self.max_recall_drop, -limits.MAX_POINTS, limits.MAX_POINTS)
        limits.rank_options(self.n_images, defaults.toy_data(self.images), layers=self.layers)
        _check_labels(self.labels)
        if self.ranking is not None and self.k is not None:  # a ranking file: k is checked before any work
            from surgeon.policies import check_k
            from surgeon.rank import Ranking

            check_k(self.k, len(Ranking.read(self.ranking).heads))
        limits.texts(images=self.images, texts=self.texts)
        self.validation.check()
        JUDGES.get(self.judge)
        if self.heads:
            parse_heads(self.heads)  # malformed heads fail now
        if policy.measures:
            self.validation.require_bias(f"the {self.policy} policy")
        limits.text("preset", self.preset)
        if self.preset is not None and not policy.preset:
            raise InvalidInput("--preset names the heads of the paper-high, paper-low and paper-random policies")
        if policy.preset:  # every preset reads the model's high (and low) list: one check
            check_paper_preset("high", *self.preset_key)
        check_exporter(self.onnx_exporter)

    @property
    def preset_key(self) -> tuple[str | None, str | None]:
        """Whose paper head lists the paper-* policies read: --preset's, else the model's own name and tag."""
        if self.preset is not None:
            from surgeon.policies import check_preset

            return check_preset(self.preset, self.model.model)
        return self.model.model, self.model.pretrained

    @property
    def formats(self) -> list[str]:
        return sorted({"safetensors", *EXPORT_FORMATS[self.export]}, reverse=True)  # the checkpoint always travels

    @property
    def needs_ranking(self) -> bool:
        from surgeon.policies import POLICIES

        return self.ranking is None and POLICIES.get(self.policy).reads_ranking  # presets and heads skip it


def run_prune(spec: PruneSpec, suite: ValidationSuite | None = None, quiet: bool = True) -> PruneResult:
    """`suite`: one the caller built from `spec.validation` already (the service checks its manifests)."""
    from surgeon.datarecord import record_validation_data
    from surgeon.images import resolve_images
    from surgeon.pools import load_pool
    from surgeon.progress import say, stage
    from surgeon.prune import policy_options, prune
    from surgeon.validate import Gates

    needs_images = spec.needs_ranking or spec.mode == "mean"
    image_set = resolve_images(spec.images, spec.n_images, spec.model.model) if needs_images else None
    pool = load_pool(spec.texts, spec.model.is_toy) if spec.needs_ranking else None
    stage("loading validation data")
    suite = suite if suite is not None else spec.validation.build(spec.model.model)
    say(f"prune: validates before and after on {suite_cost(suite)}", quiet)
    data_record = record_validation_data(asdict(spec.validation), suite, quiet) if spec.out_dir is not None else None
    loaded = spec.model.load()  # every input above is read and checked: a bad file costs no model load
    ranking = _ranking_for(
        loaded, spec.ranking, image_set if spec.needs_ranking else None, pool, spec.judge, spec.layers, quiet
    )
    options = policy_options(
        loaded,
        spec.preset_key if spec.preset else None,
        k=spec.k,
        seed=spec.seed,
        heads=spec.heads,
        concept=spec.concept,
        min_ccs=spec.min_ccs,
        max_acc_drop=spec.max_acc_drop,
    )
    stage("pruning and validating")
    return prune(
        loaded,
        ranking,
        suite,
        spec.policy,
        options,
        mode=spec.mode,
        tower=spec.tower,
        gates=Gates(
            max_acc_drop=spec.max_acc_drop,
            max_skew=spec.max_skew,
            min_acc=spec.min_acc,
            max_recall_drop=spec.max_recall_drop,
        ),
        out_dir=spec.out_dir,
        reference=image_set if spec.mode == "mean" else None,
        seeds=spec.seeds,
        export_anyway=spec.export_anyway,
        force=spec.force,
        exporters=spec.formats,
        export_options={"labels": spec.labels, "atol": spec.atol, "exporter": spec.onnx_exporter},
        language=spec.validation.language,
        quiet=quiet,
        data_record=data_record,
    )


def _ranking_for(
    loaded: LoadedModel,
    path: Path | None,
    image_set: ImageSet | None,
    pool: TextPool | None,
    judge: str,
    layers: str | None,
    quiet: bool,
) -> Ranking | None:
    """The ranking read from `path` (checked against the model), else made on `image_set` and `pool`; None
    when neither is given (policies that do not read a ranking)."""
    import warnings

    from surgeon.pools import load_pool
    from surgeon.rank import Ranking, rank_heads

    if path is not None:
        ranking = Ranking.read(path)
        ranking.check_model(loaded)
        return ranking
    if image_set is None:
        return None
    pool = pool if pool is not None else load_pool(None, loaded.is_toy)
    ranked = rank_heads(loaded, image_set, pool, judge=judge, layers=layers, quiet=quiet)
    note = ranked.clamp_note() if ranked is not None else None
    if note and not quiet:
        warnings.warn(note, stacklevel=2)
    return ranked


@dataclass(frozen=True)
class ValidateSpec:
    model: ModelSpec = field(default_factory=ModelSpec)
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    out_dir: Path | None = None  # validation.json + clip_benchmark/ result files; None: nothing written
    force: bool = False

    def check(self) -> None:
        self.model.check()
        self.validation.check()
        if self.out_dir is not None and self.out_dir.exists() and not self.force:
            raise PreconditionFailed(f"{self.out_dir} already exists", hint="pass --force to replace it")


def run_validate(spec: ValidateSpec, suite: ValidationSuite | None = None, quiet: bool = True) -> tuple[dict, list]:
    """(clip_benchmark-shaped report, files written)."""
    from surgeon.clipbench import write_validation
    from surgeon.progress import say, stage
    from surgeon.validate import validate

    stage("loading validation data")
    suite = suite if suite is not None else spec.validation.build(spec.model.model)
    say(f"validate: {suite_cost(suite)}", quiet)
    loaded = spec.model.load()
    report = validate(loaded, suite, bar="validation", quiet=quiet)
    language = spec.validation.language
    report["results"] = [{**r, "language": language} for r in report["results"]]  # clip_benchmark's keys
    if spec.out_dir is None:
        return report, []
    stage("writing")
    return report, write_validation(report, spec.out_dir, language, spec.force)


@dataclass(frozen=True)
class SweepSpec:
    model: ModelSpec = field(default_factory=ModelSpec)
    ranking: Path | None = None
    counts: tuple[int, ...] | None = None  # None: the default counts (0..8 for small models)
    seed: int = 0
    seeds: int = 1
    images: str | None = None
    n_images: int | None = None
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    out_dir: Path | None = None
    force: bool = False
    plot_format: str = "png"

    def check(self) -> None:
        self.model.check()
        limits.count("seed", self.seed, 0, limits.MAX_SEED)
        limits.count("seeds", self.seeds, 1, limits.MAX_SEEDS)
        if self.counts is not None:
            limits.count("number of counts", len(self.counts), 1, limits.MAX_SWEEP_COUNTS)
            for n in self.counts:
                limits.count("counts", n, 0, limits.MAX_K)
        limits.rank_options(self.n_images, defaults.toy_data(self.images))
        limits.texts(images=self.images)
        self.validation.check()
        check_plot_format(self.plot_format)


def run_sweep(spec: SweepSpec, quiet: bool = True) -> dict:
    """The sweep result (sweep.json's content); writes sweep.json and the plot into `spec.out_dir` when set."""
    import json

    from surgeon.images import resolve_images
    from surgeon.paths import atomic_dir
    from surgeon.plots import sweep_plot
    from surgeon.pools import load_pool
    from surgeon.progress import stage
    from surgeon.sweep import run_sweep as sweep

    stage("loading validation data")
    suite = spec.validation.build(spec.model.model)
    image_set = resolve_images(spec.images, spec.n_images, spec.model.model) if spec.ranking is None else None
    pool = load_pool(None, spec.model.is_toy) if spec.ranking is None else None
    loaded = spec.model.load()
    ranking = _ranking_for(loaded, spec.ranking, image_set, pool, "lexicon", None, quiet)
    if ranking is None:  # a non-zero torchrun rank: sweeps run on one process
        raise PreconditionFailed("sweep runs in one process, not under torchrun")
    counts = list(spec.counts) if spec.counts is not None else None
    result = sweep(loaded, ranking, suite, counts, seed=spec.seed, quiet=quiet, seeds=spec.seeds)
    if spec.out_dir is not None:
        stage("writing")
        with atomic_dir(spec.out_dir, force=spec.force) as tmp:
            (tmp / "sweep.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
            sweep_plot(result, tmp / f"sweep.{spec.plot_format}")
    return result


@dataclass(frozen=True)
class ExportSpec:
    run_dir: Path  # a run folder written by prune
    format: str = "onnx"
    labels: Path | None = None
    atol: float = 1e-4
    onnx_exporter: str | None = None
    out_dir: Path | None = None  # None: RUN_DIR/export-FORMAT
    force: bool = False
    verify: bool = True  # check the run's files against surgery.json's hashes first
    device: str | None = None
    quantize: str | None = None  # int8: quantized image graphs, gated on the accuracy they cost
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP  # points of mean zero-shot top-1
    validation: ValidationSpec | None = None  # what --quantize measures on; None: the data the run recorded

    def check(self) -> None:
        from surgeon.export import check_exporter

        _choice("export format", self.format, EXPORT_FORMATS)
        if self.validation is not None:
            if self.quantize is None:
                raise InvalidInput("the validation options are read by --quantize only (it measures int8 on them)")
            self.validation.check()
        limits.export_options(self.atol)
        limits.number("max_accuracy_drop", self.max_accuracy_drop, 0.0, limits.MAX_POINTS)
        limits.texts(device=self.device, quantize=self.quantize)
        check_scheme(self.quantize)
        check_exporter(self.onnx_exporter)
        _check_labels(self.labels)

    @property
    def target(self) -> Path:
        return self.out_dir or self.run_dir / f"export-{self.format}"


def run_export(spec: ExportSpec) -> list[Path]:
    """The files written into `spec.target`."""
    from surgeon.export import export_existing_run
    from surgeon.progress import stage

    stage("loading validation data" if spec.validation is not None else "exporting")
    measure_on = spec.validation.build(None) if spec.validation is not None else None  # before the model loads
    stage("exporting")
    return export_existing_run(
        spec.run_dir,
        EXPORT_FORMATS[spec.format],
        spec.target,
        force=spec.force,
        device=spec.device,
        verify=spec.verify,
        labels=spec.labels,
        atol=spec.atol,
        exporter=spec.onnx_exporter,
        quantize=spec.quantize,
        max_accuracy_drop=spec.max_accuracy_drop,
        measure_on=measure_on,
    )


@dataclass(frozen=True)
class StudySpec:
    file: Path  # the study file (TOML)
    out_dir: Path | None = None  # None: exports/study-<file stem>
    shard: str | None = None  # "i/n": compute only cells i, i+n, ...
    collect: bool = False  # compute nothing: assemble the table from the stored cells
    device: str | None = None
    plot_format: str = "png"

    def check(self) -> None:
        if limits.shard(self.shard) is not None and self.collect:
            raise InvalidInput("shard and collect exclude each other", hint="collect once every shard has run")
        limits.texts(file=str(self.file), device=self.device)
        check_plot_format(self.plot_format)

    @property
    def target(self) -> Path:
        from surgeon.paths import exports_dir

        return self.out_dir or exports_dir() / f"study-{self.file.stem}"


def run_study(spec: StudySpec, quiet: bool = True) -> StudyRun:
    """The study's cells (stored under `spec.target`, so a rerun resumes) and, unless sharded, its table."""
    from surgeon.study import compute_study, parse_study

    spec.check()
    study = parse_study(spec.file)
    return compute_study(
        study, spec.target, limits.shard(spec.shard), spec.collect, spec.device, quiet, spec.plot_format
    )
