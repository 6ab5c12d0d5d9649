"""Plain-text tables for the end of a run and for `sdsonnx inspect`."""
from __future__ import annotations

import re
from collections import defaultdict

from torch import nn


def table(rows: list[list], header: list[str]) -> str:
    """Left-aligned text table."""
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_summary(report: dict) -> str:
    """One table per module kind (q_proj, up_proj, ...) averaged over blocks, then the perplexities."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for name, rec in report["modules"].items():
        groups[re.sub(r".*\.", "", name)].append(rec)
    rows = []
    for kind, recs in groups.items():
        numel = sum(r["numel"] for r in recs)
        sparsity = sum(r["sparsity"] * r["numel"] for r in recs) / numel
        errors = [r["error"] for r in recs if r.get("error") is not None]  # null: the run collected no X X^T
        error = f"{sum(errors) / len(errors):.4g}" if errors else "-"
        rows.append([kind, len(recs), recs[0]["pattern"], f"{sparsity:.4f}", error])
    text = table(rows, ["module", "count", "pattern", "sparsity", "mean rel. error"])
    ppl = report.get("perplexity", {})
    if ppl:
        text += "\n\n" + table([[k, f"{v:.3f}"] for k, v in ppl.items()], ["model", "perplexity"])
    wall = report["wall_seconds"]
    text += "\n\n" + table([[k, f"{v:.1f}"] for k, v in wall.items()], ["step", "seconds"])
    text += f"\n\nglobal sparsity {report['global_sparsity']:.4f}, peak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB"
    return text


def inspect_rows(model: nn.Module) -> list[list]:
    """Per target Linear of the decoder blocks: name, shape, sparsity, detected pattern."""
    from .blocks import target_linears
    from .masks import pattern_name

    rows = []
    for mods in target_linears(model).values():
        for name, mod in mods.items():
            w = mod.weight.detach()
            rows.append([name, "x".join(map(str, w.shape)), f"{float((w == 0).float().mean()):.4f}", pattern_name(w)])
    return rows
