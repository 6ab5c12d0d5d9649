"""`sdsonnx bench`: prefill latency/throughput and decode tokens/s of a sparse export against its dense twin.

Per engine and per case (prefill at each sequence length, decode through the KV cache when the export has
past), every model runs on the same inputs, interleaved round by round after warm-up; the speed-up is
dense/sparse. DeepSparse runs in its own venv (see deepsparse_env); its outputs are checked against ONNX
Runtime's on the same inputs before it is timed, and a model whose outputs differ is not timed.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import onnx

from .deepsparse_compat import save_model, write_deepsparse_copy
from ..artifact.checkpoint import config_differences
from .deepsparse_env import WORKER_TIMEOUT_S, DeepSparseUnavailable, crash_summary, find_deepsparse_python, run_worker
from .graphs import strip_past
from .timing import interleaved_times, paired_speedup, summarize
from .workload import BenchError, Case, ModelInfo, load_model_info, make_feeds, work_share

log = logging.getLogger(__name__)

ENGINES = ("onnxruntime", "deepsparse")
RTOL, ATOL = 5e-3, 1e-3  # DeepSparse vs ONNX Runtime, per output: max|ds - ort| <= ATOL + RTOL * max|ort|


def bench_cases(info: ModelInfo, batch: int, seqs: tuple[int, ...], decode: int) -> list[Case]:
    """Prefill of each length (empty cache); then `decode` one-token steps on a cache of min(seqs) tokens."""
    if batch < 1 or not seqs or min(seqs) < 1 or decode < 0:
        raise BenchError(f"need batch >= 1, sequence lengths >= 1 and decode >= 0; got {batch}, {seqs}, {decode}")
    cases = [Case("prefill", batch, s, 0, 1) for s in seqs]
    if decode and info.with_past:
        cases.append(Case("decode", batch, 1, min(seqs), decode))
    elif decode:
        log.warning("%s has no KV cache inputs (exported without past): decode not measured", info.path)
    return cases


def machine_info(threads: int) -> dict:
    """CPU model, logical cores, AVX2/AVX-512 flags and the thread count used."""
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "logical_cores": os.cpu_count(), "avx2": "avx2" in flags,
            "avx512f": "avx512f" in flags, "avx512_vnni": "avx512_vnni" in flags, "threads": threads,
            "python": platform.python_version()}


def _run_onnxruntime(models: dict[str, ModelInfo], graphs: dict, cases: list[Case], threads: int, warmup: int,
                     reps: int, workdir: Path, seed: int, timed: bool = True) -> tuple[list[dict], dict]:
    """Time every case in ONNX Runtime (unless not `timed`); save each model's outputs per case (DeepSparse's references)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sessions: dict = {}
    timings, refs = [], {}
    for case in cases:
        if any(phase != case.phase for _, phase in sessions):
            sessions.clear()  # one phase's sessions in memory at a time
        for label in models:
            if (label, case.phase) not in sessions:
                sessions[(label, case.phase)] = ort.InferenceSession(str(graphs[(label, case.phase)]), opts,
                                                                     providers=["CPUExecutionProvider"])
        feeds = make_feeds(next(iter(models.values())), case, seed)
        current = {label: sessions[(label, case.phase)] for label in models}
        for label, sess in current.items():
            outputs = sess.run(None, feeds)
            refs[(case.key, label)] = workdir / f"ref-{case.key}-{label}.npz"
            np.savez(refs[(case.key, label)], **{f"out{i}": o for i, o in enumerate(outputs)})
        if not timed:
            continue
        runs = {label: (lambda s=sess: s.run(None, feeds)) for label, sess in current.items()}
        log.info("onnxruntime %s: timing %s", case.key, ", ".join(runs))
        timings.append({"case": case, "times": interleaved_times(runs, case.steps, warmup, reps), "check": {}})
    return timings, refs


