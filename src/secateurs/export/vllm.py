"""vLLM: a directory `vllm.LLM(DIR)` serves with the pruned shapes (`secateurs export DIR --format vllm`).

A directory whose config is the family's stock one (a dense model, or a plan with the same shapes in
every layer and no added biases) is written as it is: vLLM's own class for the family runs it.

Anything else is written for vLLM's Nemotron-NAS architecture (`DeciLMForCausalLM`, model_type
`nemotron-nas`), which builds each layer from `config.block_configs[i]`. What that class can express
(read in vLLM 0.32.0's `model_executor/models/nemotron_nas.py`) decides what this target accepts:

- The query-head count is global (`num_attention_heads`); a layer's KV heads are
  `num_attention_heads // attention.n_heads_in_group`. A layer that kept k of its GQA groups has
  k x q_per_kv query heads, so every layer with attention must keep the same number of groups:
  prune with `--attention-allocation uniform` (MLP channels may still differ per layer). Otherwise
  the export is refused, naming the layers; it never pads silently.
- `attention.no_op` removes a layer's attention, `ffn.no_op` its MLP; `ffn.intermediate_size` sets its
  width. `ffn_mult` would win over it whenever the attribute exists, so block configs never carry it.
- `attention_bias` gives q/k/v and o biases, `qkv_bias` overrides q/k/v's, `mlp_bias` gives gate, up and
  down biases, all for every layer: output-bias corrections are written with zero biases where a layer
  has none (exact).
- The architecture is Llama's: no q/k norms (Qwen3) and no sliding window, so those are refused.
- Families never run in vLLM by secateurs' tests (Gemma 2/3, OLMo 2, Granite, Phi-3) are refused even
  with stock shapes (`UNVERIFIED`): their multipliers, soft-caps, norms and fused projections are not
  something to guess about.
- vLLM reads `block_config.attention.no_op` as attributes, so the directory carries its own config
  class (`modeling_secateurs_nas.py`, loaded with `trust_remote_code=True`), which also holds a
  transformers model class for the same config: `AutoModelForCausalLM.from_pretrained(DIR,
  trust_remote_code=True)` runs it, with `reshape.py`'s code, from `block_configs` alone.
"""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from secateurs.export.base import Exporter, ExportError, Shapes, shapes_of
from secateurs.io import atomic_write, atomic_write_json
from secateurs.models import reshape
from secateurs.models.adapters import adapter_for
from secateurs.models.loading import WEIGHTS_INDEX, weight_files

ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"
MODELING_FILE = "modeling_secateurs_nas.py"
CONFIG_CLASS = "SecateursNasConfig"
# Families whose layers are Llama's (q/k/v/o, gate/up/down, RMSNorm, rotary on the full head): what
# DeciLM builds. Qwen3's q/k norms have no place in it.
LLAMA_STYLE = ("llama", "mistral", "qwen2")
# Families secateurs prunes whose vLLM export was never run against vLLM: refused, with the reason.
UNVERIFIED = {
    "gemma2": "soft-capping, four norms per layer and sliding/full layer types",
    "gemma3": "per-head q/k norms, four norms per layer and sliding/full layer types",
    "olmo2": "full-width q/k norms and norms after the blocks",
    "granite": "embedding, residual and attention multipliers and logits scaling",
    "phi3": "fused qkv_proj / gate_up_proj, partial rotary dims and longrope",
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
# Keys of the source config that describe what this directory is not (any more).
DROPPED_KEYS = ("secateurs", "auto_map", "architectures", "model_type", "transformers_version")


@dataclass
class VLLMOptions:
    """No settings yet: the weights keep the source's dtype (vLLM's `dtype=` chooses at load time)."""


class VLLMExporter(Exporter):
    name: ClassVar[str] = "vllm"
    filename: ClassVar[str] = "vllm"  # a directory inside the prune output
    description: ClassVar[str] = "a directory vLLM serves (stock config, or Nemotron-NAS block_configs)"
    options_class: ClassVar[type] = VLLMOptions
    writes_directory: ClassVar[bool] = True

    def check_expressible(self, shapes: Shapes) -> None:
        if shapes.family in UNVERIFIED:
            raise ExportError(
                f"vLLM export of the {shapes.family} family is not supported: secateurs has not checked "
                f"vLLM against transformers for its {UNVERIFIED[shapes.family]}; use the pruned "
                "directory with transformers"
            )
        if _stock(shapes):
            return
        where = "a plan with these units may give" if shapes.hypothetical else "the model has"
        if shapes.family not in LLAMA_STYLE:
            raise ExportError(
                f"{where} per-layer shapes, which vLLM runs only through its Llama-style Nemotron-NAS "
                f"architecture; {shapes.family} layers do not fit it (q/k norms): prune with "
                "--allocation uniform and without bias corrections to export it"
            )
        counts: dict[int, list[int]] = {}
        for i, g in enumerate(shapes.layers):
            if g.has_attn:
                counts.setdefault(g.n_groups, []).append(i)
        if not counts:
            raise ExportError(f"{where} no attention in any layer; vLLM needs at least one")
        if len(counts) > 1:
            detail = "; ".join(f"{n} in layers {_ranges(ls)}" for n, ls in sorted(counts.items()))
            raise ExportError(
                f"{where} different numbers of GQA groups per layer ({detail}); vLLM's per-layer "
                "architecture has one query-head count for every layer: prune with "
                "--attention-allocation uniform (MLP channels may still differ per layer)"
            )
        if not shapes.layers[0].has_attn:
            raise ExportError(
                f"{where} no attention in layer 0; vLLM's Nemotron-NAS layer cannot start the residual "
                "stream without it: keep layer 0's attention (do not use attn_block units) to export"
            )

    def write(self, source: Path, path: Path) -> dict[str, Any]:
        """`path`: the temporary directory `export` made; `check_expressible` has passed."""
        from secateurs.surgery.saving import load_skeleton

        skeleton = load_skeleton(source)
        shapes = shapes_of(skeleton)
        path.mkdir(parents=True, exist_ok=True)
        raw = json.loads((source / "config.json").read_text(encoding="utf-8"))
        _copy_tokenizer(source, path)
        if _stock(shapes) and "secateurs" not in raw:
            for f in _weight_files(source):
                shutil.copyfile(f, path / f.name)
            atomic_write_json(
                path / "config.json", {k: v for k, v in raw.items() if k != "auto_map"}, indent=2
            )
            return {"architecture": raw.get("architectures", ["?"])[0], "layers": len(shapes.layers)}
        _refuse_sliding_window(raw)
        config = nas_config(raw, shapes)
        atomic_write_json(path / "config.json", config, indent=2)
        atomic_write(path / MODELING_FILE, modeling_source())
        _write_weights(source, path, shapes, adapter_for(skeleton), config)
        return {"architecture": ARCHITECTURE, "layers": len(shapes.layers)}


def _stock(shapes: Shapes) -> bool:
    """Same shapes in every layer and no output biases: the stock class runs it (the saved config
    says so too: `surgery.apply` writes `config.secateurs` only otherwise)."""
    return shapes.uniform and not any(g.o_bias or g.down_bias for g in shapes.layers)


def _ranges(layers: list[int]) -> str:
    return ", ".join(map(str, layers)) if len(layers) <= 6 else f"{layers[0]}..{layers[-1]} ({len(layers)})"


def _refuse_sliding_window(raw: dict) -> None:
    if raw.get("sliding_window") and raw.get("use_sliding_window", True):
        raise ExportError(
            f"the model uses a sliding window ({raw['sliding_window']} tokens), which vLLM's Nemotron-NAS "
            "architecture does not have"
        )


def _copy_tokenizer(source: Path, path: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, path / name)


def _weight_files(source: Path) -> list[Path]:
    files = weight_files(source)
    if files is None:
        raise ExportError(f"no safetensors weights in {source}")
    out = sorted(set(files.values()))
    if (source / WEIGHTS_INDEX).is_file():
        out.append(source / WEIGHTS_INDEX)
    return out


def _bias_flags(shapes: Shapes) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o bias, MLP biases) for every layer, as DeciLM's three switches give them."""
    o = any(g.o_bias for g in shapes.layers)
    mlp = any(g.down_bias for g in shapes.layers)
    return shapes.qkv_bias, o, mlp


