"""Output-preserving channel permutation for N:M sparsity (Pool & Yu 2021, "Channel Permutations for N:M Sparsity").

An N:M mask keeps n of every m consecutive input columns of W [d_out, d_in] per row. Reordering the input
columns (and, to keep the function, the producer's output rows that feed them) changes which columns share a
group, and so how much importance the mask can keep. `search_permutation` looks for an order that increases
`kept_score` with greedy channel swaps between groups, as NVIDIA apex's `Channel_Swap` does
(apex/contrib/sparsity/permutation_search_kernels/channel_swap.py): every round scores every swap of two columns
in different groups, applies the best swaps whose groups are still untouched in this round (their gains add up
exactly), and stops when no swap gains. The swap gains come in closed form (below), so one round is one L1
distance matrix (torch.cdist) instead of apex's per-pair CUDA kernel.

Permutation convention: `perm` [d_in] long, new column j is old column perm[j]. The consumer's weight becomes
W[:, perm], the producer's W_p[perm] (and bias b[perm]), the consumer's input statistics X[perm]: then
W[:, perm] (W_p[perm] x + b[perm]) = W (W_p x + b), and with any elementwise activation in between.

`block_mlp_pairs` / `permute_mlp` fold such a permutation into a decoder block's MLP (gate/up rows + down columns,
fc1 rows + fc2 columns); sdsonnx/pipeline.py calls them before the first prune chooses its masks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..stats import LayerStats

log = logging.getLogger(__name__)

# (producer names, consumer name) of an MLP whose hidden units pass through an elementwise activation only,
# as children of one parent module: LLaMA/Mistral/Qwen/Gemma, OPT/Phi, Mixtral experts, GPT-NeoX/Falcon.
MLP_NAMES = ((("gate_proj", "up_proj"), "down_proj"), (("fc1",), "fc2"), (("w1", "w3"), "w2"),
             (("dense_h_to_4h",), "dense_4h_to_h"))


def _check_nm(scores: torch.Tensor, n: int, m: int) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [d_out, d_in], got shape {tuple(scores.shape)}")
    if not 0 < n < m:
        raise ValueError(f"n:m needs 0 < n < m, got {n}:{m}")
    if scores.shape[1] % m:
        raise ValueError(f"d_in {scores.shape[1]} of shape {tuple(scores.shape)} is not a multiple of m={m}")


def check_permutation(perm: torch.Tensor, size: int) -> None:
    """ValueError unless perm is a 1-D integer tensor holding every index 0..size-1 exactly once."""
    if perm.dim() != 1 or perm.dtype not in (torch.int64, torch.int32) or perm.numel() != size:
        raise ValueError(f"a permutation of {size} must be a 1-D integer tensor of that length, got "
                         f"{perm.dtype} {tuple(perm.shape)}")
    if not torch.equal(torch.sort(perm.cpu()).values, torch.arange(size)):
        raise ValueError(f"not a permutation of 0..{size - 1} (an index is missing or repeated)")


def kept_score(scores: torch.Tensor, n: int, m: int) -> float:
    """scores [d_out, d_in] -> sum of the top n of every m consecutive columns per row (what an N:M mask keeps)."""
    _check_nm(scores, n, m)
    grouped = scores.detach().double().reshape(scores.shape[0], -1, m)
    return float(grouped.topk(n, dim=2).values.sum())


def _group_terms(s: torch.Tensor, order: torch.Tensor, n: int, m: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the arrangement `order` (position -> column) of s [d_out, d_in]: per column c, A[c] = sum over rows of the
    top n-1 scores of c's group mates, F[:, c] = per row the n-th largest of its group mates ([d_out, d_in], by
    column id); K [groups] = each group's kept score. Replacing c by column b in c's group then keeps
    A[c] + sum_r max(s[r, b], F[r, c]) (the top n of {mates, b} = top n-1 of mates + max(b, n-th of mates))."""
    rows, cols = s.shape
    vals = s[:, order].reshape(rows, -1, m)
    sv, si = vals.sort(dim=2, descending=True, stable=True)
    rank = torch.empty_like(si).scatter_(2, si, torch.arange(m, device=s.device).expand_as(si).contiguous())
    top_n = sv[..., :n].sum(-1, keepdim=True)  # [rows, groups, 1]
    in_top = rank < n
    mates_top = torch.where(in_top, top_n - vals, top_n - sv[..., n - 1:n])  # top n-1 of the other m-1
    nth = torch.where(in_top, sv[..., n:n + 1], sv[..., n - 1:n])  # n-th largest of the other m-1
    a = torch.empty(cols, dtype=torch.float64, device=s.device)
    a[order] = mates_top.reshape(rows, cols).double().sum(0)
    f = torch.empty_like(s)
    f[:, order] = nth.reshape(rows, cols)
    return a, f, top_n.squeeze(-1).double().sum(0)


