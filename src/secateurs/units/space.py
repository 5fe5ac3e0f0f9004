"""Every prunable unit of a model and what it costs, defined once.

Sparsity targets, budgets, projections and reports all read costs from here, so "50% sparsity" means
the same thing to every method. The definition (stated in every report, see `SPARSITY_DEFINITION`):
the fraction of attention + MLP *linear* parameters (weights and biases) removed. Embeddings, `lm_head`
and norms are excluded; Qwen3's and Gemma 3's per-head q/k norms are shared by all heads and are not unit
costs. Only norms as wide as the projections (OLMo 2's q/k norms) lose entries with a GQA group; those
entries are part of the group's cost, so that costs stay the real parameter counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import nn

from secateurs.models.adapters import FamilyAdapter, LayerGeometry, adapter_for, layer_geometry

SPARSITY_DEFINITION = (
    "sparsity = fraction of attention+MLP linear parameters (weights and biases) removed; "
    "embeddings, lm_head and norms excluded"
)


class Kind(StrEnum):
    """Unit kinds. A GQA group is one KV head with the query heads that share it."""

    ATTN_GROUP = "attn_group"
    MLP_CHANNEL = "mlp_channel"
    ATTN_BLOCK = "attn_block"
    MLP_BLOCK = "mlp_block"
    LAYER = "layer"


FINE_KINDS = (Kind.ATTN_GROUP, Kind.MLP_CHANNEL)
COARSE_KINDS = (Kind.ATTN_BLOCK, Kind.MLP_BLOCK, Kind.LAYER)


@dataclass(frozen=True)
class LayerUnits:
    """One layer's units and their exact costs."""

    geometry: LayerGeometry
    group_cost: int  # q and o rows of qpk heads + k and v rows of one head (+ bias, full-width norm entries)
    channel_cost: int  # gate and up rows + down column (+ gate/up bias entries)
    attn_fixed: int  # o_proj bias: goes only with the whole block
    mlp_fixed: int  # down_proj bias: goes only with the whole block
    hidden: int = 0  # hidden size: what an added output bias costs

    @property
    def n_groups(self) -> int:
        return self.geometry.n_groups if self.geometry.has_attn else 0

    @property
    def n_channels(self) -> int:
        return self.geometry.intermediate if self.geometry.has_mlp else 0

    @property
    def attn_cost(self) -> int:
        return self.kept_cost(self.n_groups, 0)

    @property
    def mlp_cost(self) -> int:
        return self.kept_cost(0, self.n_channels)

    @property
    def cost(self) -> int:
        return self.kept_cost(self.n_groups, self.n_channels)

    def kept_cost(self, groups: int, channels: int, attn_bias: bool = False, mlp_bias: bool = False) -> int:
        """Parameters this layer keeps with `groups` GQA groups and `channels` MLP channels: the one cost
        formula. A block with no unit left is gone, bias included. `attn_bias` / `mlp_bias`: an output
        bias is added (a correction) where the module has none; it costs `hidden` parameters."""
        attn = groups * self.group_cost + (max(self.attn_fixed, self.hidden * attn_bias) if groups else 0)
        mlp = channels * self.channel_cost + (max(self.mlp_fixed, self.hidden * mlp_bias) if channels else 0)
        return attn + mlp

    def channel_bundles(self, order: torch.Tensor, size: int = 0) -> tuple[torch.Tensor, ...]:
        """Split MLP channel indices (in the caller's order) into consecutive bundles of about `size`
        channels (0: about one GQA group's parameters), so a bundle weighs like the groups beside it."""
        size = size or max(1, round(self.group_cost / self.channel_cost))
        return torch.tensor_split(order, max(1, round(order.numel() / size)))


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return linear.bias


def _has(t: torch.Tensor | None) -> int:
    return 0 if t is None else 1