def block_configs(shapes: Shapes, hidden_act: str) -> list[dict[str, Any]]:
    """One `{"attention": ..., "ffn": ...}` per layer, as vLLM's DeciLM reads them (never `ffn_mult`)."""
    return [
        {
            "attention": {
                "no_op": not g.has_attn,
                "replace_with_linear": False,
                "n_heads_in_group": g.q_per_kv,
            },
            "ffn": {
                "no_op": not g.has_mlp,
                "replace_with_linear": False,
                "intermediate_size": g.intermediate if g.has_mlp else 0,
                "hidden_act": hidden_act,
            },
        }
        for g in shapes.layers
    ]


def nas_config(raw: dict, shapes: Shapes) -> dict[str, Any]:
    """The Nemotron-NAS config.json of a model with these shapes, built from its own config."""
    with_attn = [g for g in shapes.layers if g.has_attn]
    g0 = with_attn[0]
    qkv, o, mlp = _bias_flags(shapes)
    hidden_act = raw.get("hidden_act", "silu")
    config = {k: v for k, v in raw.items() if k not in DROPPED_KEYS}
    config.update(
        model_type=MODEL_TYPE,
        architectures=[ARCHITECTURE],
        num_hidden_layers=len(shapes.layers),
        num_attention_heads=g0.n_groups * g0.q_per_kv,
        num_key_value_heads=g0.n_groups,
        head_dim=g0.head_dim,
        intermediate_size=max(g.intermediate for g in shapes.layers),
        attention_bias=o,
        qkv_bias=qkv,
        mlp_bias=mlp,
        hidden_act=hidden_act,
        block_configs=block_configs(shapes, hidden_act),
        auto_map={
            "AutoConfig": f"{MODELING_FILE[:-3]}.{CONFIG_CLASS}",
            "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{ARCHITECTURE}",
        },
    )
    return config


