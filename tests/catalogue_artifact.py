"""Catalogue: export and validate inputs that must be refused with exit 2 naming the file, key or checkpoint.

Exports here are hand-built tiny ONNX graphs (`tiny_onnx`: Gather embedding -> MatMul head, no exporter run), so
every case takes well under a second; the checkpoints come from tests/tiny_models.py.
"""
from __future__ import annotations

import json
from pathlib import Path

from catalogue import case

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}


def tiny_onnx(folder: Path, vocab: int = 128, hidden: int = 64, props: dict | None = None,
              external: bool = False, config: dict | None = None) -> Path:
    """folder/model.onnx: logits = Embedding[input_ids] @ W (random, seed 0) + config.json; returns the folder."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "embed.weight")
    head = numpy_helper.from_array(rng.standard_normal((hidden, vocab)).astype(np.float32), "lm_head.weight")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed.weight", "input_ids"], ["hidden"]),
         helper.make_node("MatMul", ["hidden", "lm_head.weight"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        [emb, head])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for key, value in (props or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, folder / "model.onnx", save_as_external_data=external, location="model.onnx_data",
                    size_threshold=0)
    (folder / "config.json").write_text(json.dumps({**LLAMA, "vocab_size": vocab, "hidden_size": hidden,
                                                    **(config or {})}))
    return folder


def validate_args(make_export, checkpoint=None):
    """A case maker: make_export(tmp) -> export folder; `sdsonnx validate` it (with checkpoint(tmp) when given)."""
    def make(tmp: Path) -> list[str]:
        args = ["validate", str(make_export(tmp))]
        return args + (["--checkpoint", str(checkpoint(tmp))] if checkpoint else [])
    return make


def not_onnx(tmp: Path) -> Path:
    folder = tmp / "export"
    folder.mkdir()
    (folder / "model.onnx").write_text("this is not an ONNX model\n")
    return folder


def no_model_file(tmp: Path) -> Path:
    folder = tmp / "export"
    folder.mkdir()
    return folder


def no_metadata(tmp: Path) -> Path:
    return tiny_onnx(tmp / "export")


def missing_external_data(tmp: Path) -> Path:
    folder = tiny_onnx(tmp / "export", external=True)
    (folder / "model.onnx_data").unlink()
    return folder


def other_model_checkpoint(tmp: Path) -> Path:
    from tiny_models import tiny_checkpoint

    return tiny_checkpoint("llama", tmp / "other", pattern="2:4", hidden_size=32)


def export_args(make_checkpoint):
    """A case maker: `sdsonnx export` make_checkpoint(tmp) into tmp/out."""
    def make(tmp: Path) -> list[str]:
        return ["export", str(make_checkpoint(tmp)), str(tmp / "out")]
    return make


def empty_folder(tmp: Path) -> Path:
    (tmp / "ckpt").mkdir()
    return tmp / "ckpt"


def bert_folder(tmp: Path) -> Path:
    folder = empty_folder(tmp)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    return folder


def weightless_checkpoint(tmp: Path) -> Path:
    from tiny_models import tiny_checkpoint

    folder = tiny_checkpoint("llama", tmp / "ckpt", pattern="2:4")
    (folder / "model.safetensors").unlink()
    return folder


CASES = [
    case("artifact", "validate-not-onnx", "validate: a model.onnx that is not ONNX", validate_args(not_onnx),
         r"{tmp}/export/model\.onnx is not an ONNX model", output="export/validation.json"),
    case("artifact", "validate-no-model", "validate: a folder without model.onnx", validate_args(no_model_file),
         r"{tmp}/export has no model\.onnx", output="export/validation.json"),
    case("artifact", "validate-no-metadata", "validate: an ONNX without sdsonnx metadata", validate_args(no_metadata),
         r"model\.onnx has no sdsonnx\.\* metadata"),
    case("artifact", "validate-missing-external-data", "validate: a missing external-data file",
         validate_args(missing_external_data),
         r"{tmp}/export/model\.onnx keeps initializer \S+ in the external-data file 'model\.onnx_data', which is "
         r"missing", output="export/validation.json"),
    case("artifact", "validate-other-checkpoint", "validate: --checkpoint of another model",
         validate_args(no_metadata, other_model_checkpoint),
         r"checkpoint {tmp}/other is another model than the export {tmp}/export \(config\.json hidden_size 64 vs 32\)",
         output="export/validation.json"),
    case("artifact", "export-not-checkpoint", "export: a folder without config.json", export_args(empty_folder),
         r"{tmp}/ckpt has no config\.json", output="out"),
    case("artifact", "export-not-causal-lm", "export: a folder whose config.json is not a causal LM",
         export_args(bert_folder), r"{tmp}/ckpt/config\.json: .*not a causal language model", output="out"),
    case("artifact", "export-no-weights", "export: a checkpoint folder without weights",
         export_args(weightless_checkpoint), r"{tmp}/ckpt has config\.json but no weights", output="out"),
]