def _run_deepsparse(python: Path, models: dict[str, ModelInfo], graphs: dict, cases: list[Case], refs: dict,
                    threads: int, warmup: int, reps: int, workdir: Path, seed: int,
                    worker_timeout: float = WORKER_TIMEOUT_S, only_engine: bool = False,
                    ) -> tuple[list[dict], list[dict], dict]:
    """Time every case in the DeepSparse worker; returns (timings, errors, rewrites applied per model).

    A worker that hangs past worker_timeout is killed and is a BenchError; one that crashes is recorded in the
    errors (ONNX Runtime's timings stay useful), or a BenchError when DeepSparse is the only engine asked for."""
    compat, rewrites = {}, {}
    for (label, phase), path in graphs.items():
        if phase in {c.phase for c in cases}:
            compat[(label, phase)] = workdir / f"deepsparse-{label}-{phase}.onnx"
            changes = write_deepsparse_copy(path, compat[(label, phase)])
            rewrites[label] = sorted(set(rewrites.get(label, [])) | set(changes))
    timings, errors = [], []
    for case in cases:
        feeds = make_feeds(next(iter(models.values())), case, seed)
        np.savez(workdir / f"in-{case.key}.npz", **feeds)
        specs = []
        for label in models:  # a fresh copy per case: DeepSparse's Engine rewrites the file it is given
            copy = workdir / f"ds-{case.key}-{label}.onnx"
            shutil.copyfile(compat[(label, case.phase)], copy)
            specs.append({"label": label, "path": str(copy), "reference": str(refs[(case.key, label)])})
        job = {"threads": threads, "warmup": warmup, "reps": reps, "steps": case.steps, "rtol": RTOL, "atol": ATOL,
               "inputs": str(workdir / f"in-{case.key}.npz"), "input_names": list(feeds), "models": specs}
        job_path, result_path = workdir / f"job-{case.key}.json", workdir / f"result-{case.key}.json"
        job_path.write_text(json.dumps(job))
        log.info("deepsparse %s: compiling and timing %s", case.key, ", ".join(models))
        run = run_worker(python, job_path, result_path, worker_timeout)
        for spec in specs:
            Path(spec["path"]).unlink(missing_ok=True)
        if run.timed_out:
            raise BenchError(f"DeepSparse worker ({python}) on case {case.key} did not finish within {worker_timeout:g} s "
                             "and was killed; raise --deepsparse-timeout or bench with --engine onnxruntime")
        if only_engine and (run.crashed or not result_path.is_file()):
            raise BenchError(f"{crash_summary(run)} on case {case.key} ({python}); bench with --engine onnxruntime")
        if run.crashed or not result_path.is_file():
            errors.append({"engine": "deepsparse", "case": case.key, "error": crash_summary(run)})
            continue
        result = json.loads(result_path.read_text())
        bad = {k: v for k, v in result["models"].items() if not v["check_ok"]}
        if bad:
            errors.append({"engine": "deepsparse", "case": case.key, "error": "outputs differ from ONNX Runtime: " +
                           ", ".join(f"{k} max abs err {v['max_abs_err']:.3g} (max |ref| {v['max_ref']:.3g})"
                                     for k, v in bad.items())})
            continue
        timings.append({"case": case, "times": {k: v["times_s"] for k, v in result["models"].items()},
                        "check": result["models"], "version": result.get("deepsparse")})
    return timings, errors, rewrites


def _phase_graphs(models: dict[str, ModelInfo], workdir: Path) -> dict:
    """(label, phase) -> ONNX file: decode runs the export itself, prefill its graph without past (graphs.strip_past)."""
    graphs = {}
    for label, info in models.items():
        graphs[(label, "decode")] = graphs[(label, "prefill")] = info.path
        if info.with_past:
            graphs[(label, "prefill")] = workdir / f"{label}-prefill.onnx"
            save_model(strip_past(onnx.load(info.path)), graphs[(label, "prefill")])
    return graphs


def _records(engine: str, models: dict[str, ModelInfo], timings: list[dict]) -> list[dict]:
    """Flat rows: one per (engine, model, case), the sparse row with its speed-up and the limits."""
    rows = []
    for entry in timings:
        case, times = entry["case"], entry["times"]
        for label, info in models.items():
            stats = summarize(times[label])
            check = entry["check"].get(label, {})
            row = {"engine": engine, "role": label, "model": info.label, "path": str(info.path),
                   "sparsity": info.sparsity, "pattern": info.pattern, "phase": case.phase, "batch": case.batch,
                   "seq": case.seq, "past": case.past, "steps": case.steps, "tokens": case.tokens, **stats,
                   "latency_ms": 1000 * stats["median_s"] / case.steps,
                   "tokens_per_s": case.tokens / stats["median_s"],
                   "compile_s": check.get("compile_s"), "max_abs_err_vs_ort": check.get("max_abs_err"),
                   "supported_ops": check.get("supported_ops")}
            if label != "dense" and "dense" in times:
                row.update(paired_speedup(times["dense"], times[label]))
                row.update(work_share(info, case))
            rows.append(row)
    return rows


