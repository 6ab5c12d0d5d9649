"""Recipe schema and loader: every input check that needs no weights happens here.

A recipe is YAML validated by pydantic models with `extra="forbid"`: an unknown key, a wrong type or a
value out of range is a `RecipeError` naming the file and the field (e.g. `stages.0.sparsity`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .pattern import Pattern
from .errors import InputError

if TYPE_CHECKING:
    from .prune import PruneOptions


class RecipeError(InputError, ValueError):
    """A recipe that cannot run; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {value!r}: {exc}") from exc
    return value


class Calibration(_Strict):
    source: str = Field("wiki-extracts", description="wiki-extracts | c4 | wikitext2 | path to .txt/.json/.jsonl/.parquet")
    segments: int = Field(128, gt=0, description="Number of random calibration segments (paper: 128).")
    length: int = Field(2048, gt=1, description="Tokens per segment (paper: 2048).")
    seed: int = Field(0, description="Seed of the segment draw: same seed, same segments.")
    parts: int = Field(1, ge=1, le=8, description="Disjoint sample sets for stages (MSD ablation); segments each.")
    split: Literal["all", "calibration", "evaluation"] | None = Field(
        None, description="Part of a local file to read (None: all, or this section's part when calibration and "
                          "evaluation name the same file; docs/RECIPES.md).")


class Evaluation(_Strict):
    source: str = "wiki-extracts"
    window: int = Field(2048, gt=1, description="Tokens per non-overlapping perplexity window.")
    max_tokens: int | None = Field(None, gt=0, description="Cap on evaluation tokens (None: whole split).")
    split: Literal["all", "calibration", "evaluation"] | None = Field(
        None, description="Part of a local file to read (None: all, or this section's part when calibration and "
                          "evaluation name the same file; docs/RECIPES.md).")
    each_step: bool = Field(True, description="Also evaluate the model after every intermediate stage.")
    dense: bool = Field(True, description="Also evaluate the unpruned model (benchmarks measure it once instead).")


class Override(_Strict):
    """Per-block / per-module sparsity: the last matching override wins."""

    blocks: list[int] | None = Field(None, description="Block indices (None: all blocks).")
    modules: str | None = Field(None, description="Regex searched in the module name (None: all targets).")
    sparsity: float | None = Field(None, gt=0, lt=1)
    pattern: str | None = Field(None, description="n:m pattern such as 2:4")

    _re = field_validator("modules")(lambda v: v if v is None else _check_regex(v))

    @model_validator(mode="after")
    def _one_of(self) -> "Override":
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError("give exactly one of sparsity or pattern")
        if self.pattern is not None:
            _nm_pattern(self.pattern)
        return self


_NM = re.compile(r"^\s*\d+\s*:\s*\d+\s*$")


def _nm_pattern(value: str) -> Pattern:
    if not _NM.match(str(value)):
        raise ValueError(f"pattern must be n:m with integers 0 < n < m (e.g. 2:4), got {value!r}; "
                         "use sparsity: for unstructured")
    pattern = Pattern.parse(value)  # raises ValueError for n >= m or n == 0
    if not pattern.is_nm:
        raise ValueError(f"pattern must look like n:m (e.g. 2:4), got {value!r}; use sparsity: for unstructured")
    return pattern


DataMode = Literal["self", "sparse", "dense"]
_DATA_HELP = ("Which model's activations feed the statistics: self = this stage's own output model (sequential, "
              "SparseGPT style; Eq. 5's 'second-pruned model' for second_prune, KD for redense), sparse = the first "
              "prune's output (the paper's SD data), dense = the unpruned model (DD).")


class Owl(_Strict):
    threshold_m: float = Field(5.0, gt=0, description="Outlier: Wanda score above M x the block mean (OWL: M=5).")
    lam: float = Field(0.08, ge=0, lt=0.5, description="Spread of block sparsities around the mean (OWL: 0.08).")
    mapping: Literal["official", "paper"] = Field(
        "official", description="Ratios -> sparsities: official = luuyin/OWL code (spread exactly 2 lam), "
                                "paper = spread narrowed to stay inside [s - lam, s + lam] (docs/DESIGN.md).")


