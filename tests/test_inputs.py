"""Reading user inputs: images in odd modes or truncated, CSV manifests and their labels (integer, named,
negative, with a byte order mark), class-names files, text pools that are FIFOs, JSON files of any content."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from surgeon.core.errors import CorruptInput, InvalidInput
from surgeon.inputs.images import open_image
from surgeon.validation.validate import classification_set
from tests.conftest import run_cli


def _manifest(tmp_path: Path, labels: list[str]) -> Path:
    rows = ["path,label"]
    for i, label in enumerate(labels):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{label}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "m.csv"


def test_integer_csv_labels_index_classnames(tmp_path):
    from surgeon.validation.validate import classification_set

    names = [f"class{i}" for i in range(12)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    task = classification_set(_manifest(tmp_path, ["2", "10", "0"]), tmp_path / "names.txt")
    assert task.labels.tolist() == [2, 10, 0]
    assert task.classnames == names


def test_a_manifest_takes_clip_benchmark_json_classnames_by_its_stem(tmp_path):
    """A manifest with a JSON --classnames read the JSON's text lines as class names (18 "classes", 3% top-1)."""
    from surgeon.validation.validate import classification_set

    names = [f"class{i}" for i in range(12)]
    (tmp_path / "names.json").write_text(json.dumps({"m": names, "other": ["a", "b"]}, indent=2))
    task = classification_set(_manifest(tmp_path, ["2", "10", "0"]), tmp_path / "names.json")
    assert task.classnames == names and task.labels.tolist() == [2, 10, 0]


@pytest.mark.parametrize(
    "labels, names, message",
    [
        (["2", "cat"], ["cat", "dog", "x"], "mixes class indices and class names"),
        (["0", "3"], ["cat", "dog"], "label 3"),
        (["0", "1"], None, "integer labels"),
        (["cat", "cow"], ["cat", "dog"], "not in"),
    ],
)
def test_csv_label_mismatches_are_errors(tmp_path, labels, names, message):
    from surgeon.validation.validate import classification_set

    names_file = None
    if names is not None:
        names_file = tmp_path / "names.txt"
        names_file.write_text("\n".join(names) + "\n")
    with pytest.raises(InvalidInput, match=message):
        classification_set(_manifest(tmp_path, labels), names_file)


def test_name_labels_follow_the_classnames_order(tmp_path):
    from surgeon.validation.validate import classification_set

    (tmp_path / "names.txt").write_text("dog\ncat\n")
    task = classification_set(_manifest(tmp_path, ["cat", "dog", "cat"]), tmp_path / "names.txt")
    assert task.classnames == ["dog", "cat"] and task.labels.tolist() == [1, 0, 1]


def test_a_fifo_as_text_pool_is_refused_not_read(tmp_path):
    import os

    fifo = tmp_path / "pool.txt"
    os.mkfifo(fifo)  # reading it would block forever
    done = run_cli("rank", "--texts", str(fifo))
    code, err = done.returncode, done.stderr
    assert code == 2 and "not a regular file" in err


def _images(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / name)


