"""The one layer-wise loop: a recipe's stages applied decoder block by decoder block.

Versions and streams. Stage i turns version i of every target weight into version i+1 (version 0 is the
dense model). Each stage collects its statistics from one *stream*: the hidden states that a given version
of the model produces at the current block's input (`data: self` = the stage's own output model, as in
SparseGPT's sequential pruning; `sparse` = the first prune's output model, the paper's SD data; `dense` =
the unpruned model, DD), optionally on its own calibration part (MSD). Only the streams some stage needs
are kept and advanced.

Per block:  0. weights.load: the block's weights (read from the source shards when streaming, sdsonnx/shards.py);
            1. cast the block to float32 on the working device;
            2. for each stage: set the stage's input weights, run the block over the stage's stream with
               hooks that accumulate X X^T of every target Linear's input (its squared norms alone when no stage
               needs X X^T: stats.needs_gram), apply the stage function;
            3. advance each stream through the block with that stream's version of the weights (reusing the
               output of step 2 where a stage already ran that very pass);
            4. cast the block back to its storage dtype, advance the evaluation streams (one per reported version,
               on the working device), keep the final weights on the CPU, weights.finish (write its shard, free
               it), commit the state (resume).
On a GPU only the block being processed, its weight versions and statistics live there; the streams stay in RAM
(or files) and each segment is moved to the device for its pass.
Within a block every target Linear's statistics come from one pass with the stage's input weights (as the
reference SparseGPT does), not from sequential groups q/k/v -> o -> gate/up -> down.

The loop's state between blocks is (block index, streams, records): sdsonnx/resume.py commits it after every
block and `run --resume` continues from it. docs/DESIGN.md, "Streaming, memory budget and resume".
"""
from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import NumericalError
from .blocks import capture_block_inputs, find_blocks, run_block, target_linears
from .evaluate import head_perplexity
from .recipe import PruneStage, Recipe, RecipeError
from .report import ModuleRecord, StageRecord
from .resume import LoopState
from .shards import InMemoryWeights
from .streams import StreamStore
from .stages import ROW_SPLIT_STAGES, STAGES, ModuleContext
from .stats import LayerStats, needs_gram, output_error

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
    perplexity: dict[str, float] = field(default_factory=dict)  # report.json's perplexity keys (windows given)
    eval_seconds: dict[str, float] = field(default_factory=dict)  # eval_dense / eval_steps / eval_pruned
    block_sparsity: list[float] | None = None  # OWL profile, when used
    figure_module: str | None = None  # the module whose every version is kept for the weight figure
    figure_versions: list[torch.Tensor] = field(default_factory=list)  # [dense, after stage 1, ...] on CPU
    residual: dict | None = None  # permute: residual's record (report.json residual_permutation)


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


def _use_weights(linears: dict[str, nn.Linear], weights: dict[str, torch.Tensor], device=None, dtype=None) -> None:
    """Point every target Linear's weight at its tensor in `weights` (cast to `device`/`dtype` where given), without
    a copy: while the stages run, the block holds no float32 weights of its own beside the versions (7B shape: 0.75
    GiB less). Stages never write into a version they are given, so the aliasing is safe."""
    for name, mod in linears.items():
        mod.weight.data = weights[name].to(device, dtype)


def collect_stats(block: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor, kwargs: dict,
                  keep_inputs: bool = False, full: bool = True) -> dict[str, LayerStats]:
    """Run the block over hidden [n, L, d] and return each target Linear's input statistics (with X X^T when
    `full`, else the squared norms only)."""
    return collect_stats_and_output(block, linears, hidden, kwargs, keep_inputs, full=full)[0]


def collect_stats_and_output(block: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor, kwargs: dict,
                             keep_inputs: bool = False, store: StreamStore | None = None, keep_output: bool = True,
                             full: bool = True) -> tuple[dict[str, LayerStats], torch.Tensor | None]:
    """collect_stats, plus the block's output [n, L, d] of that same pass (the next block's input; None when not
    `keep_output`)."""
    stats = {name: LayerStats(mod.in_features, full=full, keep_inputs=keep_inputs) for name, mod in linears.items()}
    with _collecting(block, linears, stats):
        out = run_block(block, hidden, kwargs, store=store, keep=keep_output)
    return stats, out


