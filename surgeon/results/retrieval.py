"""Zero-shot retrieval, the validation family beside classification and bias (docs/METHOD.md §6).

- image <-> text: clip_benchmark's `zeroshot_retrieval` (its webdataset export with a `txt` member of captions
  per image, or a CSV manifest `path,caption` with one row per caption). Metrics as clip_benchmark names them:
  `image_retrieval_recall@k` (per caption: is its image among the top k images) and `text_retrieval_recall@k`
  (per image: is one of its captions among the top k captions), plus the median and mean rank of the first
  right answer.
- text -> video: the CCS paper's experiment 6 (a CSV manifest `path,caption` of video files; the first caption
  of each video is its query). Each video is N frames, one from the middle of each of N equal segments
  (surgeon.inputs.video), each frame embedded and L2-normalised, the N embeddings mean-pooled (not re-normalised, as
  the published code); metrics `video_retrieval_recall@{1,5,10,50}`, median and mean rank.

Ranks count the candidates scoring strictly higher than the right one, plus one: ties favour the right answer
(clip_benchmark's top-k breaks them arbitrarily)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from surgeon.core.errors import InvalidInput

IMAGE_TASK = "zeroshot_retrieval"  # clip_benchmark's task name
VIDEO_TASK = "zeroshot_video_retrieval"
TASKS = (IMAGE_TASK, VIDEO_TASK)
RECALL_KS = (1, 5, 10)  # clip_benchmark's `--recall_k 1 5 10`
VIDEO_RECALL_KS = (1, 5, 10, 50)  # the paper's R@1/5/10/50
#: the figure a table, the summary and the gates read per set: text -> image (or video) R@1
HEADLINE = {IMAGE_TASK: "image_retrieval_recall@1", VIDEO_TASK: "video_retrieval_recall@1"}
_CHUNK = 1024  # queries scored at once: memory chunk x candidates floats


@dataclass
class RetrievalSet:
    """Captions and what they describe. For an image set, `images` holds one image per item; for a video set
    (`frames` > 0) it holds `frames` consecutive frames per video (decoded and cropped, surgeon.inputs.video)."""

    name: str
    images: object  # surgeon.validation.validate.Images
    captions: list[str]
    owners: np.ndarray  # caption i describes item owners[i]
    n_items: int
    frames: int = 0  # 0: an image set

    @property
    def task(self) -> str:
        return VIDEO_TASK if self.frames else IMAGE_TASK

    def __post_init__(self) -> None:
        if self.n_items == 0 or not self.captions:
            raise InvalidInput(f"retrieval set {self.name} is empty")
        described = np.unique(self.owners)
        if len(described) != self.n_items:
            raise InvalidInput(f"retrieval set {self.name}: {self.n_items - len(described)} item(s) have no caption")


def first_ranks(
    queries: torch.Tensor, candidates: torch.Tensor, right: torch.Tensor, rights_are_queries: bool
) -> np.ndarray:
    """Per query, 1 + the number of candidates scoring strictly above its best right answer. `right[i]` names
    query i's right candidate, or (`rights_are_queries`) candidate i's query. Right scores are read from the
    same score matrix as the rest: a dot product computed apart may round differently."""
    ranks = []
    for start in range(0, len(queries), _CHUNK):
        scores = queries[start : start + _CHUNK] @ candidates.T
        index = torch.arange(start, start + len(scores))
        if rights_are_queries:
            is_right = right[None, :] == index[:, None]
        else:
            is_right = torch.arange(len(candidates))[None, :] == right[index][:, None]
        best = scores.masked_fill(~is_right, -torch.inf).amax(dim=1)
        ranks.append((scores > best[:, None]).sum(dim=1) + 1)
    return torch.cat(ranks).numpy() if ranks else np.zeros(0, dtype=np.int64)


def rank_metrics(prefix: str, ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    metrics = {f"{prefix}_recall@{k}": float(np.mean(ranks <= k)) for k in ks}
    metrics[f"{prefix}_median_rank"] = float(np.median(ranks))
    metrics[f"{prefix}_mean_rank"] = float(np.mean(ranks))
    return metrics


def image_text_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, owners: np.ndarray) -> dict[str, float]:
    """clip_benchmark's zeroshot_retrieval metrics from L2-normalised embeddings (scores = text . image)."""
    image_emb, text_emb = image_emb.float(), text_emb.float()
    owner_index = torch.as_tensor(owners, dtype=torch.long)
    metrics = rank_metrics("image_retrieval", first_ranks(text_emb, image_emb, owner_index, False), RECALL_KS)
    metrics |= rank_metrics("text_retrieval", first_ranks(image_emb, text_emb, owner_index, True), RECALL_KS)
    return metrics | {"n_images": len(image_emb), "n_texts": len(text_emb)}


def pool_frames(frame_emb: torch.Tensor, frames: int) -> torch.Tensor:
    """Videos x D: the mean of each video's `frames` normalised frame embeddings (the paper's pooling)."""
    return frame_emb.float().view(-1, frames, frame_emb.shape[-1]).mean(dim=1)


def text_video_metrics(video_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, float]:
    """The paper's text -> video metrics; query i is video i's first caption (scores = text . pooled video)."""
    video_emb, text_emb = video_emb.float(), text_emb.float()
    ranks = first_ranks(text_emb, video_emb, torch.arange(len(video_emb)), False)
    return rank_metrics("video_retrieval", ranks, VIDEO_RECALL_KS) | {"n_videos": len(video_emb)}


def report_keys(metrics: dict) -> list[str]:
    """The figures of a retrieval result that report tables show: recalls, then the median rank."""
    keys = [k for k in metrics if "_recall@" in k]
    return keys + [k for k in metrics if k.endswith("_median_rank")]
