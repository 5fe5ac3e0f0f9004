"""Keep-masks applied to a live model by forward hooks on stock HF modules.

No weight is copied or edited and no modelling code is forked: a pre-hook on `o_proj` scales each
head's slice of its input, a pre-hook on `down_proj` scales `act(gate) * up`, and forward hooks add
bias corrections and scale the block's residual contribution. Every mask has a leading batch dimension,
so each row of an input batch can carry its own sub-model: many masks, one forward.

Norms as wide as the projections (OLMo 2's q/k norms, `FamilyAdapter.qk_norm`) average over every head,
so a pruned model's norm sees only the kept heads: their forward hook renormalises over the kept rows.

Masks may also carry refits (`Refits`): per layer and kept count, a weight change of `o_proj` /
`down_proj`'s kept input columns that a row keeping that many units gets added to its output,
`x[..., cols] @ delta.T`. That scores sub-models as a least-squares repair would leave them
(`scoring.refits`), still one forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from secateurs.errors import PlanError
from secateurs.models.placement import input_device, model_dtype, onloaded
from secateurs.units.plan import Plan
from secateurs.units.space import Kind, UnitSpace


@dataclass
class Refit:
    """A weight change of the kept input columns `cols` only, `delta` [out, len(cols)]: the removed
    columns' inputs are zero in a masked forward, so storing them would double the memory (at 50%) and
    the matmul for nothing."""

    cols: torch.Tensor  # long, sorted input columns of the module
    delta: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.delta.numel() * self.delta.element_size()


@dataclass
class Refits:
    """Per layer, kept count -> `Refit` of `o_proj` (attn) or `down_proj` (mlp), for the rows of a batch
    that keep that many GQA groups / MLP channels. A row whose count has no entry runs the plain
    weights. Shared by every row (never sliced with them); the deltas are right only for the units they
    were fitted on, so whoever fills the bank also sets those units in the masks."""

    attn: list[dict[int, Refit]]
    mlp: list[dict[int, Refit]]


@dataclass
class Masks:
    """Keep values per unit, one row per sub-model (`B` rows).

    `groups[l]`: [B, n_groups_l]; `channels[l]`: [B, n_channels_l]; `attn_block` / `mlp_block`: [B, L].
    Values are usually 0/1 but any float works (a block whose groups are all 0 counts as dropped, as in
    `Plan.canonical`). Bias corrections are [hidden] or [B, hidden] per layer, or None.
    """

    groups: list[torch.Tensor]
    channels: list[torch.Tensor]
    attn_block: torch.Tensor
    mlp_block: torch.Tensor
    attn_bias: list[torch.Tensor | None]
    mlp_bias: list[torch.Tensor | None]
    refits: Refits | None = None

    @property
    def batch(self) -> int:
        return self.attn_block.shape[0]

    @classmethod
    def ones(cls, space: UnitSpace, batch: int = 1) -> Masks:
        n_l = space.n_layers
        return cls(
            groups=[torch.ones(batch, n) for n in space.n_units(Kind.ATTN_GROUP)],
            channels=[torch.ones(batch, n) for n in space.n_units(Kind.MLP_CHANNEL)],
            attn_block=torch.ones(batch, n_l),
            mlp_block=torch.ones(batch, n_l),
            attn_bias=[None] * n_l,
            mlp_bias=[None] * n_l,
        )

    @classmethod
    def from_plan(cls, plan: Plan, space: UnitSpace) -> Masks:
        plan = plan.canonical(space)
        m = cls.ones(space, 1)
        for i, (lp, lu) in enumerate(zip(plan.layers, space.layers, strict=True)):
            m.groups[i] = _indicator(lp.groups(lu.n_groups), lu.n_groups)
            m.channels[i] = _indicator(lp.channels(lu.n_channels), lu.n_channels)
            m.attn_block[0, i] = float(not lp.drop_attn)
            m.mlp_block[0, i] = float(not lp.drop_mlp)
            m.attn_bias[i] = None if lp.attn_bias is None else torch.tensor(lp.attn_bias)
            m.mlp_bias[i] = None if lp.mlp_bias is None else torch.tensor(lp.mlp_bias)
        return m

    @classmethod
    def stack(cls, masks: list[Masks]) -> Masks:
        """Concatenate along the batch; bias corrections must be absent or equal for all."""

        def cat_bias(parts):
            if all(p is None for p in parts):
                return None
            if any(p is None for p in parts):
                raise ValueError("cannot stack masks where only some carry bias corrections")
            return torch.cat(
                [p.expand(m.batch, -1) if p.dim() == 1 else p for p, m in zip(parts, masks, strict=True)]
            )

        n_l = len(masks[0].groups)
        if any(m.refits is not masks[0].refits for m in masks):
            raise ValueError("cannot stack masks with different refits")
        return cls(
            groups=[torch.cat([m.groups[i] for m in masks]) for i in range(n_l)],
            channels=[torch.cat([m.channels[i] for m in masks]) for i in range(n_l)],
            attn_block=torch.cat([m.attn_block for m in masks]),
            mlp_block=torch.cat([m.mlp_block for m in masks]),
            attn_bias=[cat_bias([m.attn_bias[i] for m in masks]) for i in range(n_l)],
            mlp_bias=[cat_bias([m.mlp_bias[i] for m in masks]) for i in range(n_l)],
            refits=masks[0].refits,
        )

    def map(self, fn, per_row_only: bool = True) -> Masks:
        """Apply `fn` to every tensor; shared [hidden] corrections are left alone if `per_row_only`."""

        def f(t):
            if t is None or (per_row_only and t.dim() == 1):
                return t
            return fn(t)

        return Masks(
            groups=[f(t) for t in self.groups],
            channels=[f(t) for t in self.channels],
            attn_block=f(self.attn_block),
            mlp_block=f(self.mlp_block),
            attn_bias=[f(t) for t in self.attn_bias],
            mlp_bias=[f(t) for t in self.mlp_bias],
            refits=self.refits,
        )

    def repeat_interleave(self, n: int) -> Masks:
        """Each row repeated `n` times in place: row r serves input rows r*n .. r*n+n-1."""
        return self.map(lambda t: t.repeat_interleave(n, dim=0))

    def rows(self, start: int, end: int) -> Masks:
        """Rows start..end-1 (a micro-batch)."""
        return self.map(lambda t: t[start:end])

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Masks:
        return self.map(lambda t: t.to(device=device, dtype=dtype), per_row_only=False)


def _indicator(keep: list[int], n: int) -> torch.Tensor:
    t = torch.zeros(1, n)
    t[0, keep] = 1.0
    return t


def _rows(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """Match a [B, ...] mask to an input batch: equal size, or one mask for every row."""
    if mask.shape[0] == batch or mask.shape[0] == 1:
        return mask
    raise PlanError(f"masks have {mask.shape[0]} rows but the input batch has {batch}")


# The hooks move their masks to the input's device: with a device map, accelerate moves a module's inputs
# to its execution device only after these pre-hooks ran (`models.placement`). A no-op otherwise.


def _scale_input_hook(unit_mask: torch.Tensor, width: int):
    def hook(_module, args):
        (x,) = args
        m = _rows(unit_mask, x.shape[0]).to(x.device).repeat_interleave(width, dim=1)
        return (x * m.view(m.shape[0], *([1] * (x.dim() - 2)), m.shape[1]),)

    return hook


def _output_hook(
    block: torch.Tensor, bias: torch.Tensor | None, unit_mask: torch.Tensor, bank: dict[int, Refit]
):
    def hook(_module, args, out):
        if bank:
            out = out + _refit_rows(args[0], _rows(unit_mask, out.shape[0]), bank)
        if bias is not None:
            b = bias.to(out.device)
            out = out + (b if b.dim() == 1 else _rows(b, out.shape[0]).unsqueeze(1))
        b = _rows(block, out.shape[0]).to(out.device)
        return out * b.view(b.shape[0], *([1] * (out.dim() - 1)))

    return hook


def _refit_rows(x: torch.Tensor, unit_mask: torch.Tensor, bank: dict[int, Refit]) -> torch.Tensor:
    """Each row's `x[..., cols] @ delta.T` for the refit of its kept count (zero where the bank has
    none); `x` is the masked input the pre-hook made."""
    counts = (unit_mask != 0).sum(dim=1).expand(x.shape[0]).tolist()
    extra = None
    for count in sorted(set(counts)):
        refit = bank.get(count)
        if refit is None:
            continue
        rows = torch.tensor([r for r, c in enumerate(counts) if c == count], device=x.device)
        kept = x[rows].index_select(-1, refit.cols.to(x.device))
        part = kept @ refit.delta.to(device=x.device, dtype=x.dtype).T
        if extra is None:
            extra = torch.zeros(*x.shape[:-1], part.shape[-1], dtype=x.dtype, device=x.device)
        extra[rows] = part
    return 0 if extra is None else extra


def _full_width_norm_hook(unit_mask: torch.Tensor, width: int, eps_attr: str):
    """An RMS norm (`w * x / rms(x)`, in float32) over the kept entries only, as after slicing; rows that
    keep everything keep the module's own output bit for bit."""

    def hook(module, args, out):
        (x,) = args
        keep = (_rows(unit_mask, x.shape[0]) != 0).to(x.device).repeat_interleave(width, dim=1)
        if bool(keep.all()):
            return out
        keep = keep.view(keep.shape[0], *([1] * (x.dim() - 2)), keep.shape[1])
        xf, k = x.float(), keep.float()
        var = (xf.pow(2) * k).sum(-1, keepdim=True) / k.sum(-1, keepdim=True).clamp(min=1)
        with onloaded(module):  # an offloaded norm's weight is back on `meta` once its forward returned
            weight = module.weight.to(x.device)
        new = (weight * (xf * torch.rsqrt(var + getattr(module, eps_attr)))).to(x.dtype)
        return torch.where(keep.all(dim=-1, keepdim=True), out, new)

    return hook


