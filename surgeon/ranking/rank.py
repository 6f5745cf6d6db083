"""Stage 4: rank heads by Concept Consistency Score — statistics -> TextSpan -> judge -> CCS, and the
ranking files (`ranking.json`, `ranking.csv`, `ccs_heatmap.png`)."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from surgeon import __version__
from surgeon.core.distributed import world
from surgeon.core.errors import CorruptInput, InvalidInput, PreconditionFailed
from surgeon.core.options import LlmJudge, RankMethod
from surgeon.core.paths import atomic_dir, cache_dir, read_json, refuse_temporary
from surgeon.core.progress import say
from surgeon.inputs.images import ImageSet
from surgeon.inputs.pools import TextPool
from surgeon.inputs.textcache import pool_embeddings
from surgeon.model.decompose import parse_layers, vision_layout
from surgeon.model.hooks import vision_tower
from surgeon.model.load import LoadedModel
from surgeon.ranking.collect import collect_stats
from surgeon.ranking.judges.base import JUDGES, JudgeContext
from surgeon.ranking.textspan import textspan_all
from surgeon.results.records import wrong_fields

# /2: per-head effective TextSpan rank, and the model's forward identity (weights + architecture config). /1
# rankings came from bases padded with rounding directions (picks 2..m could depend on the batch size).
RANKING_SCHEMA = "surgeon.ranking/3"


@dataclass
class HeadRank:
    layer: int
    head: int
    texts: list[str]
    stds: list[float]
    label: str
    verdicts: list[bool]
    ccs: int
    variance: float  # total variance of the head's direct contribution: a tie-breaker and a size measure
    effective_rank: int  # TextSpan projection rank used: min(requested rank, the head's numerical rank)

    @property
    def name(self) -> str:
        return f"L{self.layer}.H{self.head}"


@dataclass
class Ranking:
    model: dict
    images: dict
    layers: list[int]
    n_heads: int
    m: int
    span_rank: int  # TextSpan projection rank requested (each head records the one it used)
    pool: dict
    judge: str
    heads: list[HeadRank]
    schema: str = RANKING_SCHEMA
    surgeon_version: str = __version__
    cached_stats: bool = field(default=False, compare=False)

    def sorted_heads(self) -> list[HeadRank]:
        """Highest CCS first; ties by larger contribution variance, then by position (deterministic)."""
        return sorted(self.heads, key=lambda h: (-h.ccs, -h.variance, h.layer, h.head))

    def clamped_heads(self) -> list[HeadRank]:
        """Heads whose numerical rank was below the requested TextSpan rank."""
        return [h for h in self.heads if h.effective_rank < self.span_rank]

    def clamp_note(self) -> str | None:
        """One line for the terminal when the requested TextSpan rank exceeded some heads' numerical rank."""
        clamped = self.clamped_heads()
        if not clamped:
            return None
        used = sorted({h.effective_rank for h in clamped})
        span = f"{used[0]}" if len(used) == 1 else f"{used[0]}-{used[-1]}"
        images = self.images.get("count")
        # N images span at most N directions (textspan.numerical_rank): then more images, not rounding, is why
        by_images = sum(h.effective_rank == images for h in clamped)
        why = (
            f"{images} images span at most {images} directions: pass more images for a fuller span"
            if by_images == len(clamped)
            else f"{by_images} of them limited by the {images} images, the others' directions beyond are float rounding"
            if by_images
            else "directions beyond are float rounding"
        )
        return (
            f"TextSpan rank {self.span_rank} exceeds the numerical rank of {len(clamped)} of {len(self.heads)} heads: "
            f"used {span} ({why}; per head in ranking.json)"
        )

    def ccs_distribution(self) -> dict[str, float]:
        counts = Counter(h.ccs for h in self.heads)
        return {str(k): counts.get(k, 0) / len(self.heads) for k in range(self.m + 1)}

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "cached_stats"}
        data["ccs_distribution"] = self.ccs_distribution()
        return data

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: object) -> Ranking:
        if not isinstance(data, dict) or data.get("schema") != RANKING_SCHEMA:
            schema = data.get("schema") if isinstance(data, dict) else type(data).__name__
            older = schema in ("surgeon.ranking/1", "surgeon.ranking/2")
            hint = "it was made by an older surgeon: rank the model again" if older else None
            raise CorruptInput(f"not a surgeon ranking (schema {schema!r}, expected {RANKING_SCHEMA})", hint=hint)
        try:
            fields = {k: data[k] for k in ("model", "images", "layers", "n_heads", "m", "span_rank", "pool", "judge")}
            heads = [HeadRank(**h) for h in data["heads"]]
            ranking = cls(**fields, heads=heads, surgeon_version=data["surgeon_version"])
        except (KeyError, TypeError) as err:
            raise CorruptInput(f"corrupt ranking: {err}") from None
        wrong = wrong_fields(ranking)
        if wrong:
            raise CorruptInput(f"corrupt ranking: wrong type for {', '.join(wrong)}")
        if min(ranking.m, ranking.n_heads, ranking.span_rank) < 1 or not ranking.heads:
            raise CorruptInput("corrupt ranking: no heads, or m, n_heads or span_rank below 1")
        if any(h.layer not in ranking.layers or not 0 <= h.head < ranking.n_heads for h in ranking.heads):
            raise CorruptInput("corrupt ranking: a head outside its layers or its n_heads")
        if any(not 0 <= h.ccs <= ranking.m for h in ranking.heads):
            raise CorruptInput(f"corrupt ranking: a CCS outside 0..m={ranking.m}")
        seen: set[tuple[int, int]] = set()
        for h in ranking.heads:  # a head listed twice would be "pruned" twice: counted, reported, one head removed
            if (h.layer, h.head) in seen:
                raise CorruptInput(f"corrupt ranking: L{h.layer}.H{h.head} is listed more than once")
            seen.add((h.layer, h.head))
        return ranking

    @classmethod
    def read(cls, path: Path) -> Ranking:
        refuse_temporary(path, "ranking")
        path = path / "ranking.json" if path.is_dir() else path
        data = read_json(path, "ranking")
        try:
            return cls.from_dict(data)
        except CorruptInput as err:
            raise CorruptInput(f"{err.args[0]}: {path}", hint=err.hint) from None

    def check_model(self, loaded: LoadedModel) -> None:
        """The ranking must come from this model as it computes: same weights AND same forward identity."""
        if self.model.get("weights_sha256") != loaded.weights_hash:
            raise PreconditionFailed(
                f"the ranking was made for {self.model.get('name')} "
                f"(weights {str(self.model.get('weights_sha256', ''))[:12]}),"
                f" not for {loaded.identity} (weights {loaded.weights_hash[:12]})",
                hint="rank this model first, or pass the ranking made for it",
            )
        if self.model.get("forward_sha256") != loaded.forward_identity:
            raise PreconditionFailed(
                f"the ranking was made for the same weights under another architecture config or preprocessing "
                f"({self.model.get('name')}, activation {self.model.get('activation')}) than {loaded.identity} "
                f"(activation {loaded.activation})",
                hint="rank this model as you load it now (e.g. GELU vs QuickGELU changes every head)",
            )

    def write(self, out: Path, force: bool = False, plot_format: str = "png") -> Path:
        """Write ranking.json, ranking.csv and ccs_heatmap.<plot_format> into `out`, atomically."""
        with atomic_dir(out, force=force) as tmp:
            (tmp / "ranking.json").write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
            with open(tmp / "ranking.csv", "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["layer", "head", "label", "ccs", "variance"] + [f"text{i + 1}" for i in range(self.m)])
                for h in self.sorted_heads():
                    writer.writerow([h.layer, h.head, h.label, h.ccs, f"{h.variance:.6g}", *h.texts])
            from surgeon.results.plots import ccs_heatmap

            ccs_heatmap(self, tmp / f"ccs_heatmap.{plot_format}")
        return out


def make_judge(name: str, loaded: LoadedModel, pool: TextPool, llm: LlmJudge | None = None):
    endpoint = asdict(llm) if llm is not None else {}
    ctx = JudgeContext(taxonomy=pool.taxonomy, encode_text=loaded.encode_text, cache_dir=cache_dir(), **endpoint)
    return JUDGES.get(name)(ctx)


def rank_heads(
    loaded: LoadedModel,
    images: ImageSet,
    pool: TextPool,
    method: RankMethod,
    quiet: bool = False,
    llm: LlmJudge | None = None,
) -> Ranking | None:
    """The library function behind `surgeon rank` and the RankHeads RPC. Under torchrun every rank collects
    its shard of the statistics; rank 0 runs TextSpan and the judge and returns the ranking, the others None."""
    method.check()
    m, span_rank = method.m, method.span_rank
    if m > len(pool.lines):
        raise InvalidInput(f"m={m} is larger than the text pool ({len(pool.lines)} lines)")
    judge_impl = make_judge(method.judge, loaded, pool, llm)  # fail fast on a bad judge
    n_layers, heads_per_layer = vision_layout(vision_tower(loaded.model))
    chosen = parse_layers(method.layers, n_layers)
    say(
        f"rank: {sum(heads_per_layer[i] for i in chosen)} heads (layers {chosen[0]}-{chosen[-1]}) of "
        f"{loaded.identity} on {images.count:,} images and {len(pool.lines):,} texts of the {pool.name} pool "
        f"(m={m}, span_rank={span_rank}; statistics and text embeddings come from the cache when there)",
        quiet or not world().is_main,
    )
    stats, cached = collect_stats(
        loaded,
        images,
        chosen,
        batch_size=method.batch_size,
        quiet=quiet,
        use_cache=method.use_cache,
        checkpoint_every=method.checkpoint_every,
    )
    texts, _ = pool_embeddings(loaded, pool, quiet=quiet, use_cache=method.use_cache)
    if not world().is_main:
        return None
    spans = textspan_all(stats, texts.double(), m=m, span_rank=span_rank, quiet=quiet)
    variance = stats.covariance().diagonal(dim1=-2, dim2=-1).sum(-1) / stats.count
    flat = [(li, h, spans[li][h]) for li in range(len(chosen)) for h in range(stats.n_heads)]
    verdicts = judge_impl.judge([[pool.lines[i] for i in span.picks] for _, _, span in flat])
    heads = [
        HeadRank(
            layer=chosen[li],
            head=h,
            texts=[pool.lines[i] for i in span.picks],
            stds=[round(s, 6) for s in span.stds],
            label=verdict.label,
            verdicts=list(verdict.verdicts),
            ccs=verdict.ccs,
            variance=float(variance[li, h]),
            effective_rank=span.effective_rank,
        )
        for (li, h, span), verdict in zip(flat, verdicts, strict=True)
    ]
    return Ranking(
        model=loaded.record(),
        images={
            "identity": images.identity,
            "description": images.description,
            "count": stats.count,
            "skipped": len(images.skipped),
        },
        layers=list(chosen),
        n_heads=heads_per_layer[chosen[0]],
        m=m,
        span_rank=span_rank,
        pool={"name": pool.name, "sha256": pool.digest, "size": len(pool.lines)},
        judge=method.judge,
        heads=heads,
        cached_stats=cached,
    )
