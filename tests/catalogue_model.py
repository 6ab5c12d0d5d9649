"""Catalogue: model sources that must be refused with exit 2 naming the path or tensor, nothing written.

Every case runs `sdsonnx run` on a recipe whose model is a tiny local checkpoint (tests/tiny_models.py) spoiled
one way; all but the NaN case stop in preflight, before any weight loads.
"""
from __future__ import annotations

import json
from pathlib import Path

from catalogue import case

TEXT = " ".join(f"w{4 + i % 100}" for i in range(400)) + "\n"


def run_model(make_model, **recipe):
    """A case maker: make_model(tmp) -> model path; run a magnitude 50% recipe on it with output tmp/out."""
    def make(tmp: Path) -> list[str]:
        (tmp / "calibration.txt").write_text(TEXT)
        (tmp / "evaluation.txt").write_text(TEXT)
        extra = "".join(f"{k}: {json.dumps(v)}\n" for k, v in recipe.items())
        (tmp / "recipe.yaml").write_text(
            f"model: {json.dumps(str(make_model(tmp)))}\n"
            "calibration: {source: calibration.txt, segments: 2, length: 16}\n"
            "evaluation: {source: evaluation.txt, window: 16}\n"
            "stages:\n  - {kind: prune, method: magnitude, sparsity: 0.5}\n" + extra)
        return ["run", str(tmp / "recipe.yaml"), "--output", str(tmp / "out"), "--no-progress"]
    return make


def checkpoint(tmp: Path) -> Path:
    from tiny_models import tiny_checkpoint

    return tiny_checkpoint("llama", tmp / "ckpt", pattern=None, report=False)


def missing(tmp: Path) -> Path:
    return tmp / "no-such-model"


def bert(tmp: Path) -> Path:
    folder = tmp / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert",
                                                    "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 128}))
    return folder


def no_weights(tmp: Path) -> Path:
    folder = checkpoint(tmp)
    (folder / "model.safetensors").unlink()
    return folder


def truncated_safetensors(tmp: Path) -> Path:
    folder = checkpoint(tmp)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return folder


def corrupted_safetensors(tmp: Path) -> Path:
    folder = checkpoint(tmp)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff\x00garbage bytes, not JSON at all"[:32]
    path.write_bytes(bytes(data))
    return folder


def garbage_safetensors(tmp: Path) -> Path:
    folder = checkpoint(tmp)
    (folder / "model.safetensors").write_bytes(b"this is not a safetensors file\n" * 4)
    return folder


def pickle_only(tmp: Path) -> Path:
    folder = checkpoint(tmp)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    return folder


def tiny_gguf(path: Path) -> Path:
    """A small valid-looking GGUF (llama architecture, two f32 tensors) written with the `gguf` package."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((128, 64), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def truncated_gguf(tmp: Path) -> Path:
    path = tiny_gguf(tmp / "model.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    return path


def header_only_gguf(tmp: Path) -> Path:
    path = tiny_gguf(tmp / "model.gguf")
    path.write_bytes(path.read_bytes()[:40])
    return path


def fake_gguf(tmp: Path) -> Path:
    path = tmp / "model.gguf"
    path.write_text("not a gguf file\n")
    return path


def bad_value(tensor: str, index: tuple[int, int], value: float):
    """A model maker: the tiny checkpoint with tensor[index] = value (NaN or Inf)."""
    def make_model(tmp: Path) -> Path:
        from safetensors.torch import load_file, save_file

        folder = checkpoint(tmp)
        tensors = load_file(folder / "model.safetensors")
        tensors[tensor][index] = value
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    return make_model


def remote_code(tmp: Path) -> Path:
    folder = checkpoint(tmp)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


CASES = [
    case("model", "model-missing", "a missing model path", run_model(missing),
         r"{tmp}/no-such-model: no such file or folder", output="out"),
    case("model", "model-not-causal-lm", "a folder that is not a causal LM (BERT config.json)", run_model(bert),
         r"{tmp}/bert/config\.json.*bert.*not a causal language model", output="out"),
    case("model", "model-no-weights", "a folder with config.json but no weights", run_model(no_weights),
         r"{tmp}/ckpt has config\.json but no weights", output="out"),
    case("model", "safetensors-truncated", "a truncated safetensors file", run_model(truncated_safetensors),
         r"{tmp}/ckpt/model\.safetensors: .*truncated", output="out"),
    case("model", "safetensors-corrupted", "a corrupted safetensors header", run_model(corrupted_safetensors),
         r"{tmp}/ckpt/model\.safetensors: corrupted safetensors header", output="out"),
    case("model", "safetensors-garbage", "a safetensors file of garbage bytes", run_model(garbage_safetensors),
         r"{tmp}/ckpt/model\.safetensors: header length \d+ exceeds the file", output="out"),
    case("model", "gguf-truncated", "a truncated GGUF", run_model(truncated_gguf),
         r"{tmp}/model\.gguf: .*truncated", output="out"),
    case("model", "gguf-header-only", "a GGUF cut inside its header", run_model(header_only_gguf),
         r"{tmp}/model\.gguf: truncated or corrupted GGUF", output="out"),
    case("model", "gguf-fake", "a .gguf file that is not GGUF", run_model(fake_gguf),
         r"{tmp}/model\.gguf: not a GGUF file", output="out"),
    case("model", "weights-nan", "NaN in the weights",
         run_model(bad_value("model.layers.1.mlp.down_proj.weight", (3, 5), float("nan"))),
         r"tensor model\.layers\.1\.mlp\.down_proj\.weight has 1 NaN/Inf", output="out"),
    case("model", "weights-inf", "Inf in the weights",
         run_model(bad_value("model.layers.0.self_attn.k_proj.weight", (0, 0), float("inf"))),
         r"tensor model\.layers\.0\.self_attn\.k_proj\.weight has 1 NaN/Inf", output="out"),
    case("model", "pickle-refused", "pickle weights (pytorch_model.bin) without allow_pickle", run_model(pickle_only),
         r"{tmp}/ckpt: weights only as pickle \(pytorch_model\.bin\).*allow_pickle: true", output="out"),
    case("model", "remote-code-refused", "a model that needs its own code, trust_remote_code unset",
         run_model(remote_code), r"{tmp}/ckpt/config\.json: .*auto_map.*trust_remote_code: true", output="out"),
]
