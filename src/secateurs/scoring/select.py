"""From per-unit scores to a plan that removes the target, exactly: plain tensor code, no model.

The rule every method shares: remove at least `ceil(sparsity * prunable)` parameters and overshoot by
less than the cheapest unit used. MLP channels are the cheapest unit, so they absorb the rounding.
"""

from __future__ import annotations

import math

import torch

from secateurs.errors import ConfigError
from secateurs.units.plan import LayerPlan, Plan
from secateurs.units.space import FINE_KINDS, Kind, UnitSpace

# Parameter counts are integers held in floats: sums of a few thousand costs round by far less than this,
# which keeps `ceil(0.5 * 1000)` at 500 and a budget hit exactly from counting as overshot.
COUNT_EPS = 1e-6
# Coarse kinds are chosen largest first: a whole layer before either of its blocks.
COARSE_ORDER = (Kind.LAYER, Kind.ATTN_BLOCK, Kind.MLP_BLOCK)


def target_params(space: UnitSpace, sparsity: float) -> int:
    return math.ceil(sparsity * space.total_cost - COUNT_EPS)


def check_reachable(
    space: UnitSpace, sparsity: float, allocation: str, units: tuple[str, ...], uniform_attention=False
) -> None:
    """Fail before any work, with `select`'s own message, when `units` cannot remove the target: a method
    that learns first (policy gradient, Bonsai) would otherwise fail later with a message about itself."""
    from secateurs.methods.base import UnitScores

    zeros = UnitScores({k: [torch.zeros(n) for n in space.n_units(k)] for k in FINE_KINDS + COARSE_ORDER})
    select(zeros, space, sparsity, allocation, units, uniform_attention=uniform_attention)


def select(
    scores,
    space: UnitSpace,
    sparsity: float,
    allocation: str,
    units: tuple[str, ...],
    target: int | None = None,
    uniform_attention: bool = False,
) -> Plan:
    """Keep the highest-scoring units so that `sparsity` of the prunable parameters go.

    `scores[kind][layer]` is a tensor of per-unit scores (higher = more important). Coarse kinds (whole
    layers or blocks) are chosen first, globally; fine kinds then take the rest of the budget. `target`
    (parameters to remove) overrides `sparsity` when a caller budgets in parameters, e.g. per kind.
    Units with score +inf are never dropped. `uniform_attention` with global allocation: GQA groups go
    in bundles of one per layer (see `_attention_bundles`), so every layer keeps as many as before
    relative to the others, while MLP channels are still chosen anywhere.
    """
    target = target_params(space, sparsity) if target is None else target
    drop: dict[str, list[torch.Tensor]] = {
        k: [torch.zeros(n, dtype=torch.bool) for n in space.n_units(k)] for k in FINE_KINDS + COARSE_ORDER
    }
    removed = _select_coarse(scores, space, target, units, drop)
    fine = [k for k in FINE_KINDS if k in units]
    if fine and removed < target:
        if allocation == "uniform":
            removed += _select_uniform(scores, space, target - removed, fine, drop)
        elif uniform_attention and Kind.ATTN_GROUP in fine:
            removed += _select_global_bundled(scores, space, target - removed, fine, drop)
        else:
            removed += _select_global(scores, space, target - removed, fine, drop)
    if removed < target:
        raise ConfigError(
            f"cannot remove {sparsity:.1%} of prunable parameters with units {','.join(units)}: "
            f"only {removed / space.total_cost:.1%} removable (a target that would remove every unit)"
        )
    return _to_plan(space, drop)


def _unit_table(scores, space: UnitSpace, kinds, drop) -> tuple[torch.Tensor, ...]:
    """Flat (score, cost, kind index, layer, unit) over units of `kinds` still available."""
    s, c, k, la, u = [], [], [], [], []
    for ki, kind in enumerate(kinds):
        costs = space.unit_costs(kind)
        for layer, n in enumerate(space.n_units(kind)):
            if n == 0 or _layer_gone(drop, kind, layer):
                continue
            avail = ~drop[kind][layer]  # units already dropped (uniform's first pass) are not offered again
            m = int(avail.sum())
            s.append(scores[kind][layer].float()[avail])
            c.append(torch.full((m,), costs[layer], dtype=torch.float64))
            k.append(torch.full((m,), ki))
            la.append(torch.full((m,), layer))
            u.append(torch.arange(n)[avail])
    if not s:
        return tuple(torch.zeros(0) for _ in range(5))
    return tuple(torch.cat(x) for x in (s, c, k, la, u))


def _layer_gone(drop, kind: str, layer: int) -> bool:
    """Whether the block holding `kind`'s units in `layer` is dropped. `.any()`: a block already removed
    from the model has an empty row (no unit), which is not a drop."""
    block = Kind.ATTN_BLOCK if kind == Kind.ATTN_GROUP else Kind.MLP_BLOCK
    return bool(drop[Kind.LAYER][layer].any() or drop[block][layer].any())


