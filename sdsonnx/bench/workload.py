"""What is benchmarked: an exported model's inputs for a phase, and how much of its work the pruning removes.

Which weights are pruned, and their pattern, come from the artifact's own `sdsonnx.*` metadata when the model
has it: the weights `sdsonnx.initializers` lists with at least one zero (a dense export lists its target weights
with none), and `sdsonnx.pattern`. Only a bare .onnx without that metadata
falls back to a rule: a MatMul/Gemm weight with at least PRUNED_MIN_ZEROS exact zeros counts as pruned, and
its pattern is detected from its values (masks.satisfied_patterns along the consuming node's input axis).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..artifact.files import MANIFEST, MODEL_FILE
from ..artifact.initializers import WeightMappingError, consumers, input_axis
from ..artifact.metadata import SparsityMetadata, global_pattern, parse_props, read_props
from ..masks import satisfied_patterns
from ..errors import InputError

PRUNED_MIN_ZEROS = 0.10  # bare .onnx only: a weight with at least this share of exact zeros counts as pruned
_FLOAT = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


class BenchError(InputError, ValueError):
    """Bad benchmark input (missing model, mismatched exports, unsupported inputs): exit code 2."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    dims: tuple  # int for fixed dims, str for symbolic ones
    dtype: np.dtype


@dataclass(frozen=True)
class Case:
    """One timed workload: `steps` runs of a model on inputs of `seq` new tokens after `past` cached ones."""

    phase: str  # "prefill" | "decode"
    batch: int
    seq: int
    past: int
    steps: int

    @property
    def tokens(self) -> int:
        """Tokens processed by one timed repetition."""
        return self.batch * self.seq * self.steps

    @property
    def key(self) -> str:
        return f"{self.phase}-b{self.batch}-s{self.seq}-p{self.past}"


@dataclass
class ModelInfo:
    """An export folder (or .onnx file) read without running it."""

    path: Path  # the .onnx file
    label: str
    inputs: list[InputSpec]
    outputs: list[str]
    config: dict
    with_past: bool
    vocab_size: int
    weights: dict[str, tuple[int, int]] = field(default_factory=dict)  # MatMul/Gemm weight -> (numel, zeros)
    manifest: dict | None = None
    pruned_names: frozenset[str] | None = None  # from sdsonnx.initializers; None: no metadata, the zeros rule
    found_pattern: str | None = None  # sdsonnx.pattern, or the pattern detected in a bare .onnx

    @property
    def pruned(self) -> dict[str, tuple[int, int]]:
        """{weight: (numel, zeros)} of the pruned weights: those the metadata lists, else the zeros rule's."""
        if self.pruned_names is not None:
            return {k: v for k, v in self.weights.items() if k in self.pruned_names}
        return {k: v for k, v in self.weights.items() if v[1] >= PRUNED_MIN_ZEROS * v[0]}

    @property
    def sparsity(self) -> float:
        """Share of zeros over the pruned weights (0 for a dense model)."""
        pruned = self.pruned.values()
        numel = sum(n for n, _ in pruned)
        return sum(z for _, z in pruned) / numel if numel else 0.0

    @property
    def pattern(self) -> str:
        if self.found_pattern is not None:
            return self.found_pattern
        if self.manifest and isinstance(self.manifest.get("sparsity"), dict):
            return str(self.manifest["sparsity"].get("pattern", "?"))
        return "unstructured" if self.pruned else "dense"


def _dtype(elem: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))


