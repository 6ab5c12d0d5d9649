"""Engines side by side (issue 15, items 3-5): exports x in-process engines timed in one interleaved loop.

Every entry (engine, export) of a phase is loaded together; each case's inputs are fed to all of them, round
by round, the order reversed every round (timing.interleaved_times), so that ratios between engines and formats
compare like with like on a loaded machine. Each record carries speedup_vs_dense_fp32: the ONNX Runtime dense fp32
median of the same case divided by the record's, with the quartiles of the per-round ratios, and the bound next
to it (bounds.py): decode, the weight bytes read per token (dense fp32 / this format as the engine stores it);
prefill, the multiply-adds left (1.0: neither engine skips zeros) and, if the zeros were skipped, 1/(1 - f*s).

OpenVINO reads the same ONNX files (QDQ and ORT's com.microsoft MatMulNBits included); its CPU plugin runs
float weights in bf16 on CPUs with avx512_bf16 unless INFERENCE_PRECISION_HINT says f32, so the hint is always
set and recorded.

DeepSparse 1.8.0 (end of life, kept as a measured reference) is optional: entries with engine "deepsparse" are
timed in its own venv by deepsparse_worker.py (`run_matrix(..., deepsparse_python=find_deepsparse_python())`; from
the command line `tools/speed_bench.py --deepsparse`). Per case, all DeepSparse entries are compiled in one worker
process on copies of the phase graphs made DeepSparse-compatible (deepsparse_compat: rotary MatMul k=1 -> Mul, IR
<= 9; prefill on graphs.strip_past's graph), each checked against ONNX Runtime's outputs of the same export on the
same inputs, then timed interleaved among themselves. Their speedup_vs_dense_fp32 divides by the in-process ONNX
Runtime dense fp32 median of the same case, timed in another process and not interleaved with them
("speedup_base": "other process"); the ratio that is interleaved is deepsparse_speedup_vs_dense_same_format (the
DeepSparse dense entry of the same weight format / this entry, per-round quartiles). An entry DeepSparse rejects,
crashes on or mis-computes is left out of the records and listed in the document's "errors" with the reason.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .bounds import decode_bytes
from .core import _phase_graphs, machine_info
from .deepsparse_env import WORKER_TIMEOUT_S
from .deepsparse_matrix import time_deepsparse
from .timing import interleaved_times, paired_speedup, summarize
from .workload import BenchError, Case, ModelInfo, load_model_info, make_feeds, work_share

log = logging.getLogger(__name__)

ENGINES = ("onnxruntime", "openvino", "deepsparse")
IN_PROCESS = ("onnxruntime", "openvino")
BASE_FORMAT = "fp32"


@dataclass(frozen=True)
class Entry:
    """One timed thing: an engine running an export."""

    engine: str  # onnxruntime | openvino | deepsparse
    model: str  # what was pruned, e.g. "dense", "sds-sparsegpt 2:4"
    path: Path  # export folder
    family: Path  # the fp32 export with the same zeros: its sparsity and work share are this entry's
    precision_hint: str | None = None  # openvino INFERENCE_PRECISION_HINT: "f32" | "bf16"

    @property
    def key(self) -> str:
        return f"{self.engine}:{self.model}:{weight_format(self.path)}" + \
            (f":{self.precision_hint}" if self.precision_hint else "")


def weight_format(folder: Path) -> str:
    """fp32, or the quantization scheme the export's manifest records (int8-nbits, int8-dynamic, ...)."""
    manifest = json.loads((Path(folder) / "sdsonnx.json").read_text())
    return (manifest.get("quantization") or {}).get("scheme", BASE_FORMAT)


