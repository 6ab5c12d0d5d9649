"""sdsonnx's SparseGPT and Wanda against literal ports of the reference code, so a refactor cannot drift unnoticed.

The `ref_*` functions below are line-by-line ports (only the nn.Module / quantizer / CUDA / print plumbing removed,
names kept) of:
  IST-DASLab/sparsegpt  sparsegpt.py   SparseGPT.add_batch, SparseGPT.fasterprune
  locuslab/wanda        lib/layerwrapper.py WrappedGPT.add_batch; lib/prune.py prune_wanda (the mask code)
The references count n:m as prunen = pruned per group of prunem; sdsonnx's Pattern n:m counts kept weights, so
n:m here maps to prunen = m - n. Known, intended differences (asserted exactly below):
  - SparseGPT unstructured: the reference prunes `tmp <= sort(tmp)[int(numel * s)]`, i.e. int(numel * s) + 1
    weights per column block; sdsonnx prunes exactly round(s * numel) over the matrix.
  - Wanda unstructured: the reference prunes int(cols * s) per row (floor), sdsonnx round(cols * s).
"""
from __future__ import annotations

import math

import pytest
import torch

from sdsonnx.pattern import Pattern
from sdsonnx.prune.sparsegpt import sparsegpt_prune
from sdsonnx.prune.wanda import wanda_prune

ROWS, COLS, TOKENS = 48, 256, 768


# ---- literal ports ------------------------------------------------------------------------------------------------

def ref_sparsegpt_hessian(inps: list[torch.Tensor], columns: int) -> torch.Tensor:
    """SparseGPT.add_batch over batches inp [1, L, columns] (nn.Linear branch) -> self.H."""
    H = torch.zeros((columns, columns))
    nsamples = 0
    for inp in inps:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        H *= nsamples / (nsamples + tmp)
        nsamples += tmp
        inp = math.sqrt(2 / nsamples) * inp.float()
        H += inp.matmul(inp.t())
    return H


def ref_fasterprune(weight: torch.Tensor, H: torch.Tensor, sparsity: float, prunen: int = 0, prunem: int = 0,
                    blocksize: int = 128, percdamp: float = .01) -> torch.Tensor:
    """SparseGPT.fasterprune (nn.Linear, no quantizer) -> the new layer weight."""
    W = weight.clone()
    W = W.float()
    rows, columns = W.shape
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    Losses = torch.zeros(rows)

    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H

    mask = None

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        if prunen == 0:
            if mask is not None:
                mask1 = mask[:, i1:i2]
            else:
                tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]

            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)

            q = w.clone()
            q[mask1[:, i]] = 0

            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2

            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        Losses += torch.sum(Losses1, 1) / 2

        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    return W.reshape(weight.shape).to(weight.dtype)


def ref_wanda_scaler_row(inps: list[torch.Tensor], columns: int) -> torch.Tensor:
    """WrappedGPT.add_batch over batches inp [1, L, columns] (nn.Linear branch) -> self.scaler_row."""
    scaler_row = torch.zeros((columns))
    nsamples = 0
    for inp in inps:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        scaler_row *= nsamples / (nsamples + tmp)
        nsamples += tmp
        inp = inp.type(torch.float32)
        scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / nsamples
    return scaler_row


def ref_wanda_mask(weight: torch.Tensor, scaler_row: torch.Tensor, sparsity_ratio: float, prune_n: int = 0,
                   prune_m: int = 0) -> torch.Tensor:
    """prune_wanda's mask code (use_variant off) -> W_mask (True = pruned, as in the reference)."""
    W_metric = torch.abs(weight) * torch.sqrt(scaler_row.reshape((1, -1)))
    W_mask = (torch.zeros_like(W_metric) == 1)  ## initialize a mask to be all False
    if prune_n != 0:
        # structured n:m sparsity
        for ii in range(W_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = W_metric[:, ii:(ii + prune_m)].float()
                W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        sort_res = torch.sort(W_metric, dim=-1, stable=True)
        # unstructured pruning
        indices = sort_res[1][:, :int(W_metric.shape[1] * sparsity_ratio)]
        W_mask.scatter_(1, indices, True)
    return W_mask


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
