"""Re-dense weight reconstruction, paper Eq. 4, from the first-pruned weights (residual sparse characteristics).

Both solvers minimise Eq. 4, R(W) + lambda1 |W|_1 + lambda2 |W|_F^2, with the per-layer lambdas of `objective.py`
(l1, l2 relative to the first prune's error and the dense weights' norms). Eq. 4 is strictly convex for l2 > 0,
so a solver run to convergence forgets W_init; the start matters through the iteration / epoch budget (the
paper's residual sparse characteristics) and through the data (SD: inputs from the first-pruned model).
"""
from __future__ import annotations

import logging
import math
import time

import torch

from .objective import eq4_objective, largest_eigenvalue, layer_lambdas, near_zero_share, totals, weight_scale

log = logging.getLogger(__name__)


def soft_threshold(x: torch.Tensor, tau: float) -> torch.Tensor:
    """Prox of tau * ||.||_1: sign(x) * max(|x| - tau, 0), elementwise; thresholded entries are +0.0, never -0.0."""
    return soft_threshold_(x.clone(), tau)


def soft_threshold_(x: torch.Tensor, tau: float) -> torch.Tensor:
    """soft_threshold written into x itself (one more x-sized buffer for the shrunk magnitudes); returns x."""
    shrunk = x.abs().sub_(tau).clamp_(min=0.0)
    return x.sign_().mul_(shrunk).masked_fill_(~(shrunk > 0), 0.0)


def _check_inputs(w_dense: torch.Tensor, w_init: torch.Tensor, l1: float, l2: float) -> None:
    if w_dense.dim() != 2 or w_dense.shape != w_init.shape:
        raise ValueError(f"w_dense {tuple(w_dense.shape)} and w_init {tuple(w_init.shape)} must be the same 2-D shape")
    if l1 < 0 or l2 < 0:
        raise ValueError(f"l1 and l2 must be >= 0, got {l1}, {l2}")


def _info(w_init: torch.Tensor, w: torch.Tensor, w_ref: torch.Tensor, h: torch.Tensor, lam1: float, lam2: float,
          r0: float, group=None, **extra) -> dict:
    """Per-module record: J before/after (Eq. 4 / R(W_init)), the lambdas, near-zero share."""
    return {"loss_before": eq4_objective(w_init.to(w_ref.device), w_ref, h, lam1, lam2, group) / r0,
            "loss_after": eq4_objective(w, w_ref, h, lam1, lam2, group) / r0, "lambda1": lam1, "lambda2": lam2,
            "near_zero_share": near_zero_share(w, w_ref, group), **extra}


def redense_gram(w_dense: torch.Tensor, w_init: torch.Tensor, hessian: torch.Tensor, l1: float, l2: float,
                 max_iter: int = 200, tol: float = 1e-6, group=None) -> tuple[torch.Tensor, dict]:
    """Eq. 4 by FISTA on H [d_in, d_in]: W [d_out, d_in] from W_init, step 1/L, soft-threshold prox, restarts.
    `group` (sdsonnx/distributed.RankGroup): the weights are this rank's rows; Eq. 4 separates over rows, the
    lambdas, the restart test and the stopping rule use sums over every rank's rows."""
    _check_inputs(w_dense, w_init, l1, l2)
    if hessian.shape != (w_dense.shape[1], w_dense.shape[1]):
        raise ValueError(f"hessian {tuple(hessian.shape)} must be [d_in, d_in] with d_in = {w_dense.shape[1]}")
    start = time.perf_counter()
    w_ref, h_mat = w_dense.float(), hessian.float().to(w_dense.device)
    lam1, lam2, r0 = layer_lambdas(w_ref, w_init.to(w_ref.device), h_mat, l1, l2, group)
    lip = 2.0 * (largest_eigenvalue(h_mat) + lam2)  # smooth part R + lambda2 |W|^2
    if lip <= 0:
        lip = 1.0
    tau = lam1 / lip
    target = w_ref @ h_mat  # grad = 2 (W H - W_dense H) + 2 lambda2 W
    x = w_init.float().to(w_ref.device).clone()
    y, t, iters, restarts = x.clone(), 1.0, 0, 0
    for iters in range(1, max_iter + 1):
        # y - grad / L with grad = 2 (y H - target) + 2 lambda2 y, built in one buffer (same operations, same bits)
        g = (y @ h_mat).sub_(target).mul_(2.0).add_(2.0 * lam2 * y).div_(lip)
        x_new = soft_threshold_(torch.sub(y, g, out=g), tau)
        step = x_new - x
        if group is None:
            restart = float(torch.sub(y, x_new).mul_(step).sum()) > 0  # gradient restart (O'Donoghue & Candes 2015)
            rel = float(step.norm()) / max(float(x.norm()), 1e-30)
        else:
            dot, step_sq, x_sq = totals(group, float(torch.sub(y, x_new).mul_(step).sum()), float(step.pow(2).sum()),
                                        float(x.pow(2).sum()))
            restart, rel = dot > 0, step_sq ** 0.5 / max(x_sq ** 0.5, 1e-30)
        if restart:
            t_new, y = 1.0, x_new
            restarts += 1
        else:
            t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            y = step.mul_((t - 1.0) / t_new).add_(x_new)
        del g, step
        x, t = x_new, t_new
        if rel < tol:
            break
    return x, _info(w_init, x, w_ref, h_mat, lam1, lam2, r0, group, iterations=iters, restarts=restarts,
                    seconds=time.perf_counter() - start)


