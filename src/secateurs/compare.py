"""Side-by-side comparison: every method at every sparsity (and every swept setting), same data, one table.

Each run is its own spawned process (`run_one`), so its peak memory (`ru_maxrss`) is not the high-water
mark of the runs before it (see `START_METHOD` for what it does include); the child loads the model,
calls `secateurs.pipeline.run_prune` and sends its record back through a pipe. The dense evaluation is cached
on disk and computed once. Each run's result is cached under a key of the model's content
(`model_fingerprint`), the code that produces it (`prune_sources`), the method, the sparsity, every
setting given and the resolved configs (so a changed default re-runs what it affects), device, dtype
and library versions; a re-run computes only what changed.

Settings (`CompareConfig.settings`) are those of `secateurs prune`; each goes to the methods that have
it. A list is a sweep: each value runs, several swept settings run their cartesian product. Settings
whose type is a tuple (`units`, `alphas`) take a tuple as one value; a list of tuples sweeps them.

Methods run by name in a fresh interpreter, so a method registered at runtime (in a test or a notebook)
is not available to `compare`; register it in an importable module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secateurs.data.text import cache_dir
from secateurs.errors import ConfigError, SecateursError
from secateurs.eval.tasks import TaskConfig, metrics_of, show
from secateurs.io import atomic_write, atomic_write_json, jsonable, source_digest
from secateurs.methods.base import MethodConfig
from secateurs.pipeline import DataConfig, library_versions, model_fingerprint, prune_sources
from secateurs.progress import progress
from secateurs.report.plots import write_compare_plot
from secateurs.surgery.reconstruct import ReconstructConfig

log = logging.getLogger(__name__)

# The children log warnings only: their INFO lines (loading, per-step progress) would interleave across
# runs; the parent logs one line per run instead.
CHILD_LOG_LEVEL = logging.WARNING
# "spawn", not "fork": a fresh interpreter holds nothing of the parent or of earlier runs (no torch
# thread pools or CUDA context, which a forked child cannot reuse). Caveat on peak memory: Linux carries
# ru_maxrss across exec, so a spawned child's figure is at least the compare parent's own peak (~300 MB:
# torch imported, no model); the parent never loads a model, so a real run's own peak dominates.
START_METHOD = "spawn"


@dataclass
class CompareConfig:
    """What to compare: the axes (methods x sparsities x swept settings), where, and how each run loads."""

    model: str = "default"
    methods: tuple[str, ...] = ("magnitude", "wanda-sp", "flap", "random")
    sparsity: tuple[float, ...] = (0.2, 0.5)
    results: str = field(default="compare-results", metadata={"help": "where compare.md / compare.json go"})
    rerun: bool = field(default=False, metadata={"help": "ignore cached results"})
    device: str = "auto"
    dtype: str | None = None
    batch_size: int = 8
    evaluate: bool = True
    settings: dict[str, Any] = field(default_factory=dict)  # prune settings; a list is a sweep
    task_eval: TaskConfig = field(default_factory=TaskConfig)  # lm-eval tasks: accuracy columns

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        if isinstance(self.sparsity, str):
            self.sparsity = tuple(float(s) for s in self.sparsity.split(",") if s.strip())
        from secateurs.methods import get_method

        classes = [get_method(m).config_class for m in self.methods]
        for s in self.sparsity:
            if not 0 < s < 1:
                raise ConfigError(f"sparsity must be in (0, 1), got {s}")
        if "sparsity" in self.settings:
            raise ConfigError("give sparsity as CompareConfig.sparsity (--sparsity), not as a setting")
        empty = [k for k, v in self.settings.items() if isinstance(v, list) and not v]
        if empty:
            raise ConfigError(f"no values to sweep for {_options(empty)}")
        unknown = set(self.settings) - setting_names()
        if unknown:
            raise ConfigError(f"compare has no setting(s) {_options(unknown)}")
        taken = {f.name for c in [DataConfig, ReconstructConfig, *classes] for f in dataclasses.fields(c)}
        unused = set(self.settings) - taken
        if unused:
            raise ConfigError(
                f"none of the methods {', '.join(self.methods)} has setting(s) {_options(unused)}"
            )


def setting_names() -> set[str]:
    """Every setting `compare` forwards: the data's and every registered method's, but sparsity (its own
    axis)."""
    from secateurs.methods import REGISTRY

    classes = {DataConfig, MethodConfig, ReconstructConfig, *(c.config_class for c in REGISTRY.values())}
    return {f.name for c in classes for f in dataclasses.fields(c)} - {"sparsity"}


def _options(names) -> str:
    return ", ".join("--" + n.replace("_", "-") for n in sorted(names))


@dataclass
class Job:
    """One run: a method at a sparsity with its settings (one value each; `swept` names the ones that
    vary across the comparison)."""

    method: str
    sparsity: float
    settings: dict[str, Any]
    swept: tuple[str, ...] = ()


def jobs(cfg: CompareConfig) -> list[Job]:
    """Every run, sparsity outermost, then method, then the product of the settings it sweeps.

    Each method gets only the settings it has (and the data's), and sweeps only those: sweeping a Bonsai
    setting does not run magnitude twice.
    """
    from secateurs.methods import get_method

    data_names = {f.name for c in (DataConfig, ReconstructConfig) for f in dataclasses.fields(c)}
    out = []
    for sparsity in cfg.sparsity:
        for method in cfg.methods:
            names = data_names | {f.name for f in dataclasses.fields(get_method(method).config_class)}
            given = {k: v for k, v in cfg.settings.items() if k in names}
            swept = tuple(k for k, v in given.items() if isinstance(v, list))
            for values in itertools.product(*(given[k] for k in swept)):
                settings = given | dict(zip(swept, values, strict=True))
                varying = tuple(k for k in swept if len(given[k]) > 1)
                out.append(Job(method, sparsity, settings, varying))
    return out


def _configs(job: Job) -> tuple[MethodConfig, DataConfig, ReconstructConfig]:
    """The dataclasses a run builds from its settings, each taking the ones it has (`seed` goes to
    the method and the data); building them in the parent validates every run before any process
    starts."""
    from secateurs.methods import get_method

    cls = get_method(job.method).config_class

    def of(c):
        names = {f.name for f in dataclasses.fields(c)}
        return {k: v for k, v in job.settings.items() if k in names}

    config = cls(**of(cls), sparsity=job.sparsity)
    return config, DataConfig(**of(DataConfig)), ReconstructConfig(**of(ReconstructConfig))


def cache_key(cfg: CompareConfig, job: Job, weights: str) -> dict[str, Any]:
    """Everything a run's figures depend on (see the module docstring); `weights` is the model's
    `model_fingerprint`, computed once per comparison."""
    from secateurs.models.loading import resolve_device, resolve_dtype

    config, data, repair = _configs(job)
    device = resolve_device(cfg.device)
    return {
        "model": weights,
        "code": source_digest(prune_sources(job.method, config)),
        "libraries": library_versions(),
        "method": job.method,
        "sparsity": job.sparsity,
        "settings": jsonable(job.settings),
        "config": jsonable(dataclasses.asdict(config)),
        "data": jsonable(dataclasses.asdict(data)),
        "repair": jsonable(repair.to_dict()),
        "device": str(device),
        "dtype": str(resolve_dtype(cfg.dtype, device)),
        "batch_size": cfg.batch_size,
        "evaluate": cfg.evaluate,
        **({"tasks": cfg.task_eval.to_dict()} if cfg.task_eval.enabled else {}),
    }


# -- one run in its own process ------------------------------------------------------------------------


def _prune_in_child(payload: dict[str, Any], conn) -> None:
    """The spawned child: load the model, prune it (nothing saved), send back ("ok", record) or
    ("error", one-line message, traceback)."""
    logging.basicConfig(level=CHILD_LOG_LEVEL, format="%(levelname)s %(name)s: %(message)s")
    try:
        from secateurs.models.loading import load_model, model_id
        from secateurs.pipeline import run_prune_modes

        group = [Job(payload["method"], payload["sparsity"], s) for s in payload["settings_each"]]
        config, data, _ = _configs(group[0])
        repairs = [_configs(job)[2] for job in group]
        model, tok = load_model(payload["model"], device=payload["device"], dtype=payload["dtype"])
        records = run_prune_modes(
            model, tok, group[0].method, config, data, model_id(payload["model"]), repairs,
            evaluate=payload["evaluate"], batch_size=payload["batch_size"], tasks=TaskConfig(**payload["tasks"]),
        )  # fmt: skip
        conn.send(("ok", [jsonable(r["parameters"] | {"report": r["report"]}) for r in records]))
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent as one line
        text = " ".join(str(exc).split())
        message = text if isinstance(exc, SecateursError) else f"{type(exc).__name__}: {text}"
        conn.send(("error", message, traceback.format_exc()))
    finally:
        conn.close()


def run_one(cfg: CompareConfig, method: str, sparsity: float, settings: dict[str, Any]) -> dict[str, Any]:
    """Prune in a spawned process and return its record (parameters + report); a failure in the child
    raises `SecateursError("{method} at {sparsity}: {message}")`."""
    return run_group(cfg, method, sparsity, [settings])[0]


def run_group(
    cfg: CompareConfig, method: str, sparsity: float, settings_each: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Runs that differ only in their repair settings, in one spawned process: one search, finished
    with each repair (`pipeline.run_prune_modes`); their records in order."""
    ctx = multiprocessing.get_context(START_METHOD)
    receive, send = ctx.Pipe(duplex=False)
    payload = {
        "model": cfg.model,
        "method": method,
        "sparsity": sparsity,
        "settings_each": settings_each,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "evaluate": cfg.evaluate,
        "batch_size": cfg.batch_size,
        "tasks": dataclasses.asdict(cfg.task_eval),
    }
    proc = ctx.Process(target=_prune_in_child, args=(payload, send), name=f"secateurs-{method}")
    proc.start()
    send.close()  # the child holds the only writer now: its exit ends `recv` with EOFError
    try:
        try:
            message = receive.recv()
        except EOFError:
            message = None
        proc.join()
    finally:
        if proc.is_alive():  # interrupted while waiting: do not leave the run behind
            proc.terminate()
            proc.join()
        receive.close()
    if message is None:
        raise SecateursError(
            f"{method} at {sparsity}: its process exited with code {proc.exitcode} and no result"
        )
    if message[0] == "error":
        log.debug("%s at %s failed in its process:\n%s", method, sparsity, message[2])
        raise SecateursError(f"{method} at {sparsity}: {message[1]}")
    return message[1]


# -- the table -----------------------------------------------------------------------------------------


def _row(job: Job, r: dict[str, Any]) -> dict[str, Any]:
    rep = r["report"]
    pruned, dense = rep.get("pruned_eval", {}), rep.get("dense_eval", {})
    return {
        "method": job.method,
        "target": job.sparsity,
        "settings": jsonable(job.settings),
        "swept": jsonable({k: job.settings[k] for k in job.swept}),
        "sparsity_attn_mlp": r["sparsity"],
        "sparsity_total": r["total_removed_share"],
        "ppl": pruned.get("ppl"),
        "dense_ppl": dense.get("ppl"),
        "time_s": rep["method_time_s"],
        "peak_rss_mb": rep["method_peak_rss_mb"],
        "cuda_peak_mb": rep.get("method_cuda_peak_mb"),
        "forwards": rep.get("forwards"),
        "tokens": rep.get("tokens"),
        "eval_tokens": pruned.get("tokens"),
        "eval_seq_len": pruned.get("seq_len"),
        "shapes": rep.get("shapes"),
        "reconstruct": (rep.get("reconstruct") or {}).get("mode"),
        "reconstruct_s": (rep.get("reconstruct") or {}).get("time_s"),
        "tasks": (rep.get("pruned_tasks") or {}).get("tasks"),
        "dense_tasks": (rep.get("dense_tasks") or {}).get("tasks"),
    }


def _task_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(task, metric) of the accuracy columns: each task's first metric (accuracy where it has one)."""
    seen: dict[str, str] = {}
    for r in rows:
        for task, figures in (r.get("tasks") or {}).items():
            metrics = metrics_of(figures)
            if metrics and task not in seen:
                seen[task] = metrics[0]
    return list(seen.items())


def _show(settings: dict[str, Any]) -> str:
    return " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in settings.items())


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The table; a "settings" column when some setting is swept, and the settings every run shares
    below it."""
    swept = any(r["swept"] for r in rows)
    cols = ["method", "target", *(["settings"] if swept else []), "removed attn+MLP", "removed total"]
    tasks = _task_columns(rows)
    cols += [
        "held-out ppl",
        *(f"{t} {m}" for t, m in tasks),
        "time (s)",
        "peak RSS (MB)",
        "forwards",
        "tokens",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["method"], f"{r['target']:.0%}", *([_show(r["swept"]) or "-"] if swept else [])]
        cells += [f"{r['sparsity_attn_mlp']:.2%}", f"{r['sparsity_total']:.2%}"]
        cells += ["-" if r["ppl"] is None else f"{r['ppl']:.2f}"]
        cells += [show((r.get("tasks") or {}).get(t, {}), m) for t, m in tasks]
        cells += [f"{r['time_s']:.1f}"]
        cells += [f"{r['peak_rss_mb']:.0f}", str(r["forwards"] or "-"), str(r["tokens"] or "-")]
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        r = rows[0]
        if r["dense_ppl"] is not None:
            lines.append(
                f"\ndense perplexity {r['dense_ppl']:.2f}; evaluation: {r['eval_tokens']:,} held-out tokens, "
                f"seq_len {r['eval_seq_len']}. Peak RSS is each run's own process (model + method)."
            )
        if tasks and r.get("dense_tasks"):
            dense = ", ".join(f"{t} {m} {show(r['dense_tasks'].get(t, {}), m)}" for t, m in tasks)
            lines.append(f"\ndense accuracy: {dense} (lm-eval; ± is the standard error).")
        shared = {k: v for k, v in r["settings"].items() if all(q["settings"].get(k) == v for q in rows)}
        if shared:
            lines.append(f"\nsettings of every run: {_show(shared)}")
    summary = seed_summary(rows)
    if summary:
        lines += ["", "Over seeds (a default changes on at least 3, not on one):", "", summary]
    return "\n".join(lines)


def _seed_groups(rows: list[dict[str, Any]]) -> dict[tuple[str, float, str], list[float]]:
    """Held-out perplexities of the runs that differ only in their seed, keyed by (method, target, the
    other swept settings)."""
    groups: dict[tuple[str, float, str], list[float]] = {}
    for r in rows:
        if r["ppl"] is None:
            continue
        others = _show({k: v for k, v in r["swept"].items() if k != "seed"})
        groups.setdefault((r["method"], r["target"], others), []).append(r["ppl"])
    return groups


def seed_summary(rows: list[dict[str, Any]]) -> str:
    """Mean and spread of the held-out perplexity over seeds, per method, target and setting, with each
    mean's ratio to the lowest mean at its target: single-seed differences inside the spread decide
    nothing. Empty when no run was repeated over seeds."""
    groups = _seed_groups(rows)
    if not any(len(ppls) > 1 for ppls in groups.values()):
        return ""
    best: dict[float, float] = {}
    for (_, target, _), ppls in groups.items():
        best[target] = min(best.get(target, math.inf), statistics.fmean(ppls))
    lines = [
        "| method | target | settings | seeds | mean ppl | min-max | std | x best mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, target, others), ppls in groups.items():
        mean = statistics.fmean(ppls)
        std = statistics.stdev(ppls) if len(ppls) > 1 else 0.0
        lines.append(
            f"| {method} | {target:.0%} | {others or '-'} | {len(ppls)} | {mean:.2f} | "
            f"{min(ppls):.2f}-{max(ppls):.2f} | {std:.2f} | {mean / best[target]:.3f} |"
        )
    return "\n".join(lines)


REPAIR_SETTINGS = frozenset(f.name for f in dataclasses.fields(ReconstructConfig))
# The repair's windows: a search that scores sub-models as repaired fits on them (`Method.fit_windows`).
REPAIR_WINDOW_SETTINGS = ("reconstruct_nsamples", "reconstruct_seq_len")


def _search_groups(todo: list[Job], indices: list[int]) -> list[list[int]]:
    """Jobs that can share one search: same method, sparsity and settings but the repair's, the same
    repair windows, and the same answer to "does the repair add biases" (the search budgets for them)."""
    groups: dict[str, list[int]] = {}
    for i in indices:
        job = todo[i]
        others = {k: v for k, v in job.settings.items() if k not in REPAIR_SETTINGS}
        repair = _configs(job)[2]
        windows = [getattr(repair, name) for name in REPAIR_WINDOW_SETTINGS]
        key = json.dumps(
            [job.method, job.sparsity, jsonable(others), windows, repair.adds_biases], sort_keys=True
        )
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def run_compare(cfg: CompareConfig) -> list[dict[str, Any]]:
    """Run (or read from the cache) every job; write compare.md and compare.json under `cfg.results`."""
    todo = jobs(cfg)
    weights = model_fingerprint(cfg.model)
    keys = [cache_key(cfg, job, weights) for job in todo]  # validates every run before the first starts
    store = cache_dir() / "compare"
    paths = [
        store / (hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")
        for key in keys
    ]
    results: dict[int, dict[str, Any]] = {}
    for i, path in enumerate(paths):
        if path.is_file() and not cfg.rerun:
            log.info("[%d/%d] %s at %s: cached", i + 1, len(todo), todo[i].method, todo[i].sparsity)
            results[i] = json.loads(path.read_text())
    groups = _search_groups(todo, [i for i in range(len(todo)) if i not in results])
    with progress(total=len(todo), initial=len(results), desc="compare", unit="run") as bar:
        for group in groups:
            first = todo[group[0]]
            label = f"[{', '.join(str(i + 1) for i in group)}/{len(todo)}] {first.method} at {first.sparsity}"
            log.info("%s %s: running in its own process", label, _show(first.settings))
            t0 = time.perf_counter()
            if len(group) == 1:
                done = [run_one(cfg, first.method, first.sparsity, first.settings)]
            else:
                done = run_group(cfg, first.method, first.sparsity, [todo[i].settings for i in group])
            for i, result in zip(group, done, strict=True):
                atomic_write_json(paths[i], result)
                results[i] = result
            log.info("%s: done in %.1f s", label, time.perf_counter() - t0)
            bar.update(len(group))
    rows = [_row(job, results[i]) for i, job in enumerate(todo)]
    out = Path(cfg.results)
    atomic_write(out / "compare.md", to_markdown(rows) + "\n")
    atomic_write_json(out / "compare.json", rows)
    picture = write_compare_plot(rows, out)
    log.info("written to %s/compare.md, compare.json%s", out, f", {picture.name}" if picture else "")
    return rows
