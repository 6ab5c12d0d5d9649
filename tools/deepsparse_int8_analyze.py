"""Analyse one ONNX file with DeepSparse at 1 core: layer kinds, sparsity, bits, min/median run time, max abs vs ORT.

Usage (DeepSparse venv, one process per graph): REPS=150 python tools/deepsparse_int8_analyze.py model.onnx > out.json
(XSCALE=k multiplies the N(0,1) input; REPS sets the timed runs.)
"""
import sys, os, json, time
os.environ["NM_DISABLE_ANALYTICS"] = "1"
import numpy as np
import onnx, onnxruntime as ort
from deepsparse.engine import DebugAnalysisEngine, Engine
path = sys.argv[1]
m = onnx.load(path)
shapes = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input]
rng = np.random.default_rng(1)
inputs = [(rng.standard_normal(s) * float(os.environ.get("XSCALE", "1"))).astype(np.float32) for s in shapes]
t0 = time.perf_counter()
e = DebugAnalysisEngine(path, batch_size=shapes[0][0], num_cores=1, input_shapes=shapes, num_iterations=20, num_warmup_iterations=3)
r = e.analyze(inputs, val_inp=False)
comp = time.perf_counter() - t0
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
ref = s.run(None, {m.graph.input[0].name: inputs[0]})[0]
eng = Engine(path, batch_size=shapes[0][0], num_cores=1, input_shapes=shapes)
out = eng.run(inputs, val_inp=False)[0]
# timing: interleave
ts = []
for _ in range(int(os.environ.get("REPS", "150"))):
    t0 = time.perf_counter()
    eng.run(inputs, val_inp=False)
    ts.append((time.perf_counter() - t0) * 1e3)
layers = [{k: li.get(k) for k in ("name", "canonical_name", "kernel_sparsity", "kernel_bits_per_ele", "average_run_time_in_ms")} for li in r["layer_info"]]
res = {"path": os.path.basename(path), "analyze_ms": r["average_total_time"], "engine_ms_med": float(np.median(ts)), "engine_ms_min": float(np.min(ts)),
       "supported": eng.fraction_of_supported_ops, "maxabs_vs_ort": float(np.abs(out - ref).max()),
       "maxabs_ort": float(np.abs(ref).max()), "layers": layers}
print(json.dumps(res), flush=True)
