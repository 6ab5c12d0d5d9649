"""Quality of quantized artifacts on the fixed protocol (docs/BENCHMARKS.md, "Quantized artifacts"; issue 15 item 2).

For each checkpoint (NAME=FOLDER; `dense` = the built-in SmolLM2-135M): the fp32 export (`sdsonnx export`), its
quantized copies (the function `sdsonnx export --quantize SCHEME` runs after its fp32 export:
`artifact.quantize.quantize_artifact`, here applied to the fp32 export already made instead of exporting again),
and the perplexity of every artifact through ONNX Runtime with `sdsonnx eval FOLDER` on the protocol's 80 windows
of 512 tokens (wiki-extracts evaluation part, no KV cache). Deterministic: machine load changes the time only.
Records merge into docs/benchmarks/quantized.json (key: checkpoint name, scheme).

  .venv/bin/python tools/quantized_bench.py --case sds-sparsegpt:2:4=/tmp/h15/runs/sds_24 --work /tmp/h15/q
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "docs" / "benchmarks" / "quantized.json"
SDS = str(ROOT / ".venv" / "bin" / "sdsonnx")
EVAL = ["--data", "wiki-extracts", "--window", "512", "--max-tokens", "40960", "--json"]
SCHEMES = ("int8-nbits", "int8-dynamic", "int8-static")
TARGET = 0.03  # issue 15: sparse INT8 perplexity within 3% of the sparse fp32 model's


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "sdsonnx"], cwd=ROOT,
                           capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def pytorch_perplexity(name: str, checkpoint: Path) -> float | None:
    """The checkpoint's own perplexity on the protocol: report.json's 'pruned', or quality.json's dense row."""
    report = checkpoint / "report.json"
    if report.is_file():
        return (json.loads(report.read_text()).get("perplexity") or {}).get("pruned")
    quality = json.loads((ROOT / "docs" / "benchmarks" / "quality.json").read_text())
    return next((r["perplexity"] for r in quality if r["case"] == name), None)


def make_artifacts(checkpoint: Path, work: Path, name: str, schemes: tuple[str, ...]) -> dict[str, dict]:
    """scheme -> {path, command, seconds}; 'fp32' is the plain export."""
    from sdsonnx.artifact.quantize import calibration_ids, quantize_artifact

    tag = name.replace(":", "_")
    fp32 = work / f"{tag}-fp32"
    out = {"fp32": {"path": fp32, "command": f"sdsonnx export {checkpoint} {fp32}"}}
    if not (fp32 / "sdsonnx.json").is_file():
        t0 = time.perf_counter()
        run([SDS, "export", str(checkpoint), str(fp32)])
        out["fp32"]["seconds"] = round(time.perf_counter() - t0, 1)
    for scheme in schemes:
        path = work / f"{tag}-{scheme}"
        out[scheme] = {"path": path, "command": f"sdsonnx export {checkpoint} {path} --quantize {scheme}"}
        if (path / "sdsonnx.json").is_file():
            continue
        t0 = time.perf_counter()
        calibration = calibration_ids(checkpoint) if scheme == "int8-static" else None
        quantize_artifact(fp32, path, scheme, calibration)
        out[scheme]["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def measure(name: str, checkpoint: Path, work: Path, schemes: tuple[str, ...], make_only: bool = False,
            evaluate: tuple[str, ...] | None = None) -> list[dict]:
    """One record per artifact of `checkpoint`: ONNX perplexity and its change vs the fp32 export and PyTorch."""
    artifacts = make_artifacts(checkpoint, work, name, schemes)
    if make_only:
        return []
    torch_ppl = pytorch_perplexity(name, checkpoint)
    records, fp32_ppl = [], None
    for scheme, art in artifacts.items():
        if evaluate is not None and scheme not in evaluate:
            continue
        load = os.getloadavg()
        measured = json.loads(run([SDS, "eval", str(art["path"]), *EVAL]).strip().splitlines()[-1])
        manifest = json.loads((art["path"] / "sdsonnx.json").read_text())
        ppl = measured["perplexity"]
        fp32_ppl = ppl if scheme == "fp32" else fp32_ppl
        rec = {"checkpoint": name, "checkpoint_path": str(checkpoint), "scheme": scheme, "artifact": str(art["path"]),
               "perplexity": ppl, "pytorch_fp32_perplexity": torch_ppl, "onnx_fp32_perplexity": fp32_ppl,
               "vs_pytorch_fp32": ppl / torch_ppl - 1 if torch_ppl else None,
               "vs_onnx_fp32": ppl / fp32_ppl - 1 if fp32_ppl else None,
               "sparsity_at_zero_point": manifest["sparsity"]["global"], "pattern": manifest["sparsity"]["pattern"],
               "extra_zeros": manifest["sparsity"].get("extra_zeros"),
               "fp32_matmuls": len((manifest.get("quantization") or {}).get("fp32_matmuls", [])),
               "model_bytes": sum(f.stat().st_size for f in art["path"].glob("model.onnx*")),
               "tokens": measured["tokens"], "eval_seconds": measured["seconds"],
               "make_seconds": art.get("seconds"), "loadavg_1m_at_start": round(load[0], 2),
               "commands": [art["command"], f"sdsonnx eval {art['path']} {' '.join(EVAL)}"],
               "git_commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M")}
        if scheme != "fp32":  # against PyTorch fp32 when the run measured it, else the fp32 export (equal to 1e-8)
            change = rec["vs_pytorch_fp32"] if rec["vs_pytorch_fp32"] is not None else rec["vs_onnx_fp32"]
            rec["target_reference"] = "pytorch fp32" if rec["vs_pytorch_fp32"] is not None else "onnx fp32"
            rec["target_within_3pct"] = change is not None and change <= TARGET
        records.append(rec)
        save(rec)
        print(f"{name} {scheme}: ppl {ppl:.4f} ({measured['seconds']:.0f} s)", flush=True)
    return records


