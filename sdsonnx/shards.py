"""Weights one decoder block at a time: a model skeleton on the meta device, blocks read from safetensors shards
(memory-mapped) and written to the output's shards as soon as they are final.

Only the block being processed holds real parameters; embeddings, final norm and LM head are loaded once (they
are small beside the blocks: 0.5 GB of LLaMA-7B's 13.5 GB in fp16). The output is a Hugging Face sharded
checkpoint: `model-0000i-of-0000n.safetensors` (one per block, the last one for everything else) and
`model.safetensors.index.json`, which `from_pretrained` reads as it reads any sharded checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
from itertools import chain
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .blocks import find_blocks
from .errors import InputError
from .outputs import kill_point

log = logging.getLogger(__name__)
INDEX_FILE = "model.safetensors.index.json"


def too_large_to_load(folder: Path) -> bool:
    """True when the safetensors weights of `folder`, in float32, exceed a quarter of this machine's memory: a
    whole-model load (and optimum's export, which holds them about three times) would not fit comfortably, so
    export, validate and eval stream them instead. False for a folder without safetensors."""
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= int(dim)
                total += 4 * count
    return total > os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 4


class ShardError(InputError):
    """A checkpoint's tensors do not match its config (a missing tensor, a wrong shape): exit code 2."""


class ShardReader:
    """The tensors of a safetensors checkpoint folder (one file, or several with an index), memory-mapped, by name."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            self.where = {name: self.folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.where = {}
            for path in sorted(self.folder.glob("*.safetensors")):
                with safe_open(path, framework="pt") as f:
                    self.where.update({name: path for name in f.keys()})

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor `name` in its stored dtype (read from the memory-mapped file)."""
        path = self.where.get(name)
        if path is None:
            raise ShardError(f"{self.folder}: the checkpoint has no tensor {name}")
        with safe_open(path, framework="pt") as f:  # not kept open: an open file's touched pages stay resident
            return f.get_tensor(name)

    def check_finite(self, names: list[str]) -> None:
        """ModelSourceError naming the first floating tensor with NaN or Inf (as models.check_finite), read one at a
        time."""
        from .models import ModelSourceError

        for name in names:
            tensor = self.get(name)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ModelSourceError(f"{self.folder}: tensor {name} has {bad} NaN/Inf value(s) of {tensor.numel()}: "
                                       "the weights are corrupted; re-save or re-download the model")


def meta_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """{local name: tensor} of the module's parameters and buffers that are still on the meta device."""
    return {n: t for n, t in chain(module.named_parameters(), module.named_buffers()) if t.is_meta}


def materialize(module: nn.Module, prefix: str, reader: ShardReader, dtype: torch.dtype) -> None:
    """Load every meta parameter/buffer of `module` from reader[prefix + name], floating ones cast to dtype
    (as from_pretrained(dtype=...) casts them)."""
    state = {}
    for name, meta in meta_tensors(module).items():
        tensor = reader.get(prefix + name)
        if tuple(tensor.shape) != tuple(meta.shape):
            raise ShardError(f"{reader.folder}: tensor {prefix + name} has shape {tuple(tensor.shape)}, the model's "
                             f"config needs {tuple(meta.shape)}")
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    module.load_state_dict(state, strict=False, assign=True)


def release(module: nn.Module) -> None:
    """Move the module's parameters back to the meta device (buffers stay: they are small and not all reloadable)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and not param.is_meta:
                sub._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                     requires_grad=param.requires_grad)


def skeleton(config, dtype: torch.dtype, reader: ShardReader, trust_remote_code: bool = False) -> nn.Module:
    """The model of `config` with decoder-block parameters on the meta device and everything else loaded from
    `reader` (tied LM head re-tied); eval mode, use_cache off. Raises ShardError when a tensor is missing."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.accelerate import init_empty_weights

    config.use_cache = False
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    path, blocks = find_blocks(model)
    block_ids = {id(m) for b in blocks for m in b.modules()}
    outside = [(name, m) for name, m in model.named_modules() if id(m) not in block_ids]
    for name, module in outside:
        direct = {n: t for n, t in chain(module._parameters.items(), module._buffers.items())
                  if t is not None and t.is_meta}
        state = {}
        for local, meta in direct.items():
            full = f"{name}.{local}" if name else local
            if full not in reader.where and _tied_head(model, full):
                continue
            tensor = reader.get(full)
            if tuple(tensor.shape) != tuple(meta.shape):
                raise ShardError(f"{reader.folder}: tensor {full} has shape {tuple(tensor.shape)}, the model's config "
                                 f"needs {tuple(meta.shape)}")
            state[local] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        if state:
            module.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers())
            if t.is_meta and not n.startswith(path + ".")]
    if left:
        raise ShardError(f"{reader.folder}: the checkpoint lacks {left[:3]}")
    model.eval()
    return model


