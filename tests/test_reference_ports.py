"""sdsonnx's SparseGPT and Wanda against literal ports of the reference code, so a refactor cannot drift unnoticed.

The `ref_*` functions (tools/peers/reference_ports.py, the one copy) are line-by-line ports (only the nn.Module /
quantizer / CUDA / print plumbing removed, names kept) of:
  IST-DASLab/sparsegpt  sparsegpt.py   SparseGPT.add_batch, SparseGPT.fasterprune
  locuslab/wanda        lib/layerwrapper.py WrappedGPT.add_batch; lib/prune.py prune_wanda (the mask code)
The references count n:m as prunen = pruned per group of prunem; sdsonnx's Pattern n:m counts kept weights, so
n:m here maps to prunen = m - n. Known, intended differences (asserted exactly below):
  - SparseGPT unstructured: the reference prunes `tmp <= sort(tmp)[int(numel * s)]`, i.e. int(numel * s) + 1
    weights per column block; sdsonnx prunes exactly round(s * numel) over the matrix.
  - Wanda unstructured: the reference prunes int(cols * s) per row (floor), sdsonnx round(cols * s).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sdsonnx.pattern import Pattern
from sdsonnx.prune.sparsegpt import sparsegpt_prune
from sdsonnx.prune.wanda import wanda_prune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "peers"))
from reference_ports import (ref_fasterprune, ref_sparsegpt_hessian, ref_wanda_mask,  # noqa: E402
                             ref_wanda_scaler_row)

ROWS, COLS, TOKENS = 48, 256, 768


# ---- inputs -------------------------------------------------------------------------------------------------------

def make_inputs(kind: str, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(W [ROWS, COLS], calibration batches [1, 128, COLS]); 'correlated': low-rank mix, outlier columns, a dead one."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(ROWS, COLS, generator=g)
    if kind == "random":
        x = torch.randn(TOKENS, COLS, generator=g)
    elif kind == "correlated":
        z = torch.randn(TOKENS, 16, generator=g)
        x = z @ torch.randn(16, COLS, generator=g) + 0.3 * torch.randn(TOKENS, COLS, generator=g)
        x[:, :4] *= 20.0  # activation outlier channels, as in LLMs
        x[:, 7] = 0.0  # a dead input: exercises the H_jj = 0 path
    else:
        raise ValueError(kind)
    return w, list(x.reshape(-1, 128, COLS).split(1))


def sds_hessian(batches: list[torch.Tensor]) -> torch.Tensor:
    """sdsonnx's convention H = X^T X / N (stats.LayerStats.hessian)."""
    x = torch.cat(batches).reshape(-1, COLS).double()
    return (x.T @ x / x.shape[0]).float()


def sds_sq_norm(batches: list[torch.Tensor]) -> torch.Tensor:
    x = torch.cat(batches).reshape(-1, COLS).double()
    return (x ** 2).sum(0).float()


# ---- SparseGPT ----------------------------------------------------------------------------------------------------

def test_hessian_conventions_agree_up_to_a_constant():
    # the reference counts samples as sequences (inp.shape[0] per add_batch): H_ref = 2 X^T X / n_seq
    _, batches = make_inputs("correlated")
    scale = 2 * TOKENS / len(batches)
    torch.testing.assert_close(ref_sparsegpt_hessian(batches, COLS), scale * sds_hessian(batches), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(ref_wanda_scaler_row(batches, COLS), sds_sq_norm(batches) / len(batches),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["random", "correlated"])
@pytest.mark.parametrize("nm,blocksize,percdamp", [("2:4", 128, 0.01), ("4:8", 32, 0.1), ("2:4", 64, 0.05)])
def test_sparsegpt_nm_matches_fasterprune(kind, nm, blocksize, percdamp):
    w, batches = make_inputs(kind)
    pattern = Pattern.parse(nm)
    ref = ref_fasterprune(w, ref_sparsegpt_hessian(batches, COLS), 0.0, prunen=pattern.m - pattern.n,
                          prunem=pattern.m, blocksize=blocksize, percdamp=percdamp)
    got, mask = sparsegpt_prune(w, sds_hessian(batches), pattern, blocksize=blocksize, percdamp=percdamp)
    assert torch.equal(mask, ref != 0)  # identical n:m masks (no weight is updated to exactly 0 here)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["random", "correlated"])
@pytest.mark.parametrize("sparsity,blocksize,percdamp", [(0.5, 128, 0.01), (0.5, 32, 0.1), (0.7, 64, 0.01)])
def test_sparsegpt_unstructured_matches_fasterprune_within_a_handful(kind, sparsity, blocksize, percdamp):
    w, batches = make_inputs(kind)
    ref = ref_fasterprune(w, ref_sparsegpt_hessian(batches, COLS), sparsity, blocksize=blocksize, percdamp=percdamp)
    got, mask = sparsegpt_prune(w, sds_hessian(batches), Pattern(sparsity=sparsity), blocksize=blocksize,
                                percdamp=percdamp)
    blocks = COLS // blocksize
    ref_pruned = int(ROWS * blocksize * sparsity) + 1  # per block: tmp <= sort(tmp)[int(numel * s)]
    assert int((ref == 0).sum()) == blocks * ref_pruned
    assert int((~mask).sum()) == round(sparsity * w.numel())
    differ = int((mask != (ref != 0)).sum())
    assert differ <= 4 * blocks, f"{differ} mask elements differ from the reference"
    # the weights follow: same kept weights up to the OBS updates of those few extra pruned ones
    both = mask & (ref != 0)
    rel = float((got - ref)[both].norm() / ref[both].norm())
    assert rel < 0.05, rel


# ---- Wanda --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["random", "correlated"])
@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:4"])
def test_wanda_nm_mask_identical(kind, nm):
    w, batches = make_inputs(kind, seed=1)
    pattern = Pattern.parse(nm)
    ref_pruned = ref_wanda_mask(w, ref_wanda_scaler_row(batches, COLS), 0.0, prune_n=pattern.m - pattern.n,
                                prune_m=pattern.m)
    got, mask = wanda_prune(w, sds_sq_norm(batches), pattern)
    assert torch.equal(mask, ~ref_pruned)
    assert torch.equal(got, torch.where(ref_pruned, 0.0, w))  # reference: weight.data[W_mask] = 0


@pytest.mark.parametrize("kind", ["random", "correlated"])
@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.7])
def test_wanda_unstructured_mask(kind, sparsity):
    w, batches = make_inputs(kind, seed=2)
    ref_pruned = ref_wanda_mask(w, ref_wanda_scaler_row(batches, COLS), sparsity)
    got, mask = wanda_prune(w, sds_sq_norm(batches), Pattern(sparsity=sparsity))
    extra = round(COLS * sparsity) - int(COLS * sparsity)  # 0.5: 128 both; 0.7: 179 both; 0.3: 77 vs int(76.8)
    assert not bool((ref_pruned & mask).any())  # every weight the reference prunes is pruned here too
    assert torch.equal((~mask & ~ref_pruned).sum(1), torch.full((ROWS,), extra))  # and `extra` more per row
    assert torch.equal(got, torch.where(mask, w, 0.0))
