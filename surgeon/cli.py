"""The `surgeon` command line: a thin shell over the library functions (the gRPC service calls the same)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from surgeon.errors import SurgeonError

app = typer.Typer(help="Rank, prune, validate and export CLIP attention heads.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
toy_app = typer.Typer(help="The embedded toy world and its bundled CLIP.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")
out = Console()
err = Console(stderr=True)

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="open_clip name, local-dir:PATH, or omit for the toy")]
PretrainedOpt = Annotated[str | None, typer.Option(help="pretrained tag (from the local hub cache) or checkpoint file")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda when present)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
ImagesOpt = Annotated[str | None, typer.Option(help="'toy' (default) or a folder of images")]


@app.command()
def rank(
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    images: ImagesOpt = None,
    n_images: Annotated[int | None, typer.Option(help="use at most this many images (toy default: 2000)")] = None,
    texts: Annotated[str | None, typer.Option(help="'toy', 'general' or a file, one description per line")] = None,
    taxonomy: Annotated[str | None, typer.Option(help="concept taxonomy JSON for the lexicon judge")] = None,
    judge: Annotated[str, typer.Option(help="lexicon, embedding or llm")] = "lexicon",
    layers: Annotated[str | None, typer.Option(help="e.g. 8-11, 3,5, last4 (default) or all")] = None,
    m: Annotated[int, typer.Option("--m", help="texts per head")] = 5,
    span_rank: Annotated[int, typer.Option("--rank", help="TextSpan projection rank")] = 80,
    batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 64,
    llm_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint for --judge llm")] = None,
    llm_model: Annotated[list[str] | None, typer.Option(help="judge model(s); several = majority vote")] = None,
    llm_key_env: Annotated[str, typer.Option(help="environment variable holding the API key")] = "OPENAI_API_KEY",
    out_dir: Annotated[Path | None, typer.Option("--out", help="output folder (default: a new one in exports/)")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
    no_cache: Annotated[bool, typer.Option(help="recompute statistics even when cached")] = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Rank the vision heads by Concept Consistency Score; writes ranking.json/.csv and ccs_heatmap.png."""
    from surgeon.images import resolve_images
    from surgeon.load import load_model
    from surgeon.paths import new_run_dir
    from surgeon.pools import load_pool
    from surgeon.rank import rank_heads

    loaded = load_model(model, pretrained, device)
    pool = load_pool(texts, loaded.is_toy, taxonomy)
    image_set = resolve_images(images, n_images)
    llm = {"llm_url": llm_url, "llm_models": tuple(llm_model or ()), "llm_key_env": llm_key_env}
    ranking = rank_heads(loaded, image_set, pool, judge=judge, layers=layers, m=m, rank=span_rank,
                         batch_size=batch_size, quiet=quiet, use_cache=not no_cache,
                         llm_options=llm if judge == "llm" else None)
    if image_set.skipped:
        err.print(f"[yellow]warning:[/] skipped {len(image_set.skipped)} unreadable image(s), e.g. {image_set.skipped[0]}")
    target = ranking.write(out_dir or new_run_dir("rank"), force=force)
    print_ranking(ranking)
    dist = ", ".join(f"CCS@{k}={v:.0%}" for k, v in ranking.ccs_distribution().items())
    out.print(f"{len(ranking.heads)} heads ranked ({'cached' if ranking.cached_stats else 'fresh'} statistics over "
              f"{ranking.images['count']} images); {dist}")
    out.print(f"wrote {target}/ranking.json, ranking.csv, ccs_heatmap.png")


def print_ranking(ranking, limit: int | None = None) -> None:
    table = Table(title=f"CCS ranking — {ranking.model['name']}", show_lines=False)
    for column in ("head", "label", "CCS", "texts (TextSpan order)"):
        table.add_column(column, overflow="fold")
    for h in ranking.sorted_heads()[:limit]:
        marks = " | ".join(("" if ok else "✗ ") + text for text, ok in zip(h.texts, h.verdicts, strict=True))
        table.add_row(h.name, h.label, str(h.ccs), marks)
    out.print(table)


@app.command()
def models() -> None:
    """List the open_clip architectures surgeon can load (weights come from local files or the hub cache)."""
    import open_clip

    from surgeon.load import TOY_MODEL_DIR

    out.print(f"toy (bundled: {TOY_MODEL_DIR})")
    for name in open_clip.list_models():
        out.print(name)


def main() -> None:
    """Entry point: every SurgeonError becomes one readable line and its exit code."""
    warnings.filterwarnings("ignore", message=".*QuickGELU.*")
    try:
        app()
    except SurgeonError as error:
        err.print(f"[bold red]error:[/] {error}", highlight=False)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted: nothing was written")
        sys.exit(130)


if __name__ == "__main__":
    main()
