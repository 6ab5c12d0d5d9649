"""Distributed benchmark (issue 17): 1 process x 2 threads against 2 gloo ranks x 1 thread on a cut of SmolLM2-135M.

`run` writes an SDS-SparseGPT 50% recipe (recipes/smollm2_sds_50.yaml's stages, the first --blocks decoder blocks,
reduced calibration and evaluation), runs it once as `sdsonnx run` with OMP_NUM_THREADS=--one-threads and once under
`python -m torch.distributed.run --nproc-per-node 2` (loopback, OMP_NUM_THREADS=1) with this file as the worker,
compares the two outputs (mask mismatches, max |dW|, perplexities) and writes a record into
docs/benchmarks/dist.json: wall seconds per stage of both, and per rank the bytes each collective kind moved
(this rank's payload), the seconds spent inside collectives (waiting for the slower rank included), peak RSS,
and the 1-minute load average before and after.

  .venv/bin/python tools/dist_bench.py run --blocks 2 --workdir /tmp/distbench
  .venv/bin/python tools/dist_bench.py project          # docs/SCALING.md's projection table (no weights)

`project` applies the distributed split to sdsonnx/plan.py's one-process model of a block (recipes/
llama7b_sds_50.yaml: SDS-SparseGPT 50%, 128 x 2048 calibration, early_exit) on LLaMA-7B and LLaMA-70B shapes:
statistics passes and stream advances / W (samples split), solvers / W (rows split) except what every rank
repeats (SparseGPT's factorisations 2 d_in^3 and column-loop overhead per column, the solvers' per-d_in^2 fixed
work), evaluation passes / W (windows split), plus communication: bytes / bandwidth + collectives x ring latency.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "docs" / "benchmarks" / "dist.json"
STAGES = """stages:
  - {kind: prune, method: sparsegpt, sparsity: 0.5}
  - {kind: redense, solver: gram, l1: 0.1, l2: 0.1}
  - {kind: second_prune, adjust: true}
