"""The one layer-wise loop: a recipe's stages applied decoder block by decoder block.

Versions and streams. Stage i turns version i of every target weight into version i+1 (version 0 is the
dense model). Each stage collects its statistics from one *stream*: the hidden states that a given version
of the model produces at the current block's input (`data: self` = the stage's own output model, as in
SparseGPT's sequential pruning; `sparse` = the first prune's output model, the paper's SD data; `dense` =
the unpruned model, DD), optionally on its own calibration part (MSD). Only the streams some stage needs
are kept and advanced.

Per block:  1. load the block in float32 on the working device;
            2. for each stage: set the stage's input weights, run the block over the stage's stream with
               hooks that accumulate X X^T of every target Linear's input, apply the stage function;
            3. advance each stream through the block with that stream's version of the weights (reusing the
               output of step 2 where a stage already ran that very pass);
            4. keep the final weights, cast the block back to its storage dtype.
Within a block every target Linear's statistics come from one pass with the stage's input weights (as the
reference SparseGPT does), not from sequential groups q/k/v -> o -> gate/up -> down.

The loop's state between blocks is just (block index, streams): per-block checkpoint/resume and streaming
weights from disk one block at a time fit in by saving/loading that state and the finished blocks.
"""
from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import NumericalError
from .blocks import BlockInputs, capture_block_inputs, find_blocks, run_block, target_linears
from .recipe import PruneStage, Recipe, RecipeError
from .report import ModuleRecord, StageRecord
from .stages import STAGES, ModuleContext
from .stats import LayerStats, output_error

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class StreamKey:
    version: int  # which model version produces the hidden states
    part: int  # which calibration part (0 unless the MSD ablation splits the samples)


@dataclass
class PipelineResult:
    """What a run produced besides the pruned model (which is modified in place)."""

    modules: dict[str, ModuleRecord] = field(default_factory=dict)  # report.json's per-module records
    stage_seconds: list[float] = field(default_factory=list)
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # version -> {name: W}
    block_sparsity: list[float] | None = None  # OWL profile, when used
    figure_module: str | None = None  # the module whose every version is kept for the weight figure
    figure_versions: list[torch.Tensor] = field(default_factory=list)  # [dense, after stage 1, ...] on CPU


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device: cuda was asked for but no CUDA device is available; use device: auto or cpu")
    return torch.device(name)


def stream_key(recipe: Recipe, index: int) -> StreamKey:
    """The stream stage `index` reads: its own output (self), the first prune's output (sparse) or dense."""
    stage = recipe.stages[index]
    version = {"self": index + 1, "sparse": 1, "dense": 0}[stage.data]
    return StreamKey(version, stage.calibration_part)


def figure_module(choice: str | None, targets: dict[int, dict[str, nn.Linear]]) -> str | None:
    """The module drawn in the weight figure: `choice`, or for 'auto' the last target of the last block."""
    if choice != "auto":
        return choice
    names = [name for mods in targets.values() for name in mods]
    return names[-1] if names else None


