"""Side by side with the peers (issue 18): sdsonnx, llm-compressor and the reference code on the fixed protocol.

For each cell (SparseGPT / Wanda at 50% and 2:4) the implementations run interleaved, each in its own process
(tools/peers/worker.py; llm-compressor in .venv-llmcompressor, made by `make peers`), all handed the SAME
calibration token tensor (built once as `sdsonnx run` builds it from the fixed protocol, saved to a file) and the
same model folder (the built-in SmolLM2-135M, fp32). Each saves its pruned decoder Linears; the perplexity of every
run is then measured here by sdsonnx's own evaluation code (sdsonnx.evaluate.perplexity) on the protocol's 80
evaluation windows. Per run: perplexity, pruning seconds (the pruning call alone, inside the worker), command
seconds (the whole worker process: start, imports, model load, pruning, save), peak RSS of the pruning process,
threads, load average before and after, commit, the exact worker command. Then sdsonnx alone with calibration
seeds 1 and 2 on the 2:4 cells (the spread of its own sampler).

  make peers && .venv/bin/python tools/peer_bench.py                    # the full benchmark (all cells, seeds)
  .venv/bin/python tools/peer_bench.py --cells sparsegpt:2:4 --impls sdsonnx,reference --seeds 0 \\
      --num-blocks 2 --segments 8 --max-tokens 4096 --json /tmp/peers.json --no-markdown   # a quick check

Records go to docs/benchmarks/peers.json (merged by case) and the table between the peers markers of
docs/BENCHMARKS.md (ratios sdsonnx / peer within one run only). Runs with a shortened protocol never go there
unless --json names another file.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import quality_bench  # noqa: E402  (PROTOCOL and git_commit: one copy)

JSON_PATH = ROOT / "docs" / "benchmarks" / "peers.json"
MD_PATH = ROOT / "docs" / "BENCHMARKS.md"
MARK_BEGIN, MARK_END = "<!-- peers-table:begin -->", "<!-- peers-table:end -->"
WORKER = ROOT / "tools" / "peers" / "worker.py"
CELLS = ["sparsegpt:2:4", "wanda:2:4", "sparsegpt:0.5", "wanda:0.5"]
IMPLS = ["sdsonnx", "llmcompressor", "reference"]
PYTHONS = {"sdsonnx": ROOT / ".venv" / "bin" / "python", "reference": ROOT / ".venv" / "bin" / "python",
           "llmcompressor": ROOT / ".venv-llmcompressor" / "bin" / "python"}
THREADS = 2
HIGH_LOAD = 3.0  # a run whose 1-minute load average exceeded this (before or after) is flagged: timings unreliable


def split_cell(cell: str) -> tuple[str, str]:
    """'sparsegpt:2:4' -> ('sparsegpt', '2:4'); 'wanda:0.5' -> ('wanda', '0.5')."""
    method, _, pattern = cell.partition(":")
    if method not in ("sparsegpt", "wanda") or not pattern:
        raise ValueError(f"bad cell {cell!r}: sparsegpt|wanda:SPARSITY|N:M")
    return method, pattern


def case_id(impl: str, cell: str, seed: int) -> str:
    return f"{impl}:{cell}:seed{seed}"


def worker_env(threads: int = THREADS) -> dict[str, str]:
    """`threads` threads everywhere (default 2), offline hubs, nothing of this venv leaking into the other."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PEER_THREADS=str(threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TQDM_DISABLE="1")
    return env


def worker_command(impl: str, cell: str, model_dir: Path, calibration: Path, out: Path) -> list[str]:
    method, pattern = split_cell(cell)
    return [str(PYTHONS[impl]), str(WORKER), impl, method, pattern, str(model_dir), str(calibration), str(out)]


def run_worker(command: list[str], log: Path, threads: int = THREADS, extra_env: dict | None = None) -> dict:
    """Run one worker; its JSON line plus command_seconds (the process's wall time, start to exit)."""
    start, cpu = time.perf_counter(), _children_cpu()
    with open(log, "w") as err:
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, env={**worker_env(threads),
                              **(extra_env or {})}, cwd=ROOT, text=True)
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(command_seconds=seconds, command_cpu_seconds=cpu)
    return result


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished children."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sparsity_check(weights: dict, pattern: str) -> dict:
    """Share of zeros over the pruned Linears, and for n:m the number of groups breaking the pattern."""
    import torch

    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    out = {"sparsity": zeros / total}
    if ":" in pattern:
        n, m = (int(x) for x in pattern.split(":"))
        out["nm_violations"] = sum(int(((w.reshape(w.shape[0], -1, m) != 0).sum(-1) > n).sum())
                                   for w in weights.values())
    return out


