"""report.json as typed records: what `sdsonnx run` writes and what inspect, export, validate and tools read.

Every field is documented in docs/ARTIFACTS.md ("report.json"). `RunReport.to_dict()` gives exactly the JSON
object (the keys and their order are the interface); `RunReport.from_dict` reads it back. Bump REPORT_VERSION
when a key changes meaning or disappears; adding a key keeps the version.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

REPORT_VERSION = 2  # 2: a stage's and a module's `error` may be null (runs without X X^T)
REPORT_FILE = "report.json"


@dataclass
class StageRecord:
    """One stage's result on one Linear; `details` holds the stage kind's own keys (flattened into the JSON)."""

    stage: str  # the stage kind: prune | redense | second_prune
    sparsity: float  # share of exact zeros in the stage's output weight
    error: float | None  # ||W_dense X - W X||^2 / ||W_dense X||^2 on the stage's input statistics; None when the
    # run collected no X X^T (a recipe of Wanda / magnitude prunes alone, stats.needs_gram; report_version 2)
    seconds: float  # time of the stage function on this Linear (a solver's own "seconds" detail replaces it)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "sparsity": self.sparsity, "error": self.error, "seconds": self.seconds,
                **self.details}

    @classmethod
    def from_dict(cls, data: dict) -> "StageRecord":
        fixed = ("stage", "sparsity", "error", "seconds")
        return cls(*(data[k] for k in fixed), details={k: v for k, v in data.items() if k not in fixed})


@dataclass
class ModuleRecord:
    """One pruned Linear: where it is, what it was asked for, and every stage's result."""

    block: int
    pattern: str  # resolved pattern: "2:4" or an unstructured sparsity such as "0.5"
    shape: list[int]  # [d_out, d_in]
    numel: int
    stages: list[StageRecord] = field(default_factory=list)
    sparsity: float | None = None  # the last stage's (the saved weight's) sparsity
    error: float | None = None  # the last stage's error (None where the stages have none)
    permutation: dict[str, Any] | None = None  # channel permutation folded into it (prune.permute: mlp), else None

    def finish(self) -> None:
        """Copy the last stage's sparsity and error to the module."""
        self.sparsity, self.error = self.stages[-1].sparsity, self.stages[-1].error

    @classmethod
    def from_dict(cls, data: dict) -> "ModuleRecord":
        return cls(data["block"], data["pattern"], list(data["shape"]), data["numel"],
                   [StageRecord.from_dict(s) for s in data["stages"]], data.get("sparsity"), data.get("error"),
                   data.get("permutation"))


@dataclass
class CalibrationRecord:
    source: str
    segments: int
    length: int
    seed: int


@dataclass
class EvaluationRecord:
    source: str
    windows: int
    window: int
    tokens: int


@dataclass
class DataUseRecord:
    """What one section took from its source (sdsonnx.data.TextUse without the document hashes)."""

    source: str
    split: str  # part of the source read: all | calibration | evaluation
    documents_available: int  # non-blank documents in that part
    documents: int  # documents whose tokens were used (calibration: read to fill the segments)
    tokens: int  # text tokens used (a BOS that evaluation windows add is not counted)


@dataclass
class DataRecord:
    """The data a run used: per section, and how many documents both sections used (> 0 is also a warning)."""

    calibration: DataUseRecord
    evaluation: DataUseRecord | None
    overlap_documents: int  # distinct documents (sha1 of their text) used by calibration and evaluation

    @classmethod
    def from_dict(cls, data: dict) -> "DataRecord":
        evaluation = data.get("evaluation")
        return cls(DataUseRecord(**data["calibration"]), None if evaluation is None else DataUseRecord(**evaluation),
                   data["overlap_documents"])


@dataclass
class HostRecord:
    python: str
    torch: str
    threads: int


@dataclass
class FigureRecord:
    module: str
    file: str


@dataclass
class ValidationRecord:
    ok: bool
    failures: list[str]


@dataclass
class ExportRecord:
    folder: str
    validation: ValidationRecord | None


@dataclass
class RunReport:
    """The whole report.json; weight_figure and export are left out of the JSON when None."""

    sdsonnx_version: str
    recipe_hash: str
    model: str
    method: str
    stages: list[str]
    pattern: str
    profile: str
    calibration: CalibrationRecord
    evaluation: EvaluationRecord | None
    perplexity: dict[str, float]
    global_sparsity: float
    wall_seconds: dict[str, float]
    peak_rss_bytes: int
    block_sparsity: list[float] | None
    host: HostRecord
    modules: dict[str, ModuleRecord]
    weight_figure: FigureRecord | None = None
    export: ExportRecord | None = None
    data: DataRecord | None = None  # absent in reports written before issue 14
    trust_remote_code: bool | None = None  # True when the recipe let the model's own code run; absent otherwise
    peak_device_bytes: int | None = None  # CUDA runs: torch.cuda.max_memory_allocated(); absent otherwise
    residual_permutation: dict | None = None  # permute: residual's order (digest, kept-score gain); absent otherwise
    report_version: int = REPORT_VERSION

    def to_dict(self) -> dict:
        """The JSON object: report_version first, then the fields in declaration order."""
        body = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name != "report_version"}
        for optional in ("weight_figure", "export", "trust_remote_code", "data", "peak_device_bytes",
                         "residual_permutation"):
            if body[optional] is None:
                del body[optional]
        return {"report_version": self.report_version, **body}

    @classmethod
    def from_dict(cls, data: dict) -> "RunReport":
        """Read a report.json object; reports from before report_version existed read as version 0."""
        evaluation, figure, export = data.get("evaluation"), data.get("weight_figure"), data.get("export")
        if export is not None and export.get("validation") is not None:
            export = {**export, "validation": ValidationRecord(**export["validation"])}
        return cls(
            **{k: data[k] for k in ("sdsonnx_version", "recipe_hash", "model", "method", "stages", "pattern", "profile",
                                    "perplexity", "global_sparsity", "wall_seconds", "peak_rss_bytes")},
            calibration=CalibrationRecord(**data["calibration"]),
            evaluation=None if evaluation is None else EvaluationRecord(**evaluation),
            block_sparsity=data.get("block_sparsity"), host=HostRecord(**data["host"]),
            modules={name: ModuleRecord.from_dict(m) for name, m in data["modules"].items()},
            weight_figure=None if figure is None else FigureRecord(**figure),
            export=None if export is None else ExportRecord(**export),
            data=None if data.get("data") is None else DataRecord.from_dict(data["data"]),
            trust_remote_code=data.get("trust_remote_code"), peak_device_bytes=data.get("peak_device_bytes"),
            residual_permutation=data.get("residual_permutation"),
            report_version=data.get("report_version", 0))


def _plain(value: Any) -> Any:
    """Records -> JSON-ready dicts and lists (StageRecord flattens its details)."""
    if isinstance(value, StageRecord):
        return value.to_dict()
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def write_report(report: RunReport, folder: Path) -> Path:
    """Write folder/report.json (indent 2) and return its path."""
    path = Path(folder) / REPORT_FILE
    path.write_text(json.dumps(report.to_dict(), indent=2))
    return path


def read_report(folder: Path) -> RunReport:
    """The typed report of a run folder."""
    return RunReport.from_dict(json.loads((Path(folder) / REPORT_FILE).read_text()))
