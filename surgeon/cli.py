"""The `surgeon` command line: a thin shell over the library functions (the gRPC service calls the same)."""

from __future__ import annotations

import inspect
import signal
import sys
import threading
import typing
import warnings
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from surgeon.api import (
    ExportSpec,
    ModelSpec,
    PruneSpec,
    RankSpec,
    StudySpec,
    SweepSpec,
    ValidateSpec,
    run_export,
    run_prune,
    run_rank,
    run_study,
    run_sweep,
    run_validate,
)
from surgeon.core import limits
from surgeon.core.errors import StorageError, SurgeonError
from surgeon.core.options import build, declared, options_of
from surgeon.core.progress import kept_after_interrupt
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


ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help=declared(ModelSpec, "model").help)]
DeviceOpt = Annotated[str | None, typer.Option(help=declared(ModelSpec, "device").help)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document (output folder, files, summary)")]


def _cli_type(hint: Any) -> Any:
    """A spec field's type as typer reads it: a tuple of strings is a repeatable option (a list, or None)."""
    return list[str] | None if typing.get_origin(hint) is tuple else hint


def spec_options(spec: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A verb whose options are `spec`'s option fields (surgeon.core.options: flags, help and default from each
    field), followed by the verb's own parameters (--quiet, --json ...). The verb receives the spec, built from
    those options and from its own parameters that are spec fields too (an argument such as RUN_DIR)."""
    offered = [o for o in options_of(spec) if o.option.cli]
    names = {f.name for f in fields(spec)}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]  # after `spec`
        derived = [
            inspect.Parameter(
                o.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None if typing.get_origin(o.type) is tuple else o.option.default,
                annotation=Annotated[_cli_type(o.type), typer.Option(*o.option.flags, help=o.option.help)],
            )
            for o in offered
        ]
        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

        def run(**values: Any) -> Any:
            options = {o.name: values.pop(o.name) for o in offered}
            options |= {p.name: values[p.name] for p in own if p.name in names}
            return command(build(spec, options), **values)

        run.__name__, run.__doc__, run.__module__ = command.__name__, command.__doc__, command.__module__
        run.__signature__ = inspect.Signature(derived + parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in derived + parameters}
        return run

    return decorate


@app.command()
@spec_options(RankSpec)
def rank(
    spec: RankSpec,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Rank the vision heads by Concept Consistency Score; writes ranking.json/.csv and ccs_heatmap.png.
    Under `torchrun --nproc-per-node N -m surgeon rank ...` the images are sharded over the ranks."""
    from surgeon.core.distributed import device_for, world
    from surgeon.core.paths import new_run_dir

    spec.check()
    main_rank = world().is_main
    spec = replace(
        spec,
        model=replace(spec.model, device=device_for(world(), spec.model.device)),
        out_dir=(spec.out_dir or new_run_dir("rank")) if main_rank else None,
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
        from surgeon.core.clioutput import emit_json

        emit_json(
            "rank",
            target,
            [target / f for f in ("ranking.json", "ranking.csv", f"ccs_heatmap.{spec.plot_format}")],
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
    out.print(f"wrote {target}/ranking.json, ranking.csv, ccs_heatmap.{spec.plot_format}")


NON_TERMINAL_ROWS = 20


def print_ranking(ranking, limit: int | None = None) -> None:
    table = Table(title=f"CCS ranking — {ranking.model['name']}", show_lines=False)
    for column in ("head", "label", "CCS", "texts (TextSpan order)"):
        table.add_column(column, overflow="fold")
    for h in ranking.sorted_heads()[:limit]:
        marks = " | ".join(("" if ok else "✗ ") + text for text, ok in zip(h.texts, h.verdicts, strict=True))
        table.add_row(h.name, h.label, str(h.ccs), marks)
    out.print(table)


@app.command()
@spec_options(PruneSpec)
def prune(spec: PruneSpec, quiet: QuietOpt = False, as_json: JsonOpt = False) -> None:
    """Select heads with a policy, prune them (zero/mean/hard), validate before/after, export the result."""
    from surgeon.core.errors import GateFailed
    from surgeon.core.paths import new_run_dir

    spec.check()
    result = run_prune(replace(spec, out_dir=spec.out_dir or new_run_dir("prune")), quiet=quiet)
    policy, mode = spec.policy, spec.mode
    assert result.run_dir is not None  # run with an out_dir
    if as_json:
        from surgeon.core.clioutput import emit_json

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
        from surgeon.selection.debias import chance_line

        out.print(chance_line(result.against_chance), highlight=False, soft_wrap=True)
    if result.seeds:
        out.print(f"random policy over {len(result.seeds)} seeds: mean {result.plan.seed_mean}")
    _print_parity(result.run_dir if result.exported else None)
    out.print(f"run folder: {result.run_dir}" + ("" if result.exported else " (export skipped: gate failed)"))


def _print_parity(folder: Path | None) -> None:
    from surgeon.results.runfolder import parity_lines

    for line in parity_lines(folder) if folder is not None else []:
        out.print(line, highlight=False, soft_wrap=True)


def _print_summary(before_report: dict, after_report: dict | None = None) -> None:
    """The summaries of validation reports: accuracy in % and its change in points, as report.md and the card
    show them (validate.UNITS_NOTE); a bias figure with its 95% bootstrap interval where measured, and the
    MaxSkew@k of a random ranking of the same images."""
    from surgeon.results.records import bias_floor
    from surgeon.validation.validate import UNITS_NOTE

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
    for key, chance in bias_floor(before_report).items():  # what an unbiased model scores, not 0
        if key in before and key.startswith("max_skew@"):
            out.print(f"{key} of a ranking that ignores the images: {chance:.4f}", highlight=False)


@app.command()
@spec_options(ValidateSpec)
def validate(spec: ValidateSpec, as_json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Zero-shot accuracy and bias metrics of a model (toy benchmarks by default). Data: an ImageFolder, a CSV
    manifest, or clip_benchmark's webdataset layout (test/*.tar + classnames.txt + templates)."""
    from surgeon.core.clioutput import emit_json
    from surgeon.validation.validate import markdown_report

    spec.check()
    report, files = run_validate(spec, quiet=quiet)
    out_dir = spec.out_dir
    if as_json:
        emit_json("validate", out_dir, files, report["summary"], model=report["model"], results=report["results"])
        return
    out.print(markdown_report(report), highlight=False)
    _print_summary(report)
    if out_dir:
        out.print(f"wrote {out_dir}/validation.json and {len(files) - 1} clip_benchmark file(s) in clip_benchmark/")


@app.command()
@spec_options(SweepSpec)
def sweep(
    spec: SweepSpec,
    counts: Annotated[str | None, typer.Option(help=declared(SweepSpec, "counts").help)] = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy and bias vs number of pruned heads (high-CCS, low-CCS, random); writes sweep.json + sweep.png."""
    from surgeon.core.paths import new_run_dir

    count_list = limits.sweep_counts(counts)
    spec = replace(spec, counts=tuple(count_list) if count_list is not None else None)
    spec.check()
    target = spec.out_dir or new_run_dir("sweep")
    plot_format = spec.plot_format
    result = run_sweep(replace(spec, out_dir=target), quiet=quiet)
    if as_json:
        from surgeon.core.clioutput import emit_json

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
@spec_options(StudySpec)
def study(
    spec: StudySpec,
    file: Annotated[Path, typer.Argument(help="study file (TOML): models, policies, modes, data and bias sets")],
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a study: every model x policy x mode x data set cell (stored, so a rerun resumes), then the table
    in the paper's layout (table.md, table.csv, table.json, study.png)."""
    from surgeon.core.errors import PartialResult
    from surgeon.studies.study import markdown_table

    run, target = run_study(spec, quiet=quiet), spec.target
    summary = {"computed": len(run.computed), "reused": len(run.reused)}
    if as_json:
        from surgeon.core.clioutput import emit_json

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
@spec_options(ExportSpec)
def export_command(
    spec: ExportSpec,
    run_dir: Annotated[
        Path | None, typer.Argument(help="a run folder written by `surgeon prune` (default: the newest in exports/)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export the pruned checkpoint of a run folder again (ONNX, safetensors), validated and with a card.
    --quantize measures int8 on the data the run recorded, or on --data when given."""
    spec = replace(spec, run_dir=run_dir or Path())
    spec.check()
    if run_dir is None:
        from surgeon.core.paths import newest_run

        run_dir = newest_run(hint="run `surgeon prune` first, or pass RUN_DIR")
        err.print(f"exporting the newest run: {run_dir}", soft_wrap=True)  # a long path stays whole
        spec = replace(spec, run_dir=run_dir)
    target = spec.target
    files = run_export(spec)
    if as_json:
        from surgeon.core.clioutput import emit_json

        emit_json("export", target, files, {"files": len(files), "format": spec.format}, run_dir=str(run_dir))
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

    from surgeon.core.progress import progress_enabled
    from surgeon.model.load import TOY_MODEL_DIR
    from surgeon.studies.toy_train import TrainConfig, train

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
        from surgeon.core.clioutput import emit_json

        emit_json("toy train", target, sorted(p for p in Path(target).iterdir() if p.is_file()), summary)
        return
    out.print(summary)


@toy_app.command("report")
def toy_report_command(
    model: ModelOpt = None,
    as_json: JsonOpt = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    claim_draws: Annotated[
        int | None, typer.Option(help="random head sets per size behind the paper-claim p-values (default 50)")
    ] = None,
) -> None:
    """Per-factor accuracy, MaxSkew@10, specialised heads (trained vs a re-initialised vision tower, and chance),
    ground-truth agreement, and whether the paper's high-CCS heads carry the planted bias."""

    from surgeon.model.load import load_model
    from surgeon.studies.toy_report import RANDOM_SETS, toy_report

    limits.count("--claim-draws", claim_draws, 2, limits.MAX_CLAIM_DRAWS)  # before the model loads
    report = toy_report(load_model(model, device=device), quiet=quiet, claim_draws=claim_draws or RANDOM_SETS)
    if as_json:
        from surgeon.core.clioutput import emit_json

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
        value = "n/a" if agree[key] is None else f"{100 * agree[key]:.0f}% of {agree['n_' + key]}"
        table.add_row(f"label = ground-truth factor ({key})", value, ">= 80%" if key == "ccs>=4" else "")
    claim = report["paper_claim"]
    outline = claim["outline_heads"]
    table.add_row(
        "zero-shot top-1: dark vs light outline (the word learned)", f"{100 * claim['outline_zero_shot_acc1']:.1f}%", ""
    )
    table.add_row("heads labelled outlines (trained)", ", ".join(outline["trained"]) or "none", "")
    table.add_row(
        "heads labelled outlines (vision tower re-initialised)",
        ", ".join(map(str, outline["random_init_per_seed"])),
        "none",
    )
    table.add_row(
        "probe MaxSkew@10 / direction, no head removed",
        "{max_skew@10:.3f} / {majority_share@10:.2f}".format(**claim["probe"]),
        "",
    )
    for rule, entry in claim["sets"].items():
        if not entry["n"]:
            table.add_row(f"remove the {rule} heads", "no heads", "")
            continue
        rand = entry["random_sets"]
        table.add_row(
            f"remove the {rule} heads ({entry['n']}): change of MaxSkew@10 / direction",
            f"{entry['change_max_skew@10']:+.3f} / {entry['change_majority_share@10']:+.2f}",
            f"random sets: {rand['mean_change_max_skew@10']:+.3f} / "
            f"{rand['mean_change_majority_share@10']:+.2f}, p {rand['p_as_low']:.2f}",
        )
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
    from surgeon.inputs.toy import world

    folder = world.write_png_folder(out_dir, n, split=split, seed=seed, force=force)
    if as_json:
        from surgeon.core.clioutput import emit_json

        emit_json("toy images", folder, sorted(folder.iterdir()), {"images": n, "split": split, "seed": seed})
        return
    out.print(f"wrote {n} images and labels.csv to {folder}")


@cache_app.command("list")
def cache_list(
    files: Annotated[bool, typer.Option("--files", help="one row per file instead of per kind")] = False,
) -> None:
    """What the cache holds, per kind (stats, text, partial, llm), least recently used first with --files."""
    from datetime import datetime

    from surgeon.core.cache import entries, human
    from surgeon.core.paths import cache_dir

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
    from surgeon.core.cache import entries, human

    total = sum(e.size for e in entries())
    out.print(f"{total} bytes ({human(total)})")


@cache_app.command("clear")
def cache_clear(
    kinds: Annotated[
        list[str] | None, typer.Argument(help="kinds to clear (stats, text, partial, llm); default all")
    ] = None,
) -> None:
    """Delete cache entries; each is recomputed when next needed."""
    from surgeon.core.cache import clear, human

    gone = clear(kinds)
    out.print(f"deleted {len(gone)} file(s), {human(sum(e.size for e in gone))}")


@cache_app.command("evict")
def cache_evict(
    max_size: Annotated[str, typer.Option(help="keep at most this much, e.g. 5GB, 500MB, 2GiB")],
) -> None:
    """Delete least recently used entries until the cache fits in --max-size."""
    from surgeon.core.cache import entries, evict, human, parse_size

    gone = evict(parse_size(max_size))
    left = sum(e.size for e in entries())
    out.print(f"deleted {len(gone)} file(s), {human(sum(e.size for e in gone))}; {human(left)} left")


@app.command()
def models(as_json: JsonOpt = False) -> None:
    """List the open_clip architectures surgeon can load (weights come from local files or the hub cache)."""
    import open_clip

    from surgeon.model.load import TOY_MODEL_DIR, supported_architectures

    names = supported_architectures()
    if as_json:
        from surgeon.core.clioutput import emit_json

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
            from surgeon.core.extras import missing_extra

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
