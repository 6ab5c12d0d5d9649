"""Export and validation at size (issue 13): `sdsonnx export` and `sdsonnx validate` of a LLaMA-7B-shaped pruned
checkpoint, each in its own process, with its peak memory sampled.

The checkpoint comes from `tools/scale_bench.py write FOLDER --pattern 2:4` (random fp16 weights, decoder Linears
magnitude-pruned to 2:4, report.json recording it). The export is the streamed one (artifact/streamed.py) and the
validation the lean one (validate --lean), both picked by default at this size; the command lines name them anyway.
Peak memory: GNU time's maximum RSS, which counts the pages of memory-mapped files too (ONNX Runtime maps
model.onnx_data; those pages are page cache the kernel can drop), and the peak of RssAnon (memory the process
itself holds) sampled every 0.2 s. Results: docs/benchmarks/scale_export.json; `table()` for docs/BENCHMARKS.md.

  .venv/bin/python tools/scale_bench.py write /work/scale/llama7b-24 --pattern 2:4
  .venv/bin/python tools/scale_export.py /work/scale/llama7b-24 /work/scale/llama7b-24-onnx
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "docs" / "benchmarks" / "scale_export.json"
GIB = 2**30
sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_bench import checkpoint_shape, git_commit, parse_max_rss  # noqa: E402


def _anon_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measured(cmd: list[str]) -> dict:
    """Run cmd under /usr/bin/time -v; {seconds, peak_rss_bytes, peak_anon_bytes, returncode, stdout, stderr}."""
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak = [0]

    def sample() -> None:
        import psutil

        while proc.poll() is None:
            try:
                pids = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            except psutil.Error:
                pids = []
            peak[0] = max([peak[0], *(a for a in map(_anon_bytes, pids) if a is not None)])
            time.sleep(0.2)

    start = time.perf_counter()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    return {"seconds": round(seconds, 1), "peak_rss_bytes": parse_max_rss(stderr), "peak_anon_bytes": peak[0],
            "returncode": proc.returncode, "stdout": stdout, "stderr": stderr}


def export_and_validate(checkpoint: Path, out: Path, validate_too: bool = True, export_too: bool = True) -> dict:
    """The scale_export.json record of one export + lean validation of `checkpoint` into `out` (validation fields
    None when not `validate_too` or when validation wrote no validation.json; its stderr tail is then kept; export
    fields None when not `export_too`: `out` is an existing export)."""
    sdsonnx = [sys.executable, "-c", "import sys; from sdsonnx.cli import main; sys.argv[0] = 'sdsonnx'; main()"]
    export = {"seconds": None, "peak_rss_bytes": None, "peak_anon_bytes": None}
    if export_too:
        export = measured([*sdsonnx, "export", str(checkpoint), str(out), "--streamed", "--force"])
        if export["returncode"]:
            raise RuntimeError(f"export failed ({export['returncode']}):\n{export['stderr'][-4000:]}")
    validate = {"seconds": None, "peak_rss_bytes": None, "peak_anon_bytes": None, "returncode": None, "stderr": ""}
    if validate_too:
        validate = measured([*sdsonnx, "validate", str(out), "--checkpoint", str(checkpoint), "--lean"])
    path = out / "validation.json"
    result = json.loads(path.read_text()) if validate_too and path.is_file() else {}
    numerics = result.get("numerics") or [{}]
    data = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    return {
        "shape": checkpoint_shape(checkpoint),
        "checkpoint": checkpoint.name,
        "pattern": json.loads((checkpoint / "report.json").read_text()).get("pattern"),
        "onnx_bytes": data,
        "export_seconds": export["seconds"], "export_peak_rss_bytes": export["peak_rss_bytes"],
        "export_peak_anon_bytes": export["peak_anon_bytes"],
        "validate_seconds": validate["seconds"], "validate_peak_rss_bytes": validate["peak_rss_bytes"],
        "validate_peak_anon_bytes": validate["peak_anon_bytes"],
        "validation_ok": (validate["returncode"] == 0 and not result.get("failures")) if result else None,
        "validate_stderr_tail": None if result or not validate_too else validate["stderr"][-2000:],
        "notes": result.get("notes", []),
        "validation_failures": [f.get("message") for f in result.get("failures", [])][:5],
        "numerics_max_abs": numerics[0].get("max_abs"), "numerics_top1": numerics[0].get("top1_agreement"),
        "weights_checked": len(result.get("weights", [])),
        "commands": [f"sdsonnx export {checkpoint} {out} --streamed --force",
                     f"sdsonnx validate {out} --checkpoint {checkpoint} --lean"],
        "load_average_after": round(os.getloadavg()[0], 2),
        "commit": git_commit(),
    }


def table(records: list[dict]) -> str:
    """Markdown table of scale_export.json records."""
    lines = ["| model shape | checkpoint | ONNX on disk | export peak RSS (anon) | export time | validate peak RSS "
             "(anon) | validate time | weights checked | numerics max abs diff (top-1) | valid | load avg | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    gib = lambda b: "-" if b is None else f"{b / GIB:.2f} GiB"  # noqa: E731
    minutes = lambda t: "-" if t is None else f"{t / 60:.1f} min"  # noqa: E731
    for r in records:
        s = r["shape"]
        num = "-" if r.get("numerics_max_abs") is None else f"{r['numerics_max_abs']:.2g} ({r['numerics_top1']:.2f})"
        ok = {True: "yes", False: "NO", None: "-"}[r.get("validation_ok")]
        lines.append(
            f"| LLaMA hidden {s['hidden']}, FFN {s['ffn']}, {s['blocks']} blocks, vocab {s['vocab']} | "
            f"{r['pattern']} magnitude, fp16 | {r['onnx_bytes'] / GIB:.1f} GiB fp32 | "
            f"{gib(r['export_peak_rss_bytes'])} ({gib(r['export_peak_anon_bytes'])}) | {minutes(r['export_seconds'])} | "
            f"{gib(r['validate_peak_rss_bytes'])} ({gib(r['validate_peak_anon_bytes'])}) | "
            f"{minutes(r['validate_seconds'])} | {r['weights_checked']} | {num} | {ok} | {r['load_average_after']} | "
            f"{r['commit']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--json", type=Path, default=JSON_PATH)
    parser.add_argument("--no-validate", action="store_true", help="measure the export only")
    parser.add_argument("--validate-only", action="store_true", help="measure the validation of an existing export")
    args = parser.parse_args(argv)
    record = export_and_validate(args.checkpoint.resolve(), args.out.resolve(), not args.no_validate,
                                 not args.validate_only)
    print(json.dumps(record, indent=2), flush=True)
    old = json.loads(args.json.read_text())["records"] if args.json.is_file() else []
    records = [r for r in old if r["shape"] != record["shape"] or r["pattern"] != record["pattern"]] + [record]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"records": records}, indent=2) + "\n")
    print(table(records))


if __name__ == "__main__":
    main()
