"""Pruning masks (True = kept) from importance scores, and N:M pattern checks.

Tie-breaking everywhere: among equal scores, the weight with the lower flat index is pruned first.
"""
from __future__ import annotations

import torch

from .pattern import Pattern


def prune_count(sparsity: float, count: int) -> int:
    """Number of weights to prune out of `count` at `sparsity`: round(sparsity * count)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return int(round(sparsity * count))


def _check_2d(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out, in], got shape {tuple(t.shape)}")


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask [rows, cols] keeping all but the k lowest scores of every row (stable: lower index pruned first)."""
    order = torch.sort(scores, dim=1, stable=True).indices
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], False)
    return mask


def topk_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """scores [out, in] -> bool mask pruning exactly round(s * count) lowest scores per row or matrix-wide."""
    _check_2d(scores, "scores")
    scores = scores.float()
    if per_row:
        return _prune_lowest(scores, prune_count(sparsity, scores.shape[1]))
    flat = scores.reshape(1, -1)
    return _prune_lowest(flat, prune_count(sparsity, flat.shape[1])).reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """scores [out, in] -> bool mask keeping the n highest of every m consecutive inputs (dim 1)."""
    _check_2d(scores, "scores")
    if not 0 < n <= m:
        raise ValueError(f"n:m needs 0 < n <= m, got {n}:{m}")
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"in_features {cols} of shape {tuple(scores.shape)} is not a multiple of m={m}")
    groups = scores.float().reshape(-1, m)
    return _prune_lowest(groups, m - n).reshape(rows, cols)


def select_mask(scores: torch.Tensor, pattern: Pattern, per_row: bool = True) -> torch.Tensor:
    """scores [out, in] -> bool mask for `pattern` (n:m per group, else top-k per row or matrix-wide)."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return topk_mask(scores, pattern.sparsity, per_row)


def keep_largest(scores: torch.Tensor, pattern: Pattern, per_row: bool = True) -> torch.Tensor:
    """Like select_mask (same kept counts) by torch.topk: faster, ties broken in no particular order."""
    _check_2d(scores, "scores")
    if pattern.is_nm:
        groups, keep = scores.reshape(-1, pattern.m), pattern.n
    elif per_row:
        groups, keep = scores, scores.shape[1] - prune_count(pattern.sparsity, scores.shape[1])
    else:
        groups, keep = scores.reshape(1, -1), scores.numel() - prune_count(pattern.sparsity, scores.numel())
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, groups.topk(keep, dim=1, sorted=False).indices, True)
    return mask.reshape(scores.shape)


def nm_violations(w: torch.Tensor, n: int, m: int, axis: int = 1) -> torch.Tensor:
    """w 2-D -> [k, 2] long (row, group) of the m-groups along `axis` with more than n nonzeros (-0.0 is zero).

    axis=1: torch Linear weights [out, in]; axis=0: weights stored transposed [in, out] (ONNX MatMul), where
    `row` is then the output column and `group` the index of the group of m inputs.
    """
    if w.dim() != 2:
        raise ValueError(f"nm_violations needs a 2-D tensor, got shape {tuple(w.shape)}")
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 or 1, got {axis}")
    if not 0 < m:
        raise ValueError(f"m must be positive, got {m}")
    grouped = w if axis == 1 else w.T
    if grouped.shape[1] % m:
        raise ValueError(f"axis {axis} of shape {tuple(w.shape)} has length {grouped.shape[1]}, "
                         f"not a multiple of m={m}")
    nonzero = (grouped != 0).reshape(grouped.shape[0], -1, m).sum(-1)
    return torch.nonzero(nonzero > n)


def sparsity_of(w: torch.Tensor) -> float:
    """Share of exact zeros in w (any shape; -0.0 counts as zero)."""
    if w.numel() == 0:
        return 0.0
    return float((w == 0).sum()) / w.numel()
