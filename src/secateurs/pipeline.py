"""The prune job end to end: data, dense evaluation (cached), method, surgery, evaluation, save, report.

The CLI is a thin layer over `run_prune`; library users can call it, or the pieces, directly. Every
phase's time and peak memory go into the report (`report["phases"]`, `eval.measure.phase`). With
data-parallel workers (`secateurs.distributed`) every rank runs the same job on its share of each
evaluation; rank 0 alone writes the cache, the checkpoints and the output.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs import distributed
from secateurs.checkpoint import clear_state
from secateurs.data import eval_windows, load_documents, sample_windows, token_stream
from secateurs.data.text import cache_dir, describe_split, fingerprint
from secateurs.errors import ConfigError, DataError
from secateurs.eval.loss import perplexity
from secateurs.eval.measure import linear_macs_per_token, phase
from secateurs.eval.tasks import TaskConfig, TaskSuite, load_tasks, run_tasks
from secateurs.io import (
    atomic_write_json,
    check_free_space,
    file_digest,
    jsonable,
    reserved_dir,
    source_digest,
    tensor_digest,
)
from secateurs.methods.base import MethodConfig, get_method
from secateurs.models.placement import input_device
from secateurs.scoring.select import check_reachable, target_params
from secateurs.surgery.apply import apply_plan_
from secateurs.surgery.reconstruct import (
    REPAIR_SEQ_LEN,
    REPAIR_WINDOWS,
    ReconstructConfig,
    bias_budget,
    reconstruct_,
)
from secateurs.surgery.saving import plan_record, save_pruned
from secateurs.units.plan import Plan
from secateurs.units.space import SPARSITY_DEFINITION, UnitSpace, count_parameters

log = logging.getLogger(__name__)

MAX_SPARSITY = 0.999  # a bias budget may raise a method's target, never to "remove everything"


def model_context(model: nn.Module) -> int | None:
    """The model's context length (`max_position_embeddings`), where its config says."""
    return getattr(model.config, "max_position_embeddings", None)


@dataclass
class DataConfig:
    """Calibration and evaluation text. The two never overlap: see `describe_split`."""

    calib: str = field(
        default="default", metadata={"help": "default | FILE.txt | FILE.jsonl | wikitext2 | c4"}
    )
    eval: str = field(default="default", metadata={"help": "evaluation text source (same choices)"})
    text_field: str = field(default="text", metadata={"help": "field holding the text in .jsonl files"})
    nsamples: int = field(default=32, metadata={"help": "calibration windows"})
    seq_len: int = field(default=128, metadata={"help": "calibration window length (tokens)"})
    eval_seq_len: int = field(default=256, metadata={"help": "evaluation window length (tokens)"})
    eval_tokens: int = field(default=32768, metadata={"help": "held-out tokens evaluated"})
    allow_long_context: bool = field(
        default=False, metadata={"help": "allow windows longer than the model's context"}
    )
    seed: int = 0

    def __post_init__(self) -> None:
        if (
            self.nsamples < 1
            or self.seq_len < 2
            or self.eval_seq_len < 2
            or self.eval_tokens < self.eval_seq_len
        ):
            raise DataError(
                f"need nsamples >= 1, seq_len >= 2 and eval_tokens >= eval_seq_len; got nsamples={self.nsamples}, "
                f"seq_len={self.seq_len}, eval_seq_len={self.eval_seq_len}, eval_tokens={self.eval_tokens}"
            )

    def check_context(self, model: nn.Module, options: dict[str, str] | None = None) -> None:
        """Windows beyond the model's context (`max_position_embeddings`) use positions it never saw in
        training: figures from them mean little. Refused unless `allow_long_context`.

        `options`: the window lengths to check, by field, with the option that sets each in the command
        at hand (`secateurs eval` calls its evaluation length `--seq-len`)."""
        limit = model_context(model)
        options = options or {"seq_len": "--seq-len", "eval_seq_len": "--eval-seq-len"}
        for field_name, option in options.items():
            self.check_length(getattr(self, field_name), option, limit)

    def check_length(self, length: int, option: str, limit: int | None) -> None:
        """One window length against the model's context `limit` (see `check_context`)."""
        if limit and length > limit and not self.allow_long_context:
            raise ConfigError(
                f"{option} {length} is longer than the model's context ({limit} tokens); use a shorter "
                "window or --allow-long-context"
            )

    def describe(self) -> str:
        """Calibration always reads a source's calibration part and evaluation its held-out part, also when
        the two sources differ: `secateurs eval --data X` after `prune --calib X` must not score text the
        method was fitted on."""
        if self.calib == self.eval:
            return describe_split(self.calib)
        return f"calibration: {describe_split(self.calib)}; evaluation: {describe_split(self.eval)}"


