"""Peak working memory of one stage call on a Linear [d_out, d_in], measured exactly (the figures behind
sdsonnx/plan.py's SOLVER_WORK).

Each (stage, shape) runs in a fresh process with MALLOC_MMAP_THRESHOLD_=65536, so that every buffer above 64 KiB
is its own mapping and is returned to the system when freed. The child builds the stage's inputs (dense weight,
first-pruned weight, statistics of 8192 random tokens), resets its peak (/proc/self/clear_refs 5), runs the stage
as the pipeline does (pipeline.stage_with_fallbacks + output_error) and reports VmHWM minus the RSS before the
call. second_prune is also split into its phases: the second one-shot prune (up to the adjustment's start) and the
soft-mask adjustment (from its start to the end). Results are in units of H (d_in x d_in float32) and W
(d_out x d_in float32); iteration budgets are cut to 3 (the peak does not depend on them).

  .venv/bin/python tools/solver_memory.py                                    # LLaMA-7B's three Linear shapes
  .venv/bin/python tools/solver_memory.py --shapes 512x4096,8192x1024 --kinds second_prune
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys

KINDS = ("sparsegpt", "wanda", "redense", "second_prune")
SHAPES = "4096x4096,11008x4096,4096x11008"  # d_out x d_in: q/k/v/o, gate/up, down of LLaMA-7B
TOKENS = 8192


def _kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(kind: str, d_out: int, d_in: int) -> dict:
    """Runs in the measuring process: the stage's peak growth in bytes, and for second_prune its two phases."""
    import torch

    from sdsonnx import pipeline
    from sdsonnx.recipe import parse_recipe
    from sdsonnx.stages import ModuleContext
    from sdsonnx.stats import LayerStats, output_error

    torch.set_num_threads(1)
    sp = importlib.import_module("sdsonnx.sds.second_prune")  # the module (the package exports the function)
    gen = torch.Generator().manual_seed(0)
    first = {"kind": "prune", "method": "wanda" if kind == "wanda" else "sparsegpt", "sparsity": 0.5}
    stages = [first, {"kind": "redense", "max_iter": 3}, {"kind": "second_prune", "max_iter": 3}]
    recipe = parse_recipe({"model": "unused", "device": "cpu", "evaluation": None, "stages": stages})
    index = {"sparsegpt": 0, "wanda": 0, "redense": 1, "second_prune": 2}[kind]
    dense = torch.randn(d_out, d_in, generator=gen) * 0.02
    stats = LayerStats(d_in)
    for _ in range(TOKENS // 1024):
        stats.add(torch.randn(1, 1024, d_in, generator=gen))
    first_pruned = dense * (torch.rand(d_out, d_in, generator=gen) > 0.5)
    w = first_pruned if kind == "redense" else dense  # second_prune's input stands in for the re-dense output
    ctx = ModuleContext(name="m", dense=dense, first_pruned=first_pruned if index > 0 else None, stats=stats,
                        pattern=recipe.first_prune.pattern_for(0, "m", None), first_prune=recipe.first_prune)
    phases = {}
    original = sp.soft_mask_adjust

    def adjust(*args, **kwargs):
        phases["prune"] = _kib("VmHWM") * 1024 - base
        _reset_peak()
        phases["adjust_start"] = _kib("VmRSS") * 1024 - base
        return original(*args, **kwargs)

    sp.soft_mask_adjust = adjust
    base = _kib("VmRSS") * 1024
    _reset_peak()
    weight, _ = pipeline.stage_with_fallbacks(recipe.stages[index], w, ctx)
    output_error(ctx.dense, weight, stats.hessian)
    peak = _kib("VmHWM") * 1024 - base
    result = {"kind": kind, "d_out": d_out, "d_in": d_in, "peak_bytes": peak}
    if "prune" in phases:  # the peak was reset when the adjustment started
        result.update(prune_phase_bytes=phases["prune"], adjust_phase_bytes=peak, peak_bytes=max(phases["prune"], peak))
    return result


def measure(kind: str, d_out: int, d_in: int) -> dict:
    """One case in a fresh process; with the growth in units of H and W added."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", f"{kind}:{d_out}x{d_in}"], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{kind} {d_out}x{d_in} failed:\n{out.stderr[-3000:]}")
    record = json.loads(out.stdout.strip().splitlines()[-1])
    h, w = 4 * d_in * d_in, 4 * d_out * d_in
    for key in [k for k in record if k.endswith("_bytes")]:
        record[key.replace("_bytes", "_in_h_w")] = f"{record[key] / h:.2f} H = {record[key] / w:.2f} W"
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated d_out x d_in")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, shape = args.child.split(":")
        d_out, d_in = map(int, shape.split("x"))
        print(json.dumps(child(kind, d_out, d_in)))
        return
    for shape in args.shapes.split(","):
        d_out, d_in = map(int, shape.split("x"))
        for kind in args.kinds.split(","):
            print(json.dumps(measure(kind, d_out, d_in)), flush=True)


if __name__ == "__main__":
    main()
