"""Fuzzing (hypothesis): mutated recipes through load_recipe + preflight, mutated sdsonnx.* metadata through
parse_props + validate. Zero tracebacks: only the documented errors escape, and every problem names its field/key.

Recipes are mutated from the valid ones in recipes/*.yaml (keys dropped, renamed, added; values retyped, pushed out
of range, wrapped or unwrapped; the YAML text cut or a line doubled). Preflight's model lookup is stubbed with
configs of the recipes' real shapes cut to two blocks (no weights, no network), so 1000 recipes take seconds.
"""
from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, OPTConfig

import sdsonnx.preflight as preflight
from sdsonnx.artifact.metadata import ENTRY_FIELDS, PREFIX, parse_props, read_props, write_metadata
from sdsonnx.artifact.validate import validate_artifact
from sdsonnx.recipe import Recipe, RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "recipes").glob("*.yaml"))}
RECIPE_EXAMPLES = 1000
METADATA_EXAMPLES = 300
FIELDS = set(Recipe.model_fields)

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=8), st.sampled_from(["50%", "2:4", "4:2", "2/4", "1.5:4", "", "auto", "cuda", "-1"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=6), SCALARS, max_size=2))


def _paths(node, prefix=()):
    """Every path (tuple of keys / indices) to a value inside nested dicts and lists."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


def _parent(root, path):
    for key in path[:-1]:
        root = root[key]
    return root


def _out_of_range(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return [0, -1, 1.5, "50%"]
    return [-value, 0, -1, value * 1000 + 1, 1.0, 1.5, -0.5, float("nan"), float("inf"), str(value) + "%"]


@st.composite
def mutated_recipes(draw) -> tuple[str, object]:
    """(YAML text, data) of a recipes/*.yaml recipe with 1-3 structural mutations and maybe a text mutation."""
    data = copy.deepcopy(RECIPES[draw(st.sampled_from(sorted(RECIPES)))])
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        if not paths or not isinstance(data, dict):
            break
        path = draw(st.sampled_from(paths))
        parent, key = _parent(data, path), path[-1]
        op = draw(st.sampled_from(["drop", "rename", "retype", "range", "wrap", "unwrap", "add"]))
        if op == "drop":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from([str(key) + "s", str(key).upper(), str(key)[:-1] or "x", "_" + str(key)]))] = \
                parent.pop(key)
        elif op == "retype":
            parent[key] = draw(VALUES)
        elif op == "range":
            parent[key] = draw(st.sampled_from(_out_of_range(parent[key])))
        elif op == "wrap":
            parent[key] = draw(st.sampled_from([[parent[key]], {"value": parent[key]}]))
        elif op == "unwrap" and isinstance(parent[key], (dict, list)) and parent[key]:
            inner = parent[key]
            parent[key] = next(iter(inner.values())) if isinstance(inner, dict) else inner[0]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=6))] = draw(VALUES)
    if draw(st.booleans()):
        data = draw(st.sampled_from([data, [data], "model", None, 3])) if draw(st.integers(0, 9)) == 0 else data
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    text_op = draw(st.sampled_from(["none"] * 6 + ["cut", "double"]))
    lines = text.splitlines(keepends=True)
    if text_op == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif text_op == "double" and lines:
        i = draw(st.integers(0, len(lines) - 1))
        text = "".join(lines[: i + 1] + [lines[i]] + lines[i + 1:])
    return text, data


def _stub_config(spec: str, trust_remote_code: bool = False):
    """The recipes' models with their real block shapes, two blocks, no weights or network."""
    if "llama-7b" in spec:
        return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=2,
                           vocab_size=32000)
    if "opt" in spec:
        return OPTConfig(hidden_size=768, ffn_dim=3072, num_attention_heads=12, num_hidden_layers=2, vocab_size=50272)
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                       num_hidden_layers=2, vocab_size=49152)


@functools.lru_cache(maxsize=None)
def _meta(kind: tuple, num_blocks: int | None):
    config = _stub_config("opt" if kind[0] == "opt" else "llama-7b" if kind[1] == 4096 else "smollm2")
    return _real_meta_model(config, num_blocks)


_real_meta_model = preflight.meta_model


def _cached_meta_model(config, num_blocks=None):
    return _meta((config.model_type, config.hidden_size), None if num_blocks is None else min(num_blocks, 2))


FIELD_LINE = re.compile(r"^(?P<path>.+?): (?P<rest>.+)$")
YAML_LEVEL = re.compile(r"^(not valid YAML|not UTF-8|line \d+: key .* appears twice|<root>: a recipe must be a mapping)")


def _names_a_field(line: str, path: str, data) -> bool:
    """The line starts with the recipe path, then a YAML-level problem or a field (schema field or a key it has)."""
    if not line.startswith(f"{path}: "):
        return False
    rest = line[len(path) + 2:]
    if YAML_LEVEL.match(rest):
        return True
    loc = rest.split(":", 1)[0]
    first = loc.split(".")[0]
    keys = set(data) if isinstance(data, dict) else set()
    if first in FIELDS or first in keys:
        return True
    return first == "<root>" and any(f in rest for f in FIELDS)  # model-level validators name the field in the text


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "recipe.yaml"


def test_fuzzed_recipes_fail_cleanly_naming_a_field(recipe_file, monkeypatch):
    monkeypatch.setattr(preflight, "model_config", _stub_config)
    monkeypatch.setattr(preflight, "meta_model", _cached_meta_model)
    counts = {"examples": 0, "refused": 0, "accepted": 0}

    @settings(max_examples=RECIPE_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(mutated_recipes())
    def check(sample):
        text, data = sample
        recipe_file.write_text(text)
        counts["examples"] += 1
        try:
            recipe = load_recipe(recipe_file)
            preflight.check_recipe(recipe, str(recipe_file))
        except RecipeError as exc:
            counts["refused"] += 1
            lines = str(exc).split("\n")
            assert lines, "empty RecipeError"
            bad = [ln for ln in lines if not _names_a_field(ln, str(recipe_file), data)]
            assert not bad, f"message names no field: {bad}\n--- recipe:\n{text}"
        else:
            counts["accepted"] += 1

    check()
    print(f"recipe fuzz: {counts}")
    assert counts["examples"] >= RECIPE_EXAMPLES and counts["refused"] > RECIPE_EXAMPLES // 2, counts


# ---------------------------------------------------------------- sdsonnx.* metadata

@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A hand-built export (catalogue_artifact.tiny_onnx) with a 2:4 head, its sdsonnx.* metadata and sdsonnx.json;
    validate passes on it as made."""
    from catalogue_artifact import tiny_onnx
    from sdsonnx.artifact.initializers import consumers, input_axis, load_initializers
    from sdsonnx.artifact.metadata import FORMAT_VERSION, SparsityMetadata, describe_initializer, global_pattern, \
        to_props

    folder = tiny_onnx(tmp_path_factory.mktemp("export") / "export")
    proto = onnx.load(folder / "model.onnx")
    head = next(t for t in proto.graph.initializer if t.name == "lm_head.weight")
    w = onnx.numpy_helper.to_array(head).copy()  # [in, out]: groups of 4 along axis 0
    groups = np.abs(w).reshape(-1, 4, w.shape[1])
    keep = np.argsort(groups, axis=1)[:, 2:, :]
    mask = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(mask, keep, True, axis=1)
    head.CopyFrom(onnx.numpy_helper.from_array((w * mask.reshape(w.shape)).astype(np.float32), "lm_head.weight"))
    arrays = load_initializers(proto, folder)
    axis = input_axis("lm_head.weight", consumers(proto))[0]
    entry, satisfied = describe_initializer("lm_head", arrays["lm_head.weight"], axis)
    meta = SparsityMetadata(FORMAT_VERSION, entry.sparsity, global_pattern([satisfied]), {"lm_head.weight": entry},
                            "", "ab" * 32, "0.0")
    write_metadata(proto, to_props(meta))
    onnx.save_model(proto, folder / "model.onnx")
    (folder / "sdsonnx.json").write_text(json.dumps({
        "task": "text-generation", "source": {}, "versions": {}, "sparsity": {"global": entry.sparsity},
        "modules": {"lm_head": {"initializer": "lm_head.weight", "axis": axis, "recorded": None}}}))
    report = validate_artifact(folder, write=False)
    assert report.ok, report.failures
    return folder, proto


ENTRY_VALUES = st.one_of(VALUES, st.integers(-3, 10**4), st.lists(st.integers(-1, 200), max_size=3))


@st.composite
def mutated_props(draw, props: dict) -> dict:
    """The export's sdsonnx.* props with 1-3 mutations: keys dropped/renamed/retyped, initializer entries broken."""
    props = dict(props)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(props) or [PREFIX + "sparsity"]))
        op = draw(st.sampled_from(["drop", "rename", "text", "number", "entry", "entry", "entries"]))
        if op == "drop" and key in props:
            del props[key]
        elif op == "rename" and key in props:
            props[key + draw(st.sampled_from(["s", "_", "X"]))] = props.pop(key)
        elif op == "text":
            props[key] = draw(st.text(max_size=12))
        elif op == "number":
            props[key] = repr(draw(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 5)))
        else:
            try:
                entries = json.loads(props.get(PREFIX + "initializers", "{}"))
            except json.JSONDecodeError:
                continue
            if op == "entries" or not isinstance(entries, dict) or not entries:
                entries = draw(st.sampled_from([[entries], {"lm_head.weight": entries}, "x", 1, None,
                                                {"other": next(iter(entries.values()), {}) if isinstance(entries, dict) else {}}]))
            else:
                name = next(iter(entries))
                body = entries[name]
                if isinstance(body, dict) and body:
                    field = draw(st.sampled_from(sorted(body)))
                    action = draw(st.sampled_from(["drop", "retype", "extra"]))
                    if action == "drop":
                        del body[field]
                    elif action == "retype":
                        body[field] = draw(ENTRY_VALUES)
                    else:
                        body[field + "_x"] = 1
                else:
                    entries[name] = draw(ENTRY_VALUES)
            props[PREFIX + "initializers"] = json.dumps(entries)
    return props


def _checkable(meta) -> tuple:
    """What validate can check of fp32 metadata without a checkpoint: the format-1 fields (hashes are only checked
    for form, sdsonnx.version is free text; the quantization fields of format 2 belong to quantized artifacts)."""
    entries = {name: [getattr(e, f) for f in ENTRY_FIELDS] for name, e in meta.initializers.items()}
    return meta.sparsity, meta.pattern, entries


def test_fuzzed_metadata_is_reported_per_key(tiny_export):
    folder, proto = tiny_export
    good = read_props(proto)
    good_meta = parse_props(good)[0]
    counts = {"examples": 0, "failed": 0}

    @settings(max_examples=METADATA_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(mutated_props(good))
    def check(props):
        counts["examples"] += 1
        meta, problems = parse_props(props)  # never raises
        assert all(PREFIX in p for p in problems), problems
        if props == good:
            return
        bad = onnx.ModelProto()
        bad.CopyFrom(proto)
        del bad.metadata_props[:]
        for key, value in props.items():
            entry = bad.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save_model(bad, folder / "model.onnx")
        report = validate_artifact(folder, write=False)
        counts["failed"] += not report.ok
        for failure in report.failures:
            assert PREFIX in failure.message or failure.subject in ("lm_head.weight", "metadata_props"), failure
        if meta is None or problems:
            assert not report.ok, f"problems {problems} but validate passed"
        if report.ok:  # passing means the metadata says what the original says
            # what validate can check without a checkpoint (the hashes only for form, the version is free text)
            assert _checkable(meta) == _checkable(good_meta), props

    try:
        check()
    finally:
        onnx.save_model(proto, folder / "model.onnx")
    print(f"metadata fuzz: {counts}")
    assert counts["examples"] >= METADATA_EXAMPLES and counts["failed"] > METADATA_EXAMPLES // 2, counts
