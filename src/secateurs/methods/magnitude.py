"""Magnitude: a unit is as important as the mean absolute value of its weights. Needs no data."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from secateurs.methods.base import MethodConfig, MetricMethod, UnitScores, register
from secateurs.models.placement import onloaded
from secateurs.scoring.weights import group_rows
from secateurs.units.space import Kind, UnitSpace


def _abs_weight(linear: nn.Linear) -> torch.Tensor:
    return linear.weight.abs().float()


def magnitude_scores(model: nn.Module, space: UnitSpace) -> UnitScores:
    """Mean |w| over each unit's parameters (per-parameter scale, so comparable across kinds)."""
    a = space.adapter
    groups, channels, attn_blocks, mlp_blocks = [], [], [], []
    with torch.no_grad():
        for layer, lu in zip(a.decoder_layers(model), space.layers, strict=True):
            with onloaded(layer):  # offloaded weights (--device-map), one layer at a time
                s, c = _layer_scores(layer, lu, a)
            groups.append(s)
            attn_blocks.append(s.mean(dim=0, keepdim=True) if s.numel() else torch.zeros(1))
            channels.append(c)
            mlp_blocks.append(c.mean(dim=0, keepdim=True) if c.numel() else torch.zeros(1))
    layers = [(x + y) / 2 for x, y in zip(attn_blocks, mlp_blocks, strict=True)]
    return UnitScores(
        {
            Kind.ATTN_GROUP: groups,
            Kind.MLP_CHANNEL: channels,
            Kind.ATTN_BLOCK: attn_blocks,
            Kind.MLP_BLOCK: mlp_blocks,
            Kind.LAYER: layers,
        }
    )


def _layer_scores(layer: nn.Module, lu, a) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's mean |w| per GQA group and per MLP channel (on CPU)."""
    g = lu.geometry
    s, c = torch.zeros(0), torch.zeros(0)
    if lu.n_groups:
        q, k, v = a.attn_in_parts(layer, g, _abs_weight)
        o = _abs_weight(a.o_proj(layer))
        parts = [group_rows(w, g.n_groups).flatten(1) for w in (q, k, v, o.t())]
        s = torch.cat(parts, dim=1).mean(dim=1).cpu()
    if lu.n_channels:
        gate, up = a.mlp_in_parts(layer, g, _abs_weight)
        down = _abs_weight(a.down_proj(layer))
        c = ((gate.mean(dim=1) + up.mean(dim=1) + down.mean(dim=0)) / 3).cpu()
    return s, c


@dataclass
class MagnitudeConfig(MethodConfig):
    # Raw magnitudes of heads and channels are not on one scale, so global allocation mostly measures
    # which kind has smaller weights; the same fraction per layer is the meaningful default.
    allocation: str = field(
        default="uniform", metadata={"help": "uniform: same count per layer; global: anywhere"}
    )


@register
class Magnitude(MetricMethod):
    name = "magnitude"
    description = "mean |weight| per unit; data-free baseline"
    config_class = MagnitudeConfig

    def scores(self, model: nn.Module, space: UnitSpace, calib: torch.Tensor) -> UnitScores:
        return magnitude_scores(model, space)
