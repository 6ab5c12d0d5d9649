"""DeepSparse side of `sdsonnx bench`: run by the python of the DeepSparse venv, never imported by sdsonnx.

Usage: python deepsparse_worker.py JOB.json RESULT.json

It imports only the standard library, numpy and deepsparse (DeepSparse 1.8.0 needs numpy<2 and onnx<1.15, so it
cannot share the core environment, and its native assertions kill the process: the parent survives and reports).
JOB.json:
  {"threads": T, "warmup": W, "reps": R, "steps": K, "rtol": x, "atol": y,
   "inputs": "inputs.npz", "input_names": [...],            # arrays in the model's input order
   "models": [{"label": "dense", "path": "copy.onnx", "reference": "ref.npz"}, ...],
   "keep_going": false, "progress": "progress.txt"}          # both optional, see below
A model spec may carry its own "rtol"/"atol" (quantized models: their kernels round differently from ONNX Runtime's).
Every model is compiled, its outputs are checked against the reference (ONNX Runtime on the same inputs), then
all models are timed interleaved: W + R rounds, each round runs every model K times back to back, alternating the
order of the models each round. RESULT.json: {"models": {label: {"compile_s", "max_abs_err", "max_ref",
"check_ok", "supported_ops", "times_s": [R per-round seconds]}}, "deepsparse": version}. Exit code 3: a check failed
(see _check). With "keep_going", a model that raises or fails its check gets an "error" and no times, the others are
still timed (exit 0). Before each compile the model's label is written to the "progress" file (if given), so that a
parent can tell which model a native crash (which kills the process) came from ("(timing)" once all are compiled). "top1" in the result: the share of
positions where the argmax of the first output (logits [B, S, V]) equals the reference's.
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import numpy as np  # noqa: E402


def _check(outputs, reference, rtol: float, atol: float) -> tuple[float, float, bool]:
    """(max |out - ref|, max |ref|, ok) per output: ok when max |out - ref| <= atol + rtol * max |ref|.

    Relative to the output's largest magnitude, not elementwise: DeepSparse's kernels sum in another order,
    and over 30 blocks fp32 logits of magnitude ~40 move by ~1e-3 relative; a wrong graph moves them by O(1).
    """
    errs, refs, ok = [0.0], [0.0], True
    for i, out in enumerate(outputs):
        ref = reference[f"out{i}"]
        if out.shape != ref.shape:
            return float("inf"), 0.0, False
        diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
        errs.append(float(diff.max()) if diff.size else 0.0)
        refs.append(float(np.abs(ref).max()) if ref.size else 0.0)
        ok = ok and errs[-1] <= atol + rtol * refs[-1]
    return max(errs), max(refs), ok


def _top1(logits, reference) -> float | None:
    """Share of positions whose argmax over the last axis equals the reference's (None unless shapes match, ndim 3)."""
    ref = reference["out0"]
    if logits.ndim != 3 or logits.shape != ref.shape:
        return None
    return float(np.mean(np.argmax(logits, -1) == np.argmax(ref, -1)))


def main(job_path: str, result_path: str) -> int:
    from deepsparse import Engine, __version__

    job = json.loads(open(job_path).read())
    data = np.load(job["inputs"])
    inputs = [np.ascontiguousarray(data[name]) for name in job["input_names"]]
    shapes = [list(x.shape) for x in inputs]
    batch = shapes[0][0] if shapes and shapes[0] else 1
    result = {"deepsparse": __version__, "models": {}}
    engines = {}
    failed = False
    keep_going = bool(job.get("keep_going"))
    for spec in job["models"]:
        if job.get("progress"):
            with open(job["progress"], "w") as f:
                f.write(spec["label"])
        try:
            t0 = time.perf_counter()
            engine = Engine(spec["path"], batch_size=batch, num_cores=job["threads"], input_shapes=shapes)
            compile_s = time.perf_counter() - t0
            outputs = engine.run(inputs, val_inp=False)
        except Exception as exc:  # noqa: BLE001 - reported per model; native crashes never get here
            if not keep_going:
                raise
            result["models"][spec["label"]] = {"check_ok": False, "times_s": [],
                                               "error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        reference = np.load(spec["reference"])
        err, ref, ok = _check(outputs, reference, spec.get("rtol", job["rtol"]), spec.get("atol", job["atol"]))
        result["models"][spec["label"]] = {"compile_s": compile_s, "max_abs_err": err, "max_ref": ref,
                                           "check_ok": ok, "times_s": [], "top1": _top1(outputs[0], reference),
                                           "supported_ops": getattr(engine, "fraction_of_supported_ops", None)}
        print(f"compiled {spec['label']} in {compile_s:.1f}s, max abs err {err:.3g}", file=sys.stderr, flush=True)
        if not ok and keep_going:
            got = result["models"][spec["label"]]
            got["error"] = (f"outputs differ from ONNX Runtime: max abs err {err:.3g} (max |ref| {ref:.3g}), top-1 "
                            f"agreement {got['top1']}, supported_ops {got['supported_ops']}")
            continue
        failed = failed or not ok
        engines[spec["label"]] = engine
    if job.get("progress"):
        with open(job["progress"], "w") as f:
            f.write("(timing)")
    if not failed:
        labels = list(engines)
        for round_ in range(job["warmup"] + job["reps"]):
            for label in (labels if round_ % 2 == 0 else labels[::-1]):
                engine = engines[label]
                t0 = time.perf_counter()
                for _ in range(job["steps"]):
                    engine.run(inputs, val_inp=False)
                elapsed = time.perf_counter() - t0
                if round_ >= job["warmup"]:
                    result["models"][label]["times_s"].append(elapsed)
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)
    return 3 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
