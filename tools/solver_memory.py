"""Peak working memory of one stage call on a Linear [d_out, d_in], measured exactly (the figures behind
sdsonnx/plan.py's SOLVER_WORK).

Each (stage, shape) runs in a fresh process with MALLOC_MMAP_THRESHOLD_=65536, so that every buffer above 64 KiB
is its own mapping and is returned to the system when freed. The child builds the stage's inputs (dense weight,
first-pruned weight, statistics of 8192 random tokens), resets its peak (/proc/self/clear_refs 5), runs the stage
as the pipeline does (pipeline.stage_with_fallbacks + output_error) and reports VmHWM minus the RSS before the
call. second_prune (adjust_solver soft_mask) and second_prune_admm (adjust_solver admm) are also split into their
phases: the second one-shot prune (up to the adjustment's start) and the adjustment (from its start to the end).
Results are in units of H (d_in x d_in float32) and W (d_out x d_in float32); iteration budgets are cut to 3 (the
peak does not depend on them); ADMM runs 3 steps of which the first 2 re-select the mask (--admm-reselect), so
both of its phases (re-selecting with rho growing, then the fixed mask) run.

  .venv/bin/python tools/solver_memory.py                                    # LLaMA-7B's three Linear shapes
  .venv/bin/python tools/solver_memory.py --shapes 512x4096,8192x1024 --kinds second_prune
  .venv/bin/python tools/solver_memory.py --kinds second_prune_admm --admm-reselect 0   # fixed-mask steps only

--seconds times the ADMM adjustment alone (admm_reconstruct on random W and H, CPU time of this process at one
thread, so that other load on the host does not count) and the float32 matmul rate, for plan.ADMM_COST:

  OMP_NUM_THREADS=1 .venv/bin/python tools/solver_memory.py --seconds --shapes 1024x1024,2048x1024,1024x2048
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

KINDS = ("sparsegpt", "wanda", "redense", "second_prune", "second_prune_admm")
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


def child(kind: str, d_out: int, d_in: int, admm_iterations: int = 3, admm_reselect: int = 2) -> dict:
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
    second = {"kind": "second_prune", "max_iter": 3, "adjust_solver": "admm" if kind == "second_prune_admm" else
              "soft_mask", "admm_iterations": admm_iterations, "admm_reselect": admm_reselect}
    stages = [first, {"kind": "redense", "max_iter": 3}, second]
    recipe = parse_recipe({"model": "unused", "device": "cpu", "evaluation": None, "stages": stages})
    index = {"sparsegpt": 0, "wanda": 0, "redense": 1, "second_prune": 2, "second_prune_admm": 2}[kind]
    dense = torch.randn(d_out, d_in, generator=gen) * 0.02
    stats = LayerStats(d_in)
    for _ in range(TOKENS // 1024):
        stats.add(torch.randn(1, 1024, d_in, generator=gen))
    first_pruned = dense * (torch.rand(d_out, d_in, generator=gen) > 0.5)
    w = first_pruned if kind == "redense" else dense  # second_prune's input stands in for the re-dense output
    ctx = ModuleContext(name="m", dense=dense, first_pruned=first_pruned if index > 0 else None, stats=stats,
                        pattern=recipe.first_prune.pattern_for(0, "m", None), first_prune=recipe.first_prune)
    phases = {}
    name = "admm_reconstruct" if kind == "second_prune_admm" else "soft_mask_adjust"
    original = getattr(sp, name)

    def adjust(*args, **kwargs):
        phases["prune"] = _kib("VmHWM") * 1024 - base
        _reset_peak()
        phases["adjust_start"] = _kib("VmRSS") * 1024 - base
        return original(*args, **kwargs)

    setattr(sp, name, adjust)
    base = _kib("VmRSS") * 1024
    _reset_peak()
    weight, _ = pipeline.stage_with_fallbacks(recipe.stages[index], w, ctx)
    output_error(ctx.dense, weight, stats.hessian)
    peak = _kib("VmHWM") * 1024 - base
    result = {"kind": kind, "d_out": d_out, "d_in": d_in, "peak_bytes": peak}
    if kind == "second_prune_admm":
        result.update(admm_iterations=admm_iterations, admm_reselect=admm_reselect)
    if "prune" in phases:  # the peak was reset when the adjustment started
        result.update(prune_phase_bytes=phases["prune"], adjust_phase_bytes=peak, peak_bytes=max(phases["prune"], peak))
    return result


def measure(kind: str, d_out: int, d_in: int, admm_iterations: int = 3, admm_reselect: int = 2) -> dict:
    """One case in a fresh process; with the growth in units of H and W added."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", f"{kind}:{d_out}x{d_in}",
                          "--admm-iterations", str(admm_iterations), "--admm-reselect", str(admm_reselect)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{kind} {d_out}x{d_in} failed:\n{out.stderr[-3000:]}")
    record = json.loads(out.stdout.strip().splitlines()[-1])
    h, w = 4 * d_in * d_in, 4 * d_out * d_in
    for key in [k for k in record if k.endswith("_bytes")]:
        record[key.replace("_bytes", "_in_h_w")] = f"{record[key] / h:.2f} H = {record[key] / w:.2f} W"
    return record


