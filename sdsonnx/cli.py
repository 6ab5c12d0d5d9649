"""Command line: each command parses its arguments, calls one library function and prints.

Exit codes (an interface for deployment pipelines): 0 success, 2 bad input or failed validation,
1 internal error.
"""
from __future__ import annotations

import logging
import sys

import click

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


class UserError(click.ClickException):
    """Bad input from the user: printed without a traceback, exit code 2."""

    exit_code = EXIT_BAD_INPUT


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(package_name="sdsonnx")
def main(verbose: bool) -> None:
    """sdsonnx: Sparse-Dense-Sparse pruning of causal language models, exported to ONNX."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _fail_cleanly(func):
    """Map library errors to exit codes: bad input -> 2 with a message, anything else -> 1 with a traceback."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from .recipe import RecipeError
        from .blocks import UnsupportedModelError
        from .data import DataSourceError
        from .models import ModelSourceError

        try:
            return func(*args, **kwargs)
        except (RecipeError, UnsupportedModelError, DataSourceError, ModelSourceError, FileNotFoundError) as exc:
            raise UserError(str(exc)) from None

    return wrapper


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Output directory (overrides the recipe's).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@_fail_cleanly
def run(recipe: str, output: str | None, no_progress: bool) -> None:
    """Prune the model of RECIPE (a YAML file) stage by stage; write checkpoint, recipe and report.json."""
    from pathlib import Path

    from .recipe import load_recipe
    from .run import run_recipe
    from .summary import run_summary

    parsed = load_recipe(recipe, {"output": output})
    out = Path(parsed.output or Path("runs") / Path(recipe).stem)
    report = run_recipe(parsed, out, recipe, progress=not no_progress)
    click.echo(run_summary(report))
    written = ["model.safetensors", "recipe.resolved.yaml", "report.json"]
    written += [report["weight_figure"]["file"]] if "weight_figure" in report else []
    written += ["onnx/"] if "export" in report else []
    click.echo(f"\nwrote {out}/ ({', '.join(written)})")
    validation = (report.get("export") or {}).get("validation")
    if validation is not None and not validation["ok"]:
        click.echo("ONNX validation failed:\n  " + "\n  ".join(validation["failures"]), err=True)
        sys.exit(EXIT_BAD_INPUT)


@main.command("eval")
@click.argument("model")
@click.option("--data", default="wiki-extracts", show_default=True, help="Evaluation text source.")
@click.option("--window", default=2048, show_default=True, help="Tokens per window.")
@click.option("--max-tokens", type=int, default=None, help="Cap on evaluation tokens.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (perplexity, tokens, windows, window, seconds, load_seconds, "
                   "peak_rss_bytes, model, data, max_tokens) and no progress bar.")
@_fail_cleanly
def eval_(model: str, data: str, window: int, max_tokens: int | None, as_json: bool) -> None:
    """Print the perplexity of MODEL (checkpoint dir, smollm2-135m, GGUF or hub id) on evaluation text."""
    import json
    import resource
    import time

    from .data import evaluation_windows, load_split_texts
    from .evaluate import perplexity
    from .models import load_model

    start = time.perf_counter()
    net, tokenizer = load_model(model)
    windows = evaluation_windows(tokenizer, load_split_texts(data, "evaluation"), window, max_tokens)
    loaded = time.perf_counter()
    ppl = perplexity(net, windows, progress=not as_json)
    if not as_json:
        click.echo(f"perplexity {ppl:.4f} ({windows.numel()} tokens, {windows.shape[0]} windows of {window})")
        return
    click.echo(json.dumps({
        "perplexity": ppl, "tokens": int(windows.numel()), "windows": int(windows.shape[0]), "window": window,
        "seconds": round(time.perf_counter() - loaded, 3), "load_seconds": round(loaded - start, 3),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: ru_maxrss in KiB
        "model": model, "data": data, "max_tokens": max_tokens,
    }))


@main.command()
@click.argument("model")
@_fail_cleanly
def inspect(model: str) -> None:
    """Print a per-module sparsity and N:M pattern table of MODEL's decoder Linears."""
    from .models import load_model
    from .summary import inspect_rows, table

    net, _ = load_model(model)
    rows = inspect_rows(net)
    click.echo(table(rows, ["module", "shape", "sparsity", "pattern"]))


@main.command("export")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--task", type=click.Choice(["text-generation", "text-generation-with-past"]),
              default="text-generation-with-past", show_default=True, help="optimum export task.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--external-data", is_flag=True, help="Always write weights to model.onnx_data (automatic above 2 GB).")
