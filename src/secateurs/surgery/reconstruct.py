"""Repair after removal: refit each pruned layer's output projections by least squares, layer by layer.

Why: removing heads and channels leaves the kept columns of `o_proj` / `down_proj` weighted for a
world where the removed ones still contributed. A closed-form refit of those two matrices over the
kept inputs (ZipLM, OSSCAR, SlimGPT, Tyr-the-Pruner, ...) recovers much of the loss, with forward passes
only.

The loop (SparseGPT's "layer-wise calibration"), on the dense model, in model order:

1. `H` = the calibration hidden states at the input of layer l, produced by layers 0..l-1 already
   pruned and repaired (captured once at layer 0, then advanced layer by layer; one layer's activations
   and `H` are all that live at a time).
2. Run layer l's dense attention on `H`, streaming the Gram matrix of `o_proj`'s input (all head
   dimensions, with a ones column) in float64. The target is the dense `o_proj`'s output on these
   (pruned-stream) inputs: fitting to the dense model's own stream overfits (measured by the issue's
   reference run), so the target is what the unpruned module would output on the pruned model's inputs.
   Since the target is `X W^T + b` with X the very inputs, the Gram matrix alone gives every normal
   equation and every error: no target is stored.
3. Slice the attention as the plan says and solve, over the kept columns K,
   `min ||Y - X_K W'^T - b'||^2 + lambda ||W' - P||^2` (b' = b unless `intercept`; P = 0 for plain
   ridge, or the kept weights W_K, see `PRIORS`), with lambda chosen on held-out calibration windows
   from `lambdas` x the mean diagonal of the kept Gram block (and, toward W_K, lambda = inf: no refit).
4. Run the repaired attention, stream the Gram matrix of `down_proj`'s input, slice the MLP and solve
   the same way; then advance `H` through the repaired layer.

`mode="bias"` is FLAP's mean compensation in the same loop: the kept weights stay, and the output bias
absorbs the removed columns' mean contribution, `W[:, removed] @ mean(X[removed])`, with means from the
pruned model's own stream. `mode="none"` is plain surgery. Whole removed blocks need no refit; a block
that keeps everything is untouched.

Memory: one layer's Gram matrices (1537^2 float64 for SmolLM2's MLP) and `H` ([N, T, hidden]) on the
model's device, never a copy of the model. A model spread over devices with offloaded layers
(`--device-map`) is repaired the same way, one layer resident on its execution device at a time
(`models.placement.editable`), each layer going back to CPU memory or disk once repaired. Cost: three passes of each layer over the calibration windows
(dense attention, repaired attention + dense MLP, the repaired layer), about three forwards, plus the
solves.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from secateurs.errors import ConfigError
from secateurs.models.adapters import adapter_for
from secateurs.models.placement import editable, input_device
from secateurs.progress import progress
from secateurs.surgery.apply import finish_surgery_, head_rows, prune_attention_, prune_mlp_, start_surgery
from secateurs.surgery.reselect import keep_by_obs
from secateurs.units.plan import LayerPlan, Plan
from secateurs.units.space import Kind, UnitSpace

log = logging.getLogger(__name__)

MODES = ("none", "bias", "lstsq")
# What the ridge pulls the refit toward. "zero": plain ridge, `lambda ||W'||^2`. "kept": the kept
# weights as they are, `lambda ||W' - W_K||^2`, so a strong ridge means "leave the layer alone" and the
# held-out windows choose, per module, anywhere between the full refit and plain slicing (which is
# also scored, as lambda = inf). Why: with 32 x 128 calibration tokens the refit helps at 50% but
# lost to no refit at 20% for some methods (README), where the kept weights are already good.
PRIORS = ("zero", "kept")
# Which units of a layer the repair keeps. "plan": the method's. "obs": as many as the plan keeps, chosen
# by the refit's own error (structured OBS on the Gram matrix, `surgery.reselect`). Measured (README,
# held-out perplexity, plan -> obs): wanda-sp 20% seeds 0/1/2 41.14 -> 39.62, 40.87 -> 39.18, 39.95 ->
# 39.81; flap 20% seed 0 45.06 -> 40.77; policy gradient 50% seed 0 154.66 -> 107.96. Cost: the repair
# takes about 1.2-1.9x as long.
SELECTS = ("plan", "obs")
# Ridge strengths tried, relative to the mean diagonal of the kept inputs' Gram matrix; the held-out
# windows choose. 0 is plain least squares (fine when tokens >> kept columns). With the default 32 x 128
# calibration tokens against up to 1,536 unknowns per row of SmolLM2's down projection, held-out error
# chose 0.1, the top of an earlier 0..0.1 grid, in most layers; toward the kept weights (the default
# prior) it chose 1 in most modules and 3, then the top, in 5-8 of 30 (wanda-sp 20%, 3 seeds): hence 10.
LAMBDAS = (0.0, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
HOLDOUT = 0.25  # share of calibration windows that choose lambda (the fit then uses every window)
MIN_BATCHES = 4  # batches of windows in the repair's passes; the held-out share is whole batches
GRAM_DTYPE = torch.float64  # sums of ~1e5-1e6 outer products: float32 loses the small eigenvalues
MIN_ENERGY = 1e-30  # relative errors of a module whose outputs are all zero stay finite
SOLVE_JITTER = 1e-10  # x mean diagonal, so that lambda = 0 on a rank-deficient Gram block still solves
# The repair's own calibration by default: 128 windows of 256 tokens (32,768 tokens, about 21 per unknown
# of SmolLM2's widest row), or the method's windows where those are larger. Measured (README): wanda-sp at
# 50%, seeds 0/1/2, held-out perplexity 151.8 / 152.0 / 147.2 against 204.5 / 209.3 / 181.6 with the
# method's 32 x 128; the cost is about 4 minutes instead of 0.5 on 2 cores for the default model.
REPAIR_WINDOWS = 128
REPAIR_SEQ_LEN = 256


@dataclass
class ReconstructConfig:
    """How pruned layers are repaired (see the module docstring). Field names carry the `reconstruct`
    prefix because they are CLI options beside every method's own (`--reconstruct-nsamples`)."""

    reconstruct: str = field(
        default="lstsq",
        metadata={"help": "repair after removal: none | bias (FLAP's mean compensation) | lstsq"},
    )
    reconstruct_intercept: bool = field(
        default=False, metadata={"help": "lstsq also fits an output bias (budgeted before selection)"}
    )
    reconstruct_nsamples: int = field(
        default=0,
        metadata={
            "help": f"calibration windows of the repair (0: {REPAIR_WINDOWS}, or --nsamples if larger; "
            "fewer where the text is short)"
        },
    )
    reconstruct_seq_len: int = field(
        default=0,
        metadata={
            "help": f"their length (0: {REPAIR_SEQ_LEN} within the model's context, or --seq-len if longer)"
        },
    )
    reconstruct_toward: str = field(
        default="kept",
        metadata={"help": "what the ridge pulls toward: zero | kept (the sliced weights; inf = no refit)"},
    )
    reconstruct_lambdas: tuple[float, ...] = field(
        default=LAMBDAS, metadata={"help": "ridge strengths tried, x mean diagonal of the Gram block"}
    )
    reconstruct_holdout: float = field(
        default=HOLDOUT, metadata={"help": "share of windows that choose lambda"}
    )
    reconstruct_select: str = field(
        default="obs",
        metadata={
            "help": "which units each layer keeps: plan (the method's) | obs (the plan's counts, the "
            "units the lstsq refit misses least; with bias or none, the plan's)"
        },
    )

    def __post_init__(self) -> None:
        if self.reconstruct not in MODES:
            raise ConfigError(f"reconstruct must be one of {', '.join(MODES)}, got {self.reconstruct!r}")
        if self.reconstruct_select not in SELECTS:
            raise ConfigError(
                f"reconstruct select must be one of {', '.join(SELECTS)}, got {self.reconstruct_select!r}"
            )
        if self.reconstruct_toward not in PRIORS:
            raise ConfigError(
                f"reconstruct toward must be one of {', '.join(PRIORS)}, got {self.reconstruct_toward!r}"
            )
        if isinstance(self.reconstruct_lambdas, str):
            self.reconstruct_lambdas = tuple(
                float(x) for x in self.reconstruct_lambdas.split(",") if x.strip()
            )
        self.reconstruct_lambdas = tuple(float(x) for x in self.reconstruct_lambdas)
        if not self.reconstruct_lambdas or any(
            not (x >= 0 and math.isfinite(x)) for x in self.reconstruct_lambdas
        ):
            raise ConfigError(f"reconstruct lambdas must be finite and >= 0, got {self.reconstruct_lambdas}")
        if not 0 < self.reconstruct_holdout < 1:
            raise ConfigError(f"reconstruct holdout must be in (0, 1), got {self.reconstruct_holdout}")
        if (
            self.reconstruct_nsamples in (1,)
            or self.reconstruct_nsamples < 0
            or self.reconstruct_seq_len in (1,)
            or self.reconstruct_seq_len < 0
        ):
            raise ConfigError("reconstruct needs at least 2 windows of at least 2 tokens (0: the default)")

    @property
    def mode(self) -> str:
        return self.reconstruct

    @property
    def intercept(self) -> bool:
        return self.reconstruct_intercept

    @property
    def toward(self) -> str:
        return self.reconstruct_toward

    @property
    def lambdas(self) -> tuple[float, ...]:
        return self.reconstruct_lambdas

    @property
    def holdout(self) -> float:
        return self.reconstruct_holdout

    @property
    def select(self) -> str:
        """The selection in effect: OBS's error is the least-squares refit's, so `bias` (FLAP's own
        repair, on FLAP's own units) and `none` keep the plan's units."""
        return self.reconstruct_select if self.mode == "lstsq" else "plan"

    @property
    def adds_biases(self) -> bool:
        """Whether repaired modules may gain an output bias (which the parameter budget must pay for)."""
        return self.mode == "bias" or (self.mode == "lstsq" and self.intercept)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def bias_budget(space: UnitSpace, units: tuple[str, ...]) -> int:
    """Parameters a repair that adds output biases may add at most: one bias per block without one that
    the units can prune partly (GQA groups for attention, channels for MLPs; whole layers and blocks
    leave nothing to compensate). A method asked to remove this much more still meets its target."""
    attn, mlp = Kind.ATTN_GROUP in units, Kind.MLP_CHANNEL in units
    return sum(
        space.hidden_size * ((attn and lu.attn_fixed == 0) + (mlp and lu.mlp_fixed == 0))
        for lu in space.layers
    )


