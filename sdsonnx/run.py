"""`sdsonnx run`: check the recipe, load model and data, prune, evaluate, save checkpoint and report."""
from __future__ import annotations

import json
import logging
import platform
import resource
import time
from pathlib import Path

import torch

from . import __version__
from .data import calibration_segments, evaluation_windows, load_split_texts
from .evaluate import perplexity
from .models import load_model
from .pipeline import DTYPES, PipelineResult, prune_model
from .preflight import check_recipe
from .recipe import Recipe

log = logging.getLogger(__name__)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def evaluation_data(recipe: Recipe, tokenizer) -> torch.Tensor | None:
    """Evaluation windows [k, window] or None when the recipe has no evaluation."""
    if recipe.evaluation is None:
        return None
    texts = load_split_texts(recipe.evaluation.source, "evaluation")
    return evaluation_windows(tokenizer, texts, recipe.evaluation.window, recipe.evaluation.max_tokens)


def _swap_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put `weights` into the named Linears; return what was there."""
    previous = {}
    with torch.no_grad():
        for name, w in weights.items():
            param = model.get_submodule(name).weight
            previous[name] = param.detach().clone()
            param.copy_(w)
    return previous


def step_perplexities(model, windows, recipe: Recipe, result: PipelineResult, progress: bool = True) -> dict[str, float]:
    """Perplexity of the model after each intermediate stage (paper Table 3), the final one excluded."""
    steps = {}
    for version, weights in sorted(result.snapshots.items()):
        final = _swap_weights(model, weights)
        steps[f"after_{version}_{recipe.stages[version - 1].kind}"] = perplexity(model, windows, progress=progress)
        _swap_weights(model, final)
    return steps


def run_recipe(recipe: Recipe, output: Path, recipe_path: str = "<recipe>", progress: bool = True) -> dict:
    """Run every stage of the recipe and write checkpoint, resolved recipe and report.json into `output`."""
    check_recipe(recipe, recipe_path, output)
    wall: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tokenizer = load_model(recipe.model, DTYPES[recipe.dtype], recipe.num_blocks)
    cal = recipe.calibration
    calibration = calibration_segments(tokenizer, load_split_texts(cal.source, "calibration"),
                                       cal.segments * cal.parts, cal.length, cal.seed)
    windows = evaluation_data(recipe, tokenizer)
    wall["load"] = time.perf_counter() - t0

    ppl: dict[str, float] = {}
    if windows is not None and recipe.evaluation.dense:
        t0 = time.perf_counter()
        ppl["dense"] = perplexity(model, windows, progress=progress)
        wall["eval_dense"] = time.perf_counter() - t0
        log.info("dense perplexity %.3f", ppl["dense"])

    t0 = time.perf_counter()
    result = prune_model(model, recipe, calibration, progress=progress)
    wall["prune"] = time.perf_counter() - t0
    for stage, seconds in zip(recipe.stages, result.stage_seconds):
        wall[f"stage_{stage.kind}"] = wall.get(f"stage_{stage.kind}", 0.0) + seconds

    if windows is not None:
        t0 = time.perf_counter()
        if result.snapshots:  # optional reporting (evaluation.each_step), timed apart from the final evaluation
            ppl.update(step_perplexities(model, windows, recipe, result, progress))
            wall["eval_steps"] = time.perf_counter() - t0
            t0 = time.perf_counter()
        ppl["pruned"] = perplexity(model, windows, progress=progress)
        wall["eval_pruned"] = time.perf_counter() - t0
        log.info("pruned perplexity %.3f", ppl["pruned"])

    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    (output / "recipe.resolved.yaml").write_text(recipe.to_yaml())
    report = build_report(recipe, result, ppl, wall, windows, calibration)
    if result.figure_versions:
        report["weight_figure"] = {"module": result.figure_module, "file": draw_weight_figure(recipe, result, ppl, output).name}
    (output / "report.json").write_text(json.dumps(report, indent=2))
    if recipe.export is not None:
        report.update(export_run(recipe, output, report["wall_seconds"]))
        (output / "report.json").write_text(json.dumps(report, indent=2))
    return report


def export_run(recipe: Recipe, output: Path, wall: dict) -> dict:
    """Export the run's checkpoint to output/onnx and validate it when the recipe asks; report entries."""
    from .export import export_checkpoint
    from .validate import validate_artifact

    t0 = time.perf_counter()
    export_checkpoint(output, output / "onnx", task=recipe.export.task, opset=recipe.export.opset)
    wall["export"] = round(time.perf_counter() - t0, 3)
    if not recipe.export.validate_artifact:
        return {"export": {"folder": "onnx", "validation": None}}
    t0 = time.perf_counter()
    checked = validate_artifact(output / "onnx", output)
    wall["validate"] = round(time.perf_counter() - t0, 3)
    failures = [f"{f.check}: {f.subject}: {f.message}" for f in checked.failures]
    return {"export": {"folder": "onnx", "validation": {"ok": checked.ok, "failures": failures}}}


def version_perplexities(recipe: Recipe, ppl: dict[str, float]) -> list[float | None]:
    """Perplexity of every weight version [dense, after stage 1, ..., final] where it was measured, else None."""
    last = len(recipe.stages)
    steps = [ppl.get(f"after_{v}_{recipe.stages[v - 1].kind}") for v in range(1, last)]
    return [ppl.get("dense"), *steps, ppl.get("pruned")]


def draw_weight_figure(recipe: Recipe, result: PipelineResult, ppl: dict[str, float], output: Path) -> Path:
    """weights.png: the chosen module's nonzero weights after each stage (paper Figure 1)."""
    from .figures import FIGURE_FILE, panel_titles, weight_figure

    titles = panel_titles([s.kind for s in recipe.stages], version_perplexities(recipe, ppl))
    return weight_figure(result.figure_module, result.figure_versions, titles, output / FIGURE_FILE)


def build_report(recipe: Recipe, result: PipelineResult, ppl: dict, wall: dict, windows, calibration) -> dict:
    """report.json: per-module sparsity/pattern/error, perplexities, wall time per stage, peak memory."""
    pruned = sum(m["sparsity"] * _numel(m) for m in result.modules.values())
    total = sum(_numel(m) for m in result.modules.values())
    return {
        "sdsonnx_version": __version__,
        "recipe_hash": recipe.digest(),
        "model": recipe.model,
        "method": recipe.first_prune.method,
        "stages": [s.kind for s in recipe.stages],
        "pattern": str(recipe.first_prune.base_pattern),
        "profile": recipe.first_prune.profile,
        "calibration": {"source": recipe.calibration.source, "segments": int(calibration.shape[0]),
                        "length": int(calibration.shape[1]), "seed": recipe.calibration.seed},
        "evaluation": None if windows is None else {"source": recipe.evaluation.source, "windows": int(windows.shape[0]),
                                                    "window": int(windows.shape[1]), "tokens": int(windows.numel())},
        "perplexity": ppl,
        "global_sparsity": pruned / max(total, 1),
        "wall_seconds": {k: round(v, 3) for k, v in wall.items()},
        "peak_rss_bytes": peak_rss_bytes(),
        "block_sparsity": result.block_sparsity,
        "host": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "modules": result.modules,
    }


def _numel(module_record: dict) -> int:
    return module_record["numel"]
