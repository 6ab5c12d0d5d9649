"""Quantized weights of an ONNX artifact read back as integers, and the checks that every pruned zero survived.

Shared by `quantize.py` (which verifies its own output before writing the artifact) and `validate.py`
(which checks an artifact on disk); neither imports the other. docs/ARTIFACTS.md, "Quantized artifacts".

Layouts ONNX Runtime's quantizers write (onnxruntime 1.31.1), for a weight W stored fp32 as MatMul B [K=in, N=out]:
  MatMulInteger (int8-dynamic)  B = `W_quantized` int8 [K, N], zero point int8 [N], scale `W_scale` float [N]
  DequantizeLinear (int8-static) `W_quantized` int8 [K, N], scale [N], zero point int8 [N], axis=1 (per output)
  MatMulNBits (int8/int4-nbits) B = `W_Q8|W_Q4` uint8 [N, K/bs, bs*bits/8], transposed back to [out, in];
                                4-bit packs two weights per byte (low nibble = even k); scales float [N, K/bs];
                                no zero_points input when symmetric: the implicit zero point is 2^(bits-1)
Every weight is returned as an int32 matrix `q` in its stored orientation ([K, N], input axis 0, for int8 QDQ and
dynamic; [N, K], input axis 1, for MatMulNBits) with `zp` and `scale` broadcast to the same shape. A stored
value "is zero" when it equals its zero point: it dequantizes to exactly (q - zp) * scale = 0.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..masks import first_group_violation, requested_nm, satisfied_patterns, tightest
from .metadata import PREFIX, array_sha256

QUANT_KEY = PREFIX + "quantization"
SCHEMES = ("int8-nbits", "int8-dynamic", "int8-static", "int4-nbits")
ALIASES = {"int8": "int8-nbits"}
# Numerics of a quantized artifact against its fp32 pruned model (PyTorch checkpoint): mean KL(fp32 || quantized)
# in nats per position and top-1 agreement. int8-nbits from the 3% perplexity target (measured on SmolLM2-135M:
# KL 0.005-0.007, top-1 0.91-0.96); the others at about 1.3x their measured cost (docs/ARTIFACTS.md).
THRESHOLDS = {"int8-nbits": {"kl": 0.02, "top1": 0.90}, "int8-dynamic": {"kl": 0.10, "top1": 0.80},
              "int8-static": {"kl": 0.15, "top1": 0.78}, "int4-nbits": {"kl": 0.50, "top1": 0.60}}


@dataclass
class IntWeight:
    """One quantized weight in integer form (stored orientation)."""

    node: str  # consuming node name, e.g. /model/layers.0/self_attn/q_proj/MatMul_Q8
    module: str  # torch module the node belongs to, e.g. model.layers.0.self_attn.q_proj
    initializer: str  # the stored integer initializer
    source: str  # the fp32 initializer it was made from
    op: str  # MatMulInteger | DequantizeLinear | MatMulNBits
    q: np.ndarray  # int32 [rows, cols]
    zp: np.ndarray  # int32, broadcast to q's shape
    scale: np.ndarray  # float32, broadcast to q's shape
    axis: int  # input (N:M group) axis of q: 0 for [K, N], 1 for [N, K]
    stored: np.ndarray  # the initializer as stored (for its sha256)

    def zero_point(self) -> int | None:
        """The zero point when it is one value for the whole weight, else None."""
        values = np.unique(self.zp)
        return int(values[0]) if values.size == 1 else None


def module_of_node(name: str) -> str:
    """Torch module of an optimum node name: '/model/layers.0/mlp/up_proj/MatMul_Q8' -> 'model.layers.0.mlp.up_proj'."""
    parts = [p for p in name.split("/") if p]
    return ".".join(parts[:-1]) if len(parts) > 1 else name


def _unpack4(b: np.ndarray) -> np.ndarray:
    """uint8 [..., n] -> [..., 2n] of 4-bit values, low nibble first."""
    return np.stack([b & 0x0F, b >> 4], axis=-1).reshape(*b.shape[:-1], -1)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def int_weights(model: onnx.ModelProto, base_dir: Path | str | None = None) -> dict[str, IntWeight]:
    """{integer initializer: IntWeight} for every MatMulInteger / weight DequantizeLinear / MatMulNBits weight."""
    base = None if base_dir is None else str(base_dir)
    inits = {i.name: i for i in model.graph.initializer}
    arr = lambda name: numpy_helper.to_array(inits[name], base_dir=base)  # noqa: E731
    uses: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for x in n.input:
            uses.setdefault(x, []).append(n)
    found: dict[str, IntWeight] = {}
    for n in model.graph.node:
        if n.op_type == "MatMulInteger" and len(n.input) > 3 and n.input[1] in inits:
            stored = arr(n.input[1])
            q = stored.astype(np.int32)
            zp = arr(n.input[3]).astype(np.int32) if n.input[3] in inits else np.zeros(q.shape[1], np.int32)
            source = n.input[1].removesuffix("_quantized")
            scale = arr(source + "_scale") if source + "_scale" in inits else np.ones(q.shape[1], np.float32)
            found[n.input[1]] = IntWeight(n.name, module_of_node(n.name), n.input[1], source, n.op_type, q,
                                          np.broadcast_to(zp.reshape(1, -1), q.shape),
                                          np.broadcast_to(scale.reshape(1, -1), q.shape), 0, stored)
        elif n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2:
            stored = arr(n.input[0])
            q = stored.astype(np.int32)
            axis = _attrs(n).get("axis", 1)
            shape = [1, 1]
            shape[axis] = -1
            zp = arr(n.input[2]).astype(np.int32) if len(n.input) > 2 and n.input[2] in inits else np.zeros(1, np.int32)
            scale = arr(n.input[1])
            consumer = next((u for u in uses.get(n.output[0], []) if u.op_type in ("MatMul", "Gemm")), n)
            zp = zp.reshape(shape) if zp.size > 1 else zp.reshape(1, 1)
            scale = scale.reshape(shape) if scale.size > 1 else scale.reshape(1, 1)
            found[n.input[0]] = IntWeight(consumer.name, module_of_node(consumer.name), n.input[0],
                                          n.input[0].removesuffix("_quantized"), n.op_type, q,
                                          np.broadcast_to(zp, q.shape), np.broadcast_to(scale, q.shape), 0, stored)
        elif n.op_type == "MatMulNBits" and n.input[1] in inits:
            a = _attrs(n)
            k, rows, bs, bits = a["K"], a["N"], a["block_size"], a["bits"]
            unpack = _unpack4 if bits == 4 else (lambda b: b)
            stored = arr(n.input[1])
            q = unpack(stored).reshape(rows, -1)[:, :k].astype(np.int32)
            blocks = -(-k // bs)
            scale = np.repeat(arr(n.input[2]).reshape(rows, blocks), bs, axis=1)[:, :k]
            if len(n.input) > 3 and n.input[3] in inits:
                zp = unpack(arr(n.input[3]).reshape(rows, -1))[:, :blocks].astype(np.int32)
            else:
                zp = np.full((rows, blocks), 1 << (bits - 1), np.int32)
            zp = np.repeat(zp, bs, axis=1)[:, :k]
            found[n.input[1]] = IntWeight(n.name, module_of_node(n.name), n.input[1], n.input[1].rsplit("_Q", 1)[0],
                                          n.op_type, q, zp, scale, 1, stored)
    return found


def deviations(w: IntWeight) -> np.ndarray:
    """q - zp (int32): nonzero exactly where the stored weight is not zero."""
    return w.q - w.zp


def describe(w: IntWeight, scheme: str) -> dict:
    """The sdsonnx.initializers entry (format version 2) of a quantized weight: zeros = elements at the zero point."""
    dev = deviations(w)
    zeros = int(np.count_nonzero(dev == 0))
    satisfied = satisfied_patterns(dev, w.axis) if zeros else None
    zp = w.zero_point()
    return {"module": w.module, "shape": list(w.q.shape), "axis": w.axis, "zeros": zeros, "numel": int(w.q.size),
            "sparsity": zeros / w.q.size, "pattern": tightest(satisfied), "sha256": array_sha256(w.stored),
            "scheme": scheme, "zero_point": zp}, satisfied


def zero_problems(w: IntWeight, reference: np.ndarray, symmetric_int8: bool) -> list[str]:
    """Why the zeros of `reference` (fp32 weight in q's orientation) did not survive in `w`; [] when they did.

    Every reference zero must be stored as the zero point and dequantize to exactly 0; symmetric INT8 must also
    store it as the integer 0 (zero point 0).
    """
    if reference.shape != w.q.shape:
        return [f"shape {list(w.q.shape)} != the fp32 weight's {list(reference.shape)}"]
    pruned = reference == 0
    problems = []
    if symmetric_int8 and np.any(w.zp != 0):
        problems.append(f"zero point is not 0 (symmetric INT8 expected): values {np.unique(w.zp)[:4].tolist()}")
    off = pruned & (w.q != w.zp)
    if off.any():
        i, j = (int(v) for v in np.argwhere(off)[0])
        problems.append(f"{int(off.sum())} pruned weight(s) not stored as the zero point; first at [{i}, {j}]: "
                        f"q={int(w.q[i, j])}, zero point {int(w.zp[i, j])}")
    deq = (w.q - w.zp).astype(np.float32) * w.scale
    if np.any(deq[pruned] != 0) or not np.all(np.isfinite(w.scale)):
        problems.append("a pruned weight does not dequantize to exactly 0 (or a scale is not finite)")
    return problems


def nm_problem(w: IntWeight, pattern: object) -> str | None:
    """Why `w`'s groups (nonzero = q != zp, along its input axis) break an n:m `pattern`; None when they hold."""
    nm = requested_nm(pattern)
    if nm is None:
        return None
    found = first_group_violation(deviations(w), w.axis, *nm)
    return None if found is None else f"{found[0]} group(s) break {pattern} on q != zero point; first: {found[1]}"


def read_quantization(props: dict[str, str]) -> dict | None:
    """The parsed sdsonnx.quantization object, or None when the key is absent or 'none'."""
    text = props.get(QUANT_KEY)
    if not text or text == "none":
        return None
    return json.loads(text)


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the graph holds any quantized weight (MatMulInteger, DequantizeLinear on an initializer, MatMulNBits)."""
    inits = {i.name for i in model.graph.initializer}
    return any(n.op_type in ("MatMulInteger", "MatMulNBits") or (n.op_type == "DequantizeLinear" and n.input[0] in inits)
               for n in model.graph.node)
