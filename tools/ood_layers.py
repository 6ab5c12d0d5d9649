"""Layer-wise output error of pruned runs on in-domain and out-of-domain text (issue 16 item 2).

Why does SDS's gain over its one-shot base shrink out of domain? For every target Linear (q, k, v, o, gate, up,
down of each block) of each run this measures the relative layer output error

    e = ||(W_run - W_dense) X||_F^2 / ||W_dense X||_F^2 = tr(D H D^T) / tr(W H W^T),  D = W_run - W_dense,

where X [d_in, N] are the DENSE model's inputs to that Linear (hooks on one dense forward pass) and H = X X^T / N,
on several texts ("domains"):
  in_domain    held-out wiki-extracts evaluation part: `--windows` windows of 512 tokens taken evenly from the
               windows after the protocol's first 80 (so none of the tokens perplexity is measured on)
  ood          the same from the sotu-addresses evaluation part (the protocol's out-of-domain text)
  calibration  the first `--windows` x 512 tokens of the wiki-extracts calibration part at `--calibration-seed`:
               tokens the runs of that calibration seed were calibrated on (the protocol's 64 segments start with
               them)
H is accumulated once per domain (float64; Linears that read the same tensor share one H), so each run costs only
the traces. Runs with a channel permutation folded in (report.json modules[*].permutation, `prune.permute`) are
un-permuted first by matching their rows/columns to the dense weight's (the module computes the same function; the
permutation itself is not recorded). `--drift K` also runs each model on K windows of each domain and records each
block output's relative distance from the dense model's (how the layer errors compound) and the perplexity on
those windows.

Command (the issue-16 measurement; 1 torch thread):

    .venv/bin/python tools/ood_layers.py /work/runs23/sparsegpt_2_4@1 /work/runs23/sds-sparsegpt_2_4@1 \\
        --pair sds-sparsegpt_2_4@1=sparsegpt_2_4@1 --domains in_domain,ood,calibration --calibration-seed 1 \\
        --windows 8 --drift 4 --cache /tmp/ood_layers_cache --out docs/benchmarks/ood_layers.json

A run is named by its folder name; `--pair SDS=BASE` adds the per-Linear error reduction 1 - e_SDS / e_BASE per
domain, by Linear type and by block third, to the summary.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdsonnx.blocks import find_blocks, target_linears  # noqa: E402
from sdsonnx.data import calibration_data, evaluation_windows, load_texts  # noqa: E402

log = logging.getLogger("ood_layers")

WINDOW = 512
PROTOCOL_WINDOWS = 80  # the protocol's perplexity windows: held-out windows are taken after them
DOMAINS = {"in_domain": ("wiki-extracts", "evaluation"), "ood": ("sotu-addresses", "evaluation"),
           "calibration": ("wiki-extracts", "calibration")}
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------------- the math
def relative_error(w_ref: torch.Tensor, w: torch.Tensor, hessian: torch.Tensor) -> float:
    """W_ref, W [d_out, d_in], H = X X^T / N [d_in, d_in] -> tr(D H D^T) / tr(W_ref H W_ref^T), D = W - W_ref
    (float64): the relative layer output error ||(W - W_ref) X||_F^2 / ||W_ref X||_F^2."""
    if w_ref.shape != w.shape or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"shapes do not fit: W_ref {tuple(w_ref.shape)}, W {tuple(w.shape)}, H {tuple(hessian.shape)}")
    h = hessian.double()
    ref = w_ref.double()
    delta = w.double() - ref
    num = float(((delta @ h) * delta).sum())
    den = float(((ref @ h) * ref).sum())
    if den <= 0:
        raise ValueError("W_ref X is zero: the relative error is undefined")
    return num / den


def direct_error(w_ref: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    """W_ref, W [d_out, d_in], X [N, d_in] -> ||(W - W_ref) X^T||_F^2 / ||W_ref X^T||_F^2 (float64), from X itself."""
    x = x.double()
    return float(((w.double() - w_ref.double()) @ x.T).pow(2).sum() / (w_ref.double() @ x.T).pow(2).sum())


def match_permutation(w_ref: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rows of W [n, k] are a (pruned, updated) reordering of the rows of W_ref [n, k] -> perm [n] long with
    W[j] ~ W_ref[perm[j]]: each row takes the reference row of largest cosine similarity on the row's support
    (its nonzero entries: a pruned row is its dense row with entries zeroed and the kept ones updated), greedily in
    order of similarity so that every reference row is taken once."""
    if w_ref.shape != w.shape:
        raise ValueError(f"shapes differ: {tuple(w_ref.shape)} vs {tuple(w.shape)}")
    a, b = w.double(), w_ref.double()
    support = (a != 0).double()
    norms = a.norm(dim=1, keepdim=True) * (support @ (b * b).T).sqrt()  # |W_j| * |W_ref_i on W_j's support|
    sim = (a @ b.T) / norms.clamp_min(1e-300)
    best = sim.argmax(1)
    if torch.equal(torch.sort(best).values, torch.arange(len(best))):
        return best
    perm = torch.full((len(best),), -1, dtype=torch.long)
    taken = torch.zeros(len(best), dtype=torch.bool)
    for flat in torch.argsort(sim.flatten(), descending=True).tolist():
        j, i = divmod(flat, sim.shape[1])
        if perm[j] < 0 and not taken[i]:
            perm[j], taken[i] = i, True
            if bool(taken.all()):
                break
    return perm


