"""ADMM reconstruction of a fixed mask (sds/admm.py): the exact per-row solution, the pattern kept, the wiring."""
from __future__ import annotations

import itertools

import pytest
import torch

from sdsonnx.masks import nm_violations, select_mask
from sdsonnx.pattern import Pattern
from sdsonnx.sds.adjust import soft_mask_adjust
from sdsonnx.sds.admm import admm_reconstruct, masked_least_squares
from sdsonnx.sds.objective import reconstruction_loss


def _problem(d_out=8, d_in=16, n_tokens=256, seed=0, outliers=True):
    """W [d_out, d_in] and H = X X^T / N of correlated inputs, a few channels 10x larger."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(d_in) + 0.7 * torch.randn(d_in, d_in, generator=gen) / d_in ** 0.5
    x = torch.randn(n_tokens, d_in, generator=gen) @ mix
    if outliers:
        x = x * (1 + 9 * (torch.rand(d_in, generator=gen) > 0.85))
    return torch.randn(d_out, d_in, generator=gen), x.T @ x / n_tokens


def _brute_row(w_ref: torch.Tensor, keep: list[int], h: torch.Tensor) -> torch.Tensor:
    """One row's optimum on `keep` by the normal equations in float64 (torch.linalg.solve, no Cholesky)."""
    h = h.double()
    s = torch.tensor(keep)
    out = torch.zeros(h.shape[0], dtype=torch.float64)
    out[s] = torch.linalg.solve(h[s][:, s], h[s] @ w_ref.double())
    return out


@pytest.mark.parametrize("spec", ["2:4", "0.5"])
def test_masked_least_squares_is_the_per_row_optimum(spec):
    w, h = _problem()
    mask = select_mask(w.abs(), Pattern.parse(spec))
    exact = masked_least_squares(w, mask, h)
    assert torch.equal(exact != 0, mask)
    for i in range(w.shape[0]):
        ref = _brute_row(w[i], torch.nonzero(mask[i]).flatten().tolist(), h)
        assert torch.allclose(exact[i].double(), ref, rtol=1e-5, atol=1e-6)
    # stationary on the mask: the gradient 2 (W - W_ref) H vanishes on every kept weight
    grad = 2 * (exact.double() - w.double()) @ h.double()
    assert float(grad[mask].abs().max()) < 1e-4
    # and no other weights on this mask do better: random feasible perturbations only increase R
    r = reconstruction_loss(exact, w, h)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        other = exact + 1e-2 * torch.randn(w.shape, generator=gen) * mask
        assert reconstruction_loss(other, w, h) > r


def test_masked_least_squares_brute_force_mask_search_two_four():
    """On one 8-wide row the best 2:4 mask by exhaustive search of masked_least_squares equals the search's
    closed-form minimum; checks variable kept counts (matrix-wide masks) too."""
    w, h = _problem(d_out=1, d_in=8, seed=5)
    best = min(itertools.product(itertools.combinations(range(4), 2), itertools.combinations(range(4, 8), 2)),
               key=lambda c: reconstruction_loss(masked_least_squares(w, _mask_of(c[0] + c[1]), h), w, h))
    keep = list(best[0] + best[1])
    assert torch.allclose(masked_least_squares(w, _mask_of(keep), h)[0].double(), _brute_row(w[0], keep, h),
                          rtol=1e-5, atol=1e-6)
    ragged = torch.tensor([[True] * 8, [False] * 8, [True, False] * 4])  # kept counts 8, 0, 4
    w3, h3 = _problem(d_out=3, d_in=8, seed=6)
    out = masked_least_squares(w3, ragged, h3)
    assert torch.allclose(out[0], w3[0], atol=1e-5) and torch.equal(out[1], torch.zeros(8))
    assert torch.allclose(out[2].double(), _brute_row(w3[2], [0, 2, 4, 6], h3), rtol=1e-5, atol=1e-6)


def _mask_of(keep) -> torch.Tensor:
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, list(keep)] = True
    return mask


def test_masked_least_squares_singular_h_needs_damping():
    w, h = _problem(d_in=16, n_tokens=6)  # rank 6 < 8 kept per row
    mask = select_mask(w.abs(), Pattern.parse("0.5"))
    with pytest.raises(ValueError, match="damp"):
        masked_least_squares(w, mask, h)
    damped = masked_least_squares(w, mask, h, damp=0.01)
    assert torch.isfinite(damped).all() and torch.equal(damped != 0, mask)


