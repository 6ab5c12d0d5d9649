"""Checks that need the model's config but no weights: run before anything expensive starts."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from .blocks import UnsupportedModelError, select_targets, target_linears, unmatched_patterns
from .data import DataSourceError, classify_data_source
from .models import ModelSourceError, check_model_files, classify_model_source, keep_first_blocks, model_config
from .recipe import Recipe, RecipeError


def meta_model(config: AutoConfig, num_blocks: int | None = None):
    """The model's module tree on the meta device: names and shapes, no memory, no weights."""
    keep_first_blocks(config, num_blocks)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_recipe(recipe: Recipe, path: str = "<recipe>", output: Path | None = None) -> dict[int, dict[str, tuple[int, int]]]:
    """Raise RecipeError listing every problem found without loading weights.

    Returns {block: {module name: (d_out, d_in)}} of the modules the recipe will prune.
    """
    problems = []
    if recipe.device == "cuda" and not torch.cuda.is_available():
        problems.append(f"{path}: device: cuda was asked for but no CUDA device is available; use device: auto or cpu")
    try:
        classify_model_source(recipe.model)
        check_model_files(recipe.model, recipe.allow_pickle, recipe.trust_remote_code)
    except ModelSourceError as exc:
        raise RecipeError(f"{path}: model: {exc}") from None
    for field in ("calibration", "evaluation"):
        spec = getattr(recipe, field)
        if spec is not None:
            try:
                classify_data_source(spec.source)
            except DataSourceError as exc:
                problems.append(f"{path}: {field}.source: {exc}")
    if output is not None and output.exists() and not output.is_dir():
        problems.append(f"{path}: output: {output} exists and is not a directory")
    elif output is not None and not os.access(output if output.exists() else _existing_parent(output), os.W_OK):
        problems.append(f"{path}: output: {output} is not writable")

    shapes: dict[int, dict[str, tuple[int, int]]] = {}
    config = model_config(recipe.model, recipe.trust_remote_code)
    if config is not None:  # hub ids without network: checked after loading instead
        try:
            targets = target_linears(meta_model(config, recipe.num_blocks), recipe.targets, recipe.ignore)
        except UnsupportedModelError as exc:
            raise RecipeError(f"{path}: model: {exc}") from None
        shapes = {b: {n: (m.out_features, m.in_features) for n, m in mods.items()} for b, mods in targets.items()}
        problems += target_problems(recipe, shapes, path)
        problems += residual_problems(recipe, config, shapes, path)
    if problems:
        raise RecipeError("\n".join(problems))
    return shapes


def target_problems(recipe: Recipe, shapes: dict[int, dict[str, tuple[int, int]]], path: str) -> list[str]:
    """Regexes that match nothing, no module selected, n:m patterns that do not divide d_in."""
    names = [n for mods in shapes.values() for n in mods]
    problems = [f"{path}: targets: {p!r} matches no Linear in the decoder blocks" for p in unmatched_patterns(names, recipe.targets)]
    problems += [f"{path}: ignore: {p!r} matches no Linear in the decoder blocks" for p in unmatched_patterns(names, recipe.ignore)]
    if not select_targets(names, recipe.targets, recipe.ignore):
        problems.append(f"{path}: targets/ignore leave no module to prune")
    if recipe.weight_figure not in (None, "auto") and recipe.weight_figure not in select_targets(names, recipe.targets, recipe.ignore):
        problems.append(f"{path}: weight_figure: {recipe.weight_figure!r} is not a module the recipe prunes")
    first = recipe.first_prune
    for i, ov in enumerate(first.overrides):
        if ov.modules is not None and not select_targets(names, [ov.modules], []):
            problems.append(f"{path}: stages.0.overrides.{i}.modules: {ov.modules!r} matches no target module")
        for b in ov.blocks or []:
            if b not in shapes:
                problems.append(f"{path}: stages.0.overrides.{i}.blocks: block {b} does not exist (model has {len(shapes)})")
    indivisible: dict[str, list[str]] = {}  # pattern -> "name has d_in" of the modules it does not divide
    for block, mods in shapes.items():
        for name, (_, d_in) in mods.items():
            pattern = first.pattern_for(block, name)
            if pattern.is_nm and d_in % pattern.m:
                indivisible.setdefault(str(pattern), []).append(f"{name} has {d_in}")
    for pattern, culprits in indivisible.items():
        more = f" (and {len(culprits) - 1} more)" if len(culprits) > 1 else ""
        problems.append(f"{path}: stages.0: pattern {pattern} needs in_features divisible by {pattern.split(':')[1]}; "
                        f"{culprits[0]}{more}")
    return problems


def residual_problems(recipe: Recipe, config, shapes: dict[int, dict[str, tuple[int, int]]], path: str) -> list[str]:
    """permute: residual on an architecture the fold does not cover, or with no n:m target that reads the stream."""
    from .prune.residual import READERS, architecture_problem, is_reader

    first = recipe.first_prune
    if "residual" not in first.permute_scopes:
        return []
    problem = architecture_problem(getattr(config, "model_type", None))
    if problem is not None:
        return [f"{path}: stages.0.{problem}"]
    if not any(is_reader(n) and first.pattern_for(b, n).is_nm for b, mods in shapes.items() for n in mods):
        return [f"{path}: stages.0.permute: residual: no target Linear that reads the residual stream "
                f"({', '.join(READERS)}) has an n:m pattern"]
    return []


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path
