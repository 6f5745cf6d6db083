"""The `surgeon` command line: a thin shell over the library functions (the gRPC service calls the same)."""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from surgeon import limits
from surgeon.api import (
    ExportSpec,
    ModelSpec,
    PruneSpec,
    RankSpec,
    StudySpec,
    SweepSpec,
    ValidateSpec,
    ValidationSpec,
    run_export,
    run_prune,
    run_rank,
    run_study,
    run_sweep,
    run_validate,
)
from surgeon.errors import StorageError, SurgeonError
from surgeon.progress import kept_after_interrupt
from surgeon.runtime.cli import infer, serve_model, triton_repo

EXIT_CODES = (
    "Exit codes: 0 success, 1 internal error, 2 invalid input, 3 not found, 4 corrupt input, 5 precondition "
    "(existing output, ranking of another model), 6 permission, 7 export check failed, 8 storage, "
    "9 partial result (study cells that could not be computed), 10 validation gate failed, 130 interrupted."
)

app = typer.Typer(
    help="Rank, prune, validate and export CLIP attention heads.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command()(infer)  # torch-free: the onnxruntime serving path
app.command("triton-repo")(triton_repo)  # torch-free too
app.command("serve-model")(serve_model)  # torch-free: Open Inference Protocol with MLServer
toy_app = typer.Typer(help="The embedded toy world and its bundled CLIP.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")
cache_app = typer.Typer(
    help="The on-disk cache of statistics and text embeddings ($SURGEON_CACHE_DIR, else ~/.cache/surgeon).",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")
out = Console()
err = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from surgeon import __version__

        print(f"surgeon {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_print_version, is_eager=True, help="print the version and exit"),
    ] = False,
) -> None:
    """Rank, prune, validate and export CLIP attention heads."""


ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="open_clip name, local-dir:PATH, or omit for the toy")
]
PretrainedOpt = Annotated[str | None, typer.Option(help="pretrained tag (from the local hub cache) or checkpoint file")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda when present)")]
ActivationOpt = Annotated[
    str | None,
    typer.Option(
        help="gelu or quickgelu: the MLP activation the weights were trained with (OpenAI's: quickgelu). Default: "
        "the config's or the tag's; a checkpoint file cannot say, so GELU is assumed with a warning"
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document (output folder, files, summary)")]
PlotFormatOpt = Annotated[str, typer.Option(help="png, pdf or svg")]


ImagesOpt = Annotated[
    str | None, typer.Option(help="a folder of images, or 'toy' (the default for the toy model only)")
]


@app.command()
def rank(
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    activation: ActivationOpt = None,
    images: ImagesOpt = None,
    n_images: Annotated[int | None, typer.Option(help="use at most this many images (toy default: 2000)")] = None,
    texts: Annotated[str | None, typer.Option(help="'toy', 'general' or a file, one description per line")] = None,
    taxonomy: Annotated[str | None, typer.Option(help="concept taxonomy JSON for the lexicon judge")] = None,
    judge: Annotated[str, typer.Option(help="lexicon, embedding or llm")] = RankSpec.judge,
    layers: Annotated[str | None, typer.Option(help="e.g. 8-11, 3,5, last4 (default) or all")] = None,
    m: Annotated[int, typer.Option("--texts-per-head", "--m", help="texts per head (m)")] = RankSpec.m,
    span_rank: Annotated[
        int, typer.Option("--span-rank", "--rank", help="TextSpan projection rank")
    ] = RankSpec.span_rank,
    batch_size: Annotated[int, typer.Option(help="images per forward pass")] = RankSpec.batch_size,
    llm_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint for --judge llm")] = None,
    llm_model: Annotated[list[str] | None, typer.Option(help="judge model(s); several = majority vote")] = None,
    llm_key_env: Annotated[str, typer.Option(help="environment variable holding the API key")] = RankSpec.llm_key_env,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="output folder (default: a new one in exports/)")
    ] = None,
    force: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="recompute statistics and text embeddings even when cached")
    ] = False,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="checkpoint statistics every N batches (resumable after interruption)")
    ] = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    plot_format: PlotFormatOpt = RankSpec.plot_format,
) -> None:
    """Rank the vision heads by Concept Consistency Score; writes ranking.json/.csv and ccs_heatmap.png.
    Under `torchrun --nproc-per-node N -m surgeon rank ...` the images are sharded over the ranks."""
    from surgeon.distributed import device_for, world
    from surgeon.paths import new_run_dir

    spec = RankSpec(
        model=ModelSpec(model, pretrained, device, activation),
        images=images,
        n_images=n_images,
        texts=texts,
        taxonomy=taxonomy,
        judge=judge,
        layers=layers,
        m=m,
        span_rank=span_rank,
        batch_size=batch_size,
        use_cache=not no_cache,
        checkpoint_every=checkpoint_every,
        llm_url=llm_url,
        llm_models=tuple(llm_model or ()),
        llm_key_env=llm_key_env,
        force=force,
        plot_format=plot_format,
    )
    spec.check()
    main_rank = world().is_main
    spec = replace(
        spec,
        model=replace(spec.model, device=device_for(world(), device)),
        out_dir=(out_dir or new_run_dir("rank")) if main_rank else None,
    )
    outcome = run_rank(spec, quiet=quiet)
    ranking, image_set, target = outcome.ranking, outcome.images, outcome.out_dir
    if ranking is None:  # a non-zero torchrun rank: rank 0 writes the outputs
        return
    assert target is not None  # rank 0 always has its out_dir
    if image_set.skipped:
        err.print(
            f"[yellow]warning:[/] skipped {len(image_set.skipped)} unreadable image(s), e.g. {image_set.skipped[0]}",
            soft_wrap=True,
        )
    if as_json:
        from surgeon.clioutput import emit_json

        emit_json(
            "rank",
            target,
            [target / f for f in ("ranking.json", "ranking.csv", f"ccs_heatmap.{plot_format}")],
            {
                "heads": len(ranking.heads),
                "images": ranking.images["count"],
                "skipped_images": len(image_set.skipped),
                "cached_statistics": ranking.cached_stats,
                "ccs_distribution": ranking.ccs_distribution(),
            },
            model=ranking.model["name"],
            heads=[{"head": h.name, "label": h.label, "ccs": h.ccs} for h in ranking.sorted_heads()],
        )
        return
    shown = None if out.is_terminal else NON_TERMINAL_ROWS  # a log or a pipe gets the top, the files the rest
    print_ranking(ranking, shown)
    if shown is not None and len(ranking.heads) > shown:
        note = f"(top {shown} of {len(ranking.heads)} heads; all of them are in {target}/ranking.csv)"
        out.print(note, soft_wrap=True)
    dist = ", ".join(f"CCS@{k}={v:.0%}" for k, v in ranking.ccs_distribution().items())
    out.print(
        f"{len(ranking.heads)} heads ranked ({'cached' if ranking.cached_stats else 'fresh'} statistics over "
        f"{ranking.images['count']} images); {dist}"
    )
    if ranking.clamp_note():
        out.print(ranking.clamp_note())
    out.print(f"wrote {target}/ranking.json, ranking.csv, ccs_heatmap.{plot_format}")


