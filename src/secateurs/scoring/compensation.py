"""Mean compensation inside the masked forward: score each sampled sub-model as if repaired.

Why: the pruned model is repaired after the search (`surgery.reconstruct`), so the structure worth
finding is the one whose repaired model is best, while plain masks score unrepaired sub-models. The
cheapest part of the repair, FLAP's mean compensation, is linear in the mask: a removed input column j of
`o_proj` / `down_proj` leaves its mean contribution `W[:, j] * mean(X_j)` behind as an output bias. With
each unit's contribution precomputed from one statistics pass of the dense model, a batch of K masks gets
its K bias rows by one matrix product per layer, `(1 - mask) @ contributions`, which the masks already
carry (`Masks.attn_bias` / `mlp_bias`). A unit whose output is nearly constant then costs the search
almost nothing to drop, as it will cost the repaired model. A whole block dropped by a gate is not
compensated (the hooks scale the bias with the block), as the repair refits no removed block either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from secateurs.models.placement import onloaded
from secateurs.scoring.stats import collect_stats
from secateurs.units.masks import Masks
from secateurs.units.space import UnitSpace


@dataclass
class MeanCompensation:
    """Per layer, each unit's mean contribution to the block output: attn [n_groups, hidden] (a GQA
    group's columns summed), mlp [n_channels, hidden]; None where the layer has no such units."""

    attn: list[torch.Tensor | None]
    mlp: list[torch.Tensor | None]

    @classmethod
    def from_model(
        cls, model: nn.Module, space: UnitSpace, calib: torch.Tensor, batch_rows: int = 8
    ) -> MeanCompensation:
        stats = collect_stats(model, calib, space, batch_rows=batch_rows)
        a = space.adapter
        attn, mlp = [], []
        for i, (layer, lu) in enumerate(zip(a.decoder_layers(model), space.layers, strict=True)):
            g = lu.geometry
            attn.append(
                _contributions(a.o_proj(layer), stats.attn[i].mean, g.q_per_kv * g.head_dim)
                if lu.n_groups
                else None
            )
            mlp.append(_contributions(a.down_proj(layer), stats.mlp[i].mean, 1) if lu.n_channels else None)
        return cls(attn, mlp)

    def add_to_(self, masks: Masks) -> Masks:
        """Give every row of `masks` the bias its removed units' means call for (in place)."""
        for i, c in enumerate(self.attn):
            if c is not None:
                masks.attn_bias[i] = (1 - masks.groups[i].to(c.dtype)) @ c
        for i, c in enumerate(self.mlp):
            if c is not None:
                masks.mlp_bias[i] = (1 - masks.channels[i].to(c.dtype)) @ c
        return masks


def _contributions(linear: nn.Linear, mean: torch.Tensor, width: int) -> torch.Tensor:
    """[in / width, out]: column j's `W[:, j] * mean_j`, summed over each unit's `width` columns."""
    with onloaded(linear):
        w = linear.weight.detach().to("cpu", torch.float64)
    per_column = (w * mean.to("cpu", torch.float64)).T  # [in, out]
    return per_column.reshape(-1, width, w.shape[0]).sum(dim=1).float()
