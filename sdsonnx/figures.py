"""Weight-distribution figure of one module after each stage (paper Figure 1): dense, first prune, re-dense, final.

Zeros are left out of every histogram, as in the paper, so a pruned panel shows the kept weights only.
"""
from __future__ import annotations

from pathlib import Path

import torch

FIGURE_FILE = "weights.png"


def nonzero_values(w: torch.Tensor) -> torch.Tensor:
    """The nonzero entries of W (any shape) as a flat float32 tensor."""
    flat = w.detach().float().flatten()
    return flat[flat != 0]


def panel_titles(kinds: list[str], perplexities: list[float | None]) -> list[str]:
    """'dense' + one title per stage ('1: prune', '2: redense', ...), each with its perplexity when known."""
    names = ["dense"] + [f"{i}: {kind}" for i, kind in enumerate(kinds, start=1)]
    return [name if ppl is None else f"{name} (ppl {ppl:.4g})" for name, ppl in zip(names, perplexities)]


def axis_limit(values: list[torch.Tensor], share: float = 0.999) -> float:
    """The |w| below which `share` of all nonzero weights lie: the x-range, so a few outliers don't squeeze the rest."""
    pooled = torch.cat([v.abs() for v in values])
    if pooled.numel() == 0:
        return 1.0
    k = max(1, min(pooled.numel(), round(share * pooled.numel())))
    return float(torch.kthvalue(pooled, k).values) or 1.0


def weight_figure(module: str, versions: list[torch.Tensor], titles: list[str], path: str | Path,
                  bins: int = 120) -> Path:
    """Draw one histogram of the nonzero weights per version [d_out, d_in] side by side; write a PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not versions or len(versions) != len(titles):
        raise ValueError(f"need one title per version, got {len(versions)} versions and {len(titles)} titles")
    values = [nonzero_values(w) for w in versions]
    limit = axis_limit(values)
    fig, axes = plt.subplots(1, len(values), figsize=(3.2 * len(values), 2.8), sharex=True, squeeze=False)
    for ax, vals, title, w in zip(axes[0], values, titles, versions):
        ax.hist(vals.numpy(), bins=bins, range=(-limit, limit), color="tab:blue")
        ax.set_title(title, fontsize=9)
        outside = int((vals.abs() > limit).sum())
        ax.set_xlabel(f"weight ({100 * (1 - vals.numel() / w.numel()):.1f}% zeros, {outside} beyond the axis, left out)",
                      fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("count", fontsize=8)
    fig.suptitle(module, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
