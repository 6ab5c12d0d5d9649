"""`sdsonnx validate` for quantized artifacts (written by `export --quantize`): called by validate.py.

Checks (docs/ARTIFACTS.md, "Quantized artifacts"), every failure collected into the ValidationReport:
  metadata  sdsonnx.* keys well-formed, format version 2 with a quantization scheme; every entry true of the
            stored integer weight (shape, axis, zeros = elements at the zero point, numel, pattern, scheme,
            zero point, sha256); global sparsity and pattern recomputed; every quantized pruned weight listed.
  sparsity  every group of m inputs keeps at most n elements off the zero point, for the entry's pattern and the
            one sdsonnx.json (and report.json, with a checkpoint) records as requested; symmetric INT8 zero point 0.
            With a checkpoint: every weight the checkpoint has at 0 is stored at the zero point and dequantizes to 0.
  manifest  sdsonnx.json agrees with the metadata (global sparsity, scheme).
  numerics  with a checkpoint: ONNX Runtime vs PyTorch (the fp32 pruned model) on random token batches: mean
            KL(PyTorch || ONNX) per position and top-1 agreement against THRESHOLDS[scheme].
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..masks import first_group_violation, requested_nm
from .checkpoint import CheckpointError, load_checkpoint, weights_digest
from .files import MANIFEST, MODEL_FILE
from .initializers import WeightMappingError, consumers, input_axis, load_initializers
from .metadata import PREFIX, describe_initializer, global_pattern, parse_props, read_props
from .quantized import THRESHOLDS, describe, int_weights, nm_problem, zero_problems

CASES = ((1, 24), (1, 64), (2, 32))  # (batch, length) of random token ids, prefill: only when no text tokenizes
TEXT = "wiki-extracts"  # numerics text: TEXT_WINDOWS windows of TEXT_WINDOW tokens of its evaluation part
TEXT_WINDOWS, TEXT_WINDOW = 4, 128
FIELDS = ("shape", "axis", "zeros", "numel", "pattern", "scheme", "zero_point")


def validate_quantized(report, folder: Path, proto, checkpoint: Path | None) -> None:
    """Fill `report` (validate.ValidationReport) with every failure of the quantized artifact in `folder`."""
    props = read_props(proto)
    meta, problems = parse_props(props)
    for problem in problems:
        key = re.search(r"sdsonnx\.\w+", problem)
        report.fail("metadata", key.group(0) if key else "metadata", problem)
    if meta is None:
        if not props:
            report.fail("metadata", "metadata_props", f"{MODEL_FILE} has no {PREFIX}* metadata")
        return
    try:
        info = json.loads(meta.quantization) if meta.quantization != "none" else None
    except json.JSONDecodeError as exc:
        report.fail("metadata", PREFIX + "quantization", f"{PREFIX}quantization is not valid JSON: {exc}")
        return
    if not isinstance(info, dict) or info.get("scheme") not in THRESHOLDS:
        report.fail("metadata", PREFIX + "quantization", f"the graph holds quantized weights but {PREFIX}quantization "
                    f"records no known scheme ({meta.quantization[:80]!r})")
        return
    scheme = info["scheme"]
    weights = int_weights(proto, folder)
    arrays = load_initializers(proto, folder)
    uses = consumers(proto)
    manifest = _manifest(report, folder)
    requested = {m: ((e or {}).get("recorded") or {}).get("pattern") for m, e in (manifest.get("modules") or {}).items()}
    satisfied, zeros, numel = [], 0, 0
    for name, entry in sorted(meta.initializers.items()):
        label = f"{name} ({entry.module})"
        if entry.scheme == "fp32":
            if name not in arrays:
                report.fail("metadata", name, f"{PREFIX}initializers lists {name}, not a float initializer")
                continue
            try:
                axis = input_axis(name, uses)[0]
            except WeightMappingError as exc:
                report.fail("metadata", name, str(exc))
                continue
            actual, sat = describe_initializer(entry.module, arrays[name], axis)
            actual = {**actual.__dict__, "scheme": "fp32", "zero_point": 0}
            groups = lambda pattern: _nm(arrays[name], axis, pattern)  # noqa: E731
        else:
            w = weights.get(name)
            if w is None:
                report.fail("metadata", name, f"{PREFIX}initializers lists {name}, which is no quantized weight of "
                            f"{MODEL_FILE}")
                continue
            actual, sat = describe(w, scheme)
            groups = lambda pattern, w=w: nm_problem(w, pattern)  # noqa: E731
            if w.op != "MatMulNBits" and np.any(w.zp != 0):
                report.fail("sparsity", name, f"{label}: zero point is not 0 (symmetric INT8): pruned weights are "
                            "not integer zeros")
        satisfied.append(sat)
        zeros, numel = zeros + actual["zeros"], numel + actual["numel"]
        for key in FIELDS:
            if getattr(entry, key) != actual[key]:
                report.fail("metadata", name, f"{PREFIX}initializers[{name}].{key}={getattr(entry, key)!r} but the "
                            f"weight has {actual[key]!r}")
        if entry.sha256 != actual["sha256"]:
            report.fail("weights", name, f"{label} changed after export: its sha256 differs from the one in "
                        f"{PREFIX}initializers")
        for pattern, source in ((entry.pattern, ""), (requested.get(entry.module), f", the pattern {MANIFEST} "
                                                      "records as requested")):
            problem = groups(pattern)
            if problem:
                report.fail("sparsity", name, f"{label}: {problem}{source}")
        report.weights.append({"module": entry.module, "initializer": name, "axis": actual["axis"],
                               "shape": actual["shape"], "sparsity": actual["sparsity"], "pattern": actual["pattern"],
                               "scheme": actual["scheme"], "zero_point": actual["zero_point"],
                               "matches_metadata": entry.sha256 == actual["sha256"]})
    listed = {e.module for e in meta.initializers.values()}
    for w in weights.values():
        if w.module in requested and w.module not in listed:
            report.fail("metadata", w.initializer, f"{PREFIX}initializers does not list {w.initializer} "
                        f"({w.module}), a quantized pruned weight")
    if numel and abs(meta.sparsity - zeros / numel) > 1e-9:
        report.fail("metadata", PREFIX + "sparsity", f"{PREFIX}sparsity={meta.sparsity!r} but the weights it lists "
                    f"give {zeros / numel:.6f} ({zeros}/{numel} at the zero point)")
    if satisfied and meta.pattern != global_pattern(satisfied):
        report.fail("metadata", PREFIX + "pattern", f"{PREFIX}pattern={meta.pattern!r} but the weights it lists "
                    f"satisfy {global_pattern(satisfied)!r}")
    if manifest and (manifest.get("sparsity") or {}).get("global") != meta.sparsity:
        report.fail("manifest", "sparsity", f"{MANIFEST} sparsity.global does not equal {PREFIX}sparsity")
    if manifest and (manifest.get("quantization") or {}).get("scheme") != scheme:
        report.fail("manifest", "quantization", f"{MANIFEST} quantization.scheme is not {scheme!r}")
    if checkpoint is None:
        report.notes.append(f"quantized ({scheme}): numerics and pruned-zero positions skipped: no --checkpoint")
        return
    model = _against_checkpoint(report, checkpoint, meta, weights, arrays, scheme)
    if model is not None:
        check_quantized_numerics(report, folder / MODEL_FILE, model, scheme, _text_batches(folder))


def _manifest(report, folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        report.fail("manifest", MANIFEST, f"{folder} has no {MANIFEST}")
    except json.JSONDecodeError as exc:
        report.fail("manifest", MANIFEST, f"{MANIFEST} is not valid JSON: {exc}")
    return {}


def _nm(stored: np.ndarray, axis: int, pattern: object) -> str | None:
    nm = requested_nm(pattern)
    found = None if nm is None else first_group_violation(stored, axis, *nm)
    return None if found is None else f"{found[0]} group(s) break {pattern}; first: {found[1]}"


def _against_checkpoint(report, checkpoint: Path, meta, weights: dict, arrays: dict, scheme: str):
    """Pruned zeros of the checkpoint at the zero point; fp32 weights equal; returns the model (None on failure)."""
    try:
        ckpt_report, model, torch_weights = load_checkpoint(checkpoint)
    except CheckpointError as exc:
        report.fail("mapping", "report.json", str(exc))
        return None
    if meta.source_sha256 != weights_digest(checkpoint):
        report.fail("metadata", PREFIX + "source_sha256", f"{PREFIX}source_sha256 does not match the checkpoint's "
                    "weights: exported from other weights")
    by_module = {e.module: name for name, e in meta.initializers.items()}
    recorded = (ckpt_report or {}).get("modules") or {}
    for module, w in torch_weights.items():
        name = by_module.get(module)
        if name is None:
            report.fail("mapping", module, f"{PREFIX}initializers lists no weight of {module}")
            continue
        if name in weights:
            q = weights[name]
            ref = w if q.axis == 1 else w.T
            for problem in zero_problems(q, ref, symmetric_int8=q.op != "MatMulNBits"):
                report.fail("sparsity", name, f"{name} ({module}) against the checkpoint: {problem}")
            problem = nm_problem(q, (recorded.get(module) or {}).get("pattern"))
            if problem:
                report.fail("sparsity", name, f"{name} ({module}): {problem}, the pattern report.json records "
                            "as requested")
        elif name in arrays:
            stored = arrays[name]
            if not any(stored.shape == c.shape and np.array_equal(stored, c) for c in (w, w.T)):
                report.fail("weights", name, f"{name} ({module}) (kept fp32) differs from the checkpoint")
    return model


def _text_batches(folder: Path) -> list[np.ndarray] | None:
    """TEXT_WINDOWS windows [1, TEXT_WINDOW] of TEXT tokenized by the export's tokenizer; None when the text is not
    available or mostly unknown to the tokenizer (tiny test vocabularies): then random tokens are used."""
    try:
        from transformers import AutoTokenizer

        from ..data import evaluation_windows, load_split_texts

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        windows = evaluation_windows(tokenizer, load_split_texts(TEXT, "evaluation"), TEXT_WINDOW,
                                     TEXT_WINDOWS * TEXT_WINDOW).numpy()
    except Exception:  # noqa: BLE001 - any failure falls back to random tokens (noted)
        return None
    unk = tokenizer.unk_token_id
    if windows.shape[0] < TEXT_WINDOWS or (unk is not None and np.mean(windows == unk) > 0.5):
        return None
    return [w[None] for w in windows]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def check_quantized_numerics(report, model_path: Path, model, scheme: str, batches: list[np.ndarray] | None = None,
                             seed: int = 0) -> None:
    """Mean KL(PyTorch || ONNX) per position and top-1 agreement vs THRESHOLDS[scheme], on token `batches`
    [b, L] (text windows), else on random token batches CASES."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    limit = THRESHOLDS[scheme]
    kl_sum = agree = positions = 0.0
    source = f"{len(batches)} windows of {TEXT}" if batches else "random tokens"
    for ids in batches or [rng.integers(3, vocab, shape).astype(np.int64) for shape in CASES]:
        batch, length = ids.shape
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(length, dtype=np.int64), ids.shape).copy()
        for name, inp in inputs.items():
            if name.startswith("past_key_values"):
                feeds[name] = np.zeros((batch, inp.shape[1], 0, inp.shape[3]), np.float32)
        logits = session.run(["logits"], feeds)[0]
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()
        lp, lq = _log_softmax(ref), _log_softmax(logits)
        kl = (np.exp(lp) * (lp - lq)).sum(-1)
        top1 = lp.argmax(-1) == lq.argmax(-1)
        diff = np.abs(logits.astype(np.float64) - ref)
        report.numerics.append({"case": f"batch {batch} len {length} prefill ({scheme})", "positions": int(kl.size),
                                "max_abs": float(diff.max()), "max_logit": float(np.abs(ref).max()),
                                "mean_abs": float(diff.mean()), "top1_agreement": float(top1.mean()),
                                "finite": bool(np.isfinite(logits).all()), "kl": float(kl.mean()),
                                "tolerance": limit["kl"]})
        kl_sum, agree, positions = kl_sum + float(kl.sum()), agree + float(top1.sum()), positions + kl.size
    kl_mean, top1_mean = kl_sum / positions, agree / positions
    report.notes.append(f"quantized numerics ({scheme}) vs the fp32 checkpoint over {int(positions)} positions "
                        f"({source}): mean "
                        f"KL {kl_mean:.4g} (limit {limit['kl']}), top-1 agreement {top1_mean:.4f} (limit {limit['top1']})")
    if not all(r["finite"] for r in report.numerics):
        report.fail("numerics", scheme, "non-finite logits")
    if kl_mean > limit["kl"] or top1_mean < limit["top1"]:
        report.fail("numerics", scheme, f"{scheme}: mean KL {kl_mean:.4g} (limit {limit['kl']}) / top-1 agreement "
                    f"{top1_mean:.4f} (limit {limit['top1']}) against the fp32 checkpoint")