def calibration_windows(tokenizer, data: DataConfig) -> torch.Tensor:
    docs = load_documents(data.calib, "calib", data.text_field)
    return sample_windows(tokenizer, docs, data.nsamples, data.seq_len, data.seed)


def evaluation_windows(tokenizer, data: DataConfig) -> tuple[torch.Tensor, str]:
    docs = load_documents(data.eval, "eval", data.text_field)
    return eval_windows(tokenizer, docs, data.eval_seq_len, data.eval_tokens), fingerprint(docs)


# Modules whose code decides a dense evaluation's figure: the loss, the windows cut from the text, and
# how the weights are loaded (dtype, dequantisation). Part of the dense-eval cache key.
EVAL_SOURCES = ("secateurs.eval", "secateurs.data", "secateurs.models")
# ... and a pruning run's: also the unit space, the shared scoring, the surgery, this pipeline and the
# method interface. The method's own code is added per method by `prune_sources`.
PRUNE_SOURCES = (
    *EVAL_SOURCES,
    "secateurs.units",
    "secateurs.scoring",
    "secateurs.surgery",
    "secateurs.pipeline",
    "secateurs.methods.base",
)
METHODS_PACKAGE = "secateurs.methods"
LIBRARIES = ("torch", "transformers")  # their numerics change figures too; keyed by installed version


