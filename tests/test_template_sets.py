"""Template sets by name (the paper's per-data-set prompts): from --templates, from the data set's own name
(folders and clip_benchmark exports), from study files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip.zero_shot_metadata
import pytest
from PIL import Image

from surgeon.api import ValidationSpec
from surgeon.core.errors import InvalidInput
from surgeon.inputs.templates import DEFAULT_TEMPLATES, named_templates, read_templates, template_set_names
from surgeon.studies.study import load_data, parse_study
from surgeon.validation.validate import build_suite


def test_the_paper_sets_and_their_sizes():
    sizes = {"cifar10": 18, "cifar100": 18, "pets": 18, "food101": 1, "country211": 5, "imagenet1k": 80}
    assert {name: len(named_templates(name) or []) for name in sizes} == sizes
    assert named_templates("imagenet-a") == named_templates("imagenet-r") == named_templates("ImageNet1k")
    # the 80 are open_clip's copy of OpenAI's ImageNet prompts, in order
    assert named_templates("imagenet1k") == [t("{}") for t in open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]
    assert named_templates("cifar10")[0] == "a photo of a {}." and named_templates("pets") == named_templates(
        "cifar100"
    )
    assert named_templates("food101") == ["a photo of {}, a type of food."]
    assert named_templates("wds/country211") == named_templates("wds_country211") == named_templates("country211")
    assert named_templates("neutral") == list(DEFAULT_TEMPLATES) and named_templates("mnist") is None
    assert "imagenet-r" in template_set_names()


def image_folder(root: Path, name: str) -> Path:
    folder = root / name
    for cls in ("Italy", "Japan"):
        (folder / cls).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(folder / cls / "a.png")
    return folder


def test_from_templates_option_and_from_the_data_sets_name(tmp_path):
    country = image_folder(tmp_path, "country211")
    assert build_suite(data=country).tasks[0].templates == named_templates("country211")  # by the folder's name
    other = image_folder(tmp_path, "my-photos")
    assert build_suite(data=other).tasks[0].templates == list(DEFAULT_TEMPLATES)
    assert build_suite(data=other, templates=Path("food101")).tasks[0].templates == named_templates("food101")
    spec = ValidationSpec(data=other, templates=Path("imagenet-a"))
    spec.check()
    assert len(spec.build(None).tasks[0].templates) == 80
    own = tmp_path / "sub" / "cifar10"  # a file named like a set, named by a longer path, is read as a file
    own.parent.mkdir()
    own.write_text("a {} photo\n")
    assert read_templates(own) == ["a {} photo"]
    with pytest.raises(InvalidInput, match="no {} or {c}"):
        build_suite(data=other, templates=_write(tmp_path / "bad.txt", "no placeholder\n"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_study_names_its_template_sets(tmp_path):
    image_folder(tmp_path, "flags")
    study_file = tmp_path / "study.toml"
    study_file.write_text(
        'name = "t"\n[[models]]\nname = "toy"\n[[policies]]\npolicy = "heads"\nheads = "L0.H0"\n'
        '[[data]]\nname = "Country-211"\npath = "flags"\ntemplates = "country211"\n'
    )
    study = parse_study(study_file)
    (data,) = study.data
    assert data.templates == "country211"
    assert load_data(data).tasks[0].templates == named_templates("country211")