"""


def write_recipe(folder: Path, blocks: int, segments: int, length: int, eval_tokens: int) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(f"model: smollm2-135m\nnum_blocks: {blocks}\ndevice: cpu\n"
                    f"calibration: {{source: wiki-extracts, segments: {segments}, length: {length}, seed: 0}}\n"
                    f"evaluation: {{source: wiki-extracts, window: {length}, max_tokens: {eval_tokens}}}\n" + STAGES)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("model-*.safetensors")):
        out.update(load_file(path))
    return out


def compare(one: Path, two: Path) -> dict:
    """Mask mismatches (count), max |dW| and both perplexity dicts of two run folders."""
    w1, w2 = _weights(one), _weights(two)
    mismatches = sum(int(((w1[k] != 0) != (w2[k] != 0)).sum()) for k in w1)
    max_diff = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1)
    p1 = json.loads((one / "report.json").read_text())["perplexity"]
    p2 = json.loads((two / "report.json").read_text())["perplexity"]
    return {"mask_mismatches": mismatches, "max_abs_weight_diff": max_diff, "perplexity_1": p1, "perplexity_2": p2}


def run(blocks: int, workdir: Path, segments: int, length: int, eval_tokens: int, one_threads: int = 2) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(workdir, blocks, segments, length, eval_tokens)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    record = {"model": f"smollm2-135m, first {blocks} of 30 blocks", "method": "sds-sparsegpt 50% (redense max_iter "
              "50, adjust max_iter 50: recipe defaults)", "calibration": f"{segments} x {length}",
              "evaluation_tokens": eval_tokens, "load_average_before": os.getloadavg()[0]}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from sdsonnx.cli import main; main()", "run", str(recipe), "-o", str(workdir / "one"), "--force",
                    "--no-progress"], env={**env, "OMP_NUM_THREADS": str(one_threads)}, check=True, cwd=ROOT)
    record["one_process_threads"] = one_threads
    record["one_process_seconds"] = round(time.perf_counter() - start, 2)
    record["load_average_between"] = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                    "127.0.0.1", "--master-port", str(_free_port()), str(Path(__file__).resolve()), "worker",
                    str(recipe), str(workdir / "two"), str(workdir)], env={**env, "OMP_NUM_THREADS": "1"},
                   check=True, cwd=ROOT)
    record["two_ranks_1_thread_seconds"] = round(time.perf_counter() - start, 2)
    record["load_average_after"] = os.getloadavg()[0]
    for key, folder in (("one", workdir / "one"), ("two", workdir / "two")):
        report = json.loads((folder / "report.json").read_text())
        record[f"wall_seconds_{key}"] = report["wall_seconds"]
        record[f"peak_rss_bytes_{key}"] = report["peak_rss_bytes"]
    record["ranks"] = [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(2)]
    record.update(compare(workdir / "one", workdir / "two"))
    record["command"] = (f"tools/dist_bench.py run --blocks {blocks} --segments {segments} --length {length} "
                         f"--eval-tokens {eval_tokens} --one-threads {one_threads}")
    records = json.loads(JSON_PATH.read_text())["records"] if JSON_PATH.is_file() else []
    JSON_PATH.write_text(json.dumps({"records": records + [record]}, indent=2) + "\n")
    return record


def worker(recipe_path: str, output: str, stats_dir: str) -> None:
    """Under torchrun: run the recipe on this rank, then write rankN.json with the RankGroup's counters."""
    import torch

    from sdsonnx.distributed import close, from_environment
    from sdsonnx.recipe import load_recipe
    from sdsonnx.run import run_recipe

    torch.set_num_threads(1)
    group = from_environment()
    recipe = load_recipe(recipe_path, {})
    start = time.perf_counter()
    run_recipe(recipe, Path(output), recipe_path, progress=False, force=True, group=group)
    stats = {"rank": group.rank, "seconds": round(time.perf_counter() - start, 2),
             "comm_seconds": round(group.comm_seconds, 3), "bytes_moved": group.bytes_moved, "calls": group.calls,
             "by_kind": {k: {"calls": v[0], "bytes": v[1], "seconds": round(v[2], 3)} for k, v in group.by_kind.items()},
             "blocks": recipe.num_blocks, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    (Path(stats_dir) / f"rank{group.rank}.json").write_text(json.dumps(stats, indent=2))
    close(group)


LLAMA = {"llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000),
         "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                           num_key_value_heads=8, vocab_size=32000)}


def collectives_per_block(linears, recipe, iterations: dict[str, int]) -> int:
    """Collective calls of one block on several ranks (each a latency): per Linear and stage, SparseGPT
    unstructured 1 + 5 per 128-column block (4 radix rounds + ties), re-dense 9 + 1 per iteration, second prune
    a SparseGPT + 4, its adjustment (on the Linears not early-exited) 8 per iteration (2 losses, norms, 5
    selection rounds), or with adjust_solver admm 3 per call (2 losses, mask changes) + 5 per re-selecting
    step (a matrix-wide selection), one all-gather per Linear and stage, statistics 3 per distinct input per stage."""
    from sdsonnx.plan import EARLY_EXIT_SHARE

    calls = 0
    stats = 3 * len({lin.group for lin in linears}) * len(recipe.stages)
    for lin in linears:
        sparsegpt = 1 + 5 * -(-lin.d_in // 128)
        calls += sparsegpt + 1  # prune + record
        calls += 9 + iterations["redense"] + 1
        adjust_share = 1.0 - EARLY_EXIT_SHARE if recipe.stages[2].early_exit else 1.0
        second = recipe.stages[2]
        if second.adjust_solver == "admm":
            calls += sparsegpt + 4 + adjust_share * (3 + 5 * min(second.admm_reselect, second.admm_iterations)) + 1
        else:
            calls += sparsegpt + 4 + adjust_share * 8 * iterations["adjust"] + 1
        calls += 3  # all-gathers
    return int(calls + stats)


def project(workers=(1, 8, 64), bandwidth: float = 3.0e9, latency: float = 50e-6, gflops: float = 105.0,
            eval_gflops: float = 28.0, load_factor: float = 1.0) -> list[dict]:
    """Projected seconds per block and whole-model hours of recipes/llama7b_sds_50.yaml on LLaMA-7B/70B shapes for
    each worker count (module docstring); memory per rank and bytes moved per block per rank."""
    from transformers import LlamaConfig

    from sdsonnx.plan import (ADJUST_COST, ADMM_COST, F32, REDENSE_COST, SOLVER_WORK, SPARSEGPT_LOOP,
                              admm_factorisations, gram_bytes, model_shape, plan_from_shape, work_kind)
    from sdsonnx.recipe import load_recipe

    recipe = load_recipe(str(ROOT / "recipes" / "llama7b_sds_50.yaml"), {})
    rows = []
    for name, cfg in LLAMA.items():
        shape = model_shape(LlamaConfig(**cfg))
        plan = plan_from_shape(shape, recipe, eval_tokens=341_469, gflops=gflops, eval_gflops=eval_gflops)
        lins = shape.linears[0]
        flops = plan.flops_per_block
        serial_flops = 2 * sum(2.0 * lin.d_in ** 3 for lin in lins)  # two SparseGPT calls: factorisations
        per_column = SPARSEGPT_LOOP[0]
        second = recipe.stages[2]
        adjust_share = 1.0 - 0.97 if second.early_exit else 1.0
        if second.adjust_solver == "admm":  # every rank factorises the whole H + rho I; its loop is per weight
            factorisations = admm_factorisations(second.admm_iterations, min(second.admm_reselect,
                                                                             second.admm_iterations))
            serial_flops += adjust_share * sum(ADMM_COST[4] * factorisations * lin.d_in ** 3 for lin in lins)
            adjust_fixed = 0.0
        else:
            adjust_fixed = ADJUST_COST[3]
        serial_loop = sum(2 * per_column * lin.d_in + (REDENSE_COST[3] + adjust_share * adjust_fixed) * lin.d_in ** 2
                          for lin in lins)
        split_flops = flops["statistics passes"] + flops["stream advances"] + flops["solvers"] - serial_flops
        grams = gram_bytes(lins)
        weights = F32 * sum(lin.d_out * lin.d_in for lin in lins)
        calls = collectives_per_block(lins, recipe, {"redense": recipe.stages[1].max_iter,
                                                     "adjust": recipe.stages[2].max_iter})
        cal = recipe.calibration
        cal_stream = cal.segments * cal.length * shape.hidden * 2  # float16 activations
        eval_stream = plan.evaluation_tokens * shape.hidden * 2
        work = [p for stage in recipe.stages for p in SOLVER_WORK[work_kind(stage)]]  # (H copies, W copies)
        for w in workers:
            moved = 0 if w == 1 else len(recipe.stages) * (2 * (w - 1) / w * grams + (w - 1) / w * weights)
            comm = 0.0 if w == 1 else moved / bandwidth + calls * 2 * (w - 1) * latency
            seconds = (load_factor * ((serial_flops + split_flops / w) / (gflops * 1e9) + serial_loop
                       + (plan.loop_seconds_per_block - serial_loop) / w
                       + flops["evaluation passes"] / (eval_gflops * 1e9) / w) + comm)
            memory = (F32 * shape.block_params[0] + (len(recipe.stages) + 1) * weights + grams
                      + max(F32 * (squares * lin.d_in ** 2 + wcopies * lin.d_out * lin.d_in / w)
                            for squares, wcopies in work for lin in lins)
                      + ((plan.calibration_streams + 1) * cal_stream + plan.evaluation_streams * eval_stream) / w)
            rows.append({"model": name, "workers": w, "seconds_per_block": round(seconds, 1),
                         "hours": round(seconds * shape.blocks / 3600, 2), "comm_seconds_per_block": round(comm, 2),
                         "bytes_moved_per_block_per_rank": int(moved), "collectives_per_block": calls,
                         "memory_per_rank_bytes": int(memory),
                         "one_process_plan_seconds_per_block": round(plan.seconds_per_block, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--blocks", type=int, default=2)
    r.add_argument("--workdir", type=Path, default=Path("/tmp/distbench"))
    r.add_argument("--segments", type=int, default=16)
    r.add_argument("--length", type=int, default=512)
    r.add_argument("--eval-tokens", type=int, default=8192)
    r.add_argument("--one-threads", type=int, default=2, help="threads of the one-process run")
    pr = sub.add_parser("project")
    pr.add_argument("--bandwidth", type=float, default=3.0e9, help="bytes/s per rank (25 GbE ~ 3e9)")
    pr.add_argument("--latency", type=float, default=50e-6, help="seconds per ring step of a small collective")
    pr.add_argument("--gflops", type=float, default=105.0, help="float32 matmul rate per worker")
    pr.add_argument("--eval-gflops", type=float, default=28.0, help="float16 rate of the evaluation passes (CPU)")
    pr.add_argument("--load-factor", type=float, default=1.0, help="measured / planned seconds (machine load)")
    w = sub.add_parser("worker")
    w.add_argument("recipe")
    w.add_argument("output")
    w.add_argument("stats_dir")
    args = parser.parse_args()
    if args.command == "run":
        print(json.dumps(run(args.blocks, args.workdir, args.segments, args.length, args.eval_tokens,
                             args.one_threads), indent=2))
    elif args.command == "project":
        print(json.dumps(project(bandwidth=args.bandwidth, latency=args.latency, gflops=args.gflops,
                                 eval_gflops=args.eval_gflops, load_factor=args.load_factor), indent=2))
    else:
        worker(args.recipe, args.output, args.stats_dir)


if __name__ == "__main__":
    main()
