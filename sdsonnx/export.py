"""`sdsonnx export`: checkpoint folder -> ONNX artifact folder with sparsity metadata and sdsonnx.json.

The graph comes from optimum-onnx's exporter (`main_export`); this module adds the `sdsonnx.*` metadata to
the model (onnx_meta) and writes the manifest `sdsonnx.json`. docs/ARTIFACTS.md documents the layout.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import platform
import struct
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import torch

from . import __version__
from .masks import nm_violations
from .onnx_meta import FORMAT_VERSION, InitializerSparsity, SparsityMetadata, global_sparsity, to_props, write_metadata
from .onnx_weights import array_sha256, consumers, load_initializers, map_weights

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
MANIFEST = "sdsonnx.json"
TASKS = ("text-generation", "text-generation-with-past")
STANDARD_NM = ((1, 4), (2, 8), (2, 4), (4, 8))  # tightest first: 1:4 implies 2:8, 2:4 implies 4:8
WEIGHTS_HASH_SCHEME = "sha256 over sorted safetensors tensors: name, dtype, shape, raw bytes"
PACKAGES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "numpy", "safetensors")
TWO_GB = 2**31


class ExportError(ValueError):
    """A checkpoint that cannot be exported (bad input): exit code 2."""


def satisfied_patterns(stored: np.ndarray, axis: int) -> list[str]:
    """The standard n:m patterns (tightest first) that every group of m inputs along `axis` satisfies."""
    t = torch.from_numpy(np.require(stored, requirements=["C", "W"]))
    if not bool((t == 0).any()):
        return []
    return [f"{n}:{m}" for n, m in STANDARD_NM
            if stored.shape[axis] % m == 0 and len(nm_violations(t, n, m, axis=axis)) == 0]


def pattern_name(stored: np.ndarray, axis: int) -> str:
    """'dense' (no zero), the tightest standard 'n:m' satisfied along `axis`, else 'unstructured'."""
    if not bool((stored == 0).any()):
        return "dense"
    found = satisfied_patterns(stored, axis)
    return found[0] if found else "unstructured"


def global_pattern(per_weight: list[list[str] | None]) -> str:
    """Combine per-weight satisfied-pattern lists (None = dense): the tightest n:m all satisfy, else unstructured."""
    if all(p is None for p in per_weight):
        return "dense"
    common = [f"{n}:{m}" for n, m in STANDARD_NM if all(p is not None and f"{n}:{m}" in p for p in per_weight)]
    return common[0] if common else "unstructured"


def describe_initializer(module: str, stored: np.ndarray, axis: int) -> tuple[InitializerSparsity, list[str] | None]:
    """Metadata entry of one stored weight and its satisfied patterns (None when it has no zero)."""
    zeros = int(np.count_nonzero(stored == 0))
    satisfied = satisfied_patterns(stored, axis) if zeros else None
    pattern = "dense" if satisfied is None else (satisfied[0] if satisfied else "unstructured")
    entry = InitializerSparsity(module=module, shape=list(stored.shape), axis=axis, zeros=zeros, numel=int(stored.size),
                                sparsity=zeros / stored.size if stored.size else 0.0, pattern=pattern,
                                sha256=array_sha256(stored))
    return entry, satisfied


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

    report = json.loads((folder / "report.json").read_text()) if (folder / "report.json").is_file() else None
    recipe_file = folder / "recipe.resolved.yaml"
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else None
    return report, recipe


def load_checkpoint_model(folder: Path):
    """The checkpoint as an fp32 torch model in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def pruned_weights(model, report: dict | None) -> dict[str, np.ndarray]:
    """{module: W [out, in] fp32} of the pruned Linears: report.json's modules, else every decoder-block Linear."""
    from .blocks import target_linears

    linears = {name: mod for mods in target_linears(model).values() for name, mod in mods.items()}
    if report and report.get("modules"):
        unknown = sorted(set(report["modules"]) - set(linears))
        if unknown:
            raise ExportError(f"report.json names modules that are not decoder Linears of the model: {unknown[:5]}")
        linears = {name: linears[name] for name in report["modules"]}
    return {name: mod.weight.detach().float().cpu().numpy() for name, mod in linears.items()}