class PruneStage(_Strict):
    kind: Literal["prune"]
    method: Literal["magnitude", "wanda", "sparsegpt"]
    sparsity: float | None = Field(None, gt=0, lt=1, description="Unstructured pruned share.")
    pattern: str | None = Field(None, description="n:m semi-structured pattern, n kept of every m inputs.")
    profile: Literal["uniform", "owl"] = "uniform"
    owl: Owl = Owl()
    overrides: list[Override] = []
    data: DataMode = Field("self", description=_DATA_HELP)
    calibration_part: int = Field(0, ge=0)
    blocksize: int = Field(128, gt=0, description="SparseGPT lazy-update block size.")
    percdamp: float = Field(0.01, gt=0, description="SparseGPT dampening, share of mean diag(H).")
    permute: Literal["none", "mlp", "attention", "mlp+attention", "residual", "residual+mlp", "residual+attention",
                     "residual+mlp+attention"] = Field(
        "none", description="n:m only: before this prune chooses its masks, reorder each block's MLP hidden units "
                            "(gate/up or fc1 output rows with down_proj / fc2 input columns) and/or the value channels "
                            "within each attention head (v_proj rows with o_proj columns) so that the N:M mask keeps "
                            "more Wanda importance; the block computes the same function (sdsonnx/prune/permute.py). "
                            "residual: one order of the residual stream for the whole model, searched on every "
                            "reader's (q/k/v, gate/up, fc1) scores in a dense pass before the first block and folded "
                            "into embeddings, norms, readers, writers and LM head (sdsonnx/prune/residual.py).")

    @property
    def permute_scopes(self) -> frozenset[str]:
        """The parts of `permute`: a subset of {residual, mlp, attention} (empty for none)."""
        return frozenset() if self.permute == "none" else frozenset(self.permute.split("+"))

    @model_validator(mode="after")
    def _one_of(self) -> "PruneStage":
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError("give exactly one of sparsity (unstructured) or pattern (n:m)")
        if self.permute != "none" and self.pattern is None:
            raise ValueError(f"permute: {self.permute} reorders channels for an n:m pattern; it needs pattern: (e.g. "
                             "2:4), not sparsity: (an unstructured mask does not depend on the channel order)")
        if self.pattern is not None:
            _nm_pattern(self.pattern)
            if self.profile == "owl":
                raise ValueError("profile owl sets per-block unstructured sparsity; it cannot be used with an n:m pattern")
        return self

    @property
    def options(self) -> "PruneOptions":
        """This method's typed options (SparseGPTOptions(blocksize, percdamp), WandaOptions(), ...)."""
        from .prune import options_for

        return options_for(self.method, self.model_dump())

    @property
    def base_pattern(self) -> Pattern:
        return _nm_pattern(self.pattern) if self.pattern else Pattern(sparsity=self.sparsity)

    def pattern_for(self, block: int, name: str, block_sparsity: list[float] | None = None) -> Pattern:
        """The pattern module `name` of block `block` gets: the stage's, then the OWL block sparsity
        (block_sparsity[block], when given), then the last matching override."""
        pattern = self.base_pattern
        if block_sparsity is not None:
            pattern = Pattern(sparsity=block_sparsity[block])
        for ov in self.overrides:
            if (ov.blocks is None or block in ov.blocks) and (ov.modules is None or re.search(ov.modules, name)):
                pattern = Pattern(sparsity=ov.sparsity) if ov.sparsity is not None else Pattern.parse(ov.pattern)
        return pattern


class RedenseStage(_Strict):
    """Paper Eq. 4: re-dense reconstruction from the first-pruned weights with L1/L2 penalties."""

    kind: Literal["redense"]
    solver: Literal["gram", "sgd"] = "gram"
    l1: float = Field(0.1, ge=0)
    l2: float = Field(0.1, ge=0)
    max_iter: int = Field(50, gt=0, description="gram: FISTA iteration cap (a budget: the start stays relevant).")
    tol: float = Field(1e-5, ge=0, description="gram: stop when the relative change is below tol.")
    epochs: int = Field(200, gt=0, description="sgd: passes over the calibration tokens (paper: 200).")
    lr: float = Field(0.1, gt=0, description="sgd: learning rate (paper: 0.1).")
    batch_size: int = Field(4096, gt=0, description="sgd: tokens per step.")
    optimizer: Literal["adam", "sgd"] = "adam"
    data: DataMode = Field("sparse", description=_DATA_HELP)
    calibration_part: int = Field(0, ge=0)


