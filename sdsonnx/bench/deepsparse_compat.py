"""Make optimum's ONNX exports compile in DeepSparse 1.8.0 without changing what they compute.

Root cause of the LLaMA-family crash (`Assertion at src/lib/engine/execution/graph.cpp:925`, in
`compiler::execution_graph_to_linear_order`): the rotary embedding computes its angles as an outer product
`inv_freq[B, d/2, 1] @ position_ids[B, 1, S]`, which the exporter writes as a `MatMul` whose inner dimension
is 1, followed by `Transpose` and `Concat(freqs, freqs)`. DeepSparse's compiler cannot order that
MatMul -> Transpose -> Concat chain (each node alone compiles; the chain asserts). A MatMul with inner
dimension 1 is exactly an elementwise product with broadcasting (one product per output, no sum), so it is
rewritten as `Mul`: bit-identical results in every engine, and DeepSparse compiles the graph. OPT has no
rotary embedding, hence it always compiled.

DeepSparse also rejects IR version 10 (its onnx is 1.14): an IR-10 model whose opsets DeepSparse knows is
relabelled IR 9 (IR 10 adds only types and function features that these exports do not use).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import onnx
from onnx import helper, shape_inference
from ..errors import InputError

log = logging.getLogger(__name__)

MAX_IR = 9  # DeepSparse 1.8.0 ships onnx 1.14.1
MAX_OPSET = 19


class DeepSparseCompatError(InputError, ValueError):
    """A model DeepSparse 1.8.0 cannot load even after the rewrites (bad input for the DeepSparse engine)."""


def _weightless(model: onnx.ModelProto, max_elements: int = 4096) -> onnx.ModelProto:
    """A copy whose large initializers are graph inputs of the same type and shape (shape inference needs no data)."""
    light = onnx.ModelProto()
    light.CopyFrom(onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import))
    graph = onnx.GraphProto()
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or math.prod(init.dims) > max_elements:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            graph.initializer.append(init)
    light.graph.CopyFrom(graph)
    return light


def _static_dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name -> dims (int, or None where symbolic/unknown), from ONNX shape inference and initializers."""
    inferred = shape_inference.infer_shapes(_weightless(model), data_prop=True)
    graph = inferred.graph
    dims: dict[str, list[int | None]] = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            dims[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    for init in graph.initializer:
        dims[init.name] = list(init.dims)
    return dims


def matmul_k1_to_mul(model: onnx.ModelProto) -> list[str]:
    """Rewrite, in place, every MatMul whose inner dimension is statically 1 as Mul; returns the node names.

    A [..., M, 1] @ B [..., 1, N] == A * B (numpy broadcasting), exactly: each output is a single product.
    Only operands of known rank >= 2 qualify (MatMul promotes 1-D operands differently from Mul).
    """
    dims = _static_dims(model)
    rewritten = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        a, b = dims.get(node.input[0]), dims.get(node.input[1])
        if a is None or b is None or len(a) < 2 or len(b) < 2:
            continue
        if a[-1] == 1 or b[-2] == 1:
            node.op_type = "Mul"
            rewritten.append(node.name or node.output[0])
    return rewritten


def lower_ir_version(model: onnx.ModelProto) -> bool:
    """Relabel an IR > 9 model as IR 9 when its default opset is <= 19; True if changed. Raises if it cannot."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset > MAX_OPSET:
        raise DeepSparseCompatError(f"opset {opset} is newer than DeepSparse 1.8.0 supports ({MAX_OPSET}); "
                                    f"export with --opset {MAX_OPSET} or lower")
    if model.ir_version <= MAX_IR:
        return False
    model.ir_version = MAX_IR
    return True


def make_deepsparse_compatible(model: onnx.ModelProto) -> list[str]:
    """Apply every rewrite in place; returns a human-readable list of the changes made (empty: none needed)."""
    changes = [f"MatMul with inner dimension 1 -> Mul: {name}" for name in matmul_k1_to_mul(model)]
    if lower_ir_version(model):
        changes.append(f"IR version lowered to {MAX_IR}")
    return changes


def save_model(model: onnx.ModelProto, dst: str | Path) -> None:
    """Save to `dst`, weights in `dst`_data next to it when the model is too big for one protobuf (2 GB)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() >= 2**31 - 2**20:
        onnx.save_model(model, dst, save_as_external_data=True, location=dst.name + "_data")
    else:
        onnx.save_model(model, dst)


def write_deepsparse_copy(src: str | Path, dst: str | Path) -> list[str]:
    """Load the ONNX file `src` (with its external data), make it DeepSparse-compatible, save to `dst`.

    DeepSparse's Engine rewrites the file it is given, so it always gets such a copy. Returns the changes.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist")
    model = onnx.load(src)
    changes = make_deepsparse_compatible(model)
    save_model(model, dst)
    for change in changes:
        log.info("%s: %s", dst.name, change)
    return changes
