"""Physical removal: apply a plan to a model in place and rewrite its config in one place."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from secateurs.errors import PlanError, one_line
from secateurs.models.adapters import FamilyAdapter, layer_geometry
from secateurs.models.placement import editable, renumber_device_map_
from secateurs.models.reshape import SCHEMA, SkipAttention, SkipMLP, own_head_counts_, renumber_attention
from secateurs.units.plan import LayerPlan, Plan
from secateurs.units.space import LayerUnits, UnitSpace

log = logging.getLogger(__name__)


def _sliced(old: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    w = old.weight
    if rows is not None:
        w = w.index_select(0, rows)
    if cols is not None:
        w = w.index_select(1, cols)
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if old.bias is not None:
        new.bias.data.copy_(old.bias if rows is None else old.bias.index_select(0, rows))
    return new


def _add_bias_(linear: nn.Linear, correction: list[float]) -> None:
    c = torch.tensor(correction, device=linear.weight.device, dtype=linear.weight.dtype)
    if linear.bias is None:
        linear.bias = nn.Parameter(c.clone())
    else:
        linear.bias.data.add_(c)


def head_rows(groups: list[int], per_group: int, device) -> torch.Tensor:
    return (
        torch.tensor(groups, device=device)[:, None] * per_group + torch.arange(per_group, device=device)
    ).flatten()


def prune_attention_(layer: nn.Module, lp: LayerPlan, lu: LayerUnits, a: FamilyAdapter) -> None:
    """Slice one layer's attention to the plan's kept groups (or remove it), in place."""
    if lp.drop_attn:
        setattr(layer, a.attn, SkipAttention())
        return
    attn = a.attention(layer)
    g = lu.geometry
    dev = a.o_proj(layer).weight.device
    if lp.keep_groups is not None:
        q_rows = head_rows(lp.keep_groups, g.q_per_kv * g.head_dim, dev)
        kv_rows = head_rows(lp.keep_groups, g.head_dim, dev)
        for name, rows in a.attn_in_rows(g, q_rows, kv_rows):
            setattr(attn, name, _sliced(getattr(attn, name), rows, None))
        setattr(attn, a.o, _sliced(getattr(attn, a.o), None, q_rows))
        if a.fused_qkv:  # the forward splits the fused output at widths it reads from the config
            own_head_counts_(attn, len(lp.keep_groups) * g.q_per_kv, len(lp.keep_groups))
        if a.full_width_qk_norm:  # the norm's weight follows the rows it normalises
            for norm, rows in zip(a.qk_norms(layer), (q_rows, kv_rows), strict=True):
                norm.weight = nn.Parameter(norm.weight.index_select(0, rows))
    if lp.attn_bias is not None:
        _add_bias_(getattr(attn, a.o), lp.attn_bias)


def prune_mlp_(layer: nn.Module, lp: LayerPlan, lu: LayerUnits, a: FamilyAdapter) -> None:
    """Slice one layer's MLP to the plan's kept channels (or remove it), in place."""
    if lp.drop_mlp:
        setattr(layer, a.mlp, SkipMLP())
        return
    mlp = a.mlp_module(layer)
    if lp.keep_channels is not None:
        rows = torch.tensor(lp.keep_channels, device=a.down_proj(layer).weight.device)
        for name, kept in a.mlp_in_rows(lu.geometry, rows):
            setattr(mlp, name, _sliced(getattr(mlp, name), kept, None))
        setattr(mlp, a.down, _sliced(getattr(mlp, a.down), None, rows))
    if lp.mlp_bias is not None:
        _add_bias_(getattr(mlp, a.down), lp.mlp_bias)


def _slice_per_layer_config_(config, keep: list[int], n_before: int) -> None:
    """Per-layer config lists (e.g. `layer_types`) must follow the surviving layers."""
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == n_before and key != "architectures":
            setattr(config, key, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)


def _write_config_(model: nn.Module, space: UnitSpace, native_bias: tuple[bool, bool]) -> None:
    """Uniform shapes go into the stock config keys when the stock config accepts them; anything else
    into `config.secateurs`."""
    a, config = space.adapter, model.config
    g0 = space.layers[0].geometry
    specs = [g.spec() for g in layer_geometry(model, a)]
    uniform = all(
        s["attn"]
        and s["mlp"]
        and (s["kv_heads"], s["intermediate"]) == (specs[0]["kv_heads"], specs[0]["intermediate"])
        and (s["o_bias"], s["down_bias"]) == native_bias
        for s in specs
    )
    config.head_dim = g0.head_dim  # Llama derives head_dim from the head count when it is absent
    stock = {
        "num_key_value_heads": specs[0]["kv_heads"],
        "num_attention_heads": specs[0]["kv_heads"] * g0.q_per_kv,
        "intermediate_size": specs[0]["intermediate"],
    }
    if uniform and _accepts(config, stock):
        for key, value in stock.items():
            setattr(config, key, value)
        if hasattr(config, "secateurs"):
            del config.secateurs
    else:
        config.secateurs = {"schema": SCHEMA, "family": a.name, "names": a.module_names(), "layers": specs}


def _accepts(config, changes: dict) -> bool:
    """Whether the stock config class validates `config` with `changes`: Phi-3 checks its longrope
    factors against `hidden_size // num_attention_heads`, so a head count that differs from the dense one
    fails there although nothing about rotary dims changed; such a plan is written per layer instead
    (keeping the dense counts in the stock keys), and loads with `trust_remote_code=True`."""
    candidate = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(candidate, key, value)
    try:
        candidate.validate()
    except Exception as exc:  # noqa: BLE001 - the config class's own validation, whatever it raises
        log.info("the stock config rejects the uniform shapes (%s); writing them per layer", one_line(exc))
        return False
    return True


def apply_plan_(model: nn.Module, plan: Plan) -> nn.Module:
    """Physically remove what `plan` drops, in place; returns `model`.

    Kept groups/channels are sliced out of q/k/v/o and gate/up/down (biases included), dropped blocks
    become `SkipAttention` / `SkipMLP`, layers with both blocks dropped leave the `ModuleList`, bias
    corrections become real biases, and the config is rewritten to match the tensors. An offloaded
    layer (`--device-map`) is sliced on its execution device and goes back to its offload storage.
    """
    space, plan = start_surgery(model, plan)
    with torch.no_grad():
        for layer, lp, lu in zip(space.adapter.decoder_layers(model), plan.layers, space.layers, strict=True):
            with editable(model, layer):  # an offloaded layer's weights, for as long as it is sliced
                prune_attention_(layer, lp, lu, space.adapter)
                prune_mlp_(layer, lp, lu, space.adapter)
    return finish_surgery_(model, plan, space)


def start_surgery(model: nn.Module, plan: Plan) -> tuple[UnitSpace, Plan]:
    """The model's unit space and the plan validated against it (before any weight is touched)."""
    space = UnitSpace.from_model(model)
    plan = plan.canonical(space)
    _check_layer_types(model.config, plan)
    return space, plan


