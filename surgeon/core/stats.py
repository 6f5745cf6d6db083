"""Stage 2b: per-head sufficient statistics (count, sum, sum of outer products; float64).

TextSpan needs nothing else (docs/METHOD.md §1.2), so memory is independent of the number of images,
statistics of shards add up exactly, and they can be cached on disk and shared."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from surgeon.core.errors import CorruptInput, InvalidInput
from surgeon.core.paths import atomic_file

STATS_FORMAT = "surgeon.head-stats/1"


@dataclass
class HeadStats:
    layers: tuple[int, ...]
    count: int
    total: torch.Tensor  # (len(layers), H, D) float64
    outer: torch.Tensor  # (len(layers), H, D, D) float64
    meta: dict = field(default_factory=dict, compare=False)  # what the file said about itself (e.g. resume point)

    @classmethod
    def empty(cls, layers: tuple[int, ...], n_heads: int, dim: int, device: torch.device | str = "cpu") -> HeadStats:
        shape = (len(layers), n_heads, dim)
        return cls(
            layers=tuple(layers),
            count=0,
            total=torch.zeros(shape, dtype=torch.float64, device=device),
            outer=torch.zeros((*shape, dim), dtype=torch.float64, device=device),
        )

    @property
    def n_heads(self) -> int:
        return self.total.shape[1]

    @property
    def dim(self) -> int:
        return self.total.shape[2]

    def update(self, heads: torch.Tensor) -> None:
        """Add a batch of contributions shaped (B, len(layers), H, D)."""
        batch = heads.shape[0]
        flat = heads.to(self.total.device, torch.float64).reshape(batch, -1, self.dim).transpose(0, 1)
        self.count += batch
        self.total += flat.sum(1).view_as(self.total)
        self.outer += torch.bmm(flat.transpose(1, 2), flat).view_as(self.outer)

    def merge(self, other: HeadStats) -> HeadStats:
        if other.layers != self.layers or other.total.shape != self.total.shape:
            raise InvalidInput("cannot merge statistics of different layers or shapes")
        return HeadStats(
            self.layers,
            self.count + other.count,
            self.total + other.total.to(self.total.device),
            self.outer + other.outer.to(self.outer.device),
        )

    def to(self, device: torch.device | str) -> HeadStats:
        return HeadStats(self.layers, self.count, self.total.to(device), self.outer.to(device), self.meta)

    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """Scatter matrix of the centred contributions, (len(layers), H, D, D)."""
        mean = self.mean()
        return self.outer - self.count * mean.unsqueeze(-1) * mean.unsqueeze(-2)

    def save(self, path: Path, meta: dict | None = None) -> None:
        """Atomic write: a crash never leaves a truncated cache entry behind."""
        header = {
            "format": STATS_FORMAT,
            "layers": json.dumps(list(self.layers)),
            "count": str(self.count),
            "meta": json.dumps(meta or {}),
        }
        tensors = {"total": self.total.cpu().contiguous(), "outer": self.outer.cpu().contiguous()}
        try:
            with atomic_file(path, suffix=".safetensors") as tmp:
                save_file(tensors, str(tmp), metadata=header)
        except SafetensorError as err:  # a full disk: an OSError, as callers expect
            raise OSError(str(err)) from None

    @classmethod
    def load(cls, path: Path) -> HeadStats:
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
            tensors = load_file(str(path))
            if header.get("format") != STATS_FORMAT:
                raise CorruptInput(f"{path} is not a surgeon statistics file")
            return cls(
                tuple(json.loads(header["layers"])),
                int(header["count"]),
                tensors["total"],
                tensors["outer"],
                json.loads(header.get("meta", "{}")),
            )
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            raise CorruptInput(f"corrupt statistics file {path}: {err}") from None