@_fail_cleanly
def export_(checkpoint: str, out: str, task: str, opset: int | None, external_data: bool) -> None:
    """Export CHECKPOINT (HF folder) to OUT: model.onnx with sdsonnx.* sparsity metadata, tokenizer, sdsonnx.json."""
    from .artifact.export import ExportError, export_checkpoint

    try:
        manifest = export_checkpoint(checkpoint, out, task=task, opset=opset, external_data=external_data or None)
    except ExportError as exc:
        raise UserError(str(exc)) from None
    s = manifest["sparsity"]
    click.echo(f"wrote {out}/ ({manifest['model_file']}{''.join(' + ' + f for f in manifest['external_data'])}, "
               f"opset {manifest['opset']}): {len(manifest['modules'])} pruned weights, "
               f"global sparsity {s['global']:.4f}, pattern {s['pattern']}")


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--checkpoint", type=click.Path(file_okay=False), default=None,
              help="Checkpoint the export came from: enables numerics and exact weight checks.")
@click.option("--atol", type=float, default=None, help="Absolute logit tolerance ORT vs PyTorch (default 1e-3).")
@click.option("--rtol", type=float, default=None, help="Added tolerance per unit of max |logit| (default 1e-3).")
@_fail_cleanly
def validate(out: str, checkpoint: str | None, atol: float | None, rtol: float | None) -> None:
    """Check the export in OUT (numerics, N:M sparsity, metadata); write OUT/validation.json; exit 2 on failure."""
    from .artifact.validate import DEFAULT_ATOL, DEFAULT_RTOL, format_report, validate_artifact

    report = validate_artifact(out, checkpoint, atol=DEFAULT_ATOL if atol is None else atol,
                               rtol=DEFAULT_RTOL if rtol is None else rtol)
    click.echo(format_report(report))
    if not report.ok:
        sys.exit(EXIT_BAD_INPUT)


@main.command()
@click.argument("sparse_out", required=False, type=click.Path())
@click.option("--dense", "dense_out", type=click.Path(), default=None, help="Dense export to compare against.")
@click.option("--engine", "engines", default="deepsparse,onnxruntime", show_default=True,
              help="Comma-separated engines: deepsparse, onnxruntime.")
@click.option("--batch", default=1, show_default=True)
@click.option("--seq", "seqs", default="128,512", show_default=True, help="Comma-separated prefill lengths.")
@click.option("--decode", default=32, show_default=True,
              help="Decode steps per repetition (one token each, cache of min(--seq)); 0 skips decode.")
@click.option("--threads", type=int, default=None, help="Threads/cores per engine (default: all available).")
@click.option("--warmup", default=2, show_default=True)
@click.option("--reps", default=10, show_default=True)
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Where bench.json and bench.png go (default SPARSE_OUT/bench).")
@click.option("--setup-deepsparse", is_flag=True, help="Create .venv-deepsparse (deepsparse 1.8.0) and exit if no SPARSE_OUT.")
@_fail_cleanly
def bench(sparse_out, dense_out, engines, batch, seqs, decode, threads, warmup, reps, output, setup_deepsparse) -> None:
    """Prefill latency/throughput and decode tokens/s of SPARSE_OUT (vs --dense) in DeepSparse and ONNX Runtime."""
    from pathlib import Path

    from .bench import (BenchError, DeepSparseCompatError, DeepSparseUnavailable, bench_table, run_bench,
                        setup_deepsparse as make_venv, write_outputs)

    try:
        if setup_deepsparse:
            click.echo(f"DeepSparse ready: {make_venv()}")
            if sparse_out is None:
                return
        if sparse_out is None:
            raise BenchError("give SPARSE_OUT (an export folder), or --setup-deepsparse")
        try:
            seq_list = tuple(int(s) for s in seqs.split(",") if s.strip())
        except ValueError:
            raise BenchError(f"--seq must be comma-separated integers, got {seqs!r}") from None
        doc = run_bench(sparse_out, dense_out, tuple(e.strip() for e in engines.split(",") if e.strip()), batch,
                        seq_list, decode, threads, warmup, reps)
    except (BenchError, DeepSparseUnavailable, DeepSparseCompatError) as exc:
        raise UserError(str(exc)) from None
    json_path, png_path = write_outputs(doc, output or Path(sparse_out) / "bench")
    click.echo(bench_table(doc))
    click.echo(f"\nwrote {json_path} and {png_path}")
