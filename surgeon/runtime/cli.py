"""`surgeon infer`: classify images with an ONNX export through onnxruntime, never importing torch.

onnxruntime is imported when the command runs, not when this module is imported, so registering the
command in the main CLI costs nothing and works where the onnx extra is not installed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from surgeon.core import limits
from surgeon.core.errors import CorruptInput, InvalidInput, NotFound, PreconditionFailed

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


#: held-out toy images classified when `surgeon infer` gets no images
TOY_DEMO_IMAGES = 8


def toy_demo_images(n: int = TOY_DEMO_IMAGES) -> tuple[list[Image.Image], list[str], list[str]]:
    """(images, names showing each one's true shape, the toy shapes as class names): the embedded default's
    held-out split, in memory, for `surgeon infer` with no images."""
    from surgeon.inputs.defaults import toy_shapes_sample

    images, labels, shapes = toy_shapes_sample(n)
    names = [f"toy test #{i} (a {shapes[s]})" for i, s in enumerate(labels)]
    return [Image.fromarray(a) for a in images], names, shapes


def _readable(paths: list[Path]) -> tuple[list[Path], list[str], list[str]]:
    """(the image files that open, their names, why the others were skipped); none readable is an error.
    Each file is decoded here to check it and again batch by batch when classified: memory stays bounded."""
    from surgeon.inputs.preprocess import load_image

    kept, skipped = [], []
    for path in paths:
        try:
            load_image(path)
            kept.append(path)
        except CorruptInput as err:
            skipped.append(str(err))
    if not kept:
        raise CorruptInput(f"none of the {len(paths)} image(s) is readable; e.g. {skipped[0]}")
    return kept, [str(p) for p in kept], skipped


def infer(
    export_dir: Annotated[
        Path | None,
        typer.Argument(help="an ONNX export: a run folder, its export folder or onnx/ (default: the newest run's)"),
    ] = None,
    images: Annotated[
        list[Path] | None,
        typer.Argument(help="image files or folders of images (default: 8 held-out toy images, classified by shape)"),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="class names, one per line (zero-shot via text.onnx); default: the export's classifier.onnx"),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="classes shown per image")] = 5,
    batch_size: Annotated[int, typer.Option(help="images per onnxruntime run")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="serve files without recorded hashes (onnx/manifest.json or surgery.json), or that fail them",
        ),
    ] = False,
) -> None:
    """Top classes per image from an ONNX export, with onnxruntime only (CUDA when available, else CPU)."""
    try:
        from surgeon.inputs.templates import read_labels
        from surgeon.runtime.session import ExportedModel
    except ImportError as err:
        raise PreconditionFailed(
            f"surgeon infer needs onnxruntime, ftfy and regex ({err})",
            hint="pip install surgeon (the plain install has them); on CUDA swap onnxruntime for onnxruntime-gpu",
        ) from None
    limits.count("--top-k", top_k, 1, limits.MAX_TOP_K)
    limits.count("--batch-size", batch_size, 1, limits.MAX_BATCH_SIZE)
    if export_dir is None:
        from surgeon.core.paths import newest_output

        patterns = ("*/onnx/visual.onnx", "*/export-onnx/onnx/visual.onnx")
        export_dir = newest_output(*patterns, hint="run `surgeon prune --export onnx` first, or pass EXPORT_DIR").parent
        Console(stderr=True).print(f"using the newest ONNX export: {export_dir}")
    model = ExportedModel(export_dir, verify=not no_verify)
    if labels is not None and not labels.is_absolute() and not labels.exists() and (model.dir / labels).is_file():
        labels = model.dir / labels  # `surgeon infer . IMG --labels labels.txt` in a run folder: the export's own
    label_list = read_labels(labels) if labels is not None else None
    inputs: list[Path] | list[Image.Image]
    if images:  # files: unreadable ones are skipped with a count, as `surgeon rank` does
        inputs, names, skipped = _readable(collect_images(list(images)))
        if skipped:
            Console(stderr=True).print(
                f"[yellow]warning:[/] skipped {len(skipped)} unreadable image(s), e.g. {escape(skipped[0])}",
                soft_wrap=True,
            )
    else:
        inputs, names, shapes = toy_demo_images()
        if label_list is None and not model.has_classifier:
            label_list = shapes
    predictions = model.classify(inputs, label_list, top_k=top_k, batch_size=batch_size, image_names=names)
    source = "labels" if label_list is not None else "classifier.onnx"
    if as_json:
        from surgeon.core.clioutput import emit_json

        emit_json(
            "infer",
            None,
            [],
            {"images": len(predictions), "classes_from": source},
            export=str(model.dir),
            classes_from=source,
            providers=model.active_providers,
            predictions=[p.to_dict() for p in predictions],
        )
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


def triton_repo(
    export_dir: Annotated[Path, typer.Argument(help="an ONNX export: a run folder, its export folder or onnx/")],
    out_dir: Annotated[Path, typer.Option("--out", help="the model repository folder to write")],
    name: Annotated[str | None, typer.Option(help="model name prefix (default: the run folder's name)")] = None,
    max_batch_size: Annotated[int, typer.Option(help="largest batch Triton forms (0: no batching)")] = 32,
    queue_delay_us: Annotated[int, typer.Option(help="how long dynamic batching waits to fill a batch (µs)")] = 1000,
    force: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
) -> None:
    """Write a Triton Inference Server model repository (onnxruntime backend, dynamic batching) for an export."""
    from surgeon.runtime.triton import write_triton_repository

    configs = write_triton_repository(export_dir, out_dir, name, max_batch_size, queue_delay_us, force)
    for path in configs:
        typer.echo(str(path))
    typer.echo(f"wrote {len(configs)} model(s) into {out_dir}: tritonserver --model-repository {out_dir}")


def _check_port_free(host: str, port: int) -> None:
    """A port already bound fails here with one line, not in the middle of MLServer's start-up."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise PreconditionFailed(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def serve_model(
    export_dir: Annotated[Path, typer.Argument(help="an ONNX export: a run folder, its export folder or onnx/")],
    name: Annotated[str | None, typer.Option(help="model name prefix (default: the run folder's name)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="REST port (/v2/...)")] = 8080,
    grpc_port: Annotated[int, typer.Option(help="gRPC port (inference.GRPCInferenceService)")] = 8081,
    metrics_port: Annotated[int, typer.Option(help="Prometheus port (/metrics)")] = 8082,
    max_batch_size: Annotated[int, typer.Option(help="requests adaptive batching merges (1: no batching)")] = 16,
    max_batch_time_ms: Annotated[float, typer.Option(help="how long a request may wait for others (ms)")] = 2.0,
    threads: Annotated[int | None, typer.Option(help="onnxruntime intra-op threads (default: all cores)")] = None,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="serve files without recorded hashes (onnx/manifest.json or surgery.json), or that fail them",
        ),
    ] = False,
    token_env: Annotated[
        str | None,
        typer.Option(help="environment variable holding the bearer token clients must send (REST and gRPC)"),
    ] = None,
    repository_api: Annotated[
        bool, typer.Option("--repository-api", help="open the model repository API (index, load, unload)")
    ] = False,
) -> None:
    """Serve an ONNX export over the Open Inference Protocol (KServe v2 REST + gRPC) with MLServer: adaptive
    batching, /v2/health/live and /v2/health/ready, Prometheus metrics. Torch-free; needs the oip extra."""
    limits.text("--name", name)
    limits.text("--host", host)
    for option, port in (("--http-port", http_port), ("--grpc-port", grpc_port), ("--metrics-port", metrics_port)):
        limits.count(option, port, 1, 65535)
    if len({http_port, grpc_port, metrics_port}) != 3:
        ports = f"{http_port}, {grpc_port}, {metrics_port}"
        raise InvalidInput(f"--http-port, --grpc-port and --metrics-port must differ, got {ports}")
    limits.count("--max-batch-size", max_batch_size, 1, limits.MAX_BATCH_SIZE)
    limits.number("--max-batch-time-ms", max_batch_time_ms, 0.0, limits.MAX_OIP_BATCH_TIME_MS)
    limits.count("--threads", threads, 1, limits.MAX_THREADS)
    token = limits.token_from_env(token_env)
    from surgeon.runtime.triton import model_prefix

    prefix = model_prefix(export_dir, name)  # a missing export fails before MLServer is imported
    # ImportError (no mlserver): main() names the oip extra. MLServer registers the inference.* protobuf
    # messages that tritonclient.grpc registers too: one process cannot import both.
    from surgeon.runtime.oip import open_export
    from surgeon.runtime.oipserver import serve

    open_export(str(export_dir), not no_verify, threads)  # verified and opened before any port is bound
    for port in (http_port, grpc_port, metrics_port):
        _check_port_free(host, port)
    Console(stderr=True).print(
        f"serving {prefix}_* from {export_dir} on http://{host}:{http_port}/v2, grpc {host}:{grpc_port}, "
        f"metrics http://{host}:{metrics_port}/metrics{' (bearer token required)' if token else ''}",
        soft_wrap=True,
    )
    serve(
        export_dir,
        prefix,
        host,
        (http_port, grpc_port, metrics_port),
        max_batch_size,
        max_batch_time_ms,
        threads,
        verify=not no_verify,
        token=token,
        repository_api=repository_api,
    )
