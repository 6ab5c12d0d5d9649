"""Magnitude, Wanda and SparseGPT on 16x32 matrices: exact sparsity, N:M validity, closed forms, brute force."""
import itertools

import pytest
import torch

from sdsonnx.masks import nm_violations, sparsity_of
from sdsonnx.pattern import Pattern
from sdsonnx.prune import OPTIONS, PRUNERS, MagnitudeOptions, SparseGPTOptions, WandaOptions, options_for, prune
from sdsonnx.prune.magnitude import magnitude_prune
from sdsonnx.prune.sparsegpt import sparsegpt_prune
from sdsonnx.prune.wanda import wanda_prune
from sdsonnx.stats import LayerStats, output_error

PATTERNS = ["0.5", "0.3", "2:4", "4:8", "1:4"]
METHODS = ["magnitude", "wanda", "sparsegpt"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def correlated_inputs(tokens=384, d_in=32, rank=4, seed=0):
    """X = low-rank + noise with unequal feature scales: inputs whose Gram matrix is far from diagonal."""
    g = gen(seed)
    x = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, d_in, generator=g)
    x = x + 0.1 * torch.randn(tokens, d_in, generator=g)
    return x * torch.linspace(0.2, 3.0, d_in)[torch.randperm(d_in, generator=g)]


def layer(seed=0, d_out=16, d_in=32):
    w = torch.randn(d_out, d_in, generator=gen(seed + 100))
    stats = LayerStats(d_in)
    stats.add(correlated_inputs(d_in=d_in, seed=seed))
    return w, stats


def run(method, w, stats, pattern, **kw):
    if method == "sparsegpt" and kw:
        return sparsegpt_prune(w, stats.hessian, pattern, **kw)
    return prune(method, w, stats, pattern)


def check_result(method, w, pruned, mask, pattern):
    """Exact zeros where pruned, untouched values kept (except SparseGPT), exact counts, N:M validity."""
    assert pruned.shape == w.shape and pruned.dtype == w.dtype and mask.dtype == torch.bool
    assert (pruned[~mask] == 0).all() and (pruned[mask] != 0).all()
    if method != "sparsegpt":
        assert torch.equal(pruned[mask], w[mask])
    rows, cols = w.shape
    if pattern.is_nm:
        assert (mask.reshape(rows, -1, pattern.m).sum(-1) == pattern.n).all()
        assert len(nm_violations(pruned, pattern.n, pattern.m)) == 0
    elif method == "wanda":  # per-row comparison groups
        assert (~mask).sum(1).tolist() == [round(pattern.sparsity * cols)] * rows
    else:
        assert int((~mask).sum()) == round(pattern.sparsity * w.numel())
    assert sparsity_of(pruned) == float((~mask).sum()) / w.numel()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", PATTERNS)
def test_exact_sparsity_and_validity(method, spec):
    w, stats = layer()
    pattern = Pattern.parse(spec)
    pruned, mask = run(method, w, stats, pattern)
    check_result(method, w, pruned, mask, pattern)


def test_exact_sparsity_values():
    w, stats = layer()
    assert sparsity_of(prune("magnitude", w, stats, Pattern(sparsity=0.3))[0]) == 154 / 512
    assert sparsity_of(prune("sparsegpt", w, stats, Pattern(sparsity=0.3))[0]) == 154 / 512
    assert sparsity_of(prune("wanda", w, stats, Pattern(sparsity=0.3))[0]) == 16 * 10 / 512
    for method in METHODS:
        assert sparsity_of(prune(method, w, stats, Pattern.parse("1:4"))[0]) == 0.75


@pytest.mark.parametrize("method", METHODS)
def test_sparsity_zero_is_identity(method):
    w, stats = layer()
    pruned, mask = prune(method, w, stats, Pattern(sparsity=0.0))
    assert torch.equal(pruned, w) and mask.all()


def test_wanda_hand_made_2x4():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [40.0, 30.0, -20.0, 10.0]])
    sq_norm = torch.tensor([16.0, 4.0, 1.0, 0.25])
    # scores |W| * sqrt(sq_norm): row 0 = [4, 4, 3, 2], row 1 = [160, 60, 20, 5]; keep 2 per row
    expected = torch.tensor([[True, True, False, False], [True, True, False, False]])
    for spec in ["0.5", "2:4"]:
        pruned, mask = wanda_prune(w, sq_norm, Pattern.parse(spec))
        assert torch.equal(mask, expected)
        assert torch.equal(pruned, torch.tensor([[1.0, -2.0, 0.0, 0.0], [40.0, 30.0, 0.0, 0.0]]))
    # 1:4 keeps the best score only (row 0 ties 4 = 4: the lower index is pruned first)
    assert wanda_prune(w, sq_norm, Pattern.parse("1:4"))[1].tolist() == [[False, True, False, False],
                                                                           [True, False, False, False]]
    # per-row comparison: a whole-matrix ranking would have pruned all of row 0 at 50%
    assert wanda_prune(w, sq_norm, Pattern(sparsity=0.5))[1][0].any()


