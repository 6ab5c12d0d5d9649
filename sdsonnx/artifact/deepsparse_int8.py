"""Rewrite an int8-static (QDQ) artifact's weight matmuls into the integer form DeepSparse compiles to INT8 kernels.

ONNX Runtime's QDQ form, as `sdsonnx export --quantize int8-static` writes it,

    x_q -> DequantizeLinear(x_s, x_zp) ----\
                                            MatMul -> y
    W_q -> DequantizeLinear(w_s, w_zp, axis=1) /

is compiled by DeepSparse 1.8.0 with the weight dequantization left to its bundled ONNX Runtime ("Naive
Subgraph") and a dense fp32 `gemm` (docs/research/deepsparse_int8.md). The form SparseML exported for DeepSparse,

    x_q, W_q -> MatMulInteger(x_zp, w_zp) -> Cast(float) -> Mul(x_s * w_s) -> y

is compiled to one INT8 kernel whose time falls with the weight's sparsity. The rewrite is exact in integers:
y = x_s * w_s[n] * sum_k (x_q - x_zp)[k] * (W_q - w_zp)[k, n], the same sum the QDQ form takes in fp32; the
integer weight initializer is reused unchanged, so every pruned weight stays an integer zero (w_zp is 0).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

_INT8_TYPES = (TensorProto.INT8, TensorProto.UINT8)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> nodes reading it (graph outputs are tracked separately)."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _axis(node: onnx.NodeProto) -> int:
    """DequantizeLinear's axis attribute (ONNX default 1)."""
    for a in node.attribute:
        if a.name == "axis":
            return a.i
    return 1


def _weight_params(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]
                   ) -> tuple[np.ndarray, np.ndarray] | None:
    """(w_s [N] or scalar, w_zp like w_s) of a weight DequantizeLinear on a 2-D int8 initializer, else None."""
    if len(dq.input) < 3 or any(n not in inits for n in dq.input[:3]):
        return None
    w, s, zp = (inits[n] for n in dq.input[:3])
    if w.data_type not in _INT8_TYPES or len(w.dims) != 2 or zp.data_type != w.data_type:
        return None
    scale, zero = numpy_helper.to_array(s), numpy_helper.to_array(zp)
    if scale.ndim == 0 and zero.ndim == 0:
        return scale, zero
    axis = _axis(dq)
    if scale.shape != (w.dims[1],) or zero.shape != scale.shape or axis not in (1, -1):
        return None  # only per-output-column scales map onto MatMulInteger's per-column b_zero_point
    return scale, zero


def _act_params(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]
                ) -> tuple[np.ndarray, onnx.TensorProto] | None:
    """(x_s scalar, x_zp initializer) of a per-tensor activation DequantizeLinear, else None."""
    if len(dq.input) < 3 or dq.input[0] in inits or any(n not in inits for n in dq.input[1:3]):
        return None
    s, zp = inits[dq.input[1]], inits[dq.input[2]]
    scale = numpy_helper.to_array(s)
    if scale.size != 1 or zp.data_type not in _INT8_TYPES or numpy_helper.to_array(zp).size != 1:
        return None
    return scale.reshape(()), zp


def to_matmul_integer(model: onnx.ModelProto) -> onnx.ModelProto:
    """ModelProto (QDQ MatMuls) -> copy with each quantized weight MatMul as MatMulInteger -> Cast -> Mul.

    A MatMul is rewritten when its input A is a per-tensor DequantizeLinear of a runtime tensor and its input B a
    DequantizeLinear of a 2-D int8/uint8 initializer (per tensor, or per output column: axis 1 on [in, out]).
    Other MatMuls (fp32 weights, attention products) are left as they are. DequantizeLinear nodes left without
    readers are removed, and so are their zero points and activation scales that nothing else reads; each weight's
    scale initializer is kept, unread, so that `quantized.int_weights` (validate) still finds `<W>_scale`.
    Raises ValueError below opset 10.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    opset = {o.domain: o.version for o in out.opset_import}
    if opset.get("", opset.get("ai.onnx", 0)) < 10:
        raise ValueError("MatMulInteger needs opset >= 10; model imports %s" % opset)
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers = _consumers(graph)
    graph_outputs = {o.name for o in graph.output}

    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    new_inits: list[onnx.TensorProto] = []
    weight_scales: list[str] = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        a, b = producer.get(node.input[0]), producer.get(node.input[1])
        if a is None or b is None or a.op_type != "DequantizeLinear" or b.op_type != "DequantizeLinear":
            continue
        wp, xp = _weight_params(b, inits), _act_params(a, inits)
        if wp is None or xp is None:
            continue
        w_scale, w_zero = wp
        x_scale, x_zp = xp
        base = node.name or node.output[0]
        scale_name = f"{base}_integer_scale"
        weight_scales.append(b.input[1])
        rescale = (x_scale.astype(np.float32) * w_scale.astype(np.float32)).astype(np.float32)
        new_inits.append(numpy_helper.from_array(rescale, scale_name))
        acc, cast = f"{base}_integer_out", f"{base}_integer_out_float"
        replaced[id(node)] = [
            helper.make_node("MatMulInteger", [a.input[0], b.input[0], a.input[2], b.input[2]], [acc],
                             f"{base}_MatMulInteger"),
            helper.make_node("Cast", [acc], [cast], f"{base}_Cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [cast, scale_name], [node.output[0]], f"{base}_Rescale"),
        ]
        for dq in (a, b):
            readers[dq.output[0]] = [r for r in readers[dq.output[0]] if r is not node]
            if not readers[dq.output[0]] and dq.output[0] not in graph_outputs:
                dropped.add(id(dq))
    nodes: list[onnx.NodeProto] = []
    graph_nodes_dropped = [n for n in graph.node if id(n) in dropped]
    for node in graph.node:
        if id(node) in dropped:
            continue
        nodes.extend(replaced.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    # a weight's own scale stays (unread): `quantized.int_weights` finds it as `<W>_scale` next to `<W>_quantized`
    kept_scales = set(weight_scales)
    gone = {n for dq in graph_nodes_dropped for n in dq.input} - kept_scales
    used = {n for node in graph.node for n in node.input} | graph_outputs
    keep = [t for t in graph.initializer if t.name in used or t.name not in gone]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    log.info("to_matmul_integer: %d MatMuls rewritten, %d DequantizeLinear removed", len(replaced), len(dropped))
    return out