def run_bench(sparse: str | Path, dense: str | Path | None = None, engines: tuple[str, ...] = ENGINES,
              batch: int = 1, seqs: tuple[int, ...] = (128, 512), decode: int = 32, threads: int | None = None,
              warmup: int = 2, reps: int = 10, seed: int = 0, deepsparse_python: Path | None = None,
              worker_timeout: float = WORKER_TIMEOUT_S) -> dict:
    """Benchmark `sparse` (and `dense`, its dense twin) in each engine; returns the bench.json document.

    A missing DeepSparse venv is logged and recorded under "skipped" (ONNX Runtime still runs) unless it is the
    only engine asked for, which raises DeepSparseUnavailable.
    """
    paths = {"sparse": sparse} if dense is None else {"dense": dense, "sparse": sparse}
    return bench_models(paths, engines, batch, seqs, decode, threads, warmup, reps, seed, deepsparse_python,
                        worker_timeout)


def bench_models(paths: dict[str, str | Path], engines: tuple[str, ...] = ENGINES, batch: int = 1,
                 seqs: tuple[int, ...] = (128, 512), decode: int = 32, threads: int | None = None, warmup: int = 2,
                 reps: int = 10, seed: int = 0, deepsparse_python: Path | None = None,
                 worker_timeout: float = WORKER_TIMEOUT_S) -> dict:
    """Benchmark several exports of one model (label -> export), all interleaved; "dense" is the speed-up base."""
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise BenchError(f"unknown engine(s) {unknown or '(none)'}: choose from {', '.join(ENGINES)}")
    if reps < 1 or warmup < 0:
        raise BenchError(f"need reps >= 1 and warmup >= 0, got {reps} and {warmup}")
    if not paths:
        raise BenchError("no model to benchmark")
    threads = threads or len(os.sched_getaffinity(0))
    models = {label: load_model_info(path, None if label in ("dense", "sparse") else label)
              for label, path in paths.items()}
    first = next(iter(models.values()))
    for other in models.values():
        if [(i.name, i.dims) for i in first.inputs] != [(i.name, i.dims) for i in other.inputs] \
                or first.outputs != other.outputs:
            raise BenchError(f"{first.path} and {other.path} have different inputs/outputs: not the same exported model")
        differences = config_differences(first.config, other.config)
        if first.vocab_size != other.vocab_size and not any(d.startswith("vocab_size") for d in differences):
            differences.insert(0, f"vocabulary {first.vocab_size} vs {other.vocab_size}")
        if differences:
            raise BenchError(f"{first.path} and {other.path} are exports of different models ({'; '.join(differences)}): "
                             "give a dense and a sparse export of the same model")
    cases = bench_cases(first, batch, tuple(seqs), decode)
    doc = {"format": "sdsonnx-bench/1", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_info(threads), "warmup": warmup, "reps": reps, "seed": seed,
           "models": {label: {"path": str(m.path), "label": m.label, "sparsity": m.sparsity, "pattern": m.pattern,
                              "with_past": m.with_past} for label, m in models.items()},
           "cases": [c.key for c in cases], "engines": {}, "records": [], "errors": [], "skipped": {}}
    ds_python = None
    if "deepsparse" in engines:
        try:
            ds_python = deepsparse_python or find_deepsparse_python()
        except DeepSparseUnavailable as exc:
            if engines == ("deepsparse",):
                raise
            log.warning("%s; timing ONNX Runtime only", exc)
            doc["skipped"]["deepsparse"] = str(exc)
    with tempfile.TemporaryDirectory(prefix="sdsonnx-bench-") as tmp:
        workdir = Path(tmp)
        graphs = _phase_graphs(models, workdir)
        timings, refs = _run_onnxruntime(models, graphs, cases, threads, warmup, reps, workdir, seed,
                                         timed="onnxruntime" in engines)
        if "onnxruntime" in engines:
            import onnxruntime

            doc["engines"]["onnxruntime"] = {"version": onnxruntime.__version__}
            doc["records"] += _records("onnxruntime", models, timings)
        if ds_python is not None:
            ds_timings, errors, rewrites = _run_deepsparse(ds_python, models, graphs, cases, refs, threads, warmup, reps,
                                                           workdir, seed, worker_timeout, engines == ("deepsparse",))
            doc["engines"]["deepsparse"] = {"python": str(ds_python), "rewrites": rewrites,
                                            "version": next((t.get("version") for t in ds_timings), None)}
            doc["records"] += _records("deepsparse", models, ds_timings)
            doc["errors"] += errors
    return doc