NON_TERMINAL_ROWS = 20


def print_ranking(ranking, limit: int | None = None) -> None:
    table = Table(title=f"CCS ranking — {ranking.model['name']}", show_lines=False)
    for column in ("head", "label", "CCS", "texts (TextSpan order)"):
        table.add_column(column, overflow="fold")
    for h in ranking.sorted_heads()[:limit]:
        marks = " | ".join(("" if ok else "✗ ") + text for text, ok in zip(h.texts, h.verdicts, strict=True))
        table.add_row(h.name, h.label, str(h.ccs), marks)
    out.print(table)


RankingOpt = Annotated[Path | None, typer.Option(help="ranking.json (or its folder); ranks first when omitted")]
DataOpt = Annotated[
    Path | None,
    typer.Option(help="validation set: ImageFolder, CSV (path,label) or 'toy' (the default for the toy model only)"),
]
ClassnamesOpt = Annotated[Path | None, typer.Option(help="class names file, one per line (folder order)")]
TemplatesOpt = Annotated[
    Path | None,
    typer.Option(
        help="prompt templates file (one per line, with {}), or a named set: cifar10, cifar100, pets (the paper's "
        "18), food101 (1), country211 (5), imagenet1k, imagenet-a, imagenet-r (80), neutral (the CCS paper's 4). "
        "Default: the data set's own when its name is one of these, else neutral"
    ),
]
BiasDataOpt = Annotated[
    Path | None,
    typer.Option(help="bias set: CSV (path,group[,...]), or toy:counterfactuals (the toy's, ranked within shapes)"),
]
QueriesOpt = Annotated[Path | None, typer.Option(help="neutral queries file for --bias-data, one per line")]
BiasAttributeOpt = Annotated[
    str | None, typer.Option(help="bias-manifest header column holding the group (e.g. race, gender; default: 2nd)")
]
BiasWithinOpt = Annotated[
    str | None,
    typer.Option(
        help="bias-manifest column (e.g. occupation) whose value names the query that ranks each image: each "
        "query ranks only its own images, as the paper ranks SocialCounterfactuals (--queries: optional, a subset)"
    ),
]
BiasGroupsOpt = Annotated[
    str | None, typer.Option(help="fold the group labels by name: fairface-race6 (the paper's 6 FairFace races)")
]
OnnxExporterOpt = Annotated[
    str | None,
    typer.Option(
        help="dynamo (torch.export; default, or $SURGEON_ONNX_EXPORTER) or torchscript (deprecated by torch); "
        "both parity-checked"
    ),
]
SkewKOpt = Annotated[int, typer.Option(help="k of MaxSkew@k / MinSkew@k")]
DesiredOpt = Annotated[
    str | None, typer.Option(help="desired group distribution: uniform or set (default: the protocol's)")
]
BiasProtocolOpt = Annotated[
    str,
    typer.Option(
        help="surgeon (uniform p*, absent groups as 1/k, mean over queries) or paper (the set's proportions, "
        "absent groups skipped, MaxSkew summed over queries: max_skew@k_sum is the paper's figure)"
    ),
]
RetrievalDataOpt = Annotated[
    Path | None,
    typer.Option(
        help="retrieval set: CSV (path,caption; one row per caption) of images (image<->text recall@k) or of "
        "videos (text->video, the first caption per video), or clip_benchmark's retrieval webdataset folder"
    ),
]
FramesOpt = Annotated[int, typer.Option(help="frames per video of a video retrieval set (the paper: 12; DiDeMo 32)")]
LanguageOpt = Annotated[str, typer.Option(help="language of the class names and templates (clip_benchmark files)")]