def package_versions() -> dict[str, str]:
    """Versions of sdsonnx, Python and the libraries that shape the artifact."""
    versions = {"sdsonnx": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _run_optimum(checkpoint: Path, out: Path, task: str, opset: int | None) -> None:
    from optimum.exporters.onnx import main_export

    main_export(str(checkpoint), output=out, task=task, opset=opset, device="cpu", do_validation=False,
                library_name="transformers", local_files_only=True)
    if not (out / MODEL_FILE).is_file():
        raise RuntimeError(f"optimum wrote no {MODEL_FILE} into {out}: {sorted(p.name for p in out.iterdir())}")


def _save(model: onnx.ModelProto, out: Path, external_data: bool | None) -> list[str]:
    """Write model.onnx (metadata added); convert to external data when asked. Returns the external data files."""
    is_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if external_data and not is_external:
        onnx.load_external_data_for_model(model, str(out))
        onnx.save_model(model, out / MODEL_FILE, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(model, out / MODEL_FILE)
    files = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return sorted(files)


def export_checkpoint(checkpoint: str | Path, out: str | Path, task: str = "text-generation-with-past",
                      opset: int | None = None, external_data: bool | None = None) -> dict:
    """Export `checkpoint` (HF folder) into `out`: model.onnx with sdsonnx.* metadata, tokenizer, sdsonnx.json.

    external_data: None lets the exporter decide (external above 2 GB), True forces model.onnx_data.
    Returns the manifest written to out/sdsonnx.json.
    """
    checkpoint, out = Path(checkpoint).resolve(), Path(out)
    if task not in TASKS:
        raise ExportError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if not (checkpoint / "config.json").is_file():
        raise ExportError(f"{checkpoint} has no config.json: not a Hugging Face checkpoint folder")
    out.mkdir(parents=True, exist_ok=True)
    for stale in (MODEL_FILE, DATA_FILE, MANIFEST, "validation.json"):
        (out / stale).unlink(missing_ok=True)
    report, recipe = read_checkpoint_extras(checkpoint)
    t0 = time.perf_counter()
    model = load_checkpoint_model(checkpoint)
    weights = pruned_weights(model, report)
    architecture = (model.config.architectures or [type(model).__name__])[0]
    model_type = model.config.model_type
    del model
    log.info("exporting %s (%s) with optimum, task %s", checkpoint, architecture, task)
    _run_optimum(checkpoint, out, task, opset)
    proto = onnx.load(out / MODEL_FILE, load_external_data=False)
    arrays = load_initializers(proto, out)
    found, missing = map_weights(weights, arrays, consumers(proto))
    inexact = [m for m, w in found.items() if not w.exact]
    if missing or inexact:
        raise RuntimeError(f"exported weights not found in the ONNX graph: {(missing + inexact)[:5]}")
    entries, satisfied, modules = {}, [], {}
    for module, link in found.items():
        entry, sat = describe_initializer(module, arrays[link.initializer], link.axis)
        entries[link.initializer] = entry
        satisfied.append(sat)
        modules[module] = {"initializer": link.initializer, "axis": link.axis, "consumer": link.consumer,
                           "stored_shape": entry.shape, "sparsity": entry.sparsity, "pattern": entry.pattern,
                           "recorded": _recorded(report, module)}
    recipe_hash = (report or {}).get("recipe_hash") or ""
    source_hash = weights_digest(checkpoint)
    meta = SparsityMetadata(FORMAT_VERSION, global_sparsity(entries), global_pattern(satisfied), entries,
                            recipe_hash, source_hash, __version__)
    write_metadata(proto, to_props(meta))
    size = sum(a.nbytes for a in arrays.values())
    data_files = _save(proto, out, True if size >= TWO_GB else external_data)
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "external_data": data_files,
        "task": task,
        "with_past": task.endswith("with-past"),
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "ir_version": proto.ir_version,
        "inputs": [i.name for i in proto.graph.input],
        "outputs": [o.name for o in proto.graph.output],
        "source": {"checkpoint": str(checkpoint), "model": (report or {}).get("model") or str(checkpoint),
                   "architecture": architecture, "model_type": model_type,
                   "weights_sha256": source_hash, "weights_hash_scheme": WEIGHTS_HASH_SCHEME},
        "recipe": recipe,
        "recipe_hash": recipe_hash or None,
        "sparsity": {"global": meta.sparsity, "pattern": meta.pattern,
                     "zeros": sum(e.zeros for e in entries.values()), "numel": sum(e.numel for e in entries.values())},
        "modules": modules,
        "perplexity": (report or {}).get("perplexity"),
        "versions": package_versions(),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "export_seconds": round(time.perf_counter() - t0, 3),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log.info("wrote %s: %d pruned weights, global sparsity %.4f, pattern %s", out, len(entries), meta.sparsity,
             meta.pattern)
    return manifest


def _recorded(report: dict | None, module: str) -> dict | None:
    """The sparsity and pattern report.json recorded for a module, if any."""
    record = ((report or {}).get("modules") or {}).get(module)
    if record is None:
        return None
    return {k: record[k] for k in ("sparsity", "pattern") if k in record}

