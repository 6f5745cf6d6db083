"""Job results -> surgeon.v1 result messages; every path in them is relative to the exports root."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import json_format, struct_pb2

from surgeon.api import PruneSpec
from surgeon.ranking.rank import Ranking
from surgeon.server.paths import Root
from surgeon.v1 import surgeon_pb2 as pb

if TYPE_CHECKING:
    from surgeon.pruning.prune import PruneResult


def json_struct(data: dict) -> struct_pb2.Struct:
    """A JSON-like dict as a Struct; NaN and infinities (which JSON lacks) become null."""
    clean = json.loads(json.dumps(data, default=str), parse_constant=lambda _c: None)
    return json_format.ParseDict(clean, struct_pb2.Struct())


def finite_numbers(summary: dict) -> dict[str, float]:
    """The finite numbers of a summary: a proto map<string, double> has no room for the rest."""
    return {
        k: float(v)
        for k, v in summary.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def rank_result(ranking: Ranking, out: Path, exports: Root) -> pb.RankHeadsResult:
    return pb.RankHeadsResult(
        run_dir=exports.relative(out),
        files=[exports.relative(out / f) for f in ("ranking.json", "ranking.csv", "ccs_heatmap.png")],
        model=ranking.model["name"],
        weights_sha256=ranking.model["weights_sha256"],
        layers=ranking.layers,
        m=ranking.m,
        heads=[
            pb.HeadScore(
                name=h.name,
                layer=h.layer,
                head=h.head,
                label=h.label,
                ccs=h.ccs,
                texts=h.texts,
                verdicts=h.verdicts,
                variance=h.variance,
            )
            for h in ranking.sorted_heads()
        ],
        ccs_distribution=ranking.ccs_distribution(),
        cached_stats=ranking.cached_stats,
        image_count=ranking.images["count"],
        skipped_images=ranking.images["skipped"],
        ranking_sha256=ranking.digest(),
    )


def prune_result(result: PruneResult, spec: PruneSpec, out: Path, exports: Root) -> pb.PruneResult:
    return pb.PruneResult(
        run_dir=exports.relative(out),
        files=sorted(exports.relative(p) for p in out.rglob("*") if p.is_file()),
        policy=spec.policy,
        mode=spec.mode,
        tower=spec.tower,
        heads=[
            pb.PrunedHead(name=h.head, layer=h.layer, head=h.index, reason=h.reason, label=h.label or "", ccs=h.ccs)
            for h in result.plan.heads
        ],
        before=finite_numbers(result.before["summary"]),
        after=finite_numbers(result.after["summary"]),
        gate_failures=result.gate_failures,
        exported=result.exported,
        plan=json_struct(result.plan.to_dict()),
    )


def validate_result(report: dict, files: list[Path], out: Path | None, exports: Root) -> pb.ValidateResult:
    message = pb.ValidateResult(
        model=report["model"], summary=finite_numbers(report["summary"]), report=json_struct(report)
    )
    if out is not None:
        message.out = exports.relative(out)
        message.files.extend(exports.relative(f) for f in files)
    return message


def export_result(files: list[Path], out: Path, exports: Root) -> pb.ExportResult:
    return pb.ExportResult(out_dir=exports.relative(out), files=[exports.relative(p) for p in files])