def _gram_of(inputs: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    """H = X^T X / N [d_in, d_in] of inputs [N, d_in], accumulated in float32 batches on `device`."""
    h = torch.zeros(inputs.shape[1], inputs.shape[1], device=device)
    for i in range(0, inputs.shape[0], batch_size):
        xb = inputs[i:i + batch_size].to(device, torch.float32)
        h.addmm_(xb.T, xb)
    return h / max(inputs.shape[0], 1)


def redense_sgd(w_dense: torch.Tensor, w_init: torch.Tensor, inputs: torch.Tensor, l1: float, l2: float,
                epochs: int = 200, lr: float = 0.1, batch_size: int = 4096, optimizer: str = "adam",
                seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Eq. 4 as in the paper: minibatch descent on J over token batches of inputs [N, d_in], from W_init.

    lr is relative: Adam moves a weight by about lr * RMS(W_dense) per step; plain SGD (momentum 0.9) steps by
    lr / L with L the Lipschitz constant of J's smooth part. The rate follows a cosine decay to 0 over the run.
    """
    _check_inputs(w_dense, w_init, l1, l2)
    if inputs.dim() != 2 or inputs.shape[1] != w_dense.shape[1] or inputs.shape[0] == 0:
        raise ValueError(f"inputs {tuple(inputs.shape)} must be [N > 0, d_in = {w_dense.shape[1]}]")
    if optimizer not in ("adam", "sgd") or epochs <= 0 or lr <= 0 or batch_size <= 0:
        raise ValueError(f"bad solver settings: optimizer={optimizer!r} epochs={epochs} lr={lr} batch_size={batch_size}")
    start = time.perf_counter()
    device = w_dense.device
    w_ref = w_dense.float()
    h_mat = _gram_of(inputs, device, batch_size)
    lam1, lam2, r0 = layer_lambdas(w_ref, w_init.to(device), h_mat, l1, l2)
    w = w_init.float().to(device).clone().requires_grad_(True)
    if optimizer == "adam":
        opt = torch.optim.Adam([w], lr=lr * weight_scale(w_ref))
    else:  # J = Eq. 4 / R(W_init) has a smooth part with Lipschitz constant 2 (lmax(H) + lambda2) / R(W_init)
        opt = torch.optim.SGD([w], lr=lr * r0 / (2.0 * (largest_eigenvalue(h_mat) + lam2)), momentum=0.9)
    steps_per_epoch = math.ceil(inputs.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=gen)
        for i in range(0, inputs.shape[0], batch_size):
            xb = inputs[order[i:i + batch_size]].to(device, torch.float32)
            err = xb @ (w - w_ref).T
            loss = (err.pow(2).sum(1).mean() + lam1 * w.abs().sum() + lam2 * w.pow(2).sum()) / r0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    w = w.detach()
    return w, _info(w_init, w, w_ref, h_mat, lam1, lam2, r0, iterations=epochs * steps_per_epoch,
                    seconds=time.perf_counter() - start)
