"""bench.json -> text table and PNG chart."""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = ("engine", "model", "sparsity", "phase", "tokens", "latency_ms", "spread", "tokens_per_s", "speedup",
           "limit_amdahl", "limit_ideal")


def _fmt(row: dict, col: str) -> str:
    value = row.get(col)
    if value is None:
        return "-"
    if col == "sparsity":
        return f"{value:.0%}" if row.get("pattern") in (None, "dense", "unstructured", "?") else f"{row['pattern']}"
    if col == "phase":
        return f"prefill {row['seq']}" if value == "prefill" else f"decode @{row['past']} x{row['steps']}"
    if col == "spread":
        return f"±{value / 2:.0%}"
    if col == "speedup":
        return f"{value:.2f}x [{row['speedup_p25']:.2f}-{row['speedup_p75']:.2f}]"
    if col.startswith("limit"):
        return f"{value:.2f}x"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.3g}"
    return str(value)


def bench_table(doc: dict) -> str:
    """Fixed-width table: one line per (engine, model, case); speed-up = dense/sparse median [per-round quartiles]."""
    header = {"latency_ms": "ms/forward", "spread": "IQR", "tokens_per_s": "tok/s", "limit_amdahl": "limit(f*s)",
              "limit_ideal": "1/(1-s)", "tokens": "tok/rep"}
    rows = [[header.get(c, c) for c in COLUMNS]]
    rows += [[_fmt(r, c) for c in COLUMNS] for r in doc["records"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for err in doc.get("errors", []):
        lines.append(f"! {err['engine']} {err['case']}: {err['error']}")
    for engine, why in doc.get("skipped", {}).items():
        lines.append(f"! {engine} skipped: {why}")
    return "\n".join(lines)


def bench_chart(doc: dict, path: str | Path) -> Path:
    """Bar chart of tokens/s per case and engine, dense next to sparse, speed-up written over the sparse bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = doc["records"]
    groups = list(dict.fromkeys((r["engine"], r["phase"], r["seq"], r["past"]) for r in records))
    roles = list(dict.fromkeys(r["role"] for r in records)) or ["sparse"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 2), 4.5))
    width = 0.8 / len(roles)
    for j, role in enumerate(roles):
        xs, ys, labels = [], [], []
        for i, g in enumerate(groups):
            row = next((r for r in records if (r["engine"], r["phase"], r["seq"], r["past"]) == g and r["role"] == role),
                       None)
            if row is None:
                continue
            xs.append(i + (j - (len(roles) - 1) / 2) * width)
            ys.append(row["tokens_per_s"])
            labels.append(f"{row['speedup']:.2f}x" if row.get("speedup") else "")
        bars = ax.bar(xs, ys, width, label=role)
        for bar, text in zip(bars, labels):
            if text:
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{e}\n{'prefill ' + str(s) if p == 'prefill' else 'decode @' + str(past)}"
                        for e, p, s, past in groups], fontsize=8)
    ax.set_ylabel("tokens / s (median)")
    ax.set_yscale("log")
    sparse = doc["models"].get("sparse")
    what = (f"{sparse['label']}: sparsity {sparse['sparsity']:.0%} ({sparse['pattern']})" if sparse
            else ", ".join(doc["models"]))
    ax.set_title(f"{what}, {doc['machine']['threads']} threads", fontsize=10)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(doc: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write out_dir/bench.json and out_dir/bench.png; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "bench.json"
    json_path.write_text(json.dumps(doc, indent=2))
    return json_path, bench_chart(doc, out_dir / "bench.png")
