"""Readers of a checkpoint folder as `sdsonnx run` writes it: HF weights, report.json, recipe.resolved.yaml.

Export and validate both read checkpoints through these functions; neither imports the other.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch
from ..errors import InputError

REPORT_FILE = "report.json"
RECIPE_FILE = "recipe.resolved.yaml"
WEIGHTS_HASH_SCHEME = "sha256 over sorted safetensors tensors: name, dtype, shape, raw bytes"


class CheckpointError(InputError, ValueError):
    """A checkpoint folder whose report.json does not fit its weights (bad input: exit code 2)."""


def weights_digest(folder: Path) -> str:
    """sha256 of the checkpoint weights: safetensors tensors sorted by name (name, dtype, shape, bytes)."""
    files = sorted(folder.glob("*.safetensors"))
    digest = hashlib.sha256()
    if not files:
        for path in sorted(folder.glob("*.bin")):  # legacy pickle checkpoints: hash the files
            digest.update(path.name.encode() + path.read_bytes())
        return digest.hexdigest()
    tensors = []
    for path in files:
        with path.open("rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(size))
        tensors += [(name, info, path, 8 + size) for name, info in header.items() if name != "__metadata__"]
    for name, info, path, base in sorted(tensors, key=lambda t: t[0]):
        start, end = info["data_offsets"]
        with path.open("rb") as fh:
            fh.seek(base + start)
            data = fh.read(end - start)
        digest.update(f"{name}|{info['dtype']}|{info['shape']}|".encode() + data)
    return digest.hexdigest()


def read_checkpoint_extras(folder: Path) -> tuple[dict | None, dict | None]:
    """(report.json, resolved recipe as a dict) of a checkpoint written by `sdsonnx run`; None when absent."""
    import yaml

    report = json.loads((folder / REPORT_FILE).read_text()) if (folder / REPORT_FILE).is_file() else None
    recipe_file = folder / RECIPE_FILE
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else None
    return report, recipe


def recorded_request(report: dict | None, module: str) -> dict | None:
    """{sparsity, pattern} report.json recorded for a module (pattern = what the recipe asked), if any."""
    record = ((report or {}).get("modules") or {}).get(module)
    if record is None:
        return None
    return {k: record[k] for k in ("sparsity", "pattern") if k in record}


ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "ffn_dim",
             "num_attention_heads", "num_key_value_heads")


def read_config(folder: Path) -> dict | None:
    """folder/config.json as a dict; None when absent; CheckpointError naming the file when unreadable."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not valid JSON; re-save the folder") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object; re-save the folder")
    return config


def config_differences(a: dict, b: dict) -> list[str]:
    """'key a vs b' for every architecture key (ARCH_KEYS) both configs set to different values."""
    return [f"{k} {a[k]!r} vs {b[k]!r}" for k in ARCH_KEYS if k in a and k in b and a[k] != b[k]]


def load_checkpoint_model(folder: Path):
    """The checkpoint as an fp32 torch model in eval mode; its files checked first, its tensors after (finite).

    Only safetensors weights load and no code from the folder runs (models.check_hf_folder's rules)."""
    from transformers import AutoModelForCausalLM

    from ..models import check_finite, check_hf_folder

    check_hf_folder(Path(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False,
                                                 use_safetensors=True)
    check_finite(model, str(folder))
    return model.eval()


def pruned_weights(model, report: dict | None) -> dict[str, np.ndarray]:
    """{module: W [out, in] fp32} of the pruned Linears: report.json's modules, else every decoder-block Linear."""
    from ..blocks import target_linears

    linears = {name: mod for mods in target_linears(model).values() for name, mod in mods.items()}
    if report and report.get("modules"):
        unknown = sorted(set(report["modules"]) - set(linears))
        if unknown:
            raise CheckpointError(f"report.json names modules that are not decoder Linears of the model: {unknown[:5]}")
        linears = {name: linears[name] for name in report["modules"]}
    return {name: mod.weight.detach().float().cpu().numpy() for name, mod in linears.items()}


def lean_checkpoint(folder: Path) -> tuple[dict | None, "Mapping[str, np.ndarray]"]:
    """(report.json or None, {module: pruned W} read from the shards on each lookup) without loading the model:
    load_checkpoint for checkpoints too large to hold (safetensors only); CheckpointError on a bad report.json."""
    from ..blocks import target_linears
    from ..shards import ShardReader
    from .streamed import LazyWeights, weightless_model

    report, _ = read_checkpoint_extras(folder)
    linears = [name for mods in target_linears(weightless_model(folder)).values() for name in mods]
    modules = linears
    if report and report.get("modules"):
        unknown = sorted(set(report["modules"]) - set(linears))
        if unknown:
            raise CheckpointError(f"report.json names modules that are not decoder Linears of the model: {unknown[:5]}")
        modules = list(report["modules"])
    return report, LazyWeights(ShardReader(folder), modules)


def load_checkpoint(folder: Path) -> tuple[dict | None, object, dict[str, np.ndarray]]:
    """(report.json or None, fp32 model, {module: pruned W}) of a checkpoint; CheckpointError on a bad report.json."""
    report, _ = read_checkpoint_extras(folder)
    model = load_checkpoint_model(folder)
    return report, model, pruned_weights(model, report)
