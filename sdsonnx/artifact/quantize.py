"""Quantize an fp32 export folder with ONNX Runtime's quantization tooling, keeping every pruned zero.

Schemes (docs/ARTIFACTS.md, "Quantized artifacts"; measurements in /tmp/q15 FINDINGS, issue 15):
  int8-nbits    MatMulNBits 8-bit, block 32, symmetric, accuracy_level 4 (activations quantized per block of 32):
                every weight MatMul incl. the LM head. SmolLM2-135M: +0.3% to +1.6% perplexity. `--quantize int8`.
  int8-dynamic  QOperator MatMulInteger, per-channel symmetric int8 weights, activations per tensor at run time;
                down_proj and the LM head stay fp32 (all quantized: +63% perplexity; so: +4.4%).
  int8-static   QDQ, per-channel symmetric int8 weights, uint8 activations calibrated per tensor on token segments;
                down_proj stays fp32 (all quantized: +295%; so: +9.3%).
  int4-nbits    MatMulNBits 4-bit, block 32, symmetric, accuracy_level 4, every weight MatMul: +21-29% perplexity.
Symmetric quantization stores every pruned weight at the zero point (0 for int8, 128 / 8 for MatMulNBits), which
dequantizes to exactly 0; `quantize_artifact` reads every quantized weight back and raises ExportError when a
pruned weight or an n:m group did not survive. A tied LM head (optimum exports it as Transpose(embed_tokens)) is
materialised as its own initializer `lm_head.weight_T` when the scheme quantizes the head; the embedding stays fp32.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .export import ExportError, package_versions
from .files import DATA_FILE, MANIFEST, MODEL_FILE, VALIDATION_FILE
from .metadata import (FORMAT_VERSION, InitializerSparsity, SparsityMetadata, describe_initializer, global_pattern,
                       global_sparsity, parse_props, read_props, to_props, write_metadata)
from .quantized import ALIASES, SCHEMES, IntWeight, describe, int_weights, nm_problem, zero_problems

log = logging.getLogger(__name__)

BLOCK_SIZE = 32
HEAD_WEIGHT = "lm_head.weight_T"
# Weight MatMuls left in fp32 by default, by the last part of the module name (research: activation outliers of the
# SwiGLU product make per-tensor activation quantization of down_proj cost most of the loss).
KEEP_FP32 = {"int8-nbits": (), "int4-nbits": (), "int8-dynamic": ("down_proj", "lm_head"), "int8-static": ("down_proj",)}


def resolve_scheme(scheme: str) -> str:
    """The scheme name an alias stands for ('int8' -> 'int8-nbits'); ExportError for an unknown one."""
    scheme = ALIASES.get(scheme, scheme)
    if scheme not in SCHEMES:
        raise ExportError(f"unknown quantization scheme {scheme!r}: one of {', '.join(SCHEMES + tuple(ALIASES))}")
    return scheme


def untie_head(model: onnx.ModelProto) -> bool:
    """Replace a Transpose(initializer) feeding a MatMul (tied LM head) by an initializer holding the transposed values."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in list(model.graph.node):
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        users = [n for n in model.graph.node if node.output[0] in n.input]
        if not users or any(n.op_type != "MatMul" or n.input[1] != node.output[0] for n in users):
            continue
        w = numpy_helper.to_array(inits[node.input[0]])
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), HEAD_WEIGHT))
        for n in users:
            n.input[1] = HEAD_WEIGHT
        model.graph.node.remove(node)
        return True
    return False


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of MatMul nodes whose B input is a 2-D float initializer."""
    inits = {i.name: i for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT]


class _Calibration:
    """CalibrationDataReader over token segments [n, L]: one batch-1 feed per segment, zero-length past."""

    def __init__(self, model: onnx.ModelProto, ids: np.ndarray):
        names = {i.name: i for i in model.graph.input}
        self.feeds = []
        for row in np.asarray(ids, dtype=np.int64):
            feed = {"input_ids": row[None], "attention_mask": np.ones((1, row.size), np.int64)}
            if "position_ids" in names:
                feed["position_ids"] = np.arange(row.size, dtype=np.int64)[None]
            for name, value in names.items():
                if name.startswith("past_key_values"):
                    dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
                    feed[name] = np.zeros((1, dims[1], 0, dims[3]), np.float32)
            self.feeds.append(feed)
        self.rewind()

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)


def _run_quantizer(model: onnx.ModelProto, path: Path, scheme: str, nodes: list[str], excluded: list[str],
                   calibration, external: bool) -> None:
    """Write the quantized model to `path` with ONNX Runtime's quantizer for `scheme`."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if scheme.endswith("nbits"):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        # nodes_to_include does not restrict (it is OR-ed with the op type): exclusions are the only selector
        quantizer = MatMulNBitsQuantizer(model, bits=8 if scheme.startswith("int8") else 4, block_size=BLOCK_SIZE,
                                         is_symmetric=True, accuracy_level=4, nodes_to_exclude=excluded,
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
        quantizer.model.save_model_to_file(str(path), use_external_data_format=external)
    elif scheme == "int8-dynamic":
        quantize_dynamic(model, path, op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes, per_channel=True,
                         weight_type=QuantType.QInt8, use_external_data_format=external,
                         extra_options={"WeightSymmetric": True, "MatMulConstBOnly": True})
    else:
        if calibration is None:
            raise ExportError("int8-static needs calibration token segments (export --data)")
        quantize_static(model, path, _Calibration(model, calibration), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        use_external_data_format=external,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                                       "MatMulConstBOnly": True})


