"""Statistics of a Linear layer's inputs X [tokens, d_in], accumulated batch by batch.

What a run collects depends on its recipe (`needs_gram`): the full Gram matrix X X^T (d_in^2 multiply-adds per
token) only when some stage uses it; a recipe of Wanda or magnitude prunes alone collects the squared norms, and
its report has no per-module output error (that error is a quadratic form in X X^T).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

# Prune methods that read no Gram matrix: Wanda needs the squared input norms only, magnitude nothing.
GRAM_FREE_METHODS = frozenset({"wanda", "magnitude"})


def needs_gram(stages: Iterable) -> bool:
    """Whether a recipe's stages (recipe.PruneStage / RedenseStage / SecondPruneStage) need X X^T: every stage but a
    Wanda or magnitude prune does (SparseGPT, re-dense, second prune), and then every stage of the run collects it,
    so that every stage record of the report has its output error."""
    return any(not (s.kind == "prune" and s.method in GRAM_FREE_METHODS) for s in stages)


@dataclass
class LayerStats:
    """Running sums over all calibration tokens seen so far.

    xtx:      sum of x x^T, [d_in, d_in] float32; None with full=False (no stage of the recipe needs it, needs_gram)
    sq_norm:  sum of x_j^2 per input feature, [d_in]; Wanda's ||X_j||_2^2
    count:    number of tokens
    inputs:   the raw inputs [tokens, d_in] when a solver needs them (sgd), else None
    """

    d_in: int
    full: bool = True
    keep_inputs: bool = False
    xtx: torch.Tensor | None = None
    sq_norm: torch.Tensor | None = None
    count: int = 0
    inputs: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs of any leading shape [..., d_in]."""
        x = x.reshape(-1, self.d_in)
        if self.keep_inputs:
            self.inputs.append(x.detach().to("cpu", torch.bfloat16))
        x = x.float()
        if self.sq_norm is None:
            self.sq_norm = torch.zeros(self.d_in, device=x.device)
        self.sq_norm += (x * x).sum(0)
        if self.full:
            if self.xtx is None:
                self.xtx = torch.zeros(self.d_in, self.d_in, device=x.device)
            self.xtx.addmm_(x.T, x)
        self.count += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """H = X X^T / N: the mean Gram matrix (scale-free for every method here). Not cached: every access builds a
        new [d_in, d_in] tensor (1 thread: 2 ms at d_in 1536, 40 ms at 4096 with its fresh pages), so the statistics
        hold one Gram matrix, not two, while a stage runs; a caller that uses H more than once keeps the result.
        The pipeline reads it twice per Linear and stage (the stage function, then the error record; second_prune
        three times), small beside the solvers it feeds."""
        if self.xtx is None:
            raise ValueError("full Gram matrix was not collected for this layer")
        return self.xtx / max(self.count, 1)

    def all_finite(self) -> bool:
        """Whether the sums are free of NaN/Inf: X X^T when collected (H = X X^T / N is finite exactly when it is),
        else the squared norms (NaN/Inf in any input reaches its column's sum)."""
        sums = self.xtx if self.xtx is not None else self.sq_norm
        if sums is None:
            raise ValueError("no inputs were accumulated for this layer")
        return bool(torch.isfinite(sums).all())

    def stacked_inputs(self) -> torch.Tensor:
        """All kept inputs as one [tokens, d_in] tensor."""
        if not self.inputs:
            raise ValueError("raw inputs were not kept for this layer")
        return torch.cat(self.inputs)


def output_error(w_ref: torch.Tensor, w: torch.Tensor, hessian: torch.Tensor, group=None) -> float:
    """Relative reconstruction error ||W_ref X - W X||^2 / ||W_ref X||^2 from H = X X^T / N. `group`
    (sdsonnx/distributed.RankGroup): W_ref and W are this rank's rows; numerator and denominator are summed over
    the ranks."""
    delta = (w_ref.float() - w.float())
    num = torch.einsum("ij,jk,ik->", delta, hessian, delta)
    den = torch.einsum("ij,jk,ik->", w_ref.float(), hessian, w_ref.float())
    if group is not None:
        num_all, den_all = group.sums(float(num), float(den))
        return num_all / max(den_all, 1e-30)
    return float(num / den.clamp_min(1e-30))
