"""Installed size of the serving install (`pip install surgeon`) vs the full one (`surgeon[surgery,serve]`).

    python benchmarks/bench_install_size.py [--cpu-torch-wheel torch-X+cpu-....whl]

Both sets are read from pyproject.toml and resolved to their dependency closure with importlib.metadata in
the running environment (which must hold the full install), so both sides use the same versions; sizes are
the files each distribution's RECORD lists, plus surgeon's own package. Goal (issue 15): serving <= 20%.
PyPI's x86_64 torch is the CUDA build (with nvidia-* and triton); the Docker CPU image installs torch's CPU
wheel instead: --cpu-torch-wheel estimates that full install from the wheel's unpacked size."""

from __future__ import annotations

import argparse
import re
import zipfile
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def closure(requirements: list[str]) -> set[str]:
    """Normalised names of the distributions these requirements install, recursively (markers evaluated)."""
    seen: set[str] = set()
    todo = [(Requirement(r), ()) for r in requirements]
    while todo:
        req, extras = todo.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (extras or ("",))):
            continue
        if name == "surgeon":  # a self-referencing extra (onnx -> surgeon[surgery])
            continue
        if name in seen:
            continue
        seen.add(name)
        dist = metadata.distribution(req.name)
        todo += [(Requirement(r), tuple(req.extras)) for r in dist.requires or ()]
    return seen


def installed_bytes(name: str) -> int:
    dist = metadata.distribution(name)
    return sum(f.size or 0 for f in dist.files or () if f.size)


def package_bytes() -> int:
    """surgeon's own files as the wheel installs them (the bundled toy model is most of it)."""
    roots = [REPO / "surgeon", REPO / "server"]
    return sum(p.stat().st_size for r in roots for p in r.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-torch-wheel", type=Path, help="a torch CPU wheel, to estimate the CPU full install")
    args = parser.parse_args()
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    serving = closure(project["dependencies"])
    full = closure(project["dependencies"] + extras["surgery"] + extras["serve"])
    own = package_bytes()
    sizes = {name: installed_bytes(name) for name in full}
    serving_mb = (own + sum(sizes[n] for n in serving)) / 1e6
    full_mb = (own + sum(sizes.values())) / 1e6
    print(f"serving install: {len(serving)} distributions + surgeon, {serving_mb:,.0f} MB")
    print(f"full install (surgery, serve): {len(full)} distributions + surgeon, {full_mb:,.0f} MB")
    print(f"serving / full: {serving_mb / full_mb:.3f} (goal <= 0.20)")
    print(
        "largest in the full install:",
        ", ".join(f"{n} {sizes[n] / 1e6:,.0f} MB" for n in sorted(sizes, key=sizes.get)[-6:]),
    )

    if args.cpu_torch_wheel:
        cuda = [n for n in full if n.startswith(("nvidia-", "cuda-")) or n in ("triton", "torch")]
        cpu_torch = sum(i.file_size for i in zipfile.ZipFile(args.cpu_torch_wheel).infolist()) / 1e6
        cpu_mb = full_mb - sum(sizes[n] for n in cuda) / 1e6 + cpu_torch
        print(f"full install with {args.cpu_torch_wheel.name} instead of CUDA torch: {cpu_mb:,.0f} MB (estimate)")
        print(f"serving / full (CPU torch): {serving_mb / cpu_mb:.3f} (goal <= 0.20)")


if __name__ == "__main__":
    main()