def dense_pass(blocks: nn.ModuleList, linears: dict[int, dict[str, nn.Linear]], hidden: torch.Tensor,
               kwargs: list[dict], device: torch.device, weights: InMemoryWeights, visit: Callable, group=None,
               desc: str = "dense pass") -> None:
    """One read-only pass of the calibration hidden states [n, L, d] through every block of the dense model:
    each block's `linears` get their squared input norms (full=False; all-reduced over `group`), then
    visit(index, block, stats, block_input, block_output) runs with the block loaded in float32 on `device`."""
    for index, block in enumerate(tqdm(blocks, desc=desc, leave=False, disable=None)):  # None: off without a TTY
        weights.load(index, block)
        dtype = next(block.parameters()).dtype
        block.to(device, torch.float32)
        stats, out = collect_stats_and_output(block, linears.get(index, {}), hidden, kwargs[index], full=False)
        if group is not None:
            group.reduce_stats(stats)
        visit(index, block, stats, hidden, out)
        hidden = out
        block.to("cpu", dtype)
        weights.release(index, block)


def owl_block_sparsity(blocks: nn.ModuleList, targets: dict[int, dict[str, nn.Linear]], hidden: torch.Tensor,
                       kwargs: list[dict], stage: PruneStage, device: torch.device, weights: InMemoryWeights,
                       group=None) -> list[float]:
    """OWL: per-block sparsity from the share of outlier Wanda scores in the dense model (one extra pass; `group`:
    each rank's statistics are all-reduced, every rank scores the whole matrices)."""
    from .prune.owl import outlier_ratio, owl_sparsities

    ratios = []

    def visit(index, block, stats, block_input, block_output):
        scores = [mod.weight.detach().abs() * stats[name].sq_norm.sqrt() for name, mod in targets[index].items()]
        ratios.append(outlier_ratio(scores, stage.owl.threshold_m))

    dense_pass(blocks, targets, hidden, kwargs, device, weights, visit, group, "OWL outlier ratios")
    return owl_sparsities(ratios, stage.sparsity, stage.owl.lam)


@dataclass
class EvalStreams:
    """Perplexity measured inside the loop: the evaluation windows' hidden states of each measured model version
    advance through every block next to the calibration streams (no whole model and no weight snapshots needed).

    hidden: {version: [k, L, d] in the model's storage dtype}; kwargs: every block's keyword arguments for
    windows of this length; tuple_output: whether blocks return a tuple (learned from the first block run).
    """

    windows: torch.Tensor
    hidden: dict[int, torch.Tensor]
    kwargs: list[dict]
    tuple_output: bool | None = None
    store: StreamStore = field(default_factory=StreamStore)

    def advance(self, versions, block: nn.Module, index: int) -> None:
        """Run the windows' hidden states of each of `versions` through `block` (holding that version's weights)."""
        seen: list[bool] = []
        handle = block.register_forward_hook(lambda m, args, out: seen.append(isinstance(out, tuple)))
        try:
            for version in versions:
                old = self.hidden[version]
                self.hidden[version] = run_block(block, old, self.kwargs[index], store=self.store)
                if all(h is not old for h in self.hidden.values()):
                    self.store.release(old)
        finally:
            handle.remove()
        if seen:
            self.tuple_output = seen[0]


def eval_versions(recipe: Recipe) -> list[int]:
    """The model versions whose perplexity a run reports: dense (0) if asked, every intermediate stage's output if
    each_step, and the final one."""
    ev, last = recipe.evaluation, len(recipe.stages)
    if ev is None:
        return []
    return ([0] if ev.dense else []) + (list(range(1, last)) if ev.each_step else []) + [last]


def version_name(recipe: Recipe, version: int) -> str:
    """report.json's perplexity key of a model version: dense, after_<i>_<kind>, pruned."""
    if version == 0:
        return "dense"
    if version == len(recipe.stages):
        return "pruned"
    return f"after_{version}_{recipe.stages[version - 1].kind}"


