"""Scale benchmark (issue 13): a LLaMA-7B-shaped checkpoint with random weights, and sdsonnx runs on it.

`write` makes the checkpoint: config.json (LlamaConfig, untied head), random fp16 weights (normal, std 0.02;
norms ones) as Hugging Face safetensors shards written one decoder block at a time (the whole model is never in
memory; shard 1 the embedding, one shard per block, the last the final norm and LM head) with
model.safetensors.index.json, and an offline byte-level BPE tokenizer trained on the built-in wiki-extracts text.
`run` writes a recipe per method (stages from recipes/llama7b_50.yaml and recipes/llama7b_sds_50.yaml; reduced
calibration wiki-extracts 16 x 512, evaluation of the final model on a few windows), runs `sdsonnx run` in a
subprocess under /usr/bin/time -v (peak RSS of the process), reads report.json, projects the whole-model time
from the blocks run, records the plan's prediction (sdsonnx.plan) beside the measurement, and writes
docs/benchmarks/scale.json. `table(records)` is the markdown table for docs/BENCHMARKS.md.

  .venv/bin/python tools/scale_bench.py write /tmp/llama7b-shape                  # 13.5 GB on disk, ~1-3 min
  .venv/bin/python tools/scale_bench.py run /tmp/llama7b-shape --blocks 2         # first 2 blocks, both methods
  .venv/bin/python tools/scale_bench.py run /tmp/llama7b-shape --blocks 2 --segments 128 --length 2048
  .venv/bin/python tools/scale_bench.py write /tmp/tiny --scale tiny              # hidden 64, 2 blocks, vocab 512
  .venv/bin/python tools/scale_bench.py write /tmp/llama7b-24 --pattern 2:4       # magnitude 2:4 + report.json

The record's seconds_per_block is (prune + evaluation seconds) / blocks run (report.json's wall_seconds; the
streamed loop loads and writes each block inside `prune`); projected_seconds adds the rest of the process time
once. peak_rss_bytes is the process's (GNU time), report_peak_rss_bytes the run's own figure.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "docs" / "benchmarks" / "scale.json"
SCALES = {
    "7b": {"hidden": 4096, "ffn": 11008, "blocks": 32, "heads": 32, "vocab": 32000},
    "tiny": {"hidden": 64, "ffn": 176, "blocks": 2, "heads": 4, "vocab": 512},
}
METHODS = {"sparsegpt": ROOT / "recipes" / "llama7b_50.yaml", "sds-sparsegpt": ROOT / "recipes" / "llama7b_sds_50.yaml"}
STD = 0.02
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in LLaMA
GIB = 2**30


def llama_config(hidden: int, ffn: int, blocks: int, heads: int, vocab: int):
    """LlamaConfig of the given shape, LLaMA-7B's other settings (untied head, eps 1e-6, 2048 positions)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=blocks, num_attention_heads=heads,
                       num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=2048, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None)


def expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """{name: shape} of LlamaForCausalLM's state_dict for `config`, from a model built on the meta device."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def shard_names(config) -> list[list[str]]:
    """Tensor names per shard: [embedding], [block 0], ..., [block n-1], [final norm, LM head]."""
    names = list(expected_tensors(config))
    blocks = config.num_hidden_layers
    shards = [[n for n in names if n.startswith("model.embed_tokens.")]]
    shards += [[n for n in names if n.startswith(f"model.layers.{i}.")] for i in range(blocks)]
    shards.append([n for n in names if not n.startswith(("model.embed_tokens.", "model.layers."))])
    if sum(map(len, shards)) != len(names):
        raise ValueError(f"unexpected tensor names in {type(config).__name__}: {names[:5]}...")
    return shards


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Norm weights: ones; every other weight: normal(0, STD), drawn in float32 and cast to `dtype`."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator) * STD).to(dtype)


def prune_magnitude(tensors: dict[str, torch.Tensor], pattern: str) -> dict[str, dict]:
    """Magnitude-prune every decoder Linear weight (`*_proj.weight`) in `tensors` to the n:m `pattern` along its
    input dimension, in place; returns report.json's module records {module: {sparsity, pattern}}."""
    from sdsonnx.masks import keep_largest
    from sdsonnx.pattern import Pattern

    records = {}
    for name, w in tensors.items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            mask = keep_largest(w.float().abs(), Pattern.parse(pattern))
            w.mul_(mask)
            records[name.removesuffix(".weight")] = {"sparsity": float((w == 0).float().mean()), "pattern": pattern}
    return records


