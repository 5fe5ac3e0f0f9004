"""Score sub-models as the repair will leave them: OBS-chosen units and their least-squares refit.

Why: with `--reconstruct-select obs` the model that ships keeps, in each layer, the *number* of GQA
groups and MLP channels the method chose, but which ones and with what weights is the repair's
choice: greedy structured OBS on the Gram matrix of `o_proj` / `down_proj`'s input, then a ridge refit
of the kept columns. A search that scores plain masked sub-models therefore judges shapes on models
that never ship, and it rewards very uneven shapes the repair cannot use (SmolLM2 50%: the policy
gradient's shape loses to wanda-sp's uniform one after the repair on every seed).

`RepairBank.from_model` makes, from one dense pass over the calibration windows, per layer and module:
the order in which greedy OBS removes its units (nested kept sets for every count, `obs_order`) and,
for a grid of kept counts, the refit weights' change `delta` over those kept columns. `apply_` then
turns a batch of sampled masks into the sub-models the repair would make of their per-layer counts: each
row keeps the OBS units of its count (MLP counts snap to the nearest grid count) and carries the refit
(`Masks.refits`, `x_masked @ delta.T` added in the same batched forward). Tyr-the-Pruner searches over
per-layer sparsities of locally pruned and repaired layers the same way.

The proxy is local: every layer is fitted on the *dense* model's inputs, while the real repair fits
each layer on the pruned model's own stream, and the ridge is fixed (`REFIT_RIDGE`) where the repair
chooses it on held-out windows. It costs one dense pass, the greedy per module, one solve per grid
count, and memory for the deltas (SmolLM2-135M, 9 MLP counts: about 1 GB in float32).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import torch
from torch import nn

from secateurs.errors import ConfigError
from secateurs.models.placement import input_device, onloaded
from secateurs.surgery.apply import head_rows
from secateurs.surgery.reconstruct import Gram, augmented, solve
from secateurs.surgery.reselect import obs_order
from secateurs.units.masks import Masks, Refits
from secateurs.units.space import UnitSpace

log = logging.getLogger(__name__)

# Ridge of the refit toward the kept weights, x the mean diagonal of the kept Gram block. The repair
# picks it per module on held-out windows, mostly 0.01-0.1 on its 128 x 256 windows (SmolLM2 50%);
# the search's calibration is smaller (32 x 128 tokens for 1,536 MLP inputs), so the upper end.
REFIT_RIDGE = 0.1
# Kept-count grid of MLP channels when the caller gives none: a refit per count would cost one solve
# and one [hidden, channels] delta per channel.
DEFAULT_MLP_COUNTS = 16
# The deltas live in memory for the whole search; at most this share of the memory available when the
# bank is built, the rest being for the forwards' activations (7B models need a coarser grid or none).
MAX_MEMORY_SHARE = 0.5


@dataclass
class ModuleBank:
    """One module's units in keep-priority (`rank[u]` = 0 for the unit OBS removes last), the counts
    that have a refit, and those refits' weight changes [out, in] (zero outside the kept columns)."""

    rank: torch.Tensor
    counts: torch.Tensor  # sorted kept counts with a refit (plus 0 and n, which need none)
    deltas: dict[int, torch.Tensor]

    def snap(self, kept: torch.Tensor) -> torch.Tensor:
        """The grid count nearest each row's kept count (ties: the larger)."""
        dist = (kept[:, None].to(torch.float64) - self.counts[None, :].to(torch.float64)).abs()
        best = dist.min(dim=1, keepdim=True).values
        last = (dist == best).to(torch.long) * torch.arange(1, self.counts.numel() + 1)
        return self.counts[last.argmax(dim=1)]

    def masks_for(self, counts: torch.Tensor) -> torch.Tensor:
        """[B, n] keep-masks: each row keeps the `counts[row]` units of highest priority."""
        return (self.rank[None, :] < counts[:, None]).float()