def _check_layer_types(config, plan: Plan) -> None:
    """With mixed layer types (sliding / full), cache index 0 must stay in use after renumbering (see
    `renumber_attention`): some attention block of the first surviving layer's type must remain."""
    types = getattr(config, "layer_types", None)
    if not types or len(set(types)) < 2:
        return
    kept = [(t, lp) for t, lp in zip(types, plan.layers, strict=True) if not lp.drops_layer]
    first = kept[0][0]
    if not any(t == first and not lp.drop_attn for t, lp in kept):
        raise PlanError(
            f"the plan removes every {first} attention block, but the model's first layer is {first}: "
            "its KV cache would start empty. Keep one such attention block."
        )


def finish_surgery_(model: nn.Module, plan: Plan, space: UnitSpace) -> nn.Module:
    """After every layer is sliced: drop the layers the plan removes, renumber the KV-cache indices and
    rewrite the config to match the tensors. `space` is the model's space before surgery."""
    a = space.adapter
    native_bias = _native_bias(model, space)
    decoder = a.decoder_layers(model)
    keep = [i for i, lp in enumerate(plan.layers) if not lp.drops_layer]
    if len(keep) < len(decoder):
        parent_name, _, child = a.layers.rpartition(".")
        model.get_submodule(parent_name).__setattr__(child, nn.ModuleList([decoder[i] for i in keep]))
        _slice_per_layer_config_(model.config, keep, len(plan.layers))
        renumber_device_map_(model, a.layers, keep)
    renumber_attention(model, a.module_names())
    _write_config_(model, space, native_bias)
    after = UnitSpace.from_model(model)
    log.info(
        "surgery: %d -> %d layers, prunable params %d -> %d",
        space.n_layers,
        after.n_layers,
        space.total_cost,
        after.total_cost,
    )
    return model


def _native_bias(model: nn.Module, space: UnitSpace) -> tuple[bool, bool]:
    """Whether a stock model built from this config has o_proj / down_proj biases."""
    a, config = space.adapter, model.config
    o = bool(a.o_bias_native and getattr(config, a.o_bias_native, False))
    d = bool(a.down_bias_native and getattr(config, a.down_bias_native, False))
    return o, d
