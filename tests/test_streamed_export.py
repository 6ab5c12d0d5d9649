"""The streamed export (artifact/streamed.py) against optimum's in-memory export on tiny checkpoints.

Same inputs, outputs and logits, the same sparsity metadata, and `validate` passes on it; bad weights are
refused as in the in-memory path."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdsonnx.artifact.export import ExportError, export_checkpoint, stream_by_default
from sdsonnx.artifact.files import DATA_FILE, MODEL_FILE
from sdsonnx.artifact.streamed import ALIGN
from sdsonnx.artifact.validate import validate_artifact
from tiny_models import tiny_checkpoint


def _feeds(session: ort.InferenceSession, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for a prompt [1, T] with an empty KV cache."""
    feeds = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = tokens
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones_like(tokens)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(tokens.shape[1], dtype=np.int64)[None]
        else:  # past_key_values.*: [batch, heads, 0, head_dim]
            feeds[i.name] = np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32)
    return feeds


def _logits(folder, tokens):
    session = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    return session.run(["logits"], _feeds(session, tokens))[0]


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("opt", {})])
def test_streamed_export_equals_in_memory_export(tmp_path, arch, overrides):
    ck = tiny_checkpoint(arch, tmp_path / "ck", pattern="2:4", **overrides)
    a = export_checkpoint(ck, tmp_path / "mem", streamed=False)
    b = export_checkpoint(ck, tmp_path / "str", streamed=True)
    for key in ("inputs", "outputs", "sparsity", "task", "recipe_hash"):
        assert a[key] == b[key], key
    assert set(a["modules"]) == set(b["modules"]) and len(b["modules"]) >= 12
    for module, entry in b["modules"].items():
        assert entry["pattern"] == a["modules"][module]["pattern"] == "2:4"
        assert entry["sparsity"] == a["modules"][module]["sparsity"]
    assert b["external_data"] == [DATA_FILE]
    tokens = np.random.default_rng(0).integers(0, 128, (1, 9)).astype(np.int64)
    np.testing.assert_allclose(_logits(tmp_path / "str", tokens), _logits(tmp_path / "mem", tokens), rtol=0, atol=1e-5)
    proto = onnx.load(tmp_path / "str" / MODEL_FILE, load_external_data=False)
    assert [i.name for i in proto.graph.input] == a["inputs"]  # no parameter left as a graph input
    offsets = [int(e.value) for t in proto.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % ALIGN == 0 for o in offsets)
    report = validate_artifact(tmp_path / "str", ck)
    assert report.ok, report.to_json()


def test_streamed_export_refuses_a_weight_that_breaks_its_pattern(tmp_path):
    ck = tiny_checkpoint("llama", tmp_path / "ck", pattern="2:4")
    weights = load_file(ck / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name] = weights[name].clone()
    weights[name][0, :4] = 1.0  # one group of 4 fully dense
    save_file(weights, ck / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="model.layers.1.mlp.up_proj"):
        export_checkpoint(ck, tmp_path / "out", streamed=True)
    assert not (tmp_path / "out").exists()


def test_streamed_export_refuses_nan_weights(tmp_path):
    ck = tiny_checkpoint("llama", tmp_path / "ck", pattern=None)
    weights = load_file(ck / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, ck / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="model.norm.weight.*NaN"):
        export_checkpoint(ck, tmp_path / "out", streamed=True)


def test_streamed_export_needs_safetensors(tmp_path):
    ck = tiny_checkpoint("llama", tmp_path / "ck", pattern=None)
    (ck / "model.safetensors").unlink()
    torch.save({}, ck / "pytorch_model.bin")
    with pytest.raises(ExportError, match="safetensors"):
        export_checkpoint(ck, tmp_path / "out", streamed=True)


def test_tiny_checkpoints_export_in_memory_by_default(tmp_path):
    ck = tiny_checkpoint("llama", tmp_path / "ck", pattern=None)
    assert stream_by_default(ck) is False
    header = json.dumps({"w": {"dtype": "F16", "shape": [1 << 20, 1 << 16], "data_offsets": [0, 0]}}).encode()
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert stream_by_default(tmp_path / "big") is True  # 2^36 float32 values: 256 GiB, over any machine's quarter