def mask_difference(a: dict, b: dict) -> float:
    """Share of weights kept by one and pruned by the other (a, b: name -> weight)."""
    differ = sum(int(((a[k] != 0) != (b[k] != 0)).sum()) for k in a)
    return differ / sum(w.numel() for w in a.values())


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def evaluate(model, weights: dict, windows) -> tuple[float, float]:
    """(perplexity, seconds) of `model` with the run's Linear weights, by sdsonnx's evaluation code."""
    import torch

    from sdsonnx.evaluate import perplexity

    state = model.state_dict()
    missing = sorted(set(k for k in state if k.endswith("_proj.weight") and ".layers." in k) - set(weights))
    if missing or set(weights) - set(state):
        raise RuntimeError(f"saved weights do not match the model: missing {missing[:3]}, extra "
                           f"{sorted(set(weights) - set(state))[:3]}")
    with torch.no_grad():
        for name, w in weights.items():
            state[name].copy_(w)
    start = time.perf_counter()
    return perplexity(model, windows, progress=False), time.perf_counter() - start


def protocol_tokens(model_dir: Path, seed: int, segments: int, length: int, max_tokens: int):
    """(calibration [segments, length], evaluation windows) exactly as `sdsonnx run` draws them for the protocol."""
    from transformers import AutoTokenizer

    from sdsonnx.recipe import parse_recipe
    from sdsonnx.run import recipe_texts, recipe_tokens

    cal, ev = quality_bench.PROTOCOL["calibration"], quality_bench.PROTOCOL["evaluation"]
    recipe = parse_recipe({"model": str(model_dir), "weight_figure": None,
                           "calibration": {"source": cal["source"], "segments": segments, "length": length,
                                           "seed": seed},
                           "evaluation": {"source": ev["source"], "window": ev["window"], "max_tokens": max_tokens},
                           "stages": [{"kind": "prune", "method": "wanda", "sparsity": 0.5}]})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calibration, windows, _ = recipe_tokens(recipe, tokenizer, recipe_texts(recipe))
    return calibration, windows


def host() -> dict:
    flags = open("/proc/cpuinfo").read().split("flags", 2)[1].splitlines()[0] if Path("/proc/cpuinfo").exists() else ""
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return {"cpu": model, "avx512": "avx512f" in flags, "cores_visible": os.cpu_count()}


def make_record(impl: str, cell: str, seed: int, worker: dict, ppl: float, eval_seconds: float, checks: dict,
                command: list[str], load_before, load_after, run_id: str, protocol: dict, commit: str) -> dict:
    method, pattern = split_cell(cell)
    load = max(load_before[0], load_after[0])
    return {
        "case": case_id(impl, cell, seed), "run_id": run_id, "impl": impl, "method": method, "pattern": pattern,
        "seed": seed, "protocol": protocol, "perplexity": ppl,
        "prune_seconds": round(worker["prune_seconds"], 1), "command_seconds": round(worker["command_seconds"], 1),
        "prune_cpu_seconds": round(worker.get("prune_cpu_seconds", 0.0), 1),
        "command_cpu_seconds": round(worker.get("command_cpu_seconds", 0.0), 1),
        "load_seconds": round(worker["load_seconds"], 1), "eval_seconds": round(eval_seconds, 1),
        "peak_rss_mib": round(worker["peak_rss_bytes"] / 2**20), "threads": worker["threads"],
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after], "high_load": load > HIGH_LOAD,
        **checks, "versions": worker["versions"], "host": host(), "git_commit": commit,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(command), "bench_command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


# ---- records and table --------------------------------------------------------------------------------------------

