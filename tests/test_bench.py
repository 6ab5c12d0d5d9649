"""`sdsonnx bench`: timing statistics, the DeepSparse LLaMA rewrite, end to end on tiny exports (no timing asserts)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from sdsonnx.bench.core import bench_cases
from sdsonnx.bench.deepsparse_compat import (DeepSparseCompatError, lower_ir_version, make_deepsparse_compatible,
                                             matmul_k1_to_mul)
from sdsonnx.bench.deepsparse_env import DeepSparseUnavailable, crash_summary, find_deepsparse_python, run_worker
from sdsonnx.bench.graphs import strip_past
from sdsonnx.bench.timing import interleaved_times, paired_speedup, summarize
from sdsonnx.bench.workload import BenchError, Case, ModelInfo, load_model_info, make_feeds, work_share
from sdsonnx.cli import main
from sdsonnx.artifact.export import export_checkpoint
from tiny_models import tiny_checkpoint

WITH_PAST = "text-generation-with-past"


def _deepsparse_python():
    try:
        return find_deepsparse_python()
    except DeepSparseUnavailable:
        return None


DS_PYTHON = _deepsparse_python()
needs_deepsparse = pytest.mark.skipif(DS_PYTHON is None, reason="no DeepSparse venv (make deepsparse)")


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Tiny LLaMA exported with past: dense and 2:4; tiny OPT dense."""
    root = tmp_path_factory.mktemp("bench")
    out = {}
    for name, arch, pattern in (("llama_dense", "llama", None), ("llama_24", "llama", "2:4"), ("opt_dense", "opt", None)):
        ckpt = tiny_checkpoint(arch, root / f"ckpt_{name}", pattern=pattern, report=False)
        export_checkpoint(ckpt, root / name, task=WITH_PAST)
        out[name] = root / name
    return out


# ---- timing statistics -------------------------------------------------------------------------------------

def test_summarize_exact_values():
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s["median_s"], s["p25_s"], s["p75_s"], s["min_s"], s["max_s"], s["n"]) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert s["spread"] == pytest.approx(2.0 / 3.0)
    with pytest.raises(ValueError):
        summarize([])


def test_paired_speedup_is_ratio_of_medians_and_quartiles_of_round_ratios():
    r = paired_speedup([2.0, 4.0, 6.0], [1.0, 1.0, 3.0])  # per-round ratios 2, 4, 2
    assert r["speedup"] == pytest.approx(4.0 / 1.0)
    assert (r["speedup_p25"], r["speedup_p75"]) == (pytest.approx(2.0), pytest.approx(3.0))
    with pytest.raises(ValueError):
        paired_speedup([1.0], [1.0, 2.0])


def test_interleaved_times_alternates_order_and_drops_warmup():
    calls = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, steps=2, warmup=1, reps=2)
    assert calls == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert [len(v) for v in times.values()] == [2, 2]
    with pytest.raises(ValueError):
        interleaved_times({"a": lambda: None}, steps=1, warmup=0, reps=0)


def test_work_share_closed_form():
    # two weights of 100 elements, one pruned to 50%; no attention (no config): f = 1/2, s = 1/2
    info = ModelInfo(Path("m.onnx"), "m", [], [], {}, False, 10, {"w1": (100, 50), "w2": (100, 0)})
    r = work_share(info, Case("prefill", 1, 8, 0, 1))
    assert r["sparsity"] == 0.5 and r["pruned_work_share"] == 0.5
    assert r["limit_ideal"] == pytest.approx(2.0) and r["limit_amdahl"] == pytest.approx(1 / (1 - 0.25))
    # attention adds 4 * ctx * hidden * layers per token: 4 * 8 * 5 * 1 = 160 next to 400 linear
    info.config = {"num_hidden_layers": 1, "hidden_size": 5}
    assert work_share(info, Case("prefill", 1, 8, 0, 1))["pruned_work_share"] == pytest.approx(200 / 560)


# ---- the DeepSparse LLaMA rewrite --------------------------------------------------------------------------