class SecondPruneStage(_Strict):
    """Paper Eq. 5: prune the re-dense weights with the first prune's method and pattern, then adjust."""

    kind: Literal["second_prune"]
    adjust: bool = Field(True, description="Soft-mask weight adjustment of the second-pruned weights (Eq. 5).")
    early_exit: bool = Field(False, description="Skip the adjustment where the one-shot second prune already beats "
                                                "the first prune on the layer objective (the paper's shortcut for "
                                                "models above 3B; on SmolLM2 it costs quality, docs/BENCHMARKS.md).")
    max_iter: int = Field(50, gt=0, description="soft_mask adjustment iterations (projected gradient steps).")
    tol: float = Field(1e-6, ge=0)
    precondition: bool = Field(True, description="Steps in input-scaled coordinates, mask by |W_ij| sqrt(H_jj); "
                                                 "false: plain steps, mask by |W_ij| (sds/adjust.py).")
    adjust_solver: Literal["soft_mask", "admm"] = Field(
        "admm", description="admm (default): ADMM on R with one Cholesky per rho (Boza 2024, sds/admm.py; "
                            "admm_iterations, admm_reselect); soft_mask: the paper's projected gradient (max_iter, "
                            "precondition).")
    admm_iterations: int = Field(50, gt=0, description="ADMM steps (adjust_solver: admm).")
    admm_reselect: int = Field(30, ge=0, description="ADMM: the first this many steps re-select the mask within the "
                                                     "pattern (rho growing), then it is fixed; 0: the second prune's "
                                                     "mask throughout.")
    data: DataMode = Field("self", description=_DATA_HELP)
    calibration_part: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _admm_reselect_within_iterations(self):
        if self.admm_reselect > self.admm_iterations:
            raise ValueError(f"admm_reselect={self.admm_reselect} (default 30) exceeds admm_iterations="
                             f"{self.admm_iterations}: set admm_reselect <= admm_iterations")
        return self


Stage = Annotated[Union[PruneStage, RedenseStage, SecondPruneStage], Field(discriminator="kind")]


class Export(_Strict):
    task: Literal["text-generation", "text-generation-with-past"] = "text-generation-with-past"
    opset: int | None = Field(None, ge=11, le=22)
    validate_artifact: bool = Field(True, alias="validate")


def parse_bytes(value: int | str | None) -> int | None:
    """'8GiB', '8G', '8GB', '500MiB', 1234 -> bytes (binary units for G/GiB/M/MiB/K/KiB; GB/MB/KB decimal)."""
    if value is None or isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B?)\s*", str(value), re.IGNORECASE)
    if not match:
        raise ValueError(f"not a byte size: {value!r} (e.g. 8GiB, 500MB, 1234)")
    number, prefix, suffix = float(match[1]), match[2].upper(), match[3]
    power = "KMGT".index(prefix) + 1 if prefix else 0
    base = 1000 if suffix.upper() == "B" and prefix else 1024
    return int(number * base ** power)


