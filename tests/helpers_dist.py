"""Run the same searches on 1 process or on N gloo ranks (spawned processes), recording what each did.

`search_all(world=1)` runs in the calling process; `spawn_ranks(world, ...)` starts `world` fresh
interpreters that join one gloo group on 127.0.0.1 and return each rank's record. A record holds the
plans (JSON), every loss tensor the evaluator handed back (bit-exact, as bytes), and the work counters:
global and per-rank evaluator forwards, and this rank's decoder forwards (statistics passes included).
"""

from __future__ import annotations

import multiprocessing
import os
import traceback

import torch

SEARCHES = ("bonsai", "policy-gradient", "wanda-sp")


def _calib(n=8, t=16, vocab=96, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _config(name):
    from secateurs.methods.bonsai import BonsaiConfig
    from secateurs.methods.policy_gradient.method import PolicyGradientConfig
    from secateurs.methods.wanda_sp import WandaSpConfig

    if name == "bonsai":
        return BonsaiConfig(
            sparsity=0.3, masks_per_round=8, eval_windows=4, prior_windows=6, batch_rows=4, cv_folds=2
        )
    if name == "policy-gradient":  # 4 masks x 1 window per step, 2 rows per forward: 2 micro-batches
        return PolicyGradientConfig(sparsity=0.3, steps=5, samples=4, batch_rows=2, split_len=0)
    return WandaSpConfig(sparsity=0.3, batch_rows=2)  # 8 windows: 4 batches in the statistics pass


def search_all(names=SEARCHES) -> dict:
    """Each search on a fresh tiny model, with every evaluator output and work counter recorded."""
    return {name: _search(name) for name in names}


def _search(name: str) -> dict:
    from secateurs.eval.loss import SubmodelEvaluator
    from secateurs.methods.base import get_method
    from secateurs.testing import tiny_model
    from secateurs.units.space import UnitSpace

    model = tiny_model("llama", layers=4)
    space = UnitSpace.from_model(model)
    calls = {"decoder": 0}

    def count(*_):
        calls["decoder"] += 1

    model.get_decoder().register_forward_pre_hook(count)
    cfg = _config(name)
    evaluators, losses = [], []

    def factory(m, windows, sp):
        ev = SubmodelEvaluator(m, windows, max_rows=cfg.batch_rows, space=sp)
        inner = ev.losses

        def recorded(masks=None, progress=None):
            result = inner(masks, progress)
            losses.append(result.numpy().tobytes().hex())
            return result

        ev.losses = recorded
        evaluators.append(ev)
        return ev

    plan = get_method(name)(cfg, evaluator_factory=factory).plan(model, space, _calib())
    return {
        "plan": plan.to_dict()["layers"],
        "losses": "".join(losses),  # calls may cut the masks differently; the losses are the same
        "forwards": sum(e.stats.forwards for e in evaluators),
        "local_forwards": sum(e.stats.local_forwards for e in evaluators),
        "decoder_forwards": calls["decoder"],
    }


def _rank_main(rank, world, port, names, queue):
    try:
        from secateurs import distributed

        os.environ.update(distributed.worker_env(rank, world, port, threads=1))
        distributed.init("cpu")
        try:
            queue.put((rank, search_all(names)))
        finally:
            distributed.shutdown()
    except BaseException:  # noqa: BLE001 - report it to the test instead of hanging it
        queue.put((rank, traceback.format_exc()))


def spawn_ranks(world: int, names=SEARCHES, timeout: float = 300.0) -> list[dict]:
    """`search_all` on `world` gloo ranks; each rank's record, in rank order."""
    from secateurs import distributed

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = distributed.free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, names, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [r for r in results.values() if isinstance(r, str)]
    assert not errors, errors[0]
    return [results[r] for r in range(world)]
