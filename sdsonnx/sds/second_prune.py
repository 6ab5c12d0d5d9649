"""Second pruning of SDS (paper Sec. 2.3): prune the re-dense weights again, adjust, never worse than the first.

All comparisons use R(W) = tr((W - W_dense) H (W - W_dense)^T) with the same H (the stage's input statistics).
"""
from __future__ import annotations

import torch

from ..pattern import Pattern
from ..prune import PruneOptions, prune
from ..stats import LayerStats
from .adjust import satisfies_pattern, soft_mask_adjust
from .admm import admm_reconstruct
from .objective import reconstruction_loss


def second_prune(method: str, w_dense: torch.Tensor, w_redense: torch.Tensor, w_first: torch.Tensor,
                 stats: LayerStats, pattern: Pattern, adjust: bool = True, max_iter: int = 50,
                 tol: float = 1e-6, early_exit: bool = False, precondition: bool = True,
                 options: PruneOptions | None = None, group=None, solver: str = "soft_mask",
                 admm_iterations: int = 50, admm_reselect: int = 0) -> tuple[torch.Tensor, dict]:
    """W [d_out, d_in]: prune(method, W_redense) (Eq. 5's W^sparse-2nd), soft-mask adjusted unless it already beats
    W_first (early exit); the first prune is kept when neither beats it on R. options: the first prune's (e.g. its
    SparseGPT blocksize and percdamp), so both prunes are the same pruner; None: the method's defaults. `group`
    (sdsonnx/distributed.RankGroup): the weights are this rank's rows; every comparison is the whole matrix's.
    solver: "soft_mask" (max_iter, tol, precondition) or "admm" (sds/admm.py: admm_iterations steps from the second
    prune's mask, the first admm_reselect of them re-selecting it within the pattern)."""
    if solver not in ("soft_mask", "admm"):
        raise ValueError(f"unknown adjustment solver {solver!r}; known: soft_mask, admm")
    if not (w_dense.shape == w_redense.shape == w_first.shape) or w_dense.dim() != 2:
        raise ValueError(f"w_dense {tuple(w_dense.shape)}, w_redense {tuple(w_redense.shape)} and w_first "
                         f"{tuple(w_first.shape)} must be the same 2-D shape")
    w_ref = w_dense.float()
    w_second, mask_second = prune(method, w_redense.float(), stats, pattern, options, group=group)
    w_second = w_second.float()
    h = stats.hessian.to(w_dense.device)  # after the prune, which builds its own: one H less at its peak
    r_first = reconstruction_loss(w_first.float(), w_ref, h, group)
    r_second = reconstruction_loss(w_second, w_ref, h, group)
    info = {"loss_first": r_first, "loss_second": r_second, "loss_adjusted": None,
            "early_exit": early_exit and r_second < r_first, "adjust_iterations": 0, "mask_changes": 0}
    if info["early_exit"]:
        return w_second, {**info, "kept": "second"}
    if adjust:
        # SparseGPT's unstructured masks are exact per column block, not per row: adjust matrix-wide then
        per_row = pattern.is_nm or satisfies_pattern(w_second, pattern, per_row=True, group=group)
        if solver == "admm":
            w_adj, adj = admm_reconstruct(w_ref, w_second, h, mask=mask_second,
                                          iterations=admm_iterations, pattern=pattern,
                                          reselect_iterations=admm_reselect, per_row=per_row, group=group)
        else:
            w_adj, adj = soft_mask_adjust(w_ref, w_second, h, pattern, max_iter=max_iter, tol=tol, per_row=per_row,
                                          precondition=precondition, group=group)
        info.update(loss_adjusted=adj["loss_after"], adjust_iterations=adj["iterations"],
                    mask_changes=adj.get("mask_changes", 0), adjust_per_row=per_row, adjust_solver=solver)
        if adj["loss_after"] < min(r_first, r_second):
            return w_adj, {**info, "kept": "adjusted"}
    if r_second < r_first:
        return w_second, {**info, "kept": "second"}
    return w_first.float().clone(), {**info, "kept": "first"}
