"""How faithful is the repair bank, the proxy the policy gradient scores its samples with, to the repair
that ships?

The bank (`scoring.refits.RepairBank`) scores a sub-model as the OBS repair would leave its per-layer
counts, with refits fitted once on the dense model's stream. The repair that ships refits each layer on
the pruned model's own stream, with its ridge chosen on held-out windows. This script takes the shapes
(kept GQA groups and MLP channels per layer) of finished `secateurs compare` runs, whose held-out
perplexity after the real repair they record, and scores each shape with the bank built on that run's
data seed: on the search's calibration windows (what the policy gradient optimises) and on held-out
text. `--methods` adds a metric method's own shape at each target (its counts; the bank picks units).

    .venv/bin/python bench/proxy_fidelity.py RESULTS_DIR [RESULTS_DIR ...] [--methods wanda-sp]
        [--bank-windows search|repair] [--heldout 32]

`--bank-windows search` fits the refits on the search's 32 x 128 calibration windows (the policy
gradient before secateurs 0.2); `repair` on the repair's own windows (128 x 256 by default), as
`pipeline.search` now passes them. A proxy that ranks two shapes as the real column does is what a
search needs; the gap between its two columns shows how much its refits fit the calibration noise.
Prints what it measured; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from secateurs.eval.loss import SubmodelEvaluator
from secateurs.methods.base import get_method
from secateurs.models.loading import load_model
from secateurs.pipeline import (
    DataConfig,
    calibration_windows,
    evaluation_windows,
    make_plan,
    model_context,
    repair_windows,
)
from secateurs.scoring.refits import RepairBank
from secateurs.surgery.reconstruct import ReconstructConfig
from secateurs.units.masks import Masks
from secateurs.units.space import UnitSpace


def _row(label: str, target: float, seed: int, real: float, shapes: list[dict]) -> dict:
    return {
        "label": label,
        "target": target,
        "seed": seed,
        "real": real,
        "groups": [s["groups"] for s in shapes],
        "channels": [s["channels"] for s in shapes],
    }


def _rows(dirs: list[str]) -> list[dict]:
    """Every run of the given compare results, with its real (repaired) held-out perplexity."""
    out = []
    for d in dirs:
        for r in json.loads((Path(d) / "compare.json").read_text()):
            out.append(
                _row(r["method"], r["target"], int(r["settings"].get("seed", 0)), r["ppl"], r["shapes"])
            )
    return out


def _metric_rows(model, space, calib, methods, targets, seed) -> list[dict]:
    """A metric method's own shape at each target (its real figure is not measured here)."""
    rows = []
    for name in methods:
        for target in targets:
            plan = make_plan(model, name, get_method(name).config_class(sparsity=target, seed=seed), calib)
            rows.append(_row(name, target, seed, math.nan, plan.shapes(space)))
    return rows


def _masks(space: UnitSpace, rows: list[dict]) -> Masks:
    """One row per shape, keeping each layer's first counts (the bank re-picks units in OBS order)."""
    m = Masks.ones(space, len(rows))
    for k, row in enumerate(rows):
        for i in range(space.n_layers):
            m.groups[i][k] = (torch.arange(m.groups[i].shape[1]) < row["groups"][i]).float()
            m.channels[i][k] = (torch.arange(m.channels[i].shape[1]) < row["channels"][i]).float()
    return m


def _score_seed(model, tok, space, rows, seed, args) -> list[tuple[dict, float, float]]:
    """(row, proxy perplexity on the search's windows, held out) of each row and of the metric methods'
    shapes, with the bank of data seed `seed`."""
    data = DataConfig(
        calib=args.text, eval=args.text, seed=seed, nsamples=args.nsamples, seq_len=args.seq_len,
        eval_seq_len=args.eval_seq_len,
    )  # fmt: skip
    calib = calibration_windows(tok, data)
    held, _ = evaluation_windows(tok, data)
    rows = rows + _metric_rows(model, space, calib, args.methods, sorted({r["target"] for r in rows}), seed)
    fit = calib
    if args.bank_windows == "repair":
        fit = repair_windows(tok, data, ReconstructConfig(), model_context(model))
    counts = [sorted({r["channels"][i] for r in rows}) for i in range(space.n_layers)]
    bank = RepairBank.from_model(model, space, fit, counts)
    masks = bank.apply_(_masks(space, rows))
    found = []
    for windows in (calib, held[: args.heldout]):
        found.append(SubmodelEvaluator(model, windows, space=space).losses(masks).exp().tolist())
    return list(zip(rows, *found, strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="secateurs compare --results directories")
    p.add_argument("--model", default="default")
    p.add_argument("--text", default="default", help="calibration and held-out text (as --calib)")
    p.add_argument("--nsamples", type=int, default=32, help="the search's windows (as the runs had)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--methods", default="", help="metric methods whose own shapes to add, comma separated")
    p.add_argument("--bank-windows", choices=("search", "repair"), default="repair")
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--heldout", type=int, default=32, help="held-out windows scored")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    space = UnitSpace.from_model(model)
    rows = _rows(args.results)
    print(f"bank fitted on the {args.bank_windows} windows")
    print("| seed | method | target | real (repaired) | proxy, search windows | proxy, held out |")
    print("|---|---|---|---|---|---|")
    for seed in sorted({r["seed"] for r in rows}):
        mine = [r for r in rows if r["seed"] == seed]
        for r, on_calib, held in _score_seed(model, tok, space, mine, seed, args):
            print(
                f"| {seed} | {r['label']} | {r['target']:.0%} | {r['real']:.2f} | {on_calib:.2f} | {held:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
