"""Calibration statistics for the metric methods: one streaming forward pass, constant memory.

What the activation metrics need is the input of each output projection, because that is where a unit's
contribution enters the residual stream: `o_proj`'s input column j is one query-head dimension, and
`down_proj`'s input column j is one MLP channel (`act(gate) * up`). Per column we keep count, mean and the
sum of squared deviations (Chan/Welford merge in float64), so mean, sample variance and L2 norm follow
and memory does not grow with the number of calibration tokens.

Optionally the pass also measures block influence (ShortGPT): the mean over tokens of `1 - cos(h_in,
h_out)` for each decoder layer, and the same for its two blocks (attention: `h_in` -> `h_in + attn`,
MLP: `h_in + attn` -> `h_out`).

The maths (`Moments`, `one_minus_cos`) is plain tensor code; `input_moments` and `collect_stats` are the
hook wiring around it.

Data-parallel workers (`secateurs.distributed`) share a pass's batches: each rank runs every `world`-th
batch, keeps each batch's partial statistics apart, and the partials of all ranks are gathered (exactly)
and merged in batch order on every rank. That is the very sequence of merges one process makes, so the
statistics, hence the scores and plans, are bit for bit those of one process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from secateurs import distributed
from secateurs.models.placement import input_device, onloaded
from secateurs.progress import progress
from secateurs.scoring.weights import group_reduce
from secateurs.units.space import COARSE_KINDS, Kind, UnitSpace

log = logging.getLogger(__name__)

ACC_DTYPE = torch.float64  # statistics of ~1e5-1e6 tokens: float32 sums lose digits
COS_EPS = 1e-12  # a zero hidden state (a removed layer's input is never zero in practice) gives cos 0


# -- plain tensor maths ------------------------------------------------------------------------------
@dataclass
class Moments:
    """Running per-column statistics of rows `x[..., d]`: count, mean, M2 (sum of squared deviations).

    Batches are merged with Chan et al.'s parallel update, which is exact and numerically stable; the
    sum and sum of squares follow from these, so nothing grows with the number of rows.
    """

    count: int = 0
    mean: torch.Tensor | None = None  # [d], float64
    m2: torch.Tensor | None = None  # [d], float64

    def update(self, x: torch.Tensor) -> Moments:
        x = x.detach().reshape(-1, x.shape[-1]).to(ACC_DTYPE)
        if x.shape[0] == 0:
            return self
        mean_b = x.mean(dim=0)
        return self.merge(Moments(x.shape[0], mean_b, (x - mean_b).square().sum(dim=0)))

    def merge(self, other: Moments) -> Moments:
        """Add another set of rows' moments (Chan et al.), in place; returns self."""
        n_b = other.count
        if n_b == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.m2 = n_b, other.mean, other.m2
            return self
        n_a, n = self.count, self.count + n_b
        delta = other.mean.to(self.mean.device) - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + other.m2.to(self.m2.device) + delta.square() * (n_a * n_b / n)
        self.count = n
        return self

    def to(self, device: torch.device | str) -> Moments:
        if self.count == 0:
            return self
        return Moments(self.count, self.mean.to(device), self.m2.to(device))

    @property
    def sum(self) -> torch.Tensor:
        return self.mean * self.count

    @property
    def sum_sq(self) -> torch.Tensor:
        return self.m2 + self.mean.square() * self.count

    @property
    def var(self) -> torch.Tensor:
        """Sample variance (divides by count - 1), as FLAP's fluctuation uses."""
        return self.m2 / max(self.count - 1, 1)

    @property
    def l2(self) -> torch.Tensor:
        """||X_j||_2 over all rows seen: the activation norm in Wanda's score."""
        return self.sum_sq.clamp_min(0).sqrt()