def load_model_info(target: str | Path, label: str | None = None) -> ModelInfo:
    """Read an export folder (model.onnx [+ config.json, sdsonnx.json]) or a bare .onnx file."""
    target = Path(target)
    path = target / MODEL_FILE if target.is_dir() else target
    if not path.is_file():
        raise BenchError(f"{target}: no {MODEL_FILE} (expected an export folder from `sdsonnx export` or an .onnx file)")
    folder = path.parent
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    manifest = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).is_file() else None
    model = onnx.load(path, load_external_data=False)
    inputs = [InputSpec(i.name, tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                      for d in i.type.tensor_type.shape.dim), _dtype(i.type.tensor_type.elem_type))
              for i in model.graph.input]
    meta = _metadata(model, path)
    uses = consumers(model) if meta is None else {}
    init = {t.name: t for t in model.graph.initializer}
    weights, satisfied, vocab = {}, [], int(config.get("vocab_size") or 0)
    # a tied LM head is often Transpose(embedding) -> MatMul: count it as the embedding's weight
    via = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in init}
    wanted = [via.get(name, name) for node in model.graph.node if node.op_type in ("MatMul", "Gemm")
              for name in node.input[:2]] + sorted(meta.initializers if meta else [])
    for name in wanted:
        t = init.get(name)
        if t is not None and len(t.dims) == 2 and t.data_type in _FLOAT and t.name not in weights:
            arr = numpy_helper.to_array(t, base_dir=str(folder))
            weights[t.name] = (int(arr.size), int(np.count_nonzero(arr == 0)))
            if meta is None and weights[t.name][1] >= PRUNED_MIN_ZEROS * arr.size:
                satisfied.append(_satisfied(arr, t.name, uses))
    for node in model.graph.node:
        if not vocab and node.op_type == "Gather" and node.input[1] == "input_ids" and node.input[0] in init:
            vocab = int(init[node.input[0]].dims[0])
    if not vocab:
        raise BenchError(f"{path}: cannot tell the vocabulary size (no config.json and no embedding Gather)")
    known = {"input_ids", "attention_mask", "position_ids"}
    odd = [i.name for i in inputs if i.name not in known and not i.name.startswith("past_key_values.")]
    if odd or "input_ids" not in {i.name for i in inputs}:
        raise BenchError(f"{path}: unsupported inputs {odd or '(no input_ids)'}: expected a causal-LM export")
    with_past = any(i.name.startswith("past_key_values.") for i in inputs)
    pruned = None if meta is None else frozenset(n for n, e in meta.initializers.items() if e.zeros)
    return ModelInfo(path, label or folder.name, inputs, [o.name for o in model.graph.output], config, with_past,
                     vocab, weights, manifest, pruned, global_pattern(satisfied) if meta is None else meta.pattern)


def _metadata(model: onnx.ModelProto, path: Path) -> SparsityMetadata | None:
    """The model's sdsonnx.* metadata; None for a bare .onnx without it (BenchError when present but unusable)."""
    props = read_props(model)
    if not props:
        return None
    meta, problems = parse_props(props)
    if meta is None:
        raise BenchError(f"{path}: unreadable sdsonnx metadata ({problems[0]}); run `sdsonnx validate` on it")
    return meta


def _satisfied(arr: np.ndarray, name: str, uses: dict) -> list[str]:
    """Standard n:m patterns a weight of a bare .onnx satisfies along its consuming node's input axis."""
    try:
        axis, _ = input_axis(name, uses)
    except WeightMappingError:
        return []
    return satisfied_patterns(arr, axis)


def make_feeds(info: ModelInfo, case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for one case: random token ids, all-ones mask, positions past..past+seq-1, random KV cache [B,h,past,d].

    With past == 0 the cache inputs are left out: prefill runs the graph without them (graphs.strip_past).
    """
    rng = np.random.default_rng(seed)
    b, s, p = case.batch, case.seq, case.past
    if p and not info.with_past:
        raise BenchError(f"{info.path}: has no past_key_values inputs, cannot run a {case.phase} case with a cache")
    feeds = {}
    for spec in info.inputs:
        if spec.name == "input_ids":
            arr = rng.integers(0, info.vocab_size, (b, s))
        elif spec.name == "attention_mask":
            arr = np.ones((b, p + s))
        elif spec.name == "position_ids":
            arr = np.broadcast_to(np.arange(p, p + s), (b, s))
        elif not p:
            continue
        else:
            heads, head_dim = spec.dims[1], spec.dims[3]
            if not (isinstance(heads, int) and isinstance(head_dim, int)):
                raise BenchError(f"{info.path}: {spec.name} has no fixed head count/size: {spec.dims}")
            arr = rng.standard_normal((b, heads, p, head_dim))
        feeds[spec.name] = np.ascontiguousarray(arr, dtype=spec.dtype)
    return feeds


def work_share(sparse: ModelInfo, case: Case) -> dict:
    """Share f of the case's multiply-adds in the pruned weights, their sparsity s, and the two speed-up limits.

    Work per token: 2*numel for each weight matmul, 4*ctx*hidden per layer for attention (QK^T and AV over ctx
    keys). ideal = 1/(1-s) (pruned matmuls alone, all zeros skipped for free); amdahl = 1/(1 - f*s) (whole model).
    """
    pruned, all_w = sparse.pruned, sparse.weights
    per_token_linear = 2 * sum(n for n, _ in all_w.values())
    per_token_pruned = 2 * sum(n for n, _ in pruned.values())
    layers = int(sparse.config.get("num_hidden_layers") or 0)
    hidden = int(sparse.config.get("hidden_size") or 0)
    ctx = case.past + case.seq  # ONNX attention computes the full (masked) score matrix
    per_token_attention = 4 * ctx * hidden * layers
    total = per_token_linear + per_token_attention
    f = per_token_pruned / total if total else 0.0
    s = sparse.sparsity
    return {"pruned_work_share": f, "sparsity": s, "limit_ideal": 1.0 / (1.0 - s) if s < 1 else float("inf"),
            "limit_amdahl": 1.0 / (1.0 - f * s)}
