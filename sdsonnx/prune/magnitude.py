"""Magnitude pruning: drop the weights of smallest |W_ij| (whole-matrix ranking, or per n:m group)."""
from __future__ import annotations

import torch

from ..masks import select_mask
from ..pattern import Pattern


def magnitude_prune(w: torch.Tensor, pattern: Pattern, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (W * mask in W's dtype, bool mask [out, in]); score |W_ij|, ranked over the whole matrix
    (`group`: W is this rank's rows, ranked with every rank's, sdsonnx/distributed.py)."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    w32 = w.detach().float()
    if group is None:
        mask = select_mask(w32.abs(), pattern, per_row=False)
    else:
        from ..distributed import select_mask_rows
        mask = select_mask_rows(w32.abs(), pattern, False, group)
    return torch.where(mask, w32, 0.0).to(w.dtype), mask
