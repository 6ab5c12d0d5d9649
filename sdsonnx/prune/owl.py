"""OWL (Yin et al. 2024): non-uniform block sparsity from the share of outlier Wanda scores.

Following the official code (luuyin/OWL, lib/prune_all.py, `check_outlier_mean` and `prune_wanda_outlier`):
the Wanda scores |W_ij| * ||X_j||_2 of all target Linears of a block are pooled, the outlier ratio is the share
above M times the pooled mean, and ratios are mapped linearly to block sparsities (more outliers, lower
sparsity) with the mean sparsity kept. The official code spreads sparsities over a width of exactly 2 lam, which
can leave [s - lam, s + lam] when the ratios are skewed; here the spread is narrowed just enough to stay inside
that range, as the OWL paper states it (identical to the official mapping whenever that one stays inside).
"""
from __future__ import annotations

import torch


def outlier_ratio(scores: list[torch.Tensor], threshold_m: float = 5.0) -> float:
    """Share (0..1) of the pooled scores of one block (any shapes) above threshold_m x their pooled mean."""
    if not scores or all(s.numel() == 0 for s in scores):
        raise ValueError("outlier_ratio needs at least one non-empty score tensor")
    if threshold_m <= 0:
        raise ValueError(f"threshold_m must be > 0, got {threshold_m}")
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    cut = threshold_m * total / count
    return sum(int((s.double() > cut).sum()) for s in scores) / count


def owl_sparsities(ratios: list[float], mean_sparsity: float, lam: float = 0.08) -> list[float]:
    """Block sparsities s_i = s + c (mean(u) - u_i), u = min-max normalised ratios, c <= 2 lam; mean exactly s."""
    if not ratios:
        raise ValueError("owl_sparsities needs at least one block ratio")
    if lam < 0 or not (0.0 < mean_sparsity - lam and mean_sparsity + lam < 1.0):
        raise ValueError(f"need 0 <= lam and 0 < s - lam, s + lam < 1; got s={mean_sparsity}, lam={lam}")
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = float(r.max() - r.min())
    if spread == 0.0 or lam == 0.0:
        return [float(mean_sparsity)] * len(ratios)
    u = (r - r.min()) / spread
    dev = u.mean() - u
    c = min(2.0 * lam, lam / float(dev.abs().max()))
    sparsity = mean_sparsity + c * dev
    sparsity += mean_sparsity - sparsity.mean()  # remove float round-off in the mean
    return [float(x) for x in sparsity]