def write_checkpoint(folder: str | Path, hidden: int = 4096, ffn: int = 11008, blocks: int = 32, heads: int = 32,
                     vocab: int = 32000, dtype: torch.dtype = torch.float16, seed: int = 0,
                     tokenizer_documents: int | None = None, pattern: str | None = None) -> Path:
    """A LLaMA-shaped HF checkpoint with random weights in `folder`, one shard per block, plus a BPE tokenizer of
    `vocab` ids trained on wiki-extracts (its first `tokenizer_documents` documents; None: all); returns folder.
    pattern (n:m): the decoder Linears magnitude-pruned to it, with a report.json recording it per module (what
    `sdsonnx export` checks), so the export and validation of a pruned checkpoint can be measured at size."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = llama_config(hidden, ffn, blocks, heads, vocab)
    config.dtype = dtype
    shapes = expected_tensors(config)
    shards = shard_names(config)
    weight_map, total, records = {}, 0, {}
    for index, names in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        tensors = {name: random_tensor(name, shapes[name], dtype, generator) for name in names}
        if pattern is not None:
            records.update(prune_magnitude(tensors, pattern))
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: file for name in names})
        del tensors
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))
    config.save_pretrained(folder)
    write_tokenizer(folder, vocab, tokenizer_documents)
    if pattern is not None:
        report = {"recipe_hash": "", "model": str(folder), "pattern": pattern, "modules": records,
                  "note": f"random weights magnitude-pruned to {pattern} by tools/scale_bench.py write"}
        (folder / "report.json").write_text(json.dumps(report, indent=2))
    return folder


def write_tokenizer(folder: str | Path, vocab: int, documents: int | None = None):
    """Train a byte-level BPE tokenizer of at most `vocab` ids on the wiki-extracts calibration part (its first
    `documents` documents) and save it as a PreTrainedTokenizerFast that prepends <s> like LLaMA's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from sdsonnx.data import load_texts

    texts = load_texts("wiki-extracts", "calibration").documents[:documents]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=2048)
    fast.save_pretrained(folder)
    return fast


# ---------------------------------------------------------------- runs


def bench_recipe(folder: str | Path, method: str, num_blocks: int | None, segments: int = 16, length: int = 512,
                 window: int = 512, eval_tokens: int = 2048, memory_budget: str | None = None,
                 stages: list[dict] | None = None, device: str = "cpu") -> dict:
    """The recipe dict of one case: the method's stages from its LLaMA-7B recipe (or `stages`), reduced
    calibration, the final model's perplexity on eval_tokens // window windows, no figure and no export."""
    stages = stages or yaml.safe_load(METHODS[method].read_text())["stages"]
    recipe = {"model": str(Path(folder).resolve()), "dtype": "float16", "activation_dtype": "float16", "device": device,
              "calibration": {"source": "wiki-extracts", "segments": segments, "length": length, "seed": 0},
              "evaluation": {"source": "wiki-extracts", "window": window, "max_tokens": eval_tokens, "dense": False,
                             "each_step": False},
              "weight_figure": None, "stages": stages}
    if num_blocks is not None:
        recipe["num_blocks"] = num_blocks
    if memory_budget is not None:
        recipe["memory_budget"] = memory_budget
    return recipe


def parse_max_rss(time_output: str) -> int | None:
    """Peak RSS in bytes from GNU time -v's 'Maximum resident set size (kbytes): N' line; None when absent."""
    found = re.findall(r"Maximum resident set size \(kbytes\):\s*(\d+)", time_output)
    return int(found[-1]) * 1024 if found else None


PER_BLOCK_KEYS = ("prune", "eval_dense", "eval_steps", "eval_pruned")