@pytest.mark.parametrize("spec", ["2:4", "0.5"])
def test_admm_converges_to_the_exact_solution_and_keeps_the_mask(spec):
    pattern = Pattern.parse(spec)
    w, h = _problem()
    mask = select_mask(w.abs(), pattern)
    start = w * mask
    exact = masked_least_squares(w, mask, h)
    r_exact = reconstruction_loss(exact, w, h)
    z, info = admm_reconstruct(w, start, h, iterations=100, rho=0.3)
    assert torch.equal(z != 0, mask) and not bool(torch.signbit(z[~mask]).any())  # +0.0 off the mask
    if pattern.is_nm:
        assert nm_violations(z, 2, 4).shape[0] == 0
    r = reconstruction_loss(z, w, h)
    assert info["loss_after"] == pytest.approx(r, rel=1e-5)
    assert info["loss_before"] == pytest.approx(reconstruction_loss(start, w, h), rel=1e-5)
    assert r_exact <= r <= r_exact * (1 + 1e-5)
    assert float((z - exact).abs().max()) <= 1e-5  # weights ~ N(0, 1): float32 rounding
    assert info["factorisations"] == 1 and info["rho_final"] == 0.3  # a fixed mask: rho is constant
    # fewer steps: further from the optimum, but never off the mask
    z10, _ = admm_reconstruct(w, start, h, iterations=10, rho=0.3)
    assert torch.equal(z10 != 0, mask) and reconstruction_loss(z10, w, h) > r


@pytest.mark.parametrize("spec", ["2:4", "0.5"])
def test_admm_on_the_soft_masks_final_mask_is_never_worse_than_the_soft_mask(spec):
    """Both end on the same mask (the soft mask's last); ADMM solves it exactly, the soft mask only approximately."""
    pattern = Pattern.parse(spec)
    w, h = _problem(16, 32, seed=2)
    start = w * select_mask(w.abs(), pattern)
    soft, info = soft_mask_adjust(w, start, h, pattern, max_iter=30)
    z, admm = admm_reconstruct(w, soft, h, iterations=100)
    assert torch.equal(z != 0, soft != 0) or bool(((z != 0) <= (soft != 0)).all())
    assert admm["loss_after"] <= info["loss_after"] * (1 + 1e-6)
    assert admm["loss_after"] == pytest.approx(reconstruction_loss(masked_least_squares(w, soft != 0, h), w, h),
                                               rel=1e-4)


@pytest.mark.parametrize("spec, per_row", [("2:4", True), ("0.5", True), ("0.5", False)])
def test_admm_reselection_stays_within_the_pattern(spec, per_row):
    pattern = Pattern.parse(spec)
    w, h = _problem(16, 32, seed=4)
    start = w * select_mask(w.abs(), pattern, per_row=per_row)  # a poor mask: re-selection should move it
    z, info = admm_reconstruct(w, start, h, iterations=40, pattern=pattern, reselect_iterations=20, per_row=per_row)
    assert info["mask_changes"] > 0
    assert info["factorisations"] == 7 and info["rho_final"] == pytest.approx(0.1 * 1.3 ** 6)  # grows while re-selecting
    kept = z != 0
    if pattern.is_nm:
        assert nm_violations(z, 2, 4).shape[0] == 0
    elif per_row:
        assert bool((kept.sum(1) <= 16).all())
    else:
        assert int(kept.sum()) <= 16 * 16
    # the fixed-mask phase solves its mask exactly (40 - 20 steps suffice here)
    assert info["loss_after"] == pytest.approx(reconstruction_loss(masked_least_squares(w, kept, h), w, h), rel=1e-3)
    assert info["loss_after"] < reconstruction_loss(masked_least_squares(w, start != 0, h), w, h)


def test_admm_handles_dead_input_channels_and_rejects_bad_input():
    w, h = _problem()
    h[3, :] = 0.0
    h[:, 3] = 0.0  # a channel that is always zero: H singular, its weight free
    mask = select_mask(w.abs(), Pattern.parse("2:4"))
    z, info = admm_reconstruct(w, w * mask, h, iterations=60)
    assert torch.isfinite(z).all() and bool(((z != 0) <= mask).all())
    assert torch.allclose(z[:, 3], w[:, 3] * mask[:, 3], atol=1e-5)  # R does not see it: it stays where it started
    damped = masked_least_squares(w, mask, h, damp=1e-6)
    assert info["loss_after"] == pytest.approx(reconstruction_loss(damped, w, h), rel=1e-4)
    with pytest.raises(ValueError, match="off the mask"):
        admm_reconstruct(w, w, h, mask=mask)
    with pytest.raises(ValueError, match="pattern"):
        admm_reconstruct(w, w * mask, h, reselect_iterations=3)
    with pytest.raises(ValueError, match="rho"):
        admm_reconstruct(w, w * mask, h, rho=0.0)


@pytest.mark.parametrize("world, spec, per_row", [(2, "2:4", True), (3, "0.5", False)])
def test_admm_on_row_split_ranks_equals_one_process(world, spec, per_row):
    import test_distributed as dist_tests

    pattern = Pattern.parse(spec)
    w, h = _problem(12, 32, seed=8)
    start = w * select_mask(w.abs(), pattern, per_row=per_row)

    def solve(rows, group):
        return admm_reconstruct(w[rows], start[rows], h, iterations=30, pattern=pattern, reselect_iterations=10,
                                per_row=per_row, group=group)

    one, info = solve(slice(None), None)
    parts = dist_tests.on_threads(world, lambda g: solve(g.row_slice(w.shape[0]), g))
    two = torch.cat([p[0] for p in parts])
    assert torch.equal(one != 0, two != 0)
    assert float((one - two).abs().max()) <= 1e-5
    assert all(p[1]["loss_after"] == pytest.approx(info["loss_after"], rel=1e-5) for p in parts)


