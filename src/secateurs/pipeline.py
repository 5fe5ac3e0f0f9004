"""The prune job end to end: data, dense evaluation (cached), method, surgery, evaluation, save, report.

The CLI is a thin layer over `run_prune`; library users can call it, or the pieces, directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.data import eval_windows, load_documents, sample_windows
from secateurs.data.text import cache_dir, describe_split, fingerprint
from secateurs.errors import DataError
from secateurs.eval.loss import perplexity
from secateurs.eval.measure import measure
from secateurs.io import atomic_write_json, check_output_dir
from secateurs.methods.base import MethodConfig, get_method
from secateurs.scoring.select import check_reachable
from secateurs.surgery.apply import apply_plan_
from secateurs.surgery.saving import plan_record, save_pruned
from secateurs.units.plan import Plan
from secateurs.units.space import SPARSITY_DEFINITION, UnitSpace, count_parameters

log = logging.getLogger(__name__)


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


def cached_perplexity(
    model: nn.Module, windows: torch.Tensor, key: dict[str, Any], batch_size: int = 8
) -> dict:
    """Perplexity, cached on disk under `key` (the dense model's figure is computed once per setting)."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "eval" / f"{digest}.json"
    if path.is_file():
        return json.loads(path.read_text()) | {"cached": True}
    result = perplexity(model, windows, batch_size)
    atomic_write_json(path, result | {"key": key})
    return result


def make_plan(model: nn.Module, method: str, config: MethodConfig, calib: torch.Tensor) -> Plan:
    """Run a registered method; the model comes back unchanged."""
    cls = get_method(method)
    space = UnitSpace.from_model(model)
    check_reachable(space, config.sparsity, config.allocation, tuple(config.units))
    return cls(config).plan(model, space, calib)


@dataclass
class PruneResult:
    plan: Plan
    record: dict[str, Any]
    model: nn.Module


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
) -> PruneResult:
    """Prune `model` in place with `method` and write the result to `out` (atomically) if given."""
    if out is not None:
        check_output_dir(out, overwrite)  # fail before any work
    space = UnitSpace.from_model(model)
    dense_params, dense_prunable = count_parameters(model), space.total_cost
    calib = calibration_windows(tokenizer, data)
    ev, ev_fp = evaluation_windows(tokenizer, data) if evaluate else (None, None)
    report: dict[str, Any] = {"model": model_name, "data": asdict(data), "split": data.describe()}
    # The method runs before any evaluation so that its peak memory is its own, not an eval batch's.
    with measure() as m:
        plan = make_plan(model, method, config, calib)
    report["method_time_s"], report["method_peak_rss_mb"] = m.seconds, m.peak_rss_mb
    if m.cuda_peak_mb is not None:
        report["method_cuda_peak_mb"] = m.cuda_peak_mb
    report["calib_tokens"] = int(calib.numel())
    # Methods that run sub-model forwards record them in plan.info; metric methods use one calibration pass.
    report["forwards"] = plan.info.get("forwards")
    report["tokens"] = plan.info.get("tokens", int(calib.numel()))
    report["shapes"] = plan.shapes(space)  # kept GQA groups and MLP channels per layer
    if evaluate:
        key = {"model": model_name, "eval": ev_fp, "seq_len": data.eval_seq_len, "tokens": int(ev.numel())}
        key["dtype"] = str(next(model.parameters()).dtype)
        report["dense_eval"] = cached_perplexity(model, ev, key, batch_size)
    apply_plan_(model, plan)
    if evaluate:
        report["pruned_eval"] = perplexity(model, ev, batch_size)
    record = plan_record(plan, dense_params, dense_prunable, model)
    record["report"] = report
    record["sparsity_definition"] = SPARSITY_DEFINITION
    if out is not None:
        save_pruned(model, out, plan, tokenizer, overwrite=overwrite, record=record)
    return PruneResult(plan, record, model)