def admm_seconds(d_out: int, d_in: int, iterations: int, reselect: int, per_row: bool = True,
                 repeats: int = 2) -> dict:
    """CPU seconds (this process, one thread) of admm_reconstruct at 50% (re-selected per row, or matrix-wide as
    for SparseGPT's unstructured masks), best of `repeats`, its
    factorisations alone (Cholesky + inverse of a d_in x d_in SPD matrix, best of `repeats`), and the float32
    matmul rate in the same CPU time (plan.measure_gflops' product, 1024^3)."""
    import torch

    from sdsonnx.pattern import Pattern
    from sdsonnx.sds.admm import admm_reconstruct

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * d_in, d_in, generator=gen)
    h = x.T @ x / x.shape[0]
    w_ref = torch.randn(d_out, d_in, generator=gen)
    pattern = Pattern.parse("0.5")
    keep = w_ref.abs() >= w_ref.abs().median(dim=1, keepdim=True).values
    w_init = w_ref * keep

    def cpu(fn) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            fn()
            best = min(best, time.process_time() - start)
        return best

    def factor():
        shifted = h.clone()
        shifted.diagonal().add_(0.1)
        torch.cholesky_inverse(torch.linalg.cholesky(shifted))

    a, b = torch.randn(1024, 1024, generator=gen), torch.randn(1024, 1024, generator=gen)
    rate = 2.0 * 1024 ** 3 * 4 / cpu(lambda: [a @ b for _ in range(4)]) / 1e9
    info = {}

    def run():
        info.update(admm_reconstruct(w_ref, w_init, h, iterations=iterations, pattern=pattern,
                                     reselect_iterations=reselect, per_row=per_row)[1])

    seconds = cpu(run)
    return {"d_out": d_out, "d_in": d_in, "iterations": iterations, "reselect": reselect, "per_row": per_row,
            "factorisations": info["factorisations"], "cpu_seconds": seconds, "factor_cpu_seconds": cpu(factor),
            "gflops": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated d_out x d_in")
    parser.add_argument("--admm-iterations", type=int, default=3, help="second_prune_admm's steps (default 3)")
    parser.add_argument("--admm-reselect", type=int, default=2,
                        help="second_prune_admm's re-selecting steps (default 2: both phases run)")
    parser.add_argument("--seconds", action="store_true",
                        help="time the ADMM adjustment instead (iteration budgets: --budgets)")
    parser.add_argument("--budgets", default="50:30,50:0,20:0",
                        help="--seconds: comma-separated admm iterations:reselect (a trailing w: re-selected "
                             "matrix-wide)")
    parser.add_argument("--repeats", type=int, default=2, help="--seconds: best of this many")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, shape = args.child.split(":")
        d_out, d_in = map(int, shape.split("x"))
        print(json.dumps(child(kind, d_out, d_in, args.admm_iterations, args.admm_reselect)))
        return
    for shape in args.shapes.split(","):
        d_out, d_in = map(int, shape.split("x"))
        if args.seconds:
            for budget in args.budgets.split(","):
                iterations, reselect = map(int, budget.rstrip("w").split(":"))
                print(json.dumps(admm_seconds(d_out, d_in, iterations, reselect, per_row=not budget.endswith("w"),
                                              repeats=args.repeats)), flush=True)
            continue
        for kind in args.kinds.split(","):
            print(json.dumps(measure(kind, d_out, d_in, args.admm_iterations, args.admm_reselect)), flush=True)


if __name__ == "__main__":
    main()