def _validation_options(
    data: Path | None,
    classnames: Path | None,
    templates: Path | None,
    bias_data: Path | None,
    queries: Path | None,
    skew_k: int,
    desired: str | None,
    bias_protocol: str,
    bias_split_by: str | None = None,
    language: str = ValidationSpec.language,
    retrieval_data: Path | None = None,
    frames: int = ValidationSpec.frames,
    bias_attribute: str | None = None,
    bias_within: str | None = None,
    bias_groups: str | None = None,
) -> ValidationSpec:
    """The validation options prune, validate and sweep share, mapped to their spec by name in one place."""
    return ValidationSpec(
        data=data,
        classnames=classnames,
        templates=templates,
        bias_data=bias_data,
        queries=queries,
        skew_k=skew_k,
        desired=desired,
        bias_protocol=bias_protocol,
        bias_split_by=bias_split_by,
        language=language,
        retrieval_data=retrieval_data,
        frames=frames,
        bias_attribute=bias_attribute,
        bias_within=bias_within,
        bias_groups=bias_groups,
    )


@app.command()
def prune(
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    activation: ActivationOpt = None,
    ranking: RankingOpt = None,
    policy: Annotated[
        str,
        typer.Option(
            help="top-k, bottom-k, high, low, random, equal-high, equal-low, heads, concept, threshold, debias, "
            "paper-high, paper-low, paper-random, paper-equal-high, paper-equal-low"
        ),
    ] = PruneSpec.policy,
    k: Annotated[int | None, typer.Option(help="number of heads (top-k, bottom-k, random; budget for debias)")] = None,
    heads: Annotated[str | None, typer.Option(help="explicit heads, e.g. L11.H5,L10.H8")] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="MODEL/TAG, e.g. ViT-B-32/openai: paper-* head lists for a checkpoint file of those weights"),
    ] = None,
    concept: Annotated[str | None, typer.Option(help="concept label for the concept policy")] = None,
    min_ccs: Annotated[int | None, typer.Option(help="threshold policy: prune heads with CCS >= this")] = None,
    seed: Annotated[int, typer.Option(help="random seed (debias: draws its search and stop splits)")] = PruneSpec.seed,
    seeds: Annotated[
        int, typer.Option(help="random policy: repeat over this many seeds and average")
    ] = PruneSpec.seeds,
    mode: Annotated[str, typer.Option(help="zero, mean or hard")] = PruneSpec.mode,
    tower: Annotated[str, typer.Option(help="vision, text or both")] = PruneSpec.tower,
    max_acc_drop: Annotated[float | None, typer.Option(help="gate: max drop of mean zero-shot top-1 (points)")] = None,
    max_skew: Annotated[float | None, typer.Option(help="gate: max MaxSkew@k after pruning")] = None,
    min_acc: Annotated[float | None, typer.Option(help="gate: min mean zero-shot top-1 after pruning (points)")] = None,
    export_anyway: Annotated[bool, typer.Option(help="export even when a gate fails")] = False,
    export: Annotated[str, typer.Option(help="safetensors, onnx or both")] = PruneSpec.export,
    labels: Annotated[Path | None, typer.Option(help="class names for classifier.onnx (ONNX export)")] = None,
    atol: Annotated[float, typer.Option(help="ONNX parity tolerance (max abs difference)")] = PruneSpec.atol,
    onnx_exporter: OnnxExporterOpt = None,
    images: ImagesOpt = None,
    n_images: Annotated[int | None, typer.Option(help="images for ranking and mean ablation")] = None,
    texts: Annotated[str | None, typer.Option(help="text pool when ranking first")] = None,
    judge: Annotated[str, typer.Option(help="judge when ranking first")] = PruneSpec.judge,
    layers: Annotated[str | None, typer.Option(help="layers when ranking first")] = None,
    data: DataOpt = None,
    classnames: ClassnamesOpt = None,
    templates: TemplatesOpt = None,
    bias_data: BiasDataOpt = None,
    queries: QueriesOpt = None,
    skew_k: SkewKOpt = ValidationSpec.skew_k,
    desired: DesiredOpt = None,
    bias_protocol: BiasProtocolOpt = ValidationSpec.bias_protocol,
    bias_split_by: Annotated[
        str | None,
        typer.Option(help="debias: bias-manifest column (e.g. identity) kept on one side of the search/held-out split"),
    ] = None,
    bias_attribute: BiasAttributeOpt = None,
    bias_within: BiasWithinOpt = None,
    bias_groups: BiasGroupsOpt = None,
    retrieval_data: RetrievalDataOpt = None,
    frames: FramesOpt = ValidationSpec.frames,
    max_recall_drop: Annotated[
        float | None, typer.Option(help="gate: max drop of mean text->image/video recall@1 (points)")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="run folder (default: new one in exports/)")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
    language: LanguageOpt = ValidationSpec.language,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Select heads with a policy, prune them (zero/mean/hard), validate before/after, export the result."""
    from surgeon.errors import GateFailed
    from surgeon.paths import new_run_dir

    spec = PruneSpec(
        model=ModelSpec(model, pretrained, device, activation),
        ranking=ranking,
        policy=policy,
        k=k,
        heads=heads,
        preset=preset,
        concept=concept,
        min_ccs=min_ccs,
        seed=seed,
        seeds=seeds,
        mode=mode,
        tower=tower,
        max_acc_drop=max_acc_drop,
        max_skew=max_skew,
        min_acc=min_acc,
        max_recall_drop=max_recall_drop,
        export_anyway=export_anyway,
        export=export,
        labels=labels,
        atol=atol,
        onnx_exporter=onnx_exporter,
        images=images,
        n_images=n_images,
        texts=texts,
        judge=judge,
        layers=layers,
        validation=_validation_options(
            data,
            classnames,
            templates,
            bias_data,
            queries,
            skew_k,
            desired,
            bias_protocol,
            bias_split_by,
            language,
            retrieval_data,
            frames,
            bias_attribute,
            bias_within,
            bias_groups,
        ),
        force=force,
    )
    spec.check()
    result = run_prune(replace(spec, out_dir=out_dir or new_run_dir("prune")), quiet=quiet)
    assert result.run_dir is not None  # run with an out_dir
    if as_json:
        from surgeon.clioutput import emit_json

        emit_json(
            "prune",
            result.run_dir,
            sorted(p for p in result.run_dir.rglob("*") if p.is_file()),
            {"before": result.before["summary"], "after": result.after["summary"]},
            policy=policy,
            mode=mode,
            heads=result.plan.to_dict()["heads"],
            gate_failures=result.gate_failures,
            exported=result.exported,
            seed_mean=result.plan.seed_mean,
            intervals={k: r.get("summary_ci95") for k, r in (("before", result.before), ("after", result.after))},
            against_chance=result.against_chance,
        )
    else:
        _print_prune(result, policy, mode)
    if result.gate_failures:
        raise GateFailed("; ".join(result.gate_failures), hint="see report.md; --export-anyway exports regardless")


def _print_prune(result, policy: str, mode: str) -> None:
    table = Table(title=f"pruned {len(result.plan.heads)} head(s): policy {policy}, mode {mode}")
    for column in ("head", "label", "CCS", "reason"):
        table.add_column(column, overflow="fold")
    for h in result.plan.heads:
        table.add_row(h.head, h.label or "", "" if h.ccs is None else str(h.ccs), h.reason)
    out.print(table)
    if "stopped" in result.plan.policy_details:
        out.print(f"debias search: {result.plan.policy_details['stopped']}", highlight=False)
    _print_summary(result.before, result.after)
    if result.against_chance:
        from surgeon.debias import chance_line

        out.print(chance_line(result.against_chance), highlight=False, soft_wrap=True)
    if result.seeds:
        out.print(f"random policy over {len(result.seeds)} seeds: mean {result.plan.seed_mean}")
    _print_parity(result.run_dir if result.exported else None)
    out.print(f"run folder: {result.run_dir}" + ("" if result.exported else " (export skipped: gate failed)"))


def _print_parity(folder: Path | None) -> None:
    from surgeon.runfolder import parity_lines

    for line in parity_lines(folder) if folder is not None else []:
        out.print(line, highlight=False, soft_wrap=True)


def _print_summary(before_report: dict, after_report: dict | None = None) -> None:
    """The summaries of validation reports: accuracy in % and its change in points, as report.md and the card
    show them (validate.UNITS_NOTE); a bias figure with its 95% bootstrap interval where measured."""
    from surgeon.validate import UNITS_NOTE

    before, after = before_report["summary"], after_report["summary"] if after_report else None
    table = Table(title="validation", caption=UNITS_NOTE if "mean_acc1" in before else None)
    table.add_column("metric")
    table.add_column("before" if after else "value", justify="right")
    if after:
        table.add_column("after", justify="right")
        table.add_column("change", justify="right")

    def shown(report: dict, key: str, scale: int, digits: int) -> str:
        bounds = report.get("summary_ci95", {}).get(key)
        interval = f" [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]" if bounds else ""
        return f"{scale * report['summary'][key]:.{digits}f}" + interval

    for key, value in before.items():
        if value is None:
            continue
        percent = key in ("mean_acc1", "mean_recall1")
        scale, digits, name = (100, 2, f"{key} (%)") if percent else (1, 4, key)
        row = [name, shown(before_report, key, scale, digits)]
        if after and after_report:
            row += [shown(after_report, key, scale, digits), f"{scale * (after[key] - value):+.{digits}f}"]
        table.add_row(*row)
    out.print(table)
    if any("summary_ci95" in r for r in (before_report, after_report) if r):
        out.print("bias figures: value [95% bootstrap interval over the bias set's units]", highlight=False)


@app.command()
def validate(
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    activation: ActivationOpt = None,
    data: DataOpt = None,
    classnames: ClassnamesOpt = None,
    templates: TemplatesOpt = None,
    bias_data: BiasDataOpt = None,
    queries: QueriesOpt = None,
    skew_k: SkewKOpt = ValidationSpec.skew_k,
    desired: DesiredOpt = None,
    bias_protocol: BiasProtocolOpt = ValidationSpec.bias_protocol,
    bias_attribute: BiasAttributeOpt = None,
    bias_within: BiasWithinOpt = None,
    bias_groups: BiasGroupsOpt = None,
    retrieval_data: RetrievalDataOpt = None,
    frames: FramesOpt = ValidationSpec.frames,
    as_json: JsonOpt = False,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="folder for validation.json and clip_benchmark/ (one result file per set)"),
    ] = None,
    language: LanguageOpt = ValidationSpec.language,
    force: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Zero-shot accuracy and bias metrics of a model (toy benchmarks by default). Data: an ImageFolder, a CSV
    manifest, or clip_benchmark's webdataset layout (test/*.tar + classnames.txt + templates)."""
    from surgeon.clioutput import emit_json
    from surgeon.validate import markdown_report

    validation = _validation_options(
        data,
        classnames,
        templates,
        bias_data,
        queries,
        skew_k,
        desired,
        bias_protocol,
        language=language,
        retrieval_data=retrieval_data,
        frames=frames,
        bias_attribute=bias_attribute,
        bias_within=bias_within,
        bias_groups=bias_groups,
    )
    spec = ValidateSpec(ModelSpec(model, pretrained, device, activation), validation, out_dir, force)
    spec.check()
    report, files = run_validate(spec, quiet=quiet)
    if as_json:
        emit_json("validate", out_dir, files, report["summary"], model=report["model"], results=report["results"])
        return
    out.print(markdown_report(report), highlight=False)
    _print_summary(report)
    if out_dir:
        out.print(f"wrote {out_dir}/validation.json and {len(files) - 1} clip_benchmark file(s) in clip_benchmark/")