def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def merge_records(records: list[dict], new: dict) -> list[dict]:
    return [r for r in records if r["case"] != new["case"]] + [new]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def markdown_table(records: list[dict]) -> str:
    """One row per run; peer rows carry sdsonnx / peer ratios against the sdsonnx run of the same cell, seed and
    benchmark invocation (run_id); seed rows (sdsonnx, seeds != 0) show the sampler's spread apart."""
    head = ("| cell | implementation | seed | perplexity | ppl vs sdsonnx | mask diff vs reference | prune s | "
            "prune CPU s | command s | command CPU s | peak RSS MiB | sdsonnx/peer prune | sdsonnx/peer prune CPU | "
            "sdsonnx/peer command | sdsonnx/peer command CPU | sdsonnx/peer RSS | threads | load avg | commit |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    order = {c: i for i, c in enumerate(CELLS)}
    impl_order = {i: k for k, i in enumerate(IMPLS)}
    key = lambda r: (order.get(f"{r['method']}:{r['pattern']}", 99), r["seed"], impl_order.get(r["impl"], 9))
    for r in sorted(records, key=key):
        base = next((s for s in records if s["impl"] == "sdsonnx" and s["method"] == r["method"]
                     and s["pattern"] == r["pattern"] and s["seed"] == r["seed"] and s["run_id"] == r["run_id"]), None)
        peer = base is not None and r["impl"] != "sdsonnx"
        load = max(r["load_average_before"][0], r["load_average_after"][0])
        vs = f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}%" if peer else "-"
        diff = r.get("mask_diff_vs_reference")
        diff = "-" if diff is None else f"{100 * diff:.2f}%"
        ratios = [_ratio(base[k], r[k]) if peer else "-" for k in ("prune_seconds", "prune_cpu_seconds", "command_seconds",
                                                                   "command_cpu_seconds", "peak_rss_mib")]
        flag = " (high)" if r["high_load"] else ""
        short = "" if r["protocol"].get("full", True) else " (short check)"
        rows.append(f"| {r['method']} {r['pattern']}{short} | {r['impl']} | {r['seed']} | {r['perplexity']:.3f} | {vs} | "
                    f"{diff} | {r['prune_seconds']:.0f} | {r['prune_cpu_seconds']:.0f} | {r['command_seconds']:.0f} | "
                    f"{r['command_cpu_seconds']:.0f} | {r['peak_rss_mib']} | "
                    f"{' | '.join(ratios)} | {r['threads']} | {load:.1f}{flag} | {r['git_commit']} |")
    return "\n".join(rows) + "\n\n" + seed_table(records)


def seed_table(records: list[dict]) -> str:
    """sdsonnx's perplexity per calibration seed on each cell that has more than one seed, and the spread."""
    rows = ["| cell | sdsonnx perplexity by seed | spread (max - min) / mean |", "|---|---|---|"]
    for cell in CELLS:
        method, pattern = split_cell(cell)
        runs = sorted((r for r in records if r["impl"] == "sdsonnx" and r["method"] == method
                       and r["pattern"] == pattern), key=lambda r: r["seed"])
        if len({r["seed"] for r in runs}) < 2:
            continue
        ppl = [r["perplexity"] for r in runs]
        spread = (max(ppl) - min(ppl)) / (sum(ppl) / len(ppl))
        rows.append(f"| {method} {pattern} | " + ", ".join(f"{r['seed']}: {r['perplexity']:.3f}" for r in runs)
                    + f" | {100 * spread:.2f}% |")
    return "\n".join(rows) if len(rows) > 2 else "(no seed spread measured yet)"


def update_markdown(records: list[dict], path: Path = MD_PATH) -> None:
    """Replace the text between the peers markers (the section must exist: it is placed by hand before Speed)."""
    text = path.read_text()
    if MARK_BEGIN not in text or MARK_END not in text:
        raise RuntimeError(f"{path}: no {MARK_BEGIN} ... {MARK_END} markers")
    head, rest = text.split(MARK_BEGIN, 1)
    path.write_text(head + f"{MARK_BEGIN}\n{markdown_table(records)}\n{MARK_END}" + rest.split(MARK_END, 1)[1])


# ---- the benchmark ------------------------------------------------------------------------------------------------

def prepare_model(num_blocks: int | None, tmp: Path) -> Path:
    """The built-in model's folder, or a copy cut to its first num_blocks blocks (quick checks only)."""
    from sdsonnx.models import builtin_smollm2_dir, load_model

    folder = builtin_smollm2_dir()
    if num_blocks is None:
        return folder
    model, tokenizer = load_model(str(folder), num_blocks=num_blocks)
    model.save_pretrained(tmp / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "model")
    return tmp / "model"