@pytest.mark.parametrize("world, spec", [(2, "2:4"), (3, "0.5")])
def test_second_prune_with_admm_on_row_split_ranks_equals_one_process(world, spec):
    import test_distributed as dist_tests
    from sdsonnx.sds.second_prune import second_prune
    from sdsonnx.stats import LayerStats

    pattern = Pattern.parse(spec)
    w, h = _problem(12, 32, seed=9)
    stats = LayerStats(32, xtx=h * 256, sq_norm=torch.diagonal(h) * 256, count=256)
    first = w * select_mask(w.abs(), pattern)
    noisy = w + 0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(2))

    def solve(rows, group):
        return second_prune("sparsegpt", w[rows], noisy[rows], first[rows], stats, pattern, solver="admm",
                            admm_iterations=30, admm_reselect=10, group=group)

    one, info = solve(slice(None), None)
    parts = dist_tests.on_threads(world, lambda g: solve(g.row_slice(w.shape[0]), g))
    two = torch.cat([p[0] for p in parts])
    assert torch.equal(one != 0, two != 0) and float((one - two).abs().max()) <= 1e-5
    assert all(p[1]["kept"] == info["kept"] == "adjusted" for p in parts)
    assert all(p[1]["loss_adjusted"] == pytest.approx(info["loss_adjusted"], rel=1e-5) for p in parts)


def test_second_prune_with_admm_is_never_worse_and_reports_it():
    from sdsonnx.sds.second_prune import second_prune
    from sdsonnx.stats import LayerStats

    w, h = _problem(16, 64, seed=1)
    stats = LayerStats(64, xtx=h * 256, sq_norm=torch.diagonal(h) * 256, count=256)
    pattern = Pattern.parse("2:4")
    first = w * select_mask(w.abs(), pattern)
    noisy = w + 0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    out, info = second_prune("sparsegpt", w, noisy, first, stats, pattern, solver="admm", admm_iterations=60)
    assert info["adjust_solver"] == "admm" and info["adjust_iterations"] == 60 and info["kept"] == "adjusted"
    assert info["loss_adjusted"] < min(info["loss_first"], info["loss_second"])
    assert nm_violations(out, 2, 4).shape[0] == 0
    soft, soft_info = second_prune("sparsegpt", w, noisy, first, stats, pattern)
    assert soft_info["adjust_solver"] == "soft_mask" and soft_info["loss_second"] == info["loss_second"]
    with pytest.raises(ValueError, match="solver"):
        second_prune("sparsegpt", w, noisy, first, stats, pattern, solver="lbfgs")


def test_recipe_fields_and_a_tiny_pipeline_run():
    from sdsonnx.blocks import target_linears
    from sdsonnx.pipeline import prune_model
    from sdsonnx.recipe import RecipeError, parse_recipe
    from tiny_models import calibration, tiny

    def recipe(second):
        return parse_recipe({"model": "unused", "device": "cpu", "evaluation": None,
                             "stages": [{"kind": "prune", "method": "sparsegpt", "pattern": "2:4"},
                                        {"kind": "redense", "max_iter": 10}, {"kind": "second_prune", **second}]})

    default = recipe({}).stages[2]
    assert (default.adjust_solver, default.admm_iterations, default.admm_reselect) == ("admm", 50, 30)
    with pytest.raises(RecipeError):
        recipe({"adjust_solver": "admm", "admm_iterations": 5, "admm_reselect": 6})
    model = tiny("llama")
    result = prune_model(model, recipe({"adjust_solver": "admm", "admm_iterations": 20, "admm_reselect": 5}),
                         calibration(), progress=False)
    for name, rec in result.modules.items():
        second = rec.stages[2].details
        assert second["adjust_solver"] == "admm" and second["adjust_iterations"] == 20, name
        assert second["loss_" + second["kept"]] <= second["loss_first"]
    for mods in target_linears(model).values():
        for name, m in mods.items():
            assert nm_violations(m.weight.detach(), 2, 4).shape[0] == 0, name


def test_admm_damp_is_a_per_input_ridge_and_masked_least_squares_an_isotropic_one():
    """admm_reconstruct's damp adds damp * diag(H) (damp I in its Jacobi-scaled coordinates); masked_least_squares'
    adds damp * mean(diag H) I: each converges to the exact optimum of its own damped objective."""
    w, h = _problem(outliers=True)
    mask = select_mask(w.abs(), Pattern.parse("2:4"))
    damp = 0.2
    z, _ = admm_reconstruct(w, w * mask, h, iterations=400, damp=damp)
    per_input = masked_least_squares(w, mask, h + damp * torch.diag(torch.diagonal(h)))
    assert torch.allclose(z, per_input, rtol=1e-3, atol=1e-4)
    isotropic = masked_least_squares(w, mask, h, damp=damp)
    assert torch.allclose(isotropic, masked_least_squares(w, mask, h + damp * float(torch.diagonal(h).mean())
                                                          * torch.eye(h.shape[0])), atol=1e-6)
    assert not torch.allclose(z, isotropic, rtol=1e-3, atol=1e-4)  # the outlier channels make the two differ