def prune_model(model: nn.Module, recipe: Recipe, calibration: torch.Tensor, progress: bool = True,
                windows: torch.Tensor | None = None, weights: InMemoryWeights | None = None,
                resume: LoopState | None = None, checkpoint: Callable[[LoopState], None] | None = None,
                store: StreamStore | None = None, group=None, residual_file=None) -> PipelineResult:
    """Apply the recipe's stages to `model` block by block; calibration is [parts * n, L] token ids. With
    `windows` [k, W] the perplexities of eval_versions(recipe) are measured on the way (result.perplexity).
    `weights` gives each block its weights and takes its final ones (default: the model holds them all and is
    modified in place; shards.StreamedWeights: read from and written to safetensors shards). `checkpoint` is
    called with the loop's state after every block; `resume` (such a state) continues from its next block.
    `store` places the streams (RAM up to a memory budget, files beyond it; default: all in RAM). `group`
    (sdsonnx/distributed.RankGroup, several ranks): this rank keeps its slice of every calibration part and of the
    windows, and its Linears' stage work is split by rows (docs/SCALING.md); every rank gets the perplexities.
    `permute: residual`: the residual order is searched in a dense pass first (sdsonnx/residual_step.py) and
    written to `residual_file` (a Path), or read from it when resuming, and folded into the model as it is pruned."""
    weights = weights or InMemoryWeights()
    store = store or StreamStore()
    device = resolve_device(recipe.device)
    blocks_path, blocks = find_blocks(model)
    targets = target_linears(model, recipe.targets, recipe.ignore)
    act_dtype = DTYPES[recipe.activation_dtype]
    if group is not None:
        calibration = _rank_samples(calibration, recipe.calibration.parts, group)
        if windows is not None:
            windows = windows[group.sample_slice(windows.shape[0], "evaluation windows")]
    inputs = capture_block_inputs(model, calibration, act_dtype)
    first = recipe.first_prune
    residual = None
    if "residual" in first.permute_scopes:  # issue 16 item 3: one order of the residual stream, model-wide
        inputs, weights, residual = _residual_order(model, recipe, blocks_path, blocks, targets, inputs, device,
                                                    weights, group, residual_file, resume is not None)
    result = PipelineResult(stage_seconds=[0.0] * len(recipe.stages),
                            figure_module=figure_module(recipe.weight_figure, targets), residual=residual)
    per_part = calibration.shape[0] // recipe.calibration.parts
    keys = {stream_key(recipe, i) for i in range(len(recipe.stages))}
    streams = {k: inputs.hidden[k.part * per_part:(k.part + 1) * per_part] for k in keys}
    versions_measured = eval_versions(recipe) if windows is not None else []
    ev = None
    if versions_measured:
        captured = capture_block_inputs(model, windows, model.get_input_embeddings().weight.dtype)
        ev = EvalStreams(windows, {v: captured.hidden for v in versions_measured}, captured.kwargs, store=store)
        del captured
    if resume is not None:
        streams = {k: store.adopt(t) for k, t in resume.streams.items()}
        result.modules, result.stage_seconds, result.eval_seconds = resume.modules, resume.stage_seconds, \
            resume.eval_seconds
        result.block_sparsity, result.figure_versions = resume.block_sparsity, resume.figure_versions
        if ev is not None:
            ev.hidden = {v: store.adopt(t) for v, t in resume.eval_hidden.items()}
            ev.tuple_output = resume.tuple_output
        log.info("resuming at block %d of %d", resume.next_block, len(blocks))
    elif first.profile == "owl":
        result.block_sparsity = owl_block_sparsity(blocks, targets, inputs.hidden, inputs.kwargs, first, device, weights,
                                                   group)
        log.info("OWL block sparsity: %s", ", ".join(f"{s:.3f}" for s in result.block_sparsity))
    block_kwargs = inputs.kwargs
    del inputs  # its hidden states live on only as the streams (views) until block 0 replaces them

    start = 0 if resume is None else resume.next_block
    for index in tqdm(range(start, len(blocks)), initial=start, total=len(blocks), desc="Pruning blocks",
                      disable=not progress):
        block = blocks[index]
        weights.load(index, block)
        streams = _process_block(recipe, index, block, targets[index], streams, block_kwargs[index], ev,
                                 versions_measured, device, result, store, group)
        weights.finish(index, block)
        if checkpoint is not None:
            checkpoint(LoopState(index + 1, streams, {} if ev is None else ev.hidden,
                                 None if ev is None else ev.tuple_output, result.modules, result.stage_seconds,
                                 result.eval_seconds, result.block_sparsity, result.figure_versions))
    if ev is not None:
        for version in versions_measured:
            begin = time.perf_counter()
            ppl = head_perplexity(model, ev.windows, ev.hidden[version], ev.tuple_output)
            if group is not None:
                ppl = group.perplexity(ppl, ev.windows.shape[0] * (ev.windows.shape[1] - 1))
            result.perplexity[version_name(recipe, version)] = ppl
            _add_eval_seconds(result, recipe, version, time.perf_counter() - begin)
    return result