def one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row `1 - cos(a, b)` over the last dimension, in float64; [..., d] -> [...]."""
    return 1.0 - torch.nn.functional.cosine_similarity(a.to(ACC_DTYPE), b.to(ACC_DTYPE), dim=-1, eps=COS_EPS)


@dataclass
class RunningMean:
    """A scalar mean over many rows, accumulated in float64."""

    total: float = 0.0
    count: int = 0

    def update(self, x: torch.Tensor) -> None:
        self.total += float(x.sum())
        self.count += x.numel()

    def merge(self, other: RunningMean) -> None:
        self.total += other.total
        self.count += other.count

    @property
    def value(self) -> float:
        return self.total / max(self.count, 1)


# -- hook wiring -------------------------------------------------------------------------------------
@contextmanager
def input_moments(modules: Mapping[object, nn.Module]) -> Iterator[dict[object, Moments]]:
    """Inside the block, every forward of `modules[key]` adds its input's columns to `stats[key]`.

    Example::

        lin = nn.Linear(2, 1)
        with input_moments({"x": lin}) as stats:
            lin(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        stats["x"].mean  # tensor([2., 3.], dtype=torch.float64)
    """
    stats = {key: Moments() for key in modules}
    handles = []

    def make_hook(key):
        def hook(_module, args):
            stats[key].update(args[0])

        return hook

    try:
        for key, module in modules.items():
            handles.append(module.register_forward_pre_hook(make_hook(key)))
        yield stats
    finally:
        for h in handles:
            h.remove()


@dataclass
class Influence:
    """Mean `1 - cos` per layer for the whole layer and for each of its blocks ([n_layers] each)."""

    layer: torch.Tensor
    attn_block: torch.Tensor
    mlp_block: torch.Tensor


@contextmanager
def block_influence_hooks(model: nn.Module, space: UnitSpace) -> Iterator[list[dict[str, RunningMean]]]:
    """Accumulate `1 - cos` of the residual stream across each decoder layer and each block.

    Hooks: a pre-hook on the decoder layer captures `h_in`, a hook on the attention module its output
    (so `h_mid = h_in + attn_out`), and a hook on the decoder layer `h_out`.
    """
    a = space.adapter
    acc = [{k: RunningMean() for k in COARSE_KINDS} for _ in space.layers]
    handles = []

    def first(x):
        return x[0] if isinstance(x, tuple | list) else x

    def make(i):
        state: dict[str, torch.Tensor] = {}

        def pre(_module, args, kwargs):
            state["in"] = args[0] if args else kwargs["hidden_states"]

        def attn_out(_module, _args, out):
            state["mid"] = state["in"] + first(out)

        def post(_module, _args, _kwargs, out):
            h_in, h_out = state.pop("in"), first(out)
            h_mid = state.pop("mid", h_in)
            acc[i][Kind.LAYER].update(one_minus_cos(h_in, h_out))
            acc[i][Kind.ATTN_BLOCK].update(one_minus_cos(h_in, h_mid))
            acc[i][Kind.MLP_BLOCK].update(one_minus_cos(h_mid, h_out))

        return pre, attn_out, post

    try:
        for i, layer in enumerate(a.decoder_layers(model)):
            pre, attn_out, post = make(i)
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(a.attention(layer).register_forward_hook(attn_out))
            handles.append(layer.register_forward_hook(post, with_kwargs=True))
        yield acc
    finally:
        for h in handles:
            h.remove()


@dataclass
class ActivationStats:
    """Per layer: moments of `o_proj`'s input (attn) and `down_proj`'s input (mlp); None where absent."""

    attn: list[Moments | None]
    mlp: list[Moments | None]
    influence: Influence | None = None
    tokens: int = 0
    info: dict = field(default_factory=dict)


def collect_stats(
    model: nn.Module,
    calib: torch.Tensor,
    space: UnitSpace | None = None,
    batch_rows: int = 8,
    activations: bool = True,
    influence: bool = False,
) -> ActivationStats:
    """One forward pass over the calibration windows `calib` ([N, T] token ids), in `batch_rows` rows.

    `activations` gathers the output-projection input moments; `influence` the block-influence cosines.
    Each batch's statistics are kept apart, then merged in batch order (with workers: this rank's
    batches, gathered with the others', see the module docstring).
    """
    space = space or UnitSpace.from_model(model)
    a = space.adapter
    device = input_device(model)
    attn_mods, mlp_mods = {}, {}
    if activations:
        for i, (layer, lu) in enumerate(zip(a.decoder_layers(model), space.layers, strict=True)):
            if lu.geometry.has_attn:
                attn_mods[("attn", i)] = a.o_proj(layer)
            if lu.geometry.has_mlp:
                mlp_mods[("mlp", i)] = a.down_proj(layer)
    n = calib.shape[0]
    step = max(1, batch_rows)
    starts = range(0, n, step)
    partials: dict[int, _Partial] = {}
    with (
        torch.inference_mode(),
        input_moments(attn_mods | mlp_mods) as moments,
        _maybe(influence, lambda: block_influence_hooks(model, space)) as infl,
    ):
        for j in progress(
            distributed.my_share(len(starts)), desc="calibration statistics", unit="batch", leave=False
        ):
            _reset(moments, infl)
            s = starts[j]
            model.get_decoder()(input_ids=calib[s : s + step].to(device), use_cache=False)
            partials[j] = _Partial(dict(moments), infl and [dict(acc) for acc in infl])
    layout = _Layout(attn_mods | mlp_mods, space, influence)
    merged = layout.merge(partials, len(starts))
    result = ActivationStats(
        attn=[merged.moments.get(("attn", i)) for i in range(space.n_layers)],
        mlp=[merged.moments.get(("mlp", i)) for i in range(space.n_layers)],
        tokens=int(calib.numel()),
    )
    if influence:
        result.influence = Influence(
            *(
                torch.tensor([acc[k].value for acc in merged.influence], dtype=ACC_DTYPE)
                for k in (Kind.LAYER, Kind.ATTN_BLOCK, Kind.MLP_BLOCK)
            )
        )
    log.info("calibration statistics over %d windows x %d tokens", n, calib.shape[1])
    return result


@dataclass
class _Partial:
    """One batch's statistics: moments per module key, running means per layer and kind."""

    moments: dict[object, Moments]
    influence: list[dict[str, RunningMean]] | None


def _reset(moments: dict[object, Moments], infl: list[dict[str, RunningMean]] | None) -> None:
    """Fresh accumulators before a batch (the hooks look them up by key at every call)."""
    for key in moments:
        moments[key] = Moments()
    for acc in infl or ():
        for k in acc:
            acc[k] = RunningMean()


class _Layout:
    """Per-batch partials as rows of one float64 tensor, so that every rank's can be gathered at once:
    per module `[count, mean, m2]`, per layer and kind `[total, count]`."""

    def __init__(self, modules: dict[object, nn.Module], space: UnitSpace, influence: bool):
        self.widths = {key: m.in_features for key, m in modules.items()}
        self.n_layers = space.n_layers if influence else 0
        self.size = sum(1 + 2 * d for d in self.widths.values()) + 2 * len(COARSE_KINDS) * self.n_layers

    def pack(self, p: _Partial) -> torch.Tensor:
        row = torch.zeros(self.size, dtype=ACC_DTYPE)
        pos = 0
        for key, d in self.widths.items():
            m = p.moments[key]
            if m.count:
                row[pos], row[pos + 1 : pos + 1 + d], row[pos + 1 + d : pos + 1 + 2 * d] = (
                    m.count,
                    m.mean,
                    m.m2,
                )
            pos += 1 + 2 * d
        for acc in p.influence or ():
            for k in COARSE_KINDS:
                row[pos], row[pos + 1] = acc[k].total, acc[k].count
                pos += 2
        return row

    def unpack(self, row: torch.Tensor) -> _Partial:
        moments, pos = {}, 0
        for key, d in self.widths.items():
            count = int(row[pos])
            moments[key] = Moments(count, row[pos + 1 : pos + 1 + d], row[pos + 1 + d : pos + 1 + 2 * d])
            pos += 1 + 2 * d
        influence = []
        for _ in range(self.n_layers):
            acc = {}
            for k in COARSE_KINDS:
                acc[k] = RunningMean(float(row[pos]), int(row[pos + 1]))
                pos += 2
            influence.append(acc)
        return _Partial(moments, influence)

    def merge(self, partials: dict[int, _Partial], n_batches: int) -> _Partial:
        """Every batch's partials (gathered from all ranks), merged in batch order."""
        rows = torch.zeros(n_batches, self.size, dtype=ACC_DTYPE)
        for j, p in partials.items():
            rows[j] = self.pack(p)
        rows = distributed.gather_disjoint(rows, "calibration statistics")
        out = _Partial({key: Moments() for key in self.widths}, [
            {k: RunningMean() for k in COARSE_KINDS} for _ in range(self.n_layers)
        ])  # fmt: skip
        for j in range(n_batches):
            p = self.unpack(rows[j])
            for key, m in p.moments.items():
                out.moments[key].merge(m)
            for acc, batch in zip(out.influence, p.influence, strict=True):
                for k in COARSE_KINDS:
                    acc[k].merge(batch[k])
        return out


@contextmanager
def _maybe(flag: bool, factory):
    if not flag:
        yield None
        return
    with factory() as x:
        yield x


def _column_scores(
    module: nn.Module | None, moments: Moments | None, column_score, geometry=None
) -> torch.Tensor:
    """`column_score` of one output projection's input columns (a GQA group's mean when `geometry` is
    given), on CPU; the weight read where it lives (loaded for a moment when offloaded)."""
    if module is None:
        return torch.zeros(0)
    with onloaded(module):
        w = module.weight
        scores = column_score(w, moments.to(w.device))
    scores = group_reduce(scores, geometry) if geometry is not None else scores
    return scores.float().cpu()


# -- assembling per-unit scores ----------------------------------------------------------------------
def with_block_scores(
    groups: list[torch.Tensor], channels: list[torch.Tensor], space: UnitSpace
) -> dict[str, list[torch.Tensor]]:
    """Fine scores plus coarse ones derived from them, on the same per-parameter scale.

    A block's score is the mean of its units' scores (its units all cost the same); a layer's is the
    cost-weighted mean of its two blocks, i.e. the mean per parameter. Methods with a real block metric
    (block influence) do not use this.
    """
    attn_b, mlp_b, layer_b = [], [], []
    for g, c, lu in zip(groups, channels, space.layers, strict=True):
        a = g.float().mean().reshape(1) if g.numel() else torch.zeros(1)
        m = c.float().mean().reshape(1) if c.numel() else torch.zeros(1)
        wa, wm = lu.n_groups * lu.group_cost, lu.n_channels * lu.channel_cost
        attn_b.append(a)
        mlp_b.append(m)
        layer_b.append((a * wa + m * wm) / max(wa + wm, 1))
    return {
        Kind.ATTN_GROUP: [g.float() for g in groups],
        Kind.MLP_CHANNEL: [c.float() for c in channels],
        Kind.ATTN_BLOCK: attn_b,
        Kind.MLP_BLOCK: mlp_b,
        Kind.LAYER: layer_b,
    }


def output_column_scores(
    model: nn.Module, space: UnitSpace, stats: ActivationStats, column_score
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-unit scores from a score per input column of each layer's output projections.

    `column_score(weight, moments) -> [in]` scores `o_proj`'s and `down_proj`'s input columns (where a
    unit's contribution enters the residual stream); a GQA group takes the mean over its query
    dimensions, an MLP channel its own column. Returns (groups, channels) per layer, empty where absent.
    """
    a = space.adapter
    groups, channels = [], []
    for i, (layer, lu) in enumerate(zip(a.decoder_layers(model), space.layers, strict=True)):
        o, down = (
            a.o_proj(layer) if lu.n_groups else None,
            a.down_proj(layer) if lu.n_channels else None,
        )
        groups.append(_column_scores(o, stats.attn[i], column_score, lu.geometry))
        channels.append(_column_scores(down, stats.mlp[i], column_score))
    return groups, channels
