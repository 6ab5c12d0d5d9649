"""DeepSparse's part of the engines-side-by-side matrix (matrix.py): one worker process per case.

Per case every DeepSparse entry gets a fresh DeepSparse-compatible copy of its phase graph (deepsparse_compat; the
Engine rewrites the file it is given) and ONNX Runtime's outputs of the same graph on the same inputs as its
reference, both deleted once the case is done (disk: one case's worth). The worker (deepsparse_worker.py,
keep_going) compiles and checks each, then times the survivors interleaved. A native crash kills the worker: the
model it was compiling (its "progress" file) is recorded as failed and the worker is run again without it
(quantized models compile first, so that costs little). A worker past its timeout fails every model left in the case.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .deepsparse_compat import write_deepsparse_copy
from .deepsparse_env import WORKER_TIMEOUT_S, WorkerRun, crash_summary, run_worker
from .workload import Case

log = logging.getLogger(__name__)

FP32_TOL = (5e-3, 1e-3)  # (rtol, atol) as `sdsonnx bench`: max|ds - ort| <= atol + rtol * max|ort|
# Quantized exports: the benchmark's random tokens and N(0,1) cache lie outside the int8-static calibration range, so
# activations saturate and one rounding flip of a quantized activation moves the (output-quantized) logits by several
# steps: SmolLM2 dense int8-static decode, DeepSparse vs ONNX Runtime, logits max|d| 5.88 of max|ref| 15.7 while every
# present.* output agreed to 2e-7 (docs/research/deepsparse_int8.md). A wrong scale, zero point or axis errs by
# O(max|ref|) or more; this bound catches that and lets rounding pass.
QUANT_TOL = (0.5, 1e-3)


RISK = ("int8-dynamic", "int8-static")  # compiled first: a native crash then costs no recompile of the others


def compile_order(weight_format: str) -> int:
    """Position of a weight format in a worker's compile order: formats that may crash DeepSparse first."""
    return RISK.index(weight_format) if weight_format in RISK else len(RISK)


def tolerance(weight_format: str) -> tuple[float, float]:
    """(rtol, atol) of the output check for an export of this weight format (fp32 or a quantization scheme)."""
    return FP32_TOL if weight_format == "fp32" else QUANT_TOL


def build_job(specs: list[dict], inputs: Path, input_names: list[str], case: Case, threads: int, warmup: int,
              reps: int, progress: Path) -> dict:
    """The worker's JOB.json for one case: specs are {"label", "path", "reference", "rtol", "atol"}."""
    if not specs:
        raise ValueError("no DeepSparse model in the job")
    rtol, atol = FP32_TOL
    return {"threads": threads, "warmup": warmup, "reps": reps, "steps": case.steps, "rtol": rtol, "atol": atol,
            "inputs": str(inputs), "input_names": list(input_names), "models": specs, "keep_going": True,
            "progress": str(progress)}


def crashed_model(progress: Path) -> str | None:
    """Label of the model the worker was compiling or checking when it died (its progress file), if any."""
    return progress.read_text().strip() or None if progress.is_file() else None


def run_case_jobs(python: Path, job: dict, workdir: Path, tag: str, timeout_s: float = WORKER_TIMEOUT_S,
                  runner=run_worker) -> tuple[dict, dict[str, str], str | None]:
    """Run the worker on `job` until it exits cleanly; returns (result models, {label: error}, version).

    A native crash while compiling/checking model X records X's error and re-runs without it; a crash during timing
    (no culprit) or a timeout fails every model left. `runner(python, job_path, result_path, timeout_s) -> WorkerRun`."""
    specs, errors = list(job["models"]), {}
    progress = Path(job["progress"])
    while specs:
        progress.unlink(missing_ok=True)
        job_path, result_path = workdir / f"job-{tag}.json", workdir / f"result-{tag}.json"
        result_path.unlink(missing_ok=True)
        job_path.write_text(json.dumps({**job, "models": specs}))
        run: WorkerRun = runner(python, job_path, result_path, timeout_s)
        if run.timed_out:
            errors.update({s["label"]: f"DeepSparse worker killed after {timeout_s:g} s" for s in specs})
            return {}, errors, None
        if not run.crashed and result_path.is_file():
            result = json.loads(result_path.read_text())
            models = {k: v for k, v in result["models"].items() if not v.get("error")}
            errors.update({k: v["error"] for k, v in result["models"].items() if v.get("error")})
            return models, errors, result.get("deepsparse")
        culprit = crashed_model(progress)
        reason = crash_summary(run)
        labels = [s["label"] for s in specs]
        if culprit not in labels:  # died while timing ("(timing)") or before the first compile
            errors.update({label: reason for label in labels})
            return {}, errors, None
        errors[culprit] = reason
        specs = [s for s in specs if s["label"] != culprit]
        log.warning("deepsparse %s: %s; again without it", culprit, reason)
    return {}, errors, None


