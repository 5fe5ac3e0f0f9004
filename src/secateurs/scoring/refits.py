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
chooses it on held-out windows. It costs one dense pass (layer by layer, one layer's Gram matrices at a
time), the greedy per module, one solve per grid count, and memory for the deltas, stored over the kept
columns only in the weights' dtype: SmolLM2-135M with 25 MLP counts per layer, 1.17 GiB in float32 (a
full [out, in] change per count took 2.35 GiB). Grids too large for memory are thinned, with a warning,
so a 7B model gets a coarser bank rather than an error.
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
from secateurs.models.placement import onloaded
from secateurs.surgery.apply import head_rows
from secateurs.surgery.reconstruct import Gram, augmented, capture_inputs, run_layer, solve
from secateurs.surgery.reselect import obs_order
from secateurs.units.masks import Masks, Refit, Refits
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
    that have a refit, and those refits (over each count's kept columns)."""

    rank: torch.Tensor
    counts: torch.Tensor  # sorted kept counts with a refit (plus 0 and n, which need none)
    deltas: dict[int, Refit]

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
        """Per layer, in model order: one pass of the dense layer for its Gram matrices, then per module
        the OBS order and the grid's refits. `mlp_counts[l]`: the kept channel counts of layer l that
        get a refit (default: an even grid of `DEFAULT_MLP_COUNTS` steps); every grid is thinned, with
        a warning, until the refits fit in memory."""
        layers = space.adapter.decoder_layers(model)
        modules = _modules(layers, space)
        grids = {
            key: _grid(space.layers[key[1]], key[0], mlp_counts[key[1]] if mlp_counts else None)
            for key in modules
        }
        grids = _fit_in_memory(grids, {key: _refit_cost(m, space, key) for key, m in modules.items()})
        attn: list[ModuleBank | None] = [None] * space.n_layers
        mlp: list[ModuleBank | None] = [None] * space.n_layers
        for i, grams in _dense_layer_grams(model, layers, modules, calib, batch_rows):
            for kind, gram in grams.items():
                bank = _module_bank(modules[kind, i], gram, _unit_width(space, (kind, i)), grids[kind, i])
                (attn if kind == "attn" else mlp)[i] = bank
        size = sum(r.nbytes for b in attn + mlp if b for r in b.deltas.values())
        log.info("repair bank: OBS orders and refits for %d modules, %.2f GiB", len(modules), size / 2**30)
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


def _modules(layers: list[nn.Module], space: UnitSpace) -> dict[tuple[str, int], nn.Linear]:
    """("attn" | "mlp", layer) -> the `o_proj` / `down_proj` whose inputs are the layer's units."""
    a = space.adapter
    modules = {}
    for i, (layer, lu) in enumerate(zip(layers, space.layers, strict=True)):
        if lu.n_groups:
            modules["attn", i] = a.o_proj(layer)
        if lu.n_channels:
            modules["mlp", i] = a.down_proj(layer)
    return modules


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


def _unit_width(space: UnitSpace, key: tuple[str, int]) -> int:
    """Input columns of one unit of module `key`: a GQA group's query heads, or one MLP channel."""
    kind, i = key
    g = space.layers[i].geometry
    return g.q_per_kv * g.head_dim if kind == "attn" else 1


def _refit_cost(module: nn.Linear, space: UnitSpace, key: tuple[str, int]) -> tuple[int, int]:
    """(bytes of one kept unit's refit columns, bytes of the module's float64 Gram matrix): a count-c
    refit costs c unit blocks, stored in the weights' dtype."""
    unit = module.out_features * _unit_width(space, key) * module.weight.element_size()
    return unit, 8 * (module.in_features + 1) ** 2


def _fit_in_memory(grids: dict, costs: dict) -> dict:
    """The grids, thinned to every other count until the refits (plus the largest layer's float64 Gram
    matrices, which live while it is processed) fit in `MAX_MEMORY_SHARE` of the memory available now.
    A coarser grid snaps more samples to a neighbouring count; a large model still gets the bank instead
    of an error. Refused, before any work, when even one count per module does not fit."""
    have = MAX_MEMORY_SHARE * psutil.virtual_memory().available

    def need(gr):
        return sum(costs[k][0] * sum(gr[k]) for k in gr)

    per_layer: dict[int, int] = {}
    for (_kind, i), (_unit, gram) in costs.items():
        per_layer[i] = per_layer.get(i, 0) + gram
    grams = max(per_layer.values(), default=0)
    thinned = dict(grids)
    while need(thinned) + grams > have:
        if all(len(g) <= 1 for g in thinned.values()):
            raise ConfigError(
                f"scoring samples as repaired needs {(need(thinned) + grams) / 2**30:.1f} GiB even with one "
                f"refit per module, more than {MAX_MEMORY_SHARE:.0%} of the {have / MAX_MEMORY_SHARE / 2**30:.1f} "
                "GiB available: use --sample-repair bias or none"
            )
        thinned = {k: g[1::2] if len(g) > 1 else g for k, g in thinned.items()}
    if thinned != grids:
        most = max(len(g) for g in thinned.values())
        log.warning(
            "repair bank: refit grids thinned to at most %d counts per module to fit in memory (%.1f GiB); "
            "samples snap to the nearest count",
            most,
            need(thinned) / 2**30,
        )
    return thinned


def _module_bank(module: nn.Linear, gram: torch.Tensor, width: int, counts) -> ModuleBank:
    """OBS order of `module`'s input units (blocks of `width` columns) and the refit at each count."""
    with onloaded(module):
        full = augmented(module.weight, module.bias).cpu()
        dtype = module.weight.dtype
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
        deltas[int(c)] = Refit(cols, (new[:, :-1] - weight[:, cols]).to(dtype))
    grid = torch.tensor(sorted({0, n, *map(int, counts)}), dtype=torch.long)
    return ModuleBank(rank, grid, deltas)


def _dense_layer_grams(
    model: nn.Module, layers: list[nn.Module], modules: dict, calib: torch.Tensor, batch_rows: int
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Per layer, in order: {kind: Gram matrix ([in + 1, in + 1], float64, on CPU)} of its modules'
    inputs over `calib`, from the dense layer's own pass (the repair's layer-wise loop without its
    surgery): one layer's Gram matrices live at a time, not the model's (30 GiB on a 7B model)."""
    hidden, kwargs = capture_inputs(model, calib, batch_rows)
    for i, layer in enumerate(layers):
        keys = [key for key in modules if key[1] == i]
        grams = {kind: Gram(modules[kind, i].in_features) for kind, _ in keys}
        with torch.inference_mode(), _streaming({k: modules[k, i] for k in grams}, grams):
            hidden = run_layer(layer, hidden, kwargs, i)
        yield i, {kind: g.g for kind, g in grams.items()}


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
