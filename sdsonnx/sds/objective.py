"""The re-dense objective of paper Eq. 4, normalised so that l1 = l2 = 0.1 mean the same on every layer.

Eq. 4 reads ||W_dense X - W X||^2 + lambda1 ||W||_1 + lambda2 ||W||_2 and leaves the normalisation open. With
W, W_dense [d_out, d_in], H = X X^T / N [d_in, d_in] and R(W) = tr((W - W_dense) H (W - W_dense)^T) (the data
term as a mean over tokens) we minimise, per layer,

    J(W) = R(W) / R(W_init)  +  l1 * ||W||_1 / ||W_dense||_1  +  l2 * ||W||_F^2 / ||W_dense||_F^2

with W_init the first-pruned weights the reconstruction starts from. Multiplying by R(W_init) gives exactly Eq. 4
(||.||_2 read as the squared Frobenius norm, i.e. weight decay) with per-layer

    lambda1 = l1 * R(W_init) / ||W_dense||_1,    lambda2 = l2 * R(W_init) / ||W_dense||_F^2.

Every term is 1 at a natural reference point: the data term at the first prune, each penalty at the dense
weights. So l2 = 0.1 reads "the squared norm of the dense weights costs a tenth of the first prune's error":
  * invariant to the input scale (X -> cX scales R and R(W_init) alike) and to the weight scale (W -> cW: the
    solution scales by c); size-free, since every term is a ratio of sums over the same layer;
  * adapted to the layer: the penalties are measured against the error the first prune left, so they are as
    strong as the room the reconstruction has. Measured on SmolLM2-135M (docs/BENCHMARKS.md), the penalties
    of l = 0.1 are about l * e relative to the data term's curvature, where e ~ 0.01-0.05 is the first
    prune's relative error; a size-only normalisation (means per weight) made l = 0.1 a 9% shrink of every
    weight and raised the re-dense perplexity from 14 to 360.
"""
from __future__ import annotations

import torch

NEAR_ZERO = 1e-2  # |w| <= NEAR_ZERO * RMS(W_dense) counts as near zero


def totals(group, *values: float) -> tuple[float, ...]:
    """The values summed over the ranks of `group` (sdsonnx/distributed.RankGroup; the weights are row-split), or
    the values themselves in one process."""
    return tuple(values) if group is None else tuple(group.sums(*values))


def _check(w: torch.Tensor, w_dense: torch.Tensor, hessian: torch.Tensor) -> None:
    if w.dim() != 2 or w.shape != w_dense.shape:
        raise ValueError(f"w {tuple(w.shape)} and w_dense {tuple(w_dense.shape)} must be the same 2-D shape")
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"hessian {tuple(hessian.shape)} must be [d_in, d_in] with d_in = {w.shape[1]}")


def weight_scale(w_dense: torch.Tensor, group=None) -> float:
    """s = RMS(W_dense) for W_dense [d_out, d_in]; 1.0 for an all-zero W."""
    if group is None:
        s = float(w_dense.float().pow(2).mean().sqrt())
    else:
        sq, count = totals(group, float(w_dense.float().pow(2).sum()), w_dense.numel())
        s = (sq / max(count, 1)) ** 0.5
    return s if s > 0 else 1.0


def reconstruction_loss(w: torch.Tensor, w_dense: torch.Tensor, hessian: torch.Tensor, group=None) -> float:
    """R(W) = tr((W - W_dense) H (W - W_dense)^T) = mean over tokens of ||(W_dense - W) x||^2 (Eq. 4/5 data term)."""
    _check(w, w_dense, hessian)
    delta = w.float() - w_dense.float()
    return totals(group, float((delta @ hessian.float() * delta).sum()))[0]


def reference_loss(w_init: torch.Tensor, w_dense: torch.Tensor, hessian: torch.Tensor, group=None) -> float:
    """R(W_init), the data term's unit; falls back to 1e-6 R(0) (nothing pruned) and to 1.0 (H = 0 or W = 0)."""
    r0 = reconstruction_loss(w_init, w_dense, hessian, group)
    floor = 1e-6 * reconstruction_loss(torch.zeros_like(w_dense), w_dense, hessian, group)
    return max(r0, floor) if max(r0, floor) > 0 else 1.0


def layer_lambdas(w_dense: torch.Tensor, w_init: torch.Tensor, hessian: torch.Tensor, l1: float,
                  l2: float, group=None) -> tuple[float, float, float]:
    """(lambda1, lambda2, R(W_init)) of Eq. 4 for this layer from the normalised l1, l2 (module docstring)."""
    if l1 < 0 or l2 < 0:
        raise ValueError(f"l1 and l2 must be >= 0, got {l1}, {l2}")
    r0 = reference_loss(w_init, w_dense, hessian, group)
    w = w_dense.float()
    norm1, norm2 = totals(group, float(w.abs().sum()), float(w.pow(2).sum()))
    norm1, norm2 = norm1 or 1.0, norm2 or 1.0
    return l1 * r0 / norm1, l2 * r0 / norm2, r0


def eq4_objective(w: torch.Tensor, w_dense: torch.Tensor, hessian: torch.Tensor, lam1: float, lam2: float,
                  group=None) -> float:
    """Eq. 4 as written: R(W) + lambda1 ||W||_1 + lambda2 ||W||_F^2; W, W_dense [d_out, d_in], H [d_in, d_in]."""
    w = w.float()
    if group is None:
        return reconstruction_loss(w, w_dense, hessian) + lam1 * float(w.abs().sum()) + lam2 * float(w.pow(2).sum())
    r, norm1, norm2 = totals(group, reconstruction_loss(w, w_dense, hessian), float(w.abs().sum()),
                             float(w.pow(2).sum()))
    return r + lam1 * norm1 + lam2 * norm2


def redense_objective(w: torch.Tensor, w_dense: torch.Tensor, w_init: torch.Tensor, hessian: torch.Tensor,
                      l1: float, l2: float) -> float:
    """J(W) of the module docstring: Eq. 4 divided by R(W_init); J(W_init) = 1 + the penalties at W_init."""
    lam1, lam2, r0 = layer_lambdas(w_dense, w_init, hessian, l1, l2)
    return eq4_objective(w, w_dense, hessian, lam1, lam2) / r0


def eq4_smooth_gradient(w: torch.Tensor, w_dense: torch.Tensor, hessian: torch.Tensor, lam2: float) -> torch.Tensor:
    """Gradient [d_out, d_in] of Eq. 4's smooth part: 2 (W - W_dense) H + 2 lambda2 W."""
    _check(w, w_dense, hessian)
    w = w.float()
    return 2.0 * (w - w_dense.float()) @ hessian.float() + 2.0 * lam2 * w


def near_zero_share(w: torch.Tensor, w_dense: torch.Tensor, group=None) -> float:
    """Share of weights with |w| <= NEAR_ZERO * RMS(W_dense) (exact zeros included)."""
    if group is None:
        return float((w.float().abs() <= NEAR_ZERO * weight_scale(w_dense)).float().mean())
    near, count = totals(group, int((w.float().abs() <= NEAR_ZERO * weight_scale(w_dense, group)).sum()), w.numel())
    return near / max(count, 1)


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
