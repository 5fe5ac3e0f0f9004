"""Which units to keep inside a layer, chosen by the error the least-squares repair leaves.

Why: a method decides a layer's *shape* (how many GQA groups and MLP channels it keeps, which blocks
go) from losses or scores of unrepaired models, but the model that ships is the repaired one. Given
the Gram matrix `H = X^T X` of a projection's inputs (which the repair builds anyway), the cost of
removing a set S of input columns of `W` when the rest are refit by least squares is the structured
Optimal Brain Surgeon error `tr(W_S [H^-1]_SS^-1 W_S^T)` (ZipLM, SlimGPT, OSSCAR): it sees that two
correlated channels can stand in for one another, which a per-unit score (wanda-sp, FLAP) cannot.

The greedy below removes the cheapest blocks a few at a time, updating `H^-1` and the remaining
weights exactly for what was removed (the OBS update), until the layer's count is met. The counts stay
the method's; only the identities change.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from secateurs.errors import PlanError
from secateurs.surgery.apply import head_rows

# Ridge added to H before inverting, x its mean diagonal: SparseGPT's and ZipLM's 1% "dampening",
# which keeps near-singular Gram matrices (dead channels, few tokens) from ranking by noise.
DAMP = 0.01
# At most this many greedy steps per module: 1,536 MLP channels one at a time would cost 768 rank-1
# updates of a 1,536^2 inverse per layer at 50%; removing ceil(n / STEPS) blocks per step (jointly
# updated, exactly) keeps the choice close to one-at-a-time at a fraction of the cost.
STEPS = 64


def keep_by_obs(gram: torch.Tensor, weight: torch.Tensor, n_keep: int, block: int = 1) -> list[int]:
    """The `n_keep` blocks of `block` consecutive input columns of `weight` [out, d] to keep, chosen by
    greedy structured OBS on `gram` [d(+1), d(+1)] (a trailing ones column, as the repair's, is ignored:
    the bias is not refit). Returns sorted block indices."""
    n_blocks = _n_blocks(weight, block)
    if not 0 <= n_keep <= n_blocks:
        raise PlanError(f"cannot keep {n_keep} of {n_blocks} blocks")
    if n_keep in (0, n_blocks):
        return list(range(n_keep))
    gone = {b for chosen in _greedy(gram, weight, block, n_keep) for b in chosen}
    return [b for b in range(n_blocks) if b not in gone]


def obs_order(gram: torch.Tensor, weight: torch.Tensor, block: int = 1) -> list[int]:
    """Every block of `weight`, in the order greedy structured OBS removes them (cheapest first), so that
    the last `c` are the blocks it keeps at count `c`: nested sets for every count at the price of one
    greedy (steps of `ceil(n / STEPS)` blocks, so a prefix is close to, not always equal to,
    `keep_by_obs` at that count)."""
    n_blocks = _n_blocks(weight, block)
    order = [b for chosen in _greedy(gram, weight, block, 1) for b in chosen]
    return order + [b for b in range(n_blocks) if b not in set(order)]


def _n_blocks(weight: torch.Tensor, block: int) -> int:
    d = weight.shape[1]
    if d % block:
        raise PlanError(f"{d} input columns do not split into blocks of {block}")
    return d // block


def _greedy(gram: torch.Tensor, weight: torch.Tensor, block: int, n_keep: int) -> Iterator[list[int]]:
    """The blocks greedy OBS removes, step by step, until `n_keep` are left (0 < n_keep)."""
    d = weight.shape[1]
    alive = list(range(d // block))
    h = gram[:d, :d].to(torch.float64).clone()
    h.diagonal().add_(DAMP * float(h.diagonal().mean()) + 1e-12)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    w = weight.detach().to(torch.float64).clone()
    per_step = math.ceil((len(alive) - n_keep) / STEPS)
    while len(alive) > n_keep:
        costs = _costs(w, hinv, alive, block)
        take = min(per_step, len(alive) - n_keep)
        chosen = [alive[j] for j in torch.argsort(costs)[:take].tolist()]
        _remove_(w, hinv, head_rows(chosen, block, w.device))
        gone = set(chosen)
        alive = [b for b in alive if b not in gone]
        yield chosen


def _costs(w: torch.Tensor, hinv: torch.Tensor, alive: list[int], block: int) -> torch.Tensor:
    """OBS error of removing each alive block alone: `tr(W_S [H^-1]_SS^-1 W_S^T)`."""
    if block == 1:
        cols = torch.tensor(alive, device=w.device)
        return (w[:, cols] ** 2).sum(0) / hinv.diagonal()[cols]
    out = []
    for b in alive:
        s = slice(b * block, (b + 1) * block)
        ws = w[:, s]
        out.append(torch.trace(ws @ torch.linalg.solve(hinv[s, s], ws.T)))
    return torch.stack(out)


def _remove_(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> None:
    """Remove columns `cols` jointly: the remaining weights absorb them (`W -= W_S M^-1 H^-1_S:`) and
    `H^-1` becomes the inverse over the remaining columns (`H^-1 -= H^-1_:S M^-1 H^-1_S:`), M = H^-1_SS."""
    m = hinv[cols][:, cols]
    rows = hinv[cols]  # [|S|, d]
    w -= torch.linalg.solve(m, w[:, cols].T).T @ rows
    hinv -= rows.T @ torch.linalg.solve(m, rows)
    w[:, cols] = 0
    hinv[cols] = 0
    hinv[:, cols] = 0
    hinv[cols, cols] = 1  # keeps later solves over alive blocks well posed; removed columns never return
