"""One pure pruning function per method, and adapters (w, LayerStats, Pattern) -> (w, mask) by name."""
from __future__ import annotations

from typing import Callable

import torch

from ..pattern import Pattern
from ..stats import LayerStats
from .magnitude import magnitude_prune
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_prune

Pruner = Callable[[torch.Tensor, LayerStats, Pattern], tuple[torch.Tensor, torch.Tensor]]


def _wanda(w: torch.Tensor, stats: LayerStats, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    if stats.sq_norm is None:
        raise ValueError("wanda needs the per-input squared norms (no calibration inputs were seen)")
    return wanda_prune(w, stats.sq_norm, pattern)


PRUNERS: dict[str, Pruner] = {
    "magnitude": lambda w, stats, pattern: magnitude_prune(w, pattern),
    "wanda": _wanda,
    "sparsegpt": lambda w, stats, pattern, **options: sparsegpt_prune(w, stats.hessian, pattern, **options),
}

# Which input statistics each method reads: none, the diagonal (sq_norm) or the full Gram matrix (hessian).
NEEDS: dict[str, str] = {"magnitude": "none", "wanda": "diag", "sparsegpt": "full"}


def prune(method: str, w: torch.Tensor, stats: LayerStats, pattern: Pattern,
          sparsegpt_options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (pruned W in W's dtype, bool mask, True = kept) with the named method.

    sparsegpt_options (blocksize, percdamp) go to SparseGPT and are ignored by the other methods."""
    if method not in PRUNERS:
        raise ValueError(f"unknown pruning method {method!r}; known: {', '.join(sorted(PRUNERS))}")
    if method == "sparsegpt":
        return PRUNERS[method](w, stats, pattern, **(sparsegpt_options or {}))
    return PRUNERS[method](w, stats, pattern)