def test_magnitude_hand_made():
    w = torch.tensor([[0.1, -5.0, 0.2, 0.3], [-1.0, 2.0, 4.0, -3.0]])
    pruned, mask = magnitude_prune(w, Pattern(sparsity=0.5))  # whole-matrix ranking: 3 pruned in row 0
    assert mask.tolist() == [[False, True, False, False], [False, True, True, True]]
    assert torch.equal(pruned, torch.tensor([[0.0, -5.0, 0.0, 0.0], [0.0, 2.0, 4.0, -3.0]]))
    assert not torch.signbit(pruned).logical_and(pruned == 0).any()  # +0.0, not -0.0
    _, mask = magnitude_prune(w, Pattern.parse("2:4"))
    assert mask.tolist() == [[False, True, False, True], [False, False, True, True]]


@pytest.mark.parametrize("spec", ["0.5", "2:4"])
def test_sparsegpt_beats_wanda_and_magnitude_on_correlated_inputs(spec):
    pattern = Pattern.parse(spec)
    for seed in range(3):
        w, stats = layer(seed)
        h = stats.hessian
        errors = {m: output_error(w, prune(m, w, stats, pattern)[0], h) for m in METHODS}
        assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors
        assert errors["sparsegpt"] < 0.8 * errors["wanda"], errors


def test_sparsegpt_rank_deficient_hessian():
    w, _ = layer()
    g = gen(5)
    x = torch.randn(10, 2, generator=g) @ torch.randn(2, 32, generator=g)  # rank 2, only 10 tokens
    x[:, [3, 17]] = 0  # dead inputs
    h = x.T @ x / x.shape[0]
    for spec, percdamp in itertools.product(["0.5", "2:4"], [0.01, 0.0]):
        pattern = Pattern.parse(spec)
        pruned, mask = sparsegpt_prune(w, h, pattern, percdamp=percdamp)
        assert torch.isfinite(pruned).all()
        assert (pruned[:, [3, 17]] == 0).all()
        assert (pruned[~mask] == 0).all()
        if pattern.is_nm:
            assert len(nm_violations(pruned, 2, 4)) == 0
        else:
            assert int((~mask).sum()) == 256


def test_sparsegpt_not_psd_is_damped_and_nan_raises_clear_error():
    w, _ = layer()
    pruned, mask = sparsegpt_prune(w, -torch.eye(32), Pattern(sparsity=0.5))  # damping x10 until PD (test_errors.py)
    assert torch.isfinite(pruned).all() and int((~mask).sum()) == w.numel() // 2
    bad = torch.eye(32)
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        sparsegpt_prune(w, bad, Pattern(sparsity=0.5))


@pytest.mark.parametrize("spec", ["0.5", "0.3", "2:4", "4:8"])
def test_sparsegpt_blocksizes(spec):
    w, stats = layer()
    pattern = Pattern.parse(spec)
    h = stats.hessian
    wanda_error = output_error(w, prune("wanda", w, stats, pattern)[0], h)
    results = {}
    for blocksize in [4, 6, 8, 32, 128]:  # 6 is not a multiple of m: rounded down for n:m
        pruned, mask = sparsegpt_prune(w, h, pattern, blocksize=blocksize)
        check_result("sparsegpt", w, pruned, mask, pattern)
        assert output_error(w, pruned, h) < wanda_error  # fails without the lazy update of later blocks
        results[blocksize] = pruned, mask
    assert torch.equal(results[32][0], results[128][0])  # blocksize >= d_in: one block either way
    if pattern.is_nm:  # lazy batching is exact: the n:m sweep does not depend on the block size
        for pruned, mask in results.values():
            assert torch.equal(mask, results[128][1])
            torch.testing.assert_close(pruned, results[128][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_inputs_not_mutated(method):
    w, stats = layer()
    w[:, 0] = 0  # also a zero column
    before = (w.clone(), stats.xtx.clone(), stats.sq_norm.clone())
    prune(method, w, stats, Pattern.parse("2:4"))
    prune(method, w, stats, Pattern(sparsity=0.5))
    assert torch.equal(w, before[0]) and torch.equal(stats.xtx, before[1]) and torch.equal(stats.sq_norm, before[2])
    h = torch.eye(32)
    h[5, 5] = 0  # a dead input: SparseGPT edits its own copy of H only
    h_before = h.clone()
    sparsegpt_prune(w, h, Pattern(sparsity=0.5))
    assert torch.equal(h, h_before) and torch.equal(w, before[0])


@pytest.mark.parametrize("method", METHODS)
def test_bf16_in_bf16_out(method):
    w, stats = layer()
    wb = w.to(torch.bfloat16)
    for spec in ["0.5", "2:4"]:
        pattern = Pattern.parse(spec)
        pruned, mask = prune(method, wb, stats, pattern)
        assert pruned.dtype == torch.bfloat16
        check_result(method, wb, pruned, mask, pattern)


def obs_error(w, h, keep):
    """Least error of w [d] restricted to `keep` with the kept weights re-fitted: w_P^T (H/H_KK) w_P (OBS)."""
    keep = list(keep)
    drop = [j for j in range(len(w)) if j not in keep]
    hpp, hpk, hkk = h[drop][:, drop], h[drop][:, keep], h[keep][:, keep]
    schur = hpp - hpk @ torch.linalg.solve(hkk, hpk.T)
    return float(w[drop] @ schur @ w[drop])


def test_sparsegpt_brute_force_1x4_diagonal():
    hand_w, hand_h = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 1.0, 0.5, 0.05])
    cases = [(hand_w, hand_h)]  # w^2 h = [10, 4, 4.5, 0.8]: keep {0, 2}; magnitude would keep {2, 3}
    g = gen(7)
    cases += [(torch.randn(4, generator=g), torch.rand(4, generator=g) * 5 + 0.01) for _ in range(30)]
    for w, diag in cases:
        h = torch.diag(diag).double()
        errors = {keep: obs_error(w.double(), h, keep) for keep in itertools.combinations(range(4), 2)}
        best = min(errors, key=errors.get)
        _, mask = sparsegpt_prune(w.reshape(1, 4), h.float(), Pattern.parse("2:4"), percdamp=0.0)
        assert tuple(torch.nonzero(mask[0]).flatten().tolist()) == best, (w, diag, errors)
    _, mask = sparsegpt_prune(hand_w.reshape(1, 4), torch.diag(hand_h), Pattern.parse("2:4"), percdamp=0.0)
    assert mask.tolist() == [[True, False, True, False]]