def _runner(entry: Entry, graph: Path, threads: int, core=None):
    """A callable feeds -> logits for `entry` on the phase graph `graph`."""
    if entry.engine == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        return lambda feeds: sess.run(["logits"], feeds)[0]
    if entry.engine == "openvino":
        if entry.precision_hint not in ("f32", "bf16"):
            raise BenchError(f"{entry.key}: openvino needs precision_hint 'f32' or 'bf16', got {entry.precision_hint!r}")
        compiled = core.compile_model(str(graph), "CPU", {
            "INFERENCE_NUM_THREADS": str(threads), "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": entry.precision_hint})
        request = compiled.create_infer_request()

        def run(feeds):
            request.infer(feeds)
            return request.get_tensor("logits").data
        return run
    raise BenchError(f"unknown engine {entry.engine!r}: choose from {', '.join(ENGINES)}")


def _check_entries(entries: list[Entry]) -> Entry:
    """BenchError on duplicates or a missing base; returns the base (ONNX Runtime, dense, fp32)."""
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        raise BenchError(f"duplicate entries: {sorted(k for k in keys if keys.count(k) > 1)}")
    unknown = sorted({e.engine for e in entries} - set(ENGINES))
    if unknown:
        raise BenchError(f"unknown engine(s) {unknown}: choose from {', '.join(ENGINES)}")
    base = [e for e in entries if e.engine == "onnxruntime" and weight_format(e.path) == BASE_FORMAT
            and e.path == e.family and e.model == "dense"]
    if len(base) != 1:
        raise BenchError("need exactly one ONNX Runtime dense fp32 entry (model 'dense', its own family): "
                         "speedup_vs_dense_fp32 is measured against it")
    return base[0]


def time_entries(entries: list[Entry], cases: list[Case], threads: int, warmup: int, reps: int, seed: int,
                 workdir: Path, deepsparse_python: Path | None = None,
                 worker_timeout: float = WORKER_TIMEOUT_S) -> tuple[dict, dict, dict | None]:
    """({case.key: {entry.key: seconds per round}}, {case.key: {entry.key: max |logits - ORT logits|}}, DeepSparse's
    part: time_deepsparse's document, None without DeepSparse entries). In-process engines first, then DeepSparse."""
    labels = {p: f"m{i}" for i, p in enumerate(dict.fromkeys(e.path for e in entries))}
    infos = {p: load_model_info(p, p.name) for p in labels}
    graphs = _phase_graphs({labels[p]: infos[p] for p in labels}, workdir)
    first = infos[entries[0].path]
    ds_entries = [e for e in entries if e.engine == "deepsparse"]
    entries = [e for e in entries if e.engine in IN_PROCESS]
    core = None
    if any(e.engine == "openvino" for e in entries):
        import openvino as ov

        core = ov.Core()
    times, diffs = {}, {}
    for phase in dict.fromkeys(c.phase for c in cases):
        runners = {}
        for e in entries:
            log.info("%s: loading %s", phase, e.key)
            runners[e.key] = _runner(e, graphs[(labels[e.path], phase)], threads, core)
        for case in (c for c in cases if c.phase == phase):
            feeds = make_feeds(first, case, seed)
            outs = {e.key: np.array(runners[e.key](feeds), dtype=np.float32) for e in entries}  # one untimed run
            reference = {e.path: outs[e.key] for e in entries if e.engine == "onnxruntime"}
            diffs[case.key] = {e.key: float(np.abs(outs[e.key] - reference[e.path]).max())
                               for e in entries if e.engine != "onnxruntime" and e.path in reference}
            diffs[case.key]["loadavg_1m"] = round(os.getloadavg()[0], 2)
            log.info("timing %s: %d entries x %d rounds (load %.2f)", case.key, len(entries), warmup + reps,
                     os.getloadavg()[0])
            times[case.key] = interleaved_times({k: (lambda r=r: r(feeds)) for k, r in runners.items()},
                                                case.steps, warmup, reps)
        runners.clear()
        gc.collect()
    if not ds_entries:
        return times, diffs, None
    if deepsparse_python is None:
        raise BenchError("DeepSparse entries need deepsparse_python (deepsparse_env.find_deepsparse_python())")
    ds = time_deepsparse(ds_entries, cases, graphs, labels, lambda case: make_feeds(first, case, seed),
                         deepsparse_python, threads, warmup, reps, workdir, worker_timeout, weight_format)
    for key, ds_times in ds["times"].items():
        times.setdefault(key, {}).update(ds_times)
    return times, diffs, ds


