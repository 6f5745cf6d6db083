"""Text -> video retrieval (the paper's experiment 6): frame sampling, pooling, the frame cache, bad files, and
the numbers against plain open_clip on the same frames."""

from __future__ import annotations

import csv
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from surgeon.core import limits
from surgeon.core.errors import CorruptInput, InvalidInput
from surgeon.inputs import video
from surgeon.inputs.toy.videos import write_videos
from surgeon.model.load import load_model
from surgeon.results.retrieval import pool_frames
from surgeon.validation.validate import Evaluator, build_suite, validate
from tests.conftest import run_cli


def numbered_frames(n: int, side: int = 32) -> np.ndarray:
    """n frames whose brightness says their index (frame t is 8 * t everywhere)."""
    return np.repeat((8 * np.arange(n, dtype=np.uint8))[:, None, None, None], side * side * 3).reshape(n, side, side, 3)


def test_one_frame_from_the_middle_of_each_equal_segment(tmp_path):
    path = tmp_path / "count.mkv"
    video.write_video(path, numbered_frames(30), lossless=True)
    frames = video.read_frames(path, 4, lambda image: image)
    # 30 frames in 4 segments of 7.5: their middles are 3.75, 11.25, 18.75, 26.25
    assert [int(f.mean()) // 8 for f in frames] == [3, 11, 18, 26]
    short = video.read_frames(path, 40, lambda image: image)  # more frames asked than the video has: repeats
    # 40 segments of 0.75 frames: middles 0.375, 1.125, 1.875, 2.625 ...
    assert len(short) == 40 and [int(f.mean()) // 8 for f in short[:4]] == [0, 1, 1, 2]


def plain_open_clip_video_metrics(loaded, manifest: Path, frames: int) -> dict[str, float]:
    """Independently of surgeon's reader: decode every frame with PyAV, take the segment middles, preprocess
    with open_clip's transform, encode, normalise, mean-pool; first caption per video; numpy ranks."""
    rows = list(csv.reader(manifest.open(encoding="utf-8")))[1:]
    first: dict[str, str] = {}
    for path, caption in rows:
        first.setdefault(path, caption)
    pooled = []
    with torch.no_grad():
        for name in first:
            with av.open(str(manifest.parent / name)) as container:
                images = [frame.to_image() for frame in container.decode(video=0)]
            middles = np.floor((np.arange(frames) + 0.5) * len(images) / frames).astype(int)
            pixels = torch.stack([loaded.preprocess(images[i]) for i in middles])
            pooled.append(loaded.model.encode_image(pixels, normalize=True).mean(dim=0))
        texts = F.normalize(loaded.model.encode_text(loaded.tokenizer(list(first.values()))), dim=-1)
    scores = (texts @ torch.stack(pooled).T).numpy()
    ranks = np.array([int(np.nonzero(np.argsort(-row) == i)[0][0]) + 1 for i, row in enumerate(scores)])
    metrics = {f"video_retrieval_recall@{k}": float(np.mean(ranks <= k)) for k in (1, 5, 10, 50)}
    return metrics | {
        "video_retrieval_median_rank": float(np.median(ranks)),
        "video_retrieval_mean_rank": float(np.mean(ranks)),
    }


def test_video_recall_equals_plain_open_clip_on_the_same_frames(tmp_path, tiny_default_dir):
    manifest = write_videos(tmp_path / "videos", 12, video.write_video)
    loaded = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    report = validate(loaded, build_suite(retrieval=manifest, frames=5))
    (entry,) = report["results"]
    assert entry["task"] == "zeroshot_video_retrieval" and entry["metrics"]["n_videos"] == 12
    expected = plain_open_clip_video_metrics(loaded, manifest, 5)
    for key, value in expected.items():
        assert entry["metrics"][key] == pytest.approx(value, abs=1e-9), key
    assert report["summary"]["mean_recall1"] == entry["metrics"]["video_retrieval_recall@1"]


def test_time_shuffled_frames_give_the_same_pooled_embedding(tmp_path, tiny_default_dir):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    order = np.array([3, 0, 5, 1, 4, 2])
    video.write_video(tmp_path / "a.mkv", frames, lossless=True)
    video.write_video(tmp_path / "b.mkv", frames[order], lossless=True)  # the same frames, shuffled in time
    video.write_video(tmp_path / "c.mkv", frames[::-1].copy() // 2, lossless=True)  # a different video
    (tmp_path / "v.csv").write_text("path,caption\na.mkv,one\nb.mkv,two\nc.mkv,three\n")
    suite = build_suite(retrieval=tmp_path / "v.csv", frames=6)  # 6 segments of 6 frames: every frame
    evaluator = Evaluator(load_model(f"local-dir:{tiny_default_dir}", device="cpu"), suite, cache=False)
    per_frame = evaluator.embeddings("zeroshot_video_retrieval:v.csv")
    assert not torch.allclose(per_frame[:6], per_frame[6:12])  # the frames did arrive in another order
    pooled = pool_frames(per_frame, 6)
    assert torch.allclose(pooled[0], pooled[1], atol=1e-6) and not torch.allclose(pooled[0], pooled[2], atol=1e-3)


def test_frames_are_decoded_once_per_set(tmp_path, monkeypatch):
    manifest = write_videos(tmp_path / "videos", 3, video.write_video)
    loaded = load_model(None)
    first = validate(loaded, build_suite(retrieval=manifest, frames=4))
    cached = list((tmp_path / "cache" / "frames").glob("*.npy"))
    assert len(cached) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(video, "read_frames", no_decoding)
    assert validate(loaded, build_suite(retrieval=manifest, frames=4))["results"] == first["results"]
    with pytest.raises(AssertionError, match="decoded again"):  # other frame counts are other entries
        validate(loaded, build_suite(retrieval=manifest, frames=3))


def bad_videos(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    good = folder / "good.mkv"
    video.write_video(good, numbered_frames(30))
    data = good.read_bytes()
    (folder / "truncated.mkv").write_bytes(data[: len(data) // 2])
    (folder / "cut-header.mp4").write_bytes(data[:300])
    (folder / "text.mp4").write_text("not a video\n")
    with av.open(str(folder / "no-frames.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
    return {p.stem: p for p in folder.iterdir()}


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("truncated", CorruptInput, "is truncated: 1[0-9] of the 30 frames its header declares"),
        ("cut-header", CorruptInput, "is not a readable video"),
        ("text", CorruptInput, "is not a readable video"),
        ("no-frames", CorruptInput, "has no video stream \\(or no frames\\)"),
    ],
)
def test_bad_video_files_are_one_clear_error(tmp_path, name, error, message):
    path = bad_videos(tmp_path / "videos")[name]
    with pytest.raises(error, match=message) as raised:
        video.read_frames(path, 4, lambda image: image)
    assert "\n" not in str(raised.value)


def test_header_bounds_refuse_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "v.mkv"
    video.write_video(path, numbered_frames(24, side=48))  # 3 s at 8 fps, 48 x 48
    for bound, value, message in [
        ("MAX_VIDEO_SIDE", 32, "is 48 x 48; at most 32 px a side"),
        ("MAX_VIDEO_SECONDS", 2.0, "lasts 3 s; at most 2 s"),
        ("MAX_VIDEO_FRAMES", 20, "has over 20 frames"),
        ("MAX_VIDEO_BYTES", 100, "bytes; at most 100 are read"),
    ]:
        with monkeypatch.context() as patch:
            patch.setattr(limits, bound, value)
            with pytest.raises(InvalidInput, match=message):
                video.read_frames(path, 4, lambda image: image)
    (tmp_path / "v.csv").write_text("path,caption\nv.mkv,a video\n")
    suite = build_suite(retrieval=tmp_path / "v.csv", frames=200)
    monkeypatch.setattr(limits, "MAX_FRAME_CACHE_BYTES", 10**6)  # 200 x 48 x 48 x 3 = 1.4 MB decoded
    with pytest.raises(InvalidInput, match="videos x 200 frames of 48 px are 1,382,400 bytes decoded"):
        validate(load_model(None), suite)


def test_a_bad_video_from_the_cli_is_one_line(tmp_path):
    bad_videos(tmp_path / "videos")
    (tmp_path / "v.csv").write_text("path,caption\nvideos/good.mkv,fine\nvideos/truncated.mkv,cut\n")
    run = run_cli("validate", "--retrieval-data", str(tmp_path / "v.csv"), "--quiet")
    assert run.returncode == CorruptInput.exit_code
    lines = run.stderr.strip().splitlines()
    assert "truncated.mkv' is truncated" in lines[0] and "Traceback" not in run.stderr


def test_headers_are_checked_when_the_set_is_read(tmp_path):
    """Before any model is loaded: a file that is no video fails while the suite is built."""
    bad_videos(tmp_path / "videos")
    (tmp_path / "v.csv").write_text("path,caption\nvideos/good.mkv,fine\nvideos/text.mp4,not a video\n")
    with pytest.raises(CorruptInput, match="text.mp4' is not a readable video"):
        build_suite(retrieval=tmp_path / "v.csv")


def test_the_cards_model_index_names_text_to_video_retrieval():
    from surgeon.exporting.card import _retrieval_index

    metrics = {"video_retrieval_recall@1": 0.25, "video_retrieval_recall@50": 1.0, "video_retrieval_median_rank": 3.0}
    lines = _retrieval_index({"dataset": "MSRVTT", "task": "zeroshot_video_retrieval", "metrics": metrics})
    assert lines[0] == "  - task: {type: text-to-video-retrieval}"
    assert "    - {type: recall, name: video_retrieval_recall@1, value: 0.25}" in lines
    assert "    - {type: rank, name: video_retrieval_median_rank, value: 3.0}" in lines
