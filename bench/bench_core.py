"""Core speed figures on the default model, measured side by side in one run.

1. Masked-forward throughput vs the plain dense forward: the cost of scoring sub-models with hooks
   (one random mask per row) instead of running the dense model, same windows, runs interleaved.
2. Prefill and decode speed of a 50%-pruned model vs the dense one, next to the multiply-add bound.

    .venv/bin/python bench/bench_core.py [--model default] [--sparsity 0.5] [--repeats 5]

Prints what it measured; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from secateurs.eval.loss import SubmodelEvaluator
from secateurs.eval.measure import bench_speed
from secateurs.methods.base import MethodConfig
from secateurs.methods.magnitude import Magnitude
from secateurs.models.loading import load_model
from secateurs.surgery.apply import apply_plan_
from secateurs.units.masks import Masks
from secateurs.units.space import UnitSpace, count_parameters


def masked_vs_dense(model, rows: int, seq_len: int, repeats: int) -> dict[str, float]:
    space = UnitSpace.from_model(model)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (rows, seq_len), generator=g)
    masks = Masks.ones(space, rows)
    for t in masks.groups + masks.channels:
        t.copy_((torch.rand(t.shape, generator=g) > 0.3).float())
    ev = SubmodelEvaluator(model, windows[:1], max_rows=rows)  # one window per mask: `rows` masks per forward
    dense_ev = SubmodelEvaluator(model, windows, max_rows=rows)
    times = {"dense": [], "masked": []}
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        dense_ev.losses()
        t1 = time.perf_counter()
        ev.losses(masks)
        t2 = time.perf_counter()
        if r:
            times["dense"].append(t1 - t0)
            times["masked"].append(t2 - t1)
    d, m = statistics.median(times["dense"]), statistics.median(times["masked"])
    return {"dense_tok_s": rows * seq_len / d, "masked_tok_s": rows * seq_len / m, "ratio": d / m}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    model, _ = load_model(args.model, device="cpu")
    print(
        f"torch threads: {torch.get_num_threads()}; model {args.model}: {count_parameters(model):,} parameters"
    )

    r = masked_vs_dense(model, args.rows, args.seq_len, args.repeats)
    print(
        f"\n[1] loss forward, {args.rows} x {args.seq_len} tokens, median of {args.repeats} interleaved runs"
    )
    print(f"    dense           {r['dense_tok_s']:8.0f} tok/s")
    print(f"    masked (1/row)  {r['masked_tok_s']:8.0f} tok/s")
    print(f"    masked / dense throughput: {r['ratio']:.3f}x")

    space = UnitSpace.from_model(model)
    cfg = MethodConfig(sparsity=args.sparsity, allocation="uniform")
    pruned = apply_plan_(copy.deepcopy(model), Magnitude(cfg).plan(model, space, None))
    s = bench_speed({"dense": model, "pruned": pruned}, args.prompt_len, 1, args.new_tokens, args.repeats)
    d, p = s["dense"], s["pruned"]
    bound = d["macs_per_token"] / p["macs_per_token"]
    print(
        f"\n[2] {args.sparsity:.0%} pruned (magnitude, uniform): {count_parameters(pruned):,} parameters; "
        f"prompt {args.prompt_len}, decode {args.new_tokens} tokens, median of {args.repeats} interleaved runs"
    )
    print(
        f"    prefill: dense {d['prefill_tok_s']:.0f} tok/s, pruned {p['prefill_tok_s']:.0f} tok/s, "
        f"ratio {p['prefill_tok_s'] / d['prefill_tok_s']:.2f}x (multiply-add bound {bound:.2f}x)"
    )
    print(
        f"    decode:  dense {d['decode_tok_s']:.1f} tok/s, pruned {p['decode_tok_s']:.1f} tok/s, "
        f"ratio {p['decode_tok_s'] / d['decode_tok_s']:.2f}x (multiply-add bound {bound:.2f}x)"
    )


if __name__ == "__main__":
    main()
