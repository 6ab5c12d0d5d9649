"""Quality benchmark on the fixed protocol: SmolLM2-135M, wiki-extracts, perplexity of pruned models.

Protocol (keep it fixed, later versions are compared against it):
  model        smollm2-135m (full, 30 blocks, float32)
  calibration  wiki-extracts calibration part, 64 segments x 512 tokens, seed 0
  evaluation   wiki-extracts evaluation part, 80 windows x 512 tokens (40,960 tokens)
  out of domain sotu-addresses evaluation part (U.S. State of the Union addresses), 80 windows x 512 tokens
Each run is `sdsonnx run` on a generated recipe (the dense row: `sdsonnx eval --json`) in its own process, so
wall time and peak RSS belong to that run alone. The out-of-domain perplexity is measured afterwards by
`sdsonnx eval --json` on the run's output folder (the dense row: on the model), in a process of its own, timed
apart (`ood_eval_seconds`); records without it (before issue 16) show "-". Results are merged into docs/benchmarks/quality.json (one record per run, keyed by case) and the
markdown table between the quality markers of docs/BENCHMARKS.md is regenerated from all records.

  .venv/bin/python tools/quality_bench.py --cases dense,magnitude:0.5,wanda:2:4,sparsegpt:4:8
  .venv/bin/python tools/quality_bench.py --cases sds-sparsegpt:2:4 --cases sds-sparsegpt:2:4:dd
  .venv/bin/python tools/quality_bench.py --cases sparsegpt:2:4@1,sparsegpt:2:4@2   # calibration seeds 1 and 2

A case is METHOD:PATTERN[:VARIANT][@SEED]: VARIANT is `owl`, `perm` (channel permutation, mlp+attention, n:m
only) or `rperm` (the residual stream's too: residual+mlp+attention, n:m only) for any run, or one of SDS_VARIANTS for an sds- run; SEED replaces the calibration seed (default 0, the
protocol's), so the seed spread is read from the same cases at seeds 0, 1, 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "docs" / "benchmarks" / "quality.json"
MD_PATH = ROOT / "docs" / "BENCHMARKS.md"
MARK_BEGIN, MARK_END = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"
PROTOCOL = {
    "model": "smollm2-135m",
    "calibration": {"source": "wiki-extracts", "segments": 64, "length": 512, "seed": 0},
    "evaluation": {"source": "wiki-extracts", "window": 512, "max_tokens": 40960},
}
PRUNE_VARIANTS = {"owl": {"profile": "owl"}, "perm": {"permute": "mlp+attention"},  # first-prune options
                  "rperm": {"permute": "residual+mlp+attention"}}
PERMUTE_VARIANTS = ("perm", "rperm")  # n:m only
LOADED_PER_CORE = 1.5  # a run whose load average exceeds 1.5x the cores is marked "*" and gets no time ratio
# The second, out-of-domain evaluation text (issue 16): same window and token cap as the in-domain one.
OOD_EVALUATION = {"source": "sotu-addresses", "window": 512, "max_tokens": 40960}
# SDS variants: (redense fields, second_prune fields, calibration fields). "sd" is the default recipe: re-dense on
# the first-pruned model's activations (SD), second prune + adjustment on the second-pruned model's (Eq. 5).
SDS_VARIANTS = {
    "sd": ({}, {}, {}),
    "kd": ({"data": "self"}, {}, {}),  # re-dense on the re-dense model's own activations (Table 6 "KD")
    "dd": ({"data": "dense"}, {"data": "dense"}, {}),  # both steps on the dense model's activations
    "msd": ({"calibration_part": 1}, {"calibration_part": 2}, {"parts": 3}),  # other samples per step
    "nowr": ({"l1": 0.0, "l2": 0.0}, {}, {}),  # no weight regularisation
    "sdadj": ({}, {"data": "sparse"}, {}),  # adjustment on the first-pruned model's activations too
    "ee": ({}, {"early_exit": True}, {}),  # the paper's early exit
    "rd200": ({"max_iter": 200}, {}, {}),  # 4x the re-dense iteration budget
    "plain": ({}, {"precondition": False, "max_iter": 100}, {}),  # adjustment as the paper writes it: mask by |W|
    "sgd": ({"solver": "sgd", "epochs": 10}, {}, {}),  # the paper's minibatch solver (10 of its 200 epochs)
    "admm": ({}, {"adjust_solver": "admm"}, {}),  # ADMM adjustment: 30 mask re-selecting + 20 exact steps (issue 16)
    "softmask": ({}, {"adjust_solver": "soft_mask"}, {}),  # the paper's soft-mask adjustment (the default until issue 16)
    "admm0": ({}, {"adjust_solver": "admm", "admm_reselect": 0}, {}),  # ADMM on the second prune's fixed mask
}


def pattern_fields(pattern: str) -> dict:
    return {"pattern": pattern} if ":" in pattern else {"sparsity": float(pattern)}


def split_seed(case: str) -> tuple[str, int]:
    """'CASE@SEED' -> (CASE, SEED); a case without '@' runs at the protocol's calibration seed."""
    name, _, seed = case.partition("@")
    if seed and not seed.isdigit():
        raise ValueError(f"bad case {case!r}: the calibration seed after '@' must be a non-negative integer")
    return name, int(seed) if seed else PROTOCOL["calibration"]["seed"]


