"""Peak RSS (and prune time) of the same peer-bench worker run several times, interleaved: how much of a memory
difference between implementations is run-to-run wobble (issue 18). One cell, seed 0 of the fixed protocol.

  .venv/bin/python tools/peers/rss_repeat.py --cell wanda:2:4 --impls sdsonnx,reference --repeats 3 \\
      --baseline /path/to/older/checkout --json docs/benchmarks/peers_rss_repeat.json

--baseline adds "sdsonnx@COMMIT": the same worker with that checkout's sdsonnx package first on its path (an older
commit, to measure what a change moved). Every run's pruned weights are compared with the first run of its
implementation (and every sdsonnx variant with the first sdsonnx run): `bitwise_same` says whether they are equal.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import peer_bench  # noqa: E402
import quality_bench  # noqa: E402


def commit_of(folder: Path) -> str:
    return subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", default="wanda:2:4")
    parser.add_argument("--impls", default="sdsonnx,reference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, default=None, help="an older sdsonnx checkout to run beside")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    peer_bench.split_cell(args.cell)
    variants = [(impl, impl, {}) for impl in args.impls.split(",")]
    if args.baseline is not None:
        if not (args.baseline / "sdsonnx" / "__init__.py").exists():
            raise SystemExit(f"--baseline {args.baseline}: no sdsonnx package there")
        variants.append((f"sdsonnx@{commit_of(args.baseline)}", "sdsonnx", {"PYTHONPATH": str(args.baseline)}))
    cal = quality_bench.PROTOCOL["calibration"]
    model_dir = peer_bench.prepare_model(None, Path("."))
    records, first = [], {}
    with tempfile.TemporaryDirectory(prefix="rss-repeat-") as tmp:
        tmp = Path(tmp)
        import torch

        calibration, _ = peer_bench.protocol_tokens(model_dir, 0, cal["segments"], cal["length"],
                                                    quality_bench.PROTOCOL["evaluation"]["max_tokens"])
        torch.save(calibration, tmp / "calibration.pt")
        for repeat in range(args.repeats):
            for name, impl, env in variants:
                out = tmp / "weights.safetensors"
                command = peer_bench.worker_command(impl, args.cell, model_dir, tmp / "calibration.pt", out)
                load_before = os.getloadavg()[0]
                worker = peer_bench.run_worker(command, tmp / "worker.log", extra_env=env)
                weights = peer_bench.load_weights(out)
                key = "sdsonnx" if impl == "sdsonnx" else name
                first.setdefault(key, weights)
                record = {"variant": name, "repeat": repeat, "peak_rss_mib": round(worker["peak_rss_bytes"] / 2**20),
                          "prune_seconds": round(worker["prune_seconds"], 1),
                          "bitwise_same": same_weights(weights, first[key]),
                          "load": [round(load_before, 2), round(os.getloadavg()[0], 2)], **env}
                records.append(record)
                print(json.dumps(record), flush=True)
                out.unlink()
    summary = {}
    for name, _, _ in variants:
        rss = [r["peak_rss_mib"] for r in records if r["variant"] == name]
        summary[name] = {"peak_rss_mib": rss, "median": statistics.median(rss), "min": min(rss), "max": max(rss)}
    doc = {"cell": args.cell, "repeats": args.repeats, "commit": quality_bench.git_commit(), "runs": records,
           "summary": summary, "command": " ".join(sys.argv)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    for name, s in summary.items():
        print(f"{name:22s} peak RSS MiB {s['peak_rss_mib']} median {s['median']}")


if __name__ == "__main__":
    main()
