"""Which pip extra brings a missing module, so a verb run on the plain (serving-only) install fails with one
line that says what to install instead of an ImportError traceback."""

from __future__ import annotations

from surgeon.core.errors import PreconditionFailed

#: top-level module -> the extra of pyproject.toml that installs it
SURGERY_MODULES = ("torch", "torchvision", "open_clip", "safetensors", "matplotlib", "onnx", "onnxscript")
EXTRA_OF = {
    **dict.fromkeys(SURGERY_MODULES, "surgery"),
    **dict.fromkeys(("grpc", "grpc_health", "grpc_reflection", "google"), "serve"),
    "mlserver": "oip",
}


def missing_extra(error: ImportError, verb: str | None = None) -> PreconditionFailed | None:
    """The error to show for an ImportError of a module an extra provides (None for any other import)."""
    top = (error.name or "").split(".")[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return None
    what = f"surgeon {verb}" if verb else "this command"
    return PreconditionFailed(
        f"{what} needs the {extra} extra ({top} is not installed)", hint=f"pip install 'surgeon[{extra}]'"
    )