def _bounds(entry: Entry, case: Case, family: ModelInfo, base_bytes: float) -> dict:
    """The decode byte bound or the prefill multiply-add bound of this entry, and the sparsity limits."""
    share = work_share(family, case) if family.sparsity > 0 else {}
    if case.phase == "decode":
        stored = decode_bytes(entry.path, 2 if entry.precision_hint == "bf16" else None)
        return {"bound": "weight bytes per token", "weight_bytes_per_token": stored["bytes"] / case.batch,
                "dense_fp32_weight_bytes_per_token": base_bytes / case.batch,
                "bound_vs_dense_fp32": base_bytes / stored["bytes"],
                "bound_if_zeros_compressed": base_bytes / stored["compressed"] if family.sparsity > 0 else None,
                **share}
    return {"bound": "multiply-adds left", "bound_vs_dense_fp32": 1.0,
            "bound_if_zeros_skipped": share.get("limit_amdahl", 1.0), **share}


def records(entries: list[Entry], cases: list[Case], times: dict, diffs: dict, ds_checks: dict | None = None
            ) -> list[dict]:
    """One flat record per (entry, case) timed, with speedup_vs_dense_fp32 and its bound.

    DeepSparse entries (timed in their worker, apart from the base): speedup_vs_dense_fp32 = ORT base median / this
    median, its quartiles those of base median / this entry's rounds, speedup_base_interleaved False, and
    deepsparse_speedup_vs_dense_same_format (paired, interleaved in the worker) when the DeepSparse dense entry of the
    same weight format was timed. ds_checks: {case: {entry: {compile_s, max_abs_err, top1, supported_ops, ...}}}."""
    base = _check_entries(entries)
    families = {p: load_model_info(p, p.name) for p in {e.family for e in entries}}
    base_bytes = decode_bytes(base.path)["bytes"]
    rows = []
    for case in cases:
        if case.key not in times:
            continue
        base_times = times[case.key][base.key]
        for e in entries:
            t = times[case.key].get(e.key)
            if t is None:  # failed (DeepSparse): in the document's errors
                continue
            stats = summarize(t)
            family = families[e.family]
            extra = {"speedup_base_interleaved": e.engine != "deepsparse"}
            if e.engine == "deepsparse":
                ratio = apart_speedup(base_times, t)
                extra.update(_deepsparse_fields(e, entries, times[case.key], (ds_checks or {}).get(case.key, {})))
            else:
                ratio = paired_speedup(base_times, t)
            rows.append({"engine": e.engine, "model": e.model, "weight_format": weight_format(e.path),
                         "precision_hint": e.precision_hint, "sparsity": family.sparsity, "pattern": family.pattern,
                         "phase": case.phase, "batch": case.batch, "seq": case.seq, "past": case.past,
                         "steps": case.steps, "tokens": case.tokens, **stats,
                         "latency_ms": 1000 * stats["median_s"] / case.steps,
                         "tokens_per_s": case.tokens / stats["median_s"],
                         "speedup_vs_dense_fp32": ratio["speedup"], "speedup_p25": ratio["speedup_p25"],
                         "speedup_p75": ratio["speedup_p75"],
                         "max_abs_logit_diff_vs_ort": diffs.get(case.key, {}).get(e.key),
                         "loadavg_1m_at_case_start": diffs.get(case.key, {}).get("loadavg_1m"),
                         **_bounds(e, case, family, base_bytes), **extra, "path": str(e.path)})
    return rows


def apart_speedup(base: list[float], times: list[float]) -> dict[str, float]:
    """median(base) / median(times), quartiles of median(base) / t_i: base and times were not timed round by round."""
    ratios = np.median(base) / np.asarray(times, dtype=np.float64)
    q25, q75 = np.percentile(ratios, [25, 75])
    return {"speedup": float(np.median(base) / np.median(times)), "speedup_p25": float(q25),
            "speedup_p75": float(q75)}