def _residual_order(model: nn.Module, recipe: Recipe, blocks_path: str, blocks: nn.ModuleList,
                    targets: dict[int, dict[str, nn.Linear]], inputs, device: torch.device, weights, group,
                    residual_file, resuming: bool):
    """permute: residual before the loop: the order searched (dense pre-pass) and saved, or read back when
    resuming; folded into everything outside the blocks and into block 0's captured inputs; every block is folded
    as it loads. Returns (inputs, weights wrapped in FoldedWeights, report record)."""
    from .prune.residual import fold_outside
    from .residual_step import FoldedWeights, load_permutation, save_permutation, search_prepass

    if resuming:
        if residual_file is None:
            raise RecipeError("permute: residual: resuming needs the saved residual permutation (residual_file)")
        perm, record = load_permutation(residual_file, inputs.hidden.shape[-1])
        record = {**record, "resumed": True}
    else:
        perm, record = search_prepass(recipe, blocks, targets, inputs.hidden, inputs.kwargs, device, weights, group,
                                      getattr(model.config, "model_type", None))
        if residual_file is not None:
            save_permutation(residual_file, perm, record)
    fold_outside(model, blocks_path, perm)
    inputs = replace(inputs, hidden=inputs.hidden[..., perm])  # what the folded embeddings give block 0
    return inputs, FoldedWeights(weights, perm), record


def _rank_samples(calibration: torch.Tensor, parts: int, group) -> torch.Tensor:
    """This rank's contiguous slice of every calibration part of [parts * n, L] -> [parts * n_rank, L]."""
    per_part = calibration.shape[0] // parts
    chunks = [calibration[p * per_part:(p + 1) * per_part] for p in range(parts)]
    return torch.cat([chunk[group.sample_slice(per_part)] for chunk in chunks])


def _process_block(recipe: Recipe, index: int, block: nn.Module, linears: dict[str, nn.Linear],
                   streams: dict[StreamKey, torch.Tensor], kwargs: dict, ev: EvalStreams | None,
                   versions_measured: list[int], device: torch.device, result: PipelineResult,
                   store: StreamStore, group=None) -> dict[StreamKey, torch.Tensor]:
    """One block of the loop: every stage, then every stream (calibration and evaluation) advanced through it
    with its version's weights; the block ends holding its final weights in its storage dtype on the CPU.
    Returns the advanced calibration streams (the old ones are released to `store`)."""
    if not linears:
        if ev is not None:
            _timed_eval(result, ev, versions_measured, block, index, recipe)
        out = {k: run_block(block, h, kwargs, store=store) for k, h in streams.items()}
        for old in streams.values():
            store.release(old)
        return out
    storage_dtype = next(block.parameters()).dtype
    originals = {name: mod.weight.data for name, mod in linears.items()}
    if ev is not None and 0 in versions_measured:
        block.to(device)  # evaluation passes run in the storage dtype, on the working device
        _timed_eval(result, ev, [0], block, index, recipe)
    block.to(device, torch.float32)
    versions, advanced = _run_stages(recipe, index, block, linears, streams, kwargs, result, store, group)
    _drop_spent_versions(versions, {k.version for k in streams if k not in advanced} | set(versions_measured) - {0},
                         originals)
    out = {}
    for key in streams:
        if key in advanced:
            out[key] = advanced[key]
        else:
            _use_weights(linears, versions[key.version])
            out[key] = run_block(block, streams[key], kwargs, store=store)
        store.release(streams[key])
        check_finite_activations(out[key], index, key, recipe.activation_dtype)
    block.to(device, storage_dtype)
    for version in (v for v in versions_measured if v > 0):
        _use_weights(linears, versions[version], device, storage_dtype)
        _timed_eval(result, ev, [version], block, index, recipe)
    block.to("cpu")
    _keep_storage(linears, versions[-1], originals, storage_dtype)
    return out


