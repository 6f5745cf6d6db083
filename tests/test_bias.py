"""Bias metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from surgeon.bias import bias_metrics, desired_distribution, ndkl, skews_at_k
from surgeon.errors import InvalidInput


def test_skew_values_by_hand():
    target = np.array([0.5, 0.5])
    skews = skews_at_k([0] * 8 + [1] * 2, 10, target)
    assert skews[0] == pytest.approx(math.log(0.8 / 0.5))
    assert skews[1] == pytest.approx(math.log(0.2 / 0.5))
    balanced = skews_at_k([0, 1] * 5, 10, target)
    assert np.allclose(balanced, 0)
    absent = skews_at_k([0] * 10, 10, target)  # absent group counted as 1/k
    assert absent[1] == pytest.approx(math.log(0.1 / 0.5))


def test_ndkl_by_hand_and_ordering():
    target = np.array([0.5, 0.5])
    # top-1 = [1, 0] -> KL = ln 2 (weight 1); top-2 balanced -> 0 (weight 1/log2 3)
    assert ndkl([0, 1], target) == pytest.approx(math.log(2) / (1 + 1 / math.log2(3)))
    assert ndkl([0, 1, 1, 0] * 4, target) < ndkl([0] * 8 + [1] * 8, target)
    assert ndkl([0] * 8 + [1] * 8, target) > 0.3


def test_bias_metrics_from_similarities():
    groups = [0] * 10 + [1] * 10
    sim = np.array([[1.0] * 10 + [0.0] * 10, [0.0, 1.0] * 10])  # query 0 prefers group 0 entirely
    metrics = bias_metrics(sim, groups, 2, k=10)
    per_query = metrics["max_skew@10_per_query"]
    assert per_query[0] == pytest.approx(math.log(2))
    assert per_query[1] == pytest.approx(0.0, abs=1e-9)
    assert metrics["max_skew@10"] == pytest.approx(math.log(2) / 2)
    # the direction: query 0's top 10 is all group 0; query 1 alternates between the groups
    assert metrics["group_share@10_per_query"] == [[1.0, 0.0], [0.5, 0.5]]


def test_desired_distribution_and_errors():
    assert np.allclose(desired_distribution([0, 0, 0, 1], 2, "set"), [0.75, 0.25])
    with pytest.raises(InvalidInput):
        desired_distribution([0], 2, "magic")
    with pytest.raises(InvalidInput):
        skews_at_k([0, 1], 5, np.array([0.5, 0.5]))
    with pytest.raises(InvalidInput):
        bias_metrics(np.zeros((1, 0)), [], 2)
