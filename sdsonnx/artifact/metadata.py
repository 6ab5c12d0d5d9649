"""Sparsity metadata stored in ModelProto.metadata_props under keys prefixed `sdsonnx.` (format version 2; 1 is read).

Every value is a string (ONNX metadata is string -> string); readable with plain `onnx`:

    meta = {p.key: p.value for p in onnx.load("model.onnx", load_external_data=False).metadata_props}
    json.loads(meta["sdsonnx.initializers"])

Keys (docs/ARTIFACTS.md is the reference):
  sdsonnx.format_version   "2" ("1": written before quantized artifacts; still read)
  sdsonnx.sparsity         zeros / elements over the pruned weights listed in sdsonnx.initializers (repr float)
  sdsonnx.pattern          "dense" | "unstructured" | "n:m" (tightest standard n:m every listed weight satisfies)
  sdsonnx.initializers     JSON {initializer: {module, shape, axis, zeros, numel, sparsity, pattern, sha256}}
  sdsonnx.recipe_hash      sha256 of the resolved recipe, "" when the checkpoint had none
  sdsonnx.source_sha256    hash of the source checkpoint's weights (see checkpoint.weights_digest)
  sdsonnx.version          sdsonnx version that wrote the metadata
  sdsonnx.quantization     version 2: "none", or JSON {scheme, options, quantized: {initializer: {...}}, fp32: [...]}

Version 2 adds the entry fields `scheme` ("fp32" or the quantization scheme) and `zero_point` (the stored value
that means zero: 0 for fp32 and symmetric INT8, 128 / 8 for MatMulNBits 8 / 4 bit), and `zeros` counts elements
equal to the zero point (artifact/quantized.py); for fp32 weights every field means what it meant in version 1.

`describe_initializer` measures one stored weight into its entry and `global_pattern` combines the entries'
patterns: export writes what they measure and validate compares it with what was written.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass

import numpy as np

from ..masks import STANDARD_NM, satisfied_patterns, tightest

PREFIX = "sdsonnx."
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
KEYS = ("format_version", "sparsity", "pattern", "initializers", "recipe_hash", "source_sha256", "version")
ENTRY_FIELDS = ("module", "shape", "axis", "zeros", "numel", "sparsity", "pattern", "sha256")
ENTRY_FIELDS_V2 = ENTRY_FIELDS + ("scheme", "zero_point")
_PATTERN = re.compile(r"^(dense|unstructured|\d+:\d+)$")
_HEX = re.compile(r"^[0-9a-f]*$")


@dataclass
class InitializerSparsity:
    """Sparsity of one pruned weight as stored in ONNX: `axis` is the stored array's input (N:M group) axis."""

    module: str  # torch module name, e.g. model.layers.0.mlp.up_proj
    shape: list[int]  # shape of the ONNX initializer
    axis: int
    zeros: int  # elements equal to zero (-0.0 included)
    numel: int
    sparsity: float  # zeros / numel
    pattern: str  # "dense" | "unstructured" | "n:m"
    sha256: str  # sha256 of the initializer's little-endian bytes
    scheme: str = "fp32"  # version 2: fp32 or the quantization scheme (int8-nbits, ...)
    zero_point: int | None = 0  # version 2: stored value meaning zero (None: differs per channel/block)


@dataclass
class SparsityMetadata:
    format_version: int
    sparsity: float
    pattern: str
    initializers: dict[str, InitializerSparsity]
    recipe_hash: str
    source_sha256: str
    version: str
    quantization: str = "none"  # version 2: "none" or the sdsonnx.quantization JSON text


def array_sha256(a: np.ndarray) -> str:
    """sha256 of the array's C-order little-endian bytes (the stored layout, no shape)."""
    return hashlib.sha256(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()).hexdigest()


def describe_initializer(module: str, stored: np.ndarray, axis: int) -> tuple[InitializerSparsity, list[str] | None]:
    """Metadata entry of one stored weight and its satisfied patterns (None when it has no zero)."""
    zeros = int(np.count_nonzero(stored == 0))
    satisfied = satisfied_patterns(stored, axis) if zeros else None
    entry = InitializerSparsity(module=module, shape=list(stored.shape), axis=axis, zeros=zeros, numel=int(stored.size),
                                sparsity=zeros / stored.size if stored.size else 0.0, pattern=tightest(satisfied),
                                sha256=array_sha256(stored))
    return entry, satisfied


def global_pattern(per_weight: list[list[str] | None]) -> str:
    """Combine per-weight satisfied-pattern lists (None = dense): the tightest n:m all satisfy, else unstructured."""
    if all(p is None for p in per_weight):
        return tightest(None)
    return tightest([f"{n}:{m}" for n, m in STANDARD_NM if all(p is not None and f"{n}:{m}" in p for p in per_weight)])


def global_sparsity(entries: dict[str, InitializerSparsity]) -> float:
    """Zeros over elements of all listed weights (0.0 when none are listed)."""
    numel = sum(e.numel for e in entries.values())
    return sum(e.zeros for e in entries.values()) / numel if numel else 0.0


