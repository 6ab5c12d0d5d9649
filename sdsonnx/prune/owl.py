"""OWL (Yin et al. 2024): non-uniform block sparsity from the share of outlier Wanda scores.

Following the official code (luuyin/OWL, lib/prune_all.py, `check_outlier_mean` and `prune_wanda_outlier`):
the Wanda scores |W_ij| * ||X_j||_2 of all target Linears of a block are pooled, the outlier ratio is the share
above M times the pooled mean, and ratios are mapped linearly to block sparsities (more outliers, lower
sparsity) with the mean sparsity kept. Two mappings of the min-max normalised ratios u_i:

  official  s_i = s + 2 lam (mean(u) - u_i), a spread of exactly 2 lam (the official code, the default). The
            range is [s - 2 lam (1 - mean u), s + 2 lam mean u]: inside [s - lam, s + lam] only when mean(u) = 0.5.
  paper     s_i = s + c (mean(u) - u_i), c = min(2 lam, lam / max_i |mean(u) - u_i|): the spread narrowed just
            enough to stay inside [s - lam, s + lam], as the OWL paper states the constraint. Equals the official
            mapping only when mean(u) = 0.5; on skewed profiles blocks differ by up to ~lam.
"""
from __future__ import annotations

import torch

MAPPINGS = ("official", "paper")
OFFICIAL_FLOOR = 0.01  # the official code replaces a block sparsity <= 0 by 0.01


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


def _official(r: torch.Tensor, s: float, lam: float) -> torch.Tensor:
    """Ratios [k] -> sparsities [k], in the official code's order: density d = 2 lam u - mean + (1 - s), s_i = 1 - d_i."""
    d = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    d = d - d.mean() + (1 - s)
    sparsity = 1 - d
    return torch.where(sparsity <= 0, torch.full_like(sparsity, OFFICIAL_FLOOR), sparsity)


def _paper(r: torch.Tensor, s: float, lam: float) -> torch.Tensor:
    """Ratios [k] -> s + c (mean(u) - u), c = min(2 lam, lam / max|mean(u) - u_i|); mean exactly s."""
    u = (r - r.min()) / (r.max() - r.min())
    dev = u.mean() - u
    sparsity = s + min(2.0 * lam, lam / float(dev.abs().max())) * dev
    return sparsity + (s - sparsity.mean())  # remove float round-off in the mean


def owl_sparsities(ratios: list[float], mean_sparsity: float, lam: float = 0.08,
                   mapping: str = "official") -> list[float]:
    """Block outlier ratios [k] -> block sparsities [k] with mean s (OWL Sec. 3; `mapping` as in the module doc)."""
    if mapping not in MAPPINGS:
        raise ValueError(f"OWL mapping must be one of {MAPPINGS}, got {mapping!r}")
    if not ratios:
        raise ValueError("owl_sparsities needs at least one block ratio")
    if lam < 0 or not (0.0 < mean_sparsity - lam and mean_sparsity + lam < 1.0):
        raise ValueError(f"need 0 <= lam and 0 < s - lam, s + lam < 1; got s={mean_sparsity}, lam={lam}")
    r = torch.tensor(ratios, dtype=torch.float64)
    if float(r.max() - r.min()) == 0.0 or lam == 0.0:  # the official code would divide by zero
        return [float(mean_sparsity)] * len(ratios)
    sparsity = (_official if mapping == "official" else _paper)(r, mean_sparsity, lam)
    if float(sparsity.max()) >= 1.0:
        raise ValueError(f"OWL {mapping} mapping gives a block sparsity {float(sparsity.max()):.4f} >= 1 "
                         f"(s={mean_sparsity}, lam={lam}); lower lam or the sparsity")
    return [float(x) for x in sparsity]
