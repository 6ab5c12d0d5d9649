"""`sdsonnx export`: checkpoint folder -> ONNX artifact folder with sparsity metadata and sdsonnx.json.

The graph comes from optimum-onnx's exporter (`main_export`); this module adds the `sdsonnx.*` metadata to
the model (metadata.py) and writes the manifest `sdsonnx.json`. Before running the exporter it checks every
pruned weight against the n:m pattern report.json says the recipe asked for (ExportError on the first that
breaks it). docs/ARTIFACTS.md documents the layout.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx

from .. import __version__
from ..masks import request_violation
from .checkpoint import (WEIGHTS_HASH_SCHEME, CheckpointError, load_checkpoint_model, pruned_weights,
                         read_checkpoint_extras, recorded_request, weights_digest)
from .files import DATA_FILE, MANIFEST, MODEL_FILE
from .initializers import consumers, input_axis, load_initializers, map_weights
from .metadata import (FORMAT_VERSION, SparsityMetadata, describe_initializer, global_pattern, global_sparsity,
                       to_props, write_metadata)
from ..errors import InputError

log = logging.getLogger(__name__)

TASKS = ("text-generation", "text-generation-with-past")
PACKAGES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "numpy", "safetensors")
TWO_GB = 2**31


class ExportError(InputError, ValueError):
    """A checkpoint that cannot be exported (bad input): exit code 2."""


def check_requests(weights: dict[str, np.ndarray], report: dict | None) -> None:
    """Raise ExportError naming the first weight W [out, in] that breaks the n:m pattern report.json requested."""
    for module, w in weights.items():
        requested = (recorded_request(report, module) or {}).get("pattern")
        try:
            problem = request_violation(w, 1, requested)
        except ValueError as exc:  # a malformed n:m such as "4:2"
            raise ExportError(f"{module}: report.json records the pattern {requested!r}: {exc}") from None
        if problem:
            raise ExportError(f"{module}: report.json requests pattern {requested} but its checkpoint weight "
                              f"does not satisfy it: {problem}")


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
                      opset: int | None = None, external_data: bool | None = None, force: bool = False,
                      quantize: str | None = None, calibration=None, streamed: bool | None = None) -> dict:
    """Export `checkpoint` (HF folder) into `out`: model.onnx with sdsonnx.* metadata, tokenizer, sdsonnx.json.

    quantize: a scheme of artifact/quantize.py (int8-nbits, alias int8; int8-dynamic; int8-static, which needs
    `calibration` token ids [n, L]; int4-nbits): the fp32 export goes to a temporary folder and is quantized into
    `out` (ExportError when a pruned zero or an n:m group does not survive).

    external_data: None lets the exporter decide (external above 2 GB), True forces model.onnx_data.
    streamed: see write_export (None: streamed for checkpoints too large to load comfortably).
    `out` is built in a hidden work area and renamed into place when complete (sdsonnx/outputs.py); an existing
    `out` is an OutputExistsError unless `force`. Returns the manifest written to out/sdsonnx.json.
    """
    from ..outputs import atomic_output

    checkpoint = Path(checkpoint).resolve()
    check_export_request(checkpoint, task)
    if quantize is not None:
        from .quantize import resolve_scheme

        resolve_scheme(quantize)  # an unknown scheme fails before anything is exported
    with atomic_output(out, force) as work:
        if quantize is None:
            return write_export(checkpoint, work, task, opset, external_data, streamed=streamed)
        import tempfile

        from .quantize import quantize_artifact

        with tempfile.TemporaryDirectory(prefix="sdsonnx-fp32-") as tmp:
            write_export(checkpoint, Path(tmp), task, opset, external_data, streamed=streamed)
            return quantize_artifact(tmp, work, quantize, calibration)


def check_export_request(checkpoint: Path, task: str) -> None:
    """ExportError for an unknown task or a folder that is not a Hugging Face checkpoint."""
    if task not in TASKS:
        raise ExportError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if not (checkpoint / "config.json").is_file():
        raise ExportError(f"{checkpoint} has no config.json: not a Hugging Face checkpoint folder")


def stream_by_default(checkpoint: Path) -> bool:
    """True for safetensors checkpoints too large to load comfortably (shards.too_large_to_load)."""
    from ..shards import too_large_to_load

    return too_large_to_load(checkpoint)


def write_export(checkpoint: Path, out: Path, task: str = "text-generation-with-past", opset: int | None = None,
                 external_data: bool | None = None, recorded_checkpoint: Path | None = None,
                 streamed: bool | None = None) -> dict:
    """Export into the empty (work) folder `out`, in place; `recorded_checkpoint` is the checkpoint path the
    manifest records (default `checkpoint`; a run exporting from its own work area records its final output).

    streamed: True writes the weights tensor by tensor from the shards (write_streamed_export: a model that does
    not fit in memory), False loads the model for optimum; None picks streamed for large safetensors checkpoints
    (stream_by_default)."""
    check_export_request(checkpoint, task)
    if streamed is None:
        streamed = stream_by_default(checkpoint)
    if streamed:
        return write_streamed_export(checkpoint, out, task, opset, recorded_checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    report, recipe = read_checkpoint_extras(checkpoint)
    t0 = time.perf_counter()
    model = load_checkpoint_model(checkpoint)
    try:
        weights = pruned_weights(model, report)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    check_requests(weights, report)
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
    described = {}
    for module, link in found.items():
        entry, sat = describe_initializer(module, arrays[link.initializer], link.axis)
        described[module] = (link.initializer, link.axis, link.consumer, entry, sat)
    size = sum(a.nbytes for a in arrays.values())
    del arrays
    return _finish_export(proto, out, checkpoint, report, recipe, task, described, architecture, model_type,
                          True if size >= TWO_GB else external_data, recorded_checkpoint, t0)


def write_streamed_export(checkpoint: Path, out: Path, task: str = "text-generation-with-past",
                          opset: int | None = None, recorded_checkpoint: Path | None = None) -> dict:
    """write_export without loading the model: optimum's graph traced with placeholder weights, then every weight
    read from the safetensors shards, checked and written to model.onnx_data one tensor at a time
    (artifact/streamed.py). Same folder layout, metadata and manifest; the weights are always external data."""
    from ..blocks import target_linears
    from ..shards import ShardReader
    from .streamed import attach_weights, trace_graph, weightless_model

    check_export_request(checkpoint, task)
    if not any(checkpoint.glob("*.safetensors")):
        raise ExportError(f"{checkpoint}: the streamed export reads safetensors weights and the folder has none")
    out.mkdir(parents=True, exist_ok=True)
    report, recipe = read_checkpoint_extras(checkpoint)
    t0 = time.perf_counter()
    skeleton = weightless_model(checkpoint)
    linears = [name for mods in target_linears(skeleton).values() for name in mods]
    architecture = (skeleton.config.architectures or [type(skeleton).__name__])[0]
    model_type = skeleton.config.model_type
    del skeleton
    pruned = list((report or {}).get("modules") or linears)
    unknown = sorted(set(pruned) - set(linears))
    if unknown:
        raise ExportError(f"report.json names modules that are not decoder Linears of the model: {unknown[:5]}")
    log.info("exporting %s (%s) streamed from its shards, task %s", checkpoint, architecture, task)
    proto = trace_graph(checkpoint, out, task, opset)
    seen: dict[str, tuple] = {}

    def visit(name: str, stored: np.ndarray, axis: int) -> None:
        if not np.isfinite(stored).all():
            raise ExportError(f"{checkpoint}: tensor {name} has NaN/Inf values; re-save the checkpoint")
        module = name.removesuffix(".weight")
        if module in pruned and name.endswith(".weight"):
            check_requests({module: stored.T if axis == 0 else stored}, report)
            seen[module] = describe_initializer(module, stored, axis)

    written = attach_weights(proto, out, ShardReader(checkpoint), visit)
    missing = [m for m in pruned if m not in seen]
    if missing:
        raise RuntimeError(f"pruned weights not found among the graph's parameters: {missing[:5]}")
    uses = consumers(proto)
    described = {}
    for module in pruned:
        initializer, axis = written[module + ".weight"]
        found_axis, consumer = input_axis(initializer, uses)
        if found_axis != axis:
            raise RuntimeError(f"{module}: written along axis {axis} but consumed along {found_axis} ({consumer})")
        described[module] = (initializer, axis, consumer, *seen[module])
    return _finish_export(proto, out, checkpoint, report, recipe, task, described, architecture, model_type, True,
                          recorded_checkpoint, t0)


def _finish_export(proto: onnx.ModelProto, out: Path, checkpoint: Path, report: dict | None, recipe: dict | None,
                   task: str, described: dict, architecture: str, model_type: str, external_data: bool | None,
                   recorded_checkpoint: Path | None, t0: float) -> dict:
    """Metadata into the graph, model.onnx written, sdsonnx.json written; returns the manifest.

    described: {module: (initializer, axis, consumer, InitializerSparsity, satisfied patterns)}."""
    entries = {init: entry for init, _, _, entry, _ in described.values()}
    satisfied = [sat for *_, sat in described.values()]
    modules = {module: {"initializer": init, "axis": axis, "consumer": consumer, "stored_shape": entry.shape,
                        "sparsity": entry.sparsity, "pattern": entry.pattern,
                        "recorded": recorded_request(report, module)}
               for module, (init, axis, consumer, entry, _) in described.items()}
    recipe_hash = (report or {}).get("recipe_hash") or ""
    source_hash = weights_digest(checkpoint)
    meta = SparsityMetadata(FORMAT_VERSION, global_sparsity(entries), global_pattern(satisfied), entries,
                            recipe_hash, source_hash, __version__)
    write_metadata(proto, to_props(meta))
    data_files = _save(proto, out, external_data)
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
        "source": {"checkpoint": str(recorded_checkpoint or checkpoint),
                   "model": (report or {}).get("model") or str(recorded_checkpoint or checkpoint),
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
