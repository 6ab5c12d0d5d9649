"""Speed benchmark for docs/BENCHMARKS.md ("Speed") and docs/benchmarks/speed.json.

SmolLM2-135M (built-in, real weights) and an OPT-125M-shaped model (random weights: no OPT checkpoint installs
offline) are pruned by magnitude (sparsity pattern matters for speed, not quality) to 50%, 70% unstructured and
2:4 over the decoder Linears, exported with `sdsonnx export` (with KV cache), and timed dense vs sparse,
interleaved, in ONNX Runtime and DeepSparse: batch 1, prefill 128 and 512 tokens, decode (one-token steps on a
128-token cache).

    .venv/bin/python tools/speed_bench.py [--work /tmp/sdsonnx-speed] [--models smollm2,opt] [--reps 5]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdsonnx-speed"))
    parser.add_argument("--models", default="smollm2,opt")
    parser.add_argument("--seq", default="128,512")
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "benchmarks" / "speed.json")
    parser.add_argument("--relimit-only", action="store_true",
                        help="Only recompute the speed-up limits of the records in --json (exports must still exist).")
    args = parser.parse_args()
    if args.relimit_only:
        relimit(args.json)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
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
