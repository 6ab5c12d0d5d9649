"""Export of a checkpoint too large to load: a weightless trace, then the initializers streamed from the shards.

optimum's exporter needs the whole model in memory twice (the torch model, then the ONNX protobuf); a 7B
float32 model does not fit that on a 24 GiB machine. Here:

1. `trace_graph` builds the model from config.json with every parameter a stride-0 view of its own 1-element
   tensor (a few bytes each, a distinct value each so the exporter's de-duplication cannot merge them) and runs
   optimum's `onnx_export_from_model` (same task, opset, input/output names and node names as `sdsonnx export`)
   with torch's `export_params=False`: the parameters become graph inputs named after their torch names, and no
   weight byte is written.
2. `attach_weights` turns each such input into an external-data initializer of model.onnx_data, reading one
   tensor at a time from the safetensors shards and casting it to float32. A parameter whose only consumer is a
   `Transpose(perm=[1, 0])` (a Linear weight feeding a MatMul) is stored transposed, [in, out], and the Transpose
   removed: the MatMul then reads its weight exactly as in optimum's own constant-folded export, so every reader
   of the artifact (validate, quantize, bench) finds it the same way.

Peak memory is the largest tensor (twice, while transposed) plus the weightless trace. The graph keeps the
constant subgraphs optimum would have folded (shape arithmetic); ONNX Runtime folds them when a session loads.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import torch

from ..shards import ShardReader
from .files import DATA_FILE, MODEL_FILE

log = logging.getLogger(__name__)

ALIGN = 4096  # each tensor starts on a page boundary of model.onnx_data, so readers can memory-map it


@contextmanager
def _without_params() -> Iterator[None]:
    """torch.onnx.export with export_params=False while the block runs (optimum imports it inside its function)."""
    original = torch.onnx.export

    def export(*args, **kwargs):
        kwargs["export_params"] = False
        return original(*args, **kwargs)

    torch.onnx.export = export
    try:
        yield
    finally:
        torch.onnx.export = original


def weightless_model(checkpoint: Path):
    """The checkpoint's architecture in float32 with placeholder parameters (stride-0 views, a few bytes each)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=False)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    for i, (name, param) in enumerate(list(model.named_parameters())):
        owner, _, attr = name.rpartition(".")
        placeholder = torch.full((1,), float(i + 1), dtype=torch.float32).expand(param.shape)
        setattr(model.get_submodule(owner), attr, torch.nn.Parameter(placeholder, requires_grad=False))
    model.tie_weights()  # a tied LM head points at the new embedding placeholder again
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"weightless model still has meta tensors: {meta[:5]}")
    model.config.name_or_path = str(checkpoint)  # optimum copies the tokenizer from here
    return model.eval()


def trace_graph(checkpoint: Path, out: Path, task: str, opset: int | None) -> onnx.ModelProto:
    """optimum's graph of the checkpoint with the parameters as extra graph inputs (no weights); writes optimum's
    side files (config, tokenizer) into `out` and returns the graph (out/model.onnx is removed)."""
    from optimum.exporters.onnx import onnx_export_from_model

    model = weightless_model(checkpoint)
    with _without_params():
        onnx_export_from_model(model, out, task=task, opset=opset, do_validation=False, do_constant_folding=False,
                               device="cpu")
    proto = onnx.load(out / MODEL_FILE)
    (out / MODEL_FILE).unlink()
    return proto


def _sole_transpose(name: str, graph: onnx.GraphProto) -> onnx.NodeProto | None:
    """The Transpose(perm=[1, 0]) that is the only consumer of `name`, else None."""
    users = [n for n in graph.node if name in n.input]
    if len(users) != 1 or users[0].op_type != "Transpose":
        return None
    perm = [list(a.ints) for a in users[0].attribute if a.name == "perm"]
    return users[0] if perm in ([[1, 0]], []) else None


