"""Per-layer shapes for pruned models: the one piece shared by secateurs and the saved modelling file.

This module imports only torch and transformers on purpose: `save_pruned` copies it verbatim into the
output directory as `modeling_secateurs.py`, with a footer that subclasses the family's stock config
(under its own `model_type`) and `*ForCausalLM`. So `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and
`secateurs.load(dir)` build the model with the very same code.

`config.secateurs` holds {"schema", "family", "names": {...module names...}, "layers": [spec, ...]} where the
names carry "q_norm" / "k_norm" only for q/k norms as wide as the projections, and a spec is
{"kv_heads", "q_per_kv", "head_dim", "intermediate", "attn", "mlp", "o_bias", "down_bias"}.
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


def _resize_norm_(norm: nn.Module, width: int) -> None:
    old = norm.weight
    norm.weight = nn.Parameter(torch.empty(width, device=old.device, dtype=old.dtype))


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
            for key, out_f in (("q", heads * hd), ("k", spec["kv_heads"] * hd), ("v", spec["kv_heads"] * hd)):
                old = getattr(attn, names[key])
                setattr(attn, names[key], _linear_like(old, hidden, out_f, old.bias is not None))
            old = getattr(attn, names["o"])
            setattr(attn, names["o"], _linear_like(old, heads * hd, hidden, spec["o_bias"]))
            if "q_norm" in names:  # q/k norms over the whole projected width (OLMo 2)
                _resize_norm_(getattr(attn, names["q_norm"]), heads * hd)
                _resize_norm_(getattr(attn, names["k_norm"]), spec["kv_heads"] * hd)
        if not spec["mlp"]:
            setattr(layer, names["mlp"], SkipMLP())
        else:
            inter = spec["intermediate"]
            for key in ("gate", "up"):
                old = getattr(mlp, names[key])
                setattr(mlp, names[key], _linear_like(old, hidden, inter, old.bias is not None))
            old = getattr(mlp, names["down"])
            setattr(mlp, names["down"], _linear_like(old, inter, hidden, spec["down_bias"]))
    renumber_attention(model, names)
