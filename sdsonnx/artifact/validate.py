"""`sdsonnx validate`: check an export folder's numerics, sparsity and metadata; collect every failure.

Checks (docs/ARTIFACTS.md):
  numerics  ONNX Runtime vs PyTorch logits on the same token batches (needs the checkpoint): several lengths,
            a left-padded batch, and for with-past exports several decode steps through the KV cache;
            fails when max |logit difference| over unpadded positions exceeds atol + rtol * max |PyTorch logit|.
  weights   every pruned torch weight found in the graph, equal to the checkpoint (with a checkpoint), or
            equal to the sha256 the metadata recorded (without one).
  sparsity  each initializer's zero count equals the checkpoint's, and every group of m inputs (axis taken from
            the consuming MatMul/Gemm node, -0.0 counted as zero) keeps at most n nonzeros, for the n:m
            pattern the metadata (or the checkpoint weight) shows and for the one the recipe requested
            (sdsonnx.json modules[...].recorded.pattern, and report.json's with a checkpoint).
  metadata  sdsonnx.* keys present, well-formed, consistent with the weights, the checkpoint and sdsonnx.json.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError

from ..masks import first_group_violation, pattern_name, requested_nm
from ..errors import InputError
from .checkpoint import (CheckpointError, config_differences, lean_checkpoint, load_checkpoint, read_config,
                         weights_digest)
from .files import DATA_FILE, MANIFEST, MODEL_FILE, VALIDATION_FILE
from .initializers import OnnxWeight, WeightMappingError, consumers, input_axis, load_initializers, map_weights
from .metadata import PREFIX, InitializerSparsity, describe_initializer, global_pattern, parse_props, read_props

log = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-3  # |logit difference| ONNX Runtime vs PyTorch allowed: atol + rtol * max|PyTorch logit|
DEFAULT_RTOL = 1e-3  # fp32 noise grows with depth: SmolLM2-135M 2:4 (30 blocks) torch fp32 vs fp64 differs by 6e-3
SPARSITY_TOL = 1e-9  # metadata floats vs zeros / numel
REPORT_TOL = 1e-4  # report.json's recorded per-module sparsity vs the checkpoint weights
CASES = ((1, (7,)), (1, (24,)), (3, (16, 11, 3)))  # (batch, unpadded lengths per row)
DECODE_STEPS = 3


class ArtifactError(InputError, ValueError):
    """An export folder or checkpoint that cannot be validated at all (bad input: exit code 2, nothing written)."""


@dataclass
class Failure:
    check: str  # numerics | weights | sparsity | metadata | manifest | mapping
    subject: str  # initializer, case or key
    message: str


@dataclass
class ValidationReport:
    artifact: str
    checkpoint: str | None
    atol: float
    rtol: float
    failures: list[Failure] = field(default_factory=list)
    numerics: list[dict] = field(default_factory=list)
    weights: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    patterns_checked: set[tuple[str, str]] = field(default_factory=set)  # (weight, n:m): each checked once

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, check: str, subject: str, message: str) -> None:
        self.failures.append(Failure(check, subject, message))

    def to_json(self) -> dict:
        return {"ok": self.ok, "artifact": self.artifact, "checkpoint": self.checkpoint, "atol": self.atol, "rtol": self.rtol,
                "failures": [asdict(f) for f in self.failures], "numerics": self.numerics,
                "weights": self.weights, "notes": self.notes}


# ---------------------------------------------------------------- sparsity and weights

def _check_pattern(report: ValidationReport, name: str, label: str, stored: np.ndarray, axis: int,
                   pattern: object, source: str = "") -> None:
    """Fail `name` when its groups of m along `axis` break an n:m `pattern` (other patterns pass); once per pair."""
    if requested_nm(pattern) is None or (name, pattern) in report.patterns_checked:
        return
    report.patterns_checked.add((name, pattern))
    found = first_group_violation(stored, axis, *requested_nm(pattern))
    if found:
        count, first = found
        report.fail("sparsity", name, f"{label}: {count} group(s) break {pattern}{source}; first: {first}")


def _input_axis(report: ValidationReport, check: str, subject: str, name: str, arrays: dict, uses: dict,
                listed_by: str) -> int | None:
    """Input axis of the initializer `name` that `listed_by` names; None (and a failure) when it has none."""
    if name not in arrays:
        report.fail(check, subject, f"{listed_by} lists {name!r}, which is not a 2-D initializer of {MODEL_FILE}")
        return None
    try:
        return input_axis(name, uses)[0]
    except WeightMappingError as exc:
        report.fail(check, subject, str(exc))
        return None


def _first_difference(stored: np.ndarray, expected: np.ndarray) -> str:
    """Count and first index (stored layout) where two equally shaped arrays differ (-0.0 == 0.0)."""
    diff = np.argwhere(stored != expected)
    i, j = (int(v) for v in diff[0])
    return f"{len(diff)} element(s) differ, first at stored [{i}, {j}]: {stored[i, j]!r} vs {expected[i, j]!r}"


def check_against_checkpoint(report: ValidationReport, arrays: dict, uses: dict, weights: dict[str, np.ndarray],
                             ckpt_report: dict | None) -> dict[str, OnnxWeight]:
    """Map each torch weight to its initializer; compare values, zero counts and the n:m pattern.

    The checkpoint weight is checked against the n:m pattern report.json records as requested, the stored
    weight against the tightest pattern the checkpoint weight satisfies (the export must keep it).
    """
    found, missing = map_weights(weights, arrays, uses)
    for module in missing:
        report.fail("mapping", module, f"no initializer of {MODEL_FILE} holds the weight of {module} "
                    f"(shape {list(weights[module].shape)} or its transpose, consumed by MatMul/Gemm)")
    recorded = (ckpt_report or {}).get("modules") or {}
    for module, link in found.items():
        name, w = link.initializer, weights[module]
        stored = arrays[name]
        label = f"{name} ({module})"
        expected = w.T if link.axis == 0 else w
        if not link.exact and stored.shape == expected.shape and np.any(stored != expected):
            report.fail("weights", name, f"{label} differs from the checkpoint: {_first_difference(stored, expected)}")
        zeros, zeros_ckpt = int(np.count_nonzero(stored == 0)), int(np.count_nonzero(w == 0))
        if zeros != zeros_ckpt:
            report.fail("sparsity", name, f"{label}: sparsity {zeros / stored.size:.6f} ({zeros} zeros) but the "
                        f"checkpoint has {zeros_ckpt / w.size:.6f} ({zeros_ckpt} zeros)")
        want = pattern_name(w, 1)
        rec = recorded.get(module) or {}
        _check_pattern(report, module, f"checkpoint weight {module}", w, 1, rec.get("pattern"),
                       ", the pattern report.json records as requested")
        _check_pattern(report, name, label, stored, link.axis, want)
        if "sparsity" in rec and abs(float(rec["sparsity"]) - zeros_ckpt / w.size) > REPORT_TOL:
            report.fail("sparsity", module, f"report.json records sparsity {float(rec['sparsity']):.6f} for {module} "
                        f"but its checkpoint weight has {zeros_ckpt / w.size:.6f}")
        report.weights.append({"module": module, "initializer": name, "axis": link.axis, "consumer": link.consumer,
                               "shape": list(stored.shape), "sparsity": zeros / stored.size, "pattern": want,
                               "matches_checkpoint": link.exact})
    return found


def check_metadata(report: ValidationReport, proto: onnx.ModelProto, arrays: dict, uses: dict,
                   expected: dict[str, str] | None, recipe_hash: str | None, source_hash: str | None) -> dict | None:
    """sdsonnx.* keys present, well-formed and true of the weights. expected: {initializer: module} found by value.

    Without a checkpoint (expected None) this is also the weight check: values against the recorded sha256,
    the n:m pattern of every group against the recorded pattern.
    """
    props = read_props(proto)
    if not props:
        report.fail("metadata", "metadata_props", f"{MODEL_FILE} has no {PREFIX}* metadata (stripped or never written)")
        return None
    meta, problems = parse_props(props)
    for problem in problems:
        key = re.search(r"sdsonnx\.\w+", problem)
        report.fail("metadata", key.group(0) if key else "metadata", problem)
    if meta is None:
        return None
    entries = meta.initializers
    if expected is not None:
        for name, module in expected.items():
            if name not in entries:
                report.fail("metadata", name, f"{PREFIX}initializers does not list {name} ({module}), a pruned weight")
            elif entries[name].module != module:
                report.fail("metadata", name, f"{PREFIX}initializers[{name}].module is {entries[name].module!r}, "
                            f"but the weights show it holds {module}")
        for name in sorted(set(entries) - set(expected)):
            report.fail("metadata", name, f"{PREFIX}initializers lists {name}, which holds no pruned checkpoint weight")
    measured: dict[str, InitializerSparsity] = {}
    satisfied = []
    for name, entry in sorted(entries.items()):
        axis = _input_axis(report, "metadata", name, name, arrays, uses, f"{PREFIX}initializers")
        if axis is None:
            continue
        stored = arrays[name]
        actual, sat = describe_initializer(entry.module, stored, axis)
        measured[name] = actual
        satisfied.append(sat)
        label = f"{name} ({entry.module})"
        for key in ("shape", "axis", "zeros", "numel", "pattern"):
            if getattr(entry, key) != getattr(actual, key):
                report.fail("metadata", name, f"{PREFIX}initializers[{name}].{key}={getattr(entry, key)!r} but the "
                            f"weight has {getattr(actual, key)!r}")
        if entry.sha256 != actual.sha256:
            report.fail("weights", name, f"{label} changed after export: its sha256 differs from the one in "
                        f"{PREFIX}initializers")
        if expected is None:
            _check_pattern(report, name, label, stored, axis, entry.pattern)
            report.weights.append({"module": entry.module, "initializer": name, "axis": axis,
                                   "shape": list(stored.shape), "sparsity": actual.sparsity,
                                   "pattern": actual.pattern, "matches_metadata": entry.sha256 == actual.sha256})
    if measured:
        zeros, numel = sum(e.zeros for e in measured.values()), sum(e.numel for e in measured.values())
        actual_global = zeros / numel
        if abs(meta.sparsity - actual_global) > SPARSITY_TOL:
            report.fail("metadata", PREFIX + "sparsity", f"{PREFIX}sparsity={meta.sparsity!r} but the weights it lists "
                        f"give {actual_global:.6f} ({zeros}/{numel} zeros)")
        actual_pattern = global_pattern(satisfied)
        if meta.pattern != actual_pattern:
            report.fail("metadata", PREFIX + "pattern", f"{PREFIX}pattern={meta.pattern!r} but the weights it lists "
                        f"satisfy {actual_pattern!r}")
    if recipe_hash is not None and meta.recipe_hash != recipe_hash:
        report.fail("metadata", PREFIX + "recipe_hash", f"{PREFIX}recipe_hash={meta.recipe_hash!r} but the "
                    f"checkpoint's report.json has {recipe_hash!r}")
    if source_hash is not None and meta.source_sha256 != source_hash:
        report.fail("metadata", PREFIX + "source_sha256", f"{PREFIX}source_sha256 does not match the checkpoint's "
                    f"weights ({meta.source_sha256[:12]}... vs {source_hash[:12]}...): exported from other weights")
    return {"sparsity": meta.sparsity, "pattern": meta.pattern, "initializers": len(entries),
            "recipe_hash": meta.recipe_hash, "source_sha256": meta.source_sha256}


def check_manifest(report: ValidationReport, folder: Path, meta: dict | None, source_hash: str | None) -> dict | None:
    """sdsonnx.json present, parseable and agreeing with the model metadata and the checkpoint."""
    path = folder / MANIFEST
    if not path.is_file():
        report.fail("manifest", MANIFEST, f"{folder} has no {MANIFEST}")
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        report.fail("manifest", MANIFEST, f"{MANIFEST} is not valid JSON: {exc}")
        return None
    for key in ("task", "source", "sparsity", "modules", "versions"):
        if key not in manifest:
            report.fail("manifest", key, f"{MANIFEST} has no {key!r} entry")
    if meta and "sparsity" in manifest and manifest["sparsity"].get("global") != meta["sparsity"]:
        report.fail("manifest", "sparsity", f"{MANIFEST} sparsity.global={manifest['sparsity'].get('global')!r} "
                    f"but {PREFIX}sparsity={meta['sparsity']!r}")
    recorded = (manifest.get("source") or {}).get("weights_sha256")
    if source_hash is not None and recorded != source_hash:
        report.fail("manifest", "source.weights_sha256", f"{MANIFEST} source.weights_sha256 does not match the "
                    "checkpoint's weights")
    return manifest


def check_requests(report: ValidationReport, manifest: dict | None, arrays: dict, uses: dict) -> None:
    """Every weight whose sdsonnx.json `modules[...].recorded.pattern` is n:m satisfies it along its input axis."""
    modules = (manifest or {}).get("modules")
    if not isinstance(modules, dict):
        return
    for module, entry in modules.items():
        requested = ((entry or {}).get("recorded") or {}).get("pattern")
        try:
            if requested_nm(requested) is None:
                continue
        except ValueError as exc:
            report.fail("manifest", module, f"{MANIFEST} modules[{module!r}].recorded.pattern={requested!r}: {exc}")
            continue
        name = entry.get("initializer")
        axis = _input_axis(report, "manifest", module, name, arrays, uses, f"{MANIFEST} modules[{module!r}]")
        if axis is None:
            continue
        if entry.get("axis") != axis:
            report.fail("manifest", module, f"{MANIFEST} modules[{module!r}].axis={entry.get('axis')!r} but "
                        f"{name} is consumed along axis {axis}")
        _check_pattern(report, name, f"{name} ({module})", arrays[name], axis, requested,
                       f", the pattern {MANIFEST} records as requested")


# ---------------------------------------------------------------- numerics

def _past_inputs(session, batch: int) -> dict[str, np.ndarray]:
    """Empty KV-cache inputs [batch, heads, 0, head_dim] for every past_key_values.* input."""
    feeds = {}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values"):
            shape = [batch if i == 0 else (0 if i == 2 else d) for i, d in enumerate(inp.shape)]
            if not all(isinstance(d, int) for d in shape):
                raise ValueError(f"input {inp.name} has unexpected symbolic dims {inp.shape}")
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
    return feeds


def _positions(mask: np.ndarray) -> np.ndarray:
    """position_ids as Hugging Face generate computes them: cumsum(mask) - 1, 1 at padded positions."""
    pos = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def _compare(name: str, ort_logits: np.ndarray, pt_logits: np.ndarray, valid: np.ndarray) -> dict:
    """max/mean |diff| and top-1 agreement over the valid positions of [B, L, V] logits."""
    a, b = ort_logits[valid], pt_logits[valid]
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    return {"case": name, "positions": int(valid.sum()), "max_abs": float(np.nanmax(diff)) if diff.size else 0.0,
            "max_logit": float(np.nanmax(np.abs(b))) if b.size else 0.0,
            "mean_abs": float(np.nanmean(diff)) if diff.size else 0.0,
            "top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))) if diff.size else 1.0, "finite": finite}


def check_numerics(report: ValidationReport, model_path: Path, model, pad_id: int, seed: int = 0) -> None:
    """ONNX Runtime vs PyTorch logits on left-padded random token batches, prefill then KV-cache decode steps."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    with_past = any(n.startswith("past_key_values") for n in names)
    present = [o.name for o in session.get_outputs() if o.name.startswith("present")]
    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)
    for batch, lengths in CASES:
        width = max(lengths)
        ids = np.full((batch, width), pad_id, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for row, length in enumerate(lengths):
            ids[row, width - length:] = rng.integers(3, vocab, length)
            mask[row, width - length:] = 1
        case = f"batch {batch} len {'/'.join(map(str, lengths))}"
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in names:
            feeds["position_ids"] = _positions(mask)
        if with_past:
            feeds.update(_past_inputs(session, batch))
        outputs = session.run(["logits", *present], feeds)
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(_positions(mask)), use_cache=with_past)
        _record(report, _compare(f"{case} prefill", outputs[0], out.logits.float().numpy(), mask.astype(bool)))
        if not with_past:
            continue
        past, cache = dict(zip([p.replace("present", "past_key_values") for p in present], outputs[1:])), out.past_key_values
        for step in range(DECODE_STEPS):
            token = rng.integers(3, vocab, (batch, 1)).astype(np.int64)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            pos = _positions(mask)[:, -1:]
            feeds = {"input_ids": token, "attention_mask": mask, **past}
            if "position_ids" in names:
                feeds["position_ids"] = pos
            outputs = session.run(["logits", *present], feeds)
            past = dict(zip([p.replace("present", "past_key_values") for p in present], outputs[1:]))
            with torch.no_grad():
                out = model(input_ids=torch.from_numpy(token), attention_mask=torch.from_numpy(mask),
                            position_ids=torch.from_numpy(pos), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            _record(report, _compare(f"{case} decode {step + 1}", outputs[0], out.logits.float().numpy(),
                                     np.ones((batch, 1), dtype=bool)))


LEAN_PROMPT = 16  # tokens of the one prompt numerics use at size


def check_numerics_lean(report: ValidationReport, model_path: Path, checkpoint: Path, seed: int = 0) -> None:
    """check_numerics for a model too large to hold twice: one unpadded prompt of LEAN_PROMPT random tokens,
    prefill only; ONNX Runtime reads the weights through read-only memory maps (mapped.mapped_session: it never
    loads them itself) without weight prepacking (it would copy every MatMul weight), PyTorch one block at a time
    from the shards (streamed.streamed_logits)."""
    import onnxruntime as ort

    from .mapped import mapped_session
    from .streamed import streamed_logits

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        session, weights = mapped_session(model_path, options)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types (e.g. out of memory)
        report.notes.append(f"numerics skipped: ONNX Runtime could not load the model on this machine "
                            f"({type(exc).__name__}: {str(exc)[:300]}); every other check ran")
        return
    names = {i.name for i in session.get_inputs()}
    vocab = int(read_config(checkpoint)["vocab_size"])
    ids = np.random.default_rng(seed).integers(3, vocab, (1, LEAN_PROMPT)).astype(np.int64)
    mask = np.ones_like(ids)
    feeds = {"input_ids": ids, "attention_mask": mask, **weights}
    if "position_ids" in names:
        feeds["position_ids"] = _positions(mask)
    if any(n.startswith("past_key_values") for n in names):
        feeds.update(_past_inputs(session, 1))
    ort_logits = session.run(["logits"], feeds)[0]
    del session, feeds, weights
    pt_logits = streamed_logits(checkpoint, torch.from_numpy(ids)).numpy()
    _record(report, _compare(f"batch 1 len {LEAN_PROMPT} prefill (lean)", ort_logits, pt_logits, mask.astype(bool)))
    report.notes.append(f"lean validation (model too large to hold twice): numerics on one prompt of {LEAN_PROMPT} "
                        "tokens, prefill only, PyTorch reference streamed block by block")


def _record(report: ValidationReport, row: dict) -> None:
    row["tolerance"] = report.atol + report.rtol * row["max_logit"]
    report.numerics.append(row)
    if not row["finite"]:
        report.fail("numerics", row["case"], f"{row['case']}: non-finite logits at unpadded positions")
    elif row["max_abs"] > row["tolerance"]:
        report.fail("numerics", row["case"], f"{row['case']}: max |logit diff| ONNX Runtime vs PyTorch "
                    f"{row['max_abs']:.3g} > tolerance {row['tolerance']:.3g} (atol {report.atol:g} + rtol "
                    f"{report.rtol:g} x max |logit| {row['max_logit']:.3g}; top-1 agreement {row['top1_agreement']:.3f})")


# ---------------------------------------------------------------- entry point

def lean_by_default(folder: Path, checkpoint: Path | None) -> bool:
    """True when the export's weights exceed a quarter of this machine's memory (validate would hold them, and the
    checkpoint's model, at once) and the checkpoint, if any, is safetensors."""
    import os

    if checkpoint is not None and not any(Path(checkpoint).glob("*.safetensors")):
        return False
    size = sum(p.stat().st_size for p in folder.glob("*.onnx*") if p.is_file())
    return size > os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 4


def validate_artifact(folder: str | Path, checkpoint: str | Path | None = None, atol: float = DEFAULT_ATOL,
                      rtol: float = DEFAULT_RTOL, write: bool = True, lean: bool | None = None) -> ValidationReport:
    """Run every check on the export folder (against `checkpoint` when given); write folder/validation.json.

    lean: read every weight from its file when a check needs it instead of holding them all, take the checkpoint's
    weights from its shards, and check numerics on one prompt with a block-by-block PyTorch reference
    (check_numerics_lean); None picks it for exports larger than a quarter of memory (lean_by_default)."""
    folder = Path(folder)
    proto = read_export(folder)
    if checkpoint is not None:
        check_checkpoint_fits(folder, Path(checkpoint))
    report = ValidationReport(str(folder), None if checkpoint is None else str(checkpoint), atol, rtol)
    from .quantized import is_quantized

    if is_quantized(proto):  # export --quantize: integer weights, numerics as KL / top-1 (validate_quantized.py)
        from .validate_quantized import validate_quantized

        validate_quantized(report, folder, proto, None if checkpoint is None else Path(checkpoint))
        return _finish(report, folder, write)
    if lean is None:
        lean = lean_by_default(folder, None if checkpoint is None else Path(checkpoint))
    try:
        arrays = _lean_initializers(proto, folder) if lean else load_initializers(proto, folder)
    except (FileNotFoundError, OSError, ValueError) as exc:
        report.fail("weights", DATA_FILE, f"cannot read the weights of {MODEL_FILE}: {exc}")
        return _finish(report, folder, write)
    uses = consumers(proto)
    expected = recipe_hash = source_hash = model = None
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        try:
            if lean:
                (ckpt_report, weights), model = lean_checkpoint(checkpoint), None
            else:
                ckpt_report, model, weights = load_checkpoint(checkpoint)
        except CheckpointError as exc:
            report.fail("mapping", "report.json", str(exc))
            return _finish(report, folder, write)
        found = check_against_checkpoint(report, arrays, uses, weights, ckpt_report)
        expected = {link.initializer: module for module, link in found.items()}
        recipe_hash = (ckpt_report or {}).get("recipe_hash") or ""
        source_hash = weights_digest(checkpoint)
    meta = check_metadata(report, proto, arrays, uses, expected, recipe_hash, source_hash)
    manifest = check_manifest(report, folder, meta, source_hash)
    check_requests(report, manifest, arrays, uses)
    if checkpoint is not None and any(f.check == "mapping" for f in report.failures):
        report.notes.append("numerics skipped: the checkpoint's weights are not all in the graph")
    elif checkpoint is not None and lean:
        check_numerics_lean(report, folder / MODEL_FILE, checkpoint)
    elif model is not None:
        pad = model.config.pad_token_id
        check_numerics(report, folder / MODEL_FILE, model, 0 if pad is None else int(pad))
    else:
        report.notes.append("numerics skipped: no --checkpoint to compare with")
    return _finish(report, folder, write)


def _lean_initializers(proto: onnx.ModelProto, folder: Path):
    """streamed.LazyInitializers of the export; ValueError naming tensors cut short by a truncated data file."""
    from .streamed import LazyInitializers

    arrays = LazyInitializers(proto, folder)
    bad = arrays.truncated()
    if bad:
        raise ValueError(f"{len(bad)} initializer(s) end beyond their external-data file, first {bad[0]}")
    return arrays


def read_export(folder: Path) -> onnx.ModelProto:
    """folder/model.onnx without its weights; ArtifactError when the folder, the file or its external data is unusable."""
    path = folder / MODEL_FILE
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a folder: give the export folder `sdsonnx export` wrote")
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MODEL_FILE}: not an sdsonnx export folder (run `sdsonnx export`)")
    try:
        proto = onnx.load(path, load_external_data=False)
    except DecodeError:
        raise ArtifactError(f"{path} is not an ONNX model (protobuf does not parse); export it again") from None
    if not proto.graph.node:
        raise ArtifactError(f"{path} is not an ONNX model (it has no graph); export it again")
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not (folder / location).is_file():
            raise ArtifactError(f"{path} keeps initializer {tensor.name} in the external-data file {location!r}, "
                                f"which is missing from {folder}; copy it next to {MODEL_FILE}")
    return proto


