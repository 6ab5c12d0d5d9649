"""ONNX export of tiny LLaMA / OPT / Qwen2 checkpoints: layout, sdsonnx.json, metadata readable with plain onnx."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from sdsonnx.artifact.checkpoint import weights_digest
from sdsonnx.artifact.export import ExportError, check_requests, export_checkpoint
from sdsonnx.artifact.metadata import global_pattern
from sdsonnx.artifact.validate import validate_artifact
from sdsonnx.cli import main
from sdsonnx.masks import pattern_name, satisfied_patterns
from tiny_models import tiny_checkpoint

WITH_PAST, NO_PAST = "text-generation-with-past", "text-generation"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{(arch, task): (checkpoint, export folder)} for 2:4-pruned tiny LLaMA and OPT, with and without past."""
    root = tmp_path_factory.mktemp("exports")
    made = {}
    for arch in ("llama", "opt"):
        ckpt = tiny_checkpoint(arch, root / f"ckpt_{arch}", pattern="2:4")
        for task in (WITH_PAST, NO_PAST):
            out = root / f"{arch}_{task}"
            export_checkpoint(ckpt, out, task=task)
            made[arch, task] = ckpt, out
    return made


def _meta(folder: Path) -> dict[str, str]:
    """Metadata as a user without sdsonnx reads it."""
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def _initializers(folder: Path) -> dict[str, np.ndarray]:
    model = onnx.load(folder / "model.onnx")
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("task", [WITH_PAST, NO_PAST])
def test_layout_and_metadata(exports, arch, task):
    ckpt, out = exports[arch, task]
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "sdsonnx.json", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    meta = _meta(out)
    assert meta["sdsonnx.format_version"] == "2"
    assert meta["sdsonnx.pattern"] == "2:4"
    assert float(meta["sdsonnx.sparsity"]) == 0.5
    assert meta["sdsonnx.recipe_hash"] == "0" * 64
    assert meta["sdsonnx.source_sha256"] == weights_digest(ckpt)
    entries = json.loads(meta["sdsonnx.initializers"])
    assert len(entries) == (14 if arch == "llama" else 12)  # 7 (LLaMA) / 6 (OPT) Linears per block, 2 blocks
    arrays = _initializers(out)
    from safetensors.numpy import load_file

    weights = load_file(ckpt / "model.safetensors")
    for name, entry in entries.items():
        w = weights[entry["module"] + ".weight"]
        stored = arrays[name]
        assert entry["zeros"] == w.size // 2 and entry["numel"] == w.size and entry["pattern"] == "2:4"
        if entry["axis"] == 0:
            np.testing.assert_array_equal(stored, w.T)  # MatMul B: stored [in, out]
        else:
            np.testing.assert_array_equal(stored, w)  # Gemm transB=1: stored [out, in]
    by_module = {e["module"]: (name, e["axis"]) for name, e in entries.items()}
    if arch == "llama":
        assert all(name.startswith("onnx::MatMul_") and axis == 0 for name, axis in by_module.values())
    else:  # OPT keeps fc names (Gemm transB=1); attention projections become MatMul
        assert by_module["model.decoder.layers.0.fc1"] == ("model.decoder.layers.0.fc1.weight", 1)
        assert by_module["model.decoder.layers.1.self_attn.q_proj"][1] == 0
    inputs = [i.name for i in onnx.load(out / "model.onnx", load_external_data=False).graph.input]
    assert any(n.startswith("past_key_values") for n in inputs) == (task == WITH_PAST)


def test_manifest(exports):
    ckpt, out = exports["llama", WITH_PAST]
    manifest = json.loads((out / "sdsonnx.json").read_text())
    assert manifest["model_file"] == "model.onnx" and manifest["external_data"] == []
    assert manifest["task"] == WITH_PAST and manifest["with_past"] is True
    assert manifest["opset"] == onnx.load(out / "model.onnx", load_external_data=False).opset_import[0].version
    assert manifest["source"]["model"] == "tiny-llama"
    assert manifest["source"]["weights_sha256"] == weights_digest(ckpt)
    assert manifest["source"]["architecture"] == "LlamaForCausalLM"
    assert manifest["perplexity"] == {"dense": 130.0, "pruned": 131.0}
    assert manifest["sparsity"] == {"global": 0.5, "pattern": "2:4", "zeros": manifest["sparsity"]["numel"] // 2,
                                    "numel": manifest["sparsity"]["numel"]}
    q = manifest["modules"]["model.layers.0.self_attn.q_proj"]
    assert q["sparsity"] == 0.5 and q["pattern"] == "2:4" and q["axis"] == 0 and q["consumer"] == "MatMul"
    assert q["recorded"] == {"sparsity": 0.5, "pattern": "2:4"}
    for package in ("sdsonnx", "torch", "transformers", "optimum-onnx", "onnx", "onnxruntime"):
        assert manifest["versions"][package]


