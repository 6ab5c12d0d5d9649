"""The re-dense objective of paper Eq. 4, normalised so that l1 = l2 = 0.1 mean the same on every layer.

Eq. 4 reads ||W_dense X - W X||^2 + l1 ||W||_1 + l2 ||W||_2 and leaves the normalisation open. We use, with
W, W_dense [d_out, d_in], H = X X^T / N [d_in, d_in], n = d_out * d_in elements, Delta = W - W_dense,

    J(W) = ( tr(Delta H Delta^T) / h  +  l1 * s * ||W||_1  +  l2 * ||W||_F^2 ) / n

    h = mean(diag H) = mean over tokens and inputs of x_j^2     (the input scale)
    s = RMS(W_dense) = sqrt(mean(W_dense^2))                    (the weight scale)

Multiplying by n*h gives exactly Eq. 4 with the data term a mean over tokens, ||.||_2 read as the squared
Frobenius norm (weight decay) and per-layer weights lambda1 = l1*h*s, lambda2 = l2*h; every layer therefore
solves Eq. 4 itself, only the lambdas are set per layer. Why this choice:
  * invariant to the input scale (X -> cX scales every term by c^2 after division by h) and to the weight
    scale (W_dense -> cW_dense: every term scales by c^2, the solution scales by c);
  * size-free: data and penalties are means per weight. Per weight, the data curvature is 2 H_jj / (h n),
    i.e. about 2 / n for an average input, and the penalties' curvature / pull are 2 l2 / n and l1 s / n.
    So with diagonal H a weight whose unregularised optimum a satisfies |a| < l1 * s * h / (2 H_jj) is set to
    zero (l1 = 0.1: |a| < 0.05 RMS(W) for an average input), and l2 = 0.1 shrinks an average-input weight
    by 1 / (1 + l2 * h / H_jj) ~ 0.91. Correlated inputs lower the effective curvature and raise both effects.
  * The same l1 gives about the same share of (near-)zero weights on layers of any size and scale (tested).
Caveat: h is a mean, so a few outlier input channels raise it and strengthen both penalties on the others.
"""
from __future__ import annotations

import torch

NEAR_ZERO = 1e-2  # |w| <= NEAR_ZERO * RMS(W_dense) counts as near zero


def _check(w: torch.Tensor, w_dense: torch.Tensor, hessian: torch.Tensor) -> None:
    if w.dim() != 2 or w.shape != w_dense.shape:
        raise ValueError(f"w {tuple(w.shape)} and w_dense {tuple(w_dense.shape)} must be the same 2-D shape")
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"hessian {tuple(hessian.shape)} must be [d_in, d_in] with d_in = {w.shape[1]}")


def input_scale(hessian: torch.Tensor) -> float:
    """h = mean(diag H) for H [d_in, d_in]; 1.0 for an all-zero H (a dead layer)."""
    h = float(torch.diagonal(hessian).float().mean())
    return h if h > 0 else 1.0


def weight_scale(w_dense: torch.Tensor) -> float:
    """s = RMS(W_dense) for W_dense [d_out, d_in]; 1.0 for an all-zero W."""
    s = float(w_dense.float().pow(2).mean().sqrt())
    return s if s > 0 else 1.0


def reconstruction_loss(w: torch.Tensor, w_dense: torch.Tensor, hessian: torch.Tensor) -> float:
    """R(W) = tr((W - W_dense) H (W - W_dense)^T) = mean over tokens of ||(W_dense - W) x||^2 (Eq. 4/5 data term)."""
    _check(w, w_dense, hessian)
    delta = w.float() - w_dense.float()
    return float((delta @ hessian.float() * delta).sum())


def redense_objective(w: torch.Tensor, w_dense: torch.Tensor, hessian: torch.Tensor, l1: float, l2: float) -> float:
    """J(W) of Eq. 4 with the module's normalisation; W, W_dense [d_out, d_in], H [d_in, d_in]."""
    _check(w, w_dense, hessian)
    w = w.float()
    h, s, n = input_scale(hessian), weight_scale(w_dense), w.numel()
    data = reconstruction_loss(w, w_dense, hessian) / h
    return (data + l1 * s * float(w.abs().sum()) + l2 * float(w.pow(2).sum())) / n


def redense_smooth_gradient(w: torch.Tensor, w_dense: torch.Tensor, hessian: torch.Tensor, l2: float) -> torch.Tensor:
    """Gradient [d_out, d_in] of the smooth part of J: (2 (W - W_dense) H / h + 2 l2 W) / n."""
    _check(w, w_dense, hessian)
    w = w.float()
    h, n = input_scale(hessian), w.numel()
    return (2.0 / h * (w - w_dense.float()) @ hessian.float() + 2.0 * l2 * w) / n


def near_zero_share(w: torch.Tensor, w_dense: torch.Tensor) -> float:
    """Share of weights with |w| <= NEAR_ZERO * RMS(W_dense) (exact zeros included)."""
    return float((w.float().abs() <= NEAR_ZERO * weight_scale(w_dense)).float().mean())


def largest_eigenvalue(hessian: torch.Tensor, iters: int = 100, margin: float = 1.05) -> float:
    """Upper estimate of lambda_max of a PSD H [d, d]: power iteration (Rayleigh quotient) times `margin`."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(hessian.shape[0], generator=gen).to(hessian.device, torch.float32)
    h = hessian.float()
    lam = 0.0
    for _ in range(iters):
        hv = h @ v
        norm = float(hv.norm())
        if norm == 0.0:
            return 0.0
        lam = float(v @ hv) / float(v @ v)
        v = hv / norm
    return max(lam, float((v @ (h @ v)) / (v @ v))) * margin