@contextmanager
def masked(model: nn.Module, masks: Masks, space: UnitSpace | None = None) -> Iterator[nn.Module]:
    """Run `model` as the sub-model(s) described by `masks` inside the `with` block.

    Example::

        space = UnitSpace.from_model(model)
        m = Masks.ones(space, batch=2)
        m.groups[0][1, 0] = 0          # row 1 drops layer 0's first GQA group
        with torch.inference_mode(), masked(model, m, space):
            logits = model(input_ids).logits   # input_ids has 2 rows
    """
    space = space or UnitSpace.from_model(model)
    masks = masks.to(input_device(model), model_dtype(model))
    handles = []
    try:
        for i, (layer, lu) in enumerate(zip(space.adapter.decoder_layers(model), space.layers, strict=True)):
            g = lu.geometry
            if g.has_attn:
                o = space.adapter.o_proj(layer)
                gm = masks.groups[i]
                # A block whose groups are all masked counts as dropped (see Plan.canonical).
                block = masks.attn_block[:, i] * (gm.sum(dim=1) > 0).to(gm.dtype)
                handles.append(o.register_forward_pre_hook(_scale_input_hook(gm, g.q_per_kv * g.head_dim)))
                bank = masks.refits.attn[i] if masks.refits else {}
                handles.append(o.register_forward_hook(_output_hook(block, masks.attn_bias[i], gm, bank)))
                if space.adapter.full_width_qk_norm:
                    eps = space.adapter.qk_norm_eps
                    q_norm, k_norm = space.adapter.qk_norms(layer)
                    hook = _full_width_norm_hook(gm, g.q_per_kv * g.head_dim, eps)
                    handles.append(q_norm.register_forward_hook(hook))
                    handles.append(k_norm.register_forward_hook(_full_width_norm_hook(gm, g.head_dim, eps)))
            if g.has_mlp:
                down = space.adapter.down_proj(layer)
                cm = masks.channels[i]
                block = masks.mlp_block[:, i] * (cm.sum(dim=1) > 0).to(cm.dtype)
                handles.append(down.register_forward_pre_hook(_scale_input_hook(cm, 1)))
                bank = masks.refits.mlp[i] if masks.refits else {}
                handles.append(down.register_forward_hook(_output_hook(block, masks.mlp_bias[i], cm, bank)))
        yield model
    finally:
        for h in handles:
            h.remove()