def test_dense_unstructured_tied_and_external_data(tmp_path):
    """Unpruned LLaMA -> dense; 50% unstructured Qwen2 (tied embeddings) -> unstructured, forced external data."""
    dense = tiny_checkpoint("llama", tmp_path / "dense", pattern=None)
    manifest = export_checkpoint(dense, tmp_path / "dense_onnx", task=NO_PAST)
    meta = _meta(tmp_path / "dense_onnx")
    assert (meta["sdsonnx.pattern"], float(meta["sdsonnx.sparsity"]), manifest["recipe_hash"]) == ("dense", 0.0, None)
    assert meta["sdsonnx.recipe_hash"] == ""
    assert {e["pattern"] for e in json.loads(meta["sdsonnx.initializers"]).values()} == {"dense"}
    report = validate_artifact(tmp_path / "dense_onnx", dense)
    assert report.ok, report.failures

    qwen = tiny_checkpoint("qwen2", tmp_path / "qwen", pattern=0.5)
    manifest = export_checkpoint(qwen, tmp_path / "qwen_onnx", task=WITH_PAST, external_data=True)
    assert manifest["external_data"] == ["model.onnx_data"]
    assert (tmp_path / "qwen_onnx" / "model.onnx_data").stat().st_size > 100_000
    proto = onnx.load(tmp_path / "qwen_onnx" / "model.onnx", load_external_data=False)
    stored = {t.name: t.data_location for t in proto.graph.initializer}
    assert all(stored[name] == onnx.TensorProto.EXTERNAL for name in json.loads(_meta(tmp_path / "qwen_onnx")[
        "sdsonnx.initializers"]))
    meta = _meta(tmp_path / "qwen_onnx")
    assert meta["sdsonnx.pattern"] == "unstructured" and float(meta["sdsonnx.sparsity"]) == 0.5
    assert len(json.loads(meta["sdsonnx.initializers"])) == 14
    report = validate_artifact(tmp_path / "qwen_onnx", qwen)
    assert report.ok, report.failures
    assert json.loads((tmp_path / "qwen_onnx" / "validation.json").read_text())["ok"] is True


def test_pattern_helpers():
    w = np.array([[1.0, 0.0, 0.0, 0.0, 2.0, 0.0, -0.0, 0.0]], dtype=np.float32)  # 1 of each 4, -0.0 is zero
    assert satisfied_patterns(w, 1) == ["1:4", "2:8", "2:4", "4:8"]
    assert pattern_name(w, 1) == "1:4"
    assert pattern_name(w.T.copy(), 0) == "1:4"
    w[0, 1] = 3.0  # group 0 keeps 2 of 4: 2:4 holds, 1:4 does not; 2:8 still holds (3 of 8? no: 3 > 2)
    assert satisfied_patterns(w, 1) == ["2:4", "4:8"]
    assert pattern_name(np.ones((2, 8), np.float32), 1) == "dense"
    assert pattern_name(np.array([[0, 1, 1, 1, 1, 1, 1, 1]], np.float32), 1) == "unstructured"
    assert pattern_name(torch.from_numpy(w), 1) == "2:4"  # torch tensors too (inspect reads torch weights)
    assert satisfied_patterns(np.zeros((1, 6), np.float32), 1) == []  # 6 inputs: no group of 4 or 8 fits
    assert global_pattern([None, None]) == "dense"
    assert global_pattern([["2:4", "4:8"], ["1:4", "2:8", "2:4", "4:8"]]) == "2:4"
    assert global_pattern([["2:4", "4:8"], None]) == "unstructured"
    assert global_pattern([["2:4", "4:8"], []]) == "unstructured"


def test_weights_digest_sees_one_changed_weight(tmp_path):
    a = tiny_checkpoint("opt", tmp_path / "a", pattern=None, report=False)
    b = tiny_checkpoint("opt", tmp_path / "b", pattern=None, report=False)
    assert weights_digest(a) == weights_digest(b)  # same seed, same weights
    from safetensors.numpy import load_file, save_file

    tensors = load_file(b / "model.safetensors")
    key = "model.decoder.layers.1.fc2.weight"
    tensors[key][3, 5] = np.nextafter(tensors[key][3, 5], np.float32(np.inf))
    save_file(tensors, b / "model.safetensors", metadata={"format": "pt"})
    assert weights_digest(a) != weights_digest(b)