@app.command()
def sweep(
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    activation: ActivationOpt = None,
    ranking: RankingOpt = None,
    counts: Annotated[str | None, typer.Option(help="numbers of heads to prune, e.g. 0,2,4,8")] = None,
    seed: Annotated[int, typer.Option(help="seed of the random ordering")] = SweepSpec.seed,
    seeds: Annotated[
        int, typer.Option(help="random ordering: average this many seeds (plot: min-max band)")
    ] = SweepSpec.seeds,
    images: ImagesOpt = None,
    n_images: Annotated[int | None, typer.Option(help="images when ranking first")] = None,
    data: DataOpt = None,
    classnames: ClassnamesOpt = None,
    templates: TemplatesOpt = None,
    bias_data: BiasDataOpt = None,
    queries: QueriesOpt = None,
    skew_k: SkewKOpt = ValidationSpec.skew_k,
    desired: DesiredOpt = None,
    bias_protocol: BiasProtocolOpt = ValidationSpec.bias_protocol,
    out_dir: Annotated[Path | None, typer.Option("--out", help="output folder (default: new one in exports/)")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    plot_format: PlotFormatOpt = SweepSpec.plot_format,
) -> None:
    """Accuracy and bias vs number of pruned heads (high-CCS, low-CCS, random); writes sweep.json + sweep.png."""
    from surgeon.paths import new_run_dir

    count_list = limits.sweep_counts(counts)
    validation = _validation_options(data, classnames, templates, bias_data, queries, skew_k, desired, bias_protocol)
    spec = SweepSpec(
        model=ModelSpec(model, pretrained, device, activation),
        ranking=ranking,
        counts=tuple(count_list) if count_list is not None else None,
        seed=seed,
        seeds=seeds,
        images=images,
        n_images=n_images,
        validation=validation,
        force=force,
        plot_format=plot_format,
    )
    spec.check()
    target = out_dir or new_run_dir("sweep")
    result = run_sweep(replace(spec, out_dir=target), quiet=quiet)
    if as_json:
        from surgeon.clioutput import emit_json

        summary = {name: [p["mean_acc1"] for p in points] for name, points in result["curves"].items()}
        files = [target / "sweep.json", target / f"sweep.{plot_format}"]
        emit_json("sweep", target, files, summary, counts=result["counts"])
        return
    table = Table(title="mean zero-shot top-1 (%) by heads pruned")
    table.add_column("ordering")
    for c in result["counts"]:
        table.add_column(str(c), justify="right")
    for name, points in result["curves"].items():
        table.add_row(name, *[f"{100 * p['mean_acc1']:.1f}" for p in points])
    out.print(table)
    out.print(f"wrote {target}/sweep.json and sweep.{plot_format}")


@app.command()
def study(
    file: Annotated[Path, typer.Argument(help="study file (TOML): models, policies, modes, data and bias sets")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="study folder: cells/ and the table (default: exports/study-NAME)")
    ] = None,
    shard: Annotated[
        str | None, typer.Option(help="i/n (0-based): compute only cells i, i+n, ...; then run --collect")
    ] = None,
    collect: Annotated[bool, typer.Option(help="compute nothing: assemble the table from the stored cells")] = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    plot_format: PlotFormatOpt = RankSpec.plot_format,
) -> None:
    """Run a study: every model x policy x mode x data set cell (stored, so a rerun resumes), then the table
    in the paper's layout (table.md, table.csv, table.json, study.png)."""
    from surgeon.errors import PartialResult
    from surgeon.study import markdown_table

    spec = StudySpec(file, out_dir, shard, collect, device, plot_format)
    run, target = run_study(spec, quiet=quiet), spec.target
    summary = {"computed": len(run.computed), "reused": len(run.reused)}
    if as_json:
        from surgeon.clioutput import emit_json

        emit_json("study", target, run.files, summary, table=run.table, failures=run.failed)
    else:
        for table in run.tables:
            out.print(markdown_table(table), highlight=False, soft_wrap=True)
        done = f"{len(run.computed)} cell(s) computed, {len(run.reused)} already stored"
        wrote = f"wrote {target}/{', '.join(p.name for p in run.files)}" if run.files else f"cells in {target}/cells"
        out.print(f"{done}; {wrote}", soft_wrap=True)
    if run.failed:
        raise PartialResult(
            f"{len(run.failed)} cell(s) could not be computed, e.g. {run.failed[0]}",
            hint="the table marks them `failed` and lists why; a rerun computes only them",
        )