def test_registry():
    assert set(PRUNERS) == set(OPTIONS) == {"magnitude", "wanda", "sparsegpt"}
    w, stats = layer()
    with pytest.raises(ValueError, match="magnitude, sparsegpt, wanda"):
        prune("obs", w, stats, Pattern(sparsity=0.5))
    expected = wanda_prune(w, stats.sq_norm, Pattern(sparsity=0.5))
    assert all(torch.equal(a, b) for a, b in zip(prune("wanda", w, stats, Pattern(sparsity=0.5)), expected))
    diag_only = LayerStats(32, full=False)
    diag_only.add(correlated_inputs())
    prune("wanda", w, diag_only, Pattern(sparsity=0.5))  # Wanda needs no Gram matrix
    prune("magnitude", w, LayerStats(32, full=False), Pattern(sparsity=0.5))  # magnitude needs no inputs at all


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", ["0.5", "2:4"])
def test_pruned_weights_are_positive_zeros(method, spec):
    """Every pruned weight is written as +0.0, also where W was negative (W * mask would leave -0.0)."""
    w, stats = layer()
    w = -w.abs()  # all negative
    pruned, mask = prune(method, w, stats, Pattern.parse(spec))
    assert int((pruned == 0).sum()) == int((~mask).sum()) == w.numel() // 2
    assert not bool((torch.signbit(pruned) & (pruned == 0)).any())


def test_every_method_takes_its_own_typed_options():
    w, stats = layer(d_in=64)
    pattern = Pattern.parse("2:4")
    options = SparseGPTOptions(blocksize=8, percdamp=10.0)
    assert torch.equal(prune("sparsegpt", w, stats, pattern, options)[0],
                       sparsegpt_prune(w, stats.hessian, pattern, blocksize=8, percdamp=10.0)[0])
    assert not torch.equal(prune("sparsegpt", w, stats, pattern, options)[0], prune("sparsegpt", w, stats, pattern)[0])
    assert torch.equal(prune("wanda", w, stats, pattern, WandaOptions())[0], wanda_prune(w, stats.sq_norm, pattern)[0])
    assert torch.equal(prune("magnitude", w, stats, pattern, MagnitudeOptions())[0], magnitude_prune(w, pattern)[0])
    with pytest.raises(ValueError, match="wanda takes WandaOptions, got SparseGPTOptions"):
        prune("wanda", w, stats, pattern, options)
    assert options_for("sparsegpt", {"blocksize": 8, "percdamp": 10.0, "method": "sparsegpt"}) == options
    assert options_for("wanda", {"blocksize": 8, "percdamp": 10.0}) == WandaOptions()


def test_prune_stage_builds_its_methods_options():
    from sdsonnx.recipe import PruneStage

    stage = PruneStage(kind="prune", method="sparsegpt", pattern="2:4", blocksize=16, percdamp=0.5)
    assert stage.options == SparseGPTOptions(blocksize=16, percdamp=0.5)
    assert PruneStage(kind="prune", method="wanda", sparsity=0.5, blocksize=16).options == WandaOptions()