def to_props(meta: SparsityMetadata) -> dict[str, str]:
    """The metadata as the string -> string map written into the model."""
    fields = ENTRY_FIELDS if meta.format_version == 1 else ENTRY_FIELDS_V2
    entries = {name: {k: asdict(e)[k] for k in fields} for name, e in sorted(meta.initializers.items())}
    values = {"format_version": str(meta.format_version), "sparsity": repr(float(meta.sparsity)),
              "pattern": meta.pattern, "initializers": json.dumps(entries, separators=(",", ":")),
              "recipe_hash": meta.recipe_hash, "source_sha256": meta.source_sha256, "version": meta.version,
              "quantization": meta.quantization}
    keys = KEYS if meta.format_version == 1 else KEYS + ("quantization",)
    return {PREFIX + k: values[k] for k in keys}


def write_metadata(model, props: dict[str, str]) -> None:
    """Replace every `sdsonnx.*` entry of model.metadata_props by `props` (other keys are kept)."""
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for key, value in keep + sorted(props.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def read_props(model) -> dict[str, str]:
    """The `sdsonnx.*` entries of model.metadata_props, prefix kept."""
    return {p.key: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}


def parse_props(props: dict[str, str]) -> tuple[SparsityMetadata | None, list[str]]:
    """(parsed metadata, problems): problems name each missing or malformed key; None when unusable."""
    problems = [f"metadata key {PREFIX}{k} is missing" for k in KEYS if PREFIX + k not in props]
    if problems:
        return None, problems
    get = lambda k: props[PREFIX + k]  # noqa: E731
    try:
        version = int(get("format_version"))
    except ValueError:
        return None, [f"metadata {PREFIX}format_version={get('format_version')!r} is not an integer"]
    if version not in READABLE_VERSIONS:
        return None, [f"metadata {PREFIX}format_version={version} is not supported (this reader knows "
                      f"{', '.join(map(str, READABLE_VERSIONS))})"]
    try:
        sparsity = float(get("sparsity"))
        if not (math.isfinite(sparsity) and 0.0 <= sparsity <= 1.0):
            raise ValueError
    except ValueError:
        problems.append(f"metadata {PREFIX}sparsity={get('sparsity')!r} is not a number in [0, 1]")
        sparsity = float("nan")
    if not _PATTERN.match(get("pattern")):
        problems.append(f"metadata {PREFIX}pattern={get('pattern')!r} is not dense, unstructured or n:m")
    for key in ("recipe_hash", "source_sha256"):
        if not _HEX.match(get(key)) or (key == "source_sha256" and not get(key)):
            problems.append(f"metadata {PREFIX}{key}={get(key)!r} is not a lowercase hex digest")
    entries, entry_problems = _parse_entries(get("initializers"), ENTRY_FIELDS if version == 1 else ENTRY_FIELDS_V2)
    problems += entry_problems
    if entries is None:
        return None, problems
    meta = SparsityMetadata(version, sparsity, get("pattern"), entries, get("recipe_hash"), get("source_sha256"),
                            get("version"), props.get(PREFIX + "quantization", "none") if version > 1 else "none")
    return meta, problems


def _parse_entries(text: str, fields: tuple[str, ...] = ENTRY_FIELDS) -> tuple[dict[str, InitializerSparsity] | None,
                                                                                list[str]]:
    key = PREFIX + "initializers"
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [f"metadata {key} is not valid JSON: {exc}"]
    if not isinstance(raw, dict):
        return None, [f"metadata {key} is not a JSON object"]
    entries, problems = {}, []
    for name, body in raw.items():
        if not isinstance(body, dict) or set(body) != set(fields):
            problems.append(f"metadata {key}[{name!r}] must have exactly the fields {', '.join(fields)}")
            continue
        entry = InitializerSparsity(**body)
        ints_ok = all(isinstance(v, int) and v >= 0 for v in (entry.axis, entry.zeros, entry.numel))
        if not ints_ok or entry.zeros > entry.numel or entry.axis > 1 or not isinstance(entry.shape, list):
            problems.append(f"metadata {key}[{name!r}]: axis/zeros/numel are not consistent integers")
            continue
        if not _PATTERN.match(str(entry.pattern)) or not isinstance(entry.sparsity, (int, float)):
            problems.append(f"metadata {key}[{name!r}]: malformed pattern or sparsity")
            continue
        if not (isinstance(entry.module, str) and entry.module and isinstance(entry.sha256, str)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry.shape)):
            problems.append(f"metadata {key}[{name!r}]: module, shape or sha256 is not a name, a list of sizes or a hex "
                            "string")
            continue
        if entry.numel and not abs(entry.sparsity - entry.zeros / entry.numel) <= 1e-9:  # NaN fails too
            problems.append(f"metadata {key}[{name!r}]: sparsity {entry.sparsity} != zeros/numel "
                            f"{entry.zeros}/{entry.numel}")
        entries[name] = entry
    return entries, problems
