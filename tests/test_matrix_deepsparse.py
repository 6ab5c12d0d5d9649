"""DeepSparse in the engines-side-by-side matrix: job building, crash recovery, records (no DeepSparse needed).

The end-to-end glue runs the real deepsparse_worker.py under a stand-in `deepsparse` package (ONNX Runtime inside,
told by environment variables to crash natively on one model and to return wrong numbers on another), so the
parent's handling of both is exercised in CI; the test against real DeepSparse 1.8.0 skips without its venv.
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sdsonnx.artifact.export import export_checkpoint
from sdsonnx.artifact.quantize import quantize_artifact
from sdsonnx.bench.deepsparse_env import DeepSparseUnavailable, WorkerRun, find_deepsparse_python
from sdsonnx.bench.deepsparse_matrix import FP32_TOL, QUANT_TOL, build_job, run_case_jobs, tolerance
from sdsonnx.bench.matrix import Entry, apart_speedup, records, run_matrix
from sdsonnx.bench.workload import BenchError, Case
from tiny_models import tiny_checkpoint

STUB = '''
"""Stand-in for deepsparse 1.8.0's Engine (tests only): ONNX Runtime underneath."""
import os
import numpy as np
import onnxruntime as ort

__version__ = "0.0-stub"


class Engine:
    def __init__(self, path, batch_size=1, num_cores=1, input_shapes=None):
        if os.environ.get("DS_STUB_CRASH") and os.environ["DS_STUB_CRASH"] in path:
            os.write(2, b"Assertion at src/lib/engine/stub.cpp:1\\n")
            os.abort()
        if os.environ.get("DS_STUB_RAISE") and os.environ["DS_STUB_RAISE"] in path:
            raise RuntimeError("stub: unsupported")
        self.scale = 2.0 if os.environ.get("DS_STUB_WRONG") and os.environ["DS_STUB_WRONG"] in path else 1.0
        self.sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.sess.get_inputs()]
        self.fraction_of_supported_ops = 0.9

    def run(self, inputs, val_inp=False):
        return [o * self.scale for o in self.sess.run(None, dict(zip(self.names, inputs)))]
