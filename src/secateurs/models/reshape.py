"""Per-layer shapes for pruned models: the one piece shared by secateurs and the saved modelling file.

This module imports only torch and transformers on purpose: `save_pruned` copies it verbatim into the
output directory as `modeling_secateurs.py`, with a footer that subclasses the family's stock config
(under its own `model_type`) and `*ForCausalLM`. So `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and
`secateurs.load(dir)` build the model with the very same code.

`config.secateurs` holds {"schema", "family", "names": {...module names...}, "layers": [spec, ...]} where the
names carry "q_norm" / "k_norm" only for q/k norms as wide as the projections, "qkv" instead of "q", "k",
"v" for a fused q/k/v projection and "gate_up" instead of "gate", "up" for a fused gate/up one (Phi-3),
and a spec is {"kv_heads", "q_per_kv", "head_dim", "intermediate", "attn", "mlp", "o_bias", "down_bias"}.
"""

from __future__ import annotations

import torch
from torch import nn

# Version of what secateurs writes: plan.json's layout and `config.secateurs`. 1: up to 0.1.0 (no
# version key; heterogeneous outputs named `SecateursForCausalLM`, which still load); 2: the stock
# architecture name, and `config.secateurs` carries "schema" and "family"; 3: heterogeneous outputs
# have their own `model_type` (`secateurs_llama`, ...) and config class in the modelling file, so that a
# plain `from_pretrained(dir)` asks for `trust_remote_code=True` instead of failing on a tensor's size.
SCHEMA = 3


class SkipAttention(nn.Module):
    """Stands in for a removed attention block: contributes nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class SkipMLP(nn.Module):
    """Stands in for a removed MLP block."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.zeros_like(hidden_states)


def _linear_like(old: nn.Linear, in_f: int, out_f: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_f, out_f, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def renumber_attention(model: nn.Module, names: dict) -> None:
    """Give the attention blocks that remain the first cache indices of their layer type.

    KV caches are indexed by `layer_idx`, report their length from index 0, and build each index's kind
    (full or sliding window) from `config.layer_types[index]`, so removed attention blocks must leave no
    hole in front and must not shift a block onto an index of the other type. With one layer type this
    is 0..n-1; with mixed types (Gemma) the k-th remaining sliding block takes the k-th sliding index.
    """
    layers = model.get_submodule(names["layers"])
    types = list(getattr(model.config, "layer_types", None) or [None] * len(layers))
    free: dict = {}
    for j, t in enumerate(types):
        free.setdefault(t, []).append(j)
    for i, layer in enumerate(layers):
        attn = getattr(layer, names["attn"])
        if not isinstance(attn, SkipAttention):
            attn.layer_idx = free[types[i]].pop(0)


class LayerConfig:
    """The model's config as one attention block sees it: its own head counts, everything else read
    through from the model's config (so later changes, such as the attention implementation, reach it).

    Why: an attention with a fused q/k/v projection (Phi-3) splits its output at
    `config.num_attention_heads * head_dim`, a model-wide number, so a layer with its own head count
    needs its own view of the config.
    """

    def __init__(self, base, **own):
        self.__dict__.update(own, _base=base)

    def __getattr__(self, name: str):
        base = self.__dict__.get("_base")  # absent while copy/pickle rebuild the object
        if base is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(base, name)


def own_head_counts_(attn: nn.Module, heads: int, kv_heads: int) -> None:
    """Give an attention block whose fused q/k/v projection now has `heads` query and `kv_heads` KV
    heads the split widths it reads: `config.num_attention_heads` and its own `num_key_value_heads`."""
    base = attn.config.__dict__.get("_base", attn.config)
    attn.config = LayerConfig(base, num_attention_heads=heads, num_key_value_heads=kv_heads)
    attn.num_key_value_heads = kv_heads


def _resize_norm_(norm: nn.Module, width: int) -> None:
    old = norm.weight
    norm.weight = nn.Parameter(torch.empty(width, device=old.device, dtype=old.dtype))


def _rebuild_inputs_(block: nn.Module, names: dict, widths: dict, fused: str, hidden: int) -> None:
    """New input-side linears of a block: one per part (`widths`: part -> output rows), or, when the
    names carry `fused`, one linear with every part's rows stacked in order."""
    parts = (
        {names[fused]: sum(widths.values())} if fused in names else {names[k]: w for k, w in widths.items()}
    )
    for name, out_f in parts.items():
        old = getattr(block, name)
        setattr(block, name, _linear_like(old, hidden, out_f, old.bias is not None))


def reshape_(model: nn.Module, secateurs: dict) -> None:
    """Rebuild a freshly constructed stock model so its modules have the saved per-layer shapes.

    Called on a model whose weights are about to be loaded, so new modules are left uninitialised.
    """
    names = secateurs["names"]
    hidden = model.config.hidden_size
    layers = model.get_submodule(names["layers"])
    for layer, spec in zip(layers, secateurs["layers"], strict=True):
        attn, mlp = getattr(layer, names["attn"]), getattr(layer, names["mlp"])
        if not spec["attn"]:
            setattr(layer, names["attn"], SkipAttention())
        else:
            heads = spec["kv_heads"] * spec["q_per_kv"]
            hd = spec["head_dim"]
            widths = {"q": heads * hd, "k": spec["kv_heads"] * hd, "v": spec["kv_heads"] * hd}
            _rebuild_inputs_(attn, names, widths, "qkv", hidden)
            if "qkv" in names:
                own_head_counts_(attn, heads, spec["kv_heads"])
            old = getattr(attn, names["o"])
            setattr(attn, names["o"], _linear_like(old, heads * hd, hidden, spec["o_bias"]))
            if "q_norm" in names:  # q/k norms over the whole projected width (OLMo 2)
                _resize_norm_(getattr(attn, names["q_norm"]), heads * hd)
                _resize_norm_(getattr(attn, names["k_norm"]), spec["kv_heads"] * hd)
        if not spec["mlp"]:
            setattr(layer, names["mlp"], SkipMLP())
        else:
            inter = spec["intermediate"]
            _rebuild_inputs_(mlp, names, {"gate": inter, "up": inter}, "gate_up", hidden)
            old = getattr(mlp, names["down"])
            setattr(mlp, names["down"], _linear_like(old, inter, hidden, spec["down_bias"]))
    renumber_attention(model, names)
