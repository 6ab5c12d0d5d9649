"""Sparse weight adjustment with a soft mask, paper Eq. 5.

Minimise R(W) = tr((W - W_dense) H (W - W_dense)^T) over weights that satisfy the pattern, by accelerated
projected gradient descent: after every gradient step the mask is re-selected by |W| (the paper's absmin soft
mask) and W is projected onto it, which is the exact Euclidean projection onto the pattern's sparsity set.
With step 1/L (L >= 2 lambda_max(H)) a plain projected step never increases R; momentum is used while it helps
and dropped (restart from the last point with a plain step) when it does not. The best iterate is returned.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from ..masks import nm_violations, prune_count, select_mask
from ..pattern import Pattern
from .objective import largest_eigenvalue

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


def satisfies_pattern(w: torch.Tensor, pattern: Pattern, per_row: bool = True) -> bool:
    """True when W [d_out, d_in] has at most the pattern's kept count nonzero (per row, per m-group or overall)."""
    if pattern.is_nm:
        return nm_violations(w, pattern.n, pattern.m).shape[0] == 0
    if per_row:
        keep = w.shape[1] - prune_count(pattern.sparsity, w.shape[1])
        return bool(((w != 0).sum(1) <= keep).all())
    return int((w != 0).sum()) <= w.numel() - prune_count(pattern.sparsity, w.numel())


def _project(z: torch.Tensor, pattern: Pattern, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the largest |z| allowed by the pattern: (z * mask, mask)."""
    mask = select_mask(z.abs(), pattern, per_row)
    return z * mask, mask


def soft_mask_adjust(w_dense: torch.Tensor, w_pruned: torch.Tensor, hessian: torch.Tensor, pattern: Pattern,
                     max_iter: int = 100, tol: float = 1e-6, per_row: bool = True,
                     callback: Callback | None = None) -> tuple[torch.Tensor, dict]:
    """Eq. 5: W [d_out, d_in] with the pattern minimising R(W) from W_pruned, H [d_in, d_in]; never worse on R.

    callback(iteration, W, mask) sees every projected iterate. Returns float32 W.
    """
    if w_dense.dim() != 2 or w_dense.shape != w_pruned.shape:
        raise ValueError(f"w_dense {tuple(w_dense.shape)} and w_pruned {tuple(w_pruned.shape)} must be the same 2-D shape")
    if hessian.shape != (w_dense.shape[1], w_dense.shape[1]):
        raise ValueError(f"hessian {tuple(hessian.shape)} must be [d_in, d_in] with d_in = {w_dense.shape[1]}")
    if not satisfies_pattern(w_pruned, pattern, per_row):
        raise ValueError(f"w_pruned does not satisfy the pattern {pattern} it is to be adjusted within")
    start = time.perf_counter()
    w_ref = w_dense.float()
    h = hessian.float().to(w_ref.device)
    lip = 2.0 * largest_eigenvalue(h)
    target = w_ref @ h  # W_dense H; the gradient of R at W is 2 (W H - W_dense H)

    def loss(w: torch.Tensor, wh: torch.Tensor) -> float:
        return float(((w - w_ref) * (wh - target)).sum())  # tr((W - W_dense) H (W - W_dense)^T)

    def step(w: torch.Tensor, wh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One projected gradient step from w (wh = w H): (new W, its mask, new W H): one matrix product."""
        new, mask = _project(w - 2.0 * (wh - target) / lip, pattern, per_row)
        return new, mask, new @ h

    x = w_pruned.float().to(w_ref.device).clone()
    xh = x @ h
    mask = x != 0
    loss_before = loss(x, xh)
    best, best_loss, best_iter = x, loss_before, 0
    if lip <= 0:  # H = 0: every W has R = 0
        return x, {"loss_before": loss_before, "loss_after": loss_before, "iterations": 0, "best_iteration": 0,
                   "mask_changes": 0, "restarts": 0, "seconds": time.perf_counter() - start}
    # momentum point y = x + beta (x - x_prev) is linear in x, so y H comes from the cached products
    x_prev, xh_prev, loss_x, t, iters, changes, restarts = x, xh, loss_before, 1.0, 0, 0, 0
    for iters in range(1, max_iter + 1):
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        beta = (t - 1.0) / t_new
        x_new, new_mask, xh_new = step(x + beta * (x - x_prev), xh + beta * (xh - xh_prev))
        loss_new = loss(x_new, xh_new)
        if loss_new > loss_x:  # momentum overshot: plain projected step from x (monotone), reset momentum
            restarts += 1
            x_new, new_mask, xh_new = step(x, xh)
            loss_new = loss(x_new, xh_new)
            t_new = 1.0
        changes += int((new_mask != mask).sum())
        if callback is not None:
            callback(iters, x_new, new_mask)
        rel = float((x_new - x).norm()) / max(float(x.norm()), 1e-30)
        x_prev, xh_prev, x, xh, mask, loss_x, t = x, xh, x_new, xh_new, new_mask, loss_new, t_new
        if loss_x < best_loss:
            best, best_loss, best_iter = x, loss_x, iters
        if rel < tol:
            break
    info = {"loss_before": loss_before, "loss_after": best_loss, "iterations": iters, "best_iteration": best_iter,
            "mask_changes": changes, "restarts": restarts, "seconds": time.perf_counter() - start}
    return best, info
