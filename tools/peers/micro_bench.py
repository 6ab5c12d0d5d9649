"""Per-matrix cost of sdsonnx's and the reference's pruning math, 1 thread, CPU seconds (min of 3): robust on a
shared machine, where 2-thread wall times of the column loop are dominated by OpenMP barrier waits.

  .venv/bin/python tools/peers/micro_bench.py

SparseGPT solve (sparsegpt_prune vs ref_fasterprune), Wanda mask, and the statistics one Linear input costs per
8 x 512 tokens (sdsonnx LayerStats with the full Gram matrix / squared norms only; the reference's SparseGPT
add_batch / WrappedGPT add_batch), on SmolLM2-135M's Linear shapes with random data.
"""
import sys, time, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_ports import ref_fasterprune, _accumulate, ref_wanda_mask
from sdsonnx.prune.sparsegpt import sparsegpt_prune
from sdsonnx.prune.wanda import wanda_prune
from sdsonnx.pattern import Pattern
from sdsonnx.stats import LayerStats
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
def cpu(f, reps=3):
    best = []
    for _ in range(reps):
        c = time.process_time(); f(); best.append(time.process_time() - c)
    return min(best)
for out, inn in [(576, 576), (576, 1536)]:
    W = torch.randn(out, inn, generator=g)
    X = torch.randn(4096, inn, generator=g)
    H = X.T @ X / 4096
    Href = 2 * H * 4096 / 8
    for pat, (s, pn, pm) in [("2:4", (0.5, 2, 4)), ("0.5", (0.5, 0, 0))]:
        p = Pattern.parse(pat) if ":" in pat else Pattern(sparsity=0.5)
        a = cpu(lambda: sparsegpt_prune(W, H, p)); b = cpu(lambda: ref_fasterprune(W, Href, s, pn, pm))
        print(f"sparsegpt {out}x{inn} {pat}: sdsonnx {a:.3f} s  reference {b:.3f} s  ratio {a/b:.2f}", flush=True)
    sq = (X ** 2).sum(0)
    a = cpu(lambda: wanda_prune(W, sq, Pattern.parse("2:4"))); b = cpu(lambda: ref_wanda_mask(W, sq, 0, 2, 4))
    print(f"wanda {out}x{inn} 2:4 mask: sdsonnx {a:.3f} s  reference {b:.3f} s", flush=True)
    xs = torch.randn(8, 512, inn, generator=g)
    def sds_stats(full):
        st = LayerStats(inn, full=full)
        for x in xs: st.add(x)
    def ref_stats(method):
        state = None
        for x in xs: state = _accumulate(method, state, x[None])
    print(f"stats {inn} cols, 8x512 tokens: sdsonnx full {cpu(lambda: sds_stats(True)):.3f} s, sdsonnx sq_norm only {cpu(lambda: sds_stats(False)):.3f} s, reference H {cpu(lambda: ref_stats('sparsegpt')):.3f} s, reference scaler_row {cpu(lambda: ref_stats('wanda')):.3f} s", flush=True)
