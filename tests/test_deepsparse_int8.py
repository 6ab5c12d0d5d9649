"""to_matmul_integer: QDQ weight MatMuls -> MatMulInteger/Cast/Mul, checked against ONNX Runtime on tiny graphs."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdsonnx.artifact.deepsparse_int8 import to_matmul_integer

ort = pytest.importorskip("onnxruntime")


def _qdq_graph(w: np.ndarray, per_channel: bool, act_type=np.int8, extra_fp32: bool = True) -> onnx.ModelProto:
    """x [2, 3, K] -> Q/DQ -> two weight-DQ MatMuls sharing the activation DQ (+ one fp32 MatMul), as ORT's QDQ."""
    k, n = w.shape
    amax = np.abs(w).max(axis=0) if per_channel else np.abs(w).max()
    ws = (amax / 127.0).astype(np.float32)
    wq = np.clip(np.round(w / ws), -127, 127).astype(np.int8)
    zp0 = np.zeros(ws.shape, np.int8)
    xzp = np.array(128 if act_type == np.uint8 else 0, act_type)
    arrays = {"xs": np.array(0.03, np.float32), "xzp": xzp, "W1q": wq, "w1s": ws, "w1zp": zp0,
              "W2q": wq[:, ::-1].copy(), "w2s": ws[::-1].copy() if per_channel else ws, "w2zp": zp0, "Wf": w}
    inits = [numpy_helper.from_array(v, k) for k, v in arrays.items()]
    kw = {"axis": 1} if per_channel else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xzp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["W1q", "w1s", "w1zp"], ["W1"], **kw),
             helper.make_node("DequantizeLinear", ["W2q", "w2s", "w2zp"], ["W2"], **kw),
             helper.make_node("MatMul", ["xd", "W1"], ["y1"], name="mm1"),
             helper.make_node("MatMul", ["xd", "W2"], ["y2"], name="mm2")]
    outs = [helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, 3, None]) for y in ("y1", "y2")]
    if extra_fp32:
        nodes.append(helper.make_node("MatMul", ["x", "Wf"], ["y3"], name="mm3"))
        outs.append(helper.make_tensor_value_info("y3", TensorProto.FLOAT, [2, 3, None]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, k])], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _run(m: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})


def _sparse_weight(k: int = 16, n: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[np.abs(w) < np.median(np.abs(w))] = 0.0
    return w


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("act_type", [np.int8, np.uint8])
def test_rewrite_matches_qdq_and_keeps_integer_zeros(per_channel, act_type):
    w = _sparse_weight()
    m = _qdq_graph(w, per_channel, act_type)
    new = to_matmul_integer(m)
    onnx.checker.check_model(new)
    ops = [n.op_type for n in new.graph.node]
    assert ops.count("MatMulInteger") == 2 and ops.count("MatMul") == 1  # the fp32 one stays
    assert ops.count("DequantizeLinear") == 0 and ops.count("QuantizeLinear") == 1
    inits = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    assert "Wf" in inits and "xzp" in inits  # the fp32 weight and the QuantizeLinear's zero point stay
    wq = inits["W1q"]
    assert wq.dtype == np.int8 and np.array_equal(wq == 0, w == 0)  # every pruned weight an integer zero
    x = np.random.default_rng(1).standard_normal((2, 3, 16)).astype(np.float32)
    for a, b in zip(_run(m, x), _run(new, x)):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_closed_form_integer_sum():
    """y = x_s * w_s[n] * sum_k (x_q - x_zp) W_q[k, n] for a weight of ones and an exactly representable input."""
    k, n = 4, 3
    w = np.ones((k, n), np.float32)
    w[0, :] = 0.0
    m = _qdq_graph(w, per_channel=True, extra_fp32=False)
    new = to_matmul_integer(m)
    x = np.full((2, 3, k), 0.03 * 5, np.float32)  # x_q = 5 exactly
    y1 = _run(new, x)[0]
    # W_q = 127 on the 3 kept rows; w_s = 1/127: y = 0.03 * 5 * 3 * 127 / 127
    np.testing.assert_allclose(y1, np.full((2, 3, n), 0.45, np.float32), rtol=1e-6)


def test_untouched_when_nothing_matches():
    w = _sparse_weight()
    m = _qdq_graph(w, per_channel=True)
    for node in m.graph.node:  # activation DQ now per-channel over a non-initializer scale: not a match
        if node.op_type == "DequantizeLinear" and node.input[0] == "xq":
            node.input[1] = "x_scale_runtime"
    new = to_matmul_integer(m)
    assert [n.op_type for n in new.graph.node] == [n.op_type for n in m.graph.node]
    assert len(new.graph.initializer) == len(m.graph.initializer)


def test_low_opset_raises():
    m = _qdq_graph(_sparse_weight(), per_channel=False)
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("", 9))
    with pytest.raises(ValueError):
        to_matmul_integer(m)


def test_int_weights_reads_the_same_integers_scales_and_zero_points():
    """validate's reader (quantized.int_weights) sees each weight as it did in the QDQ graph, under the same module."""
    from sdsonnx.artifact.quantized import int_weights

    def qdq_named():
        m = _qdq_graph(_sparse_weight(), per_channel=True, extra_fp32=False)
        ren = {"W1q": "W1_quantized", "w1s": "W1_scale", "mm1": "/model/layers.0/mlp/up_proj/MatMul"}
        for t in m.graph.initializer:
            t.name = ren.get(t.name, t.name)
        for n in m.graph.node:
            n.name = ren.get(n.name, n.name)
            for i, x in enumerate(n.input):
                n.input[i] = ren.get(x, x)
        return m

    m = qdq_named()
    before, after = int_weights(m), int_weights(to_matmul_integer(m))
    assert set(before) == set(after) == {"W1_quantized", "W2q"}
    a, b = before["W1_quantized"], after["W1_quantized"]
    assert b.op == "MatMulInteger" and a.module == b.module == "model.layers.0.mlp.up_proj"
    for f in ("q", "zp", "scale"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
