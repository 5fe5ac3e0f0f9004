"""Task accuracy through lm-eval (the EleutherAI harness), on the model in memory, dense and pruned.

`load_tasks` resolves the task names and reads their datasets once, before any pruning work, so an unknown
task or an unreachable dataset fails in the first seconds with one line (`TaskError`), not after the
search; `run_tasks` scores a model on them through `lm_eval.simple_evaluate` with
`HFLM(pretrained=model, tokenizer=tokenizer)`, the harness's own wrapper for a model already built.

lm-eval's stock tasks download their datasets from the Hugging Face hub. Offline they run only from a
local Hugging Face datasets cache (`HF_DATASETS_CACHE`, filled on a machine with internet); a task
defined on local files (a YAML with `dataset_path: json` and absolute `data_files`) in a folder given as
`include_path` (`--include-path`) needs neither.

HFLM works with transformers 5 as it is (lm-eval 0.4.13, transformers 5.24, checked by the tests). The
one subclass here (`_tracked_lm`) only swaps lm-eval's tqdm bars for secateurs' progress bar, so a run
logged to a file shows this phase's ETA like every other.

`simple_evaluate` seeds Python's, NumPy's and torch's global generators; `run_tasks` gives them back
afterwards, so scoring a model between two phases of a run changes nothing the run draws later.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.errors import ConfigError, TaskError, one_line
from secateurs.io import file_digest
from secateurs.progress import progress

log = logging.getLogger(__name__)

LM_EVAL_PIP = 'pip install -e ".[eval]"'
OFFLINE_HINT = (
    "without internet, stock tasks run only from a local Hugging Face datasets cache (HF_DATASETS_CACHE, "
    "filled on a machine online); or define the task on local files and pass their folder with --include-path DIR"
)
PRIMARY_METRICS = ("acc", "acc_norm", "exact_match")  # the figure a table shows first, in this order
# lm-eval's notes that it wraps a model it did not load; true and expected here, so not shown.
_QUIET_LOGGERS = ("lm_eval.models.huggingface",)


@dataclass
class TaskConfig:
    """Which lm-eval tasks to score, on what part of their data."""

    tasks: tuple[str, ...] = field(
        default=(),
        metadata={"help": "lm-eval tasks to score, dense and pruned (e.g. arc_easy,hellaswag); stock tasks "
                  "download their datasets, see --include-path"},
    )  # fmt: skip
    include_path: str | None = field(
        default=None,
        metadata={"help": "a folder of lm-eval task YAMLs, e.g. tasks over local JSONL files (runs offline)"},
    )
    limit: int | None = field(
        default=None, metadata={"help": "score only the first N examples of each task (quick runs)"}
    )
    num_fewshot: int | None = field(default=None, metadata={"help": "few-shot examples per prompt"})

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = tuple(t.strip() for t in self.tasks.split(",") if t.strip())
        self.tasks = tuple(self.tasks)
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"--num-fewshot must be 0 or more, got {self.num_fewshot}")
        if self.include_path is not None and not Path(self.include_path).expanduser().is_dir():
            raise ConfigError(f"--include-path {self.include_path} is not a directory")
        if self.include_path is not None and not self.tasks:
            raise ConfigError("--include-path names where tasks are defined: give them with --tasks")

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"tasks": list(self.tasks)}


def lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def _require_lm_eval() -> None:
    if lm_eval_version() is None:
        raise TaskError(f"--tasks needs lm-eval, which is not installed: {LM_EVAL_PIP}")


@dataclass
class TaskSuite:
    """Tasks resolved and their datasets read (`load_tasks`): scored on any number of models."""

    config: TaskConfig
    manager: Any  # lm_eval.tasks.TaskManager
    objects: list[Any]  # what each name resolved to: a Task, a Group, or a tag's Tasks

    def cache_key(self) -> dict[str, Any]:
        """What the figures depend on besides the model: the settings, lm-eval's version (its stock
        task definitions), the local definitions' files and the datasets' content fingerprints."""
        include = self.config.include_path
        return {
            "tasks": self.config.to_dict(),
            "lm_eval": lm_eval_version(),
            "definitions": file_digest(Path(include).expanduser()) if include else None,
            "datasets": _dataset_fingerprints(self.manager.load(self.objects)["tasks"]),
        }


def _dataset_fingerprints(tasks: dict[str, Any]) -> dict[str, dict[str, str]]:
    out = {}
    for name, task in sorted(tasks.items()):
        dataset = getattr(task, "dataset", None) or {}
        out[name] = {split: getattr(d, "_fingerprint", "?") for split, d in dataset.items()}
    return out


def _manager(config: TaskConfig):
    """lm-eval's task index: only the local folder when it defines every name asked for (indexing the
    thousands of stock YAML files takes seconds), else the stock tasks and the folder together."""
    from lm_eval.tasks import TaskManager

    include = str(Path(config.include_path).expanduser().resolve()) if config.include_path else None
    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(name in local.all_tasks for name in config.tasks):
            return local
    return TaskManager(include_path=include)


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bars while tasks load ("Generating test split: ..."): a few lines of
    carriage returns in a log file, for reads that take a second."""
    import datasets

    was_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def load_tasks(config: TaskConfig) -> TaskSuite:
    """Resolve every name and read its dataset now; a name lm-eval does not know, or a dataset that
    cannot be read, is a one-line `TaskError` naming the task (and `--include-path` and the HF cache
    when the dataset is out of reach)."""
    _require_lm_eval()
    manager = _manager(config)
    objects: list[Any] = []
    with _quiet_datasets():
        for name in config.tasks:
            try:
                loaded = manager.load([name])
            except KeyError:
                where = f" nor in --include-path {config.include_path}" if config.include_path else ""
                raise TaskError(
                    f"lm-eval has no task {name!r} among its stock tasks{where} (`lm-eval ls tasks` lists them)"
                ) from None
            except OSError as e:  # ConnectionError, DatasetNotFoundError, a missing data file
                raise TaskError(
                    f"task {name!r} cannot read its dataset ({one_line(e)}); {OFFLINE_HINT}"
                ) from e
            except Exception as e:  # noqa: BLE001 - a broken task definition (YAML, template) is input
                raise TaskError(f"cannot load lm-eval task {name!r}: {one_line(e)}") from e
            objects.append(_top_level(name, loaded))
    return TaskSuite(
        config, manager, [o for obj in objects for o in (obj if isinstance(obj, list) else [obj])]
    )