def check_checkpoint_fits(folder: Path, checkpoint: Path) -> None:
    """ArtifactError when `checkpoint` is no checkpoint, or another model than the export's (config.json differs)."""
    ckpt_config = read_config(checkpoint)
    if ckpt_config is None:
        raise ArtifactError(f"checkpoint {checkpoint} has no config.json: give the checkpoint folder the export "
                            "came from")
    export_config = read_config(folder)
    differences = config_differences(export_config or {}, ckpt_config)
    if differences:
        raise ArtifactError(f"checkpoint {checkpoint} is another model than the export {folder} (config.json "
                            f"{'; '.join(differences)}): give the checkpoint the export came from")


def _finish(report: ValidationReport, folder: Path, write: bool) -> ValidationReport:
    if write:
        (folder / VALIDATION_FILE).write_text(json.dumps(report.to_json(), indent=2))
    return report


def format_report(report: ValidationReport) -> str:
    """Text tables: numerics per case, pruned weights summary, then every failure."""
    from ..summary import table

    parts = []
    if report.numerics:
        rows = [[r["case"], f"{r['max_abs']:.3g}", f"{r['mean_abs']:.3g}", f"{r['tolerance']:.3g}",
                 f"{r['max_logit']:.3g}", f"{r['top1_agreement']:.3f}"] for r in report.numerics]
        parts.append(table(rows, ["numerics case", "max |diff|", "mean |diff|", "tolerance", "max |logit|",
                                  "top-1 agree"]))
    if report.weights:
        sparsity = np.mean([w["sparsity"] for w in report.weights])
        patterns = sorted({w["pattern"] for w in report.weights})
        parts.append(f"{len(report.weights)} pruned weights checked, mean sparsity {sparsity:.4f}, "
                     f"pattern(s) {', '.join(patterns)}")
    parts += report.notes
    if report.failures:
        rows = [[f.check, f.subject, f.message] for f in report.failures]
        parts.append(table(rows, ["check", "subject", "failure"]))
        parts.append(f"VALIDATION FAILED: {len(report.failures)} failure(s)")
    else:
        parts.append("validation passed")
    return "\n\n".join(parts)