def _missing_biases(shapes: Shapes, adapter, config: dict) -> dict[str, tuple[int, ...]]:
    """Bias tensors the DeciLM switches declare but the model does not have: written as zeros."""
    qkv, o, mlp = config["qkv_bias"], config["attention_bias"], config["mlp_bias"]
    hidden = shapes.hidden
    out: dict[str, tuple[int, ...]] = {}
    for i, g in enumerate(shapes.layers):
        prefix = f"{adapter.layers}.{i}"
        if g.has_attn:
            heads, kv = g.n_groups * g.q_per_kv * g.head_dim, g.n_groups * g.head_dim
            if qkv and not shapes.qkv_bias:
                out |= {
                    f"{prefix}.{adapter.attn}.{n}.bias": (s,)
                    for n, s in ((adapter.q, heads), (adapter.k, kv), (adapter.v, kv))
                }
            if o and not g.o_bias:
                out[f"{prefix}.{adapter.attn}.{adapter.o}.bias"] = (hidden,)
        if g.has_mlp and mlp:
            for name, size in (
                (adapter.gate, g.intermediate),
                (adapter.up, g.intermediate),
                (adapter.down, hidden),
            ):
                out[f"{prefix}.{adapter.mlp}.{name}.bias"] = (size,)
    return out


def _write_weights(source: Path, path: Path, shapes: Shapes, adapter, config: dict) -> None:
    """The source tensors shard by shard (one shard in memory at a time), plus zero biases where the
    DeciLM switches need them; an index when the source is sharded."""
    files = weight_files(source) or {}
    missing = _missing_biases(shapes, adapter, config)
    unused = {  # the norms of no-op blocks: vLLM's layer has no module to load them into
        f"{adapter.layers}.{i}.{norm}.weight"
        for i, g in enumerate(shapes.layers)
        for norm, present in ((adapter.attn_norm, g.has_attn), (adapter.mlp_norm, g.has_mlp))
        if not present
    }
    shards = sorted(set(files.values()))
    if not shards:
        raise ExportError(f"no safetensors weights in {source}")
    weight_map = {}
    for n, shard in enumerate(shards):
        with safe_open(shard, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if k not in unused}  # noqa: SIM118
        dtype = next(iter(tensors.values())).dtype
        if n == len(shards) - 1:  # the zero biases go with the last shard
            tensors |= {k: torch.zeros(s, dtype=dtype) for k, s in missing.items() if k not in tensors}
        save_file(tensors, path / shard.name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, shard.name)
    if len(shards) > 1:
        atomic_write_json(path / WEIGHTS_INDEX, {"metadata": {}, "weight_map": weight_map})