def finalize(doc: dict) -> None:
    """Fill each record's change vs the fp32 export of its checkpoint (also when measured by another process)."""
    fp32 = {r["checkpoint"]: r["perplexity"] for r in doc["records"] if r["scheme"] == "fp32"}
    for r in doc["records"]:
        r["onnx_fp32_perplexity"] = fp32.get(r["checkpoint"])
        r["vs_onnx_fp32"] = r["perplexity"] / fp32[r["checkpoint"]] - 1 if r["checkpoint"] in fp32 else None
        if r["scheme"] != "fp32":
            change = r["vs_pytorch_fp32"] if r["vs_pytorch_fp32"] is not None else r["vs_onnx_fp32"]
            r["target_reference"] = "pytorch fp32" if r["vs_pytorch_fp32"] is not None else "onnx fp32"
            r["target_within_3pct"] = change is not None and change <= TARGET


def save(rec: dict) -> None:
    doc = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else {"format": "sdsonnx-quantized/1",
                                                                         "records": []}
    doc["protocol"] = {"model": "smollm2-135m", "evaluation": "wiki-extracts evaluation part, 80 windows x 512 "
                       "tokens (40,960), no KV cache, ONNX Runtime CPU", "target": "int8 perplexity <= 1.03 x "
                       "the PyTorch fp32 perplexity of the same checkpoint"}
    key = (rec["checkpoint"], rec["scheme"])
    doc["records"] = [r for r in doc["records"] if (r["checkpoint"], r["scheme"]) != key] + [rec]
    finalize(doc)
    JSON_PATH.write_text(json.dumps(doc, indent=1) + "\n")


def markdown_table(doc: dict) -> str:
    """Rows per checkpoint and scheme: ONNX ppl, change vs PyTorch fp32 and vs ONNX fp32, 3% target, zeros, size."""
    rows = ["| checkpoint | weights | ONNX ppl | PyTorch fp32 ppl | vs PyTorch fp32 | vs ONNX fp32 | <= +3%? | "
            "zeros at zero point | fp32 MatMuls | model.onnx MB | eval s | load | commit |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {s: i for i, s in enumerate(("fp32",) + SCHEMES + ("int4-nbits",))}
    for r in sorted(doc["records"], key=lambda r: (r["checkpoint"] != "dense", r["checkpoint"], order.get(r["scheme"], 9))):
        pct = lambda x: "-" if x is None else f"{100 * x:+.2f}%"  # noqa: E731
        torch_ppl = "-" if r["pytorch_fp32_perplexity"] is None else f"{r['pytorch_fp32_perplexity']:.3f}"
        hit = "-" if r["scheme"] == "fp32" else ("yes" if r.get("target_within_3pct") else "**no**")
        rows.append(f"| {r['checkpoint']} | {r['scheme']} | {r['perplexity']:.3f} | "
                    f"{torch_ppl} | "
                    f"{pct(r['vs_pytorch_fp32'])} | {pct(r['vs_onnx_fp32'])} | {hit} | "
                    f"{100 * r['sparsity_at_zero_point']:.2f}% ({r['pattern']}) | {r['fp32_matmuls']} | "
                    f"{r['model_bytes'] / 1e6:.0f} | {r['eval_seconds']:.0f} | {r['loadavg_1m_at_start']} | "
                    f"{r['git_commit']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print the markdown table of quantized.json and exit")
    parser.add_argument("--case", action="append", default=[], help="NAME=CHECKPOINT_FOLDER (dense=builtin)")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdsonnx-quantized"))
    parser.add_argument("--make-only", action="store_true", help="make the artifacts, measure nothing")
    parser.add_argument("--eval", default=None, help="evaluate only these artifacts (comma-separated, e.g. fp32)")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(JSON_PATH.read_text())))
        return
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.work.mkdir(parents=True, exist_ok=True)
    for case in args.case:
        name, _, folder = case.partition("=")
        if folder == "builtin":
            from sdsonnx.models import builtin_smollm2_dir

            folder = str(builtin_smollm2_dir())
        measure(name, Path(folder), args.work, tuple(s for s in args.schemes.split(",") if s), args.make_only,
                None if args.eval is None else tuple(args.eval.split(",")))


if __name__ == "__main__":
    main()
