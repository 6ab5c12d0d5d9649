"""The speed-up an engine can reach at most, from what it stores and what it computes (issue 15, item 4).

Decode (one new token per sequence) is bound by the weight bytes read per token: every weight tensor a matmul
consumes is read once per forward and shared by the batch; an embedding read only by Gather contributes its rows,
which is negligible and not counted (a tied LM head, Transpose(embedding) -> MatMul, is read whole and counted).
Prefill is bound by the multiply-adds left: ONNX Runtime and OpenVINO multiply every stored zero (ratio 1.0);
an engine that skipped the zeros would reach workload.work_share's 1/(1 - f*s), f the pruned share of the work.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ..artifact.files import MANIFEST, MODEL_FILE

_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of an initializer as stored: numel x item size (packed uint8 4-bit weights are counted as stored)."""
    numel = int(np.prod(t.dims)) if len(t.dims) else 1
    return numel * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def weight_bytes(model: onnx.ModelProto, float_itemsize: int | None = None) -> dict[str, int]:
    """{initializer: bytes read per forward} of every initializer with >= 2 dims read by a non-Gather node.

    float_itemsize: the engine's storage size of float weights (2 for OpenVINO's bf16 hint), default as stored.
    """
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    out = {}
    for t in model.graph.initializer:
        if len(t.dims) < 2 or not readers.get(t.name, set()) - {"Gather"}:
            continue
        size = tensor_bytes(t)
        if float_itemsize and t.data_type in _FLOATS:
            size = size // np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize * float_itemsize
        out[t.name] = size
    return out


def decode_bytes(folder: str | Path, float_itemsize: int | None = None) -> dict[str, float]:
    """Weight bytes one decode step reads (batch 1), in total and for the pruned weights, with their zeros.

    pruned_bytes / pruned_numel: the weights the manifest lists as pruning targets (as stored: int8, packed NBits or
    float); zeros: their elements at the zero point (the manifest's sparsity). compressed: the total if the zeros of the
    pruned weights were dropped and a 1-bit mask kept (what an engine storing sparsity compressed would read).
    """
    import json

    folder = Path(folder)
    model = onnx.load(folder / MODEL_FILE, load_external_data=False)
    sizes = weight_bytes(model, float_itemsize)
    manifest = json.loads((folder / MANIFEST).read_text())
    inits = {t.name: t for t in model.graph.initializer}
    pruned_bytes = pruned_numel = zeros = 0.0
    for entry in manifest["modules"].values():
        name = entry["initializer"]
        if name not in sizes:
            continue
        numel = float(np.prod(entry.get("stored_shape") or inits[name].dims))  # logical [out, in] for NBits
        pruned_bytes += sizes[name]
        pruned_numel += numel
        zeros += entry.get("sparsity", 0.0) * numel
    total = float(sum(sizes.values()))
    per_element = pruned_bytes / pruned_numel if pruned_numel else 0.0
    return {"bytes": total, "pruned_bytes": pruned_bytes, "pruned_numel": pruned_numel, "zeros": zeros,
            "compressed": total - zeros * per_element + pruned_numel / 8}