def _top_level(name: str, loaded: dict[str, Any]) -> Any:
    """The object a name stands for in `TaskManager.load`'s flat result: its group, its task, or (a tag)
    every task it expands to. Passing these back keeps groups' aggregate figures."""
    groups, tasks = loaded.get("groups") or {}, loaded["tasks"]
    if name in groups:
        return groups[name]
    if name in tasks:
        return tasks[name]
    return list(tasks.values())


@functools.cache
def _tracked_lm() -> type:
    """`HFLM` with secateurs' progress bar (count and ETA, logged off a terminal) in place of lm-eval's
    tqdm bars: lm-eval reports every finished request to the model's cache hook, which moves the bar."""
    from lm_eval.api.model import CacheHook
    from lm_eval.models.huggingface import HFLM

    class _BarHook(CacheHook):
        def __init__(self, bar) -> None:
            super().__init__(None)
            self.bar = bar

        def add_partial(self, attr: str, req: Any, res: Any) -> None:
            self.bar.update(1)

    class TrackedHFLM(HFLM):
        label = "tasks"

        def _tracked(self, kind: str, requests: list, run) -> list:
            with progress(total=len(requests), desc=f"{self.label}: {kind}", unit="req") as bar:
                self.cache_hook = _BarHook(bar)
                try:
                    return run(requests, disable_tqdm=True)
                finally:
                    self.cache_hook = CacheHook(None)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._tracked("loglikelihood", requests, super().loglikelihood)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._tracked("rolling loglikelihood", requests, super().loglikelihood_rolling)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self._tracked("generation", requests, super().generate_until)

        def _loglikelihood_tokens(self, *args, **kwargs):  # rolling calls it with its bar on
            return super()._loglikelihood_tokens(*args, **(kwargs | {"disable_tqdm": True}))

    return TrackedHFLM


