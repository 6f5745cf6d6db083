"""`surgeon infer`: classify images with an ONNX export through onnxruntime, never importing torch.

onnxruntime is imported when the command runs, not when this module is imported, so registering the
command in the main CLI costs nothing and works where the onnx extra is not installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from surgeon.errors import InvalidInput, NotFound, PreconditionFailed

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given; folders expand to the image files inside them (recursively, sorted)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise InvalidInput(f"folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found += inside
        elif path.exists():
            found.append(path)
        else:
            raise NotFound(f"image not found: {path}")
    if not found:
        raise InvalidInput("no images given")
    return found


def infer(
    export_dir: Annotated[Path, typer.Argument(help="an ONNX export: the run's export folder or its onnx/ folder")],
    images: Annotated[list[Path], typer.Argument(help="image files or folders of images")],
    labels: Annotated[
        Path | None,
        typer.Option(help="class names, one per line (zero-shot via text.onnx); default: the export's classifier.onnx"),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="classes shown per image")] = 5,
    batch_size: Annotated[int, typer.Option(help="images per onnxruntime run")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Top classes per image from an ONNX export, with onnxruntime only (CUDA when available, else CPU)."""
    try:
        from surgeon.runtime.session import ExportedModel, read_labels
    except ImportError as err:
        raise PreconditionFailed(
            f"surgeon infer needs onnxruntime, ftfy and regex ({err})",
            hint="pip install 'surgeon[onnx]' (CPU) or 'surgeon[gpu]' (CUDA: onnxruntime-gpu); never both",
        ) from None
    if top_k < 1:
        raise InvalidInput(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise InvalidInput(f"--batch-size must be at least 1, got {batch_size}")
    label_list = read_labels(labels) if labels is not None else None
    files = collect_images(list(images))
    model = ExportedModel(export_dir)
    predictions = model.classify(files, label_list, top_k=top_k, batch_size=batch_size)
    source = "labels" if label_list is not None else "classifier.onnx"
    if as_json:
        payload = {
            "export": str(model.dir),
            "classes_from": source,
            "providers": model.active_providers,
            "predictions": [p.to_dict() for p in predictions],
        }
        typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    table = Table(title=f"top {top_k} classes ({source}, {', '.join(model.active_providers)})")
    table.add_column("image", overflow="fold")
    table.add_column("#", justify="right")
    table.add_column("class")
    table.add_column("logit", justify="right")
    table.add_column("prob", justify="right")
    for index, prediction in enumerate(predictions):
        if index:
            table.add_section()
        for rank, top in enumerate(prediction.top, start=1):
            name = escape(prediction.image) if rank == 1 else ""
            table.add_row(name, str(rank), escape(top.label), f"{top.logit:.2f}", f"{top.probability:.3f}")
    Console(soft_wrap=False).print(table)
