"""Decoder blocks of any Hugging Face causal LM: find them, pick their target Linears, capture and run them.

Architecture-agnostic: blocks are the first ModuleList found at a known path (LLaMA/Mistral/Qwen2/Gemma-3:
`model.layers`, OPT: `model.decoder.layers`, GPT-2/Falcon: `transformer.h`, GPT-NeoX: `gpt_neox.layers`).
The keyword arguments each block receives (rotary embeddings, masks, per-layer-type masks as in Gemma-3)
are recorded from the model's own forward, so no per-architecture code computes them.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from .errors import InputError

BLOCK_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "transformer.h",
    "transformer.layers",
    "gpt_neox.layers",
)
_DROPPED_KWARGS = ("past_key_value", "past_key_values", "layer_past")


class UnsupportedModelError(InputError, ValueError):
    """The model has no decoder blocks at any known path, or no Linear layers in them."""


class _StopForward(Exception):
    """Private: ends a capture forward pass once the needed inputs are recorded."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (path, blocks) of the decoder blocks, e.g. ("model.layers", ModuleList)."""
    for path in BLOCK_PATHS:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    raise UnsupportedModelError(
        f"{type(model).__name__}: no decoder blocks found; looked for a ModuleList at {', '.join(BLOCK_PATHS)}"
    )


def select_targets(names: list[str], targets: list[str] | None, ignore: list[str]) -> list[str]:
    """Names matched (re.search) by any `targets` regex (all when None) and by no `ignore` regex."""
    chosen = [n for n in names if targets is None or any(re.search(t, n) for t in targets)]
    return [n for n in chosen if not any(re.search(i, n) for i in ignore)]


def target_linears(model: nn.Module, targets: list[str] | None = None, ignore: list[str] = ()) -> dict[int, dict[str, nn.Linear]]:
    """{block index: {full module name: Linear}} for the Linears in decoder blocks selected by the regexes.

    lm_head and embeddings are never included: only modules inside the decoder blocks are considered.
    """
    path, blocks = find_blocks(model)
    result: dict[int, dict[str, nn.Linear]] = {}
    for index, block in enumerate(blocks):
        linears = {f"{path}.{index}.{name}": mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}
        keep = select_targets(list(linears), targets, list(ignore))
        result[index] = {name: linears[name] for name in keep}
    if not any(isinstance(m, nn.Linear) for b in blocks for m in b.modules()):
        raise UnsupportedModelError(f"{type(model).__name__}: decoder blocks at {path} contain no nn.Linear layers")
    return result


def unmatched_patterns(names: list[str], patterns: list[str] | None) -> list[str]:
    """The regexes that match none of `names` (a recipe error: a target that prunes nothing)."""
    return [p for p in (patterns or []) if not any(re.search(p, n) for n in names)]


@dataclass
class BlockInputs:
    """What the first block receives for every calibration segment, and every block's keyword arguments.

    hidden: [segments, length, hidden] in the activation dtype
    kwargs: one dict per block (rotary embeddings, attention mask, ...), identical for all segments since all
            segments share one length and carry no padding.
    """

    hidden: torch.Tensor
    kwargs: list[dict]


class _Catcher(nn.Module):
    """Stands in for a block during capture: records its inputs, passes hidden states through unchanged."""

    def __init__(self, block: nn.Module, index: int, record: dict, last: int) -> None:
        super().__init__()
        self.block, self.index, self.record, self.last = block, index, record, last

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)  # e.g. Gemma-3's attention_type read by the model loop

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.record["rows"].append(hidden.detach())
        if self.index not in self.record["kwargs"]:
            self.record["kwargs"][self.index] = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
        if self.index == self.last or len(self.record["kwargs"]) > self.last:
            raise _StopForward
        return (hidden,)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> BlockInputs:
    """Run the model's embedding part on every segment [n, L]; return block 0's inputs and all blocks' kwargs.

    Blocks are replaced by pass-through catchers while this runs, so no block computes anything.
    """
    _, blocks = find_blocks(model)
    record: dict = {"rows": [], "kwargs": {}}
    originals = list(blocks)
    last = len(blocks) - 1
    for i, block in enumerate(originals):
        blocks[i] = _Catcher(block, i, record, last)
    device = model.get_input_embeddings().weight.device
    hidden = None
    try:
        for i, row in enumerate(input_ids):
            try:
                model(input_ids=row[None].to(device), use_cache=False)
            except _StopForward:
                pass
            # each segment's row goes straight into one preallocated tensor: a list of rows joined at the end would
            # hold the stream twice at its peak and leave its freed rows in the allocator's heap (issue 18: ~50 MiB
            # more peak RSS at SmolLM2-135M's protocol)
            row_hidden = record["rows"].pop()[0]
            if hidden is None:
                hidden = torch.empty((len(input_ids), *row_hidden.shape), dtype=dtype, device=row_hidden.device)
            hidden[i] = row_hidden
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    kwargs = [dict(record["kwargs"][i], use_cache=False) for i in range(len(originals))]
    for kw in kwargs:
        if "output_attentions" in kw:
            kw["output_attentions"] = False
    return BlockInputs(hidden=hidden, kwargs=kwargs)


class _Replay(nn.Module):
    """Stands in for a block in a head pass: computes nothing; the last block returns the given hidden states."""

    def __init__(self, block: nn.Module, output: torch.Tensor | None, as_tuple: bool) -> None:
        super().__init__()
        self.block, self.output, self.as_tuple = block, output, as_tuple

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        out = hidden if self.output is None else self.output.to(hidden.device, hidden.dtype)
        return (out,) if self.as_tuple else out


@contextmanager
def replaying(model: nn.Module, as_tuple: bool):
    """Within the block, the model's decoder blocks compute nothing; yields set_output(hidden [1, L, d]) that sets
    what the last block returns, so a forward call runs only the model's own code before and after the blocks
    (embeddings, masks, final norm, LM head) on block outputs computed elsewhere."""
    _, blocks = find_blocks(model)
    originals = list(blocks)
    stand_ins = [_Replay(block, None, as_tuple) for block in originals]
    for i, stand_in in enumerate(stand_ins):
        blocks[i] = stand_in

    def set_output(hidden: torch.Tensor) -> None:
        stand_ins[-1].output = hidden

    try:
        yield set_output
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


def _to(value, device: torch.device, dtype: torch.dtype):
    """Move tensors (also inside tuples) to device; floating tensors to dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device, dtype) for v in value)
    return value


@torch.no_grad()
def run_block(block: nn.Module, hidden, kwargs: dict, out_dtype: torch.dtype | None = None, store=None,
              keep: bool = True):
    """Apply one block to every segment of hidden [n, L, d], one segment at a time; returns [n, L, d] (a tensor,
    or a streams.DiskStream where `store` places it beyond its memory budget), or None when not `keep`."""
    param = next(block.parameters())
    kw = {k: _to(v, param.device, param.dtype) for k, v in kwargs.items()}
    output = None
    for i, row in enumerate(hidden):
        out = block(row[None].to(param.device, param.dtype), **kw)
        if not keep:
            continue
        out = (out[0] if isinstance(out, tuple) else out)[0].to("cpu", out_dtype or hidden.dtype)
        if output is None:
            shape, dtype = (len(hidden), *out.shape), out.dtype
            output = torch.empty(shape, dtype=dtype) if store is None else store.empty(shape, dtype)
        output[i] = out
    return output