'''


def stub_python(tmp_path: Path, **env: str) -> Path:
    """An executable that runs this interpreter with the stub `deepsparse` first on the path and `env` set."""
    pkg = tmp_path / "stub" / "deepsparse"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(STUB)
    exports = "".join(f"export {k}={v}\n" for k, v in env.items())
    script = tmp_path / f"python-{abs(hash(tuple(env.items())))}"
    script.write_text(f"#!/bin/sh\n{exports}export PYTHONPATH={pkg.parent}\nexec {sys.executable} \"$@\"\n")
    script.chmod(0o755)
    return script


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """Tiny LLaMA exported with past: dense fp32, 2:4 fp32 and 2:4 int8-dynamic."""
    root = tmp_path_factory.mktemp("dsmatrix")
    out = {}
    for name, pattern in (("dense-fp32", None), ("s24-fp32", "2:4")):
        ckpt = tiny_checkpoint("llama", root / f"ckpt-{name}", pattern=pattern, report=False)
        export_checkpoint(ckpt, root / name, task="text-generation-with-past")
        out[name] = root / name
    quantize_artifact(out["s24-fp32"], root / "s24-int8-dynamic", "int8-dynamic")
    out["s24-int8-dynamic"] = root / "s24-int8-dynamic"
    return out


# ---- job and tolerances ----------------------------------------------------------------------------------------

def test_tolerance_by_format_and_job_fields(tmp_path):
    assert tolerance("fp32") == FP32_TOL and tolerance("int8-static") == QUANT_TOL == tolerance("int8-dynamic")
    specs = [{"label": "deepsparse:dense:fp32", "path": "a.onnx", "reference": "r.npz", "rtol": 1, "atol": 2}]
    job = build_job(specs, tmp_path / "in.npz", ["input_ids"], Case("decode", 8, 1, 128, 4), 2, 1, 3,
                    tmp_path / "p")
    assert (job["threads"], job["warmup"], job["reps"], job["steps"]) == (2, 1, 3, 4)
    assert job["keep_going"] is True and job["progress"] == str(tmp_path / "p") and job["models"] == specs
    assert (job["rtol"], job["atol"]) == FP32_TOL and job["input_names"] == ["input_ids"]
    with pytest.raises(ValueError):
        build_job([], tmp_path / "in.npz", [], Case("decode", 1, 1, 1, 1), 1, 0, 1, tmp_path / "p")


def _fake_runner(script: list):
    """A runner replaying `script`: per call (progress label to leave or None, exit code, result models or None)."""
    calls = []

    def runner(python, job_path, result_path, timeout_s):
        job = json.loads(Path(job_path).read_text())
        calls.append([m["label"] for m in job["models"]])
        label, code, models = script[len(calls) - 1]
        if label is not None:
            Path(job["progress"]).write_text(label)
        if models is not None:
            Path(result_path).write_text(json.dumps({"deepsparse": "x", "models": models}))
        return WorkerRun(code, "Assertion at graph.cpp:925 stub" if code not in (0, 3) else "")
    return runner, calls


def test_native_crash_drops_the_culprit_and_reruns_the_rest(tmp_path):
    job = {"models": [{"label": k} for k in ("a", "b", "c")], "progress": str(tmp_path / "progress")}
    ok = {"times_s": [1.0], "check_ok": True}
    runner, calls = _fake_runner([("b", -6, None), ("c", 0, {"a": ok, "c": {**ok, "error": "outputs differ"}})])
    models, errors, version = run_case_jobs(Path("py"), job, tmp_path, "t", 10, runner)
    assert calls == [["a", "b", "c"], ["a", "c"]]
    assert list(models) == ["a"] and version == "x"
    assert set(errors) == {"b", "c"} and "graph.cpp:925" in errors["b"] and errors["c"] == "outputs differ"


def test_crash_while_timing_or_timeout_fails_every_model_left(tmp_path):
    job = {"models": [{"label": "a"}, {"label": "b"}], "progress": str(tmp_path / "progress")}
    runner, calls = _fake_runner([("(timing)", -11, None)])
    models, errors, _ = run_case_jobs(Path("py"), job, tmp_path, "t", 10, runner)
    assert models == {} and set(errors) == {"a", "b"} and len(calls) == 1
    runner, _ = _fake_runner([(None, 124, None)])
    models, errors, _ = run_case_jobs(Path("py"), job, tmp_path, "t", 7, runner)
    assert models == {} and errors == {"a": "DeepSparse worker killed after 7 s", "b": "DeepSparse worker killed after 7 s"}


# ---- records ---------------------------------------------------------------------------------------------------

def test_apart_speedup_exact():
    r = apart_speedup([2.0, 4.0, 6.0], [1.0, 2.0, 4.0])  # base median 4
    assert r["speedup"] == 2.0 and r["speedup_p25"] == pytest.approx(1.5) and r["speedup_p75"] == pytest.approx(3.0)


def test_deepsparse_records_against_ort_base_and_deepsparse_dense_of_the_same_format(family):
    d, s, q = family["dense-fp32"], family["s24-fp32"], family["s24-int8-dynamic"]
    entries = [Entry("onnxruntime", "dense", d, d), Entry("deepsparse", "dense", d, d),
               Entry("deepsparse", "2:4", s, s), Entry("deepsparse", "2:4", q, s)]
    case = Case("decode", 1, 1, 4, 2)
    times = {case.key: {entries[0].key: [4.0, 4.0, 4.0], entries[1].key: [2.0, 2.0, 2.0],
                        entries[2].key: [1.0, 1.0, 1.0]}}  # the int8 entry failed: no times
    checks = {case.key: {entries[2].key: {"compile_s": 3.0, "max_abs_err": 1e-5, "max_ref": 9.0, "top1": 1.0,
                                          "supported_ops": 0.95}}}
    rows = records(entries, [case], times, {}, checks)
    assert [(r["engine"], r["model"], r["weight_format"]) for r in rows] == \
        [("onnxruntime", "dense", "fp32"), ("deepsparse", "dense", "fp32"), ("deepsparse", "2:4", "fp32")]
    base, ds_dense, ds_sparse = rows
    assert base["speedup_base_interleaved"] is True and "deepsparse_speedup_vs_dense_same_format" not in base
    assert ds_dense["speedup_vs_dense_fp32"] == 2.0 and ds_dense["speedup_base_interleaved"] is False
    assert ds_dense["deepsparse_speedup_vs_dense_same_format"] == 1.0
    assert ds_sparse["speedup_vs_dense_fp32"] == 4.0 and ds_sparse["deepsparse_speedup_vs_dense_same_format"] == 2.0
    assert ds_sparse["deepsparse_dense_same_format"] == "deepsparse:dense:fp32"
    assert (ds_sparse["supported_ops"], ds_sparse["compile_s"], ds_sparse["top1_agreement_vs_ort"]) == (0.95, 3.0, 1.0)
    assert ds_sparse["sparsity"] == pytest.approx(0.5, abs=0.01) and ds_sparse["bound_if_zeros_compressed"] > 1.0


def test_unknown_engine_and_missing_deepsparse_python(family):
    d = family["dense-fp32"]
    with pytest.raises(BenchError, match="unknown engine"):
        run_matrix([Entry("onnxruntime", "dense", d, d), Entry("tvm", "dense", d, d)], seqs=(4,), decode=1,
                   decode_batches=(1,), past=2, threads=1, warmup=0, reps=1)


# ---- end to end, with the stand-in DeepSparse -------------------------------------------------------------------

def test_matrix_with_stub_deepsparse_records_failures_and_times_the_rest(family, tmp_path):
    d, s, q = family["dense-fp32"], family["s24-fp32"], family["s24-int8-dynamic"]
    entries = [Entry("onnxruntime", "dense", d, d), Entry("deepsparse", "dense", d, d),
               Entry("deepsparse", "2:4", s, s), Entry("deepsparse", "2:4", q, s)]
    # per case the worker's copies are ds-<case>-<i>.onnx in entry order: crash on the 2:4 fp32 one in prefill,
    # wrong numbers from the int8 one everywhere
    python = stub_python(tmp_path, DS_STUB_CRASH="ds-prefill-b1-s8-p0-1.onnx", DS_STUB_WRONG="-2.onnx")
    doc = run_matrix(entries, seqs=(8,), decode=2, decode_batches=(1,), past=4, threads=1, warmup=0, reps=2,
                     deepsparse_python=python, worker_timeout=120)
    got = {(r["engine"], r["model"], r["weight_format"], r["phase"]) for r in doc["records"]}
    assert got == {("onnxruntime", "dense", "fp32", "prefill"), ("onnxruntime", "dense", "fp32", "decode"),
                   ("deepsparse", "dense", "fp32", "prefill"), ("deepsparse", "dense", "fp32", "decode"),
                   ("deepsparse", "2:4", "fp32", "decode")}
    errors = {(e["model"], e["weight_format"], e["case"]): e["error"] for e in doc["errors"]}
    assert set(errors) == {("2:4", "fp32", "prefill-b1-s8-p0"), ("2:4", "int8-dynamic", "prefill-b1-s8-p0"),
                           ("2:4", "int8-dynamic", "decode-b1-s1-p4")}
    assert "stub.cpp:1" in errors[("2:4", "fp32", "prefill-b1-s8-p0")]
    assert errors[("2:4", "int8-dynamic", "decode-b1-s1-p4")].startswith("outputs differ from ONNX Runtime")
    assert doc["engines"]["deepsparse"]["version"] == "0.0-stub"
    assert "/model/rotary_emb/MatMul" in " ".join(doc["engines"]["deepsparse"]["rewrites"]["m0"])
    for r in doc["records"]:
        if r["engine"] == "deepsparse":
            assert r["max_abs_err_vs_ort"] < 1e-4 and r["top1_agreement_vs_ort"] == 1.0
            assert r["supported_ops"] == 0.9 and r["speedup_base_interleaved"] is False and r["n"] == 2
            assert r["deepsparse_speedup_vs_dense_same_format"] > 0


def test_speed_bench_deepsparse_entries_only_where_the_export_exists(family):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        from speed_bench import deepsparse_entries, matrix_table
    finally:
        sys.path.pop(0)
    s = family["s24-fp32"]
    got = deepsparse_entries([f"2:4={s}"], ["fp32", "int8-static", "int8-dynamic"], [])
    assert [(e.engine, e.model, e.path, e.family) for e in got] == \
        [("deepsparse", "2:4", s, s), ("deepsparse", "2:4", family["s24-int8-dynamic"], s)]
    assert deepsparse_entries([f"2:4={s}"], ["fp32", "int8-dynamic"], ["deepsparse:2:4:int8"]) == got[:1]
    doc = {"records": [], "errors": [{"engine": "deepsparse", "model": "2:4", "weight_format": "int8-static",
                                      "case": "decode-b1-s1-p128", "error": "why"}]}
    assert matrix_table(doc).splitlines()[-1] == "! deepsparse 2:4 int8-static decode-b1-s1-p128: why"


# ---- real DeepSparse 1.8.0 -------------------------------------------------------------------------------------

def _ds_python():
    try:
        return find_deepsparse_python()
    except DeepSparseUnavailable:
        return None


@pytest.mark.skipif(_ds_python() is None, reason="no DeepSparse venv (make deepsparse)")
def test_matrix_with_real_deepsparse_fp32_and_int8(family):
    d, s, q = family["dense-fp32"], family["s24-fp32"], family["s24-int8-dynamic"]
    entries = [Entry("onnxruntime", "dense", d, d), Entry("deepsparse", "dense", d, d),
               Entry("deepsparse", "2:4", s, s), Entry("deepsparse", "2:4", q, s)]
    doc = run_matrix(entries, seqs=(8,), decode=2, decode_batches=(1,), past=4, threads=1, warmup=0, reps=1,
                     worker_timeout=600)
    fp32 = [r for r in doc["records"] if r["engine"] == "deepsparse" and r["weight_format"] == "fp32"]
    assert len(fp32) == 4, doc["errors"]
    assert all(r["max_abs_err_vs_ort"] < 1e-3 and r["supported_ops"] > 0.5 for r in fp32)
    int8 = {r["phase"] for r in doc["records"] if r["weight_format"] == "int8-dynamic"}
    failed = {e["case"].split("-")[0] for e in doc["errors"] if e["weight_format"] == "int8-dynamic"}
    assert int8 | failed == {"prefill", "decode"}  # each case either timed or recorded with its reason
