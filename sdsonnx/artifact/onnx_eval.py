"""Perplexity of an exported folder through ONNX Runtime: what a pipeline ships, measured as `sdsonnx eval` measures
a checkpoint (same windows, same NLL sum in float64; evaluate.window_nll).

Each window is one batch-1 forward without the KV cache: with-past exports get zero-length past inputs
[1, kv_heads, 0, head_dim], attention_mask all ones, position_ids 0..L-1.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..evaluate import window_nll
from .files import MODEL_FILE


def is_onnx_folder(spec: str | Path) -> bool:
    """Whether `spec` is a folder holding model.onnx (an sdsonnx export)."""
    return (Path(spec) / MODEL_FILE).is_file()


def onnx_session(folder: str | Path, threads: int | None = None):
    """ONNX Runtime CPU session of folder/model.onnx (intra-op threads: torch's thread count unless given)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or torch.get_num_threads()
    # no busy-waiting between ops: on a shared CPU spinning threads burn the cores others need (same results)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(Path(folder) / MODEL_FILE), options, providers=["CPUExecutionProvider"])


def load_onnx(folder: str | Path, threads: int | None = None):
    """(ONNX Runtime session, tokenizer) of an export folder."""
    from transformers import AutoTokenizer

    return onnx_session(folder, threads), AutoTokenizer.from_pretrained(str(folder))


def window_feeds(session, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for token ids [b, L] without KV cache: ones mask, positions 0..L-1, zero-length past tensors."""
    b, length = ids.shape
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, length), np.int64)}
    for inp in session.get_inputs():
        if inp.name == "position_ids":
            feeds["position_ids"] = np.broadcast_to(np.arange(length, dtype=np.int64), (b, length)).copy()
        elif inp.name.startswith("past_key_values"):
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = np.zeros((b, inp.shape[1], 0, inp.shape[3]), dtype)
    return feeds


def onnx_perplexity(session, windows: torch.Tensor, progress: bool = True) -> float:
    """exp(mean next-token NLL) over windows [k, L] through the session: k * (L - 1) predicted tokens."""
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [k >= 1, L >= 2], got {tuple(windows.shape)}")
    total = torch.zeros((), dtype=torch.float64)
    for row in tqdm(windows, desc="perplexity (onnx)", unit="window", disable=not progress, leave=False):
        ids = row[None]
        logits = session.run(["logits"], window_feeds(session, ids.numpy()))[0]
        total += window_nll(torch.from_numpy(logits), ids)
    return math.exp(total.item() / (windows.shape[0] * (windows.shape[1] - 1)))
