"""Pictures of a run, drawn from what plan.json records (matplotlib, the optional `plots` extra).

Each picture reads a record only, never a model, so it can be redrawn from any plan.json:

* `shape.png`: per layer, the kept share of attention groups and of MLP channels; dropped blocks marked.
* `policy_gradient.png`: the policy gradient's loss and moving baseline over the steps
  (`info.training.curve`).
* `bonsai.png`: Bonsai's held-out rank correlation (Kendall tau) per round, against the prior's alone
  (`info.rounds`).
* `reconstruction.png`: the repair's relative error per layer, sliced and refit (`reconstruct.layers`).
* `compare.png`: held-out perplexity against the sparsity reached, one line per method (`secateurs compare`).

Figures are `matplotlib.figure.Figure` objects (no pyplot, no global state), rendered to PNG bytes and
written with `io.atomic_write`. Without matplotlib nothing is drawn and one line says how to get it.
"""

from __future__ import annotations

import importlib.util
import io
import logging
from pathlib import Path
from typing import Any

from secateurs.io import atomic_write

log = logging.getLogger(__name__)

PLOTS_PIP = 'pip install -e ".[plots]"'
DPI = 120  # about 1000 px wide at the sizes below: readable on a model page, small files
SHAPE, POLICY_GRADIENT, BONSAI, RECONSTRUCTION, COMPARE = (
    "shape.png", "policy_gradient.png", "bonsai.png", "reconstruction.png", "compare.png",
)  # fmt: skip
CAPTIONS = {
    SHAPE: "kept share of attention groups and MLP channels per layer",
    POLICY_GRADIENT: "policy gradient: loss and baseline over the steps",
    BONSAI: "Bonsai: held-out rank correlation of the importance estimate per round",
    RECONSTRUCTION: "repair: relative error per layer, sliced and refit",
    COMPARE: "held-out perplexity against sparsity, one line per method",
}


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def missing_note() -> str:
    return f"no pictures: matplotlib is not installed ({PLOTS_PIP})"