def _drop_spent_versions(versions: list[dict | None], needed: set[int], originals: dict[str, torch.Tensor]) -> None:
    """Before the block's streams advance: release every weight version but the final one that no stream or
    evaluation still reads, and where the dense version is spent, write each final weight into the tensor the Linear
    held when the block began if that tensor can serve as it is (same shape, dtype, device: a float32 model on the
    working device). The advance pass then holds one set of the block's weights beside the originals, not two
    (issue 18: the reference implementations prune in place); the numbers are bitwise the same."""
    final = versions[-1]
    for v in range(len(versions) - 1):
        if v not in needed:
            versions[v] = None
    if 0 in needed:
        return
    for name, weight in final.items():
        original = originals[name]
        if original is not weight and (original.shape, original.dtype, original.device) == \
                (weight.shape, weight.dtype, weight.device):
            original.copy_(weight)
            final[name] = original


def _keep_storage(linears: dict[str, nn.Linear], final: dict[str, torch.Tensor], originals: dict[str, torch.Tensor],
                  dtype: torch.dtype) -> None:
    """Give every Linear its final weight, written into the tensor it held when the block began where shape, dtype
    and device allow. A model loaded from safetensors holds its weights in a private memory map of the file, read in
    as the blocks are pruned: a new tensor per weight would keep the read file pages resident beside it (SmolLM2-135M:
    ~0.45 GiB more peak RSS, issue 18), while writing in place replaces each page by its copy."""
    for name, mod in linears.items():
        weight, original = final[name].to("cpu", dtype), originals[name]
        if weight is original:
            pass  # written early (_drop_spent_versions)
        elif original.shape == weight.shape and original.dtype == dtype and original.device.type == "cpu":
            original.copy_(weight)
            weight = original
        mod.weight.data = weight


def _timed_eval(result: PipelineResult, ev: EvalStreams, versions: list[int], block: nn.Module, index: int,
                recipe: Recipe) -> None:
    """ev.advance, its time added to result.eval_seconds per kind of version (dense, steps, pruned)."""
    for version in versions:
        start = time.perf_counter()
        ev.advance([version], block, index)
        _add_eval_seconds(result, recipe, version, time.perf_counter() - start)


def _add_eval_seconds(result: PipelineResult, recipe: Recipe, version: int, seconds: float) -> None:
    kind = "eval_dense" if version == 0 else "eval_pruned" if version == len(recipe.stages) else "eval_steps"
    result.eval_seconds[kind] = result.eval_seconds.get(kind, 0.0) + seconds


def check_finite_weight(weight: torch.Tensor, block: int, name: str, stage: int, kind: str) -> None:
    """NumericalError naming block and module where a stage's output weight [d_out, d_in] has NaN/Inf."""
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise NumericalError(f"block {block}, module {name}: stage {stage} ({kind}) produced {bad} NaN/Inf weights "
                             f"of {weight.numel()}; check the model's weights for NaN/Inf (sdsonnx inspect)")


def check_finite_inputs(stats, block: int, name: str, stage: int, kind: str) -> None:
    """NumericalError naming block and module where the inputs of a Linear (its X X^T, or its squared norms where
    the run collects no X X^T) have NaN/Inf."""
    if not stats.all_finite():
        raise NumericalError(f"block {block}, module {name}: NaN/Inf in its input activations (statistics of stage "
                             f"{stage}, {kind}); a weight of an earlier module or block is NaN/Inf, or the activations "
                             "overflow their dtype (try activation_dtype: float32)")


def check_finite_activations(hidden: torch.Tensor, block: int, key: StreamKey, dtype: str) -> None:
    """NumericalError naming the block whose output hidden states [n, L, d] have NaN/Inf (checked per segment)."""
    if not all(bool(torch.isfinite(row).all()) for row in hidden):
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


