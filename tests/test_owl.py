"""OWL outlier ratios and block sparsities: hand cases, mean kept, range, monotone, official mapping."""
from __future__ import annotations

import pytest
import torch

from sdsonnx.prune.owl import outlier_ratio, owl_sparsities


def test_outlier_ratio_hand_case_pools_the_block():
    # pooled mean of [1]*8 + [10, 30] + [1]*10 is 3.0 (60 / 20); M=3 -> cut 9.0: 10 and 30 are outliers
    a = torch.tensor([[1.0] * 4 + [10.0], [1.0] * 4 + [30.0]])
    b = torch.ones(2, 5)
    assert outlier_ratio([a, b], 3.0) == pytest.approx(2 / 20)
    # per layer the answer would differ: a alone has mean 5.2, cut 15.6 -> only 30 counts
    assert outlier_ratio([a], 3.0) == pytest.approx(1 / 10)
    assert outlier_ratio([b], 0.5) == 1.0 and outlier_ratio([b], 1.0) == 0.0  # strictly above the cut


def test_outlier_ratio_rejects_empty():
    with pytest.raises(ValueError):
        outlier_ratio([], 5.0)


def test_matches_the_official_mapping_when_inside_the_range():
    ratios = [0.01, 0.02, 0.03, 0.04, 0.05]  # symmetric: official code gives s + lam * (1 - 2u)
    s, lam = 0.5, 0.08
    got = owl_sparsities(ratios, s, lam)
    assert got == pytest.approx([0.58, 0.54, 0.50, 0.46, 0.42], abs=1e-12)


@pytest.mark.parametrize("ratios", [[0.3, 0.01, 0.02, 0.015], [0.05, 0.05, 0.2], [0.1, 0.4, 0.2, 0.3, 0.9, 0.0]])
@pytest.mark.parametrize("s,lam", [(0.5, 0.08), (0.7, 0.08), (0.2, 0.15)])
def test_mean_range_and_monotone(ratios, s, lam):
    got = owl_sparsities(ratios, s, lam)
    assert sum(got) / len(got) == pytest.approx(s, abs=1e-12)
    assert all(s - lam - 1e-12 <= x <= s + lam + 1e-12 and 0 < x < 1 for x in got)
    assert max(got) - min(got) <= 2 * lam + 1e-12
    for i in range(len(ratios)):
        for j in range(len(ratios)):
            if ratios[i] > ratios[j]:
                assert got[i] < got[j]  # more outliers -> lower sparsity
            if ratios[i] == ratios[j]:
                assert got[i] == pytest.approx(got[j])


def test_skewed_ratios_are_narrowed_to_the_range():
    got = owl_sparsities([1.0, 0.0, 0.0, 0.0], 0.5, 0.08)  # official code: 0.5 - 0.12 for block 0
    assert got[0] == pytest.approx(0.42) and got[1] == pytest.approx(0.5 + 0.08 / 3)


def test_equal_ratios_and_bad_settings():
    assert owl_sparsities([0.1, 0.1], 0.6, 0.08) == [0.6, 0.6]
    with pytest.raises(ValueError):
        owl_sparsities([0.1, 0.2], 0.95, 0.08)
    with pytest.raises(ValueError):
        owl_sparsities([], 0.5, 0.08)
