"""The prefill graph of a with-past export: the same model with an empty KV cache folded away.

Running a with-past export with past length 0 feeds zero-size tensors, and DeepSparse 1.8.0 then hands the
whole graph to its bundled ONNX Runtime (`Engine.fraction_of_supported_ops` is 0.0): its "prefill" timing
would not be DeepSparse's at all. So prefill runs a derived graph without the past inputs, in both engines:
  - `Concat(past, new, axis=-2)` (the cache append) is removed and `new` renamed to its output (present.*):
    an Identity feeding a graph output asserts in DeepSparse (map_utils.hpp:82), a renamed tensor does not;
  - `Shape(past)` (read for the past length) becomes the constant-shaped [B, heads, 0, head_dim], B taken
    from `Shape(input_ids)`;
  - the past inputs are removed. Everything else is untouched; outputs (logits, present.*) are unchanged.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .workload import BenchError

PAST_PREFIX = "past_key_values."


def strip_past(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without its past_key_values.* inputs (prefill with an empty cache); raises BenchError."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    past = {i.name: i for i in graph.input if i.name.startswith(PAST_PREFIX)}
    if not past:
        return out
    if "input_ids" not in {i.name for i in graph.input}:
        raise BenchError("cannot derive a prefill graph: no input_ids input")
    batch = None  # name of a 1-element tensor holding B, built on first use
    prologue, nodes, rename = [], [], {}
    fixed = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {o.name for o in graph.output}
    for node in graph.node:
        used = [x for x in node.input if x in past]
        if not used:
            nodes.append(node)
            continue
        if node.op_type == "Concat" and len(node.input) == 2 and node.input[0] in past \
                and node.input[1] not in past:
            new = node.input[1]
            if new in fixed or new in rename:
                nodes.append(helper.make_node("Identity", [new], list(node.output), name=node.name))
            else:
                rename[new] = node.output[0]
        elif node.op_type == "Shape" and len(node.input) == 1 and not node.attribute:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in past[node.input[0]].type.tensor_type.shape.dim]
            if len(dims) != 4 or dims[1] is None or dims[3] is None:
                raise BenchError(f"cannot derive a prefill graph: {node.input[0]} has shape {dims}, expected [B, h, P, d]")
            if batch is None:
                batch = "sdsonnx_prefill/batch"
                for name, value in (("zero", 0), ("one", 1)):
                    graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), f"sdsonnx_prefill/{name}"))
                prologue += [helper.make_node("Shape", ["input_ids"], ["sdsonnx_prefill/ids_shape"],
                                              name="sdsonnx_prefill/ids_shape"),
                             helper.make_node("Slice", ["sdsonnx_prefill/ids_shape", "sdsonnx_prefill/zero",
                                                        "sdsonnx_prefill/one"], [batch], name="sdsonnx_prefill/batch")]
            rest = f"{node.name or node.output[0]}/rest"
            graph.initializer.append(numpy_helper.from_array(np.array([dims[1], 0, dims[3]], np.int64), rest))
            nodes.append(helper.make_node("Concat", [batch, rest], list(node.output), name=node.name, axis=0))
        else:
            raise BenchError(f"cannot derive a prefill graph: {used[0]} feeds {node.op_type} {node.name!r}; "
                             "expected only the cache Concat and Shape")
    for node in nodes:
        for seq in (node.input, node.output):
            for i, name in enumerate(seq):
                seq[i] = rename.get(name, name)
    del graph.node[:]
    graph.node.extend(prologue + nodes)
    kept = [i for i in graph.input if i.name not in past]
    del graph.input[:]
    graph.input.extend(kept)
    return out
