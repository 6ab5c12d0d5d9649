"""`sdsonnx run`: check the recipe, load model and data, prune, evaluate, save checkpoint and report."""
from __future__ import annotations

import json
import logging
import platform
import resource
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from . import __version__
from .data import (DataSourceError, Texts, TextUse, calibration_data, evaluation_data, load_texts, overlap_documents,
                   section_part)
from .blocks import find_blocks
from .models import open_streamed
from .outputs import atomic_output
from .pipeline import DTYPES, PipelineResult, prune_model
from .preflight import check_recipe
from .recipe import Recipe
from .residual_step import PERMUTATION_FILE
from .resume import Checkpointer, identity
from .shards import ShardWriter, StreamedWeights
from .streams import StreamStore
from .report import (CalibrationRecord, DataRecord, DataUseRecord, EvaluationRecord, ExportRecord, FigureRecord,
                     HostRecord, RunReport, ValidationRecord, write_report)

log = logging.getLogger(__name__)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def recipe_field(recipe_path: str, field: str):
    """A DataSourceError inside the with-block names the recipe file and field it comes from."""
    try:
        yield
    except DataSourceError as exc:
        raise DataSourceError(f"{recipe_path}: {field}: {exc}") from None


def recipe_texts(recipe: Recipe, recipe_path: str = "<recipe>") -> dict[str, Texts]:
    """The documents each data section of the recipe reads ({"calibration": ..., "evaluation": ...} when it
    evaluates), before any weight loads: empty, binary, non-UTF-8 or field-less files fail here."""
    sections = {"calibration": recipe.calibration, "evaluation": recipe.evaluation}
    texts = {}
    for name, spec in sections.items():
        if spec is None:
            continue
        other = sections["evaluation" if name == "calibration" else "calibration"]
        with recipe_field(recipe_path, f"{name}.split"):
            part = section_part(name, spec.source, spec.split, None if other is None else other.source)
        with recipe_field(recipe_path, f"{name}.source"):
            texts[name] = load_texts(spec.source, part)
    return texts


def recipe_tokens(recipe: Recipe, tokenizer, texts: dict[str, Texts], recipe_path: str = "<recipe>"
                  ) -> tuple[torch.Tensor, torch.Tensor | None, DataRecord]:
    """(calibration segments [segments * parts, length], evaluation windows [k, window] or None, what they used);
    documents used by both sections are a warning and the record's overlap_documents."""
    cal, ev = recipe.calibration, recipe.evaluation
    with recipe_field(recipe_path, "calibration"):
        segments, cal_use = calibration_data(tokenizer, texts["calibration"], cal.segments * cal.parts, cal.length,
                                             cal.seed)
    windows, ev_use = None, None
    if ev is not None:
        with recipe_field(recipe_path, "evaluation"):
            windows, ev_use = evaluation_data(tokenizer, texts["evaluation"], ev.window, ev.max_tokens)
    overlap = 0 if ev_use is None else overlap_documents(cal_use, ev_use)
    if overlap:
        log.warning("%s: %d documents are used by both calibration (%s) and evaluation (%s): the perplexity is "
                    "partly measured on calibration text", recipe_path, overlap, texts["calibration"].name,
                    texts["evaluation"].name)
    return segments, windows, DataRecord(_use_record(cal_use), None if ev_use is None else _use_record(ev_use), overlap)


def _use_record(use: TextUse) -> DataUseRecord:
    return DataUseRecord(use.source, use.part, use.available, use.documents, use.tokens)


@contextmanager
def timed(wall: dict[str, float], key: str):
    """Add the wall-clock seconds the with-block takes to wall[key]."""
    start = time.perf_counter()
    yield
    wall[key] = wall.get(key, 0.0) + time.perf_counter() - start