def _greedy(table, target: float, drop, kinds) -> float:
    """Drop lowest-score units while the budget allows; then the cheapest kind fills the last gap."""
    score, cost, kind, layer, unit = table
    if score.numel() == 0:
        return 0.0
    order = torch.argsort(score, stable=True)
    cum = torch.cumsum(cost[order], 0)
    n_take = int((cum <= target + COUNT_EPS).sum())
    taken = order[:n_take]
    removed = float(cum[n_take - 1]) if n_take else 0.0
    rest = order[n_take:]
    if removed < target and rest.numel():
        cheapest = cost[rest].min()
        fill = rest[cost[rest] == cheapest]  # in score order
        need = math.ceil((target - removed) / float(cheapest) - COUNT_EPS)
        fill = fill[:need]
        taken = torch.cat([taken, fill])
        removed += float(cost[fill].sum())
    for i in taken.tolist():
        drop[kinds[int(kind[i])]][int(layer[i])][int(unit[i])] = True
    return removed


def _select_coarse(scores, space, target, units, drop) -> float:
    coarse = [k for k in COARSE_ORDER if k in units]
    if not coarse:
        return 0.0
    missing = [k for k in coarse if k not in scores.scores]
    if missing:
        raise ConfigError(f"this method has no scores for unit kinds {missing}")
    table = _unit_table(scores, space, coarse, drop)
    has_fine = any(k in units for k in FINE_KINDS)
    score, cost, kind, layer, unit = table
    order = torch.argsort(score, stable=True)
    removed = 0.0
    for i in order.tolist():
        if removed >= target:
            break
        if has_fine and removed + float(cost[i]) > target:
            continue  # leave the remainder to finer units
        kname, li = coarse[int(kind[i])], int(layer[i])
        if _layer_gone(drop, Kind.ATTN_GROUP, li) and kname != Kind.MLP_BLOCK:
            continue
        if _layer_gone(drop, Kind.MLP_CHANNEL, li) and kname != Kind.ATTN_BLOCK:
            continue
        if kname != Kind.MLP_BLOCK and _would_remove_all_attention(drop, li, space):
            continue
        drop[kname][li][0] = True
        removed += float(cost[i])
    return removed


def _would_remove_all_attention(drop, li: int, space: UnitSpace) -> bool:
    alive = [
        i
        for i in range(space.n_layers)
        if space.layers[i].n_groups and not _layer_gone(drop, Kind.ATTN_GROUP, i)
    ]
    return alive == [li]


def _select_global(scores, space, budget, fine, drop) -> float:
    return _greedy(
        _unit_table(_keep_one_attention(scores, space, fine, drop), space, fine, drop), budget, drop, fine
    )


BUNDLE = "attn_bundle"  # a pseudo-kind in `_greedy`'s table: one GQA group from each layer at once


def _attention_bundles(scores, space: UnitSpace, drop) -> tuple[list[float], list[float], list[list]]:
    """(score, cost, members) of the bundles that lower the kept-groups count by one, level by level.

    Bundle j drops, from every layer that would otherwise keep more than `top - j - 1` groups, its
    lowest-scoring group left. Its score is its members' mean (scores are per-parameter comparable),
    made non-decreasing, so `_greedy` takes bundles in order; a layer's last group is never offered
    (a block goes whole, as a coarse unit).
    """
    kind = Kind.ATTN_GROUP
    costs = space.unit_costs(kind)
    ranked = {}
    for i, n in enumerate(space.n_units(kind)):
        if n and not _layer_gone(drop, kind, i):
            alive = (~drop[kind][i]).nonzero().flatten()
            order = torch.argsort(scores[kind][i].float()[alive], stable=True)
            ranked[i] = alive[order].tolist()
    out_s, out_c, members = [], [], []
    top = max((len(r) for r in ranked.values()), default=0)
    for level in range(top, 1, -1):  # kept count level -> level - 1
        group = [(i, r[len(r) - level]) for i, r in ranked.items() if len(r) >= level]
        mean = sum(float(scores[kind][i][u]) for i, u in group) / len(group)
        out_s.append(max(mean, out_s[-1]) if out_s else mean)
        out_c.append(float(sum(costs[i] for i, _ in group)))
        members.append(group)
    return out_s, out_c, members


def _select_global_bundled(scores, space, budget, fine, drop) -> float:
    """`_select_global` with GQA groups in `_attention_bundles`."""
    others = [k for k in fine if k != Kind.ATTN_GROUP]
    b_score, b_cost, members = _attention_bundles(scores, space, drop)
    table = _unit_table(scores, space, others, drop)
    n = len(members)
    bundled = (
        torch.tensor(b_score, dtype=torch.float32),
        torch.tensor(b_cost, dtype=torch.float64),
        torch.full((n,), len(others)),
        torch.zeros(n, dtype=torch.long),
        torch.arange(n),
    )
    merged = tuple(
        torch.cat([a.to(b.dtype), b]) if a.numel() else b for a, b in zip(table, bundled, strict=True)
    )
    drop[BUNDLE] = [torch.zeros(n, dtype=torch.bool)]
    removed = _greedy(merged, budget, drop, [*others, BUNDLE])
    for j in drop.pop(BUNDLE)[0].nonzero().flatten().tolist():
        for i, u in members[j]:
            drop[Kind.ATTN_GROUP][i][u] = True
    return removed


