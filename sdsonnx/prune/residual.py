"""One channel permutation of the residual stream, shared by the whole model, folded into its weights (issue 16
item 3, `permute: residual`).

Every Linear that reads the residual stream (through a norm: q/k/v and gate/up of LLaMA-family blocks, q/k/v and
fc1 of OPT) sees the hidden channels in one order. Reordering the residual stream once for the whole model changes
which channels share an N:M group in all of them at once. The order is searched on the readers' Wanda scores
|W_ij| sqrt(sum_t x_tj^2), each reader's scores divided by their total (so that large matrices do not outweigh small
ones), stacked as rows; rows may be subsampled for time (`sample_rows`). The search is permute.search (greedy
channel swaps).

Fold (convention of permute.py: new channel j is old channel perm[j]); with x' = x[perm] the model computes the
same logits:
  readers                      W[:, perm]                     (they read x' = x[perm])
  writers (o_proj, down_proj,  W[perm], bias[perm]            (they write into the permuted stream)
           out_proj, fc2)
  every norm on the stream     weight[perm], bias[perm]       (RMSNorm / LayerNorm statistics are over all
                                                               channels, so they commute with a permutation)
  input embeddings             E[:, perm]                     (or project_in rows, when the model has one)
  positional embeddings        P[:, perm]                     (OPT's embed_positions)
  LM head                      H[:, perm]                     (or project_out columns; a tied head once)
The exported graph has no extra op.
"""
from __future__ import annotations

import hashlib
import logging

import torch
from torch import nn

from .permute import SearchResult, check_permutation, search

log = logging.getLogger(__name__)

READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1")  # Linears reading the normed stream
WRITERS = ("o_proj", "down_proj", "out_proj", "fc2")  # Linears adding into the stream
# model_type values whose blocks and embeddings the fold is known (tested) to preserve; others: RecipeError.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt")
SAMPLE_ROWS = 8192  # rows of the stacked reader scores the search sees (all rows when fewer)


def leaf(name: str) -> str:
    """'model.layers.0.self_attn.q_proj' -> 'q_proj'."""
    return name.rsplit(".", 1)[-1]


def is_reader(name: str) -> bool:
    """True for a Linear name that reads the residual stream (READERS)."""
    return leaf(name) in READERS


def architecture_problem(model_type: str | None) -> str | None:
    """Why `permute: residual` cannot fold into a model of this model_type (None when it can)."""
    if model_type in ARCHITECTURES:
        return None
    return (f"permute: residual folds one channel order into the whole model and is implemented for model_type "
            f"{', '.join(ARCHITECTURES)}; this model is {model_type!r}: use permute: none, mlp, attention or "
            "mlp+attention")


def reader_scores(weight: torch.Tensor, sq_norm: torch.Tensor | None) -> torch.Tensor:
    """W [d_out, d] and sq_norm [d] (None: magnitude) -> S / sum(S) with S_ij = |W_ij| sqrt(sq_norm_j) (Wanda Eq. 1),
    float32 [d_out, d]; a reader's share of the stacked search objective is 1."""
    w = weight.detach().float().abs()
    if sq_norm is not None:
        if sq_norm.shape != (w.shape[1],):
            raise ValueError(f"sq_norm {tuple(sq_norm.shape)} does not match W {tuple(w.shape)}")
        w = w * sq_norm.detach().to(w.device, torch.float32).clamp_min(0).sqrt()
    total = float(w.sum())
    return w / total if total > 0 else w