def run_recipe(recipe: Recipe, output: Path, recipe_path: str = "<recipe>", progress: bool = True,
               force: bool = False, resume: bool = False, group=None) -> dict:
    """Run every stage of the recipe and write checkpoint, resolved recipe and report.json into `output`;
    returns report.json's object (RunReport.to_dict()). `output` is built in a hidden work area and renamed into
    place when complete (sdsonnx/outputs.py): an existing `output` is an OutputExistsError unless `force`.
    `resume` continues an interrupted run from its work area's last complete block (sdsonnx/resume.py).
    `group` (sdsonnx/distributed.RankGroup, under torchrun): every rank prunes its share, rank 0 alone writes
    `output`; other ranks work in a hidden sibling (distributed.rank_area) and return {}."""
    check_recipe(recipe, recipe_path, output)
    wall: dict[str, float] = {}
    with timed(wall, "load"):  # the data first: a text that cannot be used fails before the weights load
        texts = recipe_texts(recipe, recipe_path)
        tokenizer = local_tokenizer(recipe)
        tokens = None if tokenizer is None else recipe_tokens(recipe, tokenizer, texts, recipe_path)
    if group is not None and group.rank > 0:
        from .distributed import rank_work_area

        progress = False  # one progress bar (rank 0's)

        with rank_work_area(output, group.rank, resume) as work:
            return _run_into(recipe, work, Path(output).resolve(), progress, texts, recipe_path, tokens, wall, resume,
                             group)
    with atomic_output(output, force, resume=resume) as work:
        return _run_into(recipe, work, Path(output).resolve(), progress, texts, recipe_path, tokens, wall, resume,
                         group)


def _run_into(recipe: Recipe, work: Path, output: Path, progress: bool, texts: dict[str, Texts],
              recipe_path: str, tokens: tuple | None, wall: dict[str, float], resume: bool = False,
              group=None) -> dict:
    """run_recipe's body: open the model as a skeleton whose blocks stream from its shards, prune (measuring the
    perplexities on the way) and write everything into `work` (to become `output`)."""
    dtype = DTYPES[recipe.dtype]
    with timed(wall, "load"):
        model, reader, tokenizer, folder = open_streamed(recipe.model, dtype, recipe.num_blocks, work,
                                                         recipe.trust_remote_code, recipe.allow_pickle)
        calibration, windows, data = tokens or recipe_tokens(recipe, tokenizer, texts, recipe_path)
    same_results = recipe.model_copy(update={"memory_budget": None, "output": None})  # neither changes a weight
    ident = identity(same_results.digest(), folder, calibration, windows)
    if group is None:
        checkpointer = Checkpointer(work, ident)
    else:
        from .distributed import RankCheckpointer

        checkpointer = RankCheckpointer(work, ident, group)
    state = checkpointer.load() if resume else None
    if resume and state is None:
        log.info("%s: no finished block to resume from; starting at block 0", output)

    _, blocks = find_blocks(model)
    weights = StreamedWeights(model, reader, ShardWriter(work, len(blocks) + 1), dtype)
    if group is not None and group.rank > 0:
        from .distributed import ReadOnlyWeights

        weights = ReadOnlyWeights(weights)  # rank 0 writes the shards
    (work / "streams").mkdir(exist_ok=True)
    store = StreamStore(recipe.memory_budget, work / "streams")
    with timed(wall, "prune"):
        result = prune_model(model, recipe, calibration, progress=progress, windows=windows, weights=weights,
                             resume=state, checkpoint=checkpointer.commit, store=store, group=group,
                             residual_file=work / PERMUTATION_FILE)
        weights.finish_model()
    checkpointer.clear()
    shutil.rmtree(work / "streams", ignore_errors=True)
    if group is not None:
        group.barrier()  # every rank's loop is complete before rank 0 renames the output into place
        if group.rank > 0:
            return {}
    wall["prune"] -= sum(result.eval_seconds.values())  # evaluation inside the loop is reported apart
    for stage, seconds in zip(recipe.stages, result.stage_seconds):
        wall[f"stage_{stage.kind}"] = wall.get(f"stage_{stage.kind}", 0.0) + seconds
    wall.update(result.eval_seconds)
    ppl = result.perplexity
    for key, value in ppl.items():
        log.info("%s perplexity %.3f", key, value)

    shutil.rmtree(work / ".source", ignore_errors=True)  # a converted source (sdsonnx/models.py open_streamed)
    model.config.save_pretrained(work)
    model.generation_config.save_pretrained(work)
    tokenizer.save_pretrained(work)
    (work / "recipe.resolved.yaml").write_text(recipe.to_yaml())
    report = build_report(recipe, result, ppl, wall, windows, calibration)
    report.data = data
    report.residual_permutation = result.residual
    if result.figure_versions:
        report.weight_figure = FigureRecord(result.figure_module, draw_weight_figure(recipe, result, ppl, work).name)
    write_report(report, work)
    if recipe.export is not None:
        report.export = export_run(recipe, work, report.wall_seconds, output)
        write_report(report, work)
    return report.to_dict()