def _rotary_like(ir: int = 8, opset: int = 18) -> onnx.ModelProto:
    """inv_freq [B,4,1] @ pos [B,1,S] -> Transpose -> Concat(x, x): the chain DeepSparse 1.8.0 asserts on."""
    nodes = [helper.make_node("MatMul", ["F", "P"], ["M"], name="outer"),
             helper.make_node("Transpose", ["M"], ["T"], perm=[0, 2, 1]),
             helper.make_node("Concat", ["T", "T"], ["E"], axis=-1),
             helper.make_node("Cos", ["E"], ["Y"]),
             helper.make_node("MatMul", ["Y", "W"], ["Z"], name="proj")]  # inner dim 8: must stay MatMul
    graph = helper.make_graph(nodes, "rot", [helper.make_tensor_value_info("F", TensorProto.FLOAT, ["b", 4, 1]),
                                             helper.make_tensor_value_info("P", TensorProto.FLOAT, ["b", 1, "s"])],
                              [helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["b", "s", 3])],
                              [onnx.numpy_helper.from_array(np.arange(24, dtype=np.float32).reshape(8, 3) / 7, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_matmul_with_inner_dim_1_becomes_mul_bit_identical():
    model = _rotary_like()
    rng = np.random.default_rng(0)
    feeds = {"F": rng.standard_normal((2, 4, 1)).astype(np.float32),
             "P": (rng.standard_normal((2, 1, 5)) * 100).astype(np.float32)}
    before = _ort(model, feeds)
    assert matmul_k1_to_mul(model) == ["outer"]
    assert [n.op_type for n in model.graph.node] == ["Mul", "Transpose", "Concat", "Cos", "MatMul"]
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(_ort(model, feeds)[0], before[0])


def test_ir_version_lowered_and_too_new_opset_rejected():
    model = _rotary_like(ir=10, opset=19)
    assert make_deepsparse_compatible(model) == ["MatMul with inner dimension 1 -> Mul: outer", "IR version lowered to 9"]
    assert model.ir_version == 9 and not lower_ir_version(model)
    with pytest.raises(DeepSparseCompatError, match="opset 20"):
        lower_ir_version(_rotary_like(ir=10, opset=20))


def test_rewrite_on_tiny_llama_export_touches_only_rotary_and_keeps_ort_logits(exports):
    path = exports["llama_dense"] / "model.onnx"
    model = onnx.load(path)
    info = load_model_info(exports["llama_dense"])
    feeds = make_feeds(info, Case("decode", 2, 3, 4, 1), seed=1)
    before = _ort(model, feeds)
    changed = matmul_k1_to_mul(model)
    assert changed == ["/model/rotary_emb/MatMul"]
    after = _ort(model, feeds)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert matmul_k1_to_mul(onnx.load(exports["opt_dense"] / "model.onnx")) == []  # OPT: nothing to rewrite


def test_strip_past_gives_the_empty_cache_outputs_without_past_inputs(exports):
    for name in ("llama_24", "opt_dense"):
        model = onnx.load(exports[name] / "model.onnx")
        info = load_model_info(exports[name])
        stripped = strip_past(model)
        onnx.checker.check_model(stripped, full_check=True)
        assert not [i.name for i in stripped.graph.input if i.name.startswith("past")]
        assert [o.name for o in stripped.graph.output] == [o.name for o in model.graph.output]
        producers = {o: n.op_type for n in stripped.graph.node for o in n.output}
        assert all(producers[o.name] != "Identity" for o in stripped.graph.output)  # DeepSparse asserts on those
        feeds = make_feeds(info, Case("prefill", 2, 5, 0, 1), seed=3)
        full = dict(feeds)
        for spec in info.inputs:
            if spec.name.startswith("past"):
                full[spec.name] = np.zeros((2, spec.dims[1], 0, spec.dims[3]), np.float32)
        for a, b in zip(_ort(model, full), _ort(stripped, feeds)):
            np.testing.assert_array_equal(a, b)


# ---- workload -----------------------------------------------------------------------------------------------

def test_cases_and_feeds(exports):
    info = load_model_info(exports["llama_24"])
    assert info.with_past and info.pattern == "2:4" and info.sparsity == pytest.approx(0.5)
    cases = bench_cases(info, 1, (16, 8), 3)
    assert [c.key for c in cases] == ["prefill-b1-s16-p0", "prefill-b1-s8-p0", "decode-b1-s1-p8"]
    feeds = make_feeds(info, cases[-1])
    assert feeds["attention_mask"].shape == (1, 9) and feeds["position_ids"].tolist() == [[8]]
    assert feeds["past_key_values.0.key"].shape[2] == 8 and feeds["input_ids"].max() < info.vocab_size
    assert set(make_feeds(info, cases[0])) == {"input_ids", "attention_mask", "position_ids"}
    assert load_model_info(exports["llama_dense"]).sparsity == 0.0


def _with_metadata(src: Path, dst: Path, edit) -> Path:
    """Copy an export folder and apply edit({key: value}) to its model.onnx's metadata_props."""
    shutil.copytree(src, dst)
    model = onnx.load(dst / "model.onnx")
    props = {p.key: p.value for p in model.metadata_props}
    edit(props)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, dst / "model.onnx")
    return dst


def test_pruned_weights_are_the_ones_the_metadata_lists(exports, tmp_path):
    """Not a zeros rule: drop one 50%-zero weight from sdsonnx.initializers and it no longer counts as pruned."""
    src = exports["llama_24"]
    listed = json.loads({p.key: p.value for p in onnx.load(src / "model.onnx", load_external_data=False)
                         .metadata_props}["sdsonnx.initializers"])
    assert set(load_model_info(src).pruned) == set(listed) and len(listed) == 14
    dropped = sorted(listed)[0]

    def drop_one(props):
        entries = json.loads(props["sdsonnx.initializers"])
        del entries[dropped]
        props["sdsonnx.initializers"] = json.dumps(entries)
        props["sdsonnx.pattern"] = "4:8"  # whatever the metadata says is what bench reports

    info = load_model_info(_with_metadata(src, tmp_path / "subset", drop_one))
    assert set(info.pruned) == set(listed) - {dropped}
    assert info.weights[dropped][1] == info.weights[dropped][0] // 2 and info.pattern == "4:8"
    assert load_model_info(exports["llama_dense"]).pruned == {}  # listed, but without a zero

    bare = load_model_info(_with_metadata(src, tmp_path / "bare", lambda props: props.clear()))
    assert bare.pruned_names is None and set(bare.pruned) == set(listed) and bare.pattern == "2:4"
    with pytest.raises(BenchError, match="unreadable sdsonnx metadata"):
        load_model_info(_with_metadata(src, tmp_path / "broken", lambda props: props.pop("sdsonnx.initializers")))


# ---- end to end ---------------------------------------------------------------------------------------------

def _bench(args: list[str], env: dict | None = None):
    return CliRunner().invoke(main, ["bench", *args], env=env, catch_exceptions=False)


def _check_outputs(out: Path, engines: set[str], n_models: int, n_cases: int) -> dict:
    doc = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["engine"] for r in doc["records"]} == engines
    assert len(doc["records"]) == len(engines) * n_models * n_cases
    for row in doc["records"]:
        assert row["median_s"] > 0 and row["tokens_per_s"] > 0 and row["n"] == 2
        if row["role"] == "sparse" and "dense" in doc["models"]:
            assert row["speedup"] > 0 and row["sparsity"] == pytest.approx(0.5)
            assert row["limit_ideal"] == pytest.approx(2.0)
            assert 1.0 < row["limit_amdahl"] < row["limit_ideal"]
    return doc


