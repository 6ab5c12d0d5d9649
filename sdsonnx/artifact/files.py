"""File names of an export folder (docs/ARTIFACTS.md): one place for export, validate and bench."""
from __future__ import annotations

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"  # external weights, when written
MANIFEST = "sdsonnx.json"
VALIDATION_FILE = "validation.json"
