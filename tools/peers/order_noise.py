"""How far float rounding alone moves a pruned model's perplexity (issue 18's fidelity floor).

The calibration segments are summed into each Linear's Gram matrix; their order does not change that sum in exact
arithmetic, only its rounding. This runs one implementation (tools/peers/worker.py, as tools/peer_bench.py runs
it) on the protocol's seed-0 calibration tensor with its segments in the protocol's order and reversed, and
reports both perplexities (sdsonnx's evaluation on the protocol's 80 windows) and the mask difference. A gap of
this size between two implementations is rounding, not a different algorithm.

  .venv/bin/python tools/peers/order_noise.py --impls reference,sdsonnx --cell sparsegpt:2:4
Records: docs/benchmarks/peers_order_noise.json (appended).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOOLS))
import peer_bench  # noqa: E402
import quality_bench  # noqa: E402

JSON_PATH = TOOLS.parent / "docs" / "benchmarks" / "peers_order_noise.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default="reference,sdsonnx")
    parser.add_argument("--cell", default="sparsegpt:2:4")
    parser.add_argument("--json", type=Path, default=JSON_PATH)
    args = parser.parse_args()
    impls = args.impls.split(",")
    if set(impls) - set(peer_bench.IMPLS):
        raise SystemExit(f"--impls: choose from {peer_bench.IMPLS}")
    peer_bench.split_cell(args.cell)

    import torch

    from sdsonnx.models import load_model

    torch.set_num_threads(peer_bench.THREADS)
    cal, ev = quality_bench.PROTOCOL["calibration"], quality_bench.PROTOCOL["evaluation"]
    model_dir = peer_bench.prepare_model(None, Path("."))
    calibration, windows = peer_bench.protocol_tokens(model_dir, 0, cal["segments"], cal["length"], ev["max_tokens"])
    model, _ = load_model(str(model_dir))
    records = json.loads(args.json.read_text()) if args.json.exists() else []
    with tempfile.TemporaryDirectory(prefix="order-noise-") as tmp_name:
        tmp = Path(tmp_name)
        orders = {"protocol": calibration, "reversed": calibration.flip(0)}
        for name, tensor in orders.items():
            torch.save(tensor.clone(), tmp / f"{name}.pt")
        for impl in impls:
            saved, row = {}, {"impl": impl, "cell": args.cell, "seed": 0, "git_commit": quality_bench.git_commit(),
                              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            for name in orders:
                out = tmp / f"{impl}-{name}.safetensors"
                command = peer_bench.worker_command(impl, args.cell, model_dir, tmp / f"{name}.pt", out)
                print(f"running {impl} {args.cell}, calibration order {name} (load {os.getloadavg()[0]:.1f}) ...",
                      flush=True)
                peer_bench.run_worker(command, tmp / "worker.log")
                saved[name] = peer_bench.load_weights(out)
                row[f"perplexity_{name}"], _ = peer_bench.evaluate(model, saved[name], windows)
            row["relative_gap"] = row["perplexity_reversed"] / row["perplexity_protocol"] - 1
            row["mask_diff"] = peer_bench.mask_difference(saved["protocol"], saved["reversed"])
            print(f"  {impl}: {row['perplexity_protocol']:.3f} (protocol order) vs {row['perplexity_reversed']:.3f} "
                  f"(reversed): {100 * row['relative_gap']:+.2f}%, masks differ {100 * row['mask_diff']:.2f}%",
                  flush=True)
            records.append(row)
            args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
