"""Zero-shot classification (docs/METHOD.md §4): classifier construction and metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from surgeon.core.errors import InvalidInput
from surgeon.validation.zeroshot import build_classifier, metrics_from_logits, uint8_to_tensor
from tests.conftest import tiny_toy_model_cfg

CLASSES = ["circle", "square", "star", "heart"]
TEMPLATES = ["a {}", "a photo of a {}"]


class OneHotModel(torch.nn.Module):
    """encode_image: one-hot of the class stored in pixel [0, 0, 0]; encode_text: one-hot of the class
    named in the prompt (the fake tokenizer below puts its index in position 0)."""

    def __init__(self, n_classes):
        super().__init__()
        self.n = n_classes
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, x):
        return F.one_hot(x[:, 0, 0, 0].round().long(), self.n).float() * 3.0

    def encode_text(self, tok):
        return F.one_hot(tok[:, 0], self.n).float() + 0.1 * tok[:, 1:2].float()


def fake_tokenizer(texts):
    rows = []
    for t in texts:
        cls = next(i for i, c in enumerate(CLASSES) if c in t)
        rows.append([cls, len(t) % 3])
    return torch.tensor(rows)


@torch.no_grad()
def evaluate(model, tokenizer, images, labels, classnames, templates) -> dict:
    """What validation does with a task: image embeddings against the class embeddings, then the metrics."""
    classifier = build_classifier(model, tokenizer, classnames, templates)
    logits = 100.0 * F.normalize(model.encode_image(images).float(), dim=-1) @ classifier.T
    return metrics_from_logits(logits, torch.as_tensor(np.asarray(labels)))


def test_build_classifier_is_normalised_mean_of_normalised_templates():
    m = OneHotModel(len(CLASSES))
    cls = build_classifier(m, fake_tokenizer, CLASSES, TEMPLATES, device="cpu")
    assert cls.shape == (len(CLASSES), len(CLASSES))
    assert torch.allclose(cls.norm(dim=-1), torch.ones(len(CLASSES)))
    tok = fake_tokenizer([t.format(CLASSES[2]) for t in TEMPLATES])
    expected = F.normalize(F.normalize(m.encode_text(tok), dim=-1).mean(0), dim=0)
    assert torch.allclose(cls[2], expected)
    with pytest.raises(InvalidInput):
        build_classifier(m, fake_tokenizer, [], TEMPLATES)
    with pytest.raises(InvalidInput):
        build_classifier(m, fake_tokenizer, CLASSES, [])


def test_perfect_classifier_scores_one():
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 2, 2])
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
    m = OneHotModel(len(CLASSES))
    r = evaluate(m, fake_tokenizer, images, labels, CLASSES, TEMPLATES)
    assert r["acc1"] == 1.0 and r["acc5"] == 1.0 and r["mean_per_class_recall"] == 1.0 and r["n"] == 10
    # a wrong label map scores zero top-1
    r = evaluate(m, fake_tokenizer, images, (labels + 1) % 4, CLASSES, TEMPLATES)
    assert r["acc1"] == 0.0 and r["mean_per_class_recall"] == 0.0


def test_metrics_from_logits():
    logits = torch.tensor([[3.0, 2, 1, 0, -1, -2], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    r = metrics_from_logits(logits, torch.tensor([0, 0, 5]))
    assert r["acc1"] == pytest.approx(1 / 3)
    assert r["acc5"] == pytest.approx(1 / 3)  # label 0 is 6th in row 2, label 5 is 6th in row 3
    assert r["mean_per_class_recall"] == pytest.approx((0.5 + 0.0) / 2)
    with pytest.raises(InvalidInput):
        metrics_from_logits(logits, torch.tensor([0, 1]))
    with pytest.raises(InvalidInput):
        metrics_from_logits(logits, torch.tensor([0, 1, 9]))


def test_random_init_open_clip_model_gives_metrics_in_range():
    from surgeon.inputs.toy.world import ToyWorld, WorldConfig
    from surgeon.studies.toy_train import TOY_MEAN, TOY_STD, build_model, get_tokenizer

    cfg = tiny_toy_model_cfg()
    model = build_model(cfg).eval()
    tok = get_tokenizer(cfg)
    task = ToyWorld(WorldConfig(image_size=32, test_size=40)).zeroshot_tasks()[1]
    x = uint8_to_tensor(task.images, TOY_MEAN, TOY_STD)
    r = evaluate(model, tok, x, task.labels, task.classnames, task.templates)
    assert 0.0 <= r["acc1"] <= r["acc5"] <= 1.0 and 0.0 <= r["mean_per_class_recall"] <= 1.0
    assert r["n"] == len(task.labels)


def test_uint8_to_tensor():
    im = np.full((2, 4, 4, 3), 255, np.uint8)
    x = uint8_to_tensor(im, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert x.shape == (2, 3, 4, 4) and torch.allclose(x, torch.full_like(x, 2.0))


def test_template_files_are_checked_when_read(tmp_path):
    """{} and {c} both name the class; anything else is one clear error, not a KeyError mid-validation."""
    from surgeon.core.errors import InvalidInput
    from surgeon.inputs.templates import DEFAULT_TEMPLATES, read_templates

    good = tmp_path / "good.txt"
    good.write_text("a photo of {c}.\na {} in {{braces}}\n")
    assert read_templates(good) == ["a photo of {c}.", "a {} in {{braces}}"]
    assert read_templates(None) == list(DEFAULT_TEMPLATES)
    for text, message in [("a photo of {x}\n", "cannot be filled"), ("a photo\n", "no {} or {c}")]:
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(InvalidInput, match=message.replace("{", r"\{").replace("}", r"\}")):
            read_templates(bad)


@pytest.mark.parametrize(
    "template",
    ["a photo of {c.__class__.__name__}", "a {c.upper}", "a {c[0]}", "a {c:>300000000}", "a {!r}", "{0}", "{} {c}"],
)
def test_templates_name_the_class_only_through_bare_fields(tmp_path, template):
    """str.format runs attribute and index lookups and format specs: a template could drop the class name
    ({c[0]}, {c.upper}: a method's repr, another each run) or allocate at will ({c:>300000000})."""
    from surgeon.inputs.templates import read_templates

    bad = tmp_path / "bad.txt"
    bad.write_text(template + "\n")
    with pytest.raises(InvalidInput, match="is not|mixes"):
        read_templates(bad)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30), st.text(min_size=1, max_size=12))
def test_an_accepted_template_holds_the_label_and_little_else(template, label):
    """Whatever line a user's file holds, an accepted template fills to the label plus the template's text."""
    from surgeon.inputs.templates import check_templates, fill

    try:
        check_templates([template])
    except InvalidInput:
        return
    filled = fill(template, label)
    assert len(filled) <= len(template) + template.count("{") * len(label)
    if "{}" in template or "{c}" in template:
        assert label in filled