def _stage_on_rows(stage, w: torch.Tensor, ctx: ModuleContext, group) -> tuple[torch.Tensor, dict, float | None]:
    """stage_with_fallbacks on this rank's rows of W (and of the dense and first-pruned weights), then the whole
    new W [d_out, d_in] all-gathered from every rank; with the record's output error, summed over the rows (None
    where the run collects no X X^T)."""
    rows = group.row_slice(w.shape[0])
    local = replace(ctx, dense=ctx.dense[rows], group=group,
                    first_pruned=None if ctx.first_pruned is None else ctx.first_pruned[rows])
    weight, info = stage_with_fallbacks(stage, w[rows], local)
    error = None if ctx.stats.xtx is None else output_error(local.dense, weight, ctx.stats.hessian, group)
    return group.gather_rows(weight.float().contiguous(), w.shape[0]), info, error


def _permute_channels(recipe: Recipe, index: int, block: nn.Module, linears: dict[str, nn.Linear],
                      dense: dict[str, torch.Tensor], stats: dict[str, LayerStats], stream, kwargs: dict,
                      block_sparsity: list[float] | None) -> dict[str, dict]:
    """The first prune's `permute` on one block (its target Linears pointing at `dense`, stage 0's `stats` collected).
    mlp: for each MLP whose consumer (down_proj / fc2) is a target with an n:m pattern, search an order of its input
    columns that keeps more of the first prune's importance (Wanda |W| ||x||; |W| for magnitude), then permute the
    producers' output rows and biases (gate/up, fc1) and the consumer's columns. attention: the same for o_proj's
    columns within each head, one order per kv head, folded into v_proj's rows. `dense` and the consumer's stats
    are permuted alike, in place. The block's float32 output on the first segment of `stream` is compared before and after
    (RecipeError when the architecture breaks the assumption). Returns {target name: report record}."""
    from .prune import permute as P
    from .prune.wanda import wanda_scores

    first = recipe.first_prune
    modules = dict(block.named_modules())
    full_name = {id(mod): name for name, mod in linears.items()}

    def consumer_job(consumer: str):
        name = full_name.get(id(modules[consumer]))
        pattern = None if name is None else first.pattern_for(index, name, block_sparsity)
        return (name, pattern) if pattern is not None and pattern.is_nm else None

    jobs = []  # (scope, producers, consumer, target name of the consumer, pattern, head_dim)
    if "mlp" in first.permute_scopes:
        jobs += [("mlp", producers, consumer, *job, None) for producers, consumer in P.block_mlp_pairs(block)
                 if (job := consumer_job(consumer))]
    if "attention" in first.permute_scopes:
        jobs += [("attention", [v], o, *job, head_dim) for v, o, head_dim in P.block_attention_pairs(block)
                 if (job := consumer_job(o))]
    if not jobs:
        return {}
    before = run_block(block, stream[0][None], kwargs, out_dtype=torch.float32)
    records = {}
    for scope, producers, consumer, name, pattern, head_dim in jobs:
        start = time.perf_counter()
        weight = dense[name]
        scores = weight.abs() if first.method == "magnitude" else wanda_scores(weight, stats[name].sq_norm)
        if scope == "mlp":
            found = P.search(scores, pattern.n, pattern.m)
            perm, gain, swaps = found.perm, found.gain, found.swaps
            P.permute_mlp(block, producers, consumer, perm)
        else:
            kv_heads = modules[producers[0]].out_features // head_dim
            perm_v, perm, swaps = P.head_permutations(scores, kv_heads, head_dim, pattern.n, pattern.m)
            base = P.kept_score(scores, pattern.n, pattern.m)
            gain = P.kept_score(scores[:, perm.to(scores.device)], pattern.n, pattern.m) / base - 1 if base > 0 else 0.0
            P.permute_attention(block, producers[0], consumer, perm_v, perm)
        stats[name] = P.permute_stats(stats[name], perm)
        record = {"scope": scope, "kept_score_gain": gain, "swaps": swaps, "seconds": time.perf_counter() - start}
        for rel, axis in [(p, "rows") for p in producers] + [(consumer, "columns")]:
            target = full_name.get(id(modules[rel]))
            if target is not None:
                dense[target] = modules[rel].weight.detach()
                records[target] = {**record, "axis": axis}
    after = run_block(block, stream[0][None], kwargs, out_dtype=torch.float32)
    scale = float(before.abs().max().clamp_min(1e-30))
    if not bool(torch.isfinite(after).all()) or float((after - before).abs().max()) > 1e-4 * scale:
        raise RecipeError(f"block {index}: permute: {first.permute} changed the block's output (max difference "
                          f"{float((after - before).abs().max()):.3g} of {scale:.3g}); this architecture has something "
                          "between the permuted Linears that does not commute with the permutation; use permute: none")
    log.debug("block %d: kept-score gains %s", index, ", ".join(
        f"{n.rsplit('.', 1)[-1]} {r['kept_score_gain']:.2%}" for n, r in records.items() if r["axis"] == "columns"))
    return records