def time_deepsparse(entries: list, cases: list[Case], graphs: dict, labels: dict, feeds_for, python: Path,
                    threads: int, warmup: int, reps: int, workdir: Path, timeout_s: float = WORKER_TIMEOUT_S,
                    weight_format=None) -> dict:
    """Compile, check and time the DeepSparse `entries` on every case.

    graphs: (label, phase) -> ONNX file; labels: export path -> label; feeds_for(case) -> inputs;
    weight_format(path) -> "fp32" | scheme. Returns {"times": {case: {key: [s]}}, "checks": {case: {key: {...}}},
    "errors": [{"engine", "model", "weight_format", "case", "error"}], "rewrites": {label: [...]}, "version"}."""
    import onnxruntime as ort

    out = {"times": {}, "checks": {}, "errors": [], "rewrites": {}, "version": None}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    for case in cases:
        feeds = feeds_for(case)
        inputs = workdir / f"ds-in-{case.key}.npz"
        np.savez(inputs, **feeds)
        specs = []
        for path in dict.fromkeys(e.path for e in entries):
            ref = workdir / f"ds-ref-{case.key}-{labels[path]}.npz"
            sess = ort.InferenceSession(str(graphs[(labels[path], case.phase)]), opts,
                                        providers=["CPUExecutionProvider"])
            np.savez(ref, **{f"out{i}": o for i, o in enumerate(sess.run(None, feeds))})
            del sess
            for e in (e for e in entries if e.path == path):  # a copy per case: only as much disk as one case needs
                copy = workdir / f"ds-{case.key}-{len(specs)}.onnx"
                changes = write_deepsparse_copy(graphs[(labels[path], case.phase)], copy)
                out["rewrites"][labels[path]] = sorted(set(out["rewrites"].get(labels[path], [])) | set(changes))
                fmt = weight_format(path) if weight_format else "fp32"
                rtol, atol = tolerance(fmt)
                specs.append({"label": e.key, "path": str(copy), "reference": str(ref), "rtol": rtol, "atol": atol,
                              "format": fmt})
        specs.sort(key=lambda spec: compile_order(spec["format"]))
        job = build_job(specs, inputs, list(feeds), case, threads, warmup, reps, workdir / f"progress-{case.key}")
        log.info("deepsparse %s: compiling, checking and timing %d entries", case.key, len(specs))
        models, errors, version = run_case_jobs(python, job, workdir, case.key, timeout_s)
        for spec in specs:
            Path(spec["path"]).unlink(missing_ok=True)
            Path(spec["reference"]).unlink(missing_ok=True)
        inputs.unlink(missing_ok=True)
        out["version"] = out["version"] or version
        out["times"][case.key] = {k: v["times_s"] for k, v in models.items()}
        out["checks"][case.key] = {k: {f: v.get(f) for f in ("compile_s", "max_abs_err", "max_ref", "top1",
                                                             "supported_ops")} for k, v in models.items()}
        by_key = {e.key: e for e in entries}
        out["errors"] += [{"engine": "deepsparse", "model": by_key[k].model,
                           "weight_format": weight_format(by_key[k].path) if weight_format else None,
                           "case": case.key, "entry": k, "error": why} for k, why in errors.items()]
    return out
