"""Command line: each command parses its arguments, calls one library function and prints.

Exit codes (an interface for deployment pipelines, sdsonnx/errors.py): 0 success, 2 bad input (any InputError:
one line, no traceback) or failed validation, 1 internal error (anything else: the traceback and a request to
report it). The group catches InputError once for every command; commands do not map errors themselves.
"""
from __future__ import annotations

import logging
import shlex
import sys
import traceback

import click

from .errors import EXIT_BAD_INPUT, EXIT_INTERNAL, InputError

ISSUES_HINT = "This is a bug in sdsonnx, not in your input: please report it with the command, the version and " \
              "the traceback above."


class UserError(click.ClickException):
    """Bad input from the user: printed without a traceback, exit code 2."""

    exit_code = EXIT_BAD_INPUT


class _Main(click.Group):
    """The `sdsonnx` group: InputError -> exit 2 with its message; any other exception -> exit 1 with the
    traceback and a line asking to report it (click's own exceptions, exit and Ctrl-C pass through)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["sdsonnx.argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InputError as exc:
            raise UserError(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception:
            from . import __version__

            traceback.print_exc()
            command = shlex.join(["sdsonnx", *ctx.meta.get("sdsonnx.argv", [])])
            click.echo(f"internal error in `{command}` (sdsonnx {__version__}). {ISSUES_HINT}", err=True)
            sys.exit(EXIT_INTERNAL)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
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


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Output directory (overrides the recipe's).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--force", is_flag=True, help="Replace an existing output folder (atomically, when complete).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run of the same recipe, model and data from its last complete block "
                   "(kept in the output's hidden work area); refused (exit 2) when any of them changed.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Hidden-state streams kept in RAM, e.g. 6GiB (overrides the recipe's memory_budget); the rest "
                   "goes to files in the output's work area.")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print the predicted peak memory, disk and time per block from the model's config and the recipe "
                   "(no weights loaded, nothing written) and exit.")
def run(recipe: str, output: str | None, no_progress: bool, force: bool, resume: bool, max_memory: str | None,
        plan_only: bool) -> None:
    """Prune the model of RECIPE (a YAML file) stage by stage; write checkpoint, recipe and report.json."""
    from pathlib import Path

    from .distributed import close, from_environment
    from .recipe import load_recipe
    from .run import run_recipe
    from .summary import run_summary

    parsed = load_recipe(recipe, {"output": output, "memory_budget": max_memory})
    if plan_only:
        from .plan import format_plan, plan_run

        click.echo(format_plan(plan_run(parsed)))
        return
    out = Path(parsed.output or Path("runs") / Path(recipe).stem)
    group = from_environment()  # torchrun with several ranks: gloo process group (docs/SCALING.md)
    report = run_recipe(parsed, out, recipe, progress=not no_progress, force=force, resume=resume, group=group)
    close(group)  # on an error the rank exits non-zero instead and torchrun stops the others
    if group is not None and group.rank > 0:
        return
    click.echo(run_summary(report))
    written = ["model-*.safetensors", "recipe.resolved.yaml", "report.json"]
    written += [report["weight_figure"]["file"]] if "weight_figure" in report else []
    written += ["onnx/"] if "export" in report else []
    click.echo(f"\nwrote {out}/ ({', '.join(written)})")
    validation = (report.get("export") or {}).get("validation")
    if validation is not None and not validation["ok"]:
        click.echo("ONNX validation failed:\n  " + "\n  ".join(validation["failures"]), err=True)
        sys.exit(EXIT_BAD_INPUT)


@main.command("eval")
@click.argument("model")
@click.option("--data", default="wiki-extracts", show_default=True,
              help="Evaluation text: wiki-extracts, sotu-addresses (out of domain), c4, wikitext2 or a local file.")
@click.option("--window", default=2048, show_default=True, help="Tokens per window.")
@click.option("--max-tokens", type=int, default=None, help="Cap on evaluation tokens.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (perplexity, tokens, windows, window, seconds, load_seconds, "
                   "peak_rss_bytes, model, data, max_tokens) and no progress bar.")
@click.option("--streamed/--in-memory", default=None,
              help="Hold one decoder block at a time (a local safetensors checkpoint; default: streamed when its "
                   "float32 weights exceed a quarter of RAM).")
def eval_(model: str, data: str, window: int, max_tokens: int | None, as_json: bool, streamed: bool | None) -> None:
    """Print the perplexity of MODEL (checkpoint dir, export folder with model.onnx, smollm2-135m, GGUF or hub id)."""
    import json
    import resource
    import time

    from .data import evaluation_windows, load_split_texts
    from .evaluate import perplexity
    from .models import load_model

    from .artifact.onnx_eval import is_onnx_folder, load_onnx, onnx_perplexity

    start = time.perf_counter()
    if not is_onnx_folder(model) and _streams(model, streamed):
        from transformers import AutoTokenizer

        from .evaluate import streamed_perplexity

        windows = evaluation_windows(AutoTokenizer.from_pretrained(model), load_split_texts(data, "evaluation"), window,
                                     max_tokens)
        loaded = time.perf_counter()
        ppl = streamed_perplexity(model, windows, progress=not as_json)
    else:
        net, tokenizer = load_onnx(model) if is_onnx_folder(model) else load_model(model)  # ONNX Runtime, no KV cache
        windows = evaluation_windows(tokenizer, load_split_texts(data, "evaluation"), window, max_tokens)
        loaded = time.perf_counter()
        ppl = (onnx_perplexity if is_onnx_folder(model) else perplexity)(net, windows, progress=not as_json)
    if not as_json:
        click.echo(f"perplexity {ppl:.4f} ({windows.numel()} tokens, {windows.shape[0]} windows of {window})")
        return
    click.echo(json.dumps({
        "perplexity": ppl, "tokens": int(windows.numel()), "windows": int(windows.shape[0]), "window": window,
        "seconds": round(time.perf_counter() - loaded, 3), "load_seconds": round(loaded - start, 3),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: ru_maxrss in KiB
        "model": model, "data": data, "max_tokens": max_tokens,
    }))


def _streams(model: str, streamed: bool | None) -> bool:
    """Whether `eval` streams MODEL: asked, or a safetensors folder too large to load; exit 2 when asked for a
    model that is not a local safetensors folder."""
    from pathlib import Path

    from .shards import too_large_to_load

    local = Path(model).is_dir() and any(Path(model).glob("*.safetensors"))
    if streamed and not local:
        raise click.BadParameter(f"{model} is not a local folder of safetensors weights", param_hint="--streamed")
    return local and (streamed if streamed is not None else too_large_to_load(Path(model)))


@main.command()
@click.argument("model")
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
@click.option("--force", is_flag=True, help="Replace an existing output folder (atomically, when complete).")
@click.option("--quantize", type=click.Choice(["int8", "int8-nbits", "int8-dynamic", "int8-static", "int4-nbits"]),
              default=None, help="Quantize the weights keeping every pruned zero (int8 = int8-nbits; docs/ARTIFACTS.md).")
@click.option("--data", default=None, help="int8-static calibration text (default: report.json's, else wiki-extracts).")
@click.option("--calibration-segments", default=16, show_default=True, help="int8-static: segments of --data.")
@click.option("--calibration-length", default=128, show_default=True, help="int8-static: tokens per segment.")
@click.option("--streamed/--in-memory", default=None,
              help="Write the weights one tensor at a time from the shards instead of loading the model (default: "
                   "streamed when the float32 weights exceed a quarter of RAM; safetensors only).")
def export_(checkpoint: str, out: str, task: str, opset: int | None, external_data: bool, force: bool,
            quantize: str | None, data: str | None, calibration_segments: int, calibration_length: int,
            streamed: bool | None) -> None:
    """Export CHECKPOINT (HF folder) to OUT: model.onnx with sdsonnx.* sparsity metadata, tokenizer, sdsonnx.json."""
    from .artifact.export import export_checkpoint
    from .artifact.quantize import calibration_ids, resolve_scheme

    calibration = None
    if quantize is not None and resolve_scheme(quantize) == "int8-static":
        calibration = calibration_ids(checkpoint, data, calibration_segments, calibration_length)
    manifest = export_checkpoint(checkpoint, out, task=task, opset=opset, external_data=external_data or None,
                                 force=force, quantize=quantize, calibration=calibration, streamed=streamed)
    if quantize is not None:
        click.echo(f"quantized {manifest['quantization']['scheme']}: every pruned weight at its zero point")
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
@click.option("--lean/--full", default=None,
              help="Read each weight when checked, never all at once, and check numerics on one prompt with a "
                   "block-by-block PyTorch reference (default: lean when the export exceeds a quarter of RAM).")
def validate(out: str, checkpoint: str | None, atol: float | None, rtol: float | None, lean: bool | None) -> None:
    """Check the export in OUT (numerics, N:M sparsity, metadata); write OUT/validation.json; exit 2 on failure."""
    from .artifact.validate import DEFAULT_ATOL, DEFAULT_RTOL, format_report, validate_artifact

    report = validate_artifact(out, checkpoint, atol=DEFAULT_ATOL if atol is None else atol,
                               rtol=DEFAULT_RTOL if rtol is None else rtol, lean=lean)
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
@click.option("--deepsparse-python", type=click.Path(dir_okay=False), default=None,
              help="Python of the DeepSparse venv (default $SDSONNX_DEEPSPARSE_PYTHON or .venv-deepsparse).")
@click.option("--deepsparse-timeout", type=click.FloatRange(min=1), default=3600.0, show_default=True,
              help="Seconds one DeepSparse worker may run before it is killed and the bench fails (exit 2).")
@click.option("--force", is_flag=True, help="Replace an existing output folder (atomically, when complete).")
def bench(sparse_out, dense_out, engines, batch, seqs, decode, threads, warmup, reps, output, setup_deepsparse,
          force, deepsparse_python, deepsparse_timeout) -> None:
    """Prefill latency/throughput and decode tokens/s of SPARSE_OUT (vs --dense) in DeepSparse and ONNX Runtime."""
    from pathlib import Path

    from .bench import BenchError, bench_table, run_bench, setup_deepsparse as make_venv, write_outputs

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
    from .outputs import atomic_output

    out_dir = Path(output or Path(sparse_out) / "bench")
    with atomic_output(out_dir, force) as work:
        doc = run_bench(sparse_out, dense_out, tuple(e.strip() for e in engines.split(",") if e.strip()), batch,
                        seq_list, decode, threads, warmup, reps,
                        deepsparse_python=Path(deepsparse_python) if deepsparse_python else None,
                        worker_timeout=deepsparse_timeout)
        written = write_outputs(doc, work)
    json_path, png_path = (out_dir / p.name for p in written)
    click.echo(bench_table(doc))
    click.echo(f"\nwrote {json_path} and {png_path}")
