"""One library API under both shells: a spec per job and one function that runs it.

Each spec declares its options once, as fields (surgeon.core.options: default, bound, unit, help; the CLI options,
the gRPC mapping, the study keys and docs/options.md derive from them) and checks itself, bounds included
(`check()`: cheap, no model loaded, the same for every caller). `run_*` does the work. The CLI maps options
to a spec and renders what `run_*` returns; the gRPC service maps a request to a spec, confines its paths to
the server's roots, checks it before queueing and runs it in a job. Progress and cancellation reach the
shells through surgeon.core.progress (terminal bars, or an Observer the service installs), never through here.

This module stays light to import (torch only inside the functions): the CLI imports it at start-up."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from surgeon.core import fallback, limits
from surgeon.core.errors import InvalidInput, PreconditionFailed
from surgeon.core.options import (
    IMAGES,
    N_IMAGES,
    TEXTS,
    LlmJudge,
    OnnxExport,
    Option,
    RankMethod,
    check_bounds,
    choice,
    option,
    part,
)
from surgeon.core.paths import check_output
from surgeon.exporting.quantize import DEFAULT_MAX_ACCURACY_DROP, check_scheme
from surgeon.selection.policies import POLICIES
from surgeon.validation.spec import ValidationSpec

if TYPE_CHECKING:
    from surgeon.inputs.images import ImageSet
    from surgeon.inputs.pools import TextPool
    from surgeon.model.load import LoadedModel
    from surgeon.pruning.prune import PruneResult
    from surgeon.ranking.rank import Ranking
    from surgeon.studies.study import StudyRun
    from surgeon.validation.validate import ValidationSuite

#: --export / ExportRequest.format -> the exporters that run (the checkpoint travels with every prune anyway)
EXPORT_FORMATS = {"safetensors": ["safetensors"], "onnx": ["onnx"], "both": ["safetensors", "onnx"]}


def _check_onnx(onnx: OnnxExport) -> None:
    """A repeated label or an unknown exporter is refused before any work, as are the bounds."""
    from surgeon.exporting.export import check_exporter
    from surgeon.inputs.templates import read_labels

    onnx.check()
    check_exporter(onnx.onnx_exporter)
    if onnx.labels is not None:
        read_labels(onnx.labels)


def check_plot_format(plot_format: str) -> None:
    from surgeon.results.plots import PLOT_FORMATS

    choice("plot format", plot_format, PLOT_FORMATS)


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


# options several jobs share: one declaration (and default) each; a job's field may say its own help
RANKING = Option(help="ranking.json (or its folder); ranks first when omitted")
SEED = Option(0, bound=(0, limits.MAX_SEED), help="random seed")
SEEDS = Option(1, bound=(1, limits.MAX_SEEDS), help="random policy: repeat over this many seeds and average")
DEVICE = Option(help="cpu, cuda, cuda:1 ... (default: cuda when present)")
OUT = Option(flags=("--out",), help="output folder (default: a new one in exports/)")
FORCE = Option(False, help="replace an existing --out folder")
PLOT_FORMAT = Option("png", help="png, pdf or svg")


@dataclass(frozen=True)
class ModelSpec:
    """Which model: an open_clip name (+ pretrained tag or checkpoint file), local-dir:PATH, or None: the toy."""

    model: str | None = option(flags=("--model", "-m"), help="open_clip name, local-dir:PATH, or omit for the toy")
    pretrained: str | None = option(help="pretrained tag (from the local hub cache) or checkpoint file")
    device: str | None = DEVICE.field()
    activation: str | None = option(  # None: the config's, the tag's, or GELU assumed (said)
        help="gelu or quickgelu: the MLP activation the weights were trained with (OpenAI's: quickgelu). Default: "
        "the config's or the tag's; a checkpoint file cannot say, so GELU is assumed with a warning"
    )

    def check(self) -> None:
        from surgeon.model.load import check_activation

        limits.texts(model=self.model, pretrained=self.pretrained, device=self.device)
        check_activation(self.activation)

    @property
    def is_toy(self) -> bool:
        return fallback.is_toy_model(self.model)

    def load(self) -> LoadedModel:
        from surgeon.core.progress import stage
        from surgeon.model.load import load_model

        stage("loading model")
        return load_model(self.model, self.pretrained, self.device, self.activation)


@dataclass(frozen=True)
class RankSpec:
    model: ModelSpec = part(ModelSpec)
    images: str | None = IMAGES.field()  # None: toy, for the toy model only
    n_images: int | None = N_IMAGES.field()
    texts: str | None = TEXTS.field()
    taxonomy: str | None = option(help="concept taxonomy JSON for the lexicon judge", path=True)
    method: RankMethod = part(RankMethod)
    llm: LlmJudge = part(LlmJudge)
    out_dir: Path | None = OUT.field()  # None: nothing written
    force: bool = FORCE.field()
    plot_format: str = PLOT_FORMAT.field()

    def check(self) -> None:
        from surgeon.ranking.judges.base import JUDGES

        self.model.check()
        check_bounds(self)
        self.method.check()
        limits.texts(images=self.images, texts=self.texts, taxonomy=self.taxonomy, llm_url=self.llm.llm_url)
        JUDGES.get(self.method.judge)
        check_plot_format(self.plot_format)

    def image_set(self) -> ImageSet:
        from surgeon.inputs.images import resolve_images

        return resolve_images(self.images, self.n_images, self.model.model)


@dataclass
class RankOutcome:
    ranking: Ranking | None  # None on a non-zero torchrun rank (rank 0 writes the outputs)
    images: ImageSet
    out_dir: Path | None = None


def run_rank(spec: RankSpec, quiet: bool = True) -> RankOutcome:
    from surgeon.core.progress import stage
    from surgeon.inputs.pools import load_pool
    from surgeon.ranking.rank import rank_heads

    image_set = spec.image_set()  # before the (slow) load: a missing folder or a bad pool fails fast
    pool = load_pool(spec.texts, spec.model.is_toy, spec.taxonomy)
    loaded = spec.model.load()
    ranking = rank_heads(
        loaded,
        image_set,
        pool,
        spec.method,
        quiet=quiet,
        llm=spec.llm if spec.method.judge == "llm" else None,
    )
    if ranking is None or spec.out_dir is None:
        return RankOutcome(ranking, image_set)
    stage("writing")
    return RankOutcome(ranking, image_set, ranking.write(spec.out_dir, force=spec.force, plot_format=spec.plot_format))


@dataclass(frozen=True)
class PruneSpec:
    model: ModelSpec = part(ModelSpec)
    ranking: Path | None = RANKING.field()  # ranks first when None and the policy reads one
    policy: str = option("debias", help=", ".join(POLICIES.names()))
    k: int | None = option(
        bound=(1, limits.MAX_K), unit="heads", help="number of heads (top-k, bottom-k, random; budget for debias)"
    )
    heads: str | None = option(help="explicit heads, e.g. L11.H5,L10.H8")
    preset: str | None = option(  # whose paper head lists paper-* policies apply (a checkpoint file's)
        help="MODEL/TAG, e.g. ViT-B-32/openai: paper-* head lists for a checkpoint file of those weights"
    )
    concept: str | None = option(help="concept label for the concept policy")
    min_ccs: int | None = option(bound=(0, limits.MAX_CCS), help="threshold policy: prune heads with CCS >= this")
    seed: int = SEED.field(help="random seed (debias: draws its search and stop splits)")
    seeds: int = SEEDS.field()
    mode: str = option("zero", help="zero, mean or hard")
    tower: str = option("vision", help="vision, text or both")
    max_acc_drop: float | None = option(  # negative: the accuracy must rise
        bound=(-limits.MAX_POINTS, limits.MAX_POINTS),
        unit="points",
        help="gate: max drop of mean zero-shot top-1 (points)",
    )
    max_skew: float | None = option(bound=(-limits.MAX_SKEW, limits.MAX_SKEW), help="gate: max MaxSkew@k after pruning")
    min_acc: float | None = option(
        bound=(0.0, limits.MAX_POINTS), unit="points", help="gate: min mean zero-shot top-1 after pruning (points)"
    )
    max_recall_drop: float | None = option(
        bound=(-limits.MAX_POINTS, limits.MAX_POINTS),
        unit="points",
        help="gate: max drop of mean text->image/video recall@1 (points)",
    )
    export_anyway: bool = option(False, help="export even when a gate fails")
    export: str = option("safetensors", help="safetensors, onnx or both")
    onnx: OnnxExport = part(OnnxExport)
    # ranking first, and the reference images of mean ablation
    images: str | None = IMAGES.field()
    n_images: int | None = N_IMAGES.field(help="images for ranking and mean ablation")
    texts: str | None = TEXTS.field(help="text pool when ranking first")
    method: RankMethod = part(RankMethod, only=("judge", "layers"))
    validation: ValidationSpec = part(ValidationSpec)
    out_dir: Path | None = OUT.field(help="run folder (default: new one in exports/)")  # None: nothing written
    force: bool = FORCE.field()

    def check(self) -> None:
        from surgeon.model.heads import parse_heads
        from surgeon.model.hooks import TOWERS
        from surgeon.model.surgery import SURGERIES
        from surgeon.ranking.judges.base import JUDGES
        from surgeon.selection.policies import POLICIES, check_paper_preset

        self.model.check()
        policy = POLICIES.get(self.policy)
        SURGERIES.get(self.mode)
        choice("tower", self.tower, TOWERS)
        choice("export format", self.export, EXPORT_FORMATS)
        check_bounds(self)
        limits.texts(heads=self.heads, concept=self.concept)
        self.method.check()
        _check_onnx(self.onnx)
        if self.ranking is not None and self.k is not None:  # a ranking file: k is checked before any work
            from surgeon.ranking.rank import Ranking
            from surgeon.selection.policies import check_k

            check_k(self.k, len(Ranking.read(self.ranking).heads))
        limits.texts(images=self.images, texts=self.texts)
        self.validation.check()
        JUDGES.get(self.method.judge)
        if self.heads:
            parse_heads(self.heads)  # malformed heads fail now
        if policy.measures:
            self.validation.require_bias(f"the {self.policy} policy")
        for name in ("k", "heads", "concept", "min_ccs"):  # a selection option the policy does not read
            if getattr(self, name) is not None and name not in policy.options:
                readers = ", ".join(n for n in POLICIES.names() if name in POLICIES.get(n).options)
                flag = "--" + name.replace("_", "-")
                raise InvalidInput(
                    f"{flag} is not read by the {self.policy} policy (it is by: {readers})",
                    hint=f"pass --policy with one of them, or drop {flag}",
                )
        limits.text("preset", self.preset)
        if self.preset is not None and not policy.preset:
            raise InvalidInput("--preset names the heads of the paper-high, paper-low and paper-random policies")
        if policy.preset:  # every preset reads the model's high (and low) list: one check
            check_paper_preset("high", *self.preset_key)

    @property
    def preset_key(self) -> tuple[str | None, str | None]:
        """Whose paper head lists the paper-* policies read: --preset's, else the model's own name and tag."""
        if self.preset is not None:
            from surgeon.selection.policies import check_preset

            return check_preset(self.preset, self.model.model)
        return self.model.model, self.model.pretrained

    @property
    def formats(self) -> list[str]:
        return sorted({"safetensors", *EXPORT_FORMATS[self.export]}, reverse=True)  # the checkpoint always travels

    @property
    def needs_ranking(self) -> bool:
        from surgeon.selection.policies import POLICIES

        return self.ranking is None and POLICIES.get(self.policy).reads_ranking  # presets and heads skip it


def run_prune(spec: PruneSpec, suite: ValidationSuite | None = None, quiet: bool = True) -> PruneResult:
    """`suite`: one the caller built from `spec.validation` already (the service checks its manifests)."""
    from surgeon.core.progress import say, stage
    from surgeon.inputs.images import resolve_images
    from surgeon.inputs.pools import load_pool
    from surgeon.pruning.prune import policy_options, prune
    from surgeon.validation.datarecord import record_validation_data
    from surgeon.validation.validate import Gates

    needs_images = spec.needs_ranking or spec.mode == "mean"
    image_set = resolve_images(spec.images, spec.n_images, spec.model.model) if needs_images else None
    pool = load_pool(spec.texts, spec.model.is_toy) if spec.needs_ranking else None
    stage("loading validation data")
    suite = suite if suite is not None else spec.validation.build(spec.model.model)
    say(f"prune: validates before and after on {suite_cost(suite)}", quiet)
    data_record = record_validation_data(asdict(spec.validation), suite, quiet) if spec.out_dir is not None else None
    loaded = spec.model.load()  # every input above is read and checked: a bad file costs no model load
    ranking = _ranking_for(loaded, spec.ranking, image_set if spec.needs_ranking else None, pool, spec.method, quiet)
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
        gates=Gates(spec.max_acc_drop, spec.max_skew, spec.min_acc, spec.max_recall_drop),
        out_dir=spec.out_dir,
        reference=image_set if spec.mode == "mean" else None,
        seeds=spec.seeds,
        export_anyway=spec.export_anyway,
        force=spec.force,
        exporters=spec.formats,
        onnx=spec.onnx,
        language=spec.validation.language,
        quiet=quiet,
        data_record=data_record,
    )


def _ranking_for(
    loaded: LoadedModel,
    path: Path | None,
    image_set: ImageSet | None,
    pool: TextPool | None,
    method: RankMethod,
    quiet: bool,
) -> Ranking | None:
    """The ranking read from `path` (checked against the model), else made on `image_set` and `pool`; None
    when neither is given (policies that do not read a ranking)."""
    import warnings

    from surgeon.inputs.pools import load_pool
    from surgeon.ranking.rank import Ranking, rank_heads

    if path is not None:
        ranking = Ranking.read(path)
        ranking.check_model(loaded)
        return ranking
    if image_set is None:
        return None
    pool = pool if pool is not None else load_pool(None, loaded.is_toy)
    ranked = rank_heads(loaded, image_set, pool, method, quiet=quiet)
    note = ranked.clamp_note() if ranked is not None else None
    if note and not quiet:
        warnings.warn(note, stacklevel=2)
    return ranked


@dataclass(frozen=True)
class ValidateSpec:
    model: ModelSpec = part(ModelSpec)
    validation: ValidationSpec = part(ValidationSpec)
    out_dir: Path | None = OUT.field(  # None: nothing written
        help="folder for validation.json and clip_benchmark/ (one result file per set)"
    )
    force: bool = FORCE.field()

    def check(self) -> None:
        self.model.check()
        self.validation.check()
        if self.out_dir is not None:
            check_output(self.out_dir, self.force)


def run_validate(spec: ValidateSpec, suite: ValidationSuite | None = None, quiet: bool = True) -> tuple[dict, list]:
    """(clip_benchmark-shaped report, files written)."""
    from surgeon.core.progress import say, stage
    from surgeon.inputs.clipbench import write_validation
    from surgeon.validation.validate import validate

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
    model: ModelSpec = part(ModelSpec)
    ranking: Path | None = RANKING.field()
    counts: tuple[int, ...] | None = option(  # None: the default counts (0..8 for small models)
        cli=False, help="numbers of heads to prune, e.g. 0,2,4,8"
    )
    seed: int = SEED.field(help="seed of the random ordering")
    seeds: int = SEEDS.field(help="random ordering: average this many seeds (plot: min-max band)")
    images: str | None = IMAGES.field()
    n_images: int | None = N_IMAGES.field(help="images when ranking first")
    validation: ValidationSpec = part(ValidationSpec)
    out_dir: Path | None = OUT.field()
    force: bool = FORCE.field()
    plot_format: str = PLOT_FORMAT.field()

    def check(self) -> None:
        self.model.check()
        check_bounds(self)
        if self.counts is not None:
            limits.count("number of counts", len(self.counts), 1, limits.MAX_SWEEP_COUNTS)
            for n in self.counts:
                limits.count("counts", n, 0, limits.MAX_K)
        limits.texts(images=self.images)
        self.validation.check()
        check_plot_format(self.plot_format)


def run_sweep(spec: SweepSpec, quiet: bool = True) -> dict:
    """The sweep result (sweep.json's content); writes sweep.json and the plot into `spec.out_dir` when set."""
    import json

    from surgeon.core.paths import atomic_dir
    from surgeon.core.progress import stage
    from surgeon.inputs.images import resolve_images
    from surgeon.inputs.pools import load_pool
    from surgeon.results.plots import sweep_plot
    from surgeon.validation.sweep import run_sweep as sweep

    stage("loading validation data")
    suite = spec.validation.build(spec.model.model)
    image_set = resolve_images(spec.images, spec.n_images, spec.model.model) if spec.ranking is None else None
    pool = load_pool(None, spec.model.is_toy) if spec.ranking is None else None
    loaded = spec.model.load()
    ranking = _ranking_for(loaded, spec.ranking, image_set, pool, RankMethod(), quiet)
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
    run_dir: Path  # a run folder written by prune (the CLI's argument)
    format: str = option("onnx", flags=("--format",), help="safetensors, onnx or both")
    onnx: OnnxExport = part(OnnxExport)
    out_dir: Path | None = OUT.field(help="output folder (default: RUN_DIR/export-FORMAT)")
    force: bool = FORCE.field(help="replace an existing output folder")
    verify: bool = option(
        True,
        flags=("--verify/--no-verify",),
        help="--no-verify: skip checking the run's files against surgery.json's sha256 hashes",
    )
    device: str | None = DEVICE.field()
    quantize: str | None = option(help="int8: quantize the image graphs (onnxruntime), gated on accuracy")
    max_accuracy_drop: float = option(
        DEFAULT_MAX_ACCURACY_DROP,
        bound=(0.0, limits.MAX_POINTS),
        unit="points",
        help="--quantize's gate: points of mean zero-shot top-1 int8 may cost",
    )
    validation: ValidationSpec | None = part(  # what --quantize measures on; None: the data the run recorded
        ValidationSpec, only=("data", "classnames", "templates"), optional=True
    )

    def check(self) -> None:
        choice("export format", self.format, EXPORT_FORMATS)
        if self.validation is not None:
            if self.quantize is None:
                raise InvalidInput("the validation options are read by --quantize only (it measures int8 on them)")
            self.validation.check()
        check_bounds(self)
        limits.texts(device=self.device, quantize=self.quantize)
        check_scheme(self.quantize)
        _check_onnx(self.onnx)

    @property
    def target(self) -> Path:
        return self.out_dir or self.run_dir / f"export-{self.format}"


def run_export(spec: ExportSpec) -> list[Path]:
    """The files written into `spec.target`."""
    from surgeon.core.progress import stage
    from surgeon.exporting.export import export_existing_run

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
        **spec.onnx.as_arguments(),
        quantize=spec.quantize,
        max_accuracy_drop=spec.max_accuracy_drop,
        measure_on=measure_on,
    )


