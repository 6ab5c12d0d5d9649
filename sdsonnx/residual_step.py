"""`permute: residual` in a run: the model-wide step before the layer-wise loop (sdsonnx/pipeline.py).

1. A dense pass of the calibration hidden states through every block (pipeline.dense_pass, the pass OWL uses):
   the residual readers' squared input norms, each reader's normalised Wanda scores (row-subsampled to about
   residual.SAMPLE_ROWS rows in all), and a check that the fold preserves each block's function (a random order
   folded and unfolded on one segment).
2. The search (prune/residual.search_residual) on the stacked scores.
3. The fold: everything outside the blocks at once (embeddings, final norm, LM head), the captured block inputs
   re-ordered, and each block as it is loaded (FoldedWeights), so the saved shards and the export are the folded
   model, which computes the same function.
The order is written to the run's folder (PERMUTATION_FILE; it stays in the output) before block 0: `--resume`
reads it back instead of searching again.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from .prune import residual as R
from .recipe import Recipe, RecipeError

log = logging.getLogger(__name__)
PERMUTATION_FILE = "residual_permutation.json"


class FoldedWeights:
    """Wraps a weights source (shards.InMemoryWeights / StreamedWeights): every block is given the residual order
    once after it is loaded (a streamed block is loaded afresh each time, an in-memory one keeps it)."""

    def __init__(self, inner, perm: torch.Tensor) -> None:
        self.inner, self.perm, self.folded = inner, perm, set()

    def load(self, index: int, block: nn.Module) -> None:
        self.inner.load(index, block)
        if index not in self.folded:
            R.fold_block(block, self.perm)
            self.folded.add(index)

    def _forget(self, index: int, block: nn.Module) -> None:
        if any(p.is_meta for p in block.parameters()):
            self.folded.discard(index)

    def release(self, index: int, block: nn.Module) -> None:
        self.inner.release(index, block)
        self._forget(index, block)

    def finish(self, index: int, block: nn.Module) -> None:
        self.inner.finish(index, block)
        self._forget(index, block)


def save_permutation(path: Path, perm: torch.Tensor, record: dict) -> None:
    """Write {"perm": [...], "record": {...}} atomically."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps({"perm": perm.tolist(), "record": record}))
    tmp.replace(path)


def load_permutation(path: Path, hidden: int) -> tuple[torch.Tensor, dict]:
    """(perm [hidden] long, record) from save_permutation's file; RecipeError when missing or not a permutation."""
    try:
        data = json.loads(Path(path).read_text())
        perm = torch.tensor(data["perm"], dtype=torch.long)
        R.check_permutation(perm, hidden)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RecipeError(f"{path}: cannot read the residual permutation of the interrupted run ({exc}); run "
                          "without --resume to start over") from None
    return perm, data["record"]


def _check_fold(block: nn.Module, x: torch.Tensor, kwargs: dict, index: int, model_type: str | None) -> None:
    """RecipeError unless folding a random order into the block maps its input x[..., p] to its output [..., p]
    (x: one segment [1, L, d]); the block is left as it was (fold, then the inverse fold: exact copies)."""
    from .blocks import run_block

    hidden = x.shape[-1]
    p = torch.randperm(hidden, generator=torch.Generator().manual_seed(index))
    before = run_block(block, x, kwargs, out_dtype=torch.float32)
    R.fold_block(block, p)
    try:
        after = run_block(block, x[..., p.to(x.device)], kwargs, out_dtype=torch.float32)
    finally:
        R.fold_block(block, R.inverse(p))
    expect = before[..., p.to(before.device)]
    scale = float(expect.abs().max().clamp_min(1e-30))
    diff = float((after - expect).abs().max())
    if not diff <= 1e-4 * scale:
        raise RecipeError(f"block {index}: permute: residual does not preserve this block's function (max difference "
                          f"{diff:.3g} of {scale:.3g}; model_type {model_type!r}): something in it does not commute "
                          "with a channel order of the residual stream; use permute: none, mlp, attention or "
                          "mlp+attention")


def search_prepass(recipe: Recipe, blocks: nn.ModuleList, targets: dict[int, dict[str, nn.Linear]],
                   hidden: torch.Tensor, kwargs: list[dict], device: torch.device, weights, group=None,
                   model_type: str | None = None) -> tuple[torch.Tensor, dict]:
    """The dense pre-pass and the search: (perm [d] long, report record). Readers: target Linears named
    residual.READERS whose pattern is n:m (all share the first prune's m, checked)."""
    from .pipeline import dense_pass

    first = recipe.first_prune
    readers: dict[int, dict[str, nn.Linear]] = {}
    patterns = set()
    for index, mods in targets.items():
        for name, mod in mods.items():
            pattern = first.pattern_for(index, name)
            if R.is_reader(name) and pattern.is_nm:
                readers.setdefault(index, {})[name] = mod
                patterns.add((pattern.n, pattern.m))
    if not readers:
        raise RecipeError("permute: residual: no target Linear that reads the residual stream "
                          f"({', '.join(R.READERS)}) has an n:m pattern")
    n, m = min(patterns, key=lambda p: (p[1], p[0]))  # the group size all readers share: the smallest m
    if len({p[1] for p in patterns}) > 1:
        raise RecipeError(f"permute: residual needs one n:m group size for all residual readers, the recipe gives "
                          f"{sorted(patterns)}")
    total = sum(mod.out_features for mods in readers.values() for mod in mods.values())
    fraction = min(1.0, R.SAMPLE_ROWS / total)
    generator = torch.Generator().manual_seed(0)
    rows: list[torch.Tensor] = []

    def visit(index, block, stats, block_input, block_output):
        _check_fold(block, block_input[0][None], kwargs[index], index, model_type)
        for name, mod in readers.get(index, {}).items():
            sq = None if first.method == "magnitude" else stats[name].sq_norm
            rows.append(R.sample_rows(R.reader_scores(mod.weight, sq), fraction, generator).cpu())

    start = time.perf_counter()
    dense_pass(blocks, readers, hidden, kwargs, device, weights, visit, group, "residual permutation: dense pass")
    prepass = time.perf_counter() - start
    stacked = torch.cat(rows)
    del rows
    start = time.perf_counter()
    found = R.search_residual(stacked, n, m)
    seconds = time.perf_counter() - start
    perm = found.perm
    if group is not None:  # every rank searched the same all-reduced scores; make sure the orders agree
        code = int(R.permutation_digest(perm)[:12], 16)
        if not group.all_true(group.min_int(code) == code):
            raise RecipeError("permute: residual: the ranks found different orders (their scores differ)")
    record = {"digest": R.permutation_digest(perm), "pattern": f"{n}:{m}", "readers": sum(map(len, readers.values())),
              "rows": total, "sample_rows": int(stacked.shape[0]), "kept_score_gain": found.gain,
              "identity_score": found.identity_score, "score": found.score, "rounds": found.rounds,
              "swaps": found.swaps, "prepass_seconds": round(prepass, 3), "search_seconds": round(seconds, 3),
              "file": PERMUTATION_FILE}
    log.info("residual permutation: kept score %+.3f%% on %d of %d reader rows, %d swaps; pre-pass %.1f s, search "
             "%.1f s", 100 * found.gain, stacked.shape[0], total, found.swaps, prepass, seconds)
    return perm, record