def test_lean_validation_passes_and_checks_numerics_block_by_block(tmp_path):
    ck = tiny_checkpoint("llama", tmp_path / "ck", pattern="2:4")
    export_checkpoint(ck, tmp_path / "str", streamed=True)
    report = validate_artifact(tmp_path / "str", ck, lean=True)
    assert report.ok, report.to_json()
    assert len(report.weights) == 14 and all(w["matches_checkpoint"] for w in report.weights)
    [row] = report.numerics
    assert "lean" in row["case"] and row["positions"] == 16 and row["max_abs"] < 1e-4 and row["top1_agreement"] == 1.0


def test_lean_validation_catches_an_edited_weight_and_a_truncated_file(tmp_path):
    ck = tiny_checkpoint("llama", tmp_path / "ck", pattern="2:4")
    manifest = export_checkpoint(ck, tmp_path / "str", streamed=True)
    proto = onnx.load(tmp_path / "str" / MODEL_FILE, load_external_data=False)
    entry = manifest["modules"]["model.layers.0.mlp.down_proj"]
    tensor = next(t for t in proto.graph.initializer if t.name == entry["initializer"])
    offset = int(next(e.value for e in tensor.external_data if e.key == "offset"))
    data = tmp_path / "str" / DATA_FILE
    raw = bytearray(data.read_bytes())
    raw[offset:offset + 4] = np.float32(3.0).tobytes()  # a pruned or kept weight, now 3.0
    data.write_bytes(bytes(raw))
    report = validate_artifact(tmp_path / "str", ck, lean=True)
    assert not report.ok
    assert any(f.check == "weights" and "down_proj" in f.message for f in report.failures), report.to_json()
    data.write_bytes(bytes(raw[:offset]))
    report = validate_artifact(tmp_path / "str", ck, lean=True)
    assert [f.check for f in report.failures] == ["weights"] and "beyond" in report.failures[0].message


@pytest.mark.parametrize("arch,overrides", [("llama", {"tie_word_embeddings": True}), ("opt", {})])
def test_streamed_perplexity_equals_the_whole_model_perplexity(tmp_path, arch, overrides):
    from sdsonnx.evaluate import perplexity, streamed_perplexity
    from sdsonnx.models import load_model

    ck = tiny_checkpoint(arch, tmp_path / "ck", pattern="2:4", **overrides)
    windows = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(1))
    model, _ = load_model(str(ck))
    with torch.no_grad():
        whole = perplexity(model, windows, progress=False)
    assert streamed_perplexity(ck, windows) == pytest.approx(whole, rel=1e-6)


def test_eval_streamed_refuses_a_model_that_is_not_a_local_folder():
    from click.testing import CliRunner

    from sdsonnx.cli import main

    result = CliRunner().invoke(main, ["eval", "smollm2-135m", "--streamed", "--max-tokens", "64"])
    assert result.exit_code == 2 and "not a local folder" in result.output


def test_lean_validation_notes_numerics_it_could_not_run(tmp_path, monkeypatch):
    import onnxruntime

    ck = tiny_checkpoint("llama", tmp_path / "ck", pattern="2:4")
    export_checkpoint(ck, tmp_path / "str", streamed=True)

    def refuse(*args, **kwargs):
        raise MemoryError("not enough memory for the allocation")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    report = validate_artifact(tmp_path / "str", ck, lean=True)
    assert report.ok and not report.numerics and len(report.weights) == 14
    assert any(n.startswith("numerics skipped: ONNX Runtime could not load") for n in report.notes)


def test_a_mapped_session_reads_the_weights_through_read_only_maps_and_gives_the_same_logits(tmp_path):
    from sdsonnx.artifact.mapped import external_arrays, mapped_session

    ck = tiny_checkpoint("llama", tmp_path / "ck", pattern="2:4")
    export_checkpoint(ck, tmp_path / "str", streamed=True)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    session, weights = mapped_session(tmp_path / "str" / MODEL_FILE, options)
    proto = onnx.load(tmp_path / "str" / MODEL_FILE, load_external_data=False)
    external = {t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert set(weights) == external and len(external) >= 14
    assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in weights.values())
    tokens = np.random.default_rng(0).integers(0, 128, (1, 9)).astype(np.int64)
    mapped = session.run(["logits"], {**_feeds(ort.InferenceSession(str(tmp_path / "str" / MODEL_FILE)), tokens),
                                      **weights})[0]
    np.testing.assert_array_equal(mapped, _logits(tmp_path / "str", tokens))
    data = tmp_path / "str" / DATA_FILE
    data.write_bytes(data.read_bytes()[:-ALIGN])
    with pytest.raises(ValueError, match="beyond the end"):
        external_arrays(proto, tmp_path / "str")