def test_a_manifest_with_a_byte_order_mark_is_read(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: the header is still a header, the first class name still itself."""
    _images(tmp_path, ["a.png", "b.png", "c.png"])
    manifest = tmp_path / "val.csv"
    manifest.write_text("path,label\na.png,cat\nb.png,dog\nc.png,cat\n", encoding="utf-8-sig")
    assert manifest.read_bytes().startswith(b"\xef\xbb\xbf")
    task = classification_set(manifest)
    assert task.classnames == ["cat", "dog"] and list(task.labels) == [0, 1, 0]
    names = tmp_path / "names.txt"
    names.write_text("dog\ncat\n", encoding="utf-8-sig")
    manifest.write_text("path,label\na.png,1\nb.png,0\nc.png,1\n", encoding="utf-8-sig")
    task = classification_set(manifest, names)
    assert task.classnames == ["dog", "cat"] and list(task.labels) == [1, 0, 1]


def test_a_negative_manifest_label_says_so(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    names = tmp_path / "names.txt"
    names.write_text("dog\ncat\n")
    manifest = tmp_path / "val.csv"
    manifest.write_text("path,label\na.png,1\nb.png,-1\n")
    with pytest.raises(InvalidInput, match=r"has label -1, but .*names.txt names 2 classes \(indices 0..1\)"):
        classification_set(manifest, names)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("CMYK", ".jpg"), ("L", ".png"), ("I;16", ".png"), ("RGBA", ".png"), ("LA", ".png"), ("P", ".gif"), ("1", ".bmp")],
)
def test_odd_image_modes_are_converted_to_rgb(tmp_path, mode, suffix):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    image = (
        base.convert(mode)
        if mode not in ("I;16",)
        else Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16))
    )
    path = tmp_path / f"img{suffix}"
    image.save(path)
    rgb = open_image(path)
    assert rgb.mode == "RGB" and rgb.size == (30, 20)
    if mode == "I;16":  # 16-bit greys are scaled to 8 bits, not clipped to white
        assert 20 < np.asarray(rgb).mean() < 235


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_images_are_refused(tmp_path, suffix):
    path = tmp_path / f"img{suffix}"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
    with pytest.raises(CorruptInput, match="unreadable image"):
        open_image(path)


def test_json_files_are_read_with_one_clear_error_whatever_they_hold(tmp_path):
    """A FIFO is refused before it is opened (reading it would block); nesting and number sizes that Python's
    json refuses are corrupt input, not a RecursionError or ValueError traceback."""
    import os

    from surgeon.core.errors import NotFound
    from surgeon.core.paths import read_json, read_json_object

    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "deep.json").write_text("[" * 100_000)
    (tmp_path / "digits.json").write_text("1" * 5000)
    (tmp_path / "list.json").write_text("[1]")
    for name, error in [("fifo", "not a regular file"), ("deep", "not valid JSON"), ("digits", "not valid JSON")]:
        with pytest.raises(CorruptInput, match=error):
            read_json(tmp_path / f"{name}.json", "plan")
    with pytest.raises(CorruptInput, match="not a JSON object"):
        read_json_object(tmp_path / "list.json", "plan")
    with pytest.raises(NotFound):
        read_json(tmp_path / "missing.json", "plan")


def _wide_grey(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """A 16-bit, 32-bit or float greyscale image with values past both ends of 0..65535 (clipped when converted)."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, size[::-1], dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-70_000, 140_000, size[::-1], dtype=np.int32))
    values = rng.normal(30_000, 40_000, size[::-1]).astype(np.float32)
    values.flat[:4] = [np.inf, -np.inf, 3e38, 255.99 * 256]
    return Image.fromarray(values)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
@pytest.mark.parametrize("reduce_for", [None, (16, 16), (20, 12)])
def test_wide_grey_images_are_converted_in_strips_to_the_same_pixels(monkeypatch, tmp_path, mode, reduce_for):
    """16-bit, 32-bit and float greys are converted a strip of rows at a time (STRIP_PIXELS; the whole image in
    float64 took 8 bytes per pixel three times over), and reduced while grey: the pixels are those of the whole image
    scaled in float64 (v / 256, clipped to 0..255, truncated), then made RGB, then reduced, as before."""
    from surgeon.inputs import preprocess

    monkeypatch.setattr(preprocess, "STRIP_PIXELS", 1000)  # strips of 7 rows, the last one shorter
    image = _wide_grey(mode, (143, 101), 3)
    path = tmp_path / "wide.tif"
    image.save(path)
    expected = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) / 256.0, 0, 255).astype(np.uint8))
    expected = expected.convert("RGB")
    if reduce_for is not None:
        factor = min(143 // (2 * reduce_for[1]), 101 // (2 * reduce_for[0]))
        expected = expected.reduce(factor) if factor >= 2 else expected
    with path.open("rb") as stream:
        got = preprocess.decode_image(stream, "wide.tif", reduce_for=reduce_for)
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(expected))


PEAK_RSS_SCRIPT = """
import sys
from pathlib import Path
from surgeon.inputs.preprocess import decode_image
def peak():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
before = peak()
with open(sys.argv[1], "rb") as stream:
    decode_image(stream, "huge", reduce_for=(224, 224))
print(peak() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS from /proc (Linux)")
@pytest.mark.parametrize(("mode", "form"), [("I;16", "PNG"), ("F", "TIFF")])
def test_decoding_a_wide_grey_image_stays_within_the_servers_budget(tmp_path, mode, form):
    """An 8000x8000 16-bit PNG (124 KB) or float TIFF (372 KB), decoded for a 224 px model as the OIP server does,
    adds at most the 450 MB docs/serving-oip.md promises for 64 M pixels (measured: 1.1-1.3 GB in float64 before,
    210 and 330 MB in strips)."""
    import subprocess
    import sys

    path = tmp_path / f"huge.{form.lower()}"
    Image.new(mode, (8000, 8000)).save(path, format=form, **({"compression": "tiff_deflate"} if form == "TIFF" else {}))
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, str(path)], capture_output=True, text=True, timeout=300, check=True
    )
    grown = float(done.stdout.strip())
    assert grown < 450, f"decoding a {mode} 8000x8000 image grew the peak RSS by {grown:.0f} MB"
