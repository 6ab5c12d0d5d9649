"""Pruning masks (True = kept) from importance scores, and N:M pattern checks.

Tie-breaking everywhere: among equal scores, the weight with the lower flat index is pruned first.

Pattern detection lives here, beside the masks it checks: `STANDARD_NM` is the one table of n:m patterns
sdsonnx names (inspect, export metadata, validate, bench), and `satisfied_patterns` / `pattern_name` /
`first_group_violation` are the only detectors; all rest on `nm_violations`. `pattern.py` stays the
description of a *request* (what a pruner must produce) and holds no tensor code.
"""
from __future__ import annotations

import numpy as np
import torch

from .pattern import Pattern

STANDARD_NM = ((1, 4), (2, 8), (2, 4), (4, 8))  # tightest first: 1:4 implies 2:8, 2:4 implies 4:8


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


def _as_tensor(w: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A torch view of a numpy array (copied only when read-only or not C-contiguous), or the tensor itself."""
    if isinstance(w, torch.Tensor):
        return w.detach()
    return torch.from_numpy(np.require(w, requirements=["C", "W"]))


def satisfied_patterns(w: np.ndarray | torch.Tensor, axis: int = 1) -> list[str]:
    """w 2-D -> the STANDARD_NM patterns (tightest first) every group of m inputs along `axis` satisfies.

    Empty when w has no zero (a dense weight satisfies no pattern) or none holds; -0.0 counts as zero.
    """
    t = _as_tensor(w)
    if not bool((t == 0).any()):
        return []
    return [f"{n}:{m}" for n, m in STANDARD_NM if t.shape[axis] % m == 0 and len(nm_violations(t, n, m, axis)) == 0]


def tightest(satisfied: list[str] | None) -> str:
    """Name of a satisfied-pattern list: 'dense' for None (no zero), its first (tightest) entry, else 'unstructured'."""
    if satisfied is None:
        return "dense"
    return satisfied[0] if satisfied else "unstructured"


def pattern_name(w: np.ndarray | torch.Tensor, axis: int = 1) -> str:
    """'dense' (no zero), else the tightest STANDARD_NM pattern satisfied along `axis`, else 'unstructured'."""
    return tightest(satisfied_patterns(w, axis) if bool((_as_tensor(w) == 0).any()) else None)


def first_group_violation(stored: np.ndarray, axis: int, n: int, m: int) -> tuple[int, str] | None:
    """(number of groups with > n nonzeros of m along `axis`, description of the first) or None when all pass."""
    if stored.shape[axis] % m:
        return 1, f"input axis {axis} has length {stored.shape[axis]}, not a multiple of {m}"
    bad = nm_violations(_as_tensor(stored), n, m, axis=axis)
    if len(bad) == 0:
        return None
    row, group = (int(v) for v in bad[0])
    lo, hi = group * m, group * m + m
    block = stored[row, lo:hi] if axis == 1 else stored[lo:hi, row]
    where = f"[{row}, {lo}:{hi}]" if axis == 1 else f"[{lo}:{hi}, {row}]"
    return len(bad), (f"stored elements {where} (output {row}, inputs {lo}..{hi - 1}) hold "
                      f"{int(np.count_nonzero(block))} nonzeros > {n}")


def requested_nm(requested: object) -> tuple[int, int] | None:
    """(n, m) of an 'n:m' request as report.json / sdsonnx.json record it; None for unstructured or no request."""
    if not isinstance(requested, str) or ":" not in requested:
        return None
    pattern = Pattern.parse(requested)
    return pattern.n, pattern.m


def request_violation(w: np.ndarray, axis: int, requested: object) -> str | None:
    """Why w (stored with inputs along `axis`) breaks the n:m `requested`; None when it holds or is not n:m."""
    nm = requested_nm(requested)
    found = None if nm is None else first_group_violation(w, axis, *nm)
    if found is None:
        return None
    count, first = found
    return f"{count} group(s) break {requested}; first: {first}"
