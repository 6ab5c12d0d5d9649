"""Find each torch Linear weight among the ONNX initializers and its layout there.

The exporter renames and transposes weights: LLaMA's `q_proj.weight` [out, in] becomes `onnx::MatMul_NNN`
stored [in, out] and consumed as MatMul's B; OPT's `fc1.weight` keeps its name, stored [out, in] and consumed
by `Gemm transB=1`. Names cannot be trusted, so weights are matched by value (a hash of the bytes of W or
W^T), and the input axis (the axis N:M groups run along) is read from the consuming node.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from ..errors import InputError

log = logging.getLogger(__name__)


class WeightMappingError(InputError, ValueError):
    """An initializer whose consuming nodes do not tell its input axis."""


@dataclass(frozen=True)
class OnnxWeight:
    """Where a torch Linear weight W [out, in] lives in the ONNX graph."""

    module: str  # torch module name
    initializer: str
    axis: int  # input axis of the stored array: 1 when stored [out, in], 0 when stored [in, out]
    consumer: str  # e.g. "MatMul" or "Gemm(transB=1)"
    exact: bool  # True when the stored values equal the checkpoint's exactly (found by hash)


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def consumers(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """{value name: [(node, input index), ...]} over the main graph and its subgraphs."""
    found: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for graph in _graphs(model.graph):
        for node in graph.node:
            for index, name in enumerate(node.input):
                found.setdefault(name, []).append((node, index))
    return found


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _axes(name: str, uses: dict, depth: int = 0) -> set[tuple[int, str]]:
    """{(input axis, consumer description)} of a 2-D value as read by each node that consumes it."""
    out = set()
    for node, index in uses.get(name, []):
        if node.op_type == "MatMul" and index == 1:
            out.add((0, "MatMul"))
        elif node.op_type == "Gemm" and index == 1:
            trans = _attr(node, "transB", 0)
            out.add((1 if trans else 0, f"Gemm(transB={trans})"))
        elif node.op_type == "Gemm" and index == 0:
            trans = _attr(node, "transA", 0)
            out.add((0 if trans else 1, f"Gemm(A, transA={trans})"))
        elif node.op_type == "Transpose" and depth < 4:
            perm = [a.ints for a in node.attribute if a.name == "perm"]
            if perm and list(perm[0]) != [1, 0]:
                continue
            out |= {(1 - axis, f"Transpose>{what}") for axis, what in _axes(node.output[0], uses, depth + 1)}
        elif node.op_type == "Gather":
            continue  # embedding lookup: not a Linear use
    return out


def input_axis(name: str, uses: dict) -> tuple[int, str]:
    """(axis, consumer) of an initializer consumed as the weight of a MatMul/Gemm; raises if unknown or mixed."""
    axes = _axes(name, uses)
    if not axes:
        raise WeightMappingError(f"initializer {name} is not consumed as a MatMul/Gemm weight")
    if len({a for a, _ in axes}) > 1:
        raise WeightMappingError(f"initializer {name} is consumed along different axes: {sorted(axes)}")
    axis = next(iter(axes))[0]
    return axis, "+".join(sorted(w for _, w in axes))


def load_initializers(model: onnx.ModelProto, base_dir: Path) -> dict[str, np.ndarray]:
    """Every 2-D floating-point initializer as an array (external data read from base_dir)."""
    arrays = {}
    for graph in _graphs(model.graph):
        for tensor in graph.initializer:
            if len(tensor.dims) == 2 and tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                              onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
                arrays[tensor.name] = numpy_helper.to_array(tensor, base_dir=str(base_dir))
    return arrays


def _key(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return a.shape, hashlib.blake2b(a.tobytes(), digest_size=16).digest()


def torch_layout(stored: np.ndarray, axis: int) -> np.ndarray:
    """The stored array in torch layout [out, in] (transposed when its input axis is 0)."""
    return stored.T if axis == 0 else stored


def map_weights(weights: dict[str, np.ndarray], arrays: dict[str, np.ndarray],
                uses: dict) -> tuple[dict[str, OnnxWeight], list[str]]:
    """({module: OnnxWeight}, [modules not found]) for torch weights {module: W [out, in]}.

    Exact matches by hash of W (stored [out, in]) or W^T (stored [in, out]) whose layout agrees with the
    consuming node. A weight that matches no initializer exactly is paired with the unclaimed initializer of
    the same torch-layout shape sharing the most equal elements (at least half): that is how a weight edited
    after export is still found and reported against its checkpoint.
    """
    axes: dict[str, tuple[int, str]] = {}
    for name in arrays:
        try:
            axes[name] = input_axis(name, uses)
        except WeightMappingError:
            continue
    index: dict[tuple, list[str]] = {}
    for name in axes:
        index.setdefault(_key(arrays[name]), []).append(name)
    found: dict[str, OnnxWeight] = {}
    missing = []
    for module, w in weights.items():
        hit = None
        for axis, candidate in ((1, w), (0, w.T)):
            names = [n for n in index.get(_key(candidate), []) if axes[n][0] == axis]
            if names:
                hit = OnnxWeight(module, names[0], axis, axes[names[0]][1], True)
                break
        if hit is None:
            missing.append(module)
        else:
            found[module] = hit
    claimed = {h.initializer for h in found.values()}
    still_missing = []
    for module in missing:
        w = weights[module]
        best, best_equal = None, 0.5
        for name, (axis, what) in axes.items():
            if name in claimed:
                continue
            stored = torch_layout(arrays[name], axis)
            if stored.shape != w.shape:
                continue
            equal = float(np.mean(stored == w))
            if equal > best_equal:
                best, best_equal = OnnxWeight(module, name, axis, what, False), equal
        if best is None:
            still_missing.append(module)
        else:
            log.debug("%s matched %s by closest values (%.4f equal)", module, best.initializer, best_equal)
            found[module] = best
            claimed.add(best.initializer)
    return found, still_missing
