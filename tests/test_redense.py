"""Re-dense reconstruction (paper Eq. 4): closed form, KKT conditions, SGD vs Gram, normalisation."""
from __future__ import annotations

import pytest
import torch

from sdsonnx.sds.objective import (eq4_objective, eq4_smooth_gradient, layer_lambdas, near_zero_share,
                                   reconstruction_loss, redense_objective)
from sdsonnx.sds.redense import redense_gram, redense_sgd, soft_threshold


def _problem(d_out=16, d_in=32, n_tokens=256, x_scale=1.0, w_scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(d_in) + 0.3 * torch.randn(d_in, d_in, generator=gen) / d_in ** 0.5
    x = x_scale * torch.randn(n_tokens, d_in, generator=gen) @ mix  # correlated inputs
    w_dense = w_scale * torch.randn(d_out, d_in, generator=gen)
    w_init = w_dense * (torch.rand(d_out, d_in, generator=gen) > 0.5)
    return w_dense, w_init, x, x.T @ x / n_tokens


def test_objective_matches_token_mean_definition():
    w_dense, w_init, x, h = _problem()
    l1, l2 = 0.3, 0.2
    data = ((x @ (w_dense - w_init).T) ** 2).sum(1).mean()
    assert reconstruction_loss(w_init, w_dense, h) == pytest.approx(float(data), rel=1e-5)
    lam1, lam2, r0 = layer_lambdas(w_dense, w_init, h, l1, l2)
    assert r0 == pytest.approx(float(data), rel=1e-5)
    assert lam1 == pytest.approx(l1 * float(data) / float(w_dense.abs().sum()), rel=1e-5)
    assert lam2 == pytest.approx(l2 * float(data) / float(w_dense.pow(2).sum()), rel=1e-5)
    w = 0.5 * w_dense
    eq4 = ((x @ (w_dense - w).T) ** 2).sum(1).mean() + lam1 * w.abs().sum() + lam2 * w.pow(2).sum()
    assert eq4_objective(w, w_dense, h, lam1, lam2) == pytest.approx(float(eq4), rel=1e-5)
    # J = Eq. 4 / R(W_init): 1 + l1 + l2 at W_dense's norms, so J(W_init) = 1 + penalties of W_init
    expect = 1 + l1 * float(w_init.abs().sum() / w_dense.abs().sum()) + l2 * float(w_init.pow(2).sum() / w_dense.pow(2).sum())
    assert redense_objective(w_init, w_dense, w_init, h, l1, l2) == pytest.approx(expect, rel=1e-5)


def test_lambdas_are_invariant_to_input_and_weight_scale():
    w_dense, w_init, x, h = _problem()
    ref, _ = redense_gram(w_dense, w_init, h, 0.1, 0.1, max_iter=300, tol=1e-8)
    scaled, _ = redense_gram(3.0 * w_dense, 3.0 * w_init, 100.0 * h, 0.1, 0.1, max_iter=300, tol=1e-8)
    torch.testing.assert_close(scaled, 3.0 * ref, rtol=1e-3, atol=1e-4)


def test_smooth_gradient_matches_autograd():
    w_dense, w_init, _, h = _problem()
    w = w_init.clone().requires_grad_(True)
    f = torch.einsum("ij,jk,ik->", w - w_dense, h, w - w_dense) + 0.2 * w.pow(2).sum()
    f.backward()
    torch.testing.assert_close(eq4_smooth_gradient(w_init, w_dense, h, 0.2), w.grad, rtol=1e-4, atol=1e-6)


def test_soft_threshold():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5])
    assert soft_threshold(x, 0.5).tolist() == [-1.5, 0.0, 0.0, 0.0, 1.0]


def test_gram_reaches_ridge_closed_form_when_l1_is_zero():
    w_dense, w_init, _, h = _problem()
    l2 = 0.5
    w, info = redense_gram(w_dense, w_init, h, 0.0, l2, max_iter=3000, tol=1e-9)
    _, lam2, _ = layer_lambdas(w_dense, w_init, h, 0.0, l2)
    # normal equations of tr(D H D^T) + lambda2 |W|^2: W (H + lambda2 I) = W_dense H
    closed = torch.linalg.solve((h + lam2 * torch.eye(32)).double(), (h @ w_dense.T).double()).T
    assert (w.double() - closed).abs().max() < 1e-4
    assert info["loss_after"] < info["loss_before"]
    assert info["loss_after"] == pytest.approx(redense_objective(closed.float(), w_dense, w_init, h, 0.0, l2), rel=1e-5)


