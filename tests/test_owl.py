"""OWL outlier ratios and block sparsities: hand cases, mean kept, range, monotone, official mapping."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdsonnx.prune.owl import outlier_ratio, owl_sparsities


def official_port(ratios: list[float], sparsity_ratio: float, lamda: float) -> list[float]:
    """Literal port of luuyin/OWL lib/prune_all.py prune_wanda_outlier (ratios -> layer_sparsity_ratio)."""
    all_layer_ratio = np.array(ratios)
    all_layer_ratio = ((all_layer_ratio - all_layer_ratio.min()) * (1/(all_layer_ratio.max() - all_layer_ratio.min()) * lamda*2))
    all_layer_ratio = all_layer_ratio-np.mean(all_layer_ratio)+(1-sparsity_ratio)
    out = []
    for i in range(len(all_layer_ratio)):
        layer_sparsity_ratio = 1-all_layer_ratio[i]
        if layer_sparsity_ratio <= 0:
            layer_sparsity_ratio = 0.01
        out.append(layer_sparsity_ratio)
    return out


SKEWED = [0.3, 0.01, 0.02, 0.015]  # one block with many outliers: mean(u) ~ 0.26
SYMMETRIC = [0.01, 0.02, 0.03, 0.04, 0.05]  # mean(u) = 0.5


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


@pytest.mark.parametrize("mapping", ["official", "paper"])
def test_symmetric_profile_both_mappings_equal_the_official(mapping):
    s, lam = 0.5, 0.08  # mean(u) = 0.5: official code gives s + lam * (1 - 2u), and the paper mapping agrees
    got = owl_sparsities(SYMMETRIC, s, lam, mapping=mapping)
    assert got == pytest.approx([0.58, 0.54, 0.50, 0.46, 0.42], abs=1e-12)
    assert got == pytest.approx(official_port(SYMMETRIC, s, lam), abs=1e-12)


@pytest.mark.parametrize("ratios", [SKEWED, SYMMETRIC, [1.0, 0.0, 0.0, 0.0], [0.05, 0.05, 0.2],
                                    [0.1, 0.4, 0.2, 0.3, 0.9, 0.0], [0.0, 0.9, 1.0, 0.95]])
@pytest.mark.parametrize("s,lam", [(0.5, 0.08), (0.7, 0.08), (0.2, 0.15), (0.1, 0.09)])
def test_default_is_the_official_port(ratios, s, lam):
    got = owl_sparsities(ratios, s, lam)
    assert got == pytest.approx(official_port(ratios, s, lam), abs=1e-12)
    assert max(got) - min(got) == pytest.approx(2 * lam, abs=1e-12) or min(got) == 0.01  # spread exactly 2 lam


def test_official_hand_case_leaves_the_paper_range():
    # u = [1, 0, 0, 0], mean(u) = 0.25: s_i = 0.5 + 0.16 * (0.25 - u_i) -> 0.38 and 0.54 (outside 0.5 +- 0.08)
    assert owl_sparsities([1.0, 0.0, 0.0, 0.0], 0.5, 0.08) == pytest.approx([0.38, 0.54, 0.54, 0.54], abs=1e-12)
    # s = 0.1, lam = 0.09: block 0 would get 0.1 - 0.135 < 0; the official code sets it to 0.01 (mean then moves)
    assert owl_sparsities([1.0, 0.0, 0.0, 0.0], 0.1, 0.09)[0] == 0.01


def test_skewed_profile_paper_differs_from_official():
    # fails with the old code, whose only (default) mapping was the range-clamped one
    official = official_port(SKEWED, 0.5, 0.08)
    assert owl_sparsities(SKEWED, 0.5, 0.08) == pytest.approx(official, abs=1e-12)
    paper = owl_sparsities(SKEWED, 0.5, 0.08, mapping="paper")
    assert max(abs(a - b) for a, b in zip(paper, official)) > 0.03


def test_official_above_one_and_unknown_mapping_raise():
    with pytest.raises(ValueError, match=">= 1"):
        owl_sparsities([0.0, 1.0, 1.0, 1.0], 0.9, 0.08)  # official: 0.9 + 0.16 * 0.75 = 1.02 for block 0
    with pytest.raises(ValueError, match="mapping"):
        owl_sparsities([0.1, 0.2], 0.5, 0.08, mapping="linear")


@pytest.mark.parametrize("ratios", [[0.3, 0.01, 0.02, 0.015], [0.05, 0.05, 0.2], [0.1, 0.4, 0.2, 0.3, 0.9, 0.0]])
@pytest.mark.parametrize("s,lam", [(0.5, 0.08), (0.7, 0.08), (0.2, 0.15)])
@pytest.mark.parametrize("mapping", ["official", "paper"])
def test_mean_range_and_monotone(ratios, s, lam, mapping):
    got = owl_sparsities(ratios, s, lam, mapping=mapping)
    floored = mapping == "official" and min(got) == 0.01  # the official floor at 0.01 moves the mean up
    assert (sum(got) / len(got) > s) if floored else sum(got) / len(got) == pytest.approx(s, abs=1e-12)
    width = lam if mapping == "paper" else 2 * lam  # official: [s - 2 lam (1 - mean u), s + 2 lam mean u]
    assert all(s - width - 1e-12 <= x <= s + width + 1e-12 and 0 < x < 1 for x in got)
    assert max(got) - min(got) <= 2 * lam + 1e-12
    for i in range(len(ratios)):
        for j in range(len(ratios)):
            if ratios[i] > ratios[j]:
                assert got[i] < got[j]  # more outliers -> lower sparsity
            if ratios[i] == ratios[j]:
                assert got[i] == pytest.approx(got[j])


def test_paper_mapping_narrows_skewed_ratios_to_the_range():
    got = owl_sparsities([1.0, 0.0, 0.0, 0.0], 0.5, 0.08, mapping="paper")  # official code: 0.5 - 0.12 for block 0
    assert got[0] == pytest.approx(0.42) and got[1] == pytest.approx(0.5 + 0.08 / 3)


def test_equal_ratios_and_bad_settings():
    assert owl_sparsities([0.1, 0.1], 0.6, 0.08) == [0.6, 0.6]
    with pytest.raises(ValueError):
        owl_sparsities([0.1, 0.2], 0.95, 0.08)
    with pytest.raises(ValueError):
        owl_sparsities([], 0.5, 0.08)
