"""One pure pruning function per method, and adapters (w, LayerStats, Pattern, options) -> (w, mask) by name.

Every method is called the same way, `prune(method, w, stats, pattern, options)`, with its own frozen options
type (OPTIONS[method]); the recipe builds them with `PruneStage.options`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Union

import torch

from ..pattern import Pattern
from ..stats import LayerStats
from .magnitude import magnitude_prune
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_prune


@dataclass(frozen=True)
class MagnitudeOptions:
    """Magnitude pruning has no settings."""


@dataclass(frozen=True)
class WandaOptions:
    """Wanda has no settings."""


@dataclass(frozen=True)
class SparseGPTOptions:
    blocksize: int = 128  # lazy-update column block size
    percdamp: float = 0.01  # dampening, share of mean diag(H)


PruneOptions = Union[MagnitudeOptions, WandaOptions, SparseGPTOptions]
Pruner = Callable[[torch.Tensor, LayerStats, Pattern, PruneOptions], tuple[torch.Tensor, torch.Tensor]]


def _wanda(w: torch.Tensor, stats: LayerStats, pattern: Pattern, options: WandaOptions,
           group=None) -> tuple[torch.Tensor, torch.Tensor]:
    if stats.sq_norm is None:
        raise ValueError("wanda needs the per-input squared norms (no calibration inputs were seen)")
    return wanda_prune(w, stats.sq_norm, pattern)  # per-row groups: row-local under a RankGroup


def _sparsegpt(w: torch.Tensor, stats: LayerStats, pattern: Pattern, options: SparseGPTOptions,
               group=None) -> tuple[torch.Tensor, torch.Tensor]:
    return sparsegpt_prune(w, stats.hessian, pattern, blocksize=options.blocksize, percdamp=options.percdamp,
                           group=group)


PRUNERS: dict[str, Pruner] = {
    "magnitude": lambda w, stats, pattern, options, group=None: magnitude_prune(w, pattern, group),
    "wanda": _wanda,
    "sparsegpt": _sparsegpt,
}
OPTIONS: dict[str, type] = {"magnitude": MagnitudeOptions, "wanda": WandaOptions, "sparsegpt": SparseGPTOptions}


def _check_method(method: str) -> None:
    if method not in PRUNERS:
        raise ValueError(f"unknown pruning method {method!r}; known: {', '.join(sorted(PRUNERS))}")


def options_for(method: str, settings: dict) -> PruneOptions:
    """The method's options from a mapping of settings (e.g. a prune stage's); keys it does not have are ignored."""
    _check_method(method)
    cls = OPTIONS[method]
    return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings})


def prune(method: str, w: torch.Tensor, stats: LayerStats, pattern: Pattern,
          options: PruneOptions | None = None, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (pruned W in W's dtype, bool mask, True = kept) with the named method and its options
    (None: the method's defaults). `group` (sdsonnx/distributed.RankGroup): W is this rank's rows of the matrix."""
    _check_method(method)
    options = OPTIONS[method]() if options is None else options
    if not isinstance(options, OPTIONS[method]):
        raise ValueError(f"{method} takes {OPTIONS[method].__name__}, got {type(options).__name__}")
    if group is None:
        return PRUNERS[method](w, stats, pattern, options)
    return PRUNERS[method](w, stats, pattern, options, group=group)