def attach_weights(proto: onnx.ModelProto, out: Path, reader: ShardReader,
                   visit: Callable[[str, np.ndarray, int], None] | None = None) -> dict[str, tuple[str, int]]:
    """Replace every parameter input of the weightless graph by an initializer in out/model.onnx_data.

    visit(torch name, stored float32 array, axis) sees each tensor as written; for a 2-D weight axis 0 means stored
    [in, out] (transposed), 1 as in torch. Returns {torch name: (initializer name, axis)}."""
    graph = proto.graph
    names = set(reader.names())
    params = [i for i in graph.input if i.name in names]
    if not params:
        raise RuntimeError("the weightless graph has no parameter inputs: was it traced with export_params=False?")
    written: dict[str, tuple[str, int]] = {}
    offset = 0
    with open(out / DATA_FILE, "wb") as data:
        for inp in params:
            array = reader.get(inp.name).to(torch.float32).numpy()
            transpose = _sole_transpose(inp.name, graph) if array.ndim == 2 else None
            init_name, axis = inp.name, 1
            if transpose is not None:
                array, init_name, axis = np.ascontiguousarray(array.T), transpose.output[0], 0
                graph.node.remove(transpose)
            if visit is not None:
                visit(inp.name, array, axis)
            pad = -offset % ALIGN
            data.write(b"\0" * pad)
            offset += pad
            blob = array.astype("<f4", copy=False).tobytes()
            data.write(blob)
            tensor = onnx.TensorProto(name=init_name, data_type=onnx.TensorProto.FLOAT, dims=list(array.shape),
                                      data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(len(blob)))):
                tensor.external_data.add(key=key, value=value)
            graph.initializer.append(tensor)
            offset += len(blob)
            written[inp.name] = (init_name, axis)
            del array, blob
        data.flush()
        os.fsync(data.fileno())
    for inp in params:
        graph.input.remove(inp)
    log.info("wrote %d initializers, %.2f GB, into %s", len(params), offset / 1e9, out / DATA_FILE)
    return written


# ---------------------------------------------------------------- lean readers for `validate` at size

class LazyInitializers(Mapping):
    """{name: array} of every 2-D floating-point initializer (as initializers.load_initializers), each read from
    its file when looked up and not kept: validating a model larger than memory holds one tensor at a time."""

    def __init__(self, proto: onnx.ModelProto, folder: Path) -> None:
        from .initializers import _graphs

        kinds = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
        self.folder = Path(folder)
        self.tensors = {t.name: t for g in _graphs(proto.graph) for t in g.initializer
                        if len(t.dims) == 2 and t.data_type in kinds}

    def __getitem__(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.tensors[name], base_dir=str(self.folder))

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def truncated(self) -> list[str]:
        """Names of external tensors whose bytes lie beyond the end of their file."""
        bad = []
        for name, t in self.tensors.items():
            info = {e.key: e.value for e in t.external_data}
            if t.data_location == onnx.TensorProto.EXTERNAL and "length" in info:
                end = int(info.get("offset", 0)) + int(info["length"])
                if end > (self.folder / info["location"]).stat().st_size:
                    bad.append(name)
        return bad


class LazyWeights(Mapping):
    """{module: W [out, in] float32} of a checkpoint's Linears, read from its shards when looked up."""

    def __init__(self, reader: ShardReader, modules: list[str]) -> None:
        self.reader, self.modules = reader, list(modules)

    def __getitem__(self, module: str) -> np.ndarray:
        if module not in self.modules:
            raise KeyError(module)
        return self.reader.get(module + ".weight").to(torch.float32).numpy()

    def __iter__(self):
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


def streamed_logits(checkpoint: Path, ids: torch.Tensor) -> torch.Tensor:
    """The checkpoint's float32 logits [n, L, V] for ids [n, L] (no padding), one decoder block in memory at a time
    (evaluate.streamed_final_hidden), then the model's own final norm and LM head on the last block's output."""
    from ..blocks import replaying
    from ..evaluate import streamed_final_hidden

    model, hidden, as_tuple = streamed_final_hidden(checkpoint, ids)
    logits = []
    with torch.no_grad(), replaying(model, as_tuple) as set_output:
        for row, h in zip(ids, hidden):
            set_output(h[None])
            logits.append(model(input_ids=row[None], use_cache=False).logits[0].float())
    return torch.stack(logits)
