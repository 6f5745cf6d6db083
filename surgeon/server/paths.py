"""Server-side path confinement: every path a request names must stay inside one of the server's roots.

A request path is relative to its root (an absolute one must lie inside it). `..` components, paths that
resolve outside the root and symlinks leading out of it (anywhere inside a folder the request names) are
refused with PermissionDenied, which the service answers as PERMISSION_DENIED."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from surgeon.core.errors import InvalidInput, NotFound, PermissionDenied


def inside(path: Path | str, root: Path) -> bool:
    path = Path(path)
    return path == root or root in path.parents


@dataclass(frozen=True)
class Root:
    name: str  # "models", "data" or "exports": the --NAME-root option
    path: Path | None  # resolved; None when the server was started without it

    @classmethod
    def create(cls, name: str, path: Path | str | None, make: bool = False) -> Root:
        if path is None:
            return cls(name, None)
        real = Path(os.path.realpath(Path(path).expanduser()))
        if make:
            try:
                real.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise PermissionDenied(f"cannot create the {name} root {path}: {err.strerror or err}") from None
        if not real.is_dir():
            raise NotFound(f"{name} root {path} is not a folder")
        if make and not os.access(real, os.W_OK | os.X_OK):
            raise PermissionDenied(f"the {name} root {path} is not writable")
        return cls(name, real)

    @property
    def folder(self) -> Path:
        """The root's path; PermissionDenied when the server was started without it."""
        if self.path is None:
            raise PermissionDenied(f"this server has no {self.name} root", hint=f"start it with --{self.name}-root DIR")
        return self.path

    def resolve(self, raw: str, what: str) -> Path:
        """The real path `raw` names inside this root (it need not exist)."""
        if self.path is None:
            raise PermissionDenied(
                f"{what} {raw!r}: this server has no {self.name} root", hint=f"start it with --{self.name}-root DIR"
            )
        if not raw or "\x00" in raw:
            raise InvalidInput(f"{what}: empty or invalid path {raw!r}")
        path = Path(raw)
        if ".." in path.parts:
            raise PermissionDenied(f"{what} {raw!r}: '..' is not allowed in paths")
        real = Path(os.path.realpath(path if path.is_absolute() else self.path / path))
        if not inside(real, self.path):
            how = "is outside" if path.is_absolute() else "leads outside"
            raise PermissionDenied(f"{what} {raw!r} {how} the {self.name} root")
        return real

    def check_inside(self, path: Path, what: str) -> None:
        """For paths read from files (manifest rows): wherever they point, the real path must be in the root."""
        if not inside(os.path.realpath(path), self.folder):
            raise PermissionDenied(f"{what} {self._shown(str(path))} is outside the {self.name} root")

    def relative(self, path: Path) -> str:
        """How results name a path inside this root."""
        return Path(os.path.realpath(path)).relative_to(self.folder).as_posix()

    def check_tree(self, folder: Path, what: str) -> None:
        """Refuse a folder with an entry (at any depth) whose symlink leads outside this root."""
        seen: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            real_dir = os.path.realpath(dirpath)
            if not inside(real_dir, self.folder):
                raise PermissionDenied(f"{what}: {self._shown(dirpath)} leads outside the {self.name} root")
            if real_dir in seen:  # a symlink loop or a second way into the same folder
                dirnames[:] = []
                continue
            seen.add(real_dir)
            for name in filenames:
                entry = os.path.join(dirpath, name)
                if os.path.islink(entry) and not inside(os.path.realpath(entry), self.folder):
                    raise PermissionDenied(f"{what}: {self._shown(entry)} leads outside the {self.name} root")

    def _shown(self, path: str) -> str:
        try:
            return Path(path).relative_to(self.folder).as_posix()
        except ValueError:
            return Path(path).name


def resolve_in(roots: list[Root], raw: str, what: str, kind: str = "any") -> Path:
    """Resolve `raw` in the first root where it exists (`kind`: "file", "dir" or "any"); NotFound otherwise.
    Every candidate must be inside its root."""
    usable = [r for r in roots if r.path is not None]
    if not usable:
        return roots[0].resolve(raw, what)  # raises: no such root
    path = Path(raw)
    if path.is_absolute() and ".." not in path.parts:
        real = Path(os.path.realpath(path))
        owner = next((r for r in usable if inside(real, r.folder)), None)
        if owner is None:
            names = " or ".join(f"the {r.name} root" for r in usable)
            raise PermissionDenied(f"{what} {raw!r} is outside {names}")
        candidates = [owner.resolve(raw, what)]
    else:
        candidates = [r.resolve(raw, what) for r in usable]
    check = {"file": Path.is_file, "dir": Path.is_dir, "any": Path.exists}[kind]
    for candidate in candidates:
        if check(candidate):
            return candidate
    raise NotFound(f"{what} not found: {raw}")
