"""The offline judges and the bundled general pool + taxonomy they are used with on real CLIPs."""

from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch

import surgeon
import surgeon.ranking.judges  # noqa: F401  (registers the judges)
from surgeon.core.errors import InvalidInput
from surgeon.ranking.judges.base import JUDGES, JudgeContext
from surgeon.ranking.judges.embedding import EmbeddingJudge
from surgeon.ranking.judges.lexicon import LexiconJudge, tokenize

DATA = Path(surgeon.__file__).parent / "data"


@pytest.fixture(scope="module")
def pool() -> list[str]:
    return (DATA / "pools" / "general.txt").read_text(encoding="utf-8").split("\n")[:-1]


@pytest.fixture(scope="module")
def taxonomy() -> dict:
    return json.loads((DATA / "taxonomies" / "general.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def lexicon(taxonomy) -> LexiconJudge:
    return JUDGES.get("lexicon")(JudgeContext(taxonomy=taxonomy))


@pytest.fixture(scope="module")
def pool_sets(pool, lexicon) -> list[frozenset[str]]:
    return [lexicon.concepts_of(line) for line in pool]


def tiny(**concepts: list[str]) -> dict:
    return {
        "version": 1,
        "concepts": {name.replace("_", " "): {"description": name, "terms": terms} for name, terms in concepts.items()},
    }


# --- the bundled pool and taxonomy -------------------------------------------------------------------


def test_pool_is_large_unique_and_clean(pool):
    raw = (DATA / "pools" / "general.txt").read_bytes()
    assert raw.endswith(b"\n") and b"\r" not in raw
    assert len(pool) >= 2000
    assert all(line and line == line.strip() for line in pool), "blank or padded lines"
    assert len(set(pool)) == len(pool), "duplicate lines"
    assert len({line.lower() for line in pool}) == len(pool), "lines differing only in case"


def test_taxonomy_format(taxonomy):
    assert taxonomy["version"] == 1
    concepts = taxonomy["concepts"]
    assert len(concepts) >= 20
    for name, spec in concepts.items():
        assert name == name.lower() and name != "none"
        assert set(spec) == {"description", "terms"}
        assert isinstance(spec["description"], str) and spec["description"].endswith(".")
        assert spec["terms"] and all(t == t.lower() and t.strip() == t for t in spec["terms"])
        assert len(set(spec["terms"])) == len(spec["terms"])
    for expected in (
        "colors",
        "locations",
        "animals",
        "objects",
        "counting",
        "letters",
        "textures",
        "shapes",
        "people",
        "professions",
        "body parts",
        "materials",
        "landscapes",
    ):
        assert expected in concepts


def test_every_concept_covers_many_pool_lines(taxonomy, pool_sets):
    cover = Counter(c for s in pool_sets for c in s)
    thin = {c: cover[c] for c in taxonomy["concepts"] if cover[c] < 60}
    assert not thin, f"concepts with < 60 pool lines: {thin}"


def test_pool_lines_mostly_name_one_concept(pool, pool_sets):
    single = sum(len(s) == 1 for s in pool_sets)
    bad = [(line, sorted(s)) for line, s in zip(pool, pool_sets, strict=True) if len(s) != 1]
    assert single / len(pool) >= 0.95, bad[:20]


# --- lexicon judge -----------------------------------------------------------------------------------


def test_lexicon_consistent_head_scores_five(pool, pool_sets, lexicon):
    animals = [line for line, s in zip(pool, pool_sets, strict=True) if s == {"animals"}][:5]
    typed = [
        "A tabby cat asleep",
        "A pack of wolves",
        "A photo of a golden retriever",
        "A sleepy kitten",
        "Penguins huddled together",
    ]
    got = lexicon.judge([animals, typed])
    assert [(j.label, j.ccs) for j in got] == [("animals", 5), ("animals", 5)]
    assert got[0].verdicts == (True,) * 5


def test_lexicon_mixed_head_scores_low_and_is_deterministic(taxonomy, lexicon):
    mixed = [
        "A bright splash of crimson",
        "A fire truck in motion",
        "A plate of spaghetti",
        "A tiger on the prowl",
        "Heavy snowfall overnight",
    ]
    assert [sorted(lexicon.concepts_of(t)) for t in mixed] == [
        ["colors"],
        ["vehicles"],
        ["food"],
        ["animals"],
        ["weather"],
    ]
    first = lexicon.judge([mixed])[0]
    # every concept is seen once: a five-way tie, broken by the earliest text (TextSpan's strongest), CCS 1
    assert (first.label, first.ccs, first.verdicts) == ("colors", 1, (True, False, False, False, False))
    fresh = LexiconJudge(taxonomy)
    assert fresh.judge([mixed, list(reversed(mixed))]) == [first, lexicon.judge([list(reversed(mixed))])[0]]


def test_lexicon_label_is_the_majority_concept(lexicon):
    head = [
        "The letter Q in bold type",
        "A capital letter B",
        "Handwritten text on a note",
        "The digit 7",
        "A plate of sushi",
    ]
    j = lexicon.judge([head])[0]
    assert (j.label, j.verdicts) == ("letters", (True, True, True, False, False))


def test_lexicon_no_match_is_none(lexicon):
    j = lexicon.judge([["qwerty zxcv", "lorem ipsum"], []])
    assert (j[0].label, j[0].verdicts, j[0].ccs) == ("none", (False, False), 0)
    assert (j[1].label, j[1].verdicts) == ("none", ())


def test_a_text_is_about_every_concept_it_names():
    judge = LexiconJudge(
        tiny(
            colors=["red", "green", "black"],
            shapes=["square"],
            backgrounds=["background"],
            vehicles=["car"],
            photo_styles=["black and white"],
        )
    )
    assert judge.concepts_of("a red square on a green background") == {"colors", "shapes", "backgrounds"}
    assert judge.concepts_of("A black and white photo of a red car") == {"photo styles", "colors", "vehicles"}
    # "on a green background" counts for colors too: a colors head keeps it as consistent
    head = judge.judge([["a red kite", "green", "on a green background", "a car", "a square"]])[0]
    assert (head.label, head.ccs, head.verdicts) == ("colors", 3, (True, True, True, False, False))


def test_label_ties_break_by_evidence_and_label_verdicts_and_ccs_agree():
    judge = LexiconJudge(tiny(textures=["striped", "dotted"], colors=["red", "blue"], shapes=["circle"]))
    # the L0.H0 case: 2 texture texts, 2 color texts, 1 other; was the tie "colors|textures", CCS 2 with 4
    # texts marked consistent. Now the concept of the earliest separating text, its texts alone consistent
    l0h0 = ["a striped object", "red", "dotted", "a blue thing", "a circle"]
    got = judge.judge([l0h0])[0]
    assert (got.label, got.ccs, got.verdicts) == ("textures", 2, (True, False, True, False, False))
    assert judge.judge([["red", "a striped object", "dotted", "a blue thing"]])[0].label == "colors"
    # spelling never decides while a text tells the concepts apart
    renamed = LexiconJudge(tiny(a_pattern=["striped", "dotted"], z_hue=["red", "blue"], shapes=["circle"]))
    assert renamed.judge([l0h0])[0].label == "a pattern"
    assert renamed.judge([["red", "a striped object", "dotted", "a blue thing"]])[0].label == "z hue"
    # a clear majority is no tie, and a text about both tied concepts counts once for each
    assert judge.judge([["red", "blue", "dotted", "a circle"]])[0].label == "colors"
    both = judge.judge([["a red striped thing", "red", "dotted"]])[0]
    assert (both.label, both.ccs, both.verdicts) == ("colors", 2, (True, True, False))


def test_nested_ties_go_to_the_more_specific_concept():
    # every background line names a colour (the toy pool): a head of background lines ties backgrounds with
    # colors on every text; colors is about more of the texts judged together, so backgrounds is the label
    judge = LexiconJudge(tiny(colors=["red", "blue", "green"], backgrounds=["background"], shapes=["square"]))
    background_head = ["on a red background", "on a blue background", "a square"]
    colour_head = ["red", "a green square", "blue"]
    got = judge.judge([background_head, colour_head])
    assert [(j.label, j.ccs) for j in got] == [("backgrounds", 2), ("colors", 3)]
    assert all(j.ccs == sum(j.verdicts) for j in got)
    # judged alone the two are equally frequent: the name decides, and only then
    assert judge.judge([background_head])[0].label == "backgrounds"
    swapped = LexiconJudge(tiny(a_colour=["red", "blue"], z_background=["background"]))
    assert swapped.judge([background_head])[0].label == "a colour"
    assert swapped.judge([background_head, colour_head])[0].label == "z background"


def test_plural_folding_and_word_matching():
    judge = LexiconJudge(
        tiny(
            things=["car", "box", "berry", "shoe", "bus", "tomato", "cafe"],
            places=["andes"],
            clothing=["shorts"],
            sports=["ice hockey"],
        )
    )
    for text in [
        "Two cars",
        "Boxes!",
        "wild berries",
        "old shoes",
        "city buses",
        "ripe tomatoes",
        "A CAR",
        "a car's wheel",
        "A Parisian café",
    ]:
        assert judge.concepts_of(text) == {"things"}, text
    for text in ["and then", "a short walk", "a category", "carpet", "ice on the hockey rink"]:
        assert judge.concepts_of(text) == frozenset(), text
    assert judge.concepts_of("the Andes") == {"places"}
    assert judge.concepts_of("an ice-hockey match") == {"sports"}
    assert tokenize("Bird's-eye view, São Paulo!") == ["birds", "eye", "view", "sao", "paulo"]


@pytest.mark.parametrize(
    "taxonomy",
    [
        {},
        {"concepts": {}},
        {"concepts": {"a": {"terms": "red"}}},
        {"concepts": {"none": {"terms": ["red"]}}},
        {"concepts": {"a": {"terms": ["!!"]}}},
    ],
)
def test_lexicon_rejects_bad_taxonomies(taxonomy):
    with pytest.raises(InvalidInput):
        LexiconJudge(taxonomy)


# --- embedding judge ---------------------------------------------------------------------------------

DIM = 512


class BagOfWords:
    """Deterministic stand-in for a text tower: hashed bag of words, so shared words mean closeness."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        out = torch.zeros(len(texts), DIM)
        for i, text in enumerate(texts):
            for word in tokenize(text):
                out[i, zlib.crc32(word.encode()) % DIM] += 1.0
        return torch.nn.functional.normalize(out, dim=-1)


EMB_TAXONOMY = tiny(
    animals=["cat", "dog", "horse", "cow", "tiger"],
    vehicles=["car", "bus", "train", "truck", "boat"],
    food=["pizza", "bread", "apple", "cheese", "soup"],
)


def test_embedding_judge_labels_a_clear_head():
    encoder = BagOfWords()
    judge = JUDGES.get("embedding")(JudgeContext(taxonomy=EMB_TAXONOMY, encode_text=encoder))
    clear = ["cat sleeping", "dog barking", "horse", "tiger resting", "cow grazing"]
    mixed = ["cat", "dog", "horse", "car", "pizza"]
    got = judge.judge([clear, mixed, ["train", "bus", "boat"]])
    assert [(j.label, j.ccs) for j in got] == [("animals", 5), ("animals", 3), ("vehicles", 3)]
    assert got[1].verdicts == (True, True, True, False, False)
    judge.judge([["soup"]])
    # concept prompts are encoded once and reused; the texts of all heads go in one batch per call
    prompt_calls = [c for c in encoder.calls if c == judge.prompts]
    assert len(prompt_calls) == 1 and len(encoder.calls) == 3
    assert judge.judge([["bread", "apple", "cheese"], []]) == [
        judge.judge([["bread", "apple", "cheese"]])[0],
        judge.judge([[]])[0],
    ]
    assert judge.judge([[]])[0].label == "none"


def test_embedding_prompts_name_the_concept_and_terms():
    judge = EmbeddingJudge(EMB_TAXONOMY, BagOfWords())
    assert judge.concepts == ["animals", "food", "vehicles"]
    assert judge.prompts[0].startswith("a photo about animals: cat, dog, horse")


def test_embedding_judge_needs_an_encoder():
    with pytest.raises(InvalidInput, match="encode_text"):
        JUDGES.get("embedding")(JudgeContext(taxonomy=EMB_TAXONOMY))


def test_embedding_judge_rejects_a_wrong_shape():
    judge = EmbeddingJudge(EMB_TAXONOMY, lambda texts: torch.zeros(len(texts) + 1, 4))
    with pytest.raises(InvalidInput, match="shape"):
        judge.judge([["cat"]])