class Recipe(_Strict):
    model: str = Field(description="smollm2-135m | local HF dir | file.gguf | hub id")
    num_blocks: int | None = Field(None, gt=0, description="Keep only the first k decoder blocks (tests, quick runs).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Storage dtype of the model.")
    activation_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of stored calibration activations between blocks.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    memory_budget: int | None = Field(
        None, ge=0, description="Bytes of hidden-state streams (calibration and evaluation) kept in RAM, e.g. 4GiB; "
                                "streams beyond it go to files in the output's work area (None: all in RAM). "
                                "`sdsonnx run --max-memory` overrides it.")
    calibration: Calibration = Calibration()
    evaluation: Evaluation | None = Evaluation()
    targets: list[str] | None = Field(None, description="Regexes of module names to prune (None: every Linear in the decoder blocks).")
    ignore: list[str] = Field([], description="Regexes of module names never pruned.")
    stages: list[Stage] = Field(min_length=1)
    output: str | None = None
    export: Export | None = None
    weight_figure: str | None = Field(
        "auto", description="Target module whose weight distribution after each stage is drawn to weights.png "
                            "(paper Fig. 1); auto = the last target Linear of the last block, null = no figure.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model folder or hub repo (auto_map); off by default, "
                           "recorded in report.json when on.")
    allow_pickle: bool = Field(
        False, description="Load pickle weights (*.bin, *.pt, *.pth without safetensors), which can run arbitrary "
                           "code; off by default.")

    _re = field_validator("targets", "ignore")(lambda v: v if v is None else [_check_regex(x) for x in v])
    _bytes = field_validator("memory_budget", mode="before")(lambda v: parse_bytes(v) if isinstance(v, str) else v)

    @model_validator(mode="after")
    def _stage_order(self) -> "Recipe":
        if self.stages[0].kind != "prune":
            raise ValueError("stages: the first stage must be a prune stage")
        for i, stage in enumerate(self.stages):
            if stage.calibration_part >= self.calibration.parts:
                raise ValueError(f"stages.{i}.calibration_part={stage.calibration_part} but calibration.parts={self.calibration.parts}")
            if stage.kind == "second_prune" and not any(s.kind == "redense" for s in self.stages[:i]):
                raise ValueError(f"stages.{i}: second_prune needs a redense stage before it")
            if i > 0 and stage.kind == "prune" and stage.permute != "none":
                raise ValueError(f"stages.{i}.permute: channels are permuted once per block, before the first prune "
                                 "stage; set permute on stages.0 (the permuted block is what every later stage sees)")
        return self

    @property
    def first_prune(self) -> PruneStage:
        return self.stages[0]

    def digest(self) -> str:
        """sha256 of the canonical JSON of the recipe: the recipe hash in reports and metadata."""
        canonical = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


def _format_errors(path: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).endswith("Stage") and p not in ("prune", "redense", "second_prune"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{path}: {loc or '<root>'}: {msg}")
    return "\n".join(lines)


def parse_recipe(data: dict, path: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a dict; raise RecipeError listing every problem."""
    if not isinstance(data, dict):
        got = "an empty document" if data is None else f"a {type(data).__name__}"
        raise RecipeError(f"{path}: <root>: a recipe must be a mapping of fields (model:, stages:, ...), got {got}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_errors(path, exc)) from None


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first: int):
        super().__init__(f"key {key!r} on line {line} already appears on line {first}")
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if first != key_node.start_mark.line + 1:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, first)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path):
    """The YAML document in `path` (safe loading, duplicate keys refused); RecipeError naming file and line."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    except _DuplicateKey as exc:
        raise RecipeError(f"{path}: line {exc.line}: key {exc.key!r} appears twice in one mapping (first on line "
                          f"{exc.first}); keep one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML{where}: {problem}") from None


def _relative_to(folder: Path, value: str) -> str:
    """`value` joined to `folder` when it is a relative path (absolute and ~ paths unchanged)."""
    path = Path(value).expanduser()
    return value if path.is_absolute() else os.path.normpath(folder / path)


def resolve_paths(data: dict, folder: Path) -> dict:
    """The recipe dict with its relative paths resolved against `folder`, the recipe file's folder.

    output, calibration.source and evaluation.source are paths unless they are a built-in name (wiki-extracts, c4,
    wikitext2); model is a path unless it is a built-in name (smollm2-135m) or looks like a hub id 'org/name' that
    names nothing under `folder`. docs/RECIPES.md ("Paths") states the rule.
    """
    from .data import BUILTIN_DATA, HUB_DATA
    from .models import _HUB_ID, BUILTIN_MODELS

    data = dict(data)
    if isinstance(data.get("output"), str):
        data["output"] = _relative_to(folder, data["output"])
    model = data.get("model")
    if isinstance(model, str) and model.strip() and model not in BUILTIN_MODELS:
        if not (_HUB_ID.match(model) and not (folder / model).exists()):
            data["model"] = _relative_to(folder, model)
    for field in ("calibration", "evaluation"):
        spec = data.get(field)
        if isinstance(spec, dict) and isinstance(spec.get("source"), str) and spec["source"].strip() \
                and spec["source"] not in (*BUILTIN_DATA, *HUB_DATA):
            data[field] = {**spec, "source": _relative_to(folder, spec["source"])}
    return data


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Read and validate a YAML recipe; relative paths in it resolve against its folder (resolve_paths);
    `overrides` replaces top-level keys after that (e.g. output from the CLI, relative to the current folder)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    data = read_yaml(path)
    if isinstance(data, dict):
        data = resolve_paths(data, path.parent)
        if overrides:
            data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return parse_recipe(data, str(path))