def library_versions() -> dict[str, str]:
    """Installed versions of `LIBRARIES` (read from metadata: importing transformers costs seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def model_fingerprint(source: str) -> str:
    """A content hash of a model's files, for cache keys: a model changed in place at the same path (or a
    re-converted default model) must not be served the figures of the old one.

    `source` is what `load_model` takes, or its `model_id` (what `run_prune` gets as `model_name`):
    the default model hashes its converted directory, a local directory or .gguf file its files, a hub id
    its snapshot in the local Hugging Face cache; a hub id that is not cached has nothing to hash, so the
    id itself stands for it.
    """
    from secateurs.models.loading import DEFAULT_ID, DEFAULT_SOURCE, default_model_dir

    if source in (DEFAULT_SOURCE, DEFAULT_ID):
        return file_digest(default_model_dir())
    path = Path(source).expanduser()
    if path.exists():
        return file_digest(path)
    snapshot = _cached_hub_snapshot(source)
    return file_digest(snapshot) if snapshot is not None else f"hub:{source}"


def _cached_hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot directory of a hub id, without touching the network (None when not cached)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not a valid id, not cached, offline: all mean "nothing local"
        return None


def prune_sources(method: str, config: MethodConfig | None = None) -> tuple[str, ...]:
    """The modules whose code decides a `run_prune` result with `method` (for `source_digest`).

    `PRUNE_SOURCES`, the method's own code (see `_method_modules`) and that of every method it depends
    on: the ones its module imports (block-influence falls back to magnitude's scores) and the ones a
    setting of `config` names (Bonsai's prior, the policy gradient's init).
    """
    from secateurs.methods.base import REGISTRY

    todo, seen, modules = [method], set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        modules |= _method_modules(name)
        if name == method and config is not None:
            todo += [v for v in config.to_dict().values() if isinstance(v, str) and v in REGISTRY]
    return (*PRUNE_SOURCES, *sorted(modules))


def _method_modules(method: str) -> set[str]:
    """The method's module, or its whole package when it is one (`methods/bonsai/`), plus the modules
    of other methods whose functions or classes it imports."""
    import sys

    module = get_method(method).__module__
    parent = module.rpartition(".")[0]
    own = parent if parent.startswith(METHODS_PACKAGE + ".") else module
    used = {
        getattr(value, "__module__", None)
        for name, mod in list(sys.modules.items())
        if name == own or name.startswith(own + ".")
        for value in vars(mod).values()
    }
    imported = {m for m in used if isinstance(m, str) and m.startswith(METHODS_PACKAGE + ".")}
    return {own} | {m for m in imported if not m.startswith(own + ".")}


def cached_eval(key: dict[str, Any], compute: Callable[[], dict]) -> dict:
    """`compute()`'s figures, cached on disk under `key` (a dense model's figures are computed once per
    setting).

    `key` says which model and which data (`run_prune` uses `model_fingerprint` and the text's or the
    tasks' fingerprints); the code that computes the figures (`EVAL_SOURCES`) and the library versions
    are added here, so a change to either recomputes instead of serving a stale figure.
    """
    full = key | {"code": source_digest(EVAL_SOURCES), "libraries": library_versions()}
    digest = hashlib.sha1(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "eval" / f"{digest}.json"
    hit = distributed.on_main(
        lambda: json.loads(path.read_text()) if path.is_file() else None, "the eval cache"
    )
    if hit is not None:
        return hit | {"cached": True}
    result = compute()
    distributed.on_main(lambda: atomic_write_json(path, result | {"key": full}), "the eval cache")
    return result


def cached_perplexity(
    model: nn.Module, windows: torch.Tensor, key: dict[str, Any], batch_size: int = 8
) -> dict:
    """Perplexity, cached on disk under `key` (see `cached_eval`)."""
    return cached_eval(key, lambda: perplexity(model, windows, batch_size))


def make_plan(
    model: nn.Module,
    method: str,
    config: MethodConfig,
    calib: torch.Tensor,
    repair_windows: torch.Tensor | None = None,
) -> Plan:
    """Run a registered method; the model comes back unchanged (methods may prune it in place meanwhile,
    without a second copy: see `Method.plan`). `repair_windows`: the run's repair calibration, for
    methods that score sub-models as repaired (`Method.fit_windows`)."""
    cls = get_method(method)
    space = UnitSpace.from_model(model)
    check_reachable(space, config.sparsity, config.allocation, tuple(config.units), config.uniform_attention)
    return cls(config, repair_windows=repair_windows).plan(model, space, calib)


@dataclass
class PruneResult:
    plan: Plan
    record: dict[str, Any]
    model: nn.Module
    files: list[Path] = field(default_factory=list)  # the model card and pictures written next to it


def run_prune(
    model: nn.Module,
    tokenizer,
    method: str,
    config: MethodConfig,
    data: DataConfig,
    model_name: str,
    out: str | Path | None = None,
    overwrite: bool = False,
    evaluate: bool = True,
    batch_size: int = 8,
    reserved: Path | None = None,
    repair: ReconstructConfig | None = None,
    tasks: TaskConfig | None = None,
    phases: dict[str, Any] | None = None,
) -> PruneResult:
    """Prune `model` in place with `method` and write the result to `out` (atomically) if given, with
    its model card and pictures (`secateurs.report`).

    The output is checked before any work (`io.reserved_dir`, unless the caller reserved it already,
    and the free space for the pruned model); a failed save keeps the plan (see `save_pruned`).
    `repair` (default: `ReconstructConfig()`, least squares) runs after the method, on its own
    calibration windows, as part of surgery. `tasks`: lm-eval tasks scored before and after.
    `phases`: figures of phases the caller measured before
    (loading the model), recorded first in `report["phases"]`. With workers, rank 0 alone reserves and
    writes `out`; the others wait for its save and share its outcome.
    """
    repair = repair or ReconstructConfig()
    with reserved_dir(out if distributed.is_main() else None, overwrite, reserved) as reserved:
        return _run_prune(
            model, tokenizer, method, config, data, model_name, out, overwrite, evaluate, batch_size, reserved,
            repair, tasks, phases or {},
        )  # fmt: skip


def _pruned_bytes(model: nn.Module, space: UnitSpace, sparsity: float) -> int:
    """About what the saved model takes: the parameters left at the target, at the model's dtype."""
    element = next(model.parameters()).element_size()
    return (count_parameters(model) - target_params(space, sparsity)) * element


def repair_shape(data: DataConfig, repair: ReconstructConfig, context: int | None) -> tuple[int, int]:
    """(windows, length) of the repair's calibration: what was asked for, else the repair's default
    (`REPAIR_WINDOWS` x `REPAIR_SEQ_LEN`, the length within the model's context) or the method's own
    windows where those are larger, so a repair never sees less than the search did."""
    seq_len = repair.reconstruct_seq_len
    if seq_len:
        data.check_length(seq_len, "--reconstruct-seq-len", context)
    else:
        seq_len = max(data.seq_len, min(REPAIR_SEQ_LEN, context or REPAIR_SEQ_LEN))
    return repair.reconstruct_nsamples or max(data.nsamples, REPAIR_WINDOWS), seq_len


# The search (its sample repair) and the repair cut the same windows: a short text is reported once.
_SHORT_TEXT_WARNED: set[tuple[int, int, int]] = set()


def repair_windows(
    tokenizer, data: DataConfig, repair: ReconstructConfig, context: int | None = None
) -> torch.Tensor:
    """The repair's own calibration windows, from the calibration text's calibration part, so a larger
    fit never changes a method's search budget. A default window count that the text cannot hold shrinks
    to what it holds (with a warning); a count the user asked for is an error instead."""
    docs = load_documents(data.calib, "calib", data.text_field)
    n, seq_len = repair_shape(data, repair, context)
    if not repair.reconstruct_nsamples:
        fits = token_stream(tokenizer, docs).numel() // seq_len
        if fits < n:
            if (fits, seq_len, n) not in _SHORT_TEXT_WARNED:
                _SHORT_TEXT_WARNED.add((fits, seq_len, n))
                log.warning(
                    "the calibration text holds %d windows of %d tokens, not the repair's default %d: "
                    "using %d",
                    fits, seq_len, n, max(fits, 2),
                )  # fmt: skip
            n = max(fits, 2)  # fewer than 2 fails in sample_windows with the text's length in the message
    return sample_windows(tokenizer, docs, n, seq_len, data.seed)


def paying_for_repair(config: MethodConfig, space: UnitSpace, repair: ReconstructConfig) -> MethodConfig:
    """A repair that adds output biases (`bias`, or `lstsq` with an intercept) costs parameters: the
    method is asked to remove that much more, so the target still holds after the repair."""
    if not repair.adds_biases or not bias_budget(space, tuple(config.units)):
        return config
    target = target_params(space, config.sparsity) + bias_budget(space, tuple(config.units))
    return dataclasses.replace(config, sparsity=min(target / space.total_cost, MAX_SPARSITY))


def warn_if_scored_for_another_repair(config: MethodConfig, repair: ReconstructConfig) -> None:
    """One warning when the method scores its sub-models for a repair other than this run's (e.g.
    `--sample-repair lstsq` with `--reconstruct none`): legal, but the shape is chosen for a model that
    does not ship."""
    wanted = config.scored_repair()
    if any(getattr(repair, name) != value for name, value in wanted.items()):

        def flags(settings):
            return " ".join(f"--{name.replace('_', '-')} {value}" for name, value in settings.items())

        have = {name: getattr(repair, name) for name in wanted}
        log.warning(
            "the search scores sub-models as %s repairs them, but this run repairs with %s: its shape is "
            "chosen for a model that does not ship (match them, e.g. --sample-repair none)",
            flags(wanted),
            flags(have),
        )


def run_repair(
    model: nn.Module, plan: Plan, tokenizer, data: DataConfig, repair: ReconstructConfig, batch_size: int
) -> tuple[dict[str, Any], Plan]:
    """Surgery with the repair; its record (settings, windows' fingerprint, per-layer errors, time) and
    the plan applied (`--reconstruct-select obs` may keep other units than the method's)."""
    windows = (
        None
        if repair.reconstruct == "none"
        else repair_windows(tokenizer, data, repair, model_context(model))
    )
    with phase({}, "repair") as m:
        if windows is None:
            apply_plan_(model, plan)
            record: dict[str, Any] = {"mode": "none"}
        else:
            record = reconstruct_(model, plan, windows, repair, batch_rows=batch_size)
            plan = record.pop("plan")
    record |= {"settings": jsonable(repair.to_dict()), "time_s": round(m.seconds, 2), "phase": m.record()}
    if windows is not None:
        record["calib"] = {
            "source": data.calib,
            "seed": data.seed,
            "nsamples": windows.shape[0],
            "seq_len": windows.shape[1],
            "windows": tensor_digest(windows),
        }
    return record, plan


@dataclass
class Search:
    """What the method found and what surrounds it: everything a repair and an evaluation reuse, so
    `compare` can finish one search with several repairs (`run_prune_modes`)."""

    plan: Plan
    report: dict[str, Any]
    space: UnitSpace  # the dense model's
    dense_params: int
    target: int
    eval_windows: torch.Tensor | None
    tasks: TaskSuite | None = None


def search(
    model,
    tokenizer,
    method,
    config,
    data,
    model_name,
    repair: ReconstructConfig,
    evaluate: bool,
    batch_size: int,
    tasks: TaskConfig | None = None,
    phases: dict[str, Any] | None = None,
) -> Search:
    """The method's plan (the model comes back unchanged) and the dense evaluation (cached).

    The tasks' datasets are read first: one out of reach fails before the method runs."""
    suite = load_tasks(tasks) if tasks is not None and tasks.enabled else None
    space = UnitSpace.from_model(model)
    dense_params = count_parameters(model)
    calib = calibration_windows(tokenizer, data)
    ev, ev_fp = evaluation_windows(tokenizer, data) if evaluate else (None, None)
    report: dict[str, Any] = {"model": model_name, "data": asdict(data), "split": data.describe()}
    report["phases"] = dict(phases or {})
    report["workers"] = distributed.world_size()
    warn_if_scored_for_another_repair(config, repair)
    # A method that scores sub-models as least-squares repaired fits its refits on the windows a repair
    # with these settings uses, whatever the run's mode: `compare --reconstruct none,lstsq` shares one
    # search between the two, which must not depend on the mode it was started with.
    fit = None
    if config.scored_repair().get("reconstruct") == "lstsq":
        fit = repair_windows(tokenizer, data, repair, model_context(model))
    # The method runs before any evaluation so that its peak memory is its own, not an eval batch's.
    with phase(report, "search") as m:
        plan = make_plan(model, method, paying_for_repair(config, space, repair), calib, fit)
    report["method_time_s"], report["method_peak_rss_mb"] = m.seconds, m.peak_rss_mb
    if m.cuda_peak_mb is not None:
        report["method_cuda_peak_mb"] = m.cuda_peak_mb
    report["calib_tokens"] = int(calib.numel())
    # Methods that run sub-model forwards record them in plan.info; metric methods use one calibration pass.
    report["forwards"] = plan.info.get("forwards")
    report["tokens"] = plan.info.get("tokens", int(calib.numel()))
    report["shapes"] = plan.shapes(space)  # kept GQA groups and MLP channels per layer
    report["dense_shapes"] = Plan.keep_all(space).shapes(space)
    report["dense_macs_per_token"] = linear_macs_per_token(model)
    if evaluate or suite is not None:
        weights = next(model.parameters())
        dense = {
            "model": model_fingerprint(model_name),  # the weights' content, not their path
            "dtype": str(weights.dtype),
            "device": input_device(model).type,  # CUDA kernels give slightly different figures than CPU
        }
    if evaluate:
        key = dense | {"eval": ev_fp, "seq_len": data.eval_seq_len, "tokens": int(ev.numel())}
        with phase(report, "dense_eval"):
            report["dense_eval"] = cached_perplexity(model, ev, key, batch_size)
    if suite is not None:
        key = dense | {"lm_tasks": suite.cache_key(), "batch_size": batch_size}
        with phase(report, "dense_tasks"):
            report["dense_tasks"] = cached_eval(
                key, lambda: run_tasks(model, tokenizer, suite, batch_size, "dense")
            )
    return Search(plan, report, space, dense_params, target_params(space, config.sparsity), ev, suite)


def finish(
    model, tokenizer, found: Search, data, repair: ReconstructConfig, batch_size: int
) -> tuple[dict[str, Any], Plan]:
    """Surgery with the repair on the dense `model`, the pruned evaluation; the plan.json record and the
    plan applied."""
    report = dict(found.report)
    report["phases"] = dict(report.get("phases", {}))
    report["reconstruct"], plan = run_repair(model, found.plan, tokenizer, data, repair, batch_size)
    report["phases"]["repair"] = report["reconstruct"].pop("phase")
    removed = found.space.total_cost - UnitSpace.from_model(model).total_cost
    if removed < found.target:  # never silently: the repair's biases were budgeted before selection
        raise ConfigError(
            f"the repaired model removes {removed} parameters, short of the target {found.target}"
        )
    report["pruned_macs_per_token"] = linear_macs_per_token(model)
    if found.eval_windows is not None:
        with phase(report, "pruned_eval"):
            report["pruned_eval"] = perplexity(model, found.eval_windows, batch_size)
    if found.tasks is not None:
        with phase(report, "pruned_tasks"):
            report["pruned_tasks"] = run_tasks(model, tokenizer, found.tasks, batch_size, "pruned")
    record = plan_record(plan, found.dense_params, found.space.total_cost, model)
    record["reconstruct"] = report["reconstruct"]
    record["report"] = report
    record["sparsity_definition"] = SPARSITY_DEFINITION
    return record, plan


def run_prune_modes(
    model,
    tokenizer,
    method,
    config,
    data,
    model_name,
    repairs: list[ReconstructConfig],
    evaluate=True,
    batch_size=8,
    tasks: TaskConfig | None = None,
) -> list[dict[str, Any]]:
    """One search finished with each repair in turn (each on a copy of the dense model but the last):
    the records `run_prune` would give, at the cost of one search. The repairs must agree on whether
    they add biases (the search budgets for them)."""
    if len({r.adds_biases for r in repairs}) > 1:
        raise ConfigError("repairs that add biases and repairs that do not need separate searches")
    found = search(
        model, tokenizer, method, config, data, model_name, repairs[0], evaluate, batch_size, tasks
    )
    records = []
    for i, repair in enumerate(repairs):
        target = model if i == len(repairs) - 1 else copy.deepcopy(model)
        records.append(finish(target, tokenizer, found, data, repair, batch_size)[0])
    return records


def _run_prune(
    model, tokenizer, method, config, data, model_name, out, overwrite, evaluate, batch_size, reserved, repair,
    tasks,
    phases,
) -> PruneResult:  # fmt: skip
    data.check_context(model)
    checkpoint = getattr(config, "checkpoint_dir", None)
    if overwrite and checkpoint and not getattr(config, "resume", False):
        # --overwrite starts a run over, its checkpoint included
        distributed.on_main(lambda: clear_state(checkpoint), "clearing the checkpoint")
    if out is not None:
        space = UnitSpace.from_model(model)
        need = _pruned_bytes(model, space, config.sparsity)
        distributed.on_main(lambda: check_free_space(Path(out).parent, need), "checking free space")
    found = search(
        model, tokenizer, method, config, data, model_name, repair, evaluate, batch_size, tasks, phases
    )
    record, plan = finish(model, tokenizer, found, data, repair, batch_size)
    files: list[Path] = []
    if out is not None:
        with phase(record["report"], "save"):  # recorded in the result; plan.json has the phases before it
            distributed.on_main(
                lambda: save_pruned(
                    model, out, None, tokenizer, overwrite=overwrite, record=record, reserved=reserved,
                    rescue_dirs=(checkpoint,) if checkpoint else (),
                ),
                "saving the output",
            )  # fmt: skip
        from secateurs.report import write_report

        files = distributed.on_main(lambda: write_report(out, record), "writing the report")
    return PruneResult(plan, record, model, files)
