"""Re-dense solver benchmark: `gram` (FISTA on H) against `sgd` (the paper's minibatch procedure) on real layers.

Both solvers minimise the same per-layer objective (paper Eq. 4, normalised as in sdsonnx/sds/objective.py), so
they are compared on the value J they reach from the first prune's weights (lower is better), the share of
near-zero weights, the seconds spent, and what the second prune makes of their output (relative output error of
the final weights, which layer version the never-worse rule kept). Protocol: the quality benchmark's model and
calibration (SmolLM2-135M, wiki-extracts 64 x 512, seed 0), cut to its first BLOCKS decoder blocks (14 Linears),
SparseGPT 2:4 first prune, default second prune; no perplexity (a cut model has none worth reading). Each
configuration runs in this process one after the other; results go to docs/benchmarks/solvers.json and the table
between the solver markers of docs/BENCHMARKS.md.

  .venv/bin/python tools/solver_bench.py                       # gram 50/200 iterations, sgd 1/5/20 epochs
  .venv/bin/python tools/solver_bench.py --configs gram:50,sgd:5
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from quality_bench import PROTOCOL, ROOT, git_commit

from sdsonnx.recipe import parse_recipe
from sdsonnx.run import run_recipe

JSON_PATH = ROOT / "docs" / "benchmarks" / "solvers.json"
MD_PATH = ROOT / "docs" / "BENCHMARKS.md"
MARK_BEGIN, MARK_END = "<!-- solver-table:begin -->", "<!-- solver-table:end -->"
BLOCKS = 2
DEFAULT_CONFIGS = "gram:50,gram:200,sgd:1,sgd:5,sgd:20"


def redense_fields(config: str) -> dict:
    """'gram:ITERATIONS' or 'sgd:EPOCHS' -> the redense stage's solver fields (everything else at defaults)."""
    solver, _, budget = config.partition(":")
    if solver not in ("gram", "sgd") or not budget.isdigit() or int(budget) <= 0:
        raise ValueError(f"bad config {config!r}: gram:ITERATIONS or sgd:EPOCHS")
    return {"solver": "gram", "max_iter": int(budget)} if solver == "gram" else {"solver": "sgd", "epochs": int(budget)}


def config_recipe(config: str) -> dict:
    return {"model": PROTOCOL["model"], "num_blocks": BLOCKS, "calibration": PROTOCOL["calibration"],
            "evaluation": None, "device": "cpu", "weight_figure": None,
            "stages": [{"kind": "prune", "method": "sparsegpt", "pattern": "2:4"},
                       {"kind": "redense", **redense_fields(config)}, {"kind": "second_prune"}]}


def run_config(config: str) -> dict:
    recipe = parse_recipe(config_recipe(config), f"<solver_bench {config}>")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = run_recipe(recipe, Path(tmp) / "out", progress=False)
        wall = time.perf_counter() - start
    modules = list(report["modules"].values())
    redense = [m["stages"][1] for m in modules]
    kept: dict[str, int] = {}
    for m in modules:
        kept[m["stages"][2]["kept"]] = kept.get(m["stages"][2]["kept"], 0) + 1

    def mean(values):
        return sum(values) / len(values)

    return {"config": config, "blocks": BLOCKS, "modules": len(modules), "first_prune": "sparsegpt 2:4",
            "calibration": PROTOCOL["calibration"], "redense": redense_fields(config),
            "objective_after": mean([r["loss_after"] for r in redense]),
            "objective_before": mean([r["loss_before"] for r in redense]),
            "near_zero_share": mean([r["near_zero_share"] for r in redense]),
            "solver_steps": mean([r["iterations"] for r in redense]),
            "solver_seconds": round(sum(r["seconds"] for r in redense), 1),
            "redense_stage_seconds": round(report["wall_seconds"]["stage_redense"], 1),
            "first_error": mean([m["stages"][0]["error"] for m in modules]),
            "final_error": mean([m["error"] for m in modules]), "kept": kept, "wall_seconds": round(wall, 1),
            "git_commit": git_commit(), "date": time.strftime("%Y-%m-%d")}


def markdown_table(records: list[dict]) -> str:
    rows = ["| solver | budget | J: first prune -> re-dense (mean) | near-zero share | solver s | re-dense stage s | "
            "output error: first prune -> final | kept (adjusted/second/first) | commit |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        budget = f"{r['redense']['max_iter']} iterations" if r["redense"]["solver"] == "gram" else f"{r['redense']['epochs']} epochs"
        kept = "/".join(str(r["kept"].get(k, 0)) for k in ("adjusted", "second", "first"))
        rows.append(f"| {r['redense']['solver']} | {budget} | {r['objective_before']:.4f} -> {r['objective_after']:.4f} | "
                    f"{r['near_zero_share']:.3f} | {r['solver_seconds']:.1f} | {r['redense_stage_seconds']:.1f} | "
                    f"{r['first_error']:.4f} -> {r['final_error']:.4f} | {kept} | "
                    f"{r['git_commit']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated gram:ITERATIONS / sgd:EPOCHS")
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for config in configs:
        redense_fields(config)  # fail on a malformed config before any run starts
    records = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else []
    for config in configs:
        print(f"running {config} ...", flush=True)
        record = run_config(config)
        records = [r for r in records if r["config"] != config] + [record]
        JSON_PATH.write_text(json.dumps(records, indent=1) + "\n")
        text = MD_PATH.read_text()
        if MARK_BEGIN in text:
            head, rest = text.split(MARK_BEGIN, 1)
            MD_PATH.write_text(head + f"{MARK_BEGIN}\n{markdown_table(records)}\n{MARK_END}" + rest.split(MARK_END, 1)[1])
        print(f"  {config}: J {record['objective_after']:.4f}, solver {record['solver_seconds']} s, "
              f"final error {record['final_error']:.4f}", flush=True)


if __name__ == "__main__":
    main()