def _replacement_rows(s: torch.Tensor, f: torch.Tensor, cols: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """M[c, b] = sum_r max(s[r, b], f[r, c]) for c in cols -> [len(cols), d_in] float64 (max = (x + y + |x - y|) / 2,
    the |x - y| sums one L1 distance matrix)."""
    col_sum = s.double().sum(0)
    out = torch.empty(len(cols), s.shape[1], dtype=torch.float64, device=s.device)
    st = s.T.contiguous().unsqueeze(0)
    for i in range(0, len(cols), chunk):
        fc = f[:, cols[i:i + chunk]]
        dist = torch.cdist(fc.T.contiguous().unsqueeze(0), st, p=1)[0].double()
        out[i:i + chunk] = 0.5 * (col_sum.unsqueeze(0) + fc.double().sum(0).unsqueeze(1) + dist)
    return out


def initial_order(scores: torch.Tensor, m: int) -> torch.Tensor:
    """A starting order [d_in]: columns by decreasing total score dealt round-robin to the groups, so the largest
    columns land in different groups (group g gets sorted columns g, g + G, g + 2G, ...)."""
    cols = scores.shape[1]
    groups = cols // m
    ranked = torch.sort(scores.detach().double().sum(0).cpu(), descending=True, stable=True).indices
    return ranked.reshape(m, groups).T.reshape(-1).clone()


@dataclass(frozen=True)
class SearchResult:
    """What search_permutation found: the order, the kept scores before (identity) and after, rounds, swaps."""

    perm: torch.Tensor
    identity_score: float
    score: float
    rounds: int
    swaps: int

    @property
    def gain(self) -> float:
        """Relative kept-score gain over the identity order."""
        return self.score / self.identity_score - 1.0 if self.identity_score > 0 else 0.0


def search_permutation(scores: torch.Tensor, n: int, m: int, max_rounds: int = 100, start: str = "identity",
                       tol: float = 1e-6) -> torch.Tensor:
    """scores [d_out, d_in] (>= 0) -> perm [d_in] long with kept_score(scores[:, perm]) >= the identity's;
    greedy channel swaps (module doc), at most `max_rounds` rounds; deterministic."""
    return search(scores, n, m, max_rounds, start, tol).perm


def search(scores: torch.Tensor, n: int, m: int, max_rounds: int = 100, start: str = "identity",
           tol: float = 1e-6) -> SearchResult:
    """search_permutation with its scores and counts. `start`: identity | sorted (initial_order) | best (both
    searched, the better kept; ties to identity). A swap must gain more than tol x the mean group score."""
    _check_nm(scores, n, m)
    if start not in ("identity", "sorted", "best"):
        raise ValueError(f"start must be identity, sorted or best, got {start!r}")
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be >= 0, got {max_rounds}")
    s = scores.detach().float()
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("scores must be finite and >= 0 (importance such as |W| or |W| ||x||)")
    cols = s.shape[1]
    identity = torch.arange(cols)
    base = kept_score(s, n, m)
    starts = {"identity": [identity], "sorted": [initial_order(s, m)],
              "best": [identity, initial_order(s, m)]}[start]
    best = None
    for order in starts:
        found = _swap_search(s, order, n, m, max_rounds, tol)
        if best is None or found[1] > best[1]:
            best = found
    perm, score, rounds, swaps = best
    if score < base:  # float rounding only: swaps are taken only with a positive gain
        perm, score = identity, base
    return SearchResult(perm, base, score, rounds, swaps)


PARTNERS = 8  # swaps per column considered in a round (the best ones)


def _swap_search(s: torch.Tensor, order: torch.Tensor, n: int, m: int, max_rounds: int,
                 tol: float) -> tuple[torch.Tensor, float, int, int]:
    """Greedy channel swaps from `order`: (order, its kept score, rounds that swapped, swaps)."""
    cols = s.shape[1]
    groups = cols // m
    order = order.clone().to(s.device)
    a, f, k = _group_terms(s, order, n, m)
    threshold = tol * max(float(k.sum()) / groups, 1e-30)
    table = _replacement_rows(s, f, torch.arange(cols, device=s.device))  # M[c, b], c and b column ids
    position = torch.empty(cols, dtype=torch.long, device=s.device)
    swaps = rounds = 0
    while rounds < max_rounds:
        position[order] = torch.arange(cols, device=s.device)
        group = position // m
        gain = table + table.T  # the swap c <-> b: A[c] + M[c, b] + A[b] + M[b, c] - K[g(c)] - K[g(b)]
        gain += (a - k[group]).unsqueeze(1)
        gain += (a - k[group]).unsqueeze(0)
        gain.masked_fill_(group.unsqueeze(1) == group.unsqueeze(0), float("-inf"))
        best, partner = gain.topk(min(PARTNERS, cols - m), dim=1)  # each column's best swaps (both orders of a pair)
        del gain
        keep = best.reshape(-1) > threshold
        if not bool(keep.any()):
            break
        rounds += 1
        ranked = torch.sort(best.reshape(-1)[keep], descending=True, stable=True).indices
        first_cols = torch.arange(cols, device=s.device).repeat_interleave(best.shape[1])[keep][ranked].tolist()
        candidates = zip(first_cols, partner.reshape(-1)[keep][ranked].tolist())
        group_list, position_list = group.tolist(), position.tolist()
        used: set[int] = set()
        for c, b in candidates:  # best first; each group at most once per round, so the gains add up
            gc, gb = group_list[c], group_list[b]
            if gc in used or gb in used:
                continue
            used.update((gc, gb))
            order[position_list[c]], order[position_list[b]] = b, c
            swaps += 1
            if len(used) >= groups - 1:
                break
        a, f, k = _group_terms(s, order, n, m)
        changed = order.reshape(groups, m)[torch.tensor(sorted(used), device=s.device)].reshape(-1)
        table[changed] = _replacement_rows(s, f, changed)
    return order.cpu(), kept_score(s[:, order], n, m), rounds, swaps


def permute_rows(weight: torch.Tensor, bias: torch.Tensor | None, perm: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Producer W_p [d_hidden, d] and bias [d_hidden] -> (W_p[perm], bias[perm]): its outputs in the new order."""
    check_permutation(perm, weight.shape[0])
    index = perm.to(weight.device)
    return weight[index], None if bias is None else bias[index]


def permute_columns(weight: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Consumer W [d_out, d_hidden] -> W[:, perm]: reads its inputs in the new order."""
    check_permutation(perm, weight.shape[1])
    return weight[:, perm.to(weight.device)]


def permute_stats(stats: LayerStats, perm: torch.Tensor) -> LayerStats:
    """The consumer's input statistics in the new order: X X^T[perm][:, perm], sq_norm[perm], kept inputs' columns."""
    check_permutation(perm, stats.d_in)
    index = perm.to(stats.sq_norm.device) if stats.sq_norm is not None else perm
    return LayerStats(
        stats.d_in, stats.full, stats.keep_inputs,
        None if stats.xtx is None else stats.xtx[index][:, index],
        None if stats.sq_norm is None else stats.sq_norm[index],
        stats.count, [x[:, perm.to(x.device)] for x in stats.inputs])


def block_mlp_pairs(block: nn.Module) -> list[tuple[list[str], str]]:
    """[(producer names, consumer name)] of the block's MLPs (MLP_NAMES, Linears under one parent; names relative to
    the block), where the producers' out_features equal the consumer's in_features."""
    found = []
    for parent_name, parent in block.named_modules():
        children = dict(parent.named_children())
        for producers, consumer in MLP_NAMES:
            names = [*producers, consumer]
            if not all(isinstance(children.get(x), nn.Linear) for x in names):
                continue
            hidden = children[consumer].in_features
            if all(children[p].out_features == hidden for p in producers):
                prefix = f"{parent_name}." if parent_name else ""
                found.append(([prefix + p for p in producers], prefix + consumer))
    return found


def permute_mlp(block: nn.Module, producers: list[str], consumer: str, perm: torch.Tensor) -> None:
    """Fold perm into the block in place: every producer's output rows (and bias), the consumer's input columns."""
    modules = dict(block.named_modules())
    for name in producers:
        mod = modules[name]
        weight, bias = permute_rows(mod.weight.detach(), None if mod.bias is None else mod.bias.detach(), perm)
        mod.weight.data = weight
        if bias is not None:
            mod.bias.data = bias
    mod = modules[consumer]
    mod.weight.data = permute_columns(mod.weight.detach(), perm)


# (value projection, output projection) of an attention module, children of one parent with a `head_dim`.
ATTENTION_NAMES = (("v_proj", "o_proj"), ("v_proj", "out_proj"))


def block_attention_pairs(block: nn.Module) -> list[tuple[str, str, int]]:
    """[(v name, o name, head_dim)] of the block's attention modules (ATTENTION_NAMES, names relative to the block)
    whose shapes fit whole heads: v_proj.out_features = kv_heads x head_dim, o_proj.in_features = heads x head_dim,
    heads a multiple of kv_heads (grouped-query attention: query head h reads kv head h // (heads / kv_heads))."""
    found = []
    for parent_name, parent in block.named_modules():
        children = dict(parent.named_children())
        head_dim = getattr(parent, "head_dim", None)
        for v, o in ATTENTION_NAMES:
            if not (isinstance(children.get(v), nn.Linear) and isinstance(children.get(o), nn.Linear)
                    and isinstance(head_dim, int) and head_dim > 0):
                continue
            kv, q = children[v].out_features, children[o].in_features
            if kv % head_dim == 0 and q % head_dim == 0 and (q // head_dim) % (kv // head_dim) == 0:
                prefix = f"{parent_name}." if parent_name else ""
                found.append((prefix + v, prefix + o, head_dim))
    return found


def head_permutations(scores: torch.Tensor, kv_heads: int, head_dim: int, n: int, m: int, max_rounds: int = 100
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """o_proj scores [d_out, heads * head_dim] -> (perm_v [kv_heads * head_dim], perm_o [heads * head_dim], swaps):
    one order of each kv head's value channels, searched on the o_proj columns of every query head that reads it
    (stacked as rows) and applied to all of them; N:M groups stay inside heads (head_dim % m == 0)."""
    _check_nm(scores, n, m)
    heads = scores.shape[1] // head_dim
    if head_dim % m or scores.shape[1] % head_dim or heads % kv_heads:
        raise ValueError(f"o_proj of {scores.shape[1]} inputs, head_dim {head_dim}, {kv_heads} kv heads: heads must "
                         f"be whole, grouped evenly, and head_dim a multiple of m={m}")
    group = heads // kv_heads
    per_head = scores.reshape(scores.shape[0], heads, head_dim)
    orders, swaps = [], 0
    for k in range(kv_heads):
        stacked = per_head[:, k * group:(k + 1) * group].permute(1, 0, 2).reshape(-1, head_dim)
        found = search(stacked, n, m, max_rounds=max_rounds)
        orders.append(found.perm)
        swaps += found.swaps
    perm_v = torch.cat([k * head_dim + orders[k] for k in range(kv_heads)])
    perm_o = torch.cat([h * head_dim + orders[h // group] for h in range(heads)])
    return perm_v, perm_o, swaps


def permute_attention(block: nn.Module, v_name: str, o_name: str, perm_v: torch.Tensor, perm_o: torch.Tensor) -> None:
    """Fold head_permutations' orders into the block in place: v_proj's output rows (and bias), o_proj's columns."""
    modules = dict(block.named_modules())
    v, o = modules[v_name], modules[o_name]
    weight, bias = permute_rows(v.weight.detach(), None if v.bias is None else v.bias.detach(), perm_v)
    v.weight.data = weight
    if bias is not None:
        v.bias.data = bias
    o.weight.data = permute_columns(o.weight.detach(), perm_o)