def modeling_source() -> str:
    """The directory's remote-code file: `reshape.py` verbatim, then a config class that gives
    `block_configs` attribute access (vLLM reads `block.attention.no_op`) and a transformers model class
    that builds each layer from them (for tests and for users without vLLM)."""
    footer = '''

# ---- generated by secateurs: Nemotron-NAS block_configs on transformers' Llama ----
from torch import nn as _nn  # noqa: E402

from transformers.models.llama.configuration_llama import LlamaConfig as _LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaForCausalLM as _LlamaForCausalLM  # noqa: E402

_NAMES = {
    "layers": "model.layers", "attn": "self_attn", "q": "q_proj", "k": "k_proj", "v": "v_proj",
    "o": "o_proj", "mlp": "mlp", "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}


class _Attrs(dict):
    """A JSON dict that also reads as attributes; a missing key is an AttributeError (so `hasattr`
    answers False, as vLLM's `hasattr(block.ffn, "ffn_mult")` needs)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _attrs(x):
    return _Attrs({k: _attrs(v) for k, v in x.items()}) if isinstance(x, dict) else x


class SecateursNasConfig(_LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, qkv_bias=None, **kwargs):
        self.block_configs = [_attrs(b) for b in (block_configs or [])]
        self.qkv_bias = kwargs.get("attention_bias", False) if qkv_bias is None else qkv_bias
        super().__init__(**kwargs)


def _specs(config):
    out = []
    for b in config.block_configs:
        attn, ffn = not b["attention"]["no_op"], not b["ffn"]["no_op"]
        r = b["attention"]["n_heads_in_group"]
        out.append({
            "kv_heads": config.num_attention_heads // r if attn else 0, "q_per_kv": r,
            "head_dim": config.head_dim, "intermediate": ffn and b["ffn"]["intermediate_size"],
            "attn": attn, "mlp": ffn, "o_bias": attn and config.attention_bias,
            "down_bias": ffn and config.mlp_bias,
        })
    return out


class DeciLMForCausalLM(_LlamaForCausalLM):
    config_class = SecateursNasConfig

    def __init__(self, config):
        o_bias = config.attention_bias
        config.attention_bias = config.qkv_bias  # built with q/k/v biases as `qkv_bias` says ...
        try:
            super().__init__(config)
        finally:
            config.attention_bias = o_bias  # ... and o's as `attention_bias` (reshape_ below)
        specs = _specs(config)
        reshape_(self, {"names": _NAMES, "layers": specs})
        for layer, spec in zip(self.model.layers, specs):  # a no-op block has no norm (as in vLLM)
            if not spec["attn"]:
                layer.input_layernorm = _nn.Identity()
            if not spec["mlp"]:
                layer.post_attention_layernorm = _nn.Identity()
'''
    return inspect.getsource(reshape) + footer