def make_record(report: dict, *, method: str, shape: dict, blocks_run: int, process_seconds: float,
                process_peak_rss: int | None, predicted: dict | None = None, command: str = "",
                commit: str = "") -> dict:
    """One scale.json record from a run's report.json object and the process measurements.

    seconds_per_block = (prune + evaluation seconds) / blocks_run; the projected whole-model time adds the rest of
    the process time (loading, tokenising, saving) once: projected = rest + seconds_per_block * shape["blocks"]."""
    if blocks_run < 1:
        raise ValueError(f"blocks_run must be >= 1, got {blocks_run}")
    wall = report.get("wall_seconds", {})
    per_block_total = sum(float(wall.get(k, 0.0)) for k in PER_BLOCK_KEYS)
    seconds_per_block = per_block_total / blocks_run
    rest = max(process_seconds - per_block_total, 0.0)
    cal = report.get("calibration", {})
    peak = process_peak_rss if process_peak_rss is not None else int(report["peak_rss_bytes"])
    record = {
        "shape": f"LLaMA hidden {shape['hidden']}, FFN {shape['ffn']}, {shape['blocks']} blocks, "
                 f"{shape['heads']} heads, vocab {shape['vocab']}",
        **{k: shape[k] for k in ("hidden", "ffn", "blocks", "heads", "vocab")},
        "method": method,
        "blocks_run": blocks_run,
        "calibration": f"{cal.get('segments', '?')} x {cal.get('length', '?')}",
        "peak_rss_bytes": peak,
        "report_peak_rss_bytes": int(report["peak_rss_bytes"]),
        "process_seconds": round(process_seconds, 1),
        "wall_seconds": wall,
        "seconds_per_block": round(seconds_per_block, 2),
        "projected_seconds": round(rest + seconds_per_block * shape["blocks"], 1),
        "projected": blocks_run < shape["blocks"],
        "perplexity": report.get("perplexity", {}).get("pruned"),
        "device": "cuda" if report.get("peak_device_bytes") is not None else "cpu",
        "peak_device_bytes": report.get("peak_device_bytes"),
        "command": command,
        "commit": commit,
    }
    if predicted is not None:
        record["predicted_peak_bytes"] = int(predicted["peak_rss_bytes"])
        record["predicted_seconds_per_block"] = round(float(predicted["seconds_per_block"]), 2)
        record["peak_vs_plan"] = round(peak / predicted["peak_rss_bytes"] - 1.0, 4)
    return record


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def table(records: list[dict]) -> str:
    """Markdown Scale table: shape, method, blocks run, calibration, peak RSS (and the plan's), seconds per block,
    whole-model time (projected where fewer blocks ran), export and validation peak where measured."""
    lines = ["| model shape | method | blocks run | calibration | memory budget | peak RSS | plan | s / block | "
             "whole model | export / validation peak | load avg | commit |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        plan = f"{r['predicted_peak_bytes'] / GIB:.2f} GiB ({r['peak_vs_plan']:+.0%})" \
            if "predicted_peak_bytes" in r and r.get("device", "cpu") == "cpu" else "-"  # the plan is a CPU run's
        whole = _duration(r["projected_seconds"]) + (" (projected)" if r.get("projected") else "")
        export = " / ".join(f"{r[k] / GIB:.2f} GiB" for k in ("export_peak_rss_bytes", "validate_peak_rss_bytes")
                            if r.get(k) is not None) or "-"
        method = r["method"] if r.get("device") != "cuda" else \
            f"{r['method']} on {r['host']} (GPU peak {r['peak_device_bytes'] / GIB:.2f} GiB)"
        lines.append(f"| {r['shape']} | {method} | {r['blocks_run']} of {r['blocks']} | {r['calibration']} | "
                     f"{r.get('memory_budget') or 'none'} | {r['peak_rss_bytes'] / GIB:.2f} GiB | {plan} | "
                     f"{r['seconds_per_block']:.1f} | {whole} | {export} | {r.get('load_average_after', '-')} | "
                     f"{r.get('commit', '-')} |")
    return "\n".join(lines)


def git_commit() -> str:
    """The checkout's short commit; $SDSONNX_COMMIT where the tree is a copy without git (a lent GPU machine)."""
    if os.environ.get("SDSONNX_COMMIT"):
        return os.environ["SDSONNX_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return ""
    return out.stdout.strip()


def checkpoint_shape(folder: str | Path) -> dict:
    """SCALES-style dict of a written checkpoint's config.json."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    return {"hidden": cfg["hidden_size"], "ffn": cfg["intermediate_size"], "blocks": cfg["num_hidden_layers"],
            "heads": cfg["num_attention_heads"], "vocab": cfg["vocab_size"]}


def run_case(folder: str | Path, method: str, num_blocks: int | None, workdir: str | Path, **recipe_options) -> dict:
    """`sdsonnx run` of one method on the checkpoint in a subprocess under /usr/bin/time -v; its record."""
    from sdsonnx.plan import plan_run
    from sdsonnx.recipe import load_recipe

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    shape = checkpoint_shape(folder)
    recipe_path = workdir / f"{method}.yaml"
    recipe_path.write_text(yaml.safe_dump(bench_recipe(folder, method, num_blocks, **recipe_options), sort_keys=False))
    out = workdir / f"{method}-out"
    sdsonnx = [sys.executable, "-c", "from sdsonnx.cli import main; main()"]
    cmd = [*sdsonnx, "run", str(recipe_path), "--output", str(out), "--no-progress", "--force"]
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    plan = plan_run(load_recipe(recipe_path))
    commit = git_commit()
    start = time.perf_counter()
    proc = subprocess.run([*timer, *cmd], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{method} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads((out / "report.json").read_text())
    blocks_run = min(num_blocks or shape["blocks"], shape["blocks"])
    shown = f"sdsonnx run {recipe_path.name} --output {out.name} --no-progress"
    record = make_record(report, method=method, shape=shape, blocks_run=blocks_run, process_seconds=seconds,
                         process_peak_rss=parse_max_rss(proc.stderr),
                         predicted={"peak_rss_bytes": plan.peak_rss_bytes, "seconds_per_block": plan.seconds_per_block},
                         command=shown, commit=commit)
    record["memory_budget"] = recipe_options.get("memory_budget")
    record["host"] = f"{os.cpu_count()} cores" + (f", {torch.cuda.get_device_name()}" if record["device"] == "cuda" else "")
    record["load_average_after"] = round(os.getloadavg()[0], 2)  # > cores: times are slowed by other work
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the random checkpoint and tokenizer")
    w.add_argument("folder")
    w.add_argument("--scale", choices=sorted(SCALES), default="7b")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--pattern", default=None, help="magnitude-prune the decoder Linears to this n:m (e.g. 2:4)")
    r = sub.add_parser("run", help="run the methods on a written checkpoint")
    r.add_argument("folder")
    r.add_argument("--blocks", type=int, default=None, help="first k blocks only (default: all)")
    r.add_argument("--methods", default=",".join(METHODS))
    r.add_argument("--segments", type=int, default=16)
    r.add_argument("--length", type=int, default=512)
    r.add_argument("--eval-tokens", type=int, default=2048)
    r.add_argument("--memory-budget", default=None, help="recipe memory_budget (e.g. 4GiB)")
    r.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="recipe device (cuda: one block on the GPU)")
    r.add_argument("--workdir", default=None, help="recipes and outputs (default: a temporary folder)")
    r.add_argument("--json", default=str(JSON_PATH))
    args = parser.parse_args(argv)
    if args.command == "write":
        start = time.perf_counter()
        write_checkpoint(args.folder, **SCALES[args.scale], seed=args.seed, pattern=args.pattern)
        print(f"wrote {args.folder} in {time.perf_counter() - start:.0f} s")
        return
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        for method in args.methods.split(","):
            records.append(run_case(args.folder, method, args.blocks, workdir, segments=args.segments,
                                    length=args.length, eval_tokens=args.eval_tokens,
                                    memory_budget=args.memory_budget, device=args.device))
            print(json.dumps(records[-1], indent=2), flush=True)
    command = "tools/scale_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for record in records:
        record["bench_command"] = command
    path = Path(args.json)
    old = json.loads(path.read_text())["records"] if path.is_file() else []
    key = lambda r: json.dumps([r.get("method"), r.get("blocks_run"), r.get("calibration"), r.get("memory_budget"),
                                r.get("device", "cpu")])
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in records})  # a re-run of the same case replaces its record
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"records": list(merged.values())}, indent=2) + "\n")
    print(table(list(merged.values())))


if __name__ == "__main__":
    main()
