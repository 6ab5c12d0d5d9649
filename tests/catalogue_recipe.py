"""Catalogue: recipes that must be refused before any weight loads (exit 2, file and field named, nothing written).

Every case runs the built-in smollm2-135m name: preflight reads its config only, never its weights.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from catalogue import case

PRUNE = "stages:\n  - {kind: prune, method: wanda, sparsity: 0.5}\n"
MODEL = "model: smollm2-135m\n"
FILE = r"{tmp}/recipe\.yaml"


def recipe_text(text: str):
    """A case maker: write `text` as tmp/recipe.yaml and run it with output tmp/out."""
    def make(tmp: Path) -> list[str]:
        (tmp / "recipe.yaml").write_text(text)
        return ["run", str(tmp / "recipe.yaml"), "--output", str(tmp / "out")]
    return make


def with_stage(stage: str, extra: str = ""):
    """A recipe with the built-in model and one stage list entry `stage` (a YAML flow mapping)."""
    return recipe_text(MODEL + extra + f"stages:\n  - {stage}\n")


def recipe(id: str, what: str, make, field: str, **kwargs):
    """A recipe case whose message must name the recipe file and then `field` (a regex) on the same line."""
    return case("recipe", id, what, make, FILE + r".*" + field, output="out", **kwargs)


CASES = [
    recipe("yaml-malformed", "malformed YAML", recipe_text("model: [smollm2-135m\n" + PRUNE), r"not valid YAML at line"),
    recipe("yaml-list", "a YAML document that is a list", recipe_text("- model: smollm2-135m\n"), r"<root>.*mapping"),
    recipe("yaml-scalar", "a YAML document that is a scalar", recipe_text("smollm2-135m\n"), r"<root>.*mapping.*str"),
    recipe("yaml-empty", "an empty recipe file", recipe_text(""), r"<root>.*empty document"),
    recipe("yaml-duplicate-key", "the same key twice in a mapping (PyYAML keeps the last)",
           recipe_text(MODEL + "output: a\n" + PRUNE + "output: b\n"), r"line 5: key 'output' appears twice.*line 2"),
    recipe("yaml-duplicate-nested-key", "the same key twice in a nested mapping",
           recipe_text(MODEL + "calibration:\n  segments: 4\n  segments: 8\n" + PRUNE), r"line 4: key 'segments'"),
    recipe("memory-budget-not-a-size", "a memory budget that is not a byte size",
           recipe_text(MODEL + "memory_budget: lots\n" + PRUNE), r"memory_budget: .*not a byte size: 'lots'"),
    recipe("memory-budget-negative", "a negative memory budget",
           recipe_text(MODEL + "memory_budget: -1\n" + PRUNE), r"memory_budget: .*greater than or equal to 0"),
    recipe("unknown-key", "an unknown key", recipe_text(MODEL + "modle: x\n" + PRUNE), r"modle: unknown key"),
    recipe("unknown-stage-key", "an unknown key in a stage",
           with_stage("{kind: prune, method: wanda, sparsity: 0.5, sparsty: 0.4}"), r"stages\.0\.sparsty: unknown key"),
    recipe("wrong-type", "a wrong type (text for an integer)",
           recipe_text(MODEL + "calibration: {segments: many}\n" + PRUNE), r"calibration\.segments: Input should be a valid integer"),
    recipe("wrong-type-section", "a section given as a scalar",
           recipe_text(MODEL + "calibration: 128\n" + PRUNE), r"calibration: Input should be .*dictionary"),
    recipe("sparsity-above-1", "sparsity above 1", with_stage("{kind: prune, method: wanda, sparsity: 1.5}"),
           r"stages\.0\.sparsity: Input should be less than 1"),
    recipe("sparsity-one", "sparsity 1 (everything pruned)", with_stage("{kind: prune, method: wanda, sparsity: 1}"),
           r"stages\.0\.sparsity: Input should be less than 1"),
    recipe("sparsity-zero", "sparsity 0", with_stage("{kind: prune, method: wanda, sparsity: 0}"),
           r"stages\.0\.sparsity: Input should be greater than 0"),
    recipe("sparsity-negative", "negative sparsity", with_stage("{kind: prune, method: wanda, sparsity: -0.5}"),
           r"stages\.0\.sparsity: Input should be greater than 0"),
    recipe("sparsity-percent", 'sparsity given as "50%"', with_stage("{kind: prune, method: wanda, sparsity: 50%}"),
           r"stages\.0\.sparsity: Input should be a valid number"),
    recipe("nm-n-equals-m", "an n:m pattern with n = m", with_stage("{kind: prune, method: wanda, pattern: '4:4'}"),
           r"stages\.0: .*0 < n < m"),
    recipe("nm-n-above-m", "an n:m pattern with n > m", with_stage("{kind: prune, method: wanda, pattern: '4:2'}"),
           r"stages\.0: .*0 < n < m"),
    recipe("nm-non-integer", "an n:m pattern with non-integers",
           with_stage("{kind: prune, method: wanda, pattern: '2.5:4'}"), r"stages\.0: pattern must be n:m with integers.*2\.5:4"),
    recipe("nm-separator", 'an n:m pattern with another separator ("2/4")',
           with_stage("{kind: prune, method: wanda, pattern: 2/4}"), r"stages\.0: pattern must be n:m with integers.*2/4"),
    recipe("nm-m-not-dividing", "m not dividing a target's input size",
           with_stage("{kind: prune, method: wanda, pattern: '2:5'}"), r"stages\.0: pattern 2:5 needs in_features divisible by 5"),
    recipe("targets-no-match", "a targets regex that matches nothing",
           recipe_text(MODEL + "targets: ['nonexistent_proj']\n" + PRUNE), r"targets: 'nonexistent_proj' matches no Linear"),
    recipe("targets-bad-regex", "a targets entry that is not a regular expression",
           recipe_text(MODEL + "targets: ['(']\n" + PRUNE), r"targets: invalid regular expression"),
    recipe("stage-kind-unknown", "an unknown stage kind", with_stage("{kind: prune2, method: wanda, sparsity: 0.5}"),
           r"stages\.0: .*'prune2'"),
    recipe("stage-method-unknown", "an unknown pruning method", with_stage("{kind: prune, method: obs, sparsity: 0.5}"),
           r"stages\.0\.method: Input should be"),
    recipe("no-prune-first", "no prune stage first", with_stage("{kind: redense}"),
           r"stages: the first stage must be a prune stage"),
    recipe("no-stages", "an empty stage list", recipe_text(MODEL + "stages: []\n"), r"stages: List should have at least 1 item"),
    recipe("device-cuda-missing", "device: cuda without CUDA", recipe_text(MODEL + "device: cuda\n" + PRUNE),
           r"device: cuda was asked for but no CUDA device is available",
           marks=(pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; see test_errors.py"),)),
]
