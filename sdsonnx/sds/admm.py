"""The kept weights of a fixed mask, solved exactly (per row) or by ADMM (Boza 2024, arXiv 2401.02938).

Both minimise R(W) = tr((W - W_ref) H (W - W_ref)^T) over W [d_out, d_in] that are zero off a mask, H [d_in, d_in]
= X X^T / N. The problem splits into one least-squares problem per row i with kept set S_i:

    W_i,S = H_SS^{-1} H_S,: W_ref_i^T                                   (the normal equations on S)

`masked_least_squares` solves these directly: one Cholesky factorisation of H_SS per row, O(sum_i |S_i|^3 / 3)
flops and |S|^2 memory per row of a batch (a 576 x 1536 down_proj at 50%: 576 factorisations of 768 x 768, ~9e10
flops, 6 s on one CPU thread in float32, against 2-3 s for 50 ADMM steps).
`admm_reconstruct` reaches the same point with one factorisation (and explicit inverse) of H + rho I per rho value
and one d_out x d_in x d_in product per step, at a peak of H plus three d_in x d_in and about six d_out x d_in
float32 buffers (Boza's scheme, his Jacobi scaling included):

    V  <- (V_ref Hs + rho (Z - U)) (Hs + rho I)^{-1}      (the unconstrained step, Hs = D^-1 H D^-1, D = sqrt(diag H))
    Z  <- Proj_mask(V + U)                                 (exactly zero off the mask: the pattern holds)
    U  <- U + V - Z                                        (the scaled dual; rescaled by rho_old / rho_new)

and returns Z. With `reselect_iterations` > 0 the first steps project onto the pattern instead of the fixed mask
(the largest |Z_ij| sqrt(H_jj) kept, as the soft-mask adjustment re-selects) while rho grows, Boza's mask
selection at the final sparsity without his gradual schedule; the mask and rho are fixed from then on, and the
remaining steps solve the fixed mask's convex problem. Measured on SmolLM2-135M layers (docs/DESIGN.md): 50
steps, 30 re-selecting, end 15% below the soft-mask adjustment's R (11% on held-out calibration text); a fixed
mask ends 0.2% below it (the soft mask's own re-selection is worth as much as the exact solve). `damp` is a ridge
towards W_ref in the objective (as SparseGPT's percdamp), for a singular H_SS; the two functions scale it
differently: `masked_least_squares` adds damp * mean(diag H) I, `admm_reconstruct` adds damp I to the Jacobi-scaled
H (unit diagonal), i.e. damp * diag(H) in the original coordinates (a per-input ridge).
"""
from __future__ import annotations

import logging
import time

import torch

from ..masks import prune_count
from ..pattern import Pattern
from .adjust import _reselect_
from .objective import totals

log = logging.getLogger(__name__)


def _damped_(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) I, written into h."""
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if damp > 0:
        diag = torch.diagonal(h)
        diag += damp * float(diag.mean())
    return h


def _check(w_ref: torch.Tensor, mask: torch.Tensor, h: torch.Tensor) -> None:
    if w_ref.dim() != 2 or mask.shape != w_ref.shape:
        raise ValueError(f"w_ref {tuple(w_ref.shape)} and mask {tuple(mask.shape)} must be the same 2-D shape")
    if h.shape != (w_ref.shape[1], w_ref.shape[1]):
        raise ValueError(f"h {tuple(h.shape)} must be [d_in, d_in] with d_in = {w_ref.shape[1]}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True = kept), got {mask.dtype}")


def masked_least_squares(w_ref: torch.Tensor, mask: torch.Tensor, h: torch.Tensor, damp: float = 0.0,
                         rows: int = 16, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W [d_out, d_in] = argmin R(W) with W = 0 off mask: W_i,S = (H_d)_SS^-1 (H_d)_S,: W_ref_i per row, H_d = H +
    damp mean(diag H) I; computed in `dtype`, `rows` rows (of equal kept count) per batched Cholesky; float32 out.
    A singular (H_d)_SS raises ValueError (pass damp > 0)."""
    _check(w_ref, mask, h)
    hd = _damped_(h.to(w_ref.device, dtype, copy=True), damp)
    ref = w_ref.to(dtype)
    out = torch.zeros_like(ref)
    kept = mask.sum(1)
    for k in torch.unique(kept).tolist():
        idx_rows = torch.nonzero(kept == k).flatten()
        if k == 0:
            continue
        for start in range(0, idx_rows.numel(), rows):
            r = idx_rows[start:start + rows]
            cols = torch.nonzero(mask[r])[:, 1].reshape(r.numel(), k)  # row-major: each row's kept columns, sorted
            rhs = torch.gather(ref[r] @ hd, 1, cols).unsqueeze(2)  # [B, k, 1]: (H_d)_S,: W_ref_i (H_d symmetric)
            h_ss = hd[cols.unsqueeze(2), cols.unsqueeze(1)]  # [B, k, k]
            chol, info = torch.linalg.cholesky_ex(h_ss)
            if int(info.max()) > 0:
                raise ValueError(f"H restricted to the kept columns of {int((info > 0).sum())} rows is singular; "
                                 f"pass damp > 0 (got damp={damp})")
            out[r.unsqueeze(1), cols] = torch.cholesky_solve(rhs, chol).squeeze(2)
    return out.float()