def unpermute(w_ref: torch.Tensor, w: torch.Tensor, axis: str) -> tuple[torch.Tensor, int]:
    """W whose rows ("rows") or columns ("columns") are a permutation of W_ref's -> (W in W_ref's order, number of
    channels that were moved)."""
    if axis not in ("rows", "columns"):
        raise ValueError(f"axis must be rows or columns, got {axis!r}")
    if axis == "columns":
        back, moved = unpermute(w_ref.T, w.T, "rows")
        return back.T.contiguous(), moved
    perm = match_permutation(w_ref, w)
    back = torch.empty_like(w)
    back[perm] = w
    return back, int((perm != torch.arange(len(perm))).sum())


# ------------------------------------------------------------------------------------------------ text and H
def held_out_windows(tokenizer, source: str, n: int, skip: int = PROTOCOL_WINDOWS) -> tuple[torch.Tensor, list[int]]:
    """n windows [n, 512] of a source's evaluation part, evenly spaced over the windows after the first `skip` (the
    protocol's perplexity windows), and their indices."""
    windows = evaluation_windows(tokenizer, load_texts(source, "evaluation").documents, WINDOW)
    rest = windows.shape[0] - skip
    if rest < n:
        raise ValueError(f"{source}: {windows.shape[0]} windows, {rest} after the first {skip}; {n} asked")
    index = [skip + (i * rest) // n for i in range(n)]
    return windows[index], index


def domain_windows(tokenizer, domain: str, n: int, calibration_seed: int) -> tuple[torch.Tensor, dict]:
    """The token windows [n, 512] of a domain and a description of where they come from."""
    source, part = DOMAINS[domain]
    if part == "evaluation":
        ids, index = held_out_windows(tokenizer, source, n)
        return ids, {"source": source, "part": part, "windows": index, "tokens": ids.numel()}
    ids, use = calibration_data(tokenizer, load_texts(source, part), n, WINDOW, calibration_seed)
    return ids, {"source": source, "part": part, "seed": calibration_seed, "segments": n, "tokens": ids.numel(),
                 "note": f"the first {n} of the seed-{calibration_seed} calibration segments"}


@torch.no_grad()
def input_grams(model: torch.nn.Module, windows: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """{name: H = X X^T / N [d_in, d_in] float64} of the inputs X of the named Linears of `model` over windows [k, L],
    one window per forward pass; Linears that read the same tensor get the same H object."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    shares: dict[str, str] = {}  # Linear -> the Linear whose sums it shares (decided on the first window)
    count = {"tokens": 0, "window": 0}
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}  # this block's inputs (held, so no address is reused) -> reader

    def hook(name):
        def pre(module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            first = seen[key][0] if key in seen else None
            if count["window"] == 0 and first is not None:
                shares[name] = shares.get(first, first)
                sums[name] = sums[first]
            if shares.get(name) is not None:
                if first is None or shares.get(first, first) != shares[name]:
                    raise RuntimeError(f"{name}: its input is shared with {shares[name]} on one window, not another")
                return
            seen[key] = (name, x)
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            gram = (flat.T @ flat).double()
            if name in sums:
                sums[name] += gram
            else:
                sums[name] = gram
        return pre

    _, blocks = find_blocks(model)
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    handles += [b.register_forward_pre_hook(lambda m, a: seen.clear()) for b in blocks]
    try:
        for ids in windows:
            seen.clear()
            model(input_ids=ids[None], use_cache=False)
            count["tokens"] += ids.numel()
            count["window"] += 1
    finally:
        seen.clear()
        for h in handles:
            h.remove()
    scaled: dict[int, torch.Tensor] = {}
    for name in names:
        s = sums[name]
        scaled.setdefault(id(s), s / count["tokens"])
    return {name: scaled[id(sums[name])] for name in names}


def domain_grams(model, tokenizer, names: list[str], domain: str, n: int, seed: int, cache: Path | None
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """input_grams of the dense model on one domain, from `cache` when it holds them for the same windows."""
    ids, info = domain_windows(tokenizer, domain, n, seed)
    path = None if cache is None else cache / f"{domain}-{n}-{seed if domain == 'calibration' else 'eval'}.pt"
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        if torch.equal(saved["ids"], ids):
            groups = saved["groups"]
            return {name: groups[g].double() for name, g in saved["group_of"].items()}, info
    start = time.perf_counter()
    grams = input_grams(model, ids, names)
    info["seconds"] = round(time.perf_counter() - start, 1)
    if path is not None:
        cache.mkdir(parents=True, exist_ok=True)
        index: dict[int, int] = {}
        groups = []
        for h in grams.values():
            if id(h) not in index:
                index[id(h)] = len(groups)
                groups.append(h.float())
        torch.save({"ids": ids, "groups": groups, "group_of": {n: index[id(h)] for n, h in grams.items()}}, path)
    return grams, info


# ------------------------------------------------------------------------------------------------------ runs
def run_weights(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """{name: weight} of the named Linears from a run output's safetensors files (float32)."""
    from safetensors import safe_open

    wanted = {f"{n}.weight": n for n in names}
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                if key in wanted:
                    out[wanted[key]] = fh.get_tensor(key).float()
    missing = [n for n in names if n not in out]
    if missing:
        raise ValueError(f"{folder}: no weights for {len(missing)} Linears, e.g. {missing[:2]}")
    return out


def permutation_axes(folder: Path) -> dict[str, str]:
    """{module name: "rows" | "columns"} of the Linears a run's report.json records as permuted."""
    report = folder / "report.json"
    if not report.is_file():
        return {}
    modules = json.loads(report.read_text()).get("modules") or {}
    return {n: m["permutation"]["axis"] for n, m in modules.items() if (m or {}).get("permutation")}


def recorded_errors(folder: Path) -> dict[str, list[float | None]]:
    """{module name: [error after each stage]} from a run's report.json (errors on the run's own calibration
    inputs: the stream each stage read, not the dense model's)."""
    report = folder / "report.json"
    if not report.is_file():
        return {}
    modules = json.loads(report.read_text()).get("modules") or {}
    return {n: [s.get("error") for s in m.get("stages", [])] for n, m in modules.items()}


def layer_errors(dense: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                 grams: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """{name: {domain: relative_error(dense, weight, H_domain)}} for every Linear."""
    return {n: {d: relative_error(dense[n], weights[n], g[n]) for d, g in grams.items()} for n in dense}


@torch.no_grad()
def block_drift(model, blocks, windows: torch.Tensor, reference: list[torch.Tensor] | None = None
                ) -> tuple[list[torch.Tensor], float]:
    """(each block's outputs [k, L, d] over windows [k, L], mean next-token NLL); with `reference` (the dense
    model's outputs) the returned list holds per block ||h - h_ref||^2 / ||h_ref||^2 instead."""
    outs: list[list[torch.Tensor]] = [[] for _ in blocks]
    handles = [b.register_forward_hook(lambda m, a, o, i=i: outs[i].append((o[0] if isinstance(o, tuple) else o)
                                                                           .detach().float()))
               for i, b in enumerate(blocks)]
    nll = 0.0
    try:
        for ids in windows:
            logits = model(input_ids=ids[None], use_cache=False).logits
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[1:], reduction="sum"))
    finally:
        for h in handles:
            h.remove()
    hidden = [torch.cat(o) for o in outs]
    mean_nll = nll / (windows.shape[0] * (windows.shape[1] - 1))
    if reference is None:
        return hidden, mean_nll
    return [float((h - r).pow(2).sum() / r.pow(2).sum()) for h, r in zip(hidden, reference)], mean_nll


# --------------------------------------------------------------------------------------------------- summary
def linear_type(name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'up_proj'."""
    return name.rsplit(".", 1)[-1]


def block_index(name: str) -> int:
    found = re.search(r"\.(\d+)\.", name)
    if found is None:
        raise ValueError(f"{name}: no block index")
    return int(found.group(1))


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def run_summary(errors: dict[str, dict[str, float]], domains: list[str]) -> dict:
    """Per run: mean error over Linears per domain (all and by type), and the ratio of each domain's mean to the
    in-domain mean."""
    out = {"mean": {d: _mean(e[d] for e in errors.values()) for d in domains}}
    if "in_domain" in domains:
        out["ratio_to_in_domain"] = {d: out["mean"][d] / out["mean"]["in_domain"] for d in domains}
    types = sorted({linear_type(n) for n in errors}, key=lambda t: TYPES.index(t) if t in TYPES else 99)
    out["by_type"] = {t: {d: _mean(e[d] for n, e in errors.items() if linear_type(n) == t) for d in domains}
                      for t in types}
    return out


def pair_summary(sds: dict[str, dict[str, float]], base: dict[str, dict[str, float]], domains: list[str],
                 num_blocks: int) -> dict:
    """SDS vs its base: per domain the reduction 1 - e_sds / e_base per Linear, averaged by type and by block
    third, the reduction of the mean error (1 - mean e_sds / mean e_base), and per type the fraction of the in-domain
    reduction kept out of domain (reduction_ood / reduction_in_domain)."""
    names = [n for n in sds if n in base]
    red = {n: {d: 1 - sds[n][d] / base[n][d] for d in domains} for n in names}
    types = sorted({linear_type(n) for n in names}, key=lambda t: TYPES.index(t) if t in TYPES else 99)
    out = {"reduction_of_mean": {d: 1 - _mean(sds[n][d] for n in names) / _mean(base[n][d] for n in names)
                                 for d in domains},
           "mean_reduction": {d: _mean(r[d] for r in red.values()) for d in domains},
           "by_type": {t: {d: _mean(r[d] for n, r in red.items() if linear_type(n) == t) for d in domains}
                       for t in types}}
    thirds = [(0, num_blocks // 3), (num_blocks // 3, 2 * num_blocks // 3), (2 * num_blocks // 3, num_blocks)]
    out["by_block_third"] = {f"blocks {a}-{b - 1}": {d: _mean(r[d] for n, r in red.items() if a <= block_index(n) < b)
                                                     for d in domains} for a, b in thirds}
    if "in_domain" in domains and "ood" in domains:
        out["ood_kept"] = {t: v["ood"] / v["in_domain"] if v["in_domain"] else float("nan")
                           for t, v in out["by_type"].items()}
        out["ood_kept"]["all"] = out["mean_reduction"]["ood"] / out["mean_reduction"]["in_domain"]
        out["linears_losing_half"] = sorted(n for n, r in red.items() if r["in_domain"] > 0 and
                                            r["ood"] < 0.5 * r["in_domain"])
    out["per_linear"] = red
    return out


def format_summary(result: dict) -> str:
    """The summary as text: per run the domain means and ratios, per pair the reductions by type."""
    domains = result["domains_measured"]
    lines = []
    for run, info in result["runs"].items():
        s = info["summary"]
        means = "  ".join(f"{d} {s['mean'][d]:.4f}" for d in domains)
        ratio = "  ".join(f"{d}/in {s['ratio_to_in_domain'][d]:.3f}" for d in domains if d != "in_domain") \
            if "ratio_to_in_domain" in s else ""
        lines.append(f"{run}: mean layer error {means}   {ratio}")
        if "drift" in info:
            dr = info["drift"]
            lines.append("    drift (last block) " + "  ".join(f"{d} {dr[d]['block_error'][-1]:.4f} ppl {dr[d]['perplexity']:.2f}"
                                                          for d in dr))
    for key, p in result.get("pairs", {}).items():
        lines.append(f"{key}: reduction 1 - e_sds/e_base (mean over Linears of the type)")
        lines.append("    type      " + "".join(f"{d:>13}" for d in domains) + ("     ood/in" if "ood_kept" in p else ""))
        for t, v in p["by_type"].items():
            kept = f"{p['ood_kept'][t]:>11.2f}" if "ood_kept" in p else ""
            lines.append(f"    {t:<10}" + "".join(f"{v[d]:>13.3f}" for d in domains) + kept)
        kept = f"{p['ood_kept']['all']:>11.2f}" if "ood_kept" in p else ""
        lines.append("    all       " + "".join(f"{p['mean_reduction'][d]:>13.3f}" for d in domains) + kept)
        lines.append("    of mean   " + "".join(f"{p['reduction_of_mean'][d]:>13.3f}" for d in domains))
        for third, v in p["by_block_third"].items():
            lines.append(f"    {third:<10}" + "".join(f"{v[d]:>13.3f}" for d in domains))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- main
def measure(model_spec: str, runs: list[Path], domains: list[str], n_windows: int, calibration_seed: int,
            pairs: list[tuple[str, str]], drift: int, cache: Path | None) -> dict:
    """The whole measurement as a JSON-able dict (see the module docstring)."""
    from sdsonnx.models import load_model

    model, tokenizer = load_model(model_spec)
    per_block = target_linears(model)
    names = [n for block in per_block.values() for n in block]
    modules = dict(model.named_modules())
    dense = {n: modules[n].weight.detach().float().clone() for n in names}
    grams, texts = {}, {}
    for d in domains:
        grams[d], texts[d] = domain_grams(model, tokenizer, names, d, n_windows, calibration_seed, cache)
        log.info("%s: H over %d tokens (%s)", d, texts[d]["tokens"], texts[d].get("seconds", "cached"))
    reference = {}
    if drift:
        _, blocks = find_blocks(model)
        for d in domains:
            ids, _ = domain_windows(tokenizer, d, drift, calibration_seed)
            reference[d] = (ids, *block_drift(model, blocks, ids))
    result = {"model": model_spec, "window": WINDOW, "windows_per_domain": n_windows, "domains_measured": domains,
              "texts": texts, "metric": "||(W_run - W_dense) X||_F^2 / ||W_dense X||_F^2, X = the dense model's "
              "inputs to the Linear on the domain's windows (H = X X^T / N)", "runs": {}}
    for folder in runs:
        start = time.perf_counter()
        weights = run_weights(folder, names)
        moved = {}
        for n, axis in permutation_axes(folder).items():
            if n in weights:
                weights[n], moved[n] = unpermute(dense[n], weights[n], axis)
        errors = layer_errors(dense, weights, grams)
        recorded = recorded_errors(folder)
        info = {"folder": str(folder), "sparsity": _mean(float((weights[n] == 0).float().mean()) for n in names),
                "unpermuted_channels": moved or None, "summary": run_summary(errors, domains),
                "layers": {n: {**errors[n], "type": linear_type(n), "block": block_index(n),
                               "recorded_stage_errors": recorded.get(n)} for n in names}}
        report = folder / "report.json"
        if report.is_file():
            rep = json.loads(report.read_text())
            info["recipe"] = {"method": rep.get("method"), "pattern": rep.get("pattern"),
                              "stages": [s.get("kind") if isinstance(s, dict) else s for s in rep.get("stages", [])],
                              "calibration_seed": (rep.get("calibration") or {}).get("seed"),
                              "perplexity": rep.get("perplexity")}
        if drift:
            from sdsonnx.models import load_model as load

            run_model, _ = load(str(folder))
            _, run_blocks = find_blocks(run_model)
            info["drift"] = {}
            for d, (ids, ref_hidden, ref_nll) in reference.items():
                errs, nll = block_drift(run_model, run_blocks, ids, ref_hidden)
                info["drift"][d] = {"block_error": errs, "perplexity": math.exp(nll), "dense_perplexity": math.exp(ref_nll),
                                    "windows": ids.shape[0]}
            del run_model
        info["seconds"] = round(time.perf_counter() - start, 1)
        result["runs"][folder.name] = info
        log.info("%s: %s", folder.name, json.dumps(info["summary"]["mean"]))
    result["pairs"] = {}
    for sds, base in pairs:
        if sds in result["runs"] and base in result["runs"]:
            result["pairs"][f"{sds} vs {base}"] = pair_summary(
                {n: {d: v[d] for d in domains} for n, v in result["runs"][sds]["layers"].items()},
                {n: {d: v[d] for d in domains} for n, v in result["runs"][base]["layers"].items()},
                domains, len(per_block))
        else:
            log.warning("pair %s=%s: a run is missing", sds, base)
    return result


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run output folders (sdsonnx run)")
    parser.add_argument("--model", default="smollm2-135m", help="the dense model the runs were pruned from")
    parser.add_argument("--domains", default="in_domain,ood", help=f"comma list of {', '.join(DOMAINS)}")
    parser.add_argument("--windows", type=int, default=8, help="windows of 512 tokens per domain")
    parser.add_argument("--calibration-seed", type=int, default=0, help="seed of the calibration domain's segments")
    parser.add_argument("--pair", action="append", default=[], help="SDS_RUN=BASE_RUN (folder names); repeatable")
    parser.add_argument("--drift", type=int, default=0, help="also measure block-output drift on this many windows")
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep the per-domain H in")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--note", default=None, help="free text stored in the JSON (e.g. where a run came from)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    domains = args.domains.split(",")
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        parser.error(f"unknown domain(s) {unknown}; choose from {list(DOMAINS)}")
    pairs = []
    for p in args.pair:
        if "=" not in p:
            parser.error(f"--pair {p!r}: expected SDS_RUN=BASE_RUN")
        pairs.append(tuple(p.split("=", 1)))
    result = measure(args.model, args.runs, domains, args.windows, args.calibration_seed, pairs, args.drift, args.cache)
    result["commit"] = _git_commit()
    result["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    if args.note:
        result["note"] = args.note
    print(format_summary(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
