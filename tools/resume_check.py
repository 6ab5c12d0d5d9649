"""Kill and resume on the real model (issue 13): a quality-protocol case run by `sdsonnx run`, SIGKILLed twice
(once between a block's resume-state tensors and its commit, through the SDSONNX_KILL_AT fault point, once by a
signal from outside after `--kill-after` seconds of the first resumed process), resumed with `--resume` until it
finishes; its final and per-step perplexities must equal the uninterrupted run recorded in
docs/benchmarks/quality.json for the same case bit for bit.

  .venv/bin/python tools/resume_check.py sds-sparsegpt:2:4 --kill-at state-9 --kill-after 240
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_bench import case_recipe, load_records  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict | None = None, kill_after: float | None = None) -> tuple[int, float]:
    """(return code, seconds) of cmd; SIGKILLed after kill_after seconds when it has not finished by then."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return proc.returncode, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", help="a tools/quality_bench.py case with a recorded row, e.g. sds-sparsegpt:2:4")
    parser.add_argument("--kill-at", default="state-9", help="SDSONNX_KILL_AT point of the first process")
    parser.add_argument("--kill-after", type=float, default=240.0, help="seconds before the second kill")
    args = parser.parse_args(argv)
    recorded = next(r for r in load_records() if r["case"] == args.case)
    sdsonnx = str(Path(sys.executable).parent / "sdsonnx")
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(case_recipe(args.case)))
        out = Path(tmp) / "out"
        cmd = [sdsonnx, "run", str(recipe), "--output", str(out), "--no-progress"]
        log = []
        rc, seconds = run(cmd, env={"SDSONNX_KILL_AT": args.kill_at})
        log.append({"process": 1, "returncode": rc, "seconds": round(seconds, 1), "kill": args.kill_at})
        rc, seconds = run([*cmd, "--resume"], kill_after=args.kill_after)
        log.append({"process": 2, "returncode": rc, "seconds": round(seconds, 1), "kill": f"after {args.kill_after} s"})
        while rc != 0:
            rc, seconds = run([*cmd, "--resume"])
            log.append({"process": len(log) + 1, "returncode": rc, "seconds": round(seconds, 1)})
        report = json.loads((out / "report.json").read_text())
    got, steps = report["perplexity"]["pruned"], report["perplexity"]
    want = recorded["perplexity"]
    same_steps = all(steps.get(k) == v for k, v in (recorded.get("perplexity_steps") or {}).items())
    result = {"case": args.case, "processes": log, "perplexity": got, "recorded": want,
              "recorded_commit": recorded.get("git_commit"), "bitwise_equal": got == want and same_steps,
              "steps_compared": sorted((recorded.get("perplexity_steps") or {}))}
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["bitwise_equal"] else 1)


if __name__ == "__main__":
    main()
