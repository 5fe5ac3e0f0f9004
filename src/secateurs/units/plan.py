"""Pruning plans: what to keep, as plain data.

A plan says, per decoder layer of the model it applies to, which GQA groups and MLP channels stay,
whether the attention or MLP block goes entirely, and optional output-bias corrections (FLAP-style
compensation). It is JSON-serialisable, validated against a `UnitSpace`, and never does surgery itself.
Plans compose, so iterative methods (Bonsai's rounds) can prune, slice, and continue, then report one
plan relative to the original model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from secateurs.errors import PlanError
from secateurs.units.space import UnitSpace


@dataclass
class LayerPlan:
    """One layer. `None` for groups/channels means "keep all"; a dropped block ignores its list."""

    keep_groups: list[int] | None = None
    keep_channels: list[int] | None = None
    drop_attn: bool = False
    drop_mlp: bool = False
    attn_bias: list[float] | None = None  # added to o_proj's output (hidden_size values)
    mlp_bias: list[float] | None = None  # added to down_proj's output

    @property
    def drops_layer(self) -> bool:
        return self.drop_attn and self.drop_mlp

    def groups(self, n: int) -> list[int]:
        return [] if self.drop_attn else (list(range(n)) if self.keep_groups is None else self.keep_groups)

    def channels(self, n: int) -> list[int]:
        return [] if self.drop_mlp else (list(range(n)) if self.keep_channels is None else self.keep_channels)


@dataclass
class Plan:
    """A whole-model plan plus the record of how it was made (method, settings, seed, figures)."""

    layers: list[LayerPlan]
    method: str = "manual"
    settings: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    info: dict[str, Any] = field(default_factory=dict)  # parameter counts, scores, probabilities, ...

    @classmethod
    def keep_all(cls, space: UnitSpace, **kw) -> Plan:
        return cls([LayerPlan() for _ in range(space.n_layers)], **kw)

    # -- validation ------------------------------------------------------------------------------
    def canonical(self, space: UnitSpace) -> Plan:
        """Validate against `space` and normalise: sorted unique indices, empty lists become dropped blocks.

        A block that keeps no units is the same as a dropped block only if it has no output bias; we
        define it as dropped, and masks do the same, so masked == pruned holds either way.
        """
        if len(self.layers) != space.n_layers:
            raise PlanError(f"plan has {len(self.layers)} layers but the model has {space.n_layers}")
        out = []
        for i, (lp, lu) in enumerate(zip(self.layers, space.layers, strict=True)):
            g = _check_indices(lp.groups(lu.n_groups), lu.n_groups, f"layer {i} attention groups")
            c = _check_indices(lp.channels(lu.n_channels), lu.n_channels, f"layer {i} MLP channels")
            for name, bias in (("attn_bias", lp.attn_bias), ("mlp_bias", lp.mlp_bias)):
                if bias is not None and len(bias) != space.hidden_size:
                    raise PlanError(f"layer {i} {name} has {len(bias)} values, expected {space.hidden_size}")
            drop_attn = not g
            drop_mlp = not c
            out.append(
                LayerPlan(
                    keep_groups=None if len(g) == lu.n_groups else g,
                    keep_channels=None if len(c) == lu.n_channels else c,
                    drop_attn=drop_attn,
                    drop_mlp=drop_mlp,
                    attn_bias=None if drop_attn else lp.attn_bias,
                    mlp_bias=None if drop_mlp else lp.mlp_bias,
                )
            )
        if all(lp.drop_attn for lp in out):
            raise PlanError("the plan removes every attention block; the model would not be a language model")
        return Plan(out, self.method, dict(self.settings), self.seed, dict(self.info))

    def kept_cost(self, space: UnitSpace) -> int:
        """Prunable parameters this plan keeps (corrections add biases, which are counted)."""
        return sum(
            lu.kept_cost(
                len(lp.groups(lu.n_groups)),
                len(lp.channels(lu.n_channels)),
                lp.attn_bias is not None,
                lp.mlp_bias is not None,
            )
            for lp, lu in zip(self.canonical(space).layers, space.layers, strict=True)
        )

    def removed_params(self, space: UnitSpace) -> int:
        """Prunable parameters this plan removes (what targets are checked against)."""
        return space.total_cost - self.kept_cost(space)

    def removed_fraction(self, space: UnitSpace) -> float:
        return 1.0 - self.kept_cost(space) / space.total_cost

    # -- composition -----------------------------------------------------------------------------
    def then(self, later: Plan, space: UnitSpace) -> Plan:
        """The single plan equal to applying `self` and then `later` (which indexes the smaller model)."""
        first = self.canonical(space)
        survivors = [i for i, lp in enumerate(first.layers) if not lp.drops_layer]
        if len(later.layers) != len(survivors):
            raise PlanError(f"later plan has {len(later.layers)} layers, {len(survivors)} survive the first")
        merged = [LayerPlan(drop_attn=True, drop_mlp=True) for _ in first.layers]
        for lp2, i in zip(later.layers, survivors, strict=True):
            lp1, lu = first.layers[i], space.layers[i]
            g1, c1 = lp1.groups(lu.n_groups), lp1.channels(lu.n_channels)
            g = [g1[j] for j in lp2.groups(len(g1))] if g1 else []
            c = [c1[j] for j in lp2.channels(len(c1))] if c1 else []
            merged[i] = LayerPlan(
                keep_groups=g,
                keep_channels=c,
                drop_attn=not g,
                drop_mlp=not c,
                attn_bias=_add(lp1.attn_bias, lp2.attn_bias),
                mlp_bias=_add(lp1.mlp_bias, lp2.mlp_bias),
            )
        info = {**self.info, **later.info}
        return Plan(merged, later.method, {**self.settings, **later.settings}, later.seed, info).canonical(
            space
        )

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "settings": self.settings,
            "seed": self.seed,
            "info": self.info,
            "layers": [asdict(lp) for lp in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        try:
            layers = [LayerPlan(**lp) for lp in d["layers"]]
        except (KeyError, TypeError) as e:
            raise PlanError(f"not a secateurs plan: {e}") from None
        for i, lp in enumerate(layers):
            _check_types(lp, i)
        return cls(layers, d.get("method", "manual"), d.get("settings", {}), d.get("seed"), d.get("info", {}))

    def save(self, path: str | Path) -> None:
        from secateurs.io import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"cannot read plan {path}: {e}") from None

    def shapes(self, space: UnitSpace) -> list[dict[str, int]]:
        """Per-layer kept counts, for reports."""
        canon = self.canonical(space)
        return [
            {"layer": i, "groups": len(lp.groups(lu.n_groups)), "channels": len(lp.channels(lu.n_channels))}
            for i, (lp, lu) in enumerate(zip(canon.layers, space.layers, strict=True))
        ]


def _is_list_of(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, list) and all(isinstance(v, types) and not isinstance(v, bool) for v in value)


def _check_types(lp: LayerPlan, i: int) -> None:
    """A hand-edited or damaged plan.json fails here with the field named, not deep inside surgery."""
    for name in ("keep_groups", "keep_channels"):
        value = getattr(lp, name)
        if value is not None and not _is_list_of(value, (int,)):
            raise PlanError(
                f"layer {i} {name} must be a list of unit indices or null (all), got {value!r:.40}"
            )
    for name in ("attn_bias", "mlp_bias"):
        value = getattr(lp, name)
        if value is not None and not _is_list_of(value, (int, float)):
            raise PlanError(f"layer {i} {name} must be a list of numbers or null, got {value!r:.40}")
    for name in ("drop_attn", "drop_mlp"):
        if not isinstance(getattr(lp, name), bool):
            raise PlanError(f"layer {i} {name} must be true or false, got {getattr(lp, name)!r:.40}")


def _check_indices(idx: list[int], n: int, what: str) -> list[int]:
    out = sorted(set(int(i) for i in idx))
    if len(out) != len(idx):
        raise PlanError(f"{what}: duplicate indices")
    if out and (out[0] < 0 or out[-1] >= n):
        raise PlanError(f"{what}: index out of range 0..{n - 1}")
    return out


def _add(a: list[float] | None, b: list[float] | None) -> list[float] | None:
    if a is None or b is None:
        return a if b is None else b
    return (torch.tensor(a) + torch.tensor(b)).tolist()