# -- plain tensor maths ------------------------------------------------------------------------------
class Gram:
    """Streamed `sum x~ x~^T` of rows `x~ = [x, 1]` in float64: all a least-squares refit needs."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.g = torch.zeros(dim + 1, dim + 1, dtype=GRAM_DTYPE, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(GRAM_DTYPE)
        xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=GRAM_DTYPE, device=x.device)], dim=1)
        self.g += xa.T @ xa

    def __add__(self, other: Gram) -> Gram:
        out = Gram(self.g.shape[0] - 1, self.g.device)
        out.g = self.g + other.g
        return out

    @property
    def count(self) -> float:
        return float(self.g[-1, -1])


def augmented(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[out, in + 1]: the weight with its bias (or zeros) as the last column, float64."""
    w = weight.detach().to(GRAM_DTYPE)
    b = torch.zeros(w.shape[0], dtype=GRAM_DTYPE, device=w.device) if bias is None else bias.detach().to(w)
    return torch.cat([w, b[:, None]], dim=1)


def embed(new: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """[out, |keep| + 1] (kept columns, then the bias) -> [out, dim + 1], zeros in removed columns."""
    out = torch.zeros(new.shape[0], dim + 1, dtype=new.dtype, device=new.device)
    out[:, keep] = new[:, :-1]
    out[:, -1] = new[:, -1]
    return out


def sq_error(gram: torch.Tensor, full: torch.Tensor, new: torch.Tensor) -> float:
    """`sum ||x~ full^T - x~ new^T||^2` over the rows behind `gram` (both [out, dim + 1])."""
    d = full - new
    return float(torch.einsum("oi,ij,oj->", d, gram, d))


def solve(
    gram: torch.Tensor,
    full: torch.Tensor,
    keep: torch.Tensor,
    lam: float,
    intercept: bool,
    toward_kept: bool = False,
) -> torch.Tensor:
    """Least squares over the kept columns: the [out, |keep| + 1] weights (and bias) closest to `full`'s
    outputs on the rows behind `gram`, with ridge `lam` (absolute) on the weights, never the bias: on
    `||W'||^2`, or on `||W' - W_K||^2` when `toward_kept` (see `PRIORS`).

    Without `intercept` the bias stays `full`'s (the module's own, or none); with it, it is fitted too.
    """
    dim = gram.shape[0] - 1
    ones = torch.tensor([dim], device=keep.device)
    free = torch.cat([keep, ones]) if intercept else keep
    target = full.clone()
    if not intercept:
        target[:, -1] = 0  # the kept bias is fixed: fit what remains after it
    # normal equations: B_F (G_FF + L) = (full - fixed) G_:F, with `fixed` = the bias column if not free
    rhs = target @ gram[:, free]
    a = gram[free][:, free].clone()
    n_weights = keep.numel()
    scale = float(a.diagonal()[:n_weights].mean()) if n_weights else 1.0
    a.diagonal()[:n_weights] += lam + SOLVE_JITTER * scale
    if toward_kept:
        rhs[:, :n_weights] += lam * full[:, keep]
    b_free = torch.linalg.solve(a, rhs.T).T
    out = torch.empty(full.shape[0], n_weights + 1, dtype=full.dtype, device=full.device)
    out[:, :n_weights] = b_free[:, :n_weights]
    out[:, -1] = b_free[:, -1] if intercept else full[:, -1]
    return out


def mean_compensation(gram: torch.Tensor, full: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """FLAP's repair: kept weights unchanged, bias += W[:, removed] @ mean(x[removed])."""
    dim = gram.shape[0] - 1
    mean = gram[:dim, -1] / gram[-1, -1]
    removed = torch.ones(dim, dtype=torch.bool, device=keep.device)
    removed[keep] = False
    out = torch.cat([full[:, keep], full[:, -1:]], dim=1)
    out[:, -1] += full[:, :dim][:, removed] @ mean[removed]
    return out


@dataclass
class Fit:
    """One module's repair: new weights (and bias) over the kept columns, and what it bought."""

    new: torch.Tensor  # [out, |keep| + 1], float64
    lam: float  # relative ridge strength chosen (nan for the bias mode, inf: no refit)
    error_before: float  # relative squared error of the plainly sliced module (all calibration rows)
    error_after: float  # the same for the repaired module (in-sample)
    heldout_after: float  # held-out relative error of the chosen lambda (nan for the bias mode)

    def record(self) -> dict[str, float | None]:
        def r(x: float) -> float | None:
            return None if not math.isfinite(x) else float(f"{x:.5g}")

        return {
            "lambda": r(self.lam),
            "refit": not math.isinf(self.lam),  # False: held-out windows preferred the sliced weights
            "error_before": r(self.error_before),
            "error_after": r(self.error_after),
            "heldout_error": r(self.heldout_after),
        }


def fit_module(
    fit_gram: Gram, held_gram: Gram, full: torch.Tensor, keep: torch.Tensor, cfg: ReconstructConfig
) -> Fit:
    """Choose lambda on the held-out Gram matrix, refit on all rows, and measure before/after."""
    everything = (fit_gram + held_gram).g
    dim = everything.shape[0] - 1
    energy = max(sq_error(everything, full, torch.zeros_like(full)), MIN_ENERGY)
    plain = torch.cat([full[:, keep], full[:, -1:]], dim=1)
    before = sq_error(everything, full, embed(plain, keep, dim)) / energy
    if cfg.mode == "bias":
        new = mean_compensation(everything, full, keep)
        return Fit(
            new, math.nan, before, sq_error(everything, full, embed(new, keep, dim)) / energy, math.nan
        )
    scale = float(fit_gram.g.diagonal()[keep].mean()) if keep.numel() else 1.0
    held_energy = max(sq_error(held_gram.g, full, torch.zeros_like(full)), MIN_ENERGY)
    toward_kept = cfg.toward == "kept"
    scores = {}
    for lam in cfg.lambdas:
        trial = solve(fit_gram.g, full, keep, lam * scale, cfg.intercept, toward_kept)
        scores[lam] = sq_error(held_gram.g, full, embed(trial, keep, dim)) / held_energy
    if toward_kept:  # the limit of an infinite ridge toward the kept weights: no refit at all
        scores[math.inf] = sq_error(held_gram.g, full, embed(plain, keep, dim)) / held_energy
    lam = min(scores, key=lambda x: (scores[x], -x))  # ties: the stronger ridge
    if math.isinf(lam):
        return Fit(plain, lam, before, before, scores[lam])
    strength = lam * float(everything.diagonal()[keep].mean())
    new = solve(everything, full, keep, strength, cfg.intercept, toward_kept)
    return Fit(new, lam, before, sq_error(everything, full, embed(new, keep, dim)) / energy, scores[lam])


# -- the layer-wise loop -----------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by the capture hook: the decoder's work past the first layers is not needed."""


def capture_inputs(
    model: nn.Module, windows: torch.Tensor, batch_rows: int
) -> tuple[list[torch.Tensor], list[dict]]:
    """The hidden states entering layer 0 and the keyword arguments (masks, rotary embeddings) the
    decoder passes to each layer, per batch of windows.

    Layers of different `layer_types` get different masks, so the kwargs are captured at the first layer
    of each type (the decoder runs up to the last such layer once); later layers reuse their type's.
    """
    a = adapter_for(model)
    layers = a.decoder_layers(model)
    types = list(getattr(model.config, "layer_types", None) or ["all"] * len(layers))
    first = {t: types.index(t) for t in dict.fromkeys(types)}
    last = max(first.values())
    device = input_device(model)
    hidden, kwargs = [], []
    for s in range(0, windows.shape[0], batch_rows):
        seen: dict[str, dict] = {}
        handles = []

        def make(t, i, seen=seen):
            def hook(_m, args, kw):
                if i == 0:
                    hidden.append(args[0] if args else kw["hidden_states"])
                seen[t] = {k: v for k, v in kw.items() if k != "hidden_states"}
                if i == last:
                    raise _Stop

            return hook

        try:
            for t, i in first.items():
                handles.append(layers[i].register_forward_pre_hook(make(t, i), with_kwargs=True))
            with torch.inference_mode():
                model.get_decoder()(input_ids=windows[s : s + batch_rows].to(device), use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        kwargs.append({i: seen[t] for i, t in enumerate(types)})
    return hidden, kwargs


@contextmanager
def _inputs_of(module: nn.Module, grams: list[Gram]) -> Iterator[None]:
    """While inside, each forward of `module` adds its input to `grams[0]`, the batch's Gram (set by the
    caller before each batch)."""

    def hook(_m, args):
        grams[0].update(args[0])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_layer(
    layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], i: int, on_batch=None
) -> list[torch.Tensor]:
    """Layer `i`'s outputs for each batch of `capture_inputs`' hidden states (`on_batch(b)` first)."""
    out = []
    for b, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
        if on_batch is not None:
            on_batch(b)
        y = layer(h, **kw[i])
        out.append(y[0] if isinstance(y, tuple) else y)
    return out


def _collect(layer, module, hidden, kwargs, i, held: set[int]) -> tuple[Gram, Gram]:
    """Gram matrices of `module`'s input over the fit and held-out batches, from one pass of `layer`."""
    dim = module.in_features
    fit, ho = Gram(dim, module.weight.device), Gram(dim, module.weight.device)
    current: list[Gram] = [fit]

    def choose(b):
        current[0] = ho if b in held else fit

    with torch.inference_mode(), _inputs_of(module, current):
        run_layer(layer, hidden, kwargs, i, choose)
    return fit, ho


def _set_linear_(linear: nn.Linear, new: torch.Tensor, with_bias: bool) -> nn.Linear:
    """A fresh Linear with weights `new[:, :-1]` (and bias `new[:, -1]` when `with_bias`)."""
    w = linear.weight
    out = nn.Linear(new.shape[1] - 1, new.shape[0], bias=with_bias, device=w.device, dtype=w.dtype)
    out.weight.data.copy_(new[:, :-1].to(w.dtype))
    if with_bias:
        out.bias.data.copy_(new[:, -1].to(w.dtype))
    return out


def reconstruct_(
    model: nn.Module,
    plan: Plan,
    calib: torch.Tensor,
    config: ReconstructConfig | None = None,
    batch_rows: int = 8,
) -> dict[str, Any]:
    """Apply `plan` to the dense `model` in place, repairing each pruned layer as it goes (see the module
    docstring); returns the per-layer record (lambda, relative errors before/after) for plan.json.

    `calib` [N, T] are the repair's own calibration windows (`--reconstruct-nsamples/-seq-len`). The
    model must be the dense one the plan was made for: its layers' unpruned weights are read in place,
    one layer at a time, before that layer is sliced, so no copy of the model is made.
    """
    cfg = config or ReconstructConfig()
    space, plan = start_surgery(model, plan)
    a = space.adapter
    if cfg.mode == "none":
        from secateurs.surgery.apply import apply_plan_

        apply_plan_(model, plan)
        return {"mode": "none", "plan": plan}
    plan = _without_biases(plan)  # the repair replaces a method's own corrections
    if calib.shape[0] < 2:
        raise ConfigError("reconstruction needs at least 2 calibration windows (some are held out)")
    batch_rows = min(batch_rows, calib.shape[0] // min(MIN_BATCHES, calib.shape[0]))  # batches to hold out
    n_batches = math.ceil(calib.shape[0] / batch_rows)
    held = set(range(n_batches - max(1, round(cfg.holdout * n_batches)), n_batches))
    layers_record, applied = [], []
    hidden, kwargs = capture_inputs(model, calib, batch_rows)
    decoder = a.decoder_layers(model)
    # Passes run under inference_mode; the surgery between them under no_grad, so the new parameters
    # are ordinary tensors (inference tensors could not be used outside inference mode later).
    with torch.no_grad():
        for i in progress(range(space.n_layers), desc=f"reconstruct ({cfg.mode})", unit="layer"):
            with editable(model, decoder[i]):  # offloaded: this layer alone on the accelerator
                record, lp = _repair_layer_(
                    decoder[i], plan.layers[i], space.layers[i], a, hidden, kwargs, i, held, cfg
                )
                with torch.inference_mode():
                    hidden = run_layer(decoder[i], hidden, kwargs, i)
            layers_record.append({"layer": i, **record})
            applied.append(lp)
    plan = Plan(applied, plan.method, plan.settings, plan.seed, plan.info)
    finish_surgery_(model, plan, space)
    return {
        "mode": cfg.mode,
        "plan": plan,  # the plan applied: the method's, or with the units `select` chose
        "intercept": cfg.intercept,
        "windows": int(calib.shape[0]),
        "seq_len": int(calib.shape[1]),
        "heldout_batches": len(held),
        "layers": layers_record,
    }


def _without_biases(plan: Plan) -> Plan:
    layers = [LayerPlan(lp.keep_groups, lp.keep_channels, lp.drop_attn, lp.drop_mlp) for lp in plan.layers]
    return Plan(layers, plan.method, plan.settings, plan.seed, plan.info)


def _repair_layer_(
    layer, lp: LayerPlan, lu, a, hidden, kwargs, i, held, cfg
) -> tuple[dict[str, Any], LayerPlan]:
    """Attention first (its repaired output feeds the MLP's inputs), then the MLP. Returns the record
    and the layer's plan as applied (with the units `cfg.select` chose)."""
    record: dict[str, Any] = {}
    g = lu.geometry
    if lp.keep_groups is not None and not lp.drop_attn:
        o = a.o_proj(layer)
        fit, ho = _collect(layer, o, hidden, kwargs, i, held)
        full = augmented(o.weight, o.bias)
        per_group = g.q_per_kv * g.head_dim
        if cfg.select == "obs":
            chosen = keep_by_obs((fit + ho).g, full[:, :-1], len(lp.keep_groups), per_group)
            lp = dataclasses.replace(lp, keep_groups=chosen)
        keep = head_rows(lp.keep_groups, per_group, o.weight.device)
        result = fit_module(fit, ho, full, keep, cfg)
        prune_attention_(layer, lp, lu, a)
        attn = a.attention(layer)
        setattr(
            attn, a.o, _set_linear_(getattr(attn, a.o), result.new, o.bias is not None or cfg.adds_biases)
        )
        record["attn"] = result.record()
    else:
        prune_attention_(layer, lp, lu, a)
    if lp.keep_channels is not None and not lp.drop_mlp:
        down = a.down_proj(layer)
        fit, ho = _collect(layer, down, hidden, kwargs, i, held)
        full = augmented(down.weight, down.bias)
        if cfg.select == "obs":
            chosen = keep_by_obs((fit + ho).g, full[:, :-1], len(lp.keep_channels))
            lp = dataclasses.replace(lp, keep_channels=chosen)
        keep = torch.tensor(lp.keep_channels, device=down.weight.device)
        result = fit_module(fit, ho, full, keep, cfg)
        prune_mlp_(layer, lp, lu, a)
        mlp = a.mlp_module(layer)
        setattr(
            mlp,
            a.down,
            _set_linear_(getattr(mlp, a.down), result.new, down.bias is not None or cfg.adds_biases),
        )
        record["mlp"] = result.record()
    else:
        prune_mlp_(layer, lp, lu, a)
    return record, lp
