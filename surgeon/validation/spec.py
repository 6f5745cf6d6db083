"""The validation data a job measures on, declared as options (surgeon.core.options)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from surgeon.core import limits
from surgeon.core.errors import InvalidInput
from surgeon.core.fallback import TOY
from surgeon.core.options import BIAS_PROTOCOL, SKEW_K, check_bounds, choice, option

if TYPE_CHECKING:
    from surgeon.validation.validate import ValidationSuite

DESIRED = (None, "uniform", "set")


@dataclass(frozen=True)
class ValidationSpec:
    """The validation suite: files when given, else the toy world's (for the toy model only)."""

    data: Path | None = option(
        help="validation set: ImageFolder, CSV (path,label) or 'toy' (the default for the toy model only)"
    )
    classnames: Path | None = option(help="class names file, one per line (folder order)")
    templates: Path | None = option(
        help="prompt templates file (one per line, with {}), or a named set: cifar10, cifar100, pets (the paper's "
        "18), food101 (1), country211 (5), imagenet1k, imagenet-a, imagenet-r (80), neutral (the CCS paper's 4). "
        "Default: the data set's own when its name is one of these, else neutral"
    )
    bias_data: Path | None = option(
        help="bias set: CSV (path,group[,...]), or toy:counterfactuals (the toy's, ranked within shapes)"
    )
    queries: Path | None = option(help="neutral queries file for --bias-data, one per line")
    skew_k: int = SKEW_K.field()
    desired: str | None = option(help="desired group distribution: uniform or set (default: the protocol's)")
    bias_protocol: str = BIAS_PROTOCOL.field()
    bias_split_by: str | None = option(
        help="debias: bias-manifest column (e.g. identity) kept on one side of the search/held-out split"
    )
    bias_attribute: str | None = option(  # surgeon.validation.validate.BiasColumns
        help="bias-manifest header column holding the group (e.g. race, gender; default: 2nd)"
    )
    bias_within: str | None = option(
        help="bias-manifest column (e.g. occupation) whose value names the query that ranks each image: each "
        "query ranks only its own images, as the paper ranks SocialCounterfactuals (--queries: optional, a subset)"
    )
    bias_groups: str | None = option(
        help="fold the group labels by name: fairface-race6 (the paper's 6 FairFace races)"
    )
    language: str = option("en", help="language of the class names and templates (clip_benchmark files)")
    retrieval_data: Path | None = option(  # image <-> text or text -> video (surgeon.results.retrieval)
        help="retrieval set: CSV (path,caption; one row per caption) of images (image<->text recall@k) or of "
        "videos (text->video, the first caption per video), or clip_benchmark's retrieval webdataset folder"
    )
    frames: int = option(
        limits.DEFAULT_VIDEO_FRAMES,
        bound=(1, limits.MAX_FRAMES_PER_VIDEO),
        unit="frames",
        named="frames (per video)",
        help="frames per video of a video retrieval set (the paper: 12; DiDeMo 32)",
    )

    def check(self) -> None:
        from surgeon.results.bias import bias_protocol

        check_bounds(self)
        limits.texts(
            bias_split_by=self.bias_split_by,
            bias_attribute=self.bias_attribute,
            bias_within=self.bias_within,
            language=self.language,
        )
        if self.bias_groups is not None:
            from surgeon.results.bias import GROUP_FOLDINGS

            choice("bias group folding", self.bias_groups, tuple(GROUP_FOLDINGS))
        if self.bias_data is None and any((self.bias_attribute, self.bias_within, self.bias_groups)):
            raise InvalidInput("--bias-attribute, --bias-within and --bias-groups read a --bias-data manifest")
        choice("desired distribution", self.desired, DESIRED)
        bias_protocol(self.bias_protocol, self.desired)  # an unknown protocol, or a desired it fixes otherwise
        if self.is_toy and any((self.classnames, self.templates, self.queries)):
            raise InvalidInput("classnames, templates and queries need data or bias_data")

    @property
    def is_toy(self) -> bool:
        return self.data is None and self.bias_data is None and self.retrieval_data is None

    def require_bias(self, what: str) -> None:
        """Refuse, before any model loads, a use that measures bias on a suite that has no bias set (the toy
        suite has its probe; files need --bias-data) or accuracy on one without a classification set."""
        toy = self.is_toy or str(self.data) == TOY
        if self.bias_data is None and not toy:
            raise InvalidInput(
                f"{what} needs a bias set to measure bias on",
                hint="pass --bias-data CSV (path,group per image) --queries FILE (one neutral query per line); "
                "gRPC: validation.bias_data and validation.queries",
                field="bias_data",
            )
        if self.data is None and self.bias_data is not None:
            raise InvalidInput(
                f"{what} measures accuracy too: it needs a classification set (--data) besides the bias set",
                hint="pass --data FOLDER|CSV (ImageFolder or path,label); gRPC: validation.data",
                field="data",
            )

    def build(self, model: str | None) -> ValidationSuite:
        from surgeon.validation.validate import BiasColumns, build_suite

        return build_suite(
            self.data,
            self.classnames,
            self.templates,
            self.bias_data,
            self.queries,
            self.skew_k,
            self.desired,
            self.bias_protocol,
            self.bias_split_by,
            model=model,
            retrieval=self.retrieval_data,
            frames=self.frames,
            bias_columns=BiasColumns(self.bias_attribute, self.bias_within, self.bias_groups),
        )
