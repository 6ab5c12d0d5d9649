"""The stages a recipe can list, as a plain dict of functions.

Each stage function maps (stage config, input weight W [d_out, d_in], ModuleContext) to (new W, record).
The pipeline calls them one Linear at a time; they never see modules, hooks or the rest of the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .pattern import Pattern
from .recipe import PruneStage, RedenseStage, SecondPruneStage
from .stats import LayerStats


@dataclass
class ModuleContext:
    """What a stage may know about one Linear besides its input weight."""

    name: str
    dense: torch.Tensor  # the unpruned weight, float32
    first_pruned: torch.Tensor | None  # the first prune stage's output weight (None while that stage runs)
    stats: LayerStats  # inputs of the layer, from the stream the stage's `data` names
    pattern: Pattern  # resolved pattern of this module (overrides and OWL profile applied)
    first_prune: PruneStage  # the recipe's first prune stage: the second prune reuses its method and options
    group: object | None = None  # distributed.RankGroup when W, dense and first_pruned are this rank's rows


def prune_stage(stage: PruneStage, w: torch.Tensor, ctx: ModuleContext) -> tuple[torch.Tensor, dict]:
    """Stage 1 (and plain one-shot pruning): SparseGPT / Wanda / magnitude on W."""
    from .prune import prune

    pruned, _ = prune(stage.method, w, ctx.stats, ctx.pattern, stage.options, group=ctx.group)
    return pruned, {}


def redense_stage(stage: RedenseStage, w: torch.Tensor, ctx: ModuleContext) -> tuple[torch.Tensor, dict]:
    """Stage 2, paper Eq. 4: re-dense reconstruction starting from the pruned W."""
    from .sds.redense import redense_gram, redense_sgd

    if stage.solver == "gram":
        return redense_gram(ctx.dense, w, ctx.stats.hessian, stage.l1, stage.l2, max_iter=stage.max_iter, tol=stage.tol,
                            group=ctx.group)
    return redense_sgd(ctx.dense, w, ctx.stats.stacked_inputs(), stage.l1, stage.l2, epochs=stage.epochs,
                       lr=stage.lr, batch_size=stage.batch_size, optimizer=stage.optimizer)


def second_prune_stage(stage: SecondPruneStage, w: torch.Tensor, ctx: ModuleContext) -> tuple[torch.Tensor, dict]:
    """Stage 3, paper Eq. 5: prune the re-dense W again, adjust with a soft mask, never worse than stage 1."""
    from .sds.second_prune import second_prune

    if ctx.first_pruned is None:
        raise ValueError("second_prune needs the output of a first prune stage")
    first = ctx.first_prune
    return second_prune(first.method, ctx.dense, w, ctx.first_pruned, ctx.stats, ctx.pattern, adjust=stage.adjust,
                        max_iter=stage.max_iter, tol=stage.tol, early_exit=stage.early_exit,
                        precondition=stage.precondition, options=first.options, group=ctx.group,
                        solver=stage.adjust_solver, admm_iterations=stage.admm_iterations,
                        admm_reselect=stage.admm_reselect)


STAGES: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {
    "prune": prune_stage,
    "redense": redense_stage,
    "second_prune": second_prune_stage,
}
# Stages whose function takes this rank's rows (ctx.group set) on several ranks; the others run on the whole
# matrix on every rank (the same inputs give the same bits everywhere). docs/SCALING.md.
ROW_SPLIT_STAGES = frozenset({"prune", "redense", "second_prune"})
