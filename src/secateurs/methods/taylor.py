"""First-order Taylor (LLM-Pruner style): the BACKPROP REFERENCE among the baselines.

Why: to first order, zeroing a weight w changes the loss by `-w * dL/dw`, so `|w * dL/dw|` estimates the
damage of removing it, using the loss itself rather than a proxy of it. The price is a backward pass:
activations of the whole graph plus a gradient per pruned weight, several times the memory of the
forward-only methods. It is here to compare against, side by side; it is not forward-only.

Scores, exactly: `g` is the gradient of the mean next-token NLL over all calibration windows (gradients
accumulated over batches of `batch_rows` windows, each weighted by its share of the windows); a unit's
score is the mean of `|w * g|` over its weights (GQA group: its q, k, v rows and o columns; MLP channel:
its gate and up rows and down column), a per-parameter scale; blocks/layers: mean of their units'.
Biases are not scored. The model comes back unchanged: `requires_grad` flags and any existing `.grad`
are restored.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from secateurs.eval.loss import token_nll
from secateurs.methods.base import MetricMethod, UnitScores, register
from secateurs.progress import progress
from secateurs.scoring.stats import with_block_scores
from secateurs.scoring.weights import group_rows
from secateurs.units.space import UnitSpace

log = logging.getLogger(__name__)


def taylor_saliency(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Elementwise `|w * dL/dw|`, in float32."""
    return (weight.detach().float() * grad.float()).abs()


def _scored_weights(model: nn.Module, space: UnitSpace) -> list[nn.Parameter]:
    a, out = space.adapter, []
    for layer, lu in zip(a.decoder_layers(model), space.layers, strict=True):
        if lu.n_groups:
            out += [lin.weight for lin in (*a.attn_in(layer), a.o_proj(layer))]
        if lu.n_channels:
            out += [lin.weight for lin in (*a.mlp_in(layer), a.down_proj(layer))]
    return out


def accumulate_gradients(model: nn.Module, params: list[nn.Parameter], calib: torch.Tensor, batch_rows: int):
    """Gradients of the mean NLL over `calib` w.r.t. `params` only: {param: grad}; the model is restored."""
    all_params = list(model.parameters())
    saved_flags = [p.requires_grad for p in all_params]
    saved_grads = {id(p): p.grad for p in params}
    device = all_params[0].device
    n, t = calib.shape
    grads: dict[int, torch.Tensor] = {}
    try:
        for p in all_params:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            step = max(1, batch_rows)
            for s in progress(range(0, n, step), desc="taylor gradients", unit="batch", leave=False):
                ids = calib[s : s + step].to(device)
                loss = token_nll(model, ids).sum() / (n * (t - 1))  # this batch's share of the mean
                loss.backward()
        grads = {id(p): p.grad.detach().clone() for p in params}
    finally:
        for p, flag in zip(all_params, saved_flags, strict=True):
            p.requires_grad_(flag)
        for p in params:
            p.grad = saved_grads[id(p)]
    return grads


@register
class Taylor(MetricMethod):
    name = "taylor"
    description = "BACKPROP REFERENCE: first-order Taylor |w * dL/dw| per unit (LLM-Pruner); needs backward"
    uses_backprop = True

    def scores(self, model: nn.Module, space: UnitSpace, calib: torch.Tensor) -> UnitScores:
        params = _scored_weights(model, space)
        grads = accumulate_gradients(model, params, calib, self.config.batch_rows)
        a = space.adapter

        def saliency(lin: nn.Linear) -> torch.Tensor:
            return taylor_saliency(lin.weight, grads[id(lin.weight)])

        groups, channels = [], []
        for layer, lu in zip(a.decoder_layers(model), space.layers, strict=True):
            if lu.n_groups:
                q, k, v = a.attn_in_parts(layer, lu.geometry, saliency)
                o = saliency(a.o_proj(layer))
                parts = [group_rows(w, lu.n_groups).flatten(1) for w in (q, k, v, o.t())]
                groups.append(torch.cat(parts, dim=1).mean(dim=1))
            else:
                groups.append(torch.zeros(0))
            if lu.n_channels:
                gate, up = a.mlp_in_parts(layer, lu.geometry, saliency)
                down = saliency(a.down_proj(layer))
                channels.append(torch.cat([gate, up, down.t()], dim=1).mean(dim=1))
            else:
                channels.append(torch.zeros(0))
        return UnitScores(with_block_scores(groups, channels, space))