def _figure(width: float = 8.0, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig, fig.subplots()


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _write(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write(path, buffer.getvalue())


# -- one picture each ------------------------------------------------------------------------------
def shape_figure(record: dict[str, Any]):
    """Bars per layer: kept share of GQA groups and of MLP channels; "x" where a block was dropped."""
    kept, dense = record["report"]["shapes"], record["report"]["dense_shapes"]
    units = record["removed_units"]
    layers = [d["layer"] for d in dense]
    attn = [k["groups"] / d["groups"] if d["groups"] else 0.0 for k, d in zip(kept, dense, strict=True)]
    mlp = [k["channels"] / d["channels"] if d["channels"] else 0.0 for k, d in zip(kept, dense, strict=True)]
    fig, ax = _figure(max(6.0, 0.3 * len(layers) + 2), 3.8)
    w = 0.4
    ax.bar([x - w / 2 for x in layers], attn, w, label="attention groups kept", color="tab:blue")
    ax.bar([x + w / 2 for x in layers], mlp, w, label="MLP channels kept", color="tab:orange")
    blocks = ((-w / 2, "drop_attn", "tab:blue"), (w / 2, "drop_mlp", "tab:orange"))
    dropped = [(u["layer"] + dx, color) for u in units for dx, key, color in blocks if u[key]]
    for x, color in dropped:
        ax.plot(x, 0.03, marker="x", color=color, markersize=8, mew=2)
    if dropped:
        ax.plot([], [], "kx", label="block dropped")
    ax.set_xlabel("layer")
    ax.set_ylabel("kept share")
    ax.set_ylim(0, 1.25)  # room above the bars for the legend
    ax.set_xticks(layers)
    p = record["parameters"]
    ax.set_title(
        f"{record['method']}: {p['sparsity']:.1%} of attention + MLP removed ({p['total_removed_share']:.1%} of all)"
    )
    ax.legend(loc="upper center", ncol=3, fontsize="small")
    return fig


def policy_gradient_figure(curve: dict[str, list[float]]):
    fig, ax = _figure()
    ax.plot(curve["step"], curve["loss"], lw=0.8, alpha=0.6, label="mean loss of the step's samples")
    ax.plot(curve["step"], curve["baseline"], lw=2, label="moving baseline")
    ax.set_xlabel("step")
    _integer_ticks(ax)
    ax.set_ylabel("calibration loss (nats / token)")
    ax.set_title("policy gradient")
    ax.legend(fontsize="small")
    return fig


def bonsai_figure(rounds: list[dict[str, Any]]):
    fig, ax = _figure(6.0, 3.8)
    x = [r["round"] for r in rounds]
    for key, label in (("tau", "regression (chosen alpha)"), ("tau_prior", "prior alone")):
        y = [r.get(key) for r in rounds]
        ax.plot(x, [float("nan") if v is None else v for v in y], marker="o", label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out Kendall tau")
    ax.set_xticks(x)
    ax.set_title("Bonsai: held-out rank correlation of sub-model losses")
    ax.legend(fontsize="small")
    return fig


def reconstruction_figure(layers: list[dict[str, Any]]):
    fig, ax = _figure()
    for module, color in (("attn", "tab:blue"), ("mlp", "tab:orange")):
        rows = [(r["layer"], r[module]) for r in layers if r.get(module)]
        if not rows:
            continue
        x = [i for i, _ in rows]
        for key, style, what in (("error_before", "--", "sliced"), ("error_after", "-", "refit")):
            y = [float("nan") if m[key] is None else m[key] for _, m in rows]
            ax.plot(x, y, style, color=color, marker="o", ms=3, label=f"{module} {what}")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    _integer_ticks(ax)
    ax.set_ylabel("relative squared error")
    ax.set_title("repair: error of each module's output")
    ax.legend(fontsize="small", ncol=2)
    return fig


def compare_figure(rows: list[dict[str, Any]]):
    """One line per method (and swept setting), perplexity on a log axis; the dense model at 0."""
    fig, ax = _figure(7.0, 4.5)
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get("ppl") is None:
            continue
        swept = " ".join(f"{k}={v}" for k, v in (r.get("swept") or {}).items())
        lines.setdefault(f"{r['method']} {swept}".strip(), []).append((r["sparsity_attn_mlp"], r["ppl"]))
    for label, points in lines.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    dense = next((r["dense_ppl"] for r in rows if r.get("dense_ppl") is not None), None)
    if dense is not None:
        ax.axhline(dense, color="grey", ls="--", lw=1, label=f"dense ({dense:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("attention + MLP parameters removed")
    ax.xaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
    ax.set_ylabel("held-out perplexity")
    ax.legend(fontsize="small")
    return fig


# -- what a run writes -----------------------------------------------------------------------------
def figures_of(record: dict[str, Any]) -> dict[str, Any]:
    """The pictures a plan.json record has data for, by file name."""
    info = record.get("info") or {}
    out = {SHAPE: shape_figure(record)}
    curve = (info.get("training") or {}).get("curve")
    if curve and curve.get("step"):
        out[POLICY_GRADIENT] = policy_gradient_figure(curve)
    if info.get("rounds"):
        out[BONSAI] = bonsai_figure(info["rounds"])
    layers = (record.get("reconstruct") or {}).get("layers")
    if layers and any(r.get("attn") or r.get("mlp") for r in layers):
        out[RECONSTRUCTION] = reconstruction_figure(layers)
    return out


def write_plots(record: dict[str, Any], out: str | Path) -> list[Path]:
    """Every picture the record has data for, into `out`; none (and one log line) without matplotlib."""
    if not available():
        log.info(missing_note())
        return []
    return [_write(fig, Path(out) / name) for name, fig in figures_of(record).items()]


def write_compare_plot(rows: list[dict[str, Any]], out: str | Path) -> Path | None:
    if not available():
        log.info(missing_note())
        return None
    if not any(r.get("ppl") is not None for r in rows):
        return None
    return _write(compare_figure(rows), Path(out) / COMPARE)
