"""Catalogue: recipes that must be refused before any weight loads (exit 2, file and field named)."""
from __future__ import annotations

from pathlib import Path

from catalogue import case

PRUNE = "stages:\n  - {kind: prune, method: wanda, sparsity: 0.5}\n"


def recipe_text(text: str):
    """A case maker: write `text` as tmp/recipe.yaml and run it with output tmp/out."""
    def make(tmp: Path) -> list[str]:
        (tmp / "recipe.yaml").write_text(text)
        return ["run", str(tmp / "recipe.yaml"), "--output", str(tmp / "out")]
    return make


CASES = [
    case("recipe", "yaml-malformed", "malformed YAML", recipe_text("model: [smollm2-135m\n" + PRUNE),
         r"{tmp}/recipe\.yaml", output="out"),
    case("recipe", "yaml-list", "a YAML document that is a list", recipe_text("- model: smollm2-135m\n"),
         r"{tmp}/recipe\.yaml.*mapping", output="out"),
    case("recipe", "unknown-key", "an unknown key", recipe_text("model: smollm2-135m\nmodle: x\n" + PRUNE),
         r"{tmp}/recipe\.yaml.*modle", output="out"),
]
