"""Where hidden-state streams live: in RAM up to a memory budget, in files beyond it.

A stream is [n, L, d] (calibration segments or evaluation windows); the loop only ever reads and writes it one
segment at a time (blocks.run_block), so a stream over the budget is a DiskStream: a plain file read and written
row by row with pread/pwrite. Unlike a memory map, its pages never count in the process's resident memory; the
kernel's page cache holds what fits.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


class DiskStream:
    """A [n, L, d] tensor of `dtype` in an unlinked temporary file of `folder`, accessed by row (segment)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, folder: Path) -> None:
        self.shape, self.dtype = torch.Size(shape), dtype
        self.row_shape = self.shape[1:]
        self.row_bytes = math.prod(self.row_shape) * torch.empty((), dtype=dtype).element_size()
        fd, path = tempfile.mkstemp(prefix="stream-", suffix=".bin", dir=folder)
        os.unlink(path)  # the open descriptor keeps the data; nothing is left behind by a kill
        self.fd = fd
        os.ftruncate(fd, self.shape[0] * self.row_bytes)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.shape[0]:
            raise IndexError(i)
        raw = bytearray(os.pread(self.fd, self.row_bytes, i * self.row_bytes))
        return torch.frombuffer(raw, dtype=torch.uint8).view(self.dtype).reshape(self.row_shape)

    def __setitem__(self, i: int, row: torch.Tensor) -> None:
        data = row.detach().to("cpu", self.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != self.row_bytes:
            raise ValueError(f"row of {data.nbytes} bytes, stream rows are {self.row_bytes}")
        os.pwrite(self.fd, memoryview(data), i * self.row_bytes)

    def __iter__(self):
        return (self[i] for i in range(self.shape[0]))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


def stream_bytes(stream) -> int:
    return stream.nbytes if isinstance(stream, DiskStream) else stream.numel() * stream.element_size()


class StreamStore:
    """Allocates streams: a torch tensor while the streams held in RAM stay within `budget` bytes (None: no
    limit), else a DiskStream in `folder`. `release` returns a stream's share of the budget."""

    def __init__(self, budget: int | None = None, folder: Path | None = None) -> None:
        self.budget, self.folder = budget, folder
        self.in_ram: dict[int, int] = {}  # id(tensor) -> bytes

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype):
        need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self.budget is None or sum(self.in_ram.values()) + need <= self.budget:
            tensor = torch.empty(shape, dtype=dtype)
            self.in_ram[id(tensor)] = need
            return tensor
        if self.folder is None:
            raise ValueError("a memory budget needs a folder for the streams beyond it")
        return DiskStream(shape, dtype, self.folder)

    def release(self, stream) -> None:
        if isinstance(stream, DiskStream):
            stream.close()
        else:
            self.in_ram.pop(id(stream), None)

    def adopt(self, tensor: torch.Tensor):
        """A stream read whole into RAM (a resumed state) placed by the budget: itself, or a DiskStream copy."""
        stream = self.empty(tuple(tensor.shape), tensor.dtype)
        if isinstance(stream, DiskStream):
            for i, row in enumerate(tensor):
                stream[i] = row
            return stream
        self.in_ram.pop(id(stream))
        self.in_ram[id(tensor)] = stream_bytes(tensor)
        return tensor


def to_numpy_bytes(stream) -> np.ndarray | None:
    """The stream's bytes as a uint8 array for a RAM tensor (None for a DiskStream: copy it row by row)."""
    if isinstance(stream, DiskStream):
        return None
    return stream.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