def _deepsparse_fields(entry: Entry, entries: list[Entry], case_times: dict, checks: dict) -> dict:
    """Check results and the in-worker ratio to the DeepSparse dense entry of the same weight format."""
    check = checks.get(entry.key, {})
    fmt = weight_format(entry.path)
    dense = next((e for e in entries if e.engine == "deepsparse" and e.model == "dense"
                  and weight_format(e.path) == fmt and e.key in case_times), None)
    out = {"compile_s": check.get("compile_s"), "supported_ops": check.get("supported_ops"),
           "max_abs_err_vs_ort": check.get("max_abs_err"), "max_abs_ort": check.get("max_ref"),
           "top1_agreement_vs_ort": check.get("top1"), "deepsparse_dense_same_format": dense and dense.key,
           "deepsparse_speedup_vs_dense_same_format": None}
    if dense is not None:
        pair = paired_speedup(case_times[dense.key], case_times[entry.key])
        out.update({"deepsparse_speedup_vs_dense_same_format": pair["speedup"],
                    "deepsparse_speedup_vs_dense_same_format_p25": pair["speedup_p25"],
                    "deepsparse_speedup_vs_dense_same_format_p75": pair["speedup_p75"]})
    return out


def matrix_cases(info: ModelInfo, seqs: tuple[int, ...], decode: int, decode_batches: tuple[int, ...],
                 past: int) -> list[Case]:
    """Prefill of each length at batch 1; `decode` one-token steps on a cache of `past` at each decode batch."""
    if not seqs or min(seqs) < 1 or decode < 1 or not decode_batches or min(decode_batches) < 1 or past < 1:
        raise BenchError(f"need prefill lengths, decode steps, batches and past >= 1; got {seqs}, {decode}, "
                         f"{decode_batches}, {past}")
    if not info.with_past:
        raise BenchError(f"{info.path}: exported without KV cache: decode cannot be measured")
    return [Case("prefill", 1, s, 0, 1) for s in seqs] + [Case("decode", b, 1, past, decode) for b in decode_batches]


def run_matrix(entries: list[Entry], seqs: tuple[int, ...] = (128, 512), decode: int = 16,
               decode_batches: tuple[int, ...] = (1, 8), past: int = 128, threads: int = 2, warmup: int = 1,
               reps: int = 5, seed: int = 0, deepsparse_python: Path | None = None,
               worker_timeout: float = WORKER_TIMEOUT_S) -> dict:
    """Time every entry on every case, interleaved; returns the speed document (format sdsonnx-speed/2).

    DeepSparse entries need deepsparse_python (default: deepsparse_env.find_deepsparse_python(), which raises
    DeepSparseUnavailable); those it cannot run are listed in the document's "errors"."""
    if not entries:
        raise BenchError("no entries to benchmark")
    base = _check_entries(entries)
    cases = matrix_cases(load_model_info(base.path), seqs, decode, decode_batches, past)
    load_before = os.getloadavg()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if any(e.engine == "deepsparse" for e in entries) and deepsparse_python is None:
        from .deepsparse_env import find_deepsparse_python

        deepsparse_python = find_deepsparse_python()
    with tempfile.TemporaryDirectory(prefix="sdsonnx-matrix-") as tmp:
        times, diffs, ds = time_entries(entries, cases, threads, warmup, reps, seed, Path(tmp), deepsparse_python,
                                        worker_timeout)
    versions = {"onnxruntime": _version("onnxruntime")}
    if any(e.engine == "openvino" for e in entries):
        versions["openvino"] = _version("openvino")
    if ds is not None:
        versions["deepsparse"] = {"version": ds["version"], "python": str(deepsparse_python),
                                  "rewrites": ds["rewrites"], "timed": "in its own process, after the in-process "
                                  "engines; speedup_vs_dense_fp32 is not interleaved with its base"}
    return {"format": "sdsonnx-speed/2", "created": started,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(threads),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()], "warmup": warmup, "reps": reps, "seed": seed,
            "engines": versions, "cases": [c.key for c in cases],
            "records": records(entries, cases, times, diffs, ds and ds["checks"]), "errors": ds["errors"] if ds else []}


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