@pytest.mark.parametrize("l1,l2", [(0.1, 0.1), (1.0, 0.1), (0.5, 0.0)])
def test_gram_solution_satisfies_kkt(l1, l2):
    w_dense, w_init, _, h = _problem()
    w, info = redense_gram(w_dense, w_init, h, l1, l2, max_iter=3000, tol=1e-9)
    lam1, lam2, _ = layer_lambdas(w_dense, w_init, h, l1, l2)
    grad = eq4_smooth_gradient(w, w_dense, h, lam2)  # optimality: 0 in grad + lambda1 * subdifferential |w|
    tol = 1e-3 * lam1
    nz = w != 0
    assert (grad[nz] + lam1 * torch.sign(w[nz])).abs().max() < tol
    assert (grad[~nz].abs() <= lam1 + tol).all()
    assert (~nz).any(), "l1 > 0 should zero some weights exactly"
    assert info["loss_after"] < info["loss_before"]


def test_gram_iteration_budget_keeps_the_start_relevant():
    w_dense, w_init, _, h = _problem()
    one, info = redense_gram(w_dense, w_init, h, 0.1, 0.1, max_iter=1)
    assert info["iterations"] == 1 and not torch.equal(one, w_init)
    assert info["loss_after"] < info["loss_before"]


@pytest.mark.parametrize("l1,floor", [(0.1, 0.02), (1.0, 0.15)])  # measured: 0.037-0.040, 0.25-0.30
def test_same_l1_gives_similar_near_zero_share_across_size_and_scale(l1, floor):
    shares = []
    for d_out, d_in, xs, ws in [(16, 32, 1.0, 1.0), (64, 128, 30.0, 0.01), (32, 256, 0.05, 3.0)]:
        w_dense, w_init, _, h = _problem(d_out, d_in, 8 * d_in, xs, ws, seed=d_in)
        w, _ = redense_gram(w_dense, w_init, h, l1, 0.1, max_iter=3000, tol=1e-9)
        shares.append(near_zero_share(w, w_dense))
    assert min(shares) > floor and max(shares) - min(shares) < 0.25 * min(shares), shares


def test_sgd_decreases_objective_and_lands_near_gram():
    w_dense, w_init, x, h = _problem(8, 16, 512)
    l1, l2 = 0.1, 0.1
    ref, _ = redense_gram(w_dense, w_init, h, l1, l2, max_iter=3000, tol=1e-9)
    for opt in ("adam", "sgd"):
        w, info = redense_sgd(w_dense, w_init, x, l1, l2, epochs=100, lr=0.05, batch_size=256, optimizer=opt)
        assert info["loss_after"] < info["loss_before"]
        assert info["loss_after"] < redense_objective(ref, w_dense, w_init, h, l1, l2) * (1 + 1e-4), opt
        assert (w - ref).norm() / ref.norm() < 0.005, opt


def test_sgd_is_seeded():
    w_dense, w_init, x, _ = _problem(8, 16, 256)
    a, _ = redense_sgd(w_dense, w_init, x, 0.1, 0.1, epochs=3, batch_size=64, seed=1)
    b, _ = redense_sgd(w_dense, w_init, x, 0.1, 0.1, epochs=3, batch_size=64, seed=1)
    assert torch.equal(a, b)


def test_bad_inputs_raise():
    w_dense, w_init, x, h = _problem()
    with pytest.raises(ValueError):
        redense_gram(w_dense, w_init[:, :16], h, 0.1, 0.1)
    with pytest.raises(ValueError):
        redense_gram(w_dense, w_init, h, -1.0, 0.1)
    with pytest.raises(ValueError):
        redense_sgd(w_dense, w_init, x[:, :8], 0.1, 0.1)


def test_soft_threshold_writes_positive_zeros():
    """sign(x) * max(|x| - tau, 0) is -0.0 for every thresholded negative x; the prox writes +0.0 there."""
    x = torch.tensor([-2.0, -0.5, -0.0, 0.0, 0.25, 3.0])
    out = soft_threshold(x, 1.0)
    assert out.tolist() == [-1.0, 0.0, 0.0, 0.0, 0.0, 2.0]
    assert not bool((torch.signbit(out) & (out == 0)).any())
    w_dense, w_init, x, h = _problem()
    w, _ = redense_gram(w_dense, w_init, h, 5.0, 0.1, max_iter=30)  # heavy l1: many exact zeros
    assert int((w == 0).sum()) > 0 and not bool((torch.signbit(w) & (w == 0)).any())