def admm_reconstruct(w_ref: torch.Tensor, w_init: torch.Tensor, h: torch.Tensor, mask: torch.Tensor | None = None,
                     iterations: int = 20, rho: float = 0.1, rho_growth: float = 1.3, rho_every: int = 3,
                     damp: float = 0.0, pattern: Pattern | None = None, reselect_iterations: int = 0,
                     per_row: bool = True, group=None) -> tuple[torch.Tensor, dict]:
    """ADMM for min R(W) over W [d_out, d_in] zero off `mask` (default: W_init != 0), H [d_in, d_in]: module docstring.

    rho (relative to the unit diagonal of the scaled H) is multiplied by rho_growth every rho_every steps while the
    mask is re-selected (the first reselect_iterations steps: within `pattern`, `per_row` as in soft_mask_adjust),
    so that the mask settles, and constant after: one Cholesky factorisation per rho value (one for a fixed mask). `group` (sdsonnx/distributed.RankGroup): the rows are this
    rank's; the losses, and a matrix-wide re-selection, are the whole matrix's. Returns (float32 Z, info)."""
    if w_ref.dim() != 2 or w_init.shape != w_ref.shape:
        raise ValueError(f"w_ref {tuple(w_ref.shape)} and w_init {tuple(w_init.shape)} must be the same 2-D shape")
    mask = (w_init != 0) if mask is None else mask.to(w_ref.device)
    _check(w_ref, mask, h)
    if iterations < 0 or rho <= 0 or rho_growth < 1 or rho_every < 1:
        raise ValueError(f"need iterations >= 0, rho > 0, rho_growth >= 1, rho_every >= 1; got {iterations}, "
                         f"{rho}, {rho_growth}, {rho_every}")
    if reselect_iterations > 0 and pattern is None:
        raise ValueError("reselect_iterations > 0 needs the pattern to re-select the mask within")
    if bool((w_init[~mask] != 0).any()):
        raise ValueError("w_init has nonzero weights off the mask")
    start = time.perf_counter()
    whole_prune = None  # a matrix-wide re-selection over row-split ranks prunes this many
    if reselect_iterations > 0 and group is not None and not (pattern.is_nm or per_row):
        whole_prune = prune_count(pattern.sparsity, group.numel(w_ref))
    h = h.float().to(w_ref.device)
    diag = torch.diagonal(h)
    scale = torch.where(diag > 0, diag.clamp_min(0).sqrt(), torch.ones_like(diag))
    hs = _damped_((h / scale[:, None]).div_(scale[None, :]), damp)  # H_d in scaled coordinates

    def loss(w: torch.Tensor) -> float:  # R(W), undamped
        delta = w - w_ref.float()
        return totals(group, float((delta @ h * delta).sum()))[0]

    target = (w_ref.float() * scale) @ hs  # V_ref Hs
    z = w_init.float().to(w_ref.device) * scale
    u = torch.zeros_like(z)
    inverse, factorisations, current, changes = None, 0, rho, 0
    for it in range(iterations):
        new_rho = rho * rho_growth ** (min(it, reselect_iterations) // rho_every)
        if inverse is None or new_rho != current:
            u.mul_(current / new_rho)  # the scaled dual U = Y / rho follows rho
            current = new_rho
            inverse = None  # at most three d_in x d_in buffers besides H: Hs, Hs + rho I or its factor, inverse
            shifted = hs.clone()
            shifted.diagonal().add_(current)
            factor = torch.linalg.cholesky(shifted)
            del shifted
            inverse = torch.cholesky_inverse(factor)
            del factor
            factorisations += 1
        v = torch.sub(z, u).mul_(current).add_(target) @ inverse
        z = v + u
        if it < reselect_iterations:
            z, new_mask = _reselect_(z, pattern, per_row, group=group, prune=whole_prune)
            changes += int((new_mask != mask).sum())
            mask = new_mask
        else:
            z.masked_fill_(~mask, 0.0)
        u.add_(v).sub_(z)
        del v
    w = z / scale
    w.masked_fill_(~mask, 0.0)  # +0.0 off the mask (never -0.0)
    info = {"loss_before": loss(w_init.float()), "loss_after": loss(w), "iterations": iterations,
            "factorisations": factorisations, "rho_final": current, "seconds": time.perf_counter() - start}
    if reselect_iterations > 0:
        info["mask_changes"] = totals(group, changes)[0] if group is not None else changes
    log.debug("admm: R %.6g -> %.6g in %d steps", info["loss_before"], info["loss_after"], iterations)
    return w, info
