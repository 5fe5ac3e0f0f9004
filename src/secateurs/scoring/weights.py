"""Per-unit views of weight matrices: which rows and columns belong to which unit.

Plain tensor functions shared by the metric methods, so "a GQA group's weights" is defined once.
"""

from __future__ import annotations

import torch

from secateurs.models.adapters import LayerGeometry


def group_rows(t: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[n_groups * k, ...] -> [n_groups, k, ...]: a q/k/v weight (or o's transposed) split by group."""
    return t.reshape(n_groups, -1, *t.shape[1:])


def group_reduce(per_dim: torch.Tensor, g: LayerGeometry) -> torch.Tensor:
    """A per-query-dimension statistic [n_heads * head_dim] -> its mean per GQA group [n_groups]."""
    return per_dim.reshape(g.n_groups, -1).mean(dim=1)