@contextmanager
def _collecting(block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, LayerStats]):
    """Forward hooks that add every target Linear's input to its LayerStats.

    Linears that receive the very same input tensor in a forward call (q/k/v, gate/up) share the first one's
    LayerStats, so each Gram matrix is accumulated once.
    """
    current: list[tuple[torch.Tensor, str]] = []  # (input, module) seen in the running forward call
    leader: dict[str, str] = {}

    def add(name: str, x: torch.Tensor) -> None:
        first = next((other for seen, other in current if seen is x), None)
        if first is not None:
            leader[name] = first
        else:
            current.append((x, name))
            stats[name].add(x)

    handles = [block.register_forward_pre_hook(lambda m, args: current.clear())]
    handles += [mod.register_forward_hook(lambda m, inp, out, n=name: add(n, inp[0])) for name, mod in linears.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        current.clear()
        for name, first in leader.items():
            stats[name] = stats[first]


def _set_weights(linears: dict[str, nn.Linear], weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, mod in linears.items():
            mod.weight.copy_(weights[name])


def collect_stats(block: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor, kwargs: dict,
                  keep_inputs: bool = False) -> dict[str, LayerStats]:
    """Run the block over hidden [n, L, d] and return each target Linear's input statistics."""
    return collect_stats_and_output(block, linears, hidden, kwargs, keep_inputs)[0]


def collect_stats_and_output(block: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor, kwargs: dict,
                             keep_inputs: bool = False) -> tuple[dict[str, LayerStats], torch.Tensor]:
    """collect_stats, plus the block's output [n, L, d] of that same pass (the next block's input)."""
    stats = {name: LayerStats(mod.in_features, keep_inputs=keep_inputs) for name, mod in linears.items()}
    with _collecting(block, linears, stats):
        out = run_block(block, hidden, kwargs)
    return stats, out


def owl_block_sparsity(blocks: nn.ModuleList, targets: dict[int, dict[str, nn.Linear]], inputs: BlockInputs,
                       stage: PruneStage, device: torch.device) -> list[float]:
    """OWL: per-block sparsity from the share of outlier Wanda scores in the dense model (one extra pass)."""
    from .prune.owl import outlier_ratio, owl_sparsities

    hidden, ratios = inputs.hidden, []
    for index, block in enumerate(tqdm(blocks, desc="OWL outlier ratios", leave=False)):
        dtype = next(block.parameters()).dtype
        block.to(device, torch.float32)
        stats, hidden = collect_stats_and_output(block, targets[index], hidden, inputs.kwargs[index])
        scores = [mod.weight.detach().abs() * stats[name].sq_norm.sqrt() for name, mod in targets[index].items()]
        ratios.append(outlier_ratio(scores, stage.owl.threshold_m))
        block.to("cpu", dtype)
    return owl_sparsities(ratios, stage.sparsity, stage.owl.lam)


def prune_model(model: nn.Module, recipe: Recipe, calibration: torch.Tensor, progress: bool = True) -> PipelineResult:
    """Apply the recipe's stages to `model` in place, block by block; calibration is [parts * n, L] token ids."""
    device = resolve_device(recipe.device)
    _, blocks = find_blocks(model)
    targets = target_linears(model, recipe.targets, recipe.ignore)
    act_dtype = DTYPES[recipe.activation_dtype]
    inputs = capture_block_inputs(model, calibration, act_dtype)
    first = recipe.first_prune
    result = PipelineResult(stage_seconds=[0.0] * len(recipe.stages),
                            figure_module=figure_module(recipe.weight_figure, targets))
    if first.profile == "owl":
        result.block_sparsity = owl_block_sparsity(blocks, targets, inputs, first, device)
        log.info("OWL block sparsity: %s", ", ".join(f"{s:.3f}" for s in result.block_sparsity))

    per_part = calibration.shape[0] // recipe.calibration.parts
    keys = {stream_key(recipe, i) for i in range(len(recipe.stages))}
    streams = {k: inputs.hidden[k.part * per_part:(k.part + 1) * per_part] for k in keys}
    keep_snapshots = recipe.evaluation is not None and recipe.evaluation.each_step and len(recipe.stages) > 1
    result.snapshots = {v: {} for v in range(1, len(recipe.stages))} if keep_snapshots else {}

    for index, block in enumerate(tqdm(blocks, desc="Pruning blocks", disable=not progress)):
        linears = targets[index]
        if not linears:
            streams = {k: run_block(block, h, inputs.kwargs[index]) for k, h in streams.items()}
            continue
        storage_dtype = next(block.parameters()).dtype
        block.to(device, torch.float32)
        versions, advanced = _run_stages(recipe, index, block, linears, streams, inputs.kwargs[index], result)
        for key in streams:
            if key in advanced:
                streams[key] = advanced[key]
                continue
            _set_weights(linears, versions[key.version])
            streams[key] = run_block(block, streams[key], inputs.kwargs[index])
        for key, hidden in streams.items():
            check_finite_activations(hidden, index, key, recipe.activation_dtype)
        _set_weights(linears, versions[-1])
        for version, snapshot in result.snapshots.items():
            snapshot.update({n: w.to("cpu", storage_dtype) for n, w in versions[version].items()})
        block.to("cpu", storage_dtype)
    return result


def check_finite_weight(weight: torch.Tensor, block: int, name: str, stage: int, kind: str) -> None:
    """NumericalError naming block and module where a stage's output weight [d_out, d_in] has NaN/Inf."""
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise NumericalError(f"block {block}, module {name}: stage {stage} ({kind}) produced {bad} NaN/Inf weights "
                             f"of {weight.numel()}; check the model's weights for NaN/Inf (sdsonnx inspect)")


def check_finite_inputs(stats, block: int, name: str, stage: int, kind: str) -> None:
    """NumericalError naming block and module where the inputs of a Linear (its X X^T) have NaN/Inf."""
    if not bool(torch.isfinite(stats.hessian).all()):
        raise NumericalError(f"block {block}, module {name}: NaN/Inf in its input activations (statistics of stage "
                             f"{stage}, {kind}); a weight of an earlier module or block is NaN/Inf, or the activations "
                             "overflow their dtype (try activation_dtype: float32)")


def check_finite_activations(hidden: torch.Tensor, block: int, key: StreamKey, dtype: str) -> None:
    """NumericalError naming the block whose output hidden states [n, L, d] have NaN/Inf."""
    if not bool(torch.isfinite(hidden).all()):
        raise NumericalError(f"block {block}: NaN/Inf in its output activations (model version {key.version}, "
                             f"calibration part {key.part}, activation_dtype {dtype}); check the block's weights for "
                             "NaN/Inf, or use activation_dtype: float32")


def stage_with_fallbacks(stage, w: torch.Tensor, ctx: ModuleContext) -> tuple[torch.Tensor, dict]:
    """STAGES[stage.kind](stage, w, ctx), with `fallback: wanda` added to the record where SparseGPT's Hessian
    stayed singular (a HessianFallback warning); other warnings pass through."""
    from .prune.sparsegpt import FALLBACK, HessianFallback

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HessianFallback)
        weight, info = STAGES[stage.kind](stage, w, ctx)
    fallback = [c for c in caught if issubclass(c.category, HessianFallback)]
    for c in caught:
        if not issubclass(c.category, HessianFallback):
            warnings.warn_explicit(c.message, c.category, c.filename, c.lineno)
    if fallback:
        log.warning("%s: %s", ctx.name, fallback[0].message)
        info = {**info, "fallback": FALLBACK}
    return weight, info


def _run_stages(recipe: Recipe, index: int, block: nn.Module, linears: dict[str, nn.Linear],
                streams: dict[StreamKey, torch.Tensor], kwargs: dict,
                result: PipelineResult) -> tuple[list[dict], dict[StreamKey, torch.Tensor]]:
    """All stages on one block; returns the weight versions [dense, after stage 1, ...] and the streams already
    advanced through the block: a stage that reads stream version i with input weights version i (the re-dense
    stage on SD data) has run exactly the pass that advances that stream, so it is not run twice."""
    first = recipe.first_prune
    versions = [{n: mod.weight.detach().float().clone() for n, mod in linears.items()}]
    advanced: dict[StreamKey, torch.Tensor] = {}
    for i, stage in enumerate(recipe.stages):
        start = time.perf_counter()
        _set_weights(linears, versions[i])
        keep_inputs = getattr(stage, "solver", None) == "sgd"
        key = stream_key(recipe, i)
        stats, block_output = collect_stats_and_output(block, linears, streams[key], kwargs, keep_inputs)
        if key.version == i:
            advanced[key] = block_output
        del block_output
        out = {}
        for name in linears:
            ctx = ModuleContext(name=name, dense=versions[0][name], first_pruned=versions[1][name] if i > 0 else None,
                                stats=stats[name], pattern=first.pattern_for(index, name, result.block_sparsity),
                                first_prune=first)
            check_finite_inputs(stats[name], index, name, i, stage.kind)
            t0 = time.perf_counter()
            weight, info = stage_with_fallbacks(stage, versions[i][name], ctx)
            check_finite_weight(weight, index, name, i, stage.kind)
            out[name] = weight.float()
            record = StageRecord(stage.kind, float((weight == 0).float().mean()),
                                 output_error(ctx.dense, weight, stats[name].hessian), time.perf_counter() - t0, info)
            entry = result.modules.setdefault(name, ModuleRecord(index, str(ctx.pattern), list(weight.shape),
                                                                 weight.numel()))
            entry.stages.append(record)
        versions.append(out)
        del stats
        result.stage_seconds[i] += time.perf_counter() - start
    for name in linears:
        result.modules[name].finish()
    if result.figure_module in linears:
        result.figure_versions = [v[result.figure_module].cpu().clone() for v in versions]
    return versions, advanced