@app.command("export")
def export_command(
    run_dir: Annotated[
        Path | None, typer.Argument(help="a run folder written by `surgeon prune` (default: the newest in exports/)")
    ] = None,
    export_format: Annotated[str, typer.Option("--format", help="safetensors, onnx or both")] = ExportSpec.format,
    labels: Annotated[Path | None, typer.Option(help="class names for classifier.onnx")] = None,
    atol: Annotated[float, typer.Option(help="ONNX parity tolerance (max abs difference)")] = ExportSpec.atol,
    onnx_exporter: OnnxExporterOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="output folder (default: RUN_DIR/export-FORMAT)")
    ] = None,
    force: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="skip checking the run's files against surgery.json's sha256 hashes")
    ] = False,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
    quantize: Annotated[
        str | None, typer.Option(help="int8: quantize the image graphs (onnxruntime), gated on accuracy")
    ] = None,
    max_accuracy_drop: Annotated[
        float, typer.Option(help="--quantize's gate: points of mean zero-shot top-1 int8 may cost")
    ] = ExportSpec.max_accuracy_drop,
    data: DataOpt = None,
    classnames: ClassnamesOpt = None,
    templates: TemplatesOpt = None,
) -> None:
    """Export the pruned checkpoint of a run folder again (ONNX, safetensors), validated and with a card.
    --quantize measures int8 on the data the run recorded, or on --data when given."""
    given = any(p is not None for p in (data, classnames, templates))
    spec = ExportSpec(
        run_dir or Path(),
        format=export_format,
        labels=labels,
        atol=atol,
        onnx_exporter=onnx_exporter,
        out_dir=out_dir,
        force=force,
        verify=not no_verify,
        device=device,
        quantize=quantize,
        max_accuracy_drop=max_accuracy_drop,
        validation=ValidationSpec(data=data, classnames=classnames, templates=templates) if given else None,
    )
    spec.check()
    if run_dir is None:
        from surgeon.paths import newest_run

        run_dir = newest_run(hint="run `surgeon prune` first, or pass RUN_DIR")
        err.print(f"exporting the newest run: {run_dir}", soft_wrap=True)  # a long path stays whole
        spec = replace(spec, run_dir=run_dir)
    target = spec.target
    files = run_export(spec)
    if as_json:
        from surgeon.clioutput import emit_json

        emit_json("export", target, files, {"files": len(files), "format": export_format}, run_dir=str(run_dir))
        return
    for path in files:
        out.print(str(path))
    _print_parity(target)
    out.print(f"exported {len(files)} file(s) into {target} (README.md and surgery.json describe them)")


