"""The weight-distribution figure (paper Figure 1): values drawn, titles, axis range, a valid PNG."""
import pytest
import torch

from sdsonnx.figures import axis_limit, nonzero_values, panel_titles, weight_figure


def test_nonzero_values_drop_zeros_and_negative_zero():
    w = torch.tensor([[0.0, -0.0, 1.5], [-2.0, 0.0, 3.0]])
    assert nonzero_values(w).tolist() == [1.5, -2.0, 3.0]


def test_panel_titles_name_each_stage_with_its_perplexity():
    titles = panel_titles(["prune", "redense", "second_prune"], [14.36, 59.2, None, 50.1])
    assert titles == ["dense (ppl 14.36)", "1: prune (ppl 59.2)", "2: redense", "3: second_prune (ppl 50.1)"]


def test_axis_limit_ignores_the_top_outliers():
    values = [torch.arange(1, 1001, dtype=torch.float32), torch.tensor([1e6])]
    assert axis_limit(values, share=0.999) == 1000.0  # 1000 of the 1001 values lie at or below 1000
    assert axis_limit([torch.tensor([])]) == 1.0


def test_weight_figure_writes_a_png(tmp_path):
    import matplotlib.image

    dense = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    pruned = dense * (dense.abs() > dense.abs().median())
    path = weight_figure("layer", [dense, pruned], ["dense", "1: prune"], tmp_path / "w.png")
    image = matplotlib.image.imread(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100 and image.shape[1] > 300
    with pytest.raises(ValueError, match="one title per version"):
        weight_figure("layer", [dense], ["a", "b"], tmp_path / "x.png")
