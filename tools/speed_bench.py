"""Speed benchmark for docs/BENCHMARKS.md ("Speed") and docs/benchmarks/speed.json (issue 15: engines side by side).

Default (`--matrix`): the SDS-SparseGPT artifacts of the quality protocol and their dense base, each as fp32 and
quantized (int8-nbits, int8-dynamic, int8-static, int4-nbits; made from the fp32 exports by
artifact.quantize.quantize_artifact, what `sdsonnx export --quantize` runs), timed in ONNX Runtime and OpenVINO
(fp32, int8-static, int8-nbits; INFERENCE_PRECISION_HINT f32, plus dense fp32 with bf16) in one interleaved loop
(sdsonnx.bench.matrix): prefill 128 and 512 at batch 1, decode on a 128-token cache at batch 1 and 8, 2 threads.
Every record carries speedup_vs_dense_fp32 (ONNX Runtime dense fp32 of the same case / this) and its bound.

    .venv/bin/python tools/speed_bench.py --family dense=/tmp/h15/q/dense-fp32 \
        --family "sds-sparsegpt 2:4=/tmp/h15/q/sds-sparsegpt_2_4-fp32" --family "sds-sparsegpt 50%=..."

`--deepsparse` adds DeepSparse 1.8.0 (end of life; its venv: `make deepsparse`, or --deepsparse-python): for every
family its fp32 export and, where it exists next to it, NAME-int8-static (QDQ) (--ds-formats; int8-dynamic can be
named but crashes DeepSparse's planner, docs/research/deepsparse_int8.md), compiled and timed in DeepSparse's own
process after the in-process engines, interleaved among themselves, each checked against ONNX Runtime first (an
entry DeepSparse rejects, crashes on or mis-computes goes to the document's "errors" with the reason).
Their records carry deepsparse_speedup_vs_dense_same_format (interleaved in the worker: the issue-15 target
"sparse INT8 >= 1.3x dense INT8 at 50%") and speedup_base_interleaved false:

    .venv/bin/python tools/speed_bench.py --deepsparse --family dense=/tmp/s25/q/dense-fp32 \
        --family "sds-sparsegpt 50%=/tmp/s25/q/sds-sparsegpt_0.5_admm-fp32" --decode 8 --warmup 1 --reps 3

`--legacy-magnitude` is the earlier fp32-only run (magnitude 50/70/2:4, ONNX Runtime + DeepSparse, written to
docs/benchmarks/speed_fp32_magnitude.json):

    .venv/bin/python tools/speed_bench.py --legacy-magnitude [--work /tmp/sdsonnx-speed] [--models smollm2,opt]
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from sdsonnx.bench import bench_table, write_outputs
from sdsonnx.bench.core import bench_models
from sdsonnx.artifact.export import export_checkpoint
from sdsonnx.pattern import Pattern
from sdsonnx.prune.magnitude import magnitude_prune

log = logging.getLogger("speed_bench")
VARIANTS = {"dense": None, "50%": "0.5", "70%": "0.7", "2:4": "2:4"}
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2")
REPO = Path(__file__).resolve().parents[1]


def base_checkpoint(name: str, work: Path) -> Path:
    """HF folder of the dense model: built-in SmolLM2-135M, or an OPT-125M-shaped random model (seed 0)."""
    if name == "smollm2":
        from sdsonnx.models import builtin_smollm2_dir

        return builtin_smollm2_dir()
    if name == "opt":
        from transformers import AutoModelForCausalLM, OPTConfig

        folder = work / "opt125m-shaped"
        if not (folder / "config.json").is_file():
            torch.manual_seed(0)
            config = OPTConfig(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                               num_attention_heads=12, max_position_embeddings=2048, word_embed_proj_dim=768)
            AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        return folder
    raise ValueError(f"unknown model {name!r}")


def pruned_export(base: Path, pattern: str | None, out: Path) -> Path:
    """Prune base's decoder Linears by magnitude to `pattern` (None: dense), save, export with past to `out`."""
    if (out / "sdsonnx.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = out.with_name(out.name + "-ckpt")
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    if pattern is not None:
        p = Pattern.parse(pattern)
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in DECODER_LINEARS:
                    module.weight.copy_(magnitude_prune(module.weight, p)[0])
    model.save_pretrained(checkpoint)
    if (base / "tokenizer_config.json").is_file():  # the random OPT has none; the benchmark feeds random ids
        AutoTokenizer.from_pretrained(base).save_pretrained(checkpoint)
    export_checkpoint(checkpoint, out, task="text-generation-with-past")
    return out


def relimit(path: Path) -> None:
    """Recompute work share and limits of every sparse record in `path` from its export (workload.work_share)."""
    from sdsonnx.bench.workload import Case, load_model_info, work_share

    doc = json.loads(path.read_text())
    infos = {}
    for row in doc["records"]:
        if "speedup" in row:
            info = infos.setdefault(row["path"], load_model_info(row["path"]))
            row.update(work_share(info, Case(row["phase"], row["batch"], row["seq"], row["past"], row["steps"])))
    path.write_text(json.dumps(doc, indent=2))


ORT_FORMATS = ("fp32", "int8-nbits", "int8-dynamic", "int8-static", "int4-nbits")
OV_FORMATS = ("fp32", "int8-static", "int8-nbits")


def quantized_copy(fp32: Path, scheme: str) -> Path:
    """fp32 export NAME-fp32 -> NAME-SCHEME next to it (made when missing; int8-static calibrated as export does)."""
    if scheme == "fp32":
        return fp32
    out = fp32.with_name(fp32.name.removesuffix("-fp32") + "-" + scheme)
    if not (out / "sdsonnx.json").is_file():
        from sdsonnx.artifact.quantize import calibration_ids, quantize_artifact

        manifest = json.loads((fp32 / "sdsonnx.json").read_text())
        source = (manifest.get("source") or {}).get("checkpoint")
        calibration = calibration_ids(source or fp32) if scheme == "int8-static" else None
        quantize_artifact(fp32, out, scheme, calibration)
    return out


DS_FORMATS = ("fp32", "int8-static")


def deepsparse_entries(families: list[str], formats: list[str], skip: list[str]) -> list:
    """DeepSparse entries: per family MODEL=FP32_EXPORT, each format whose export exists next to the fp32 one
    (NAME-fp32 -> NAME-FORMAT; none is made here), less those `skip` prefixes (ENGINE:MODEL:FORMAT) name."""
    from sdsonnx.bench.matrix import Entry

    out = []
    for spec in families:
        model, _, folder = spec.partition("=")
        fp32 = Path(folder)
        for fmt in (f for f in formats if f):
            path = fp32 if fmt == "fp32" else fp32.with_name(fp32.name.removesuffix("-fp32") + "-" + fmt)
            if any(f"deepsparse:{model}:{fmt}".startswith(s) for s in skip):
                continue
            if not (path / "sdsonnx.json").is_file():
                log.warning("deepsparse: no %s export of %s (%s): left out", fmt, model, path)
                continue
            out.append(Entry("deepsparse", model, path, fp32))
    return out


def matrix_main(args) -> None:
    """Engines x formats x sparsities in one interleaved run -> --json (default docs/benchmarks/speed.json)."""
    import os
    import shlex
    import subprocess
    import sys

    from sdsonnx.bench.matrix import Entry, run_matrix

    if not args.family:
        raise SystemExit("give --family MODEL=FP32_EXPORT at least for dense")
    ds_python = None
    if args.deepsparse:
        from sdsonnx.bench.deepsparse_env import DeepSparseUnavailable, find_deepsparse_python

        try:
            ds_python = args.deepsparse_python or find_deepsparse_python()
        except DeepSparseUnavailable as exc:
            raise SystemExit(str(exc)) from None
    wanted = []  # (engine, model, format, fp32 export, precision hint)
    for spec in args.family:
        model, _, folder = spec.partition("=")
        fp32 = Path(folder)
        wanted += [("onnxruntime", model, f, fp32, None) for f in args.ort_formats.split(",") if f]
        wanted += [("openvino", model, f, fp32, "f32") for f in args.ov_formats.split(",") if f]
        if model == "dense" and "fp32" in args.ov_formats.split(",") and not args.no_bf16:
            wanted.append(("openvino", model, "fp32", fp32, "bf16"))
    entries = [Entry(engine, model, quantized_copy(fp32, fmt), fp32, precision_hint=hint)
               for engine, model, fmt, fp32, hint in wanted
               if not any(f"{engine}:{model}:{fmt}".startswith(skip) for skip in args.skip)]
    if args.deepsparse:
        entries += deepsparse_entries(args.family, args.ds_formats.split(","), args.skip)
    print(f"{len(entries)} entries: {[e.key for e in entries]}; load average before: {os.getloadavg()}", flush=True)
    doc = run_matrix(entries, seqs=tuple(int(s) for s in args.seq.split(",")), decode=args.decode,
                     decode_batches=tuple(int(b) for b in args.batches.split(",")), past=128,
                     threads=args.threads or 2, warmup=args.warmup, reps=args.reps, deepsparse_python=ds_python,
                     worker_timeout=args.deepsparse_timeout)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    doc["git_commit"] = commit.stdout.strip()
    doc["command"] = ".venv/bin/python tools/speed_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path = args.json or REPO / "docs" / "benchmarks" / "speed.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(matrix_table(doc), flush=True)


def matrix_table(doc: dict) -> str:
    """Markdown rows: engine, model, format, case, ms, tok/s, speed-up [IQR] vs ORT dense fp32, bound."""
    rows = ["| engine | model | weights | case | ms / forward | tok/s | vs ORT dense fp32 [IQR] | bound | "
            "bound if zeros skipped | load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["records"]:
        case = f"prefill {r['seq']}" if r["phase"] == "prefill" else f"decode b{r['batch']}"
        hint = f" ({r['precision_hint']})" if r.get("precision_hint") else ""
        skip = r.get("bound_if_zeros_compressed", r.get("bound_if_zeros_skipped"))
        rows.append(f"| {r['engine']}{hint} | {r['model']} | {r['weight_format']} | {case} | {r['latency_ms']:.1f} | "
                    f"{r['tokens_per_s']:.0f} | {r['speedup_vs_dense_fp32']:.2f}x [{r['speedup_p25']:.2f}-"
                    f"{r['speedup_p75']:.2f}] | {r['bound_vs_dense_fp32']:.2f}x | "
                    f"{'-' if skip is None else f'{skip:.2f}x'} | {r.get('loadavg_1m_at_case_start')} |")
    ds = [r for r in doc["records"] if r["engine"] == "deepsparse"]
    if ds:
        rows += ["", "DeepSparse (its own process; vs ORT dense fp32 not interleaved):", "",
                 "| model | weights | case | ms / forward | vs DeepSparse dense, same weights [IQR] | "
                 "supported_ops | max abs err vs ORT | top-1 vs ORT | compile s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in ds:
            case = f"prefill {r['seq']}" if r["phase"] == "prefill" else f"decode b{r['batch']}"
            rel = r.get("deepsparse_speedup_vs_dense_same_format")
            rel = "-" if rel is None else (f"{rel:.2f}x [{r['deepsparse_speedup_vs_dense_same_format_p25']:.2f}-"
                                           f"{r['deepsparse_speedup_vs_dense_same_format_p75']:.2f}]")
            top1 = r.get("top1_agreement_vs_ort")
            rows.append(f"| {r['model']} | {r['weight_format']} | {case} | {r['latency_ms']:.1f} | {rel} | "
                        f"{r.get('supported_ops')} | {r.get('max_abs_err_vs_ort'):.3g} | "
                        f"{'-' if top1 is None else f'{top1:.3f}'} | {r.get('compile_s'):.1f} |")
    rows += [f"! {e['engine']} {e['model']} {e['weight_format']} {e['case']}: {e['error']}" for e in doc.get("errors", [])]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdsonnx-speed"))
    parser.add_argument("--models", default="smollm2,opt")
    parser.add_argument("--seq", default="128,512")
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--legacy-magnitude", action="store_true")
    parser.add_argument("--family", action="append", default=[], help="MODEL=FP32_EXPORT (first: dense)")
    parser.add_argument("--batches", default="1,8", help="decode batch sizes")
    parser.add_argument("--ort-formats", default=",".join(ORT_FORMATS))
    parser.add_argument("--ov-formats", default=",".join(OV_FORMATS))
    parser.add_argument("--skip", action="append", default=[], help="ENGINE:MODEL:FORMAT entries to leave out")
    parser.add_argument("--no-bf16", action="store_true", help="no OpenVINO dense fp32 entry with the bf16 hint")
    parser.add_argument("--deepsparse", action="store_true",
                        help="also time DeepSparse 1.8.0 (own venv, own process) on --ds-formats of every family")
    parser.add_argument("--ds-formats", default=",".join(DS_FORMATS),
                        help="DeepSparse weight formats; quantized ones only where NAME-FORMAT exists")
    parser.add_argument("--deepsparse-python", type=Path, default=None,
                        help="venv of DeepSparse (default $SDSONNX_DEEPSPARSE_PYTHON or .venv-deepsparse)")
    parser.add_argument("--deepsparse-timeout", type=float, default=3600.0,
                        help="seconds one DeepSparse worker (one case: compile + check + time) may run")
    parser.add_argument("--relimit-only", action="store_true",
                        help="Only recompute the speed-up limits of the records in --json (exports must still exist).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.legacy_magnitude:
        matrix_main(args)
        return
    args.json = args.json or REPO / "docs" / "benchmarks" / "speed_fp32_magnitude.json"
    if args.relimit_only:
        relimit(args.json)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    seqs = tuple(int(s) for s in args.seq.split(","))
    docs = json.loads(args.json.read_text()) if args.json.is_file() else {}
    for name in args.models.split(","):
        base = base_checkpoint(name, args.work)
        exports = {label: pruned_export(base, pattern, args.work / f"{name}-{label.replace('%', '').replace(':', 'of')}")
                   for label, pattern in VARIANTS.items()}
        doc = bench_models(exports, batch=1, seqs=seqs, decode=args.decode, threads=args.threads,
                           warmup=args.warmup, reps=args.reps)
        for row in doc["records"]:
            row["variant"], row["model"] = row["role"], name
        write_outputs(doc, args.work / f"{name}-bench")
        print(bench_table(doc), flush=True)
        docs = {"format": "sdsonnx-speed/1", "created": doc["created"], "machine": doc["machine"],
                "settings": {"warmup": doc["warmup"], "reps": doc["reps"], "cases": doc["cases"],
                             "engines": doc["engines"], "skipped": doc["skipped"]},
                "records": [r for r in docs.get("records", []) if r["model"] != name] + doc["records"],
                "errors": [e for e in docs.get("errors", []) if e.get("model") != name]
                + [{**e, "model": name} for e in doc["errors"]]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(docs, indent=2))


if __name__ == "__main__":
    main()
