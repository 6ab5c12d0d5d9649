"""Soft-mask weight adjustment (paper Eq. 5): exact pattern at every iterate, never worse, brute-force check."""
from __future__ import annotations

import itertools

import pytest
import torch

from sdsonnx.masks import nm_violations, select_mask
from sdsonnx.pattern import Pattern
from sdsonnx.sds.adjust import satisfies_pattern, soft_mask_adjust
from sdsonnx.sds.objective import reconstruction_loss


def _problem(d_out=16, d_in=32, n_tokens=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(d_in) + 0.5 * torch.randn(d_in, d_in, generator=gen) / d_in ** 0.5
    x = torch.randn(n_tokens, d_in, generator=gen) @ mix
    w_dense = torch.randn(d_out, d_in, generator=gen)
    return w_dense, x.T @ x / n_tokens


def _exact(w: torch.Tensor, pattern: Pattern) -> bool:
    if pattern.is_nm:
        groups = (w != 0).reshape(w.shape[0], -1, pattern.m).sum(-1)
        return bool((groups <= pattern.n).all())
    return bool(((w != 0).sum(1) <= round((1 - pattern.sparsity) * w.shape[1])).all())


@pytest.mark.parametrize("precondition", [True, False])
@pytest.mark.parametrize("spec,moves", [("0.5", True), ("2:4", True), ("0.75", False)])
def test_pattern_exact_at_every_iterate_and_never_worse(spec, moves, precondition):
    pattern = Pattern.parse(spec)
    w_dense, h = _problem()
    start = w_dense * select_mask(w_dense.abs(), pattern)  # magnitude prune: a poor mask for correlated inputs
    seen = []

    def record(i, w, mask):
        assert _exact(w, pattern) and torch.equal(w != 0, mask & (w != 0)) and not (w[~mask] != 0).any()
        assert int(mask.sum()) == int(start.ne(0).sum())
        seen.append(reconstruction_loss(w, w_dense, h))

    w, info = soft_mask_adjust(w_dense, start, h, pattern, max_iter=60, tol=0.0, callback=record,
                               precondition=precondition)
    assert len(seen) == 60 == info["iterations"]
    assert _exact(w, pattern) and satisfies_pattern(w, pattern)
    if pattern.is_nm:
        assert nm_violations(w, pattern.n, pattern.m).shape[0] == 0
    r0 = reconstruction_loss(start, w_dense, h)
    assert info["loss_before"] == pytest.approx(r0, rel=1e-5)
    assert info["loss_after"] == pytest.approx(reconstruction_loss(w, w_dense, h), rel=1e-4)
    assert info["loss_after"] == pytest.approx(min(seen), rel=1e-4)
    assert info["loss_after"] < (0.9 if moves else 0.95) * r0  # adjustment clearly helps over magnitude pruning
    if moves:
        assert info["mask_changes"] > 0  # the soft mask really is re-selected


def test_preconditioning_converges_faster_with_an_outlier_input_channel():
    w_dense, h = _problem(16, 32, 256, seed=7)
    d = torch.ones(32)
    d[3], d[17] = 40.0, 25.0  # LLM-like: a few input channels carry most of the energy
    h = h * d[:, None] * d[None, :]
    pattern = Pattern.parse("2:4")
    start = w_dense * select_mask(w_dense.abs(), pattern)
    _, plain = soft_mask_adjust(w_dense, start, h, pattern, max_iter=30, tol=0.0, precondition=False)
    _, scaled = soft_mask_adjust(w_dense, start, h, pattern, max_iter=30, tol=0.0)
    assert scaled["loss_after"] < 0.9 * plain["loss_after"] < plain["loss_before"]


def test_never_returns_worse_than_start():
    # start at the exact optimum of its own mask: nothing can beat it on that mask, and R must not rise
    w_dense, h = _problem(4, 8, 64, seed=3)
    pattern = Pattern.parse("2:4")
    mask = select_mask(w_dense.abs(), pattern)
    start = torch.zeros_like(w_dense)
    for i in range(4):
        idx = mask[i].nonzero().squeeze(1)  # least squares on the support: H_SS w_S = (H w_dense)_S
        start[i, idx] = torch.linalg.solve(h[idx][:, idx].double(), (h @ w_dense[i]).double()[idx]).float()
    w, info = soft_mask_adjust(w_dense, start, h, pattern, max_iter=1)
    assert reconstruction_loss(w, w_dense, h) <= reconstruction_loss(start, w_dense, h) * (1 + 1e-6)


def test_matches_brute_force_mask_search_on_a_tiny_problem():
    # 1 row, 8 inputs, 2:4: all 36 masks, each with its least-squares weights; the adjusted R lies between the
    # global optimum and the least-squares optimum of the start mask
    w_dense, h = _problem(1, 8, 64, seed=5)
    pattern = Pattern.parse("2:4")
    start = w_dense * select_mask(w_dense.abs(), pattern)

    def ls(idx):
        w = torch.zeros(8, dtype=torch.float64)
        hd = h.double()
        w[idx] = torch.linalg.solve(hd[idx][:, idx], (hd @ w_dense[0].double())[idx])
        return float((w - w_dense[0].double()) @ hd @ (w - w_dense[0].double()))

    groups = [list(itertools.combinations(range(g * 4, g * 4 + 4), 2)) for g in range(2)]
    best = min(ls(list(a + b)) for a in groups[0] for b in groups[1])
    on_start = ls(start[0].nonzero().squeeze(1).tolist())
    w, info = soft_mask_adjust(w_dense, start, h, pattern, max_iter=500, tol=1e-9)
    assert best * (1 - 1e-4) <= info["loss_after"] <= on_start * (1 + 1e-4)


def test_matrix_wide_unstructured():
    w_dense, h = _problem()
    pattern = Pattern(sparsity=0.5)
    start = w_dense * select_mask(w_dense.abs(), pattern, per_row=False)
    w, info = soft_mask_adjust(w_dense, start, h, pattern, max_iter=30, per_row=False)
    assert int((w != 0).sum()) <= w.numel() // 2 and info["loss_after"] < info["loss_before"]


def test_rejects_a_start_outside_the_pattern():
    w_dense, h = _problem()
    with pytest.raises(ValueError):
        soft_mask_adjust(w_dense, w_dense, h, Pattern.parse("2:4"))


# --- second prune (paper Sec. 2.3): early exit, adjustment, never worse than the first prune -------------------

from sdsonnx.prune import prune  # noqa: E402
from sdsonnx.sds.second_prune import second_prune  # noqa: E402
from sdsonnx.stats import LayerStats  # noqa: E402


def _stats(d_in=32, n_tokens=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(d_in) + 0.5 * torch.randn(d_in, d_in, generator=gen) / d_in ** 0.5
    stats = LayerStats(d_in)
    stats.add(torch.randn(n_tokens, d_in, generator=gen) @ mix)
    return stats, torch.randn(16, d_in, generator=gen)


def test_second_prune_early_exit_when_one_shot_already_wins():
    stats, w_dense = _stats()
    pattern = Pattern.parse("2:4")
    bad_first = w_dense * select_mask(-w_dense.abs(), pattern)  # keeps the smallest weights
    w, info = second_prune("magnitude", w_dense, w_dense, bad_first, stats, pattern, adjust=True, early_exit=True)
    assert info["early_exit"] and info["kept"] == "second" and info["loss_adjusted"] is None
    assert torch.equal(w, w_dense * select_mask(w_dense.abs(), pattern))
    assert info["loss_second"] < info["loss_first"]


def test_second_prune_adjusts_when_the_one_shot_prune_does_not_win():
    stats, w_dense = _stats()
    pattern = Pattern.parse("0.5")
    first, _ = prune("magnitude", w_dense, stats, pattern)  # the re-dense equals dense: second == first
    w, info = second_prune("magnitude", w_dense, w_dense, first, stats, pattern, adjust=True, max_iter=50)
    assert not info["early_exit"] and info["kept"] == "adjusted"
    assert info["loss_second"] == pytest.approx(info["loss_first"])
    assert reconstruction_loss(w, w_dense, stats.hessian) < info["loss_first"]
    assert satisfies_pattern(w, pattern, per_row=False)  # magnitude ranks matrix-wide: adjusted matrix-wide


@pytest.mark.parametrize("adjust", [True, False])
def test_second_prune_keeps_the_first_when_the_redense_is_bad(adjust):
    stats, w_dense = _stats()
    pattern = Pattern.parse("0.5")
    h = stats.hessian
    first, _ = soft_mask_adjust(w_dense, w_dense * select_mask(w_dense.abs(), pattern), h, pattern, max_iter=200)
    bad_redense = -5.0 * w_dense.flip(1)  # unrelated weights
    w, info = second_prune("wanda", w_dense, bad_redense, first, stats, pattern, adjust=adjust, max_iter=2)
    assert info["kept"] == "first" and not info["early_exit"] and torch.equal(w, first)
    assert info["loss_second"] > info["loss_first"]
    if adjust:
        assert info["loss_first"] <= info["loss_adjusted"] <= info["loss_second"]
    else:
        assert info["loss_adjusted"] is None


def test_second_prune_with_sparsegpt_blockwise_masks():
    stats, w_dense = _stats(d_in=64)
    pattern = Pattern.parse("0.6")
    first = w_dense * select_mask(w_dense.abs(), pattern)
    noisy = w_dense + 0.3 * torch.randn(w_dense.shape, generator=torch.Generator().manual_seed(1))
    w, info = second_prune("sparsegpt", w_dense, noisy, first, stats, pattern, adjust=True, max_iter=20)
    assert info["kept"] in ("second", "adjusted")  # magnitude first prune is weak; the result must beat it
    assert reconstruction_loss(w, w_dense, stats.hessian) < info["loss_first"]
    assert int((w != 0).sum()) <= w.numel() - round(0.6 * w.numel())


def test_second_prune_without_early_exit_adjusts_even_when_the_one_shot_prune_wins():
    stats, w_dense = _stats()
    pattern = Pattern.parse("2:4")
    bad_first = w_dense * select_mask(-w_dense.abs(), pattern)
    w, info = second_prune("magnitude", w_dense, w_dense, bad_first, stats, pattern)
    assert not info["early_exit"] and info["kept"] == "adjusted"
    assert info["loss_adjusted"] < info["loss_second"] < info["loss_first"]
    assert reconstruction_loss(w, w_dense, stats.hessian) == pytest.approx(info["loss_adjusted"], rel=1e-4)


def test_second_prune_stage_reuses_the_first_prunes_sparsegpt_options():
    from sdsonnx.prune.sparsegpt import sparsegpt_prune
    from sdsonnx.recipe import PruneStage, SecondPruneStage
    from sdsonnx.stages import ModuleContext, second_prune_stage

    stats, w_dense = _stats(d_in=64)
    pattern = Pattern.parse("2:4")
    noisy = w_dense + 0.3 * torch.randn(w_dense.shape, generator=torch.Generator().manual_seed(1))
    first = w_dense * select_mask(w_dense.abs(), pattern)
    # heavy dampening: a different SparseGPT than the defaults'
    first_prune = PruneStage(kind="prune", method="sparsegpt", pattern="2:4", blocksize=8, percdamp=10.0)
    ctx = ModuleContext(name="fc", dense=w_dense, first_pruned=first, stats=stats, pattern=pattern,
                        first_prune=first_prune)
    _, info = second_prune_stage(SecondPruneStage(kind="second_prune", adjust=False), noisy, ctx)
    expected, _ = sparsegpt_prune(noisy, stats.hessian, pattern, blocksize=8, percdamp=10.0)
    default, _ = sparsegpt_prune(noisy, stats.hessian, pattern)
    assert info["loss_second"] == pytest.approx(reconstruction_loss(expected, w_dense, stats.hessian), rel=1e-6)
    assert info["loss_second"] != pytest.approx(reconstruction_loss(default, w_dense, stats.hessian), rel=1e-3)


def _negative_zeros(w: torch.Tensor) -> int:
    return int((torch.signbit(w) & (w == 0)).sum())


def test_reselect_writes_positive_zeros_where_it_prunes():
    """V * mask left -0.0 for every pruned negative V; the soft mask writes +0.0 (a byte-level consumer sees it)."""
    from sdsonnx.sds.adjust import _reselect

    v = torch.tensor([[-3.0, -0.5, 2.0, -0.25], [1.0, -4.0, -0.1, 0.2]])
    w, mask = _reselect(v, Pattern.parse("2:4"), per_row=True)
    assert mask.tolist() == [[True, False, True, False], [True, True, False, False]]
    assert w.tolist() == [[-3.0, 0.0, 2.0, 0.0], [1.0, -4.0, 0.0, 0.0]]
    assert _negative_zeros(w) == 0 and _negative_zeros(v * mask) == 3  # what the old product left


@pytest.mark.parametrize("precondition", [True, False])
def test_adjusted_weights_have_no_negative_zeros(precondition):
    w_dense, h = _problem()
    pattern = Pattern.parse("2:4")
    start = w_dense * select_mask(-w_dense.abs(), pattern)
    w, _ = soft_mask_adjust(w_dense, torch.where(start != 0, start, 0.0), h, pattern, max_iter=20,
                            precondition=precondition)
    assert int((w == 0).sum()) == w.numel() // 2 and _negative_zeros(w) == 0
