"""One pruning run of tools/peer_bench.py, in its own process: load the model folder, read the calibration token
tensor, prune with one implementation, save the decoder Linears' weights, print one JSON line.

  python worker.py IMPL METHOD PATTERN MODEL_DIR CALIBRATION.pt OUT.safetensors

IMPL: sdsonnx (project venv), reference (tools/peers/reference_ports.py; any venv with torch + transformers) or
llmcompressor (.venv-llmcompressor: its SparseGPTModifier / WandaPruningModifier through `oneshot`). METHOD:
sparsegpt | wanda; PATTERN: a sparsity (0.5) or n:m with n kept of m (2:4). Every implementation gets the same
settings: block size 128, dampening 1% of mean diag(H), all seven Linears of every decoder block (lm_head and
embeddings never), all Linears of a block pruned from the same block inputs, the next block calibrated on the
pruned block's outputs. The JSON line: prune_seconds (the pruning call alone: capture + statistics + solve, from
the tokens in memory to the pruned model in memory), prune_cpu_seconds (user + system CPU of all its threads, the
fairer cost when the machine is shared), load_seconds, save_seconds, peak_rss_bytes (VmHWM of this process),
threads, versions.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

THREADS = int(os.environ.get("PEER_THREADS", "2"))
BLOCKSIZE, PERCDAMP = 128, 0.01
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_pattern(pattern: str) -> tuple[float, int, int]:
    """'0.5' -> (0.5, 0, 0); '2:4' (n kept of m) -> (0.5, prunen=m-n, prunem=m), the references' convention."""
    if ":" in pattern:
        n, m = (int(x) for x in pattern.split(":"))
        if not 0 < n < m:
            raise ValueError(f"bad n:m pattern {pattern!r}")
        return (m - n) / m, m - n, m
    sparsity = float(pattern)
    if not 0 < sparsity < 1:
        raise ValueError(f"bad sparsity {pattern!r}")
    return sparsity, 0, 0


def linear_weights(model) -> dict[str, "torch.Tensor"]:
    """The decoder blocks' Linear weights by state-dict name (what every implementation prunes)."""
    return {f"{name}.weight": mod.weight.detach().contiguous() for name, mod in model.named_modules()
            if ".layers." in name and name.rsplit(".", 1)[-1] in LINEAR_SUFFIXES}


def load(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


def prune_sdsonnx(model, calibration, method: str, pattern: str) -> None:
    from sdsonnx.pipeline import prune_model
    from sdsonnx.recipe import parse_recipe

    stage = {"kind": "prune", "method": method}
    stage.update({"pattern": pattern} if ":" in pattern else {"sparsity": float(pattern)})
    if method == "sparsegpt":
        stage.update(blocksize=BLOCKSIZE, percdamp=PERCDAMP)
    recipe = parse_recipe({"model": "peer-bench", "device": "cpu", "evaluation": None, "weight_figure": None,
                           "calibration": {"segments": int(calibration.shape[0]), "length": int(calibration.shape[1])},
                           "stages": [stage]})
    prune_model(model, recipe, calibration, progress=False)


def prune_reference(model, calibration, method: str, pattern: str) -> None:
    from reference_ports import reference_prune

    sparsity, prunen, prunem = parse_pattern(pattern)
    reference_prune(model, calibration, method, sparsity, prunen, prunem, blocksize=BLOCKSIZE, percdamp=PERCDAMP)


def prune_llmcompressor(model, calibration, method: str, pattern: str) -> None:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    sparsity, prunen, prunem = parse_pattern(pattern)
    common = {"sparsity": sparsity, "mask_structure": f"{prunen}:{prunem}", "targets": ["Linear"],
              "ignore": ["re:.*lm_head"]}
    if method == "sparsegpt":
        modifier = SparseGPTModifier(**common, block_size=BLOCKSIZE, dampening_frac=PERCDAMP,
                                     preserve_sparsity_mask=False)
    else:
        modifier = WandaPruningModifier(**common)
    batches = [{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])} for row in calibration]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    oneshot(model=model, recipe=[modifier], dataset=loader, num_calibration_samples=len(batches),
            max_seq_length=calibration.shape[1], shuffle_calibration_samples=False, pipeline="sequential",
            output_dir=None)


def peak_rss_bytes() -> int:
    """VmHWM of this process: its own peak resident memory. Not ru_maxrss, which Linux carries over exec from the
    parent (a benchmark that holds a model would lend every worker its own peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("sdsonnx", "llmcompressor"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


PRUNE = {"sdsonnx": prune_sdsonnx, "reference": prune_reference, "llmcompressor": prune_llmcompressor}


def main(argv: list[str]) -> None:
    impl, method, pattern, model_dir, calibration_path, out = argv
    if impl not in PRUNE or method not in ("sparsegpt", "wanda"):
        raise SystemExit(f"usage: IMPL ({'|'.join(PRUNE)}) METHOD (sparsegpt|wanda) PATTERN MODEL_DIR CAL.pt OUT")
    parse_pattern(pattern)
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    model = load(model_dir)
    calibration = torch.load(calibration_path)
    loaded, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        PRUNE[impl](model, calibration, method, pattern)
    pruned, cpu = time.perf_counter(), time.process_time() - cpu
    weights = linear_weights(model)
    save_file({k: v.float() for k, v in weights.items()}, out)
    record = {"prune_seconds": pruned - loaded, "prune_cpu_seconds": cpu, "load_seconds": loaded - start,
              "save_seconds": time.perf_counter() - pruned, "linears": len(weights),
              "peak_rss_bytes": peak_rss_bytes(),
              "threads": torch.get_num_threads(), "versions": versions()}
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(sys.argv[1:])