def parse_case(case: str) -> tuple[bool, str, str, str]:
    """'METHOD:PATTERN[:VARIANT][@SEED]' or 'sds-METHOD:PATTERN[:VARIANT][@SEED]' -> (sds, method, pattern,
    variant); the seed is split_seed's."""
    head, *rest = split_seed(case)[0].split(":")
    pattern = ":".join(rest[:2]) if len(rest) >= 2 and rest[1].isdigit() else (rest[0] if rest else "")
    extra = rest[2:] if ":" in pattern else rest[1:]
    sds = head.startswith("sds-")
    variant = extra[0] if extra else ("sd" if sds else "")
    if (not pattern or (variant and variant not in PRUNE_VARIANTS and variant not in SDS_VARIANTS)
            or (variant in SDS_VARIANTS and not sds) or (variant in PERMUTE_VARIANTS and ":" not in pattern)):
        raise ValueError(f"bad case {case!r}: METHOD:PATTERN[:owl|perm|rperm][@SEED] or "
                         f"sds-METHOD:PATTERN[:owl|perm|rperm|{'|'.join(SDS_VARIANTS)}][@SEED] (perm and rperm need "
                         "an n:m pattern)")
    return sds, head.removeprefix("sds-"), pattern, variant


def case_recipe(case: str) -> dict:
    """A case -> recipe dict on the fixed protocol ('dense' is measured by `sdsonnx eval --json` instead)."""
    if case == "dense":
        raise ValueError("the dense model is measured by `sdsonnx eval --json`, not by a pruning run")
    sds, method, pattern, variant = parse_case(case)
    recipe = json.loads(json.dumps(PROTOCOL))
    recipe["calibration"]["seed"] = split_seed(case)[1]
    recipe["evaluation"].update(dense=False, each_step=True)
    recipe["weight_figure"] = "auto" if sds else None
    prune = {"kind": "prune", "method": method, **pattern_fields(pattern)}
    prune.update(PRUNE_VARIANTS.get(variant, {}))
    recipe["stages"] = [prune]
    if sds:
        redense, second, calibration = SDS_VARIANTS.get(variant, ({}, {}, {}))
        recipe["calibration"].update(calibration)
        recipe["stages"] += [{"kind": "redense", **redense}, {"kind": "second_prune", **second}]
    return recipe


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    # The benchmark writes its own results under docs/: only changes outside docs/ make the measured code "dirty".
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"],
                           cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def run_case(case: str, sdsonnx: str, keep: Path | None = None) -> dict:
    """One benchmark run in a subprocess; returns its record, stamped with the commit its code was loaded from.
    keep: copy the run's output folder to keep/CASE (':' -> '_') for later use (e.g. tools/quantized_bench.py)."""
    commit = git_commit()  # before the run: HEAD may move while a long case runs
    load = [round(os.getloadavg()[0], 2)]
    with tempfile.TemporaryDirectory() as tmp:
        if case == "dense":
            start = time.perf_counter()
            measured = eval_json(dense_command(sdsonnx))
            report = {"perplexity": {"dense": measured["perplexity"]}, "peak_rss_bytes": measured["peak_rss_bytes"],
                      "wall_seconds": {"total": time.perf_counter() - start}, "stages": [], "method": "dense",
                      "pattern": "dense", "profile": "uniform"}
            model = PROTOCOL["model"]
        else:
            path = Path(tmp) / "recipe.yaml"
            path.write_text(yaml.safe_dump(case_recipe(case)))
            start = time.perf_counter()
            proc = subprocess.run([sdsonnx, "run", str(path), "--output", str(Path(tmp) / "out"), "--no-progress"],
                                  capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                raise RuntimeError(f"{case} failed:\n{proc.stderr[-3000:]}")
            report = json.loads((Path(tmp) / "out" / "report.json").read_text())
            report["wall_seconds"]["total"] = time.perf_counter() - start
            model = str(Path(tmp) / "out")
            if keep is not None:
                shutil.copytree(model, keep / case.replace(":", "_"), dirs_exist_ok=True)
        start = time.perf_counter()
        ood = eval_json(eval_command(sdsonnx, model, OOD_EVALUATION))
        ood_seconds = time.perf_counter() - start
    load.append(round(os.getloadavg()[0], 2))
    ppl = report["perplexity"]
    return {
        "case": case,
        "model": PROTOCOL["model"],
        "method": ("sds-" if len(report["stages"]) > 1 else "") + report["method"],
        "pattern": report["pattern"],
        "variant": parse_case(case)[3] if case != "dense" else "",
        "profile": report["profile"],
        "calibration": {**PROTOCOL["calibration"], "seed": split_seed(case)[1]},
        "permute": PRUNE_VARIANTS.get(parse_case(case)[3], {}).get("permute", "none") if case != "dense" else "none",
        "evaluation": PROTOCOL["evaluation"],
        "perplexity": ppl.get("pruned", ppl.get("dense")),
        "perplexity_steps": {k: v for k, v in ppl.items() if k.startswith("after_")},
        "ood_evaluation": OOD_EVALUATION,
        "perplexity_ood": ood["perplexity"],
        "ood_eval_seconds": round(ood_seconds, 1),
        "wall_seconds": round(report["wall_seconds"]["total"], 1),
        "prune_seconds": round(report["wall_seconds"].get("prune", 0.0), 1),
        "step_eval_seconds": round(report["wall_seconds"].get("eval_steps", 0.0), 1),
        "stage_seconds": {k: v for k, v in report["wall_seconds"].items() if k.startswith("stage_")},
        "peak_rss_mib": round(report["peak_rss_bytes"] / 2**20),
        "second_prune_kept": kept_counts(report),
        "adjust_solver": adjust_solver(report),
        "load_average": load,  # 1-minute load at the start and the end: times taken under load are not costs
        "cpus": os.cpu_count(),
        "git_commit": commit,
        "date": time.strftime("%Y-%m-%d"),
    }


def kept_counts(report: dict) -> dict[str, int]:
    """How many Linears kept the first prune, the one-shot second prune or the adjusted weights."""
    counts: dict[str, int] = {}
    for module in report.get("modules", {}).values():
        kept = module["stages"][-1].get("kept")
        if kept:
            counts[kept] = counts.get(kept, 0) + 1
    return counts


def adjust_solver(report: dict) -> str | None:
    """The second prune's adjustment solver ("soft_mask" / "admm") as report.json records it; None for runs
    without an adjustment (one-shot, dense, or adjust: false)."""
    solvers = {stage.get("adjust_solver") for module in report.get("modules", {}).values()
               for stage in module["stages"] if stage.get("stage") == "second_prune"} - {None}
    if len(solvers) > 1:
        raise ValueError(f"one run, several adjustment solvers: {sorted(solvers)}")
    return solvers.pop() if solvers else None


def dense_command(sdsonnx: str) -> list[str]:
    """`sdsonnx eval --json` on the protocol's model and evaluation text (the dense row)."""
    return eval_command(sdsonnx, PROTOCOL["model"], PROTOCOL["evaluation"])


def eval_command(sdsonnx: str, model: str, evaluation: dict) -> list[str]:
    """`sdsonnx eval --json` of a model (name or a run's output folder) on an evaluation section's text."""
    return [sdsonnx, "eval", model, "--data", evaluation["source"], "--window", str(evaluation["window"]),
            "--max-tokens", str(evaluation["max_tokens"]), "--json"]


def eval_json(command: list[str]) -> dict:
    """Run an `sdsonnx eval --json` command; its last stdout line as a dict."""
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_records() -> list[dict]:
    return json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else []


def save_records(records: list[dict]) -> None:
    JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
    JSON_PATH.write_text(json.dumps(records, indent=1) + "\n")


def base_of(record: dict, records: list[dict]) -> dict | None:
    """The one-shot run an SDS run starts from: same base method, pattern, profile, channel permutation and
    calibration seed (records before these were kept: none, the protocol's seed)."""
    if not record["method"].startswith("sds-"):
        return None
    key = (record["method"].removeprefix("sds-"), *_base_key(record)[1:])
    return next((r for r in records if _base_key(r) == key), None)


def _seed(record: dict) -> int:
    return record.get("calibration", {}).get("seed", PROTOCOL["calibration"]["seed"])


def _base_key(record: dict) -> tuple:
    return (record["method"], record["pattern"], record["profile"], record.get("permute", "none"),
            _seed(record))


def markdown_table(records: list[dict]) -> str:
    """One row per record; SDS rows carry their perplexity change and time ratios against their base run; the
    out-of-domain columns are "-" for records without `perplexity_ood` (and its change for bases without it)."""
    rows = ["| method | pattern | variant | perplexity | vs base | OOD perplexity | OOD vs base | "
            "steps: first prune / re-dense | wall s | SDS/base wall | SDS/base wall w/o step evals | prune s | "
            "SDS/base prune | peak RSS MiB | commit |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=_row_order):
        base = base_of(r, records)
        steps = " / ".join(f"{v:.2f}" for v in r["perplexity_steps"].values()) or "-"
        change = f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}%" if base else "-"
        ood = r.get("perplexity_ood")
        base_ood = base.get("perplexity_ood") if base else None
        ood_change = f"{100 * (ood / base_ood - 1):+.1f}%" if ood and base_ood else "-"
        ood_cell = f"{ood:.2f}" if ood else "-"
        mark = "*" if under_load(r) else ""
        if base and (mark or under_load(base)):
            base = None  # times taken under load are not costs: no ratio with them (the perplexity change stays)
        wall = f"{r['wall_seconds'] / base['wall_seconds']:.2f}x" if base else "-"
        # Records before the step evaluations were timed apart (no step_eval_seconds) get "-", not a guess.
        step_eval = r.get("step_eval_seconds")
        lean = f"{(r['wall_seconds'] - step_eval) / base['wall_seconds']:.2f}x" if base and step_eval else "-"
        prune = f"{r['prune_seconds'] / base['prune_seconds']:.2f}x" if base and base["prune_seconds"] else "-"
        solver = row_solver(r)
        variant = ((r["variant"] or r["profile"]) + (f" ({solver})" if solver and solver not in r["variant"] else "")
                   + (f" @{_seed(r)}" if _seed(r) else ""))
        rows.append(f"| {r['method']} | {r['pattern']} | {variant} | {r['perplexity']:.2f} | "
                    f"{change} | {ood_cell} | {ood_change} | {steps} | {r['wall_seconds']:.0f}{mark} | {wall} | {lean} | "
                    f"{r['prune_seconds']:.0f}{mark} | {prune} | {r['peak_rss_mib']} | {r['git_commit']} |")
    return "\n".join(rows)


def row_solver(record: dict) -> str | None:
    """A record's adjustment solver: `adjust_solver` where kept; records before it was kept all ran before admm
    became the default (issue 16), so an SDS record without it used soft_mask unless its variant asked for admm."""
    if "adjust_solver" in record:
        return record["adjust_solver"]
    if not record["method"].startswith("sds-"):
        return None
    return "admm" if record["variant"].startswith("admm") else "soft_mask"


def seed_spread_table(records: list[dict]) -> str:
    """Cases run at several calibration seeds: mean, range and spread ((max - min) / mean) of both perplexities,
    so a difference between cases is read against what the sampling alone moves."""
    groups: dict[str, list[dict]] = {}
    for r in records:  # the same case name before and after the default solver changed are different cases
        case, solver = split_seed(r["case"])[0], row_solver(r)
        groups.setdefault(case + (f" ({solver})" if solver and solver not in case else ""), []).append(r)
    rows = ["| case | seeds | perplexity mean | range | spread | OOD mean | OOD range | OOD spread |",
            "|---|---|---|---|---|---|---|---|"]
    for case, group in sorted(groups.items(), key=lambda item: _row_order(item[1][0])):
        if len({_seed(r) for r in group}) < 2:
            continue
        seeds = ",".join(str(_seed(r)) for r in sorted(group, key=lambda r: _seed(r)))
        cells = []
        for key in ("perplexity", "perplexity_ood"):
            values = [r[key] for r in group if r.get(key)]
            if len(values) < 2:
                cells += ["-", "-", "-"]
                continue
            mean = sum(values) / len(values)
            cells += [f"{mean:.2f}", f"{min(values):.2f}-{max(values):.2f}", f"{100 * (max(values) - min(values)) / mean:.1f}%"]
        rows.append(f"| {case} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(rows) if len(rows) > 2 else ""


def under_load(record: dict) -> bool:
    """Whether a run shared the CPUs: its 1-minute load average at start or end above 1.5x its cores (records
    before `load_average` was kept count as quiet)."""
    return max(record.get("load_average", [0.0])) > LOADED_PER_CORE * record.get("cpus", 2)


def _row_order(record: dict) -> tuple:
    """Dense first, then by pattern (50%, 2:4, 4:8, others), profile, base method, one-shot before its SDS runs."""
    patterns = ["dense", "0.5", "2:4", "4:8"]
    pattern = patterns.index(record["pattern"]) if record["pattern"] in patterns else len(patterns)
    method = record["method"].removeprefix("sds-")
    return (pattern, record["pattern"], record["profile"] != "uniform", method, record["method"].startswith("sds-"),
            record["variant"] not in ("sd", ""), record["variant"], _seed(record))


def update_markdown(records: list[dict]) -> None:
    text = MD_PATH.read_text() if MD_PATH.exists() else "# Benchmarks\n"
    spread = seed_spread_table(records)
    spread = f"\n\nSeed spread (the same case at several calibration seeds):\n\n{spread}" if spread else ""
    block = f"{MARK_BEGIN}\n{markdown_table(records)}{spread}\n{MARK_END}"
    if MARK_BEGIN in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        text += f"\n## Quality\n\n{block}\n"
    MD_PATH.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", action="append", required=True, help="comma-separated cases (see module doc)")
    parser.add_argument("--sdsonnx", default=str(ROOT / ".venv" / "bin" / "sdsonnx"))
    parser.add_argument("--keep", type=Path, help="copy each run's output folder to KEEP/CASE (':' -> '_')")
    args = parser.parse_args()
    cases = [c for group in args.cases for c in _split_cases(group)]
    for case in cases:
        if case != "dense":
            case_recipe(case)  # fail on a malformed case before any run starts
    for case in cases:
        print(f"running {case} ...", flush=True)
        record = run_case(case, args.sdsonnx, args.keep)
        records = [r for r in load_records() if r["case"] != case] + [record]
        save_records(records)
        update_markdown(records)
        print(f"  {case}: perplexity {record['perplexity']:.3f}, out of domain {record['perplexity_ood']:.3f}, "
              f"{record['wall_seconds']:.0f} s, {record['peak_rss_mib']} MiB", flush=True)


def _split_cases(group: str) -> list[str]:
    """Split 'a:0.5,b:2:4' on commas (patterns use ':' never ',')."""
    return [c.strip() for c in group.split(",") if c.strip()]


if __name__ == "__main__":
    main()
