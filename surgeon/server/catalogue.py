"""What a client may choose: ListModels (the toy, open_clip folders under the models root, open_clip
architectures) and ListPolicies (policies, surgery modes, towers, judges, export formats)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from surgeon.api import EXPORT_FORMATS
from surgeon.model.hooks import TOWERS
from surgeon.model.load import (
    CHECKPOINT_SUFFIXES,
    TOY_MODEL_DIR,
    TOY_MODEL_NAME,
    cached_pretrained_tags,
    supported_architectures,
)
from surgeon.model.surgery import SURGERIES
from surgeon.ranking.judges.base import JUDGES
from surgeon.selection.policies import POLICIES
from surgeon.server.paths import Root, inside
from surgeon.server.specs import REMOTE_JUDGES
from surgeon.v1 import surgeon_pb2 as pb

CACHE_CHECK_S = 60.0  # how old ListModels' view of the local weights cache may be


class ModelCatalogue:
    """The models a request may name; the open_clip list is rebuilt at most once a minute, so weights copied
    into the hub cache show up without a restart."""

    def __init__(self, models: Root, local_depth: int = 3):
        self.models, self.local_depth = models, local_depth
        self._architectures: list[pb.ModelInfo] | None = None
        self._listed_at = 0.0

    def all(self) -> list[pb.ModelInfo]:
        toy = pb.ModelInfo(
            name=TOY_MODEL_NAME,
            kind=pb.ModelInfo.KIND_TOY,
            available=(TOY_MODEL_DIR / "open_clip_config.json").is_file(),
            description="the bundled toy CLIP (the default)",
        )
        return [toy, *self.local_dirs(), *self.architectures()]

    def local_dirs(self) -> list[pb.ModelInfo]:
        root = self.models.path
        if root is None:
            return []
        found = []
        for dirpath, dirnames, filenames in os.walk(root):  # symlinked folders are not followed
            rel = Path(dirpath).relative_to(root)
            dirnames.sort()
            if len(rel.parts) >= self.local_depth:
                dirnames[:] = []
            if "open_clip_config.json" not in filenames or not rel.parts:
                continue
            if not inside(os.path.realpath(os.path.join(dirpath, "open_clip_config.json")), root):
                continue
            found.append(
                pb.ModelInfo(
                    name=f"local-dir:{rel.as_posix()}",
                    kind=pb.ModelInfo.KIND_LOCAL_DIR,
                    available=any(Path(f).suffix in CHECKPOINT_SUFFIXES for f in filenames),
                    description="open_clip folder under the models root",
                )
            )
        return found

    def architectures(self) -> list[pb.ModelInfo]:
        if self._architectures is None or time.monotonic() - self._listed_at > CACHE_CHECK_S:
            import open_clip

            entries = []
            for name in supported_architectures():
                cached = cached_pretrained_tags(name)
                entries.append(
                    pb.ModelInfo(
                        name=name,
                        kind=pb.ModelInfo.KIND_ARCHITECTURE,
                        available=bool(cached),
                        pretrained_tags=open_clip.list_pretrained_tags_by_model(name),
                        cached_pretrained_tags=cached,
                        description="open_clip architecture (weights from the local hub cache or the models root)",
                    )
                )
            self._architectures, self._listed_at = entries, time.monotonic()
        return self._architectures


def policy_choices() -> pb.ListPoliciesResponse:
    """Each policy with the first line of its docstring and the PruneRequest fields it reads, and the other
    choices of a PruneRequest."""
    policies = []
    for name in POLICIES.names():
        policy = POLICIES.get(name)
        policies.append(pb.PolicyInfo(name=name, description=policy.description, options=list(policy.options)))
    return pb.ListPoliciesResponse(
        policies=policies,
        modes=SURGERIES.names(),
        towers=list(TOWERS),
        judges=[j for j in JUDGES.names() if j in REMOTE_JUDGES],
        export_formats=list(EXPORT_FORMATS),
    )