@dataclass(frozen=True)
class StudySpec:
    file: Path  # the study file (TOML; the CLI's argument)
    out_dir: Path | None = OUT.field(help="study folder: cells/ and the table (default: exports/study-NAME)")
    shard: str | None = option(help="i/n (0-based): compute only cells i, i+n, ...; then run --collect")
    collect: bool = option(False, help="compute nothing: assemble the table from the stored cells")
    device: str | None = DEVICE.field()
    plot_format: str = PLOT_FORMAT.field()

    def check(self) -> None:
        if limits.shard(self.shard) is not None and self.collect:
            raise InvalidInput("shard and collect exclude each other", hint="collect once every shard has run")
        limits.texts(file=str(self.file), device=self.device)
        check_plot_format(self.plot_format)

    @property
    def target(self) -> Path:
        from surgeon.core.paths import exports_dir

        return self.out_dir or exports_dir() / f"study-{self.file.stem}"


def run_study(spec: StudySpec, quiet: bool = True) -> StudyRun:
    """The study's cells (stored under `spec.target`, so a rerun resumes) and, unless sharded, its table."""
    from surgeon.studies.study import compute_study, parse_study

    spec.check()
    study = parse_study(spec.file)
    return compute_study(
        study, spec.target, limits.shard(spec.shard), spec.collect, spec.device, quiet, spec.plot_format
    )


#: every job's spec, by verb (docs/options.md lists their options)
JOB_SPECS: dict[str, type] = {
    "rank": RankSpec,
    "prune": PruneSpec,
    "validate": ValidateSpec,
    "sweep": SweepSpec,
    "export": ExportSpec,
    "study": StudySpec,
}


if __name__ == "__main__":  # `python -m surgeon.api`: regenerate docs/options.md from the specs
    from surgeon.core.options import DOCS, markdown

    DOCS.write_text(markdown(JOB_SPECS), encoding="utf-8")
    print(f"wrote {DOCS}")