@dataclass
class RepairBank:
    """Per layer, the attention's and the MLP's `ModuleBank` (None where the layer has no such units)."""

    attn: list[ModuleBank | None]
    mlp: list[ModuleBank | None]

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        space: UnitSpace,
        calib: torch.Tensor,
        mlp_counts: list[list[int]] | None = None,
        batch_rows: int = 8,
    ) -> RepairBank:
        """One dense pass for the Gram matrices, then per module the OBS order and the grid's refits.
        `mlp_counts[l]`: the kept channel counts of layer l that get a refit (default: an even grid of
        `DEFAULT_MLP_COUNTS` steps)."""
        a = space.adapter
        layers = a.decoder_layers(model)
        modules = {}
        for i, (layer, lu) in enumerate(zip(layers, space.layers, strict=True)):
            if lu.n_groups:
                modules["attn", i] = a.o_proj(layer)
            if lu.n_channels:
                modules["mlp", i] = a.down_proj(layer)
        grids = {
            key: _grid(space.layers[key[1]], key[0], mlp_counts[key[1]] if mlp_counts else None)
            for key in modules
        }
        _check_memory({key: (len(grids[key]), m.weight.numel()) for key, m in modules.items()})
        grams = _dense_grams(model, modules, calib, batch_rows)
        attn: list[ModuleBank | None] = [None] * space.n_layers
        mlp: list[ModuleBank | None] = [None] * space.n_layers
        for (kind, i), module in modules.items():
            g = space.layers[i].geometry
            width = g.q_per_kv * g.head_dim if kind == "attn" else 1
            (attn if kind == "attn" else mlp)[i] = _module_bank(module, grams[kind, i], width, grids[kind, i])
        log.info("repair bank: OBS orders and refits for %d modules", len(modules))
        return cls(attn, mlp)

    def apply_(self, masks: Masks) -> Masks:
        """Each row of `masks` becomes the repaired sub-model of its per-layer counts (in place): the OBS
        units of its (snapped) count, with the refit for it."""
        for banks, target in ((self.attn, masks.groups), (self.mlp, masks.channels)):
            for i, bank in enumerate(banks):
                if bank is not None:
                    kept = (target[i] != 0).sum(dim=1)
                    target[i] = bank.masks_for(bank.snap(kept)).to(target[i].dtype)
        masks.refits = Refits(
            attn=[b.deltas if b else {} for b in self.attn], mlp=[b.deltas if b else {} for b in self.mlp]
        )
        return masks


def even_counts(n: int, steps: int) -> list[int]:
    """`steps + 1` kept counts spread evenly over 0..n (fewer where n is small)."""
    return sorted({round(j * n / steps) for j in range(steps + 1)})


def _grid(lu, kind: str, mlp_counts: list[int] | None) -> list[int]:
    """The kept counts of one module that get a refit: every GQA group count; the MLP's given grid (or
    an even one), without 0 and all, which need none."""
    if kind == "attn":
        return list(range(1, lu.n_groups))
    grid = mlp_counts if mlp_counts is not None else even_counts(lu.n_channels, DEFAULT_MLP_COUNTS)
    return [c for c in grid if 0 < c < lu.n_channels]


def _check_memory(sizes: dict) -> None:
    """Refuse, before any work, a bank whose deltas (float32, one per grid count and module) would not
    fit in `MAX_MEMORY_SHARE` of the memory available now."""
    need = 4 * sum(n_counts * numel for n_counts, numel in sizes.values())
    have = psutil.virtual_memory().available
    if need > MAX_MEMORY_SHARE * have:
        raise ConfigError(
            f"scoring samples as repaired needs {need / 2**30:.1f} GiB for its refits, more than "
            f"{MAX_MEMORY_SHARE:.0%} of the {have / 2**30:.1f} GiB available: use --sample-repair bias or "
            "none, or a larger --channel-bundle (fewer MLP counts)"
        )


def _module_bank(module: nn.Linear, gram: torch.Tensor, width: int, counts) -> ModuleBank:
    """OBS order of `module`'s input units (blocks of `width` columns) and the refit at each count."""
    with onloaded(module):
        full = augmented(module.weight, module.bias).cpu()
    weight = full[:, :-1]
    order = obs_order(gram, weight, width)  # removed first ... removed last
    n = len(order)
    rank = torch.empty(n, dtype=torch.long)
    rank[torch.tensor(order[::-1])] = torch.arange(n)
    deltas = {}
    for c in counts:
        cols = head_rows(sorted(order[n - c :]), width, "cpu")
        scale = float(gram.diagonal()[cols].mean())
        new = solve(gram, full, cols, REFIT_RIDGE * scale, intercept=False, toward_kept=True)
        delta = torch.zeros_like(weight)
        delta[:, cols] = new[:, :-1] - weight[:, cols]
        deltas[int(c)] = delta.float()
    grid = torch.tensor(sorted({0, n, *map(int, counts)}), dtype=torch.long)
    return ModuleBank(rank, grid, deltas)


def _dense_grams(
    model: nn.Module, modules: dict, calib: torch.Tensor, batch_rows: int
) -> dict[tuple[str, int], torch.Tensor]:
    """The Gram matrix ([in + 1, in + 1], float64, on CPU) of each module's input over `calib`, from
    forwards of the dense decoder (no logits)."""
    grams = {key: Gram(m.in_features) for key, m in modules.items()}
    device = input_device(model)
    with torch.inference_mode(), _streaming(modules, grams):
        for s in range(0, calib.shape[0], batch_rows):
            model.get_decoder()(input_ids=calib[s : s + batch_rows].to(device), use_cache=False)
    return {key: g.g for key, g in grams.items()}


@contextmanager
def _streaming(modules: dict, grams: dict) -> Iterator[None]:
    def make(key):
        def hook(_m, args):
            grams[key].update(args[0].to("cpu"))

        return hook

    handles = [m.register_forward_pre_hook(make(key)) for key, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
