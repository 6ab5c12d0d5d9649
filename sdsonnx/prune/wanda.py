"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row (or n:m group)."""
from __future__ import annotations

import torch

from ..masks import select_mask
from ..pattern import Pattern


def wanda_scores(w: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """W [out, in], sq_norm [in] = sum_t x_tj^2 -> S_ij = |W_ij| * sqrt(sq_norm_j) (Wanda Eq. 1), float32."""
    if w.dim() != 2 or sq_norm.shape != (w.shape[1],):
        raise ValueError(f"wanda needs W [out, in] and sq_norm [in], got {tuple(w.shape)} and {tuple(sq_norm.shape)}")
    return w.detach().float().abs() * sq_norm.detach().to(w.device, torch.float32).clamp_min(0).sqrt()


def wanda_prune(w: torch.Tensor, sq_norm: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in], sq_norm [in] -> (W * mask in W's dtype, bool mask [out, in]); per-row comparison groups."""
    mask = select_mask(wanda_scores(w, sq_norm), pattern, per_row=True)
    return torch.where(mask, w.detach().float(), 0.0).to(w.dtype), mask
