"""Video files as frames for text -> video retrieval (the CCS paper's experiment 6, docs/METHOD.md §6).

Decoding uses PyAV (`av`): its wheels bundle FFmpeg with its codecs (H.264, HEVC, VP8/9, AV1, MPEG-4 ...), so a
plain `pip install` reads every common container with no system FFmpeg, and it exposes the container's header
(stream size, duration) and packets, so each file is bounded before a frame is decoded. (torchvision's video
reader is deprecated, decord has no recent wheels, OpenCV hides the header and bundles far more.)

A video becomes N frames, one from the middle of each of N equal segments; each is resized and centre-cropped
as the model's own preprocessing does (bicubic, CLIP's crop), and kept as uint8 so that ToTensor + Normalize
later give exactly what open_clip's preprocess gives. The frames of a whole set are decoded once into one
memory-mapped file in the cache (`frames/`), keyed by the files (path, size, mtime), N and the crop, so memory
does not grow with the number of videos and a second validation skips decoding."""

from __future__ import annotations

import contextvars
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from surgeon.core import limits
from surgeon.core.cache import touch
from surgeon.core.errors import CorruptInput, InvalidInput, NotFound, StorageError
from surgeon.core.paths import atomic_file, cache_dir
from surgeon.core.progress import progress_bar, stop_point
from surgeon.inputs.images import files_digest

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ogv", ".3gp")
FRAMES_VERSION = "1"  # bump when sampling or cropping changes: cached frames are keyed on it
DECODE_THREADS = 4  # videos decoded at once (FFmpeg releases the GIL)

Crop = Callable[[Image.Image], Image.Image]


