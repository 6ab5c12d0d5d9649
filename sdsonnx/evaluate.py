"""Perplexity of a causal LM on fixed windows of token ids."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (float64 scalar) of logits [b, L, V] for ids [b, L]; position 0 is not predicted."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").double()


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> float:
    """exp(mean next-token NLL) over all windows [k, L]: k * (L - 1) predicted tokens, on the model's device."""
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [k >= 1, L >= 2], got {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        total += window_nll(logits, batch).cpu()
    return math.exp(total.item() / (windows.shape[0] * (windows.shape[1] - 1)))


@torch.no_grad()
def head_perplexity(model: torch.nn.Module, windows: torch.Tensor, final_hidden: torch.Tensor, as_tuple: bool,
                    progress: bool = False) -> float:
    """perplexity() from the last block's outputs final_hidden [k, L, d] of windows [k, L]: the model's own code
    after the blocks (final norm, LM head) turns them into logits, one window at a time as perplexity() does."""
    from .blocks import replaying

    device = model.get_input_embeddings().weight.device
    total = torch.zeros((), dtype=torch.float64)
    with replaying(model, as_tuple) as set_output:
        for ids, hidden in tqdm(zip(windows, final_hidden), total=len(windows), desc="perplexity", disable=not progress,
                                leave=False):
            set_output(hidden[None])
            batch = ids[None].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            total += window_nll(logits, batch).cpu()
    return math.exp(total.item() / (windows.shape[0] * (windows.shape[1] - 1)))


@torch.no_grad()
def streamed_final_hidden(folder, ids: torch.Tensor, dtype: torch.dtype = torch.float32):
    """(model skeleton, last block's outputs [n, L, d], blocks return tuples) for token ids [n, L] of a safetensors
    checkpoint `folder`, holding one decoder block at a time: block 0's inputs come from the model's own
    embedding code, each block is loaded from the shards in `dtype`, applied one row at a time and dropped."""
    from transformers import AutoConfig

    from .blocks import capture_block_inputs, find_blocks, run_block
    from .shards import ShardReader, block_prefix, materialize, release, skeleton

    reader = ShardReader(folder)
    model = skeleton(AutoConfig.from_pretrained(folder), dtype, reader).eval()
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, ids, dtype)
    hidden, tuple_output = inputs.hidden, []
    for index, block in enumerate(blocks):
        materialize(block, block_prefix(model, index), reader, dtype)
        handle = block.register_forward_hook(lambda m, a, out: tuple_output.append(isinstance(out, tuple)))
        hidden = run_block(block, hidden, inputs.kwargs[index])
        handle.remove()
        release(block)
    return model, hidden, bool(tuple_output and tuple_output[0])


def streamed_perplexity(folder, windows: torch.Tensor, progress: bool = False) -> float:
    """perplexity() of a float32 safetensors checkpoint that is never whole in memory (streamed_final_hidden,
    then the model's own final norm and LM head: head_perplexity)."""
    model, hidden, as_tuple = streamed_final_hidden(folder, windows)
    return head_perplexity(model, windows, hidden, as_tuple, progress)
