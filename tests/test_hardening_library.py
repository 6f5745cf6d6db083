"""What the library promises under bad input (README 'Hardening' table): images, checkpoints, disk full."""

from __future__ import annotations

import errno
import pickle

import numpy as np
import pytest
from PIL import Image

from surgeon.errors import CorruptInput, PreconditionFailed, StorageError
from surgeon.images import open_image
from surgeon.load import read_state_dict
from surgeon.paths import atomic_dir
from surgeon.policies import PolicyOptions
from surgeon.prune import prune
from tests.test_prune_export import setup, synthetic_suite  # noqa: F401  (fixture)


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


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(path)  # a few KiB on disk, 100 megapixels decoded
    assert path.stat().st_size < 100_000
    with pytest.raises(CorruptInput, match="decompression bomb"):
        open_image(path)


def test_pickled_code_in_a_checkpoint_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Payload:
        def __reduce__(self):
            return (open, ("PWNED", "w"))

    (tmp_path / "model.pt").write_bytes(pickle.dumps({"visual.proj": Payload()}))
    with pytest.raises(CorruptInput, match="refused"):
        read_state_dict(tmp_path / "model.pt")
    assert not (tmp_path / "PWNED").exists()


def test_disk_full_while_exporting_leaves_nothing(setup, tmp_path, monkeypatch):  # noqa: F811
    loaded, ranking = setup

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("surgeon.checkpoint.save_file", full)
    out = tmp_path / "runs" / "run"
    with pytest.raises(StorageError, match="No space left on device"):
        prune(loaded, ranking, synthetic_suite(), "top-k", PolicyOptions(k=1), out_dir=out)
    assert list((tmp_path / "runs").iterdir()) == []


def test_racing_writers_never_mix_outputs(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(PreconditionFailed, match="created by another process meanwhile"):
        with atomic_dir(final) as first:
            (first / "a.txt").write_text("first")
            with atomic_dir(final) as second:  # started before the first finished, published first
                (second / "b.txt").write_text("second")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary leftovers


def test_published_outputs_get_the_umask_modes_not_owner_only(tmp_path, monkeypatch):
    """Temporary folders and files are created 0700/0600; what is published must be readable like a plain write."""
    from surgeon.paths import atomic_write_text

    monkeypatch.setattr("surgeon.paths._UMASK", 0o022)
    with atomic_dir(tmp_path / "run") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"x")
        (tmp / "sub" / "weights.bin").chmod(0o600)
    atomic_write_text(tmp_path / "card.md", "hello")
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "run") == 0o755 and mode(tmp_path / "run" / "sub") == 0o755
    assert mode(tmp_path / "run" / "sub" / "weights.bin") == 0o644 and mode(tmp_path / "card.md") == 0o644


def test_a_failed_replace_keeps_the_previous_output(tmp_path, monkeypatch):
    import os

    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("previous")
    real_rename = os.rename

    def failing(src, dst):
        if ".tmp-" in str(src):
            raise OSError(18, "Invalid cross-device link")
        return real_rename(src, dst)

    monkeypatch.setattr("surgeon.paths.os.rename", failing)
    with pytest.raises(PreconditionFailed, match="could not move"):
        with atomic_dir(final, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (final / "old.txt").read_text() == "previous"


def test_json_files_are_read_with_one_clear_error_whatever_they_hold(tmp_path):
    """A FIFO is refused before it is opened (reading it would block); nesting and number sizes that Python's
    json refuses are corrupt input, not a RecursionError or ValueError traceback."""
    import os

    from surgeon.errors import NotFound
    from surgeon.paths import read_json, read_json_object

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