def test_bad_input(tmp_path):
    with pytest.raises(ExportError, match="no config.json"):
        export_checkpoint(tmp_path, tmp_path / "out")
    result = CliRunner().invoke(main, ["export", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 2 and "no config.json" in result.output


def test_checkpoint_that_missed_the_requested_pattern_does_not_export(tmp_path):
    """report.json says 2:4, one group of fc1 keeps 3 of 4: export fails (exit 2) before running the exporter."""
    from safetensors.numpy import load_file, save_file

    ckpt = tiny_checkpoint("opt", tmp_path / "ckpt", pattern="2:4")
    tensors = load_file(ckpt / "model.safetensors")
    w = tensors["model.decoder.layers.1.fc1.weight"]
    w[5, 8 + int(np.flatnonzero(w[5, 8:12] == 0)[0])] = 0.25
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    message = ("model.decoder.layers.1.fc1: report.json requests pattern 2:4 but its checkpoint weight does not "
               "satisfy it: 1 group(s) break 2:4; first: stored elements [5, 8:12] (output 5, inputs 8..11) "
               "hold 3 nonzeros > 2")
    with pytest.raises(ExportError) as caught:
        export_checkpoint(ckpt, tmp_path / "onnx", task=NO_PAST)
    assert str(caught.value) == message
    assert not (tmp_path / "onnx" / "model.onnx").exists()
    result = CliRunner().invoke(main, ["export", str(ckpt), str(tmp_path / "onnx"), "--task", NO_PAST])
    assert result.exit_code == 2 and message in " ".join(result.output.split())


def test_check_requests_holds_weights_to_n_m_requests_only():
    w = np.array([[1, 2, 0, 0, 3, 0, 0, 4]], np.float32)  # 2:4 and 4:8 hold, 1:4 does not
    check_requests({"a": w}, {"modules": {"a": {"pattern": "2:4"}}})
    check_requests({"a": w}, {"modules": {"a": {"pattern": "0.9"}}})  # unstructured requests are not compared
    check_requests({"a": w}, None)
    with pytest.raises(ExportError, match=r"^a: report.json requests pattern 1:4 .*: 2 group\(s\) break 1:4; "
                       r"first: stored elements \[0, 0:4\]"):
        check_requests({"a": w}, {"modules": {"a": {"pattern": "1:4"}}})
    with pytest.raises(ExportError, match="records the pattern '4:2'"):
        check_requests({"a": w}, {"modules": {"a": {"pattern": "4:2"}}})


def test_cli_export_then_validate(tmp_path):
    ckpt = tiny_checkpoint("opt", tmp_path / "ckpt", pattern="2:4")
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(ckpt), str(tmp_path / "onnx"), "--task", NO_PAST])
    assert result.exit_code == 0, result.output
    assert "global sparsity 0.5000, pattern 2:4" in result.output
    result = runner.invoke(main, ["validate", str(tmp_path / "onnx"), "--checkpoint", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert "validation passed" in result.output and "batch 3 len 16/11/3 prefill" in result.output


@pytest.mark.slow
def test_smollm2_two_blocks(tmp_path):
    """SmolLM2-135M cut to 2 blocks (tied head), 2:4-pruned: exports, validates; prints time and max logit diff."""
    from sdsonnx.models import load_model
    from tiny_models import prune_

    try:
        model, tokenizer = load_model("smollm2-135m", num_blocks=2)
    except Exception as exc:  # noqa: BLE001 - the offline weights package is optional
        pytest.skip(f"SmolLM2-135M not available: {exc}")
    records = prune_(model, "2:4")
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "report.json").write_text(json.dumps({"modules": records, "recipe_hash": "ab" * 32}))
    t0 = time.perf_counter()
    manifest = export_checkpoint(tmp_path / "ckpt", tmp_path / "onnx", task=WITH_PAST)
    seconds = time.perf_counter() - t0
    assert manifest["sparsity"]["pattern"] == "2:4" and len(manifest["modules"]) == 14
    report = validate_artifact(tmp_path / "onnx", tmp_path / "ckpt")
    assert report.ok, report.failures
    worst = max(r["max_abs"] for r in report.numerics)
    print(f"\nSmolLM2-135M 2 blocks: export {seconds:.1f} s, max |logit diff| ORT vs torch {worst:.3g}")
    assert worst < 1e-3
