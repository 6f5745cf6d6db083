"""One exception family, so the CLI and the gRPC service can map every failure to a readable message
and the right exit code or status without guessing."""

from __future__ import annotations

import re


class SurgeonError(Exception):
    """Base class: `str(err)` is the one line shown to the user; `hint` says what to do about it."""

    exit_code = 1
    grpc_code = "INTERNAL"

    def __init__(self, message: str, hint: str | None = None, field: str | None = None):
        super().__init__(message)
        self.hint = hint
        self.field = field  # the request field to blame, when one is (gRPC BadRequest details)

    @property
    def reason(self) -> str:
        """UPPER_SNAKE_CASE of the class name (InvalidInput -> INVALID_INPUT): google.rpc.ErrorInfo's reason."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).upper()

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base


class InvalidInput(SurgeonError):
    """The request itself is wrong: a bad option value, a malformed spec, an empty file."""

    exit_code = 2
    grpc_code = "INVALID_ARGUMENT"


class NotFound(SurgeonError):
    """A model, file, run or operation that does not exist (or is not available offline)."""

    exit_code = 3
    grpc_code = "NOT_FOUND"


class CorruptInput(SurgeonError):
    """A file exists but cannot be trusted or parsed: truncated checkpoint, pickle with code, bad image."""

    exit_code = 4
    grpc_code = "INVALID_ARGUMENT"


class PreconditionFailed(SurgeonError):
    """The state is wrong for the request: a ranking for another model, an existing output folder."""

    exit_code = 5
    grpc_code = "FAILED_PRECONDITION"


class PermissionDenied(SurgeonError):
    """A path outside the allowed root, or a folder that cannot be written."""

    exit_code = 6
    grpc_code = "PERMISSION_DENIED"


class ExportFailed(SurgeonError):
    """An exported artifact did not match the PyTorch model within tolerance; nothing was written."""

    exit_code = 7
    grpc_code = "ABORTED"


class StorageError(SurgeonError):
    """Writing failed (disk full, I/O error); whatever was being written has been removed."""

    exit_code = 8
    grpc_code = "RESOURCE_EXHAUSTED"


class PartialResult(SurgeonError):
    """Some parts could not be computed (a study's cells); the rest were, and the output says which and why."""

    exit_code = 9
    grpc_code = "ABORTED"


class GateFailed(SurgeonError):
    """A validation gate (max accuracy drop, max skew...) was not met."""

    exit_code = 10
    grpc_code = "FAILED_PRECONDITION"