def verify_zeros(weights: dict[str, IntWeight], fp32: dict[str, np.ndarray], modules: dict, scheme: str) -> None:
    """ExportError unless every pruned weight of every quantized module kept its zeros and n:m groups.

    weights: the quantized artifact's IntWeights; fp32: {fp32 initializer: stored array}; modules: the fp32
    manifest's `modules` ({module: {initializer, pattern, recorded}}).
    """
    by_source = {w.source: w for w in weights.values()}
    for module, entry in modules.items():
        w = by_source.get(entry["initializer"])
        if w is None:
            continue  # left in fp32: unchanged
        ref = fp32[entry["initializer"]]
        ref = ref.T if w.axis == 1 else ref  # fp32 is stored [K, N]; MatMulNBits [N, K]
        problems = zero_problems(w, ref, symmetric_int8=w.op != "MatMulNBits")
        for pattern in {entry.get("pattern"), (entry.get("recorded") or {}).get("pattern")}:
            problem = nm_problem(w, pattern)
            if problem:
                problems.append(problem)
        if problems:
            raise ExportError(f"{scheme} quantization did not keep the zeros of {module} ({w.initializer}): "
                              + "; ".join(problems))


def quantize_artifact(folder_fp32: str | Path, out: str | Path, scheme: str, calibration=None) -> dict:
    """Quantize the fp32 export `folder_fp32` into the (empty or new) folder `out`; returns the new manifest.

    scheme: int8-nbits (alias int8), int8-dynamic, int8-static, int4-nbits. calibration: token ids [n, L]
    (int8-static only). Raises ExportError when a pruned zero or an n:m group does not survive.
    """
    scheme = resolve_scheme(scheme)
    src, out = Path(folder_fp32), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    manifest = json.loads((src / MANIFEST).read_text())
    model = onnx.load(src / MODEL_FILE)  # external data loaded
    fp32_meta, problems = parse_props(read_props(model))
    if fp32_meta is None:
        raise ExportError(f"{src}/{MODEL_FILE} has no usable sdsonnx metadata: {problems}")
    keep = KEEP_FP32[scheme]
    untied = "lm_head" not in keep and untie_head(model)
    fp32 = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if len(i.dims) == 2}
    nodes = weight_matmuls(model)
    excluded = [n for n in nodes if any(f"/{k}/" in n for k in keep)]
    chosen = [n for n in nodes if n not in excluded]
    external = bool(manifest.get("external_data"))
    log.info("quantizing %s (%s): %d weight MatMuls, %d kept fp32", src, scheme, len(chosen), len(excluded))
    for f in src.iterdir():
        if f.is_file() and f.name not in (MODEL_FILE, DATA_FILE, MANIFEST, VALIDATION_FILE):
            shutil.copy2(f, out / f.name)
    _run_quantizer(model, out / MODEL_FILE, scheme, chosen, excluded, calibration, external)
    del model
    proto = onnx.load(out / MODEL_FILE, load_external_data=False)
    weights = int_weights(proto, out)
    verify_zeros(weights, fp32, manifest["modules"], scheme)
    manifest, meta = _describe(manifest, fp32_meta, weights, fp32, scheme, chosen, excluded, untied)
    write_metadata(proto, to_props(meta))
    if external:
        onnx.load_external_data_for_model(proto, str(out))
        (out / DATA_FILE).unlink(missing_ok=True)
        onnx.save_model(proto, out / MODEL_FILE, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(proto, out / MODEL_FILE)
    for stray in out.iterdir():  # quantizer intermediates (e.g. augmented calibration models)
        if stray.suffix in (".onnx", ".onnx_data", ".data") and stray.name not in (MODEL_FILE, DATA_FILE):
            stray.unlink()
    manifest["external_data"] = [DATA_FILE] if external else []
    manifest["versions"] = package_versions() | {"onnx-ir": _version("onnx-ir")}
    manifest["quantization"]["seconds"] = round(time.perf_counter() - t0, 3)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log.info("wrote %s (%s): global sparsity %.4f at the zero point, pattern %s", out, scheme, meta.sparsity,
             meta.pattern)
    return manifest


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _describe(manifest: dict, fp32_meta: SparsityMetadata, weights: dict[str, IntWeight],
              fp32: dict[str, np.ndarray], scheme: str, chosen: list[str], excluded: list[str],
              untied: bool) -> tuple[dict, SparsityMetadata]:
    """The quantized artifact's manifest and version-2 metadata (entries keyed by the integer initializers)."""
    by_source = {w.source: w for w in weights.values()}
    fp32_entries = fp32_meta.initializers
    entries, satisfied, modules = {}, [], {}
    fp32_zeros = 0
    for module, m in manifest["modules"].items():
        w = by_source.get(m["initializer"])
        fp32_zeros += fp32_entries[m["initializer"]].zeros if m["initializer"] in fp32_entries else 0
        if w is None:
            entry, sat = describe_initializer(module, fp32[m["initializer"]], m["axis"])
            name, consumer, zp = m["initializer"], m["consumer"], 0
        else:
            body, sat = describe(w, scheme)
            entry = InitializerSparsity(**body)
            name, consumer, zp = w.initializer, w.op, entry.zero_point
        entries[name] = entry
        satisfied.append(sat)
        modules[module] = {**m, "initializer": name, "axis": entry.axis, "consumer": consumer,
                           "stored_shape": entry.shape, "sparsity": entry.sparsity, "pattern": entry.pattern,
                           "scheme": entry.scheme, "zero_point": zp, "source_initializer": m["initializer"]}
    quantized = {w.initializer: {"module": w.module, "source": w.source, "op": w.op, "shape": list(w.q.shape),
                                 "axis": w.axis, "zero_point": w.zero_point()} for w in weights.values()}
    options = {"int8-nbits": {"bits": 8, "block_size": BLOCK_SIZE, "symmetric": True, "accuracy_level": 4},
               "int4-nbits": {"bits": 4, "block_size": BLOCK_SIZE, "symmetric": True, "accuracy_level": 4},
               "int8-dynamic": {"weights": "int8 per output channel, symmetric", "activations": "uint8 per tensor, dynamic"},
               "int8-static": {"weights": "int8 per output channel, symmetric",
                               "activations": "uint8 per tensor, calibrated (QDQ)"}}[scheme]
    info = {"scheme": scheme, "options": options, "quantized": quantized,
            "fp32": sorted(n for n in excluded), "untied_lm_head": untied}
    old = manifest["sparsity"]
    sparsity = global_sparsity(entries)
    zeros = sum(e.zeros for e in entries.values())
    manifest = {**manifest, "format_version": FORMAT_VERSION, "modules": modules,
                "sparsity": {"global": sparsity, "pattern": global_pattern(satisfied), "zeros": zeros,
                             "numel": sum(e.numel for e in entries.values()), "fp32_global": old["global"],
                             "extra_zeros": zeros - fp32_zeros},
                "quantization": {"scheme": scheme, "options": options, "quantized_matmuls": len(chosen),
                                 "fp32_matmuls": sorted(excluded), "untied_lm_head": untied}}
    meta = SparsityMetadata(FORMAT_VERSION, sparsity, manifest["sparsity"]["pattern"], entries, fp32_meta.recipe_hash,
                            fp32_meta.source_sha256, fp32_meta.version, json.dumps(info, separators=(",", ":")))
    return manifest, meta


def calibration_ids(checkpoint: str | Path, data: str | None = None, segments: int = 16, length: int = 128,
                    seed: int = 0) -> np.ndarray:
    """Token segments [segments, length] for int8-static: `data`, else the source the checkpoint's report.json
    records as its calibration (`calibration.source`), else wiki-extracts; the calibration part of that source."""
    from transformers import AutoTokenizer

    from ..data import calibration_segments, load_split_texts
    from .checkpoint import read_checkpoint_extras

    report, _ = read_checkpoint_extras(Path(checkpoint))
    source = data or ((report or {}).get("calibration") or {}).get("source") or "wiki-extracts"
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    log.info("int8-static calibration: %d x %d tokens of %s (seed %d)", segments, length, source, seed)
    return calibration_segments(tokenizer, load_split_texts(source, "calibration"), segments, length, seed).numpy()
