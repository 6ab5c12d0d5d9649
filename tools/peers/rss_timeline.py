"""Where a peer worker's prune holds its peak memory (issue 18): VmRSS / RssAnon / RssFile sampled every 10 ms in a
thread, each sample tagged with the running pipeline function and block. Run it alone: next to another 2-thread job
both slow down ~8x.

  .venv/bin/python tools/peers/rss_timeline.py sdsonnx wanda 2:4 CALIBRATION.pt /tmp/timeline.json [--trim capture]

IMPL: sdsonnx | reference (tools/peers/reference_ports.py). CALIBRATION.pt: a [segments, length] token tensor as
tools/peer_bench.py saves it. Prints the process's VmHWM and the peak per phase; writes every sample
(seconds, rss, anon, file MiB, phase, block) to the JSON file. --trim (sdsonnx only) calls glibc's malloc_trim(0)
after the capture (`capture`) or at every block (`block`): where that lowers the peak, freed heap memory is held.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import worker  # noqa: E402

SDSONNX_PHASES = ("capture_block_inputs", "collect_stats_and_output", "run_block", "_run_stages",
                  "check_finite_activations", "_keep_storage", "stage_with_fallbacks")


def memory() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "RssAnon:", "RssFile:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) // 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("impl", choices=["sdsonnx", "reference"])
    parser.add_argument("method", choices=["sparsegpt", "wanda"])
    parser.add_argument("pattern")
    parser.add_argument("calibration", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--trim", choices=["none", "capture", "block"], default="none")
    args = parser.parse_args()
    torch.set_num_threads(worker.THREADS)
    state = {"phase": "start", "block": -1, "stop": False}
    samples: list[tuple] = []
    start = time.perf_counter()

    def poll() -> None:
        while not state["stop"]:
            m = memory()
            samples.append((round(time.perf_counter() - start, 3), m["VmRSS"], m["RssAnon"], m["RssFile"],
                            state["phase"], state["block"]))
            time.sleep(0.01)

    def tag(module, name: str) -> None:
        inner = getattr(module, name)

        @functools.wraps(inner)
        def tagged(*a, **k):
            outer, state["phase"] = state["phase"], name
            try:
                return inner(*a, **k)
            finally:
                state["phase"] = outer
        setattr(module, name, tagged)

    threading.Thread(target=poll, daemon=True).start()
    if args.impl == "sdsonnx":
        import sdsonnx.pipeline as pipeline

        for name in SDSONNX_PHASES:
            tag(pipeline, name)
        process_block, libc = pipeline._process_block, ctypes.CDLL("libc.so.6")

        def block_start(recipe, index, *a, **k):
            state["block"] = index
            if args.trim == "block" or (args.trim == "capture" and index == 0):
                libc.malloc_trim(0)
            return process_block(recipe, index, *a, **k)
        pipeline._process_block = block_start
    else:
        import reference_ports

        for name in ("capture_layer0_inputs", "ref_wanda_mask", "ref_fasterprune"):
            tag(reference_ports, name)
    state["phase"] = "load"
    from sdsonnx.models import builtin_smollm2_dir

    model = worker.load(str(builtin_smollm2_dir()))
    if args.impl == "reference":
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(lambda m, a, i=i: state.__setitem__("block", i))
    calibration = torch.load(args.calibration)
    state["phase"] = "prune"
    with torch.no_grad():
        worker.PRUNE[args.impl](model, calibration, args.method, args.pattern)
    state["phase"] = "end"
    time.sleep(0.05)
    state["stop"] = True
    args.out.write_text(json.dumps(samples))
    print(f"VmHWM {memory()['VmHWM']} MiB")
    peaks: dict[str, tuple] = {}
    for sample in samples:
        if sample[1] > peaks.get(sample[4], (0, 0))[1]:
            peaks[sample[4]] = sample
    for phase, (t, rss, anon, file, _, block) in sorted(peaks.items(), key=lambda kv: -kv[1][1]):
        print(f"{phase:28s} rss {rss} anon {anon} file {file} MiB  block {block}  t {t} s")


if __name__ == "__main__":
    main()