def plan_runs(cells: list[str], impls: list[str], seeds: list[int]) -> list[tuple[str, str, int]]:
    """(impl, cell, seed): every implementation on each cell in turn (seed 0), then sdsonnx alone on the 2:4 cells
    for the other seeds."""
    runs = [(impl, cell, 0) for cell in cells for impl in impls if 0 in seeds]
    runs += [("sdsonnx", cell, s) for s in seeds if s != 0 for cell in cells if ":" in split_cell(cell)[1]]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--seeds", default="0,1,2", help="seed 0: every implementation; others: sdsonnx on 2:4 cells")
    parser.add_argument("--num-blocks", type=int, default=None, help="cut model (quick checks; not the protocol)")
    parser.add_argument("--segments", type=int, default=quality_bench.PROTOCOL["calibration"]["segments"])
    parser.add_argument("--length", type=int, default=quality_bench.PROTOCOL["calibration"]["length"])
    parser.add_argument("--max-tokens", type=int, default=quality_bench.PROTOCOL["evaluation"]["max_tokens"])
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads of every worker and the evaluation")
    parser.add_argument("--json", type=Path, default=JSON_PATH)
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args()
    cells, impls = args.cells.split(","), args.impls.split(",")
    for cell in cells:
        split_cell(cell)
    if set(impls) - set(IMPLS):
        raise SystemExit(f"--impls: choose from {IMPLS}")
    seeds = [int(s) for s in args.seeds.split(",")]
    cal, ev = quality_bench.PROTOCOL["calibration"], quality_bench.PROTOCOL["evaluation"]
    full = args.num_blocks is None and args.threads == THREADS and (args.segments, args.length, args.max_tokens) == (
        cal["segments"], cal["length"], ev["max_tokens"])
    if not full and args.json == JSON_PATH:
        raise SystemExit("a shortened protocol must not write docs/benchmarks/peers.json: pass --json elsewhere")
    for impl in impls:
        if not PYTHONS[impl].exists():
            raise SystemExit(f"{PYTHONS[impl]} missing (llm-compressor's venv: make peers)")

    import torch

    from sdsonnx.models import load_model

    torch.set_num_threads(args.threads)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    protocol = {"model": "smollm2-135m" + (f" (first {args.num_blocks} blocks)" if args.num_blocks else ""),
                "calibration": {**cal, "segments": args.segments, "length": args.length},
                "evaluation": {**ev, "max_tokens": args.max_tokens}, "full": full}
    with tempfile.TemporaryDirectory(prefix="peer-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = prepare_model(args.num_blocks, tmp)
        windows, cal_paths = None, {}
        for seed in seeds:
            calibration, windows = protocol_tokens(model_dir, seed, args.segments, args.length, args.max_tokens)
            cal_paths[seed] = tmp / f"calibration-seed{seed}.pt"
            torch.save(calibration.clone(), cal_paths[seed])
        model, _ = load_model(str(model_dir))
        saved: dict[tuple[str, str, int], Path] = {}
        runs = plan_runs(cells, impls, seeds)
        for index, (impl, cell, seed) in enumerate(runs):
            out = tmp / f"{impl}-{cell.replace(':', '_')}-seed{seed}.safetensors"
            command = worker_command(impl, cell, model_dir, cal_paths[seed], out)
            print(f"running {case_id(impl, cell, seed)} (load {os.getloadavg()[0]:.1f}) ...", flush=True)
            commit = quality_bench.git_commit()
            before = os.getloadavg()
            worker = run_worker(command, tmp / "worker.log", args.threads)
            after = os.getloadavg()
            weights = load_weights(out)
            ppl, eval_seconds = evaluate(model, weights, windows)
            checks = sparsity_check(weights, split_cell(cell)[1])
            saved[(impl, cell, seed)] = out
            ref = saved.get(("reference", cell, seed))
            checks["mask_diff_vs_reference"] = mask_difference(weights, load_weights(ref)) if ref else None
            record = make_record(impl, cell, seed, worker, ppl, eval_seconds, checks, command, before, after,
                                 run_id, protocol, commit)
            records = merge_records(load_records(args.json), record)
            if impl == "reference":  # the runs of this cell before the reference get their mask difference now
                for r in records:
                    path = saved.get((r["impl"], f"{r['method']}:{r['pattern']}", r["seed"]))
                    if r["run_id"] == run_id and r["impl"] != "reference" and path and \
                            f"{r['method']}:{r['pattern']}" == cell and r["seed"] == seed:
                        r["mask_diff_vs_reference"] = mask_difference(load_weights(path), weights)
                record["mask_diff_vs_reference"] = 0.0
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(records, indent=1) + "\n")
            if not args.no_markdown:
                update_markdown(records)
            print(f"  {record['case']}: perplexity {ppl:.3f}, prune {record['prune_seconds']:.0f} s, command "
                  f"{record['command_seconds']:.0f} s, {record['peak_rss_mib']} MiB, load {record['load_average_after'][0]}"
                  f", sparsity {checks['sparsity']:.4f}", flush=True)
            if ("reference", cell, seed) not in runs[index + 1:]:  # no later run compares with these: free the disk
                for key in [k for k in saved if k[1:] == (cell, seed)]:  # (16 runs x 0.4 GiB filled a 6 GB disk)
                    saved.pop(key).unlink()


if __name__ == "__main__":
    main()
