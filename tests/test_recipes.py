"""Every recipe in recipes/ validates and round-trips; bad recipes fail before any weight is loaded."""
from pathlib import Path

import pytest
import yaml

from sdsonnx.recipe import RecipeError, load_recipe, parse_recipe

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))
BASE = {"model": "smollm2-135m", "stages": [{"kind": "prune", "method": "wanda", "sparsity": 0.5}]}


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"llama7b_50.yaml", "opt125m_24.yaml", "smollm2_50.yaml", "smollm2_24.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_round_trips(path):
    recipe = load_recipe(path)
    again = parse_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe
    assert again.digest() == recipe.digest()


def with_(**changes):
    data = {**BASE, **changes}
    return data


@pytest.mark.parametrize("data, message", [
    (with_(foo=1), r"f\.yaml: foo: unknown key"),
    (with_(stages=[{"kind": "prune", "method": "wanda", "sparsity": 1.2}]), r"stages\.0\.sparsity: Input should be less than 1"),
    (with_(stages=[{"kind": "prune", "method": "wanda", "sparsity": 0}]), r"stages\.0\.sparsity: Input should be greater than 0"),
    (with_(stages=[{"kind": "prune", "method": "wanda", "pattern": "4:2"}]), r"stages\.0: .*0 < n < m"),
    (with_(stages=[{"kind": "prune", "method": "wanda", "pattern": "0:4"}]), r"stages\.0: .*0 < n < m"),
    (with_(stages=[{"kind": "prune", "method": "wanda"}]), r"exactly one of sparsity"),
    (with_(stages=[{"kind": "prune", "method": "obs", "sparsity": 0.5}]), r"stages\.0\.method"),
    (with_(stages=[{"kind": "prune", "method": "wanda", "sparsity": "half"}]), r"stages\.0\.sparsity"),
    (with_(stages=[{"kind": "redense"}]), r"first stage must be a prune stage"),
    (with_(stages=[{"kind": "prune", "method": "wanda", "pattern": "2:4", "profile": "owl"}]), r"owl"),
    (with_(calibration={"segments": -1}), r"calibration\.segments"),
    (with_(targets=["("]), r"targets: invalid regular expression"),
    (with_(stages=[]), r"stages: List should have at least 1 item"),
])
def test_bad_recipe_names_file_and_field(data, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data, "f.yaml")


def test_yaml_syntax_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(RecipeError, match="bad.yaml: not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")


def test_pattern_for_applies_owl_then_the_last_matching_override():
    from sdsonnx.pattern import Pattern
    from sdsonnx.recipe import PruneStage

    stage = PruneStage(kind="prune", method="wanda", sparsity=0.5, overrides=[
        {"blocks": [1], "modules": r"mlp\.", "sparsity": 0.3},
        {"modules": r"down_proj", "pattern": "2:4"}])
    assert stage.pattern_for(0, "layers.0.self_attn.q_proj") == Pattern(sparsity=0.5)
    assert stage.pattern_for(0, "layers.0.self_attn.q_proj", [0.42, 0.58]) == Pattern(sparsity=0.42)
    assert stage.pattern_for(1, "layers.1.mlp.up_proj", [0.42, 0.58]) == Pattern(sparsity=0.3)
    assert stage.pattern_for(0, "layers.0.mlp.up_proj", [0.42, 0.58]) == Pattern(sparsity=0.42)
    assert stage.pattern_for(1, "layers.1.mlp.down_proj") == Pattern.parse("2:4")  # the last match wins


def test_preflight_does_not_import_the_pipeline():
    import subprocess
    import sys

    code = "import sys, sdsonnx.preflight; sys.exit('sdsonnx.pipeline' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("text, message", [
    ("model: a\noutput: x\nstages: []\noutput: y\n", r"r\.yaml: line 4: key 'output' appears twice in one mapping \(first on line 2\)"),
    ("model: a\ncalibration:\n  seed: 1\n  seed: 2\n", r"r\.yaml: line 4: key 'seed' appears twice"),
    ("- model: a\n", r"r\.yaml: <root>: a recipe must be a mapping .* got a list"),
    ("42\n", r"r\.yaml: <root>: a recipe must be a mapping .* got a int"),
    ("", r"r\.yaml: <root>: .*got an empty document"),
    ("model: !!python/object/apply:os.system ['true']\n", r"r\.yaml: not valid YAML at line 1, column 8: .*python/object"),
])
def test_yaml_documents_that_are_refused(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: smollm2-135m\nstages:\n  - <<: {kind: prune, method: wanda}\n    sparsity: 0.5\n")
    assert load_recipe(path).first_prune.sparsity == 0.5


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "cal.txt").write_text("text\n")
    (folder / "ckpt").mkdir()
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, "model": "ckpt", "output": "../runs/x",
                                    "calibration": {"source": "data/cal.txt"}, "evaluation": {"source": "wikitext2"}}))
    monkeypatch.chdir(tmp_path / "recipes" / "data")  # the current folder does not matter
    recipe = load_recipe(path)
    assert (recipe.model, recipe.output) == (str(folder / "ckpt"), str(tmp_path / "runs" / "x"))
    assert recipe.calibration.source == str(folder / "data" / "cal.txt")
    assert recipe.evaluation.source == "wikitext2"  # built-in names are not paths
    assert load_recipe(path, {"output": "here"}).output == "here"  # -o/--output stays relative to the current folder
    path.write_text(yaml.safe_dump({**BASE, "model": "org/name", "output": str(tmp_path / "abs")}))
    assert (load_recipe(path).model, load_recipe(path).output) == ("org/name", str(tmp_path / "abs"))  # a hub id
    path.write_text(yaml.safe_dump(BASE))
    assert load_recipe(path).model == "smollm2-135m"


def test_shipped_recipes_write_into_the_repository_runs_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    root = RECIPES[0].parents[1]
    for path in RECIPES:
        assert load_recipe(path).output == str(root / "runs" / path.stem), path.name