@contextmanager
def _restored_generators(device: torch.device) -> Iterator[None]:
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    random.setstate(state[0])
    np.random.set_state(state[1])


@contextmanager
def _quiet(names: tuple[str, ...], level: int = logging.ERROR) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, before, strict=True):
            lg.setLevel(lv)


@contextmanager
def _no_git_probe() -> Iterator[None]:
    """`simple_evaluate` records the git commit of the working directory by running `git describe`,
    whose stderr ("fatal: not a git repository") reaches the terminal outside a checkout. secateurs does
    not keep that field (its own versions are in plan.json), so the probe is skipped; lm-eval versions
    without that name are left alone."""
    import lm_eval.evaluator as evaluator

    if not hasattr(evaluator, "get_git_commit_hash"):
        yield
        return
    probe = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = probe


def run_tasks(
    model: nn.Module, tokenizer, suite: TaskSuite, batch_size: int = 8, label: str = "tasks"
) -> dict[str, Any]:
    """Score `model` on the suite's tasks: per task, each metric with its stderr, the examples scored and
    the shots, plus the settings and lm-eval's version (the record plan.json keeps)."""
    import lm_eval

    if tokenizer is None:
        raise ConfigError("--tasks needs the model's tokenizer (the model directory has none)")
    cfg = suite.config
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with _quiet(_QUIET_LOGGERS):
        lm = _tracked_lm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    lm.label = label
    with (
        _restored_generators(device),
        _quiet(("lm_eval",), logging.WARNING),
        _quiet_datasets(),
        _no_git_probe(),
    ):
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=suite.objects,
            task_manager=suite.manager,
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            log_samples=False,
        )
    return {
        "tasks": {name: _task_figures(name, out) for name in out["results"]},
        "settings": cfg.to_dict() | {"batch_size": batch_size},
        "lm_eval": lm_eval_version(),
        "time_s": round(time.perf_counter() - t0, 2),
    }


def _task_figures(name: str, out: dict[str, Any]) -> dict[str, Any]:
    """One task's (or group's) figures: "acc,none" -> "acc" (other filters keep theirs: "acc,strict"),
    numbers only (lm-eval writes "N/A" for a stderr it could not compute)."""
    figures: dict[str, Any] = {}
    for key, value in out["results"][name].items():
        metric, _, filt = key.partition(",")
        if not filt or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        figures[metric if filt == "none" else f"{metric},{filt}"] = float(value)
    samples = (out.get("n-samples") or {}).get(name) or {}
    figures["samples"] = samples.get("effective")
    figures["n_shot"] = (out.get("n-shot") or {}).get(name)
    return figures


def metrics_of(figures: dict[str, Any]) -> list[str]:
    """A task's metrics (not their stderrs), the one a one-column table shows first: accuracy where the
    task has it."""
    metrics = [
        k for k in figures if k not in ("samples", "n_shot") and not k.partition(",")[0].endswith("_stderr")
    ]
    rank = {name: i for i, name in enumerate(PRIMARY_METRICS)}
    return sorted(metrics, key=lambda m: rank.get(m, len(rank)))


def show(figures: dict[str, Any], metric: str) -> str:
    """ "0.625 ± 0.081" (the stderr where lm-eval gives one)."""
    value = figures.get(metric)
    if value is None:
        return "-"
    base, _, filt = metric.partition(",")
    err = figures.get(f"{base}_stderr" + (f",{filt}" if filt else ""))
    return f"{value:.3f}" + (f" ± {err:.3f}" if err is not None else "")