def segment_middles(total: int, n: int) -> list[int]:
    """The frame at the middle of each of n equal segments of `total` frames (repeats when total < n)."""
    return [(2 * i + 1) * total // (2 * n) for i in range(n)]


def frame_crop(preprocess) -> Crop:
    """The PIL steps of an open_clip preprocess (resize, crop, mode) before ToTensor + Normalize."""
    from torchvision.transforms import Compose

    steps = []
    for step in preprocess.transforms:
        if type(step).__name__.endswith("ToTensor"):
            break
        steps.append(step)
    return Compose(steps)


def _fail(path: Path, message: str, error: type = CorruptInput):
    return error(f"video {limits.echo(str(path), 120)} {message}")


def _open(path: Path):
    """The container and its first video stream, once the file and its header are within bounds."""
    import av

    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise NotFound(f"video not found: {path}") from None
    if size == 0:
        raise _fail(path, "is empty")
    if size > limits.MAX_VIDEO_BYTES:
        raise _fail(path, f"is {size:,} bytes; at most {limits.MAX_VIDEO_BYTES:,} are read", InvalidInput)
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as err:
        raise _fail(path, f"is not a readable video ({err.strerror or type(err).__name__})") from None
    try:
        if not container.streams.video:
            raise _fail(path, "has no video stream (or no frames)")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise _fail(path, f"has no frame size in its header ({width} x {height})")
        if max(width, height) > limits.MAX_VIDEO_SIDE:
            raise _fail(path, f"is {width} x {height}; at most {limits.MAX_VIDEO_SIDE} px a side", InvalidInput)
        seconds = _seconds(container, stream)
        if seconds > limits.MAX_VIDEO_SECONDS:
            raise _fail(path, f"lasts {seconds:,.0f} s; at most {limits.MAX_VIDEO_SECONDS:,.0f} s", InvalidInput)
    except BaseException:
        container.close()
        raise
    return container, stream  # one decoding thread per file: videos decode side by side (FFmpeg's frame
    # threads made short clips 10x slower to decode)


def _seconds(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return (container.duration or 0) / 1_000_000  # av.time_base: microseconds


def count_frames(path: Path) -> int:
    """Frames of the first video stream, counted from its packets (no decoding), bounded; fewer than the header
    declares (its frame count, or duration x frame rate) means the file was cut short."""
    import av

    container, stream = _open(path)
    declared = stream.frames or round(_seconds(container, stream) * float(stream.average_rate or 0))
    try:
        total = 0
        for packet in container.demux(stream):
            total += packet.size > 0
            if total > limits.MAX_VIDEO_FRAMES:
                raise _fail(path, f"has over {limits.MAX_VIDEO_FRAMES:,} frames", InvalidInput)
    except av.error.FFmpegError as err:
        raise _fail(path, f"is unreadable ({err.strerror or type(err).__name__})") from None
    finally:
        container.close()
    if total == 0:
        raise _fail(path, "has no frames")
    if total < declared - max(2, declared // 50):  # container durations may round by a frame or two
        raise _fail(path, f"is truncated: {total} of the {declared} frames its header declares are present")
    return total


def read_frames(path: Path, n: int, crop: Crop) -> np.ndarray:
    """n frames (n x H x W x 3 uint8, cropped), one from the middle of each of n equal segments."""
    import av
    from av.video.reformatter import VideoReformatter

    limits.count("frames per video", n, 1, limits.MAX_FRAMES_PER_VIDEO)
    total = count_frames(path)
    wanted: dict[int, list[int]] = {}
    for position, index in enumerate(segment_middles(total, n)):
        wanted.setdefault(index, []).append(position)
    last, out, decoded = max(wanted), None, 0
    to_rgb = VideoReformatter()  # one per video: it keeps FFmpeg's scaler (a new one per frame cost 6x the time)
    container, stream = _open(path)
    try:
        for index, frame in enumerate(container.decode(stream)):
            decoded = index + 1
            if index in wanted:
                if max(frame.width, frame.height) > limits.MAX_VIDEO_SIDE:
                    raise _fail(path, f"has a {frame.width} x {frame.height} frame", InvalidInput)
                pixels = np.asarray(crop(to_rgb.reformat(frame, format="rgb24").to_image()).convert("RGB"))
                if out is None:
                    out = np.empty((n, *pixels.shape), np.uint8)
                out[wanted[index]] = pixels
            if index == last:
                break
    except av.error.FFmpegError as err:
        raise _fail(path, f"is truncated or corrupt ({err.strerror or type(err).__name__})") from None
    finally:
        container.close()
    if out is None or decoded <= last:
        raise _fail(path, f"is truncated: {decoded} of its {total} frames decode")
    return out


class VideoFrames:
    """The videos of a retrieval set, `frames` each; `decoded(preprocess)` is their frames as one uint8 array
    (videos x frames consecutive rows), memory-mapped from the cache."""

    def __init__(self, paths: list[Path], frames: int, quiet: bool = True):
        """Every file's header is checked now (size, stream, sides, duration: ~1 ms each), before a model is
        loaded; frame counts and decoding come with `decoded`."""
        limits.count("frames per video", frames, 1, limits.MAX_FRAMES_PER_VIDEO)
        with progress_bar("checking video headers", len(paths), quiet=quiet) as advance:
            for path in paths:
                stop_point()
                container, _ = _open(path)
                container.close()
                advance(1)
        self.paths, self.frames = paths, frames

    def __len__(self) -> int:
        return len(self.paths) * self.frames

    def cache_path(self, crop: Crop) -> Path:
        key = "|".join([FRAMES_VERSION, files_digest(self.paths), str(self.frames), repr(crop)])
        return cache_dir() / "frames" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npy"

    def decoded(self, preprocess, side: int, quiet: bool = True) -> np.ndarray | DecodingFrames:
        """Every frame, cropped as `preprocess` crops (to `side` px): read from the cache, or decoded into it in
        the background (a `DecodingFrames` whose rows arrive video by video); a cached file that does not read
        back whole is decoded again."""
        crop = frame_crop(preprocess)
        path = self.cache_path(crop)
        shape = (len(self), side, side, 3)
        if path.is_file():
            try:
                frames = np.load(path, mmap_mode="r")
                if frames.shape == shape and frames.dtype == np.uint8:
                    touch(path)
                    return frames
            except (OSError, ValueError):
                pass
        size = int(np.prod(shape))
        if size > limits.MAX_FRAME_CACHE_BYTES:
            raise InvalidInput(
                f"{len(self.paths):,} videos x {self.frames} frames of {side} px are {size:,} bytes decoded; "
                f"at most {limits.MAX_FRAME_CACHE_BYTES:,}",
                hint="validate on fewer videos or frames",
            )
        filling = DecodingFrames(shape)
        worker = threading.Thread(
            target=contextvars.copy_context().run,  # the caller's observer: a cancelled job stops decoding too
            args=(self._fill, path, crop, filling, quiet),
            name="surgeon-video-frames",
            daemon=True,
        )
        worker.start()
        return filling

    def _fill(self, path: Path, crop: Crop, filling: DecodingFrames, quiet: bool) -> None:
        """Decode every video into the cache file, handing rows to `filling` as they are written; the last
        video's rows only once the file is published, so a reader that finished finds it in the cache."""
        shape = filling.shape
        try:
            with atomic_file(path, suffix=".npy") as tmp:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
                filling.attach(out)
                with progress_bar("decoding video frames", len(self.paths), quiet=quiet) as advance:
                    for i, frames in enumerate(self._decode_all(crop)):
                        if frames.shape[1:] != shape[1:]:
                            raise InvalidInput(
                                f"the preprocessing crops frames to {frames.shape[1:3]}, not {shape[1]} px"
                            )
                        out[i * self.frames : (i + 1) * self.frames] = frames
                        advance(1)
                        if i + 1 < len(self.paths):
                            filling.ready((i + 1) * self.frames)
                out.flush()
            filling.ready(len(filling))
        except OSError as err:
            filling.fail(StorageError(f"caching decoded frames in {path.parent} failed: {err.strerror or err}"))
        except BaseException as err:  # handed to the reader, which raises it where it waits
            filling.fail(err)

    def _decode_all(self, crop: Crop) -> Iterator[np.ndarray]:
        """Each video's frames in order; a few decode at once, at most 2 x DECODE_THREADS held."""
        workers = max(1, min(DECODE_THREADS, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            pending = []
            for path in self.paths:
                stop_point()
                pending.append(pool.submit(read_frames, path, self.frames, crop))
                if len(pending) >= 2 * workers:
                    yield pending.pop(0).result()
            for future in pending:
                yield future.result()


class DecodingFrames:
    """A set's frames while a background thread decodes them into the cache: rows are handed out as soon as
    their video is written, so embedding the first videos overlaps decoding the rest. Slices only."""

    def __init__(self, shape: tuple[int, int, int, int]):
        self.shape = shape
        self._array: np.ndarray | None = None
        self._rows = 0
        self._error: BaseException | None = None
        self._changed = threading.Condition()

    def __len__(self) -> int:
        return self.shape[0]

    def attach(self, array: np.ndarray) -> None:
        self._array = array

    def ready(self, rows: int) -> None:
        with self._changed:
            self._rows = rows
            self._changed.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._changed:
            self._error = error
            self._changed.notify_all()

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("DecodingFrames supports only contiguous slices")
        stop = len(self) if index.stop is None else min(index.stop, len(self))
        with self._changed:
            while self._rows < stop:
                if self._error is not None:
                    raise self._error
                self._changed.wait(timeout=0.5)
                stop_point()
        assert self._array is not None  # attached before the first rows are ready
        return np.asarray(self._array[index])


def write_video(path: Path, frames: np.ndarray, fps: int = 8, lossless: bool = False) -> None:
    """uint8 frames (T x H x W x 3, even sides) as a video file (the container from the suffix), byte for byte
    the same on every run: FFmpeg's own MPEG-4 Part 2 encoder on one thread (libx264's output varied between
    runs, even on one thread), or with `lossless` FFV1 in RGB (frames decode back exactly; e.g. .mkv)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("ffv1" if lossless else "mpeg4", rate=fps)
        stream.pix_fmt = "bgr0" if lossless else "yuv420p"
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.codec_context.thread_count = 1
        if not lossless:
            stream.bit_rate = 4_000_000
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = index  # one tick of 1/fps per frame
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
