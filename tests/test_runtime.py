"""Torch-free serving (surgeon.runtime): parity with open_clip and the PyTorch model, bad input, and no torch
import on the inference path. The export folders are built here from a tiny random-init open_clip CLIP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import open_clip
import pytest
import torch
import torch.nn.functional as F
import typer
from open_clip.tokenizer import SimpleTokenizer, default_bpe
from open_clip.transform import image_transform
from PIL import Image
from typer.testing import CliRunner

from surgeon.core.errors import CorruptInput, InvalidInput, NotFound, PreconditionFailed
from surgeon.core.integrity import write_manifest
from surgeon.inputs import preprocess as pre
from surgeon.inputs.preprocess import PreprocessConfig, load_image
from surgeon.runtime.cli import infer
from surgeon.runtime.session import DEFAULT_TEMPLATES, ExportedModel, default_providers
from surgeon.runtime.tokenizer import ClipTokenizer

REPO = Path(__file__).resolve().parents[1]
LABELS = ["cat", "dog", "red car", "a tree", "the city of Paris"]
CONTEXT = 16
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PCFG = {
    "size": [32, 32],
    "mode": "RGB",
    "mean": list(OPENAI_MEAN),
    "std": list(OPENAI_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}


class _Visual(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.encode_image(pixel_values, normalize=True)


class _Text(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model.encode_text(input_ids, normalize=True)


class _Classifier(torch.nn.Module):
    def __init__(self, model, classes):
        super().__init__()
        self.model = model
        self.register_buffer("classes", classes.T.contiguous())

    def forward(self, pixel_values):
        return 100.0 * self.model.encode_image(pixel_values, normalize=True) @ self.classes


def _onnx(module, example, path: Path, input_name: str, output_name: str, meta: dict | None = None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter of the TorchScript exporter
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            opset_version=18,
            dynamo=False,
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        )
    if meta:
        proto = onnx.load(str(path))
        onnx.helper.set_model_props(proto, meta)
        onnx.save(proto, str(path))


@torch.no_grad()
def torch_class_embeddings(model, labels) -> torch.Tensor:
    tokenizer = SimpleTokenizer(context_length=CONTEXT)
    texts = [t.format(c) for c in labels for t in DEFAULT_TEMPLATES]
    emb = F.normalize(model.encode_text(tokenizer(texts)).float(), dim=-1)
    return F.normalize(emb.view(len(labels), len(DEFAULT_TEMPLATES), -1).mean(dim=1), dim=-1)


def _write_image(path: Path, height: int, width: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], -1)
    noise = rng.integers(0, 256, (height, width, 3))
    Image.fromarray((0.6 * smooth + 0.4 * noise).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("runtime-images")
    sizes = [(37, 53), (53, 37), (32, 32), (20, 90), (120, 45)]
    return [_write_image(folder / f"img{i}.png", h, w, i) for i, (h, w) in enumerate(sizes)]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(torch model, export dir with classifier, export dir without classifier)."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16},
        text_cfg={"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
    ).eval()
    root = tmp_path_factory.mktemp("runtime-export")
    target = root / "onnx"
    target.mkdir()
    pixels = torch.randn(2, 3, 32, 32)
    tokens = SimpleTokenizer(context_length=CONTEXT)(["a photo of a dog", "red"])
    _onnx(_Visual(model), pixels, target / "visual.onnx", "pixel_values", "image_embeds")
    _onnx(_Text(model), tokens, target / "text.onnx", "input_ids", "text_embeds")
    classes = torch_class_embeddings(model, LABELS)
    meta = {"labels": json.dumps(LABELS)}
    _onnx(_Classifier(model, classes), pixels, target / "classifier.onnx", "pixel_values", "logits", meta)
    (target / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    (target / "preprocess.json").write_text(json.dumps(PCFG), encoding="utf-8")
    vocab = Path(default_bpe())
    shutil.copy(vocab, target / vocab.name)
    spec = {"type": "clip-bpe", "context_length": CONTEXT, "vocab_file": vocab.name}
    (target / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")

    bare = tmp_path_factory.mktemp("runtime-bare")
    for path in target.iterdir():
        if path.name not in ("classifier.onnx", "labels.txt"):
            shutil.copy(path, bare / path.name)
    write_manifest(target)  # what the exporter writes last: the hashes ExportedModel checks
    write_manifest(bare)
    return model, root, bare


def torch_preprocess(cfg: dict):
    return image_transform(
        tuple(cfg["size"]),
        is_train=False,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        resize_mode=cfg["resize_mode"],
        interpolation=cfg["interpolation"],
        fill_color=cfg["fill_color"],
    )


@torch.no_grad()
def torch_image_embeds(model, paths) -> np.ndarray:
    transform = torch_preprocess(PCFG)
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    return model.encode_image(batch, normalize=True).numpy()


# ---- tokenizer -----------------------------------------------------------------------------------------

TEXTS = [
    "a photo of a dog",
    "",
    "   ",
    "Hello, World!!! ...",
    "it's a dog's life; they're here, we've done, I'm sure, you'll see, he'd go",
    "CAFÉ crème brûlée",
    "日本語のテキスト",
    "emoji 🐶🚀 test",
    "numbers 1234567 and 3.14",
    "&amp; html &lt;b&gt; entities &amp;amp;",
    "tabs\tand\nnewlines  and   spaces",
    "mojibake: cafÃ© dÃ©jÃ  vu",
    "UPPER lower MiXeD",
    "<start_of_text> inside <end_of_text> text",
    "hyphen-ated words_with_underscores @user #tag",
    "русский текст",
    "∑∫√ mathematical symbols",
    "zero\u200bwidth and no\u00a0break\u3000space",
    "a" * 300,
    " ".join(["word"] * 100),
    "the quick brown fox jumps over the lazy dog " * 10,
]


def test_tokenizer_matches_open_clip():
    reference = open_clip.get_tokenizer("ViT-B-32")
    ours = ClipTokenizer(default_bpe(), 77)
    expected = reference(TEXTS).numpy()
    got = ours(TEXTS)
    assert got.dtype == np.int64 and got.shape == (len(TEXTS), 77)
    np.testing.assert_array_equal(got, expected)
    short = SimpleTokenizer(context_length=CONTEXT)(TEXTS).numpy()
    np.testing.assert_array_equal(ours(TEXTS, context_length=CONTEXT), short)
    assert (short[:, -1][[18, 19, 20]] == ours.eot_id).all()  # truncated, <end_of_text> kept last
    np.testing.assert_array_equal(ours("a photo of a dog"), expected[:1])


def test_tokenizer_from_export(exported):
    _, root, _ = exported
    tokenizer = ExportedModel(root).tokenizer
    assert tokenizer.context_length == CONTEXT
    np.testing.assert_array_equal(tokenizer(TEXTS[:5]), SimpleTokenizer(context_length=CONTEXT)(TEXTS[:5]).numpy())


def test_tokenizer_bad_spec(tmp_path):
    spec = tmp_path / "tokenizer.json"
    spec.write_text(json.dumps({"type": "sentencepiece"}))
    with pytest.raises(CorruptInput, match="unsupported tokenizer"):
        ClipTokenizer.from_spec(spec)
    spec.write_text(json.dumps({"type": "clip-bpe", "context_length": 77, "vocab_file": "missing.txt.gz"}))
    with pytest.raises(NotFound, match="BPE vocabulary"):
        ClipTokenizer.from_spec(spec)


# ---- preprocessing ---------------------------------------------------------------------------------------

PREPROCESS_CASES = [
    {"size": [32, 32], "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0},
    {"size": [32, 32], "interpolation": "bilinear", "resize_mode": "shortest", "fill_color": 0},
    {"size": [24, 40], "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0},
    {"size": [40, 24], "interpolation": "bicubic", "resize_mode": "squash", "fill_color": 0},
    {"size": [32, 32], "interpolation": "bilinear", "resize_mode": "squash", "fill_color": 0},
    {"size": [32, 32], "interpolation": "bicubic", "resize_mode": "longest", "fill_color": 128},
]
ODD_SIZES = [(37, 53), (53, 37), (32, 32), (31, 33), (15, 9), (7, 200), (200, 7), (101, 57)]


@pytest.mark.parametrize("case", PREPROCESS_CASES, ids=lambda c: f"{c['resize_mode']}-{c['interpolation']}")
def test_preprocess_matches_open_clip(case, tmp_path):
    cfg = {**PCFG, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], **case}
    reference = torch_preprocess(cfg)
    ours = PreprocessConfig.from_dict(cfg)
    worst = 0.0
    for i, (h, w) in enumerate(ODD_SIZES):
        image = Image.open(_write_image(tmp_path / f"{i}.png", h, w, i)).convert("RGB")
        expected = reference(image).numpy()
        got = ours(image)
        assert got.shape == expected.shape == (3, *cfg["size"]) and got.dtype == np.float32
        worst = max(worst, float(np.abs(got - expected).max()))
    # torchvision resizes PIL images with PIL itself and normalises in float32, as we do: measured 0.0.
    assert worst <= 1e-6, worst


def test_preprocess_config_errors(tmp_path):
    with pytest.raises(CorruptInput, match="resize_mode"):
        PreprocessConfig.from_dict({"size": 32, "resize_mode": "zoom"})
    with pytest.raises(CorruptInput, match="interpolation"):
        PreprocessConfig.from_dict({"size": 32, "interpolation": "lanczos"})
    assert PreprocessConfig.from_dict({"size": 48}).size == (48, 48)
    bad = tmp_path / "preprocess.json"
    bad.write_text("{not json")
    with pytest.raises(CorruptInput, match="not valid JSON"):
        PreprocessConfig.from_file(bad)


def test_load_image_converts_odd_modes(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(rng.integers(0, 65536, (9, 11), dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.dstack([rgb, np.full((9, 11), 0, np.uint8)])).save(tmp_path / "clear.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.gif", transparency=0)
    Image.fromarray(rgb).convert("LA").save(tmp_path / "la.png")
    for name in ("cmyk.jpg", "grey.png", "deep.png", "clear.png", "palette.gif", "la.png"):
        image = load_image(tmp_path / name)
        assert image.mode == "RGB" and image.size == (11, 9), name
    assert (np.asarray(load_image(tmp_path / "clear.png")) == 255).all()  # fully transparent -> white
    deep = np.asarray(Image.open(tmp_path / "deep.png"), dtype=np.int64)
    assert np.abs(np.asarray(load_image(tmp_path / "deep.png"))[..., 0] - deep // 256).max() <= 1


def test_load_image_refuses_bombs_and_garbage(tmp_path, monkeypatch):
    path = _write_image(tmp_path / "big.png", 40, 50, 0)
    monkeypatch.setattr(pre, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(CorruptInput, match="decompression bomb"):
        load_image(path)
    (tmp_path / "junk.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(CorruptInput, match="junk.jpg"):
        load_image(tmp_path / "junk.jpg")
    with pytest.raises(NotFound, match="nowhere.png"):
        load_image(tmp_path / "nowhere.png")


def test_large_images_are_decoded_reduced_for_the_model(tmp_path):
    """JPEG draft mode and PNG reduce keep at least twice the model's input on each side, then the usual
    preprocessing follows; an image smaller than that is decoded whole, and the header alone gives the size."""
    config = PreprocessConfig(size=(32, 32))
    for name, size, expected in (
        ("big.jpg", (1000, 600), (125, 75)),
        ("big.png", (1000, 600), (112, 67)),
        ("small.png", (100, 60), (100, 60)),
    ):
        path = _write_image(tmp_path / name, size[1], size[0], 0)
        assert pre.header_size(path.read_bytes(), name) == size
        with open(path, "rb") as stream:
            reduced = pre.decode_image(stream, name, reduce_for=config.size)
        assert reduced.size == expected and reduced.mode == "RGB"
        full = config(load_image(path))
        assert np.abs(config(reduced) - full).mean() < (0.1 if name != "small.png" else 1e-12)


# ---- sessions --------------------------------------------------------------------------------------------


def test_providers_prefer_cuda(monkeypatch):
    import onnxruntime as ort

    preloads = []

    def preload():  # onnxruntime-gpu loads the CUDA libraries of the nvidia-* wheels (torch is never imported)
        preloads.append(1)
        raise OSError("libcudnn.so.9: cannot open shared object file")  # a failure only means: CPU

    monkeypatch.setattr(ort, "preload_dlls", preload, raising=False)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"] and preloads == [1]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", "CPUExecutionProvider"])
    assert default_providers() == ["CPUExecutionProvider"] and preloads == [1]


def test_encode_images_matches_torch(exported, images):
    model, root, _ = exported
    served = ExportedModel(root)
    assert served._sessions == {}  # lazy: nothing opened yet
    got = served.encode_images(images, batch_size=2)  # batches of 2, 2, 1
    expected = torch_image_embeds(model, images)
    assert got.shape == expected.shape == (len(images), 32)
    assert float(np.abs(got - expected).max()) <= 1e-4
    assert set(served._sessions) == {"visual"}
    assert served.active_providers == ["CPUExecutionProvider"]


def test_encode_texts_matches_torch(exported):
    model, root, _ = exported
    texts = ["a photo of a dog", "red", "", "the city of Paris at night " * 4]
    with torch.no_grad():
        expected = model.encode_text(SimpleTokenizer(context_length=CONTEXT)(texts), normalize=True).numpy()
    got = ExportedModel(root).encode_texts(texts, batch_size=3)
    assert float(np.abs(got - expected).max()) <= 1e-4


def test_classify_with_labels_matches_torch_zero_shot(exported, images):
    model, root, bare = exported
    expected = 100.0 * torch_image_embeds(model, images) @ torch_class_embeddings(model, LABELS).numpy().T
    for folder in (root, bare):  # labels work with or without a baked classifier
        served = ExportedModel(folder)
        logits, names = served.logits(images, LABELS, batch_size=3)
        assert names == LABELS
        assert float(np.abs(logits - expected).max()) <= 1e-3
        predictions = served.classify(images, LABELS, top_k=2, batch_size=3)
        assert [p.top[0].label for p in predictions] == [LABELS[i] for i in expected.argmax(1)]
        assert all(len(p.top) == 2 and p.top[0].logit >= p.top[1].logit for p in predictions)
        assert predictions[0].image == str(images[0])


def test_classify_with_baked_classifier(exported, images):
    model, root, _ = exported
    served = ExportedModel(root / "onnx")  # the onnx/ folder itself works too
    expected = 100.0 * torch_image_embeds(model, images) @ torch_class_embeddings(model, LABELS).numpy().T
    logits, names = served.logits(images)
    assert names == LABELS
    assert float(np.abs(logits - expected).max()) <= 1e-3
    predictions = served.classify(images, top_k=10)
    assert all(len(p.top) == len(LABELS) for p in predictions)  # top_k capped at the class count
    assert abs(sum(t.probability for t in predictions[0].top) - 1.0) < 1e-6
    assert [p.top[0].label for p in predictions] == [LABELS[i] for i in expected.argmax(1)]


def test_classifier_labels_fallback_to_labels_txt(exported, tmp_path):
    _, root, _ = exported
    shutil.copytree(root / "onnx", tmp_path / "onnx")
    proto = onnx.load(str(tmp_path / "onnx" / "classifier.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "onnx" / "classifier.onnx"))
    assert ExportedModel(tmp_path, verify=False).classifier_labels() == LABELS  # edited by hand: unverifiable
    (tmp_path / "onnx" / "labels.txt").unlink()
    with pytest.raises(CorruptInput, match="labels"):
        ExportedModel(tmp_path, verify=False).classifier_labels()


def test_missing_classifier_without_labels_is_clear(exported, images):
    _, _, bare = exported
    with pytest.raises(NotFound, match="classifier.onnx") as info:
        ExportedModel(bare).classify(images[:1])
    assert "--labels" in str(info.value)


def test_broken_image_is_named(exported, images, tmp_path):
    _, root, _ = exported
    broken = tmp_path / "broken.png"
    broken.write_bytes(images[0].read_bytes()[:60])  # truncated PNG
    with pytest.raises(CorruptInput, match="broken.png"):
        ExportedModel(root).classify([images[0], broken])


def test_bad_export_and_labels(exported, images, tmp_path):
    _, root, _ = exported
    with pytest.raises(NotFound, match="no ONNX export"):
        ExportedModel(tmp_path)
    with pytest.raises(NotFound, match="export folder not found"):
        ExportedModel(tmp_path / "absent")
    served = ExportedModel(root)
    with pytest.raises(InvalidInput, match="repeat"):
        served.classify(images[:1], ["cat", "cat"])
    with pytest.raises(InvalidInput, match="no class labels"):
        served.classify(images[:1], [])
    with pytest.raises(InvalidInput, match="top-k"):
        served.classify(images[:1], top_k=0)
    with pytest.raises(InvalidInput, match="batch size"):
        served.encode_images(images[:1], batch_size=0)
    (tmp_path / "visual.onnx").write_bytes(b"not a model")
    with pytest.raises(CorruptInput, match="onnxruntime"):
        ExportedModel(tmp_path, verify=False).session("visual")


# ---- command ---------------------------------------------------------------------------------------------


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(infer)
    return app


def test_infer_command_table_and_json(exported, images, tmp_path):
    _, root, bare = exported
    runner = CliRunner()
    result = runner.invoke(_app(), [str(root), str(images[0]), str(images[1]), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert "img0.png" in result.output and "classifier.onnx" in result.output

    labels = tmp_path / "labels.txt"
    labels.write_text("cat\n\ndog\nred car\n", encoding="utf-8")
    folder = images[0].parent
    result = runner.invoke(_app(), [str(bare), str(folder), "--labels", str(labels), "--json", "-k", "1"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["classes_from"] == "labels" and len(payload["predictions"]) == len(images)
    assert all(len(p["top"]) == 1 and p["top"][0]["label"] in ("cat", "dog", "red car") for p in payload["predictions"])

    result = runner.invoke(_app(), [str(bare), str(images[0])])
    assert isinstance(result.exception, NotFound) and "--labels" in str(result.exception)
    labels.write_text("cat\ncat\n", encoding="utf-8")
    result = runner.invoke(_app(), [str(root), str(images[0]), "--labels", str(labels)])
    assert isinstance(result.exception, InvalidInput)
    result = runner.invoke(_app(), [str(root), str(tmp_path / "missing.png")])
    assert isinstance(result.exception, NotFound) and "missing.png" in str(result.exception)


def test_in_memory_images_match_files(exported, images):
    _, _, bare = exported
    served = ExportedModel(bare)
    from_files, _ = served.logits(images, LABELS)
    from_memory, _ = served.logits([Image.open(p) for p in images], LABELS)
    assert np.array_equal(from_files, from_memory)
    named = served.classify([Image.open(images[0])], LABELS, image_names=["first"])
    assert named[0].image == "first"


def test_infer_defaults_to_the_newest_export_and_toy_images(exported, tmp_path, monkeypatch):
    _, root, bare = exported
    monkeypatch.setenv("SURGEON_EXPORTS_DIR", str(tmp_path / "exports"))
    runner = CliRunner()
    result = runner.invoke(_app(), [])
    assert isinstance(result.exception, NotFound) and "surgeon prune --export onnx" in result.exception.hint
    shutil.copytree(root, tmp_path / "exports" / "older")  # a run folder: its export is in onnx/
    shutil.copytree(bare, tmp_path / "exports" / "newer" / "onnx")
    os.utime(tmp_path / "exports" / "older" / "onnx" / "visual.onnx", (1e9, 1e9))  # copies keep their mtimes
    shutil.copytree(root, tmp_path / "exports" / ".run.tmp-123")  # another writer's unfinished output: skipped
    result = runner.invoke(_app(), ["--json", "-k", "1"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    shapes = ("circle", "square", "triangle", "cross", "star", "heart", "diamond", "moon")
    assert payload["export"] == str(tmp_path / "exports" / "newer" / "onnx")  # no classifier: toy shape names
    assert payload["classes_from"] == "labels" and len(payload["predictions"]) == 8
    assert all(p["image"].startswith("toy test #") and p["top"][0]["label"] in shapes for p in payload["predictions"])


def test_infer_without_onnxruntime_is_clear(exported, images, monkeypatch):
    _, root, _ = exported
    monkeypatch.delitem(sys.modules, "surgeon.runtime.session")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the onnx extra were not installed
    result = CliRunner().invoke(_app(), [str(root), str(images[0])])
    assert isinstance(result.exception, PreconditionFailed) and "onnxruntime" in str(result.exception)


def test_infer_never_imports_torch(exported, images, tmp_path):
    _, root, bare = exported
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    script = f"""
import json, sys
import typer
from typer.testing import CliRunner
from surgeon.runtime.cli import infer
assert "onnxruntime" not in sys.modules  # registering the command in the main CLI stays cheap
app = typer.Typer()
app.command()(infer)
runner = CliRunner()
images = {[str(p) for p in images]!r}
baked = runner.invoke(app, [{str(root)!r}, *images, "--json", "--batch-size", "2"])
assert baked.exit_code == 0, baked.output
zero_shot = runner.invoke(app, [{str(bare)!r}, *images, "--labels", {str(labels)!r}, "--json"])
assert zero_shot.exit_code == 0, zero_shot.output
toy = runner.invoke(app, [{str(bare)!r}, "--json"])  # no images: held-out toy images, in memory
assert toy.exit_code == 0 and len(json.loads(toy.stdout)["predictions"]) == 8, toy.output
top = [[p["top"][0]["label"] for p in json.loads(r.stdout)["predictions"]] for r in (baked, zero_shot)]
assert top[0] == top[1], top
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "open_clip"))
assert not heavy, heavy
print("OK", len(top[0]))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"OK {len(images)}" in done.stdout
