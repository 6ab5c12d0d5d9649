"""Quality benchmark on the fixed protocol: SmolLM2-135M, wiki-extracts, perplexity of pruned models.

Protocol (keep it fixed, later versions are compared against it):
  model        smollm2-135m (full, 30 blocks, float32)
  calibration  wiki-extracts calibration part, 64 segments x 512 tokens, seed 0
  evaluation   wiki-extracts evaluation part, 80 windows x 512 tokens (40,960 tokens)
Each run is `sdsonnx run` on a generated recipe in its own process, so wall time and peak RSS belong to that
run alone. Results are merged into docs/benchmarks/quality.json (one record per run, keyed by case) and the
markdown table between the quality markers of docs/BENCHMARKS.md is regenerated from all records.

  .venv/bin/python tools/quality_bench.py --cases dense,magnitude:0.5,wanda:2:4,sparsegpt:4:8
  .venv/bin/python tools/quality_bench.py --cases sds-sparsegpt:2:4 --cases sds-sparsegpt:2:4:dd
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
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
# SDS variants: the Table 6 data modes, weight regularisation off, and the sgd solver.
SDS_VARIANTS = {
    "sd": {},
    "dd": {"data": "dense"},
    "kd": {"data": "self"},
    "msd": {"msd": True},
    "nowr": {"l1": 0.0, "l2": 0.0},
    "sgd": {"solver": "sgd"},
}


def pattern_fields(pattern: str) -> dict:
    return {"pattern": pattern} if ":" in pattern else {"sparsity": float(pattern)}


def case_recipe(case: str) -> dict:
    """'dense' | 'METHOD:PATTERN[:owl]' | 'sds-METHOD:PATTERN[:VARIANT|owl]' -> recipe dict (protocol included)."""
    recipe = json.loads(json.dumps(PROTOCOL))
    recipe["evaluation"]["dense"] = case == "dense"
    recipe["evaluation"]["each_step"] = True
    if case == "dense":
        raise ValueError("the dense model is measured by DENSE_SNIPPET, not by a pruning run")
    head, *rest = case.split(":")
    sds = head.startswith("sds-")
    method = head.removeprefix("sds-")
    pattern = ":".join(rest[:2]) if len(rest) >= 2 and rest[1].isdigit() else rest[0]
    extra = rest[2:] if ":" in pattern else rest[1:]
    variant = extra[0] if extra else ("sd" if sds else "")
    prune = {"kind": "prune", "method": method, **pattern_fields(pattern)}
    if variant == "owl":
        prune["profile"] = "owl"
    recipe["stages"] = [prune]
    if sds:
        opts = dict(SDS_VARIANTS.get(variant, {}))
        data = opts.pop("data", "sparse")
        redense = {"kind": "redense", "data": data, **{k: v for k, v in opts.items() if k != "msd"}}
        second = {"kind": "second_prune", "data": data}
        if opts.get("msd"):
            recipe["calibration"]["parts"] = 3
            redense["calibration_part"], second["calibration_part"] = 1, 2
        recipe["stages"] += [redense, second]
    return recipe


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def run_case(case: str, sdsonnx: str) -> dict:
    """One benchmark run in a subprocess; returns its record."""
    with tempfile.TemporaryDirectory() as tmp:
        if case == "dense":
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", DENSE_SNIPPET], capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            report = {"perplexity": {"dense": measured["ppl"]}, "peak_rss_bytes": measured["peak_rss"],
                      "wall_seconds": {"total": time.perf_counter() - start}, "stages": [], "method": "dense",
                      "pattern": "dense", "profile": "uniform"}
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
    ppl = report["perplexity"]
    return {
        "case": case,
        "model": PROTOCOL["model"],
        "method": ("sds-" if len(report["stages"]) > 1 else "") + report["method"],
        "pattern": report["pattern"],
        "variant": case.split(":")[-1] if case.split(":")[-1] in {*SDS_VARIANTS, "owl"} else ("sd" if case.startswith("sds-") else ""),
        "profile": report["profile"],
        "calibration": PROTOCOL["calibration"],
        "evaluation": PROTOCOL["evaluation"],
        "perplexity": ppl.get("pruned", ppl.get("dense")),
        "perplexity_steps": {k: v for k, v in ppl.items() if k.startswith("after_")},
        "wall_seconds": round(report["wall_seconds"]["total"], 1),
        "prune_seconds": round(report["wall_seconds"].get("prune", 0.0), 1),
        "stage_seconds": {k: v for k, v in report["wall_seconds"].items() if k.startswith("stage_")},
        "peak_rss_mib": round(report["peak_rss_bytes"] / 2**20),
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
    }


DENSE_SNIPPET = f"""
import json, resource
from sdsonnx.data import evaluation_windows, load_split_texts
from sdsonnx.evaluate import perplexity
from sdsonnx.models import load_model
model, tok = load_model({PROTOCOL['model']!r})
ev = {PROTOCOL['evaluation']!r}
windows = evaluation_windows(tok, load_split_texts(ev['source'], 'evaluation'), ev['window'], ev['max_tokens'])
ppl = perplexity(model, windows, progress=False)
print(json.dumps({{"ppl": ppl, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def load_records() -> list[dict]:
    return json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else []


def save_records(records: list[dict]) -> None:
    JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
    JSON_PATH.write_text(json.dumps(records, indent=1) + "\n")


def markdown_table(records: list[dict]) -> str:
    base_time = {(r["method"], r["pattern"]): r["prune_seconds"] for r in records if not r["method"].startswith("sds-") and r["profile"] == "uniform"}
    rows = ["| method | pattern | variant | perplexity | steps (first prune / re-dense) | wall s | prune s | SDS/base time | peak RSS MiB | commit |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        steps = " / ".join(f"{v:.2f}" for v in r["perplexity_steps"].values()) or "-"
        base = base_time.get((r["method"].removeprefix("sds-"), r["pattern"]))
        ratio = f"{r['prune_seconds'] / base:.2f}x" if r["method"].startswith("sds-") and base else "-"
        rows.append(f"| {r['method']} | {r['pattern']} | {r['variant'] or r['profile']} | {r['perplexity']:.2f} | {steps} | "
                    f"{r['wall_seconds']:.0f} | {r['prune_seconds']:.0f} | {ratio} | {r['peak_rss_mib']} | {r['git_commit']} |")
    return "\n".join(rows)


def update_markdown(records: list[dict]) -> None:
    text = MD_PATH.read_text() if MD_PATH.exists() else "# Benchmarks\n"
    block = f"{MARK_BEGIN}\n{markdown_table(records)}\n{MARK_END}"
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
    args = parser.parse_args()
    cases = [c for group in args.cases for c in _split_cases(group)]
    for case in cases:
        if case != "dense":
            case_recipe(case)  # fail on a malformed case before any run starts
    for case in cases:
        print(f"running {case} ...", flush=True)
        record = run_case(case, args.sdsonnx)
        records = [r for r in load_records() if r["case"] != case] + [record]
        save_records(records)
        update_markdown(records)
        print(f"  {case}: perplexity {record['perplexity']:.3f}, {record['wall_seconds']:.0f} s, {record['peak_rss_mib']} MiB", flush=True)


def _split_cases(group: str) -> list[str]:
    """Split 'a:0.5,b:2:4' on commas (patterns use ':' never ',')."""
    return [c.strip() for c in group.split(",") if c.strip()]


if __name__ == "__main__":
    main()
