"""The toy world: determinism, planted bias, counterfactual probe, text pool / taxonomy, PNG export, and
training a (tiny) toy CLIP into a loadable open_clip local-dir folder."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from surgeon.core.errors import InvalidInput, PermissionDenied, PreconditionFailed
from surgeon.inputs.toy.world import (
    FACTOR_CONCEPTS,
    FACTORS,
    ToyWorld,
    WorldConfig,
    toy_pool,
    toy_pool_concepts,
    toy_taxonomy,
)
from surgeon.ranking.judges.lexicon import LexiconJudge
from tests.conftest import tiny_toy_model_cfg

SMALL = WorldConfig(image_size=32, test_size=200, probe_scenes=40)


@pytest.fixture(scope="module")
def world():
    return ToyWorld(WorldConfig())


def test_same_seed_same_images_and_captions():
    a, b = ToyWorld(WorldConfig()), ToyWorld(WorldConfig())
    for (ia, ca), (ib, cb), _ in zip(a.iter_batches(32, seed=3), b.iter_batches(32, seed=3), range(2), strict=False):
        assert ia.dtype == np.uint8 and ia.shape == (32, 48, 48, 3)
        assert np.array_equal(ia, ib) and ca == cb
    other, _ = next(a.iter_batches(32, seed=4))
    assert not np.array_equal(other, next(a.iter_batches(32, seed=3))[0])
    assert np.array_equal(a.sample(40, "test").images, b.sample(40, "test").images)
    # a split is a prefix-stable stream, and held-out splits are disjoint from each other
    assert np.array_equal(a.sample(600, "test").images[:40], a.sample(40, "test").images)
    assert not np.array_equal(a.sample(40, "val").images, a.sample(40, "test").images)
    assert not np.array_equal(ToyWorld(WorldConfig(seed=1)).sample(8).images, a.sample(8).images)


@pytest.mark.parametrize("mode", ["unique", "free"])
def test_captions_describe_factors_and_never_name_the_group(mode):
    world = ToyWorld(WorldConfig(outline_caption_rate=0.0))
    it = world.iter_train(128, seed=0, captions=mode)
    parts = [next(it) for _ in range(12)]
    b = parts[0]
    b.captions = [c for p in parts for c in p.captions]
    b.labels = {f: np.concatenate([p.labels[f] for p in parts]) for f in FACTORS}
    words = set()
    for cap in b.captions:
        words.update(re.findall(r"[a-z]+", cap.lower()))
    forbidden = set(world.cfg.groups) | {"outline", "outlined", "border", "edge", "group", "rim", "dark", "light"}
    assert not words & forbidden
    # a named shape or colour is always the scene's own
    for i, cap in enumerate(b.captions[:500]):
        toks = re.findall(r"[a-z]+", cap)
        named = [s for s in world.cfg.shapes if s in toks]
        assert named in ([], [world.cfg.shapes[b.labels["shape"][i]]])
        colors = [c for c in world.cfg.colors if c in toks]
        assert colors in ([], [world.cfg.colors[b.labels["color"][i]]])
    # parts are sometimes left out
    named = sum(world.cfg.shapes[b.labels["shape"][i]] in c for i, c in enumerate(b.captions))
    assert 0.3 < named / len(b.captions) < 0.95
    if mode == "free":
        assert any(len(c.split()) <= 3 for c in b.captions)


@pytest.mark.parametrize("mode", ["unique", "free"])
def test_captions_name_the_outline_drawn_at_their_rate(mode):
    def batches(rate: float):
        it = ToyWorld(WorldConfig(outline_caption_rate=rate)).iter_train(128, seed=1, captions=mode)
        return [next(it) for _ in range(8)]

    plain, some, every = batches(0.0), batches(0.25), batches(1.0)
    groups = WorldConfig().groups
    concepts_of = LexiconJudge(toy_taxonomy()).concepts_of
    said = [c for b in every for c in b.captions if "outline" in c]
    # free captions name it at the rate; a unique caption names it when it rules out another scene at its turn
    assert len(said) == 8 * 128 if mode == "free" else 0.3 * 8 * 128 < len(said) < 8 * 128
    for b in every:
        for cap, g in zip(b.captions, b.groups, strict=True):
            words = re.findall(r"[a-z]+", cap)
            assert groups[1 - g] not in words, cap  # the outline drawn, never the other
            if "outline" in cap:
                assert groups[g] in words and "outlines" in concepts_of(cap), cap  # in words the judge reads
    named = [
        [bool(re.search(r"\boutline", c)) for c in b.captions] for b in some
    ]  # the outline reads spare draws: the scenes, and every caption that does not name it, stay as at rate 0
    share = np.mean(named)
    assert 0.2 < share < 0.3 if mode == "free" else 0.05 < share < 0.25, share
    for p, s, flags in zip(plain, some, named, strict=True):
        assert np.array_equal(p.images, s.images) and np.array_equal(p.groups, s.groups)
        assert [c for c, f in zip(p.captions, flags, strict=True) if not f] == [
            c for c, f in zip(s.captions, flags, strict=True) if not f
        ]
        assert not any("outline" in c for c in p.captions)
    with pytest.raises(InvalidInput, match="outline_caption_rate"):
        WorldConfig(outline_caption_rate=1.5)


def test_unique_captions_fit_only_their_own_scene(world):
    from surgeon.inputs.toy.captions import unique_named

    b = next(world.iter_train(128, seed=5, group_size=8))
    sc = b.scenes
    named = unique_named(sc, np.random.default_rng(0), extra=0.0, outline_rate=0.5)
    F = np.stack([b.labels[f] for f in FACTORS] + [b.groups], axis=1)  # the outline last, as named's column
    for i in range(len(b)):
        fits = np.all((F == F[i])[:, named[i]], axis=1)
        twins = np.all(F[:, :-1] == F[i, :-1], axis=1)  # scenes identical in every factor (the outline aside)
        same = twins & (F[:, -1] == F[i, -1])  # ... and in the outline: these can never be told apart
        assert np.array_equal(fits, same if named[i, -1] else twins), i
    assert named.any(axis=1).all() and not named.all(axis=1).all()
    assert 0 < named[:, -1].mean() < 0.5  # a candidate in half the captions, named where it rules scenes out
    assert not unique_named(sc, np.random.default_rng(0), extra=0.0)[:, -1].any()
    # a restricted caption vocabulary (the training curriculum) names only the allowed factors
    quiet = ("shape", "size", "position", "texture")
    caps = next(world.iter_train(256, seed=2, group_size=4, caption_factors=quiet)).captions
    words = {w for c in caps for w in re.findall(r"[a-z]+", c)}
    assert not words & (set(world.cfg.colors) | set(world.cfg.backgrounds) | {"background", "backdrop"})
    with pytest.raises(InvalidInput):
        next(world.iter_train(8, caption_factors=("smell",)))


@pytest.mark.parametrize("group_size", [1, 8])
def test_train_stream_bias_matches_config_and_test_split_is_unbiased(world, group_size):
    cfg = world.cfg
    # the stream's own draw (no captions needed: the free caption generator is cheap)
    it = world.iter_train(1504, seed=1, group_size=group_size, captions="free")
    parts = [next(it) for _ in range(6)]
    labels = {f: np.concatenate([p.labels[f] for p in parts]) for f in FACTORS}
    groups = np.concatenate([p.groups for p in parts])
    for si, shape in enumerate(cfg.shapes):
        sel = labels["shape"] == si
        maj = cfg.majority_group(shape)
        frac = (groups[sel] == maj).mean()
        assert abs(frac - cfg.bias_strength) < 0.04, (shape, frac)
        assert np.allclose(cfg.p_group(shape)[maj], cfg.bias_strength)
    assert {cfg.majority_group(s) for s in cfg.shapes} == {0, 1}  # every shape leans one way or the other
    t = world.test_split()
    assert len(t) == cfg.test_size
    for si in range(len(cfg.shapes)):
        assert abs(t.groups[t.labels["shape"] == si].mean() - 0.5) < 0.12
    # other factors are uniform and independent of the group in training
    for f in FACTORS:
        counts = np.bincount(labels[f], minlength=len(cfg.values(f))) / len(groups)
        assert np.all(np.abs(counts - 1 / len(cfg.values(f))) < 0.03)
    if group_size > 1:  # minimal pairs: each variant differs from its group's base in exactly one factor
        F = np.stack([parts[0].labels[f] for f in FACTORS], axis=1).reshape(-1, 8, len(FACTORS))
        assert ((F[:, 1:] != F[:, :1]).sum(axis=2) == 1).all()
        # ... and keeps the base's group marker unless its shape changed
        G = parts[0].groups.reshape(-1, 8)
        kept = F[:, 1:, 1] == F[:, :1, 1]
        assert (G[:, 1:] == G[:, :1])[kept].all()
    unbiased = ToyWorld(WorldConfig(bias_strength=0.5))
    ub = next(unbiased.iter_train(4000, group_size=group_size, captions="free"))
    assert abs(ub.groups.mean() - 0.5) < 0.03


def test_bias_probe_is_balanced_and_counterfactual():
    w = ToyWorld(SMALL)
    p = w.bias_probe()
    n = SMALL.probe_scenes
    assert p.images.shape == (2 * n, 32, 32, 3)
    assert np.bincount(p.groups).tolist() == [n, n]
    assert np.array_equal(p.scene_ids[:n], p.scene_ids[n:])
    for f in FACTORS:
        assert np.array_equal(p.labels[f][:n], p.labels[f][n:])
    _, marker = w.masks(w.probe_scenes())
    diff = np.any(p.images[:n] != p.images[n:], axis=-1)
    assert diff.any(axis=(1, 2)).all()  # every pair differs (the marker is visible)
    assert not (diff & ~marker[:n]).any()  # ... and only in the marker pixels
    assert set(p.queries) == set(SMALL.shapes)
    assert p.queries["star"] == ["a star", "a photo of a star", "a picture of a star", "an image of a star"]
    assert set(p.majority_group.values()) == {0, 1}


def test_zeroshot_tasks_cover_every_factor():
    tasks = ToyWorld(SMALL).zeroshot_tasks()
    assert [t.name for t in tasks] == list(FACTORS)
    for t in tasks:
        assert len(t.images) == SMALL.test_size and len(t.labels) == SMALL.test_size
        assert t.labels.min() >= 0 and t.labels.max() < len(t.classnames)
        assert len(np.unique(t.labels)) == len(t.classnames)
        assert all("{}" in tpl for tpl in t.templates)


def test_pool_and_taxonomy():
    pool = toy_pool()
    truth = toy_pool_concepts()
    tax = toy_taxonomy()
    assert set(tax["concepts"]) == {*FACTOR_CONCEPTS.values(), "outlines"}
    assert len(pool) == len(set(pool)) >= 100
    for concept in (*FACTOR_CONCEPTS.values(), "outlines"):
        share = sum(truth[line] == concept for line in pool) / len(pool)
        assert share >= 0.10, (concept, share)
    concepts_of = LexiconJudge(tax).concepts_of
    for line in pool:
        found = concepts_of(line)
        if truth[line] is None:
            assert found == set(), line
        else:  # the concept it was written for; a background line may also name a color or texture
            assert truth[line] in found and found <= {truth[line], "colors", "textures"}, line
    # a text is about every concept it names: no concept hides another
    assert concepts_of("on a blue background") == {"backgrounds", "colors"}
    assert concepts_of("a red square on a green background") == {"colors", "shapes", "backgrounds"}
    cfg = WorldConfig()
    for f, concept in FACTOR_CONCEPTS.items():
        for v in cfg.values(f):
            assert concept in concepts_of(f"{v} background" if f == "background" else v), (f, v)


def test_write_png_folder(tmp_path):
    from PIL import Image

    w = ToyWorld(SMALL)
    out = w.write_png_folder(tmp_path / "pngs", 12, split="test")
    rows = list(csv.DictReader(open(out / "labels.csv", encoding="utf-8")))
    assert len(rows) == 12 and set(rows[0]) == {"path", *FACTORS, "group", "caption"}
    b = w.sample(12, "test")
    for i, r in enumerate(rows):
        im = np.asarray(Image.open(out / r["path"]))
        assert np.array_equal(im, b.images[i])
        assert r["shape"] == SMALL.shapes[b.labels["shape"][i]] and r["group"] in SMALL.groups
    with pytest.raises(PreconditionFailed):
        w.write_png_folder(tmp_path / "pngs", 3)
    w.write_png_folder(tmp_path / "pngs", 3, split="probe", force=True)
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 2  # 1 scene x 2 groups
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionDenied):
        w.write_png_folder(tmp_path / "file" / "sub", 3)
    with pytest.raises(InvalidInput):
        w.write_png_folder(tmp_path / "zero", 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "pngs"]  # no temp folders left


def test_bad_world_config():
    with pytest.raises(InvalidInput):
        WorldConfig(shapes=("circle", "blob"))
    with pytest.raises(InvalidInput):
        WorldConfig(bias_strength=1.5)
    with pytest.raises(InvalidInput):
        ToyWorld(SMALL).sample(3, split="nope")


# ---- training ---------------------------------------------------------------------------------------


def _tiny_train_cfg(steps=2):
    from surgeon.studies.toy_train import TrainConfig

    return TrainConfig(
        world=SMALL, model=tiny_toy_model_cfg(), steps=steps, batch_size=8, warmup_steps=1, quiet_steps=1
    )


def test_train_writes_loadable_local_dir(tmp_path):
    import open_clip
    import torch
    from PIL import Image

    from surgeon.studies.toy_train import TOY_MEAN, TOY_STD, TrainConfig, train
    from surgeon.validation.zeroshot import uint8_to_tensor

    cfg = _tiny_train_cfg()
    r = train(cfg, tmp_path / "m", progress=False)
    assert r["steps"] == 2 and set(r["zeroshot"]) == {*FACTORS, "mean"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"open_clip_config.json", "open_clip_model.safetensors"} <= files
    meta = json.loads((tmp_path / "m" / "open_clip_config.json").read_text())
    assert meta["preprocess_cfg"]["size"] == 32 and meta["surgeon_toy"]["train_config"]["steps"] == 2
    assert TrainConfig.from_json(meta["surgeon_toy"]["train_config"]) == cfg
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'm'}")
    tok = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'm'}")
    model.eval()
    im = ToyWorld(SMALL).sample(4).images
    x = torch.stack([preprocess(Image.fromarray(a)) for a in im])
    assert torch.allclose(x, uint8_to_tensor(im, TOY_MEAN, TOY_STD), atol=1e-5)
    with torch.no_grad():
        assert model.encode_image(x).shape == (4, 16)
        assert model.encode_text(tok(["a red star"])).shape == (1, 16)
    # same config and seed -> same weights
    train(cfg, tmp_path / "m2", progress=False)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "m" / "open_clip_model.safetensors")
    b = load_file(tmp_path / "m2" / "open_clip_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_refuses_bad_input(tmp_path):
    from dataclasses import replace

    from surgeon.studies.toy_train import train

    cfg = _tiny_train_cfg()
    with pytest.raises(InvalidInput):
        train(replace(cfg, steps=0), tmp_path / "a", progress=False)
    with pytest.raises(InvalidInput):
        train(replace(cfg, steps=-5), tmp_path / "a", progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(PreconditionFailed):
        train(cfg, tmp_path / "exists", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionDenied):
        train(cfg, tmp_path / "file" / "model", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "file"]


def test_interrupted_training_leaves_nothing(tmp_path, monkeypatch):
    import surgeon.studies.toy_train as tr

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "save_model_folder", boom)
    with pytest.raises(KeyboardInterrupt):
        tr.train(_tiny_train_cfg(steps=1), tmp_path / "m", progress=False)
    assert list(tmp_path.iterdir()) == []


class _Cancelled(Exception):
    pass


class _Recorder:
    """An Observer (surgeon.core.progress) that keeps every step and cancels at the `cancel_at`-th check."""

    def __init__(self, cancel_at: int | None = None):
        self.steps: list[tuple[str, int, int | None]] = []
        self.checks = 0
        self.cancel_at = cancel_at

    def step(self, stage: str, done: int, total: int | None) -> None:
        self.steps.append((stage, done, total))

    def check(self) -> None:
        self.checks += 1
        if self.checks == self.cancel_at:
            raise _Cancelled


def test_training_reports_each_step_then_the_evaluation(tmp_path):
    from surgeon.core.progress import observed
    from surgeon.studies.toy_train import train

    recorder = _Recorder()
    with observed(recorder):
        train(_tiny_train_cfg(), tmp_path / "m", progress=False)
    assert [s for s in recorder.steps if s[0] == "toy train"] == [("toy train", n, 2) for n in range(3)]
    assert recorder.steps.index(("toy train", 2, 2)) < recorder.steps.index(("toy evaluation", 0, None))
    assert recorder.checks >= 2


def test_cancelled_training_stops_at_the_next_step_and_leaves_nothing(tmp_path):
    from surgeon.core.progress import observed
    from surgeon.studies.toy_train import train

    recorder = _Recorder(cancel_at=2)
    with observed(recorder), pytest.raises(_Cancelled):
        train(_tiny_train_cfg(steps=5), tmp_path / "m", progress=False)
    assert recorder.steps[-1] == ("toy train", 1, 5)
    assert list(tmp_path.iterdir()) == []


def test_default_model_fits_size_budget():
    import torch

    from surgeon.studies.toy_train import TrainConfig, build_model

    cfg = TrainConfig()
    model = build_model(cfg.model_cfg())
    nbytes = sum(
        t.numel() * (2 if cfg.save_dtype == "float16" else 4)
        for t in model.state_dict().values()
        if isinstance(t, torch.Tensor)
    )
    assert nbytes <= 40e6
    assert cfg.model_cfg()["vision_cfg"]["image_size"] == cfg.world.image_size


def test_render_speed_is_enough_for_training():
    import time

    w = ToyWorld(WorldConfig())
    it = w.iter_batches(512)
    next(it)
    t = time.perf_counter()
    for _ in range(3):
        next(it)
    rate = 3 * 512 / (time.perf_counter() - t)
    assert rate > 1500, rate  # ≥ 3000/s on an idle core; leave room for a busy CI machine


def test_module_level_helpers():
    # module-level helpers use the default world
    from surgeon.inputs.toy import toy_images, zeroshot_tasks

    assert toy_images(3).shape == (3, 48, 48, 3)
    assert len(zeroshot_tasks(n=10)) == len(FACTORS)
