"""Masks (True = kept) and N:M checks on small hand-made and random matrices."""
import pytest
import torch

from sdsonnx.masks import nm_mask, nm_violations, select_mask, sparsity_of, topk_mask
from sdsonnx.pattern import Pattern


def scores(rows=16, cols=32, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_topk_per_row_exact_count(sparsity):
    s = scores()
    mask = topk_mask(s, sparsity, per_row=True)
    assert mask.dtype == torch.bool and mask.shape == s.shape
    assert (~mask).sum(1).tolist() == [round(sparsity * 32)] * 16
    # every kept score >= every pruned score of its row
    for row, keep in zip(s, mask):
        if (~keep).any() and keep.any():
            assert row[keep].min() >= row[~keep].max()


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_topk_whole_matrix_exact_count(sparsity):
    s = scores()
    mask = topk_mask(s, sparsity, per_row=False)
    assert int((~mask).sum()) == round(sparsity * s.numel())
    assert s[mask].min() >= s[~mask].max()
    # whole-matrix ranking differs from per-row here
    assert not torch.equal(mask, topk_mask(s, sparsity, per_row=True))


def test_topk_hand_made_and_ties():
    s = torch.tensor([[3.0, 1.0, 2.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    expected = torch.tensor([[True, False, True, False], [False, False, True, True]])
    assert torch.equal(topk_mask(s, 0.5, per_row=True), expected)  # ties: lower index pruned first
    assert torch.equal(topk_mask(s, 0.5, per_row=False),
                       torch.tensor([[True, False, True, False], [False, False, True, True]]))


def test_nm_mask_hand_made():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0, -1.0, -5.0, 0.0, 7.0]])
    assert nm_mask(s, 2, 4).tolist() == [[True, False, True, False, False, False, True, True]]
    assert nm_mask(s, 1, 4).tolist() == [[True, False, False, False, False, False, False, True]]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_valid_and_exact(n, m):
    s = scores()
    mask = nm_mask(s, n, m)
    assert (mask.reshape(16, -1, m).sum(-1) == n).all()
    assert len(nm_violations(s * mask, n, m)) == 0
    assert len(nm_violations(s, n, m)) == 16 * 32 // m  # dense: every group violates


def test_nm_mask_bad_shape_names_shape():
    with pytest.raises(ValueError, match=r"\(3, 6\)"):
        nm_mask(torch.ones(3, 6), 2, 4)


def test_select_mask_dispatch():
    s = scores()
    assert torch.equal(select_mask(s, Pattern.parse("2:4")), nm_mask(s, 2, 4))
    assert torch.equal(select_mask(s, Pattern(sparsity=0.5)), topk_mask(s, 0.5, per_row=True))
    assert torch.equal(select_mask(s, Pattern(sparsity=0.5), per_row=False), topk_mask(s, 0.5, per_row=False))


def test_nm_violations_planted_group_axis1_negative_zero():
    w = torch.tensor([[1.0, 0.0, 2.0, -0.0, 0.0, 0.0, 0.0, 3.0],
                      [1.0, 2.0, -0.0, -0.0, 1.0, 1.0, 1.0, 0.0]])
    assert nm_violations(w, 2, 4).tolist() == [[1, 1]]
    assert nm_violations(w, 1, 4).tolist() == [[0, 0], [1, 0], [1, 1]]
    assert nm_violations(w, 3, 4).tolist() == []


def test_nm_violations_axis0_transposed():
    w = torch.zeros(8, 3)  # [in, out]: groups of m inputs run down each column
    w[0:2, 0] = 1.0
    w[4:7, 2] = torch.tensor([1.0, -2.0, 3.0])
    w[3, 2] = -0.0
    w[0, 1], w[5, 1] = 1.0, 2.0
    assert nm_violations(w, 2, 4, axis=0).tolist() == [[2, 1]]
    assert torch.equal(nm_violations(w, 2, 4, axis=0), nm_violations(w.T, 2, 4, axis=1))
    with pytest.raises(ValueError, match="multiple"):
        nm_violations(w, 2, 4, axis=1)


def test_nm_violations_bad_input():
    with pytest.raises(ValueError):
        nm_violations(torch.ones(2, 6), 2, 4)
    with pytest.raises(ValueError):
        nm_violations(torch.ones(2, 2, 4), 2, 4)


def test_sparsity_of():
    w = torch.tensor([[0.0, -0.0, 1.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    assert sparsity_of(w) == 5 / 8
    assert sparsity_of(w.to(torch.bfloat16)) == 5 / 8


@pytest.mark.parametrize("spec,per_row", [("2:4", True), ("4:8", True), ("0.5", True), ("0.3", False)])
def test_keep_largest_agrees_with_select_mask_without_ties(spec, per_row):
    from sdsonnx.masks import keep_largest

    scores = torch.randn(12, 32, generator=torch.Generator().manual_seed(4))  # continuous: no ties
    pattern = Pattern.parse(spec)
    assert torch.equal(keep_largest(scores, pattern, per_row), select_mask(scores, pattern, per_row))