def _keep_one_attention(scores, space, fine, drop):
    """The highest-scoring attention group left is never offered: a global ranking can otherwise take
    every group (a model without attention is refused by `Plan.canonical`), e.g. a policy gradient on a
    model whose attention carries little."""
    kind = Kind.ATTN_GROUP
    if kind not in fine:
        return scores
    layers = [i for i, n in enumerate(space.n_units(kind)) if n and not _layer_gone(drop, kind, i)]
    if not layers:
        return scores
    masked = {i: scores[kind][i].float().masked_fill(drop[kind][i], -math.inf) for i in layers}
    best = max(layers, key=lambda i: float(masked[i].max()))
    if float(masked[best].max()) == -math.inf:
        return scores  # every group already dropped by an earlier pass
    groups = [t.float().clone() for t in scores[kind]]
    groups[best][int(masked[best].argmax())] = math.inf
    return _Replaced(scores, kind, groups)


class _Replaced:
    """`scores` (any `scores[kind]` mapping) with one kind's list replaced."""

    def __init__(self, scores, kind: str, value: list[torch.Tensor]):
        self.scores, self.kind, self.value = scores, kind, value

    def __getitem__(self, kind: str) -> list[torch.Tensor]:
        return self.value if kind == self.kind else self.scores[kind]


def _select_uniform(scores, space, budget, fine, drop) -> float:
    """Same count per layer for each kind; groups take their share, channels land the target."""
    removed = 0.0
    share = budget / max(1, sum(_available_cost(space, k, drop) for k in fine))
    for kind in fine:
        layers = [i for i, n in enumerate(space.n_units(kind)) if n and not _layer_gone(drop, kind, i)]
        if not layers:
            continue
        costs = space.unit_costs(kind)
        last = kind == fine[-1]
        want = (
            (budget - removed) if last else min(budget - removed, share * _available_cost(space, kind, drop))
        )
        # count per layer: floor for non-final kinds (never overshoot), then channels fill the remainder
        one_each = sum(costs[i] for i in layers)  # removing one unit of this kind in every layer
        count = _fit_count(kind, layers, costs, want, space) if last else int(want // one_each)
        for i in layers:
            n = space.n_units(kind)[i]
            k = min(count, n)
            idx = torch.argsort(scores[kind][i].float(), stable=True)[:k]
            drop[kind][i][idx] = True
            removed += k * costs[i]
        if last and removed < budget:
            removed += _top_up_one_per_layer(scores, space, kind, layers, budget - removed, drop)
    return removed


def _top_up_one_per_layer(scores, space, kind, layers, need, drop) -> float:
    """Per-layer +1 to land the target: the layers whose next unit scores lowest give one more each.

    `_fit_count` took the largest uniform count within the budget, so fewer than one more unit per
    layer is needed and counts differ by at most one across layers.
    """
    costs = space.unit_costs(kind)
    nxt = []
    for i in layers:
        alive = (~drop[kind][i]).nonzero().flatten()
        if alive.numel():
            j = int(alive[scores[kind][i][alive].float().argmin()])
            nxt.append((float(scores[kind][i][j]), i, j))
    removed = 0.0
    for _, i, j in sorted(nxt):
        if removed >= need:
            break
        drop[kind][i][j] = True
        removed += costs[i]
    return removed


def _fit_count(kind, layers, costs, want, space) -> int:
    """Largest uniform count whose removal stays within `want` (the rest is topped up one unit at a time)."""
    count = 0
    while (
        count < max(space.n_units(kind))
        and sum(min(count + 1, space.n_units(kind)[i]) * costs[i] for i in layers) <= want + COUNT_EPS
    ):
        count += 1
    return count


def _available_cost(space: UnitSpace, kind: str, drop) -> float:
    costs, counts = space.unit_costs(kind), space.n_units(kind)
    return float(sum(costs[i] * counts[i] for i in range(space.n_layers) if not _layer_gone(drop, kind, i)))


def _kept(drop_row: torch.Tensor) -> list[int]:
    return torch.nonzero(~drop_row).flatten().tolist()


def _to_plan(space: UnitSpace, drop) -> Plan:
    layers = []
    for i in range(space.n_layers):
        # .any(): a block already removed from the model has no unit (an empty row)
        gone_layer = bool(drop[Kind.LAYER][i].any())
        drop_attn = gone_layer or bool(drop[Kind.ATTN_BLOCK][i].any())
        drop_mlp = gone_layer or bool(drop[Kind.MLP_BLOCK][i].any())
        layers.append(
            LayerPlan(
                keep_groups=None if drop_attn else _kept(drop[Kind.ATTN_GROUP][i]),
                keep_channels=None if drop_mlp else _kept(drop[Kind.MLP_CHANNEL][i]),
                drop_attn=drop_attn,
                drop_mlp=drop_mlp,
            )
        )
    return Plan(layers).canonical(space)