@toy_app.command("train")
def toy_train(
    out_dir: Annotated[Path | None, typer.Option("--out", help="model folder (default: the bundled model's)")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps (default: the shipped recipe)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    threads: Annotated[
        int | None, typer.Option(help="torch CPU threads (default: all cores; the bundled model used 1)")
    ] = None,
    force: Annotated[bool, typer.Option(help="replace an existing model folder")] = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the toy CLIP on the toy world (seeded, reproducible); writes an open_clip local-dir folder."""
    import dataclasses

    import torch

    from surgeon.load import TOY_MODEL_DIR
    from surgeon.progress import progress_enabled
    from surgeon.toy.train import TrainConfig, train

    limits.count("--threads", threads, 1, limits.MAX_THREADS)
    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(seed=seed)
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps)
    target = out_dir or TOY_MODEL_DIR
    result = train(cfg, target, force=force, progress=progress_enabled(quiet) and not as_json)
    summary = {k: v for k, v in result.items() if k != "history"}
    if as_json:
        from surgeon.clioutput import emit_json

        emit_json("toy train", target, sorted(p for p in Path(target).iterdir() if p.is_file()), summary)
        return
    out.print(summary)


@toy_app.command("report")
def toy_report_command(
    model: ModelOpt = None,
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Per-factor accuracy, MaxSkew@10, specialised heads (trained vs a re-initialised vision tower, and chance),
    ground-truth agreement."""

    from surgeon.load import load_model
    from surgeon.toy.report import toy_report

    report = toy_report(load_model(model, device=device), quiet=quiet)
    if as_json:
        from surgeon.clioutput import emit_json

        emit_json("toy report", None, [], report["met"], **report)
        return
    table = Table(title=f"toy report — {report['model']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target")
    for factor, acc in report["zero_shot_acc1"].items():
        table.add_row(f"zero-shot top-1: {factor}", f"{100 * acc:.1f}%", ">= 85%")
    table.add_row("MaxSkew@10 (mean over neutral queries)", f"{report['max_skew@10']:.3f}", ">= 0.3")
    share = report["bias_majority_share@10"]
    table.add_row("top 10 wearing the shape's training outline", f"{100 * share:.0f}%", "> 50% (direction)")
    heads = report["heads_ccs>=4"]
    table.add_row("heads with CCS >= 4 (trained)", f"{heads['trained']} / {heads['analysed']}", ">= 6")
    seeds = heads["random_init_per_seed"]
    table.add_row(
        f"heads with CCS >= 4 (vision tower re-initialised, seeds {', '.join(seeds)})",
        f"{heads['random_init']:.1f} ({', '.join(map(str, seeds.values()))}) / {heads['analysed']}",
        "far fewer",
    )
    chance = report["chance"]
    table.add_row(
        f"chance: {chance['m']} random pool texts, mean CCS / P(CCS >= 4)",
        f"{chance['mean_ccs']:.2f} / {100 * chance['p_ccs>=4']:.1f}%",
        f"{chance['draws']:,} draws",
    )
    agree = report["ground_truth_agreement"]
    for key in ("ccs>=4", "ccs<4"):
        ties = f", {agree['ties_' + key]} ties ({agree['ties_with_truth_' + key]} include it)"
        value = "n/a" if agree[key] is None else f"{100 * agree[key]:.0f}% of {agree['n_' + key]}{ties}"
        table.add_row(f"label = ground-truth factor ({key})", value, ">= 80%" if key == "ccs>=4" else "")
    out.print(table)
    out.print("targets met: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in report["met"].items()))


@toy_app.command("images")
def toy_images_command(
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write PNGs and labels.csv into")],
    n: Annotated[int, typer.Option(help="number of images")] = 64,
    split: Annotated[str, typer.Option(help="train, test, val or probe")] = "test",
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    force: Annotated[bool, typer.Option(help="replace an existing folder")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write toy-world images as PNGs with a labels.csv, to look at the world."""
    from surgeon.toy import world

    folder = world.write_png_folder(out_dir, n, split=split, seed=seed, force=force)
    if as_json:
        from surgeon.clioutput import emit_json

        emit_json("toy images", folder, sorted(folder.iterdir()), {"images": n, "split": split, "seed": seed})
        return
    out.print(f"wrote {n} images and labels.csv to {folder}")


@cache_app.command("list")
def cache_list(
    files: Annotated[bool, typer.Option("--files", help="one row per file instead of per kind")] = False,
) -> None:
    """What the cache holds, per kind (stats, text, partial, llm), least recently used first with --files."""
    from datetime import datetime

    from surgeon.cache import entries, human
    from surgeon.paths import cache_dir

    found = entries()
    table = Table(title=f"cache: {cache_dir()}")
    if files:
        for column in ("kind", "size", "last used", "file"):
            table.add_column(column, overflow="fold")
        for e in found:
            used = datetime.fromtimestamp(e.used).strftime("%Y-%m-%d %H:%M")
            table.add_row(e.kind, human(e.size), used, str(e.path.relative_to(cache_dir())))
    else:
        for column in ("kind", "entries", "size"):
            table.add_column(column)
        for kind in sorted({e.kind for e in found}):
            mine = [e for e in found if e.kind == kind]
            table.add_row(kind, str(len(mine)), human(sum(e.size for e in mine)))
    out.print(table)
    out.print(f"{len(found)} file(s), {human(sum(e.size for e in found))}")


@cache_app.command("size")
def cache_size() -> None:
    """Total size of the cache, in bytes and readable."""
    from surgeon.cache import entries, human

    total = sum(e.size for e in entries())
    out.print(f"{total} bytes ({human(total)})")


@cache_app.command("clear")
def cache_clear(
    kinds: Annotated[
        list[str] | None, typer.Argument(help="kinds to clear (stats, text, partial, llm); default all")
    ] = None,
) -> None:
    """Delete cache entries; each is recomputed when next needed."""
    from surgeon.cache import clear, human

    gone = clear(kinds)
    out.print(f"deleted {len(gone)} file(s), {human(sum(e.size for e in gone))}")


@cache_app.command("evict")
def cache_evict(
    max_size: Annotated[str, typer.Option(help="keep at most this much, e.g. 5GB, 500MB, 2GiB")],
) -> None:
    """Delete least recently used entries until the cache fits in --max-size."""
    from surgeon.cache import entries, evict, human, parse_size

    gone = evict(parse_size(max_size))
    left = sum(e.size for e in entries())
    out.print(f"deleted {len(gone)} file(s), {human(sum(e.size for e in gone))}; {human(left)} left")


@app.command()
def models(as_json: JsonOpt = False) -> None:
    """List the open_clip architectures surgeon can load (weights come from local files or the hub cache)."""
    import open_clip

    from surgeon.load import TOY_MODEL_DIR, supported_architectures

    names = supported_architectures()
    if as_json:
        from surgeon.clioutput import emit_json

        entries = [{"name": "toy", "pretrained_tags": [], "path": str(TOY_MODEL_DIR)}]
        entries += [{"name": n, "pretrained_tags": open_clip.list_pretrained_tags_by_model(n)} for n in names]
        emit_json("models", None, [], {"models": len(entries)}, models=entries)
        return
    out.print(f"toy (bundled: {TOY_MODEL_DIR})")
    for name in names:
        out.print(name)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 in a container)")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar="SURGEON_PORT", help="port; 0 picks a free one (printed at start)")
    ] = 50051,
    exports_root: Annotated[
        Path | None, typer.Option(help="where jobs write (default: $SURGEON_EXPORTS_DIR or ./exports)")
    ] = None,
    models_root: Annotated[
        Path | None, typer.Option(help="local-dir: models and checkpoints requests may name")
    ] = None,
    data_root: Annotated[Path | None, typer.Option(help="images, pools and validation data requests may name")] = None,
    max_jobs: Annotated[int, typer.Option(help="jobs running at once")] = 2,
    queue_size: Annotated[int, typer.Option(help="jobs waiting at most; more are refused (RESOURCE_EXHAUSTED)")] = 16,
    token_env: Annotated[
        str | None, typer.Option(help="environment variable holding the bearer token clients must send")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate chain (TLS, with --tls-key)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key (TLS, with --tls-cert)")] = None,
    grace: Annotated[float, typer.Option(help="seconds running jobs get on SIGTERM before they are cancelled")] = 20.0,
    device: DeviceOpt = None,
) -> None:
    """Serve rank/prune/validate/export as gRPC jobs (surgeon.v1.Surgeon) with health checking and reflection."""
    from surgeon.server.main import serve as run_server  # needs the serve and surgery extras: main() says which

    run_server(
        host=host,
        port=port,
        exports_root=exports_root,
        models_root=models_root,
        data_root=data_root,
        max_jobs=max_jobs,
        queue_size=queue_size,
        token_env=token_env,
        tls_cert=tls_cert,
        tls_key=tls_key,
        grace=grace,
        device=device,
    )


for _command in [*app.registered_commands, *toy_app.registered_commands]:  # every verb's --help ends with them
    _command.epilog = _command.epilog or EXIT_CODES

_interrupted = threading.Event()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning is one line for the user (e.g. random initialisation), not a Python source echo."""
    err.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _inside_an_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _on_interrupt(signum, frame) -> None:
    """Ctrl-C and SIGTERM unwind the stack, except inside an import: an exception raised while a C extension
    initialises (onnx's, torch's) can crash the interpreter (seen: SIGSEGV), so it is delivered by a timer
    once the import is done."""
    _interrupted.set()
    if _inside_an_import(frame):
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        return
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: every SurgeonError becomes one readable line and its exit code; Ctrl-C exits 130.

    An interrupt does not always arrive as KeyboardInterrupt: one that lands in a C extension's import
    (numpy's, during torch's) surfaces later as an ImportError or AttributeError. Whatever follows a Ctrl-C
    is therefore reported as the interruption it is."""
    _interrupted.clear()  # a run in this process (tests, notebooks) starts uninterrupted whatever ran before
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):  # SIGTERM (docker stop) too: no leftovers
        signal.signal(sig, _on_interrupt)
    warnings.showwarning = _show_warning
    try:
        app()
    except SystemExit:
        if _interrupted.is_set():  # typer turns a KeyboardInterrupt into a silent exit 130: say what happened
            err.print(f"interrupted: {kept_after_interrupt()}", highlight=False, soft_wrap=True)
            sys.exit(130)
        raise
    except (KeyboardInterrupt, Exception) as error:
        if isinstance(error, KeyboardInterrupt) or _interrupted.is_set():
            err.print(f"interrupted: {kept_after_interrupt()}", highlight=False, soft_wrap=True)
            sys.exit(130)
        if isinstance(error, ImportError):  # a surgery or serve verb on the plain (serving-only) install
            from surgeon.extras import missing_extra

            error = missing_extra(error, next((a for a in sys.argv[1:] if not a.startswith("-")), None)) or error
        if isinstance(error, SurgeonError):
            err.print(f"[bold red]error:[/] {escape(limits.clip(str(error)))}", highlight=False, soft_wrap=True)
            sys.exit(error.exit_code)
        if isinstance(error, OSError):  # the file system refused something the library did not expect to fail
            err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            sys.exit(StorageError.exit_code)
        raise


if __name__ == "__main__":
    main()
