"""Speed benchmark of sparse vs dense exports in DeepSparse (own venv, subprocess), ONNX Runtime and OpenVINO (matrix)."""
from .core import ENGINES, run_bench
from .matrix import Entry, run_matrix
from .deepsparse_compat import DeepSparseCompatError, make_deepsparse_compatible, write_deepsparse_copy
from .deepsparse_env import DeepSparseUnavailable, find_deepsparse_python, setup_deepsparse
from .report import bench_chart, bench_table, write_outputs
from .workload import BenchError

__all__ = ["ENGINES", "BenchError", "Entry", "run_matrix", "DeepSparseCompatError", "DeepSparseUnavailable", "bench_chart", "bench_table",
           "find_deepsparse_python", "make_deepsparse_compatible", "run_bench", "setup_deepsparse",
           "write_deepsparse_copy", "write_outputs"]