def sample_rows(scores: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """scores [r, d] -> max(1, round(fraction r)) rows drawn without replacement (seeded), scaled by 1 / fraction
    so that the sample estimates the reader's total; fraction >= 1 keeps all rows."""
    if fraction >= 1:
        return scores
    k = max(1, round(fraction * scores.shape[0]))
    index = torch.randperm(scores.shape[0], generator=generator)[:k]
    return scores[index.to(scores.device)] / fraction


def search_residual(stacked: torch.Tensor, n: int, m: int, max_rounds: int = 100) -> SearchResult:
    """Stacked reader scores [rows, d] -> the shared order of the d residual channels (permute.search)."""
    return search(stacked, n, m, max_rounds=max_rounds)


def permutation_digest(perm: torch.Tensor) -> str:
    """sha256 (hex, 16 chars) of the permutation's indices as int64: its name in report.json."""
    return hashlib.sha256(perm.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: x[perm][inverse(perm)] = x."""
    out = torch.empty_like(perm)
    out[perm] = torch.arange(perm.numel(), dtype=perm.dtype)
    return out


def _is_norm(name: str, module: nn.Module, hidden: int) -> bool:
    weight = getattr(module, "weight", None)
    return ("norm" in leaf(name).lower() and isinstance(weight, torch.Tensor) and tuple(weight.shape) == (hidden,)
            and not isinstance(module, (nn.Linear, nn.Embedding)))


def block_parts(block: nn.Module, hidden: int) -> tuple[list[str], list[str], list[str]]:
    """(readers, writers, norms) of a decoder block, names relative to it: Linears named READERS / WRITERS, and
    every module named *norm* whose weight is [hidden] (q_norm / k_norm of a head are not on the stream)."""
    readers, writers, norms = [], [], []
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear) and leaf(name) in READERS:
            readers.append(name)
        elif isinstance(mod, nn.Linear) and leaf(name) in WRITERS:
            writers.append(name)
        elif _is_norm(name, mod, hidden):
            norms.append(name)
    return readers, writers, norms


def _set(param: nn.Parameter | None, value: torch.Tensor) -> None:
    if param is not None:
        param.data = value.contiguous()


def fold_block(block: nn.Module, perm: torch.Tensor) -> None:
    """Fold the residual order into one decoder block in place (readers' columns, writers' rows and biases, norm
    weights and biases). ValueError when the block has no reader or writer of the stream."""
    hidden = perm.numel()
    readers, writers, norms = block_parts(block, hidden)
    if not readers or not writers:
        raise ValueError(f"block has no residual readers {READERS} or writers {WRITERS}: cannot fold the order")
    modules = dict(block.named_modules())
    for name in readers:
        w = modules[name].weight
        check_permutation(perm, w.shape[1])
        _set(w, w.detach()[:, perm.to(w.device)])
    for name in writers:
        mod = modules[name]
        check_permutation(perm, mod.weight.shape[0])
        index = perm.to(mod.weight.device)
        _set(mod.weight, mod.weight.detach()[index])
        if mod.bias is not None:
            _set(mod.bias, mod.bias.detach()[index])
    for name in norms:
        _fold_vectors(modules[name], perm)


def _fold_vectors(mod: nn.Module, perm: torch.Tensor) -> None:
    for attr in ("weight", "bias"):
        t = getattr(mod, attr, None)
        if isinstance(t, torch.Tensor):
            _set(t, t.detach()[perm.to(t.device)])


def fold_outside(model: nn.Module, blocks_path: str, perm: torch.Tensor) -> list[str]:
    """Fold the residual order into everything outside the decoder blocks (`blocks_path`, e.g. 'model.layers'), in
    place: input embeddings' columns (or project_in's rows), positional embeddings' columns, the final norm, the LM
    head's columns (or project_out's columns; a head tied to the embeddings only once). Returns the names folded."""
    hidden = perm.numel()
    check_permutation(perm, hidden)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    outside = [(n, m) for n, m in model.named_modules() if n != blocks_path and not n.startswith(blocks_path + ".")]
    project_in = next((m for n, m in outside if leaf(n) == "project_in" and isinstance(m, nn.Linear)), None)
    project_out = next((m for n, m in outside if leaf(n) == "project_out" and isinstance(m, nn.Linear)), None)
    done, seen = [], set()

    def columns(name: str, weight: nn.Parameter) -> None:
        if id(weight) in seen:
            return
        seen.add(id(weight))
        check_permutation(perm, weight.shape[1])
        _set(weight, weight.detach()[:, perm.to(weight.device)])
        done.append(name)

    if project_in is not None:
        check_permutation(perm, project_in.weight.shape[0])
        _fold_vectors(project_in, perm)
        done.append("project_in")
        seen.add(id(emb.weight))  # the embeddings feed project_in, not the stream (and a tied head stays)
    else:
        columns("input_embeddings", emb.weight)
    for name, mod in outside:
        if isinstance(mod, nn.Embedding) and mod is not emb and mod.embedding_dim == hidden:
            columns(name, mod.weight)  # learned positions added to the stream
        elif _is_norm(name, mod, hidden):
            _fold_vectors(mod, perm)
            done.append(name)
    if project_out is not None:
        columns("project_out", project_out.weight)
    elif head is not None:
        columns("lm_head", head.weight)
    return done


def fold_model(model: nn.Module, blocks_path: str, blocks: nn.ModuleList, perm: torch.Tensor) -> None:
    """fold_outside and fold_block on every block of a model that holds all its weights (tests, library use)."""
    fold_outside(model, blocks_path, perm)
    for block in blocks:
        fold_block(block, perm)
