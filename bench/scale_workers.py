"""Sub-model evaluator throughput with 1 and 2 (or more) data-parallel workers on this machine, in one run.

Each setting starts its ranks with `secateurs.distributed.launch` (gloo on CPU, NCCL on CUDA), as
`secateurs prune --workers N` does; every rank loads the model and scores its share of the same masks x
windows (`SubmodelEvaluator.losses`, the call Bonsai and the policy gradient make). One warm-up call is
thrown away; the median of `--repeats` timed calls is reported as tokens/s of the whole call, with the
threads each rank had, and whether the losses came out bit-identical to one worker's.

    .venv/bin/python bench/scale_workers.py [--model default] [--workers 1,2] [--masks 16 --windows 2]

On a machine with fewer cores than it has GPUs to spare, do not expect a speed-up on the CPU: one
worker's matrix kernels already use every core, and N workers split the cores between them.
Prints what it measured; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from secateurs import distributed


def _worker(args) -> None:
    """One rank: load, score, time; rank 0 writes the figures to `args.result`."""
    from secateurs.eval.loss import SubmodelEvaluator
    from secateurs.models.loading import load_model
    from secateurs.units.masks import Masks
    from secateurs.units.space import UnitSpace

    device = distributed.init(args.device) if distributed.requested() else args.device
    if not distributed.requested():
        torch.set_num_threads(int(os.environ.get(distributed.THREADS_ENV, torch.get_num_threads())))
    model, _ = load_model(args.model, device=device)
    space = UnitSpace.from_model(model)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (args.windows, args.seq_len), generator=g)
    masks = Masks.ones(space, args.masks)
    for t in masks.groups + masks.channels:
        t.copy_((torch.rand(t.shape, generator=g) > 0.3).float())
    ev = SubmodelEvaluator(model, windows, max_rows=args.batch_rows, space=space)
    times, losses = [], None
    for r in range(args.repeats + 1):
        distributed.on_main(lambda: None, "a barrier")
        t0 = time.perf_counter()
        losses = ev.losses(masks)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        distributed.on_main(lambda: None, "a barrier")
        if r:  # call 0 is warm-up
            times.append(time.perf_counter() - t0)
    if distributed.is_main():
        tokens = args.masks * args.windows * args.seq_len
        Path(args.result).write_text(
            json.dumps(
                {
                    "seconds": statistics.median(times),
                    "tok_s": tokens / statistics.median(times),
                    "threads": torch.get_num_threads(),
                    "losses": losses.numpy().tobytes().hex(),
                    "micro_batches": -(-args.masks * args.windows // args.batch_rows),
                }
            )
        )
    distributed.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", default="1,2", help="comma list of worker counts, each run in turn")
    ap.add_argument("--masks", type=int, default=16, help="sub-models per call")
    ap.add_argument("--windows", type=int, default=2, help="windows each sub-model is scored on")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-rows", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(w) for w in args.workers.split(",")):
            result = Path(tmp) / f"{n}.json"
            argv = [a for a in sys.argv[1:] if not a.startswith("--workers")]
            argv += ["--worker", "--result", str(result)]
            distributed.launch(argv, n, command=[sys.executable, str(Path(__file__).resolve())])
            rows.append((n, json.loads(result.read_text())))
    base = rows[0][1]
    tokens = args.masks * args.windows * args.seq_len
    print(
        f"{args.model}: {args.masks} masks x {args.windows} windows x {args.seq_len} tokens = {tokens:,} tokens per "
        f"call, {base['micro_batches']} micro-batches of {args.batch_rows} rows; median of {args.repeats} calls "
        f"after a warm-up; {distributed.cores()} cores, load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (other processes share the cores when it is above 0)"
    )
    print("| workers | threads per rank | tokens/s | speed-up | losses identical to 1 worker |")
    print("|---|---|---|---|---|")
    for n, r in rows:
        same = "yes" if r["losses"] == base["losses"] else "NO"
        print(f"| {n} | {r['threads']} | {r['tok_s']:,.0f} | {r['tok_s'] / base['tok_s']:.2f}x | {same} |")
    if distributed.cores() < 2 * max(n for n, _ in rows):
        print(
            f"note: {distributed.cores()} cores: one worker's matrix kernels already use them all, and N workers "
            "split them (cores / N threads each), so no speed-up is expected here; data parallelism pays with a "
            "device per worker"
        )


if __name__ == "__main__":
    main()
