"""tools/dist_bench.py's projection follows the recipe's adjustment solver (collectives, serial factorisations,
working memory)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import dist_bench  # noqa: E402

from sdsonnx.plan import LinearShape  # noqa: E402
from sdsonnx.recipe import load_recipe  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "llama7b_sds_50.yaml"


def _with_second(**update):
    recipe = load_recipe(str(RECIPE), {})
    stages = list(recipe.stages)
    stages[2] = stages[2].model_copy(update=update)
    return recipe.model_copy(update={"stages": stages})


def test_collectives_count_the_admm_steps_not_the_soft_mask_iterations():
    lins = (LinearShape("mlp.down_proj", 64, 256, "down"),)
    soft = _with_second(adjust_solver="soft_mask", early_exit=False, max_iter=10)
    admm = _with_second(adjust_solver="admm", early_exit=False, admm_iterations=50, admm_reselect=30)
    it = {"redense": 7, "adjust": 10}
    sparsegpt = 1 + 5 * 2  # d_in 256: two 128-column blocks
    base = (sparsegpt + 1) + (9 + 7 + 1) + (sparsegpt + 4 + 1) + 3 + 3 * 1 * 3  # 3 all-gathers, statistics
    assert dist_bench.collectives_per_block(lins, soft, it) == base + 8 * 10
    assert dist_bench.collectives_per_block(lins, admm, it) == base + 3 + 5 * 30