def local_tokenizer(recipe: Recipe):
    """The tokenizer of a built-in or folder model, read without its weights (load_model reads the same one), so
    that the data is checked before the weights load; None for GGUF files and hub ids."""
    from transformers import AutoTokenizer

    from .models import classify_model_source, resolve_model_dir

    kind = classify_model_source(recipe.model)
    if kind not in ("builtin", "hf_dir"):
        return None
    return AutoTokenizer.from_pretrained(resolve_model_dir(recipe.model),
                                         trust_remote_code=recipe.trust_remote_code and kind == "hf_dir")


def export_run(recipe: Recipe, output: Path, wall: dict[str, float], final: Path | None = None) -> ExportRecord:
    """Export the run's checkpoint to output/onnx and validate it when the recipe asks; adds the times to `wall`.
    `output` is the run's work area, `final` the output folder it becomes (recorded in sdsonnx.json)."""
    from .artifact.export import write_export
    from .artifact.files import VALIDATION_FILE
    from .artifact.validate import validate_artifact

    seconds: dict[str, float] = {}
    with timed(seconds, "export"):
        write_export(output.resolve(), output / "onnx", task=recipe.export.task, opset=recipe.export.opset,
                     recorded_checkpoint=final)
    wall["export"] = round(seconds["export"], 3)
    if not recipe.export.validate_artifact:
        return ExportRecord("onnx", None)
    with timed(seconds, "validate"):
        checked = validate_artifact(output / "onnx", output, write=False)
    if final is not None:  # validation.json names the folders the work area becomes
        checked.artifact, checked.checkpoint = str(final / "onnx"), str(final)
    (output / "onnx" / VALIDATION_FILE).write_text(json.dumps(checked.to_json(), indent=2))
    wall["validate"] = round(seconds["validate"], 3)
    failures = [f"{f.check}: {f.subject}: {f.message}" for f in checked.failures]
    return ExportRecord("onnx", ValidationRecord(checked.ok, failures))


def version_perplexities(recipe: Recipe, ppl: dict[str, float]) -> list[float | None]:
    """Perplexity of every weight version [dense, after stage 1, ..., final] where it was measured, else None."""
    last = len(recipe.stages)
    steps = [ppl.get(f"after_{v}_{recipe.stages[v - 1].kind}") for v in range(1, last)]
    return [ppl.get("dense"), *steps, ppl.get("pruned")]


def draw_weight_figure(recipe: Recipe, result: PipelineResult, ppl: dict[str, float], output: Path) -> Path:
    """weights.png: the chosen module's nonzero weights after each stage (paper Figure 1)."""
    from .figures import FIGURE_FILE, panel_titles, weight_figure

    titles = panel_titles([s.kind for s in recipe.stages], version_perplexities(recipe, ppl))
    return weight_figure(result.figure_module, result.figure_versions, titles, output / FIGURE_FILE)


def build_report(recipe: Recipe, result: PipelineResult, ppl: dict[str, float], wall: dict[str, float],
                 windows: torch.Tensor | None, calibration: torch.Tensor) -> RunReport:
    """report.json: per-module sparsity/pattern/error, perplexities, wall time per stage, peak memory."""
    modules = result.modules.values()
    total = sum(m.numel for m in modules)
    evaluation = None if windows is None else EvaluationRecord(recipe.evaluation.source, int(windows.shape[0]),
                                                               int(windows.shape[1]), int(windows.numel()))
    return RunReport(
        sdsonnx_version=__version__, recipe_hash=recipe.digest(), model=recipe.model, method=recipe.first_prune.method,
        stages=[s.kind for s in recipe.stages], pattern=str(recipe.first_prune.base_pattern),
        profile=recipe.first_prune.profile,
        calibration=CalibrationRecord(recipe.calibration.source, int(calibration.shape[0]), int(calibration.shape[1]),
                                      recipe.calibration.seed),
        evaluation=evaluation, perplexity=ppl,
        global_sparsity=sum(m.sparsity * m.numel for m in modules) / max(total, 1),
        wall_seconds={k: round(v, 3) for k, v in wall.items()}, peak_rss_bytes=peak_rss_bytes(),
        block_sparsity=result.block_sparsity,
        host=HostRecord(platform.python_version(), torch.__version__, torch.get_num_threads()),
        modules=result.modules, trust_remote_code=recipe.trust_remote_code or None,
        peak_device_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None)