def _tied_head(model: nn.Module, name: str) -> bool:
    """True for the LM head weight of a model whose config ties it to the input embedding."""
    out = model.get_output_embeddings()
    return bool(getattr(model.config, "tie_word_embeddings", False)) and out is not None and \
        name == next(n for n, m in model.named_modules() if m is out) + ".weight"


def streamable(reader: ShardReader, model: nn.Module) -> bool:
    """True when the checkpoint names every parameter of the skeleton (tied head aside), as the loop reads it."""
    wanted = [n for n, _ in model.named_parameters()]
    return all(n in reader.where or _tied_head(model, n) for n in wanted)


def block_prefix(model: nn.Module, index: int) -> str:
    """'model.layers.3.': the state-dict prefix of decoder block `index`."""
    return f"{find_blocks(model)[0]}.{index}."


class ShardWriter:
    """Writes a Hugging Face sharded safetensors checkpoint one shard at a time (each file atomically: a temporary
    name, then rename), and the index last."""

    def __init__(self, folder: Path, shards: int) -> None:
        self.folder, self.shards = Path(folder), shards

    def file_name(self, shard: int) -> str:
        return f"model-{shard + 1:05d}-of-{self.shards:05d}.safetensors"

    def done(self, shard: int) -> bool:
        return (self.folder / self.file_name(shard)).is_file()

    def write(self, shard: int, tensors: dict[str, torch.Tensor]) -> None:
        path = self.folder / self.file_name(shard)
        tmp = path.with_name(path.name + ".partial")
        save_file({n: t.detach().contiguous() for n, t in tensors.items()}, str(tmp), metadata={"format": "pt"})
        kill_point(f"shard-{shard}")
        os.replace(tmp, path)

    def finish(self) -> None:
        """Write model.safetensors.index.json from the shards on disk (every shard must be there)."""
        weight_map, total = {}, 0
        for shard in range(self.shards):
            path = self.folder / self.file_name(shard)
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    weight_map[name] = path.name
            total += _tensor_bytes(path)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        tmp = self.folder / (INDEX_FILE + ".partial")
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, self.folder / INDEX_FILE)


def _tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (its size less the 8-byte length and the JSON header)."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


def unique_state(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """module.state_dict() with prefixed names and each shared tensor once (its first name, as save_pretrained
    keeps the input embedding of a tied LM head)."""
    seen, out = set(), {}
    for name, tensor in module.state_dict().items():
        if tensor.is_meta:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[prefix + name] = tensor
    return out


class InMemoryWeights:
    """Block weights of a model that holds all of them (tests, library use): nothing to load or write."""

    def load(self, index: int, block: nn.Module) -> None:
        """Give `block` its stored weights (here: it has them)."""

    def release(self, index: int, block: nn.Module) -> None:
        """The block's weights are no longer needed and were not changed (a read-only pass such as OWL's)."""

    def finish(self, index: int, block: nn.Module) -> None:
        """The block holds its final weights."""


class StreamedWeights(InMemoryWeights):
    """Block weights read from `reader` when a block starts and written to `writer` (shard `index`) when it ends;
    in between only that block's parameters are real."""

    def __init__(self, model: nn.Module, reader: ShardReader, writer: ShardWriter, dtype: torch.dtype) -> None:
        self.model, self.reader, self.writer, self.dtype = model, reader, writer, dtype

    def load(self, index: int, block: nn.Module) -> None:
        materialize(block, block_prefix(self.model, index), self.reader, self.dtype)

    def release(self, index: int, block: nn.Module) -> None:
        release(block)

    def finish(self, index: int, block: nn.Module) -> None:
        self.writer.write(index, unique_state(block, block_prefix(self.model, index)))
        release(block)

    def finish_model(self) -> None:
        """Write everything outside the blocks (the last shard) and the index."""
        path, _ = find_blocks(self.model)
        rest = {n: t for n, t in unique_state(self.model).items() if not n.startswith(path + ".")}
        self.writer.write(self.writer.shards - 1, rest)
        self.writer.finish()
        for stray in self.writer.folder.glob("*.partial"):  # left by a kill mid-write before a resume
            stray.unlink()