def _layer_units(layer: nn.Module, g: LayerGeometry, adapter: FamilyAdapter, hidden: int) -> LayerUnits:
    """Costs from the layer's modules; q/k/v and gate/up biases read per part (`attn_in_parts`), so a
    fused projection's bias is counted exactly as separate ones would be."""
    qpk, hd = g.q_per_kv, g.head_dim
    qb = kb = vb = gate_b = up_b = None
    o_bias = down_bias = 0
    if g.has_attn:
        qb, kb, vb = adapter.attn_in_parts(layer, g, _bias)
        o_bias = _has(adapter.o_proj(layer).bias)
    if g.has_mlp:
        gate_b, up_b = adapter.mlp_in_parts(layer, g, _bias)
        down_bias = _has(adapter.down_proj(layer).bias)
    group_cost = (2 * qpk + 2) * hd * hidden + hd * (qpk * _has(qb) + _has(kb) + _has(vb))
    if adapter.full_width_qk_norm:
        group_cost += (qpk + 1) * hd  # the group's entries of the q and k norm weights
    channel_cost = 3 * hidden + _has(gate_b) + _has(up_b)
    return LayerUnits(
        geometry=g,
        group_cost=group_cost,
        channel_cost=channel_cost,
        attn_fixed=hidden * o_bias,
        mlp_fixed=hidden * down_bias,
        hidden=hidden,
    )


@dataclass(frozen=True)
class UnitSpace:
    """The prunable units of one model as it is now. Indices are relative to this model."""

    layers: tuple[LayerUnits, ...]
    hidden_size: int
    adapter: FamilyAdapter

    @classmethod
    def from_model(cls, model: nn.Module) -> UnitSpace:
        adapter = adapter_for(model)
        geoms = layer_geometry(model, adapter)
        hidden = model.config.hidden_size
        decoder = adapter.decoder_layers(model)
        return cls(
            tuple(_layer_units(layer, g, adapter, hidden) for layer, g in zip(decoder, geoms, strict=True)),
            hidden,
            adapter,
        )

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def total_cost(self) -> int:
        """All prunable parameters (the sparsity denominator for a model in this state)."""
        return sum(lu.cost for lu in self.layers)

    def n_units(self, kind: Kind) -> list[int]:
        """Units of `kind` per layer (blocks and layers: 1 if present, else 0)."""
        if kind == Kind.ATTN_GROUP:
            return [lu.n_groups for lu in self.layers]
        if kind == Kind.MLP_CHANNEL:
            return [lu.n_channels for lu in self.layers]
        if kind == Kind.ATTN_BLOCK:
            return [int(lu.geometry.has_attn) for lu in self.layers]
        if kind == Kind.MLP_BLOCK:
            return [int(lu.geometry.has_mlp) for lu in self.layers]
        return [int(lu.geometry.has_attn or lu.geometry.has_mlp) for lu in self.layers]

    def unit_costs(self, kind: Kind) -> list[int]:
        """Cost of one unit of `kind` in each layer."""
        if kind == Kind.ATTN_GROUP:
            return [lu.group_cost for lu in self.layers]
        if kind == Kind.MLP_CHANNEL:
            return [lu.channel_cost for lu in self.layers]
        if kind == Kind.ATTN_BLOCK:
            return [lu.attn_cost for lu in self.layers]
        if kind == Kind.MLP_BLOCK:
            return [lu.mlp_cost for lu in self.layers]
        return [lu.cost for lu in self.layers]

    def describe(self) -> list[dict]:
        """Per-layer counts and costs, for `secateurs info` and reports."""
        return [
            {
                "layer": i,
                "attn_groups": lu.n_groups,
                "q_per_kv": lu.geometry.q_per_kv,
                "head_dim": lu.geometry.head_dim,
                "group_cost": lu.group_cost,
                "mlp_channels": lu.n_channels,
                "channel_cost": lu.channel_cost,
                "attn_cost": lu.attn_cost,
                "mlp_cost": lu.mlp_cost,
                "layer_cost": lu.cost,
            }
            for i, lu in enumerate(self.layers)
        ]


def count_parameters(model: nn.Module) -> int:
    """All parameters, tied ones once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
