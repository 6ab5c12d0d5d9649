"""SparseGPT (Frantar & Alistarh 2023, Alg. 1): OBS pruning column by column with lazy batch updates."""
from __future__ import annotations

import logging
import warnings

import torch

from ..masks import keep_largest, nm_mask, prune_count, topk_mask
from ..pattern import Pattern

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 4  # damping escalates percdamp x10 per retry: 0.01 -> 100 x mean(diag H) at most
FALLBACK = "wanda"  # the value of a stage record's `fallback` key (docs/ARTIFACTS.md)


class HessianFallback(UserWarning):
    """Warned when H stays singular after every damping retry and the pruner falls back to Wanda's selection;
    the pipeline records it as `fallback` in the module's stage record."""


def _cholesky_upper(h: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor U (H = U^T U) or None where H is not numerically positive definite."""
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0 or not bool(torch.isfinite(lower).all()):
        return None
    return lower.T


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor | None:
    """H [d, d] (dead inputs already set to 1 on the diagonal) -> upper Cholesky factor of (H + damp I)^-1, or None.

    damp = percdamp * mean(|diag H|); where a factorisation fails, the damping grows 10x, up to MAX_DAMP_RETRIES
    times. None: H + damp I is still not positive definite at the largest damping (H is not a Gram matrix).
    """
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("SparseGPT: the Hessian has non-finite entries (NaN/inf in the calibration inputs?)")
    scale = max(float(torch.diag(hessian).abs().mean()), 1e-12)
    damp = max(percdamp, 1e-8) * scale
    for attempt in range(MAX_DAMP_RETRIES + 1):
        damped = hessian.clone()
        damped.diagonal().add_(damp)  # H + damp I without an identity matrix (memory: d x d floats each)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            factor = _cholesky_upper(inverse)
            if factor is not None:
                return factor
        if attempt < MAX_DAMP_RETRIES:
            log.warning("SparseGPT: Hessian not positive definite with damping %.3g; retrying with %.3g (try %d)",
                        damp, damp * 10, attempt + 1)
            damp *= 10
    return None


def _fallback_prune(W: torch.Tensor, H: torch.Tensor, pattern: Pattern, damp_cap: float,
                    group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda's selection without a weight update: keep the largest |W_ij| sqrt(H_jj) (n:m per group, unstructured
    matrix-wide with SparseGPT's count); W [out, in] float32, H [in, in] -> (pruned W, mask). `group`: W is this
    rank's rows (sdsonnx/distributed.py; ties then go by flat index, not torch.topk's order)."""
    warnings.warn(HessianFallback(
        f"SparseGPT: the damped Hessian [{H.shape[0]}x{H.shape[0]}] is singular even with percdamp {damp_cap:.3g}: "
        "mask by |W| sqrt(diag H) (Wanda), no weight update"), stacklevel=3)
    scores = W.abs() * torch.diag(H).clamp_min(0).sqrt().reshape(1, -1)
    if group is None or pattern.is_nm:
        mask = keep_largest(scores, pattern, per_row=False)
    else:
        mask = group.prune_lowest(scores, prune_count(pattern.sparsity, group.numel(scores)))
    return torch.where(mask, W, 0.0), mask


def _block_mask(w1: torch.Tensor, hinv_diag: torch.Tensor, n_prune: int, group=None) -> torch.Tensor:
    """Unstructured mask of one column block: prune the n_prune lowest w^2 / [U]_jj^2 over the whole block
    (`group`: over every rank's rows of it, sdsonnx/distributed.py)."""
    scores = w1 ** 2 / hinv_diag.reshape(1, -1) ** 2
    if n_prune == 0:
        return torch.ones_like(w1, dtype=torch.bool)
    if group is not None:
        return group.prune_lowest(scores, n_prune)
    return topk_mask(scores, n_prune / scores.numel(), per_row=False)


def sparsegpt_prune(w: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, blocksize: int = 128,
                    percdamp: float = 0.01, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in], H = X X^T / N [in, in] -> (pruned W in W's dtype, bool mask [out, in]); SparseGPT Alg. 1.
    `group` (sdsonnx/distributed.RankGroup): W is this rank's rows of the whole matrix; the unstructured counts and
    block masks are the whole matrix's, so the rows come out as the one-process run's.

    Unstructured: each block of `blocksize` columns prunes its share of the round(s * numel) total (cumulative
    rounding, so the whole matrix has exactly that many pruned). n:m: each group of m columns keeps n per row
    when the sweep reaches it (blocksize is rounded down to a multiple of m).
    """
    if w.dim() != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"sparsegpt needs W [out, in] and H [in, in], got {tuple(w.shape)} and {tuple(hessian.shape)}")
    if blocksize < 1 or percdamp < 0:
        raise ValueError(f"blocksize must be >= 1 and percdamp >= 0, got {blocksize} and {percdamp}")
    rows, cols = w.shape
    if pattern.is_nm and cols % pattern.m:
        raise ValueError(f"in_features {cols} of shape {tuple(w.shape)} is not a multiple of m={pattern.m}")
    if not pattern.is_nm and pattern.sparsity == 0:
        return w.detach().clone(), torch.ones(w.shape, dtype=torch.bool, device=w.device)

    W = w.detach().float().clone()
    H = hessian.detach().to(W.device, torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = inverse_hessian_factor(H, percdamp)
    if Hinv is None:
        pruned, mask = _fallback_prune(W, H, pattern, max(percdamp, 1e-8) * 10 ** MAX_DAMP_RETRIES, group)
        return pruned.to(w.dtype), mask
    if pattern.is_nm:
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    total = prune_count(pattern.sparsity, W.numel() if group is None else group.numel(W))
    mask = torch.ones_like(W, dtype=torch.bool)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        if pattern.is_nm:
            mask1 = torch.ones_like(W1, dtype=torch.bool)
        else:
            n_prune = round(total * i2 / cols) - round(total * i1 / cols)
            mask1 = _block_mask(W1, torch.diag(Hinv1), n_prune, group)
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                span = slice(i, i + pattern.m)
                scores = W1[:, span] ** 2 / torch.diag(Hinv1)[span].reshape(1, -1) ** 2
                mask1[:, span] = nm_mask(scores, pattern.n, pattern.m)
            col, d = W1[:, i], Hinv1[i, i]
            q = torch.where(mask1[:, i], col, 0.0)
            Q1[:, i] = q
            err = (col - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    W = torch.where(mask, W, 0.0)  # exact +0.0 where pruned
    return W.to(w.dtype), mask
