"""ONNX Runtime over weights it never copies: each external initializer becomes a graph input, fed with a read-only
memory map of its bytes in the data file.

ONNX Runtime loads external data itself, mapping the data file privately (copy-on-write); for a LLaMA-7B export in
float32 (27 GB) the kernel refuses that mapping on a machine with less memory (docs/BENCHMARKS.md, Scale). A
read-only shared map (np.memmap mode "r") commits no memory: its pages are the file's page cache, which the kernel
drops and re-reads as needed, so a model larger than RAM still runs, slowly. Used by validate's lean numerics.
Weight prepacking must be off in the session options (it would copy every MatMul weight).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .initializers import _graphs


def external_arrays(proto: onnx.ModelProto, folder: Path) -> dict[str, np.ndarray]:
    """{name: read-only np.memmap} of every initializer of the main graph stored in an external file of `folder`;
    ValueError where a tensor's bytes lie beyond its file's end."""
    arrays = {}
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        path = Path(folder) / info["location"]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        offset = int(info.get("offset", 0))
        count = int(np.prod(t.dims, dtype=np.int64))
        if offset + count * dtype.itemsize > path.stat().st_size:
            raise ValueError(f"{t.name}: its {count * dtype.itemsize} bytes at offset {offset} lie beyond the end of "
                             f"{path.name} ({path.stat().st_size} bytes)")
        arrays[t.name] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(t.dims))
    return arrays


def inputs_for_initializers(proto: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of `proto` whose initializers `names` (of the main graph) are graph inputs of the same type and shape
    instead; nothing else changes (subgraphs may still read them by name)."""
    if any(t.name in names for g in list(_graphs(proto.graph))[1:] for t in g.initializer):
        raise ValueError("only main-graph initializers can become inputs")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    kept = [t for t in out.graph.initializer if t.name not in names]
    moved = [t for t in out.graph.initializer if t.name in names]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    out.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved)
    return out


def mapped_session(model_path: str | Path, options):
    """(onnxruntime.InferenceSession, {input name: np.memmap}) for the model at `model_path`: pass the dict with
    every run's feeds. Its external weights are read through memory maps, never loaded by ONNX Runtime."""
    import onnxruntime as ort

    model_path = Path(model_path)
    proto = onnx.load(str(model_path), load_external_data=False)
    arrays = external_arrays(proto, model_path.parent)
    graph = inputs_for_initializers(proto, set(arrays))
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, arrays
