"""Resume a killed run from its last complete block (`sdsonnx run RECIPE --resume`).

After every block the loop commits its state into the run's work area (sdsonnx/outputs.py), folder `resume/`:
  state-<b>.bin          the calibration streams ("stream.<version>.<part>"), the evaluation streams
                         ("eval.<version>") and the weight-figure module's versions ("figure.<i>") after block b,
                         raw bytes one after another (written straight from the tensors: no second copy in RAM)
  state.json             {"format", "identity", "next_block", "tensors", "layout", "tuple_output", "result"}: the commit
                         point, replaced atomically after the tensors file is complete
The block's output shard is renamed into place before either, so a kill anywhere re-runs at most one block.
Nothing else carries over: calibration ids and windows are recomputed from the recipe (and compared through
`identity`), the blocks' keyword arguments are recaptured, and every random draw in the loop has its own seeded
generator, so a resumed run computes bit for bit what the uninterrupted run computes.

identity = recipe hash, model (weight files' names, sizes and mtimes), sha256 of the calibration ids and of the
evaluation windows. `--resume` with a different identity is a ResumeError (exit 2): the finished blocks were
made by another recipe, model or data.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import numpy as np

from .errors import InputError
from .outputs import kill_point
from .report import ModuleRecord, _plain
from .streams import stream_bytes

FORMAT = 1
FOLDER = "resume"


class ResumeError(InputError):
    """The work area was made by another recipe, model or data, or its state is unreadable: exit code 2."""


@dataclass
class LoopState:
    """What the layer-wise loop needs to continue at block `next_block` (see pipeline.prune_model)."""

    next_block: int
    streams: dict  # StreamKey -> [n, L, d]
    eval_hidden: dict[int, torch.Tensor]  # version -> [k, W, d]
    tuple_output: bool | None
    modules: dict[str, ModuleRecord]
    stage_seconds: list[float]
    eval_seconds: dict[str, float]
    block_sparsity: list[float] | None
    figure_versions: list[torch.Tensor]


def tensor_digest(tensor: torch.Tensor | None) -> str | None:
    """sha256 of a tensor's dtype, shape and bytes (None for None)."""
    if tensor is None:
        return None
    h = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def model_identity(folder: Path) -> list[list]:
    """[name, bytes, mtime_ns] of every weight file (and index) of a safetensors model folder."""
    files = sorted(list(folder.glob("*.safetensors")) + list(folder.glob("*.index.json")))
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def identity(recipe_hash: str, model_folder: Path, calibration: torch.Tensor, windows: torch.Tensor | None) -> dict:
    return {"recipe_hash": recipe_hash, "model": [str(model_folder), model_identity(model_folder)],
            "calibration": tensor_digest(calibration), "windows": tensor_digest(windows)}


def write_raw(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, list]:
    """Write the tensors' bytes one after another into `path` (fsynced); returns {name: [dtype, shape, offset]}."""
    layout, offset = {}, 0
    with open(path, "wb") as f:
        for name, tensor in tensors.items():
            rows = [tensor] if isinstance(tensor, torch.Tensor) else tensor  # a DiskStream: row by row
            for part in rows:
                flat = part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(flat))
            layout[name] = [str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset]
            offset += stream_bytes(tensor)
        f.flush()
        os.fsync(f.fileno())
    return layout


def read_raw(path: Path, layout: dict[str, list]) -> dict[str, torch.Tensor]:
    """The tensors write_raw wrote, read back into RAM."""
    out = {}
    for name, (dtype, shape, offset) in layout.items():
        dt = getattr(torch, dtype)
        count = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dt).element_size()
        raw = np.fromfile(path, dtype=np.uint8, count=count, offset=offset)
        if raw.size != count:
            raise ResumeError(f"{path}: resume state truncated at {name}; run without --resume to start over")
        out[name] = torch.from_numpy(raw).view(dt).reshape(shape)
    return out


class Checkpointer:
    """Commits and reads LoopState in `work`/resume for one run identity."""

    def __init__(self, work: Path, ident: dict) -> None:
        self.folder, self.identity = Path(work) / FOLDER, ident

    def load(self) -> LoopState | None:
        """The last committed state; None when there is none; ResumeError when it belongs to another run."""
        from .pipeline import StreamKey

        path = self.folder / "state.json"
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ResumeError(f"{path}: unreadable resume state ({exc}); run without --resume to start over") from None
        if state.get("format") != FORMAT:
            raise ResumeError(f"{path}: resume state of format {state.get('format')}, this sdsonnx writes {FORMAT}; "
                              "run without --resume to start over")
        differ = [k for k in self.identity if json.dumps(self.identity[k]) != json.dumps(state["identity"].get(k))]
        if differ:
            raise ResumeError(f"{path}: cannot resume: {' and '.join(differ)} changed since the interrupted run (its "
                              "finished blocks were made from other inputs); run without --resume to start over")
        tensors = read_raw(self.folder / state["tensors"], state["layout"])
        streams = {StreamKey(*map(int, k.split(".")[1:])): t for k, t in tensors.items() if k.startswith("stream.")}
        evals = {int(k.split(".")[1]): t for k, t in tensors.items() if k.startswith("eval.")}
        figure = [tensors[f"figure.{i}"] for i in range(sum(k.startswith("figure.") for k in tensors))]
        r = state["result"]
        return LoopState(state["next_block"], streams, evals, state["tuple_output"],
                         {n: ModuleRecord.from_dict(m) for n, m in r["modules"].items()}, r["stage_seconds"],
                         r["eval_seconds"], r["block_sparsity"], figure)

    def commit(self, state: LoopState) -> None:
        """Write the tensors file, then replace state.json (the commit point), then drop older tensor files."""
        self.folder.mkdir(exist_ok=True)
        name = f"state-{state.next_block}.bin"
        tensors = {f"stream.{k.version}.{k.part}": t for k, t in state.streams.items()}
        tensors.update({f"eval.{v}": t for v, t in state.eval_hidden.items()})
        tensors.update({f"figure.{i}": t for i, t in enumerate(state.figure_versions)})
        tmp = self.folder / (name + ".partial")
        layout = write_raw(tensors, tmp)
        os.replace(tmp, self.folder / name)
        kill_point(f"state-{state.next_block}")
        record = {"format": FORMAT, "identity": self.identity, "next_block": state.next_block, "tensors": name,
                  "layout": layout,
                  "tuple_output": state.tuple_output,
                  "result": {"modules": _plain(state.modules), "stage_seconds": state.stage_seconds,
                             "eval_seconds": state.eval_seconds, "block_sparsity": state.block_sparsity}}
        tmp = self.folder / "state.json.partial"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.folder / "state.json")
        for old in self.folder.glob("state-*.bin"):
            if old.name != name:
                old.unlink()

    def clear(self) -> None:
        """Remove the resume folder (the run is complete)."""
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)
