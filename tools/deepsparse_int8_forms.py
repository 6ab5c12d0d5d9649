"""Tiny one-MatMul graphs in several quantized forms, for bisecting what DeepSparse compiles to INT8 kernels.

Usage (DeepSparse venv): TOK=256 python tools/deepsparse_int8_forms.py FORM PATTERN OPSET out.onnx
FORM: fp32 | qdq-{i8,u8}-{pc,pt}[-wu8|-wT|-wQ] | mmi-{i8,u8}-{pc,pt}[-wu8] | qlm-{i8,u8}-pt[-wu8];
PATTERN: dense | 50 | 70 | 90 | 24. Results: docs/research/deepsparse_int8.md.
"""
import sys, os
import numpy as np
import onnx
from onnx import helper as h, TensorProto as T, numpy_helper as nh

K, N, TOK = 576, 1536, int(os.environ.get("TOK", "64"))

def weight(pattern, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((K, N)).astype(np.float32) * 0.05  # [in, out]
    if pattern == "dense":
        return w
    a = np.abs(w)
    if pattern in ("50", "70", "90"):
        thr = np.quantile(a, int(pattern) / 100)
        return np.where(a > thr, w, 0).astype(np.float32)
    if pattern == "50x":
        thr = np.median(a)
        return np.where(a > thr, w, 0).astype(np.float32)
    if pattern == "24":  # groups of 4 along in (K) per output column
        g = a.reshape(K // 4, 4, N)
        order = np.argsort(g, axis=1)
        keep = np.zeros_like(g, dtype=bool)
        np.put_along_axis(keep, order[:, 2:, :], True, axis=1)
        return np.where(keep.reshape(K, N), w, 0).astype(np.float32)
    raise ValueError(pattern)

def qweight(w, per_channel):
    amax = np.abs(w).max(axis=0) if per_channel else np.abs(w).max()
    s = (amax / 127.0).astype(np.float32)
    q = np.clip(np.round(w / s), -127, 127).astype(np.int8)
    return q, s

def build(form, pattern, opset=18):
    w = weight(pattern)
    x = h.make_tensor_value_info("x", T.FLOAT, [1, TOK, K])
    y = h.make_tensor_value_info("y", T.FLOAT, [1, TOK, N])
    inits, nodes = [], []
    act_u8 = "-u8" in form
    xs = np.float32(8.0 / 255) if act_u8 else np.float32(4.0 / 127)
    xzp = np.uint8(128) if act_u8 else np.int8(0)
    inits += [nh.from_array(np.array(xs), "xs"), nh.from_array(np.array(xzp), "xzp")]
    per_ch = "pc" in form
    q, s = qweight(w, per_ch)
    if form == "fp32":
        inits.append(nh.from_array(w, "W"))
        nodes.append(h.make_node("MatMul", ["x", "W"], ["y"]))
    elif form.startswith("qdq"):
        # QDQ: Q->DQ on activation, DQ(weight) -> MatMul
        nodes += [h.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"]),
                  h.make_node("DequantizeLinear", ["xq", "xs", "xzp"], ["xd"])]
        wq, wzp = q, np.zeros_like(s, dtype=np.int8)
        if "wu8" in form:
            wq, wzp = (q.astype(np.int16) + 128).astype(np.uint8), np.full(s.shape, 128, np.uint8)
        if "wT" in form:  # weight stored [out, in], DQ then Transpose (SparseML torch export)
            inits.append(nh.from_array(np.ascontiguousarray(wq.T), "Wq"))
            inits += [nh.from_array(s, "ws"), nh.from_array(wzp, "wzp")]
            kw = {"axis": 0} if per_ch else {}
            nodes += [h.make_node("DequantizeLinear", ["Wq", "ws", "wzp"], ["Wdt"], **kw),
                      h.make_node("Transpose", ["Wdt"], ["Wd"], perm=[1, 0])]
        elif "wQ" in form:  # fp32 weight -> Q -> DQ (SparseML QAT export before conversion)
            inits += [nh.from_array((q.astype(np.float32) * s).astype(np.float32), "Wf"),
                      nh.from_array(s, "ws"), nh.from_array(wzp, "wzp")]
            kw = {"axis": 1} if per_ch else {}
            nodes += [h.make_node("QuantizeLinear", ["Wf", "ws", "wzp"], ["Wq"], **kw),
                      h.make_node("DequantizeLinear", ["Wq", "ws", "wzp"], ["Wd"], **kw)]
        else:
            inits += [nh.from_array(wq, "Wq"), nh.from_array(s, "ws"), nh.from_array(wzp, "wzp")]
            kw = {"axis": 1} if per_ch else {}
            nodes.append(h.make_node("DequantizeLinear", ["Wq", "ws", "wzp"], ["Wd"], **kw))
        nodes.append(h.make_node("MatMul", ["xd", "Wd"], ["y"]))
    elif form.startswith("mmi"):
        # SparseML: Q(x) -> MatMulInteger(xq, Wq, xzp, wzp) -> Cast -> Mul(xs*ws)
        wq, wzp = q, np.zeros(s.shape, np.int8)
        if "wu8" in form:
            wq, wzp = (q.astype(np.int16) + 128).astype(np.uint8), np.full(s.shape, 128, np.uint8)
        inits += [nh.from_array(wq, "Wq"), nh.from_array(np.array(wzp), "wzp"),
                  nh.from_array((xs * s).astype(np.float32), "os")]
        nodes += [h.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"]),
                  h.make_node("MatMulInteger", ["xq", "Wq", "xzp", "wzp"], ["yi"]),
                  h.make_node("Cast", ["yi"], ["yf"], to=T.FLOAT),
                  h.make_node("Mul", ["yf", "os"], ["y"])]
    elif form.startswith("qlm"):
        # QLinearMatMul (per-tensor output quantization) -> DQ
        wq, wzp = q, np.zeros(s.shape, np.int8)
        if "wu8" in form:
            wq, wzp = (q.astype(np.int16) + 128).astype(np.uint8), np.full(s.shape, 128, np.uint8)
        ys = np.float32(30.0 / 127) if not act_u8 else np.float32(60.0 / 255)
        inits += [nh.from_array(wq, "Wq"), nh.from_array(np.array(s), "ws"), nh.from_array(np.array(wzp), "wzp"),
                  nh.from_array(np.array(ys), "ys"), nh.from_array(np.array(xzp), "yzp")]
        nodes += [h.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"]),
                  h.make_node("QLinearMatMul", ["xq", "xs", "xzp", "Wq", "ws", "wzp", "ys", "yzp"], ["yq"]),
                  h.make_node("DequantizeLinear", ["yq", "ys", "yzp"], ["y"])]
    else:
        raise ValueError(form)
    g = h.make_graph(nodes, form, [x], [y], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m

if __name__ == "__main__":
    form, pattern, opset, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    onnx.save(build(form, pattern, opset), out)
