"""sdsonnx: Sparse-Dense-Sparse pruning of causal LMs, exported to ONNX."""
__version__ = "0.1.0"
