"""Literal ports of the reference pruning code: the math (one copy, also read by tests/test_reference_ports.py) and
the layer-wise loop the reference scripts run it in (tools/peer_bench.py's "reference" implementation).

Ported line by line (only the nn.Module / quantizer / CUDA / print / `args` plumbing removed, names kept) from:
  IST-DASLab/sparsegpt  sparsegpt.py   SparseGPT.add_batch, SparseGPT.fasterprune
                        llama.py       llama_sequential (true_sequential off, its default)
  locuslab/wanda        lib/layerwrapper.py WrappedGPT.add_batch; lib/prune.py prune_wanda
The references count n:m as prunen = pruned per group of prunem (2:4 -> prunen=2, prunem=4).
Importable from both venvs (torch and transformers only; no sdsonnx).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


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


# ---- the layer-wise loop (llama_sequential / prune_wanda) ---------------------------------------------------------

def find_layers(module: nn.Module, layers=(nn.Linear,), name: str = "") -> dict[str, nn.Module]:
    """sparsegpt/modelutils.py find_layers: every nn.Linear below `module`, by dotted name."""
    if type(module) in layers:
        return {name: module}
    res = {}
    for name1, child in module.named_children():
        res.update(find_layers(child, layers=layers, name=name + "." + name1 if name != "" else name1))
    return res


def _layer_out(out):
    """Decoder layers return a tensor (transformers >= 4.54) or a tuple whose first element it is (older)."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, calibration: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """llama_sequential's Catcher: (inps [nsamples, seqlen, hidden], the layer kwargs) of calibration [nsamples, seqlen]."""
    layers = model.model.layers
    nsamples, seqlen = calibration.shape
    dtype = next(iter(model.parameters())).dtype
    inps = torch.zeros((nsamples, seqlen, model.config.hidden_size), dtype=dtype)
    cache = {"i": 0, "kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps[cache["i"]] = inp
            cache["i"] += 1
            cache["kwargs"] = kwargs  # the reference keeps attention_mask (+ position_ids in wanda); newer
            raise ValueError          # transformers also need position_embeddings: keep them all

    layers[0] = Catcher(layers[0])
    for j in range(nsamples):
        try:
            model(calibration[j:j + 1])
        except ValueError:
            pass
    layers[0] = layers[0].module
    kwargs = {k: v for k, v in cache["kwargs"].items() if k not in ("past_key_values", "past_key_value", "use_cache")}
    return inps, kwargs


@torch.no_grad()
def reference_prune(model: nn.Module, calibration: torch.Tensor, method: str, sparsity: float, prunen: int = 0,
                    prunem: int = 0, blocksize: int = 128, percdamp: float = .01) -> None:
    """llama_sequential (method 'sparsegpt') / prune_wanda ('wanda') on calibration [nsamples, seqlen], in place:
    per layer, hooks on every Linear see the layer's inputs, all are pruned, then the layer is re-run so the next
    layer sees the pruned outputs."""
    if method not in ("sparsegpt", "wanda"):
        raise ValueError(f"method must be sparsegpt or wanda, got {method!r}")
    use_cache = model.config.use_cache
    model.config.use_cache = False
    layers = model.model.layers
    inps, kwargs = capture_layer0_inputs(model, calibration)
    nsamples = inps.shape[0]
    outs = torch.zeros_like(inps)
    for i in range(len(layers)):
        layer = layers[i]
        subset = find_layers(layer)
        stats = {}

        def add_batch(name):
            def tmp(_, inp, out):
                stats[name] = _accumulate(method, stats.get(name), inp[0].data)
            return tmp

        handles = [subset[name].register_forward_hook(add_batch(name)) for name in subset]
        for j in range(nsamples):
            outs[j] = _layer_out(layer(inps[j].unsqueeze(0), **kwargs))
        for h in handles:
            h.remove()
        for name in subset:
            W = subset[name].weight.data
            if method == "sparsegpt":
                subset[name].weight.data = ref_fasterprune(W, stats[name][0], sparsity, prunen=prunen, prunem=prunem,
                                                           blocksize=blocksize, percdamp=percdamp)
            else:
                W_mask = ref_wanda_mask(W, stats[name][0], sparsity, prune_n=prunen, prune_m=prunem)
                W[W_mask] = 0  ## set weights to zero
        del stats
        for j in range(nsamples):
            outs[j] = _layer_out(layer(inps[j].unsqueeze(0), **kwargs))
        inps, outs = outs, inps
    model.config.use_cache = use_cache


def _accumulate(method: str, state, inp: torch.Tensor):
    """One add_batch of SparseGPT (-> (H, nsamples)) or WrappedGPT (-> (scaler_row, nsamples)), as in the ports above."""
    columns = inp.shape[-1]
    if state is None:
        state = (torch.zeros((columns, columns)) if method == "sparsegpt" else torch.zeros((columns)), 0)
    acc, nsamples = state
    if len(inp.shape) == 2:
        inp = inp.unsqueeze(0)
    tmp = inp.shape[0]
    if len(inp.shape) == 3:
        inp = inp.reshape((-1, inp.shape[-1]))
    inp = inp.t()
    acc *= nsamples / (nsamples + tmp)
    nsamples += tmp
    if method == "sparsegpt":
        inp = math.sqrt(2 / nsamples) * inp.float()
        acc += inp.matmul(inp.t())
    else:
        inp = inp.type(torch.float32)
        acc += torch.norm(inp, p=2, dim=1) ** 2 / nsamples
    return acc, nsamples