def _run_stages(recipe: Recipe, index: int, block: nn.Module, linears: dict[str, nn.Linear],
                streams: dict[StreamKey, torch.Tensor], kwargs: dict, result: PipelineResult,
                store: StreamStore | None = None, group=None) -> tuple[list[dict], dict[StreamKey, torch.Tensor]]:
    """All stages on one block; returns the weight versions [dense, after stage 1, ...] and the streams already
    advanced through the block: a stage that reads stream version i with input weights version i (the re-dense
    stage on SD data) has run exactly the pass that advances that stream, so it is not run twice."""
    first = recipe.first_prune
    full = needs_gram(recipe.stages)  # Wanda / magnitude alone: squared norms only, no error records (stats.py)
    versions = [{n: mod.weight.detach() for n, mod in linears.items()}]  # the block is float32 here
    advanced: dict[StreamKey, torch.Tensor] = {}
    permuted: dict[str, dict] = {}  # the first prune's `permute` records, {target name: record}
    for i, stage in enumerate(recipe.stages):
        start = time.perf_counter()
        _use_weights(linears, versions[i])
        keep_inputs = getattr(stage, "solver", None) == "sgd"
        key = stream_key(recipe, i)
        keep = key.version == i and key not in advanced
        stats, block_output = collect_stats_and_output(block, linears, streams[key], kwargs, keep_inputs, store, keep,
                                                       full)
        if group is not None:
            group.reduce_stats(stats)
        if keep:
            advanced[key] = block_output
        del block_output
        if i == 0 and first.permute_scopes & {"mlp", "attention"}:
            # issue 16 item 3: before the first mask is chosen, fold an N:M-friendly channel order into the block's
            # MLPs / attention heads (block params, versions[0] and the consumer's statistics all permuted alike), so
            # every later stage sees the permuted block and the block's function is unchanged.
            permuted = _permute_channels(recipe, index, block, linears, versions[0], stats, streams[key], kwargs,
                                         result.block_sparsity)
        out = {}
        for name in linears:
            ctx = ModuleContext(name=name, dense=versions[0][name], first_pruned=versions[1][name] if i > 0 else None,
                                stats=stats[name], pattern=first.pattern_for(index, name, result.block_sparsity),
                                first_prune=first)
            check_finite_inputs(stats[name], index, name, i, stage.kind)
            t0 = time.perf_counter()
            if group is not None and stage.kind in ROW_SPLIT_STAGES:
                weight, info, error = _stage_on_rows(stage, versions[i][name], ctx, group)
            else:
                weight, info = stage_with_fallbacks(stage, versions[i][name], ctx)
                error = output_error(ctx.dense, weight, stats[name].hessian) if full else None
            check_finite_weight(weight, index, name, i, stage.kind)
            out[name] = weight.float()
            record = StageRecord(stage.kind, float((weight == 0).float().mean()), error, time.perf_counter() - t0, info)
            entry = result.modules.setdefault(name, ModuleRecord(index, str(ctx.pattern), list(weight.shape),
                                                                 weight.numel()))
            entry.stages.append(record)
        versions.append(out)
        del stats
        result.stage_seconds[i] += time.perf_counter() - start
    for name in linears:
        result.modules[name].finish()
        result.modules[name].permutation = permuted.get(name)
    if result.figure_module in linears:
        result.figure_versions = [v[result.figure_module].cpu().clone() for v in versions]
    return versions, advanced
