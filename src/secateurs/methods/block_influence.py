"""Block influence (ShortGPT): drop the layers that change the residual stream least.

Why: in deep pretrained transformers many layers barely rotate the hidden state; a layer whose output is
nearly parallel to its input (`1 - cos(h_in, h_out)` close to 0) mostly rescales it, which the following
norms undo, so removing the whole layer costs little. One forward pass, no weights read.

Scores, exactly: the mean over calibration tokens of `1 - cos(h_in, h_out)` for each decoder layer
(kind `layer`), of `1 - cos(h_in, h_in + attn(h_in))` for attention blocks (`attn_block`), and of
`1 - cos(h_mid, h_out)` with `h_mid = h_in + attn` for MLP blocks (`mlp_block`). Default units:
`("layer",)`, so the removed fraction overshoots the target by less than one layer.

Fine units: block influence has no per-group or per-channel score. When `attn_group` / `mlp_channel` are
also requested, `select` drops whole layers/blocks first and fills the remainder with fine units scored
by weight **magnitude** (mean |w| per unit), which is a fallback, not part of ShortGPT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from secateurs.methods.base import MethodConfig, MetricMethod, UnitScores, fine_units, register
from secateurs.methods.magnitude import magnitude_scores
from secateurs.scoring.stats import collect_stats
from secateurs.units.space import FINE_KINDS, Kind, UnitSpace


@dataclass
class BlockInfluenceConfig(MethodConfig):
    units: tuple[str, ...] = field(
        default=(Kind.LAYER,),
        metadata={"help": "coarse kinds scored by 1-cos; fine kinds fall back to magnitude"},
    )


@register
class BlockInfluence(MetricMethod):
    name = "block-influence"
    description = "ShortGPT: drop layers/blocks with the lowest mean 1-cos(h_in, h_out)"
    config_class = BlockInfluenceConfig

    def scores(self, model: nn.Module, space: UnitSpace, calib: torch.Tensor) -> UnitScores:
        stats = collect_stats(
            model, calib, space, batch_rows=self.config.batch_rows, activations=False, influence=True
        )
        infl = stats.influence
        scores: dict[str, list[torch.Tensor]] = {
            kind: [values[i].float().reshape(1)[:n] for i, n in enumerate(space.n_units(kind))]
            for kind, values in (
                (Kind.LAYER, infl.layer),
                (Kind.ATTN_BLOCK, infl.attn_block),
                (Kind.MLP_BLOCK, infl.mlp_block),
            )
        }
        if fine_units(self.config.units):
            mag = magnitude_scores(model, space)
            scores.update({k: mag[k] for k in FINE_KINDS})
        return UnitScores(scores)