def test_bench_end_to_end_onnxruntime(exports, tmp_path):
    out = tmp_path / "b"
    res = _bench([str(exports["llama_24"]), "--dense", str(exports["llama_dense"]), "--engine", "onnxruntime",
                  "--seq", "8,16", "--decode", "2", "--warmup", "1", "--reps", "2", "--threads", "1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    doc = _check_outputs(out, {"onnxruntime"}, 2, 3)
    assert doc["cases"] == ["prefill-b1-s8-p0", "prefill-b1-s16-p0", "decode-b1-s1-p8"]
    assert "speedup" in res.output and "bench.png" in res.output


def test_bench_models_several_sparse_variants_against_one_dense(exports):
    from sdsonnx.bench.core import bench_models

    doc = bench_models({"dense": exports["llama_dense"], "24": exports["llama_24"], "24b": exports["llama_24"]},
                       engines=("onnxruntime",), seqs=(4,), decode=0, warmup=0, reps=2, threads=1)
    rows = {r["role"]: r for r in doc["records"]}
    assert set(rows) == {"dense", "24", "24b"} and "speedup" not in rows["dense"]
    assert rows["24"]["speedup"] > 0 and rows["24b"]["limit_ideal"] == pytest.approx(2.0)


def test_missing_deepsparse_is_a_clear_message_and_onnxruntime_still_runs(exports, tmp_path):
    env = {"SDSONNX_DEEPSPARSE_PYTHON": str(tmp_path / "nowhere" / "python")}
    out = tmp_path / "b"
    res = _bench([str(exports["llama_24"]), "--seq", "8", "--decode", "0", "--reps", "2", "--warmup", "0",
                  "-o", str(out)], env)
    assert res.exit_code == 0, res.output
    doc = _check_outputs(out, {"onnxruntime"}, 1, 1)
    assert "python3.11 -m venv .venv-deepsparse" in doc["skipped"]["deepsparse"]
    res = _bench([str(exports["llama_24"]), "--engine", "deepsparse", "-o", str(tmp_path / "b2")], env)
    assert res.exit_code == 2 and "DeepSparse not found" in res.output
    assert not (tmp_path / "b2").exists()  # a failed bench leaves no output folder


def test_bad_inputs_exit_2(exports, tmp_path):
    res = _bench([str(tmp_path / "missing"), "--engine", "onnxruntime"])
    assert res.exit_code == 2 and "model.onnx" in res.output
    res = _bench([str(exports["llama_24"]), "--dense", str(exports["opt_dense"]), "--engine", "onnxruntime"])
    assert res.exit_code == 2 and "different inputs" in res.output
    res = _bench([str(exports["llama_24"]), "--engine", "tensorrt"])
    assert res.exit_code == 2 and "unknown engine" in res.output


@needs_deepsparse
def test_bench_end_to_end_deepsparse_llama(exports, tmp_path):
    out = tmp_path / "b"
    res = _bench([str(exports["llama_24"]), "--dense", str(exports["llama_dense"]), "--seq", "8", "--decode", "2",
                  "--warmup", "1", "--reps", "2", "--threads", "1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    doc = _check_outputs(out, {"onnxruntime", "deepsparse"}, 2, 2)
    assert doc["errors"] == []
    assert doc["engines"]["deepsparse"]["rewrites"]["sparse"] == ["MatMul with inner dimension 1 -> Mul: /model/rotary_emb/MatMul"]
    for row in doc["records"]:
        if row["engine"] == "deepsparse":
            assert row["max_abs_err_vs_ort"] < 1e-4 and row["compile_s"] >= 0
            assert row["supported_ops"] > 0.5  # compiled by DeepSparse, not handed to its bundled ONNX Runtime


@needs_deepsparse
def test_unrewritten_llama_still_kills_deepsparse_and_is_reported(exports, tmp_path):
    """The root cause, kept honest: without the rewrite DeepSparse 1.8.0 dies on the tiny LLaMA export."""
    info = load_model_info(exports["llama_dense"])
    case = Case("decode", 1, 1, 8, 1)  # a non-empty cache: with zero-size inputs DeepSparse runs nothing itself
    np.savez(tmp_path / "in.npz", **make_feeds(info, case))
    np.savez(tmp_path / "ref.npz", out0=np.zeros(1))
    shutil.copyfile(info.path, tmp_path / "copy.onnx")
    job = {"threads": 1, "warmup": 0, "reps": 1, "steps": 1, "rtol": 1e-3, "atol": 1e-3,
           "inputs": str(tmp_path / "in.npz"), "input_names": [s.name for s in info.inputs],
           "models": [{"label": "dense", "path": str(tmp_path / "copy.onnx"), "reference": str(tmp_path / "ref.npz")}]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    run = run_worker(DS_PYTHON, tmp_path / "job.json", tmp_path / "result.json", timeout_s=300)
    assert run.crashed and "graph.cpp:925" in crash_summary(run)


# ---- engines side by side (matrix) and bounds ----------------------------------------------------------------

def test_weight_bytes_counts_matmul_weights_not_gather_only_embeddings():
    from sdsonnx.bench.bounds import weight_bytes

    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 8], np.zeros(32, np.float32))
    q = helper.make_tensor("Q", TensorProto.INT8, [4, 8], np.zeros(32, np.int8).tobytes(), raw=True)
    emb = helper.make_tensor("E", TensorProto.FLOAT, [10, 4], np.zeros(40, np.float32))
    tied = helper.make_tensor("T", TensorProto.FLOAT, [10, 4], np.zeros(40, np.float32))
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"]), helper.make_node("Gather", ["T", "ids"], ["t"]),
             helper.make_node("Transpose", ["T"], ["tt"]), helper.make_node("MatMul", ["x", "W"], ["y"]),
             helper.make_node("MatMulInteger", ["xi", "Q"], ["yi"])]
    graph = helper.make_graph(nodes, "g", [], [], [w, q, emb, tied])
    model = helper.make_model(graph)
    assert weight_bytes(model) == {"W": 128, "Q": 32, "T": 160}
    assert weight_bytes(model, float_itemsize=2) == {"W": 64, "Q": 32, "T": 80}


def test_matrix_records_speedup_against_ort_dense_fp32_with_bounds(exports, tmp_path):
    from sdsonnx.artifact.quantize import quantize_artifact
    from sdsonnx.bench.matrix import Entry, run_matrix

    dense, sparse = exports["llama_dense"], exports["llama_24"]
    int8 = tmp_path / "llama_24_int8"
    quantize_artifact(sparse, int8, "int8-dynamic")
    entries = [Entry("onnxruntime", "dense", dense, dense), Entry("onnxruntime", "2:4", sparse, sparse),
               Entry("onnxruntime", "2:4", int8, sparse)]
    try:
        import openvino  # noqa: F401
        entries.append(Entry("openvino", "2:4", sparse, sparse, precision_hint="f32"))
    except ImportError:
        pass
    doc = run_matrix(entries, seqs=(8,), decode=2, decode_batches=(1, 2), past=4, threads=1, warmup=0, reps=2)
    recs = doc["records"]
    assert len(recs) == 3 * len(entries)
    for r in recs:
        assert r["speedup_vs_dense_fp32"] > 0 and r["bound_vs_dense_fp32"] >= 1.0
        if r["model"] == "dense":
            assert r["speedup_vs_dense_fp32"] == 1.0 and r["bound_vs_dense_fp32"] == 1.0
        if r["engine"] == "openvino":
            assert r["precision_hint"] == "f32" and r["max_abs_logit_diff_vs_ort"] < 1e-3
    fp32_decode = next(r for r in recs if r["model"] == "2:4" and r["weight_format"] == "fp32"
                       and r["engine"] == "onnxruntime" and r["phase"] == "decode" and r["batch"] == 2)
    int8_decode = next(r for r in recs if r["weight_format"] == "int8-dynamic" and r["phase"] == "decode"
                       and r["batch"] == 2)
    assert fp32_decode["bound_vs_dense_fp32"] == 1.0  # zeros stored dense: same bytes as the dense model
    assert fp32_decode["weight_bytes_per_token"] == fp32_decode["dense_fp32_weight_bytes_per_token"]
    assert fp32_decode["bound_if_zeros_compressed"] > 1.0 and fp32_decode["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert int8_decode["bound_vs_dense_fp32"] > 1.0
    prefill = [r for r in recs if r["phase"] == "prefill" and r["model"] == "2:4"]
    assert all(r["bound_vs_dense_fp32"] == 1.0 and r["bound_if_zeros_skipped"] > 1.0 for r in prefill)
