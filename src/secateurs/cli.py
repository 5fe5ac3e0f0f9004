"""`secateurs` command line: prune, eval, bench, info, methods, compare, export.

Options for a method's settings are generated from its config dataclass, so a new method's settings
appear here without touching this file. Input errors print one line (a traceback only with --debug)
and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from secateurs.errors import ConfigError, SecateursError

log = logging.getLogger("secateurs")
DEBUG_ENV = "SECATEURS_DEBUG"  # set (not 0) to see tracebacks, like --debug

# Best forward-only method measured by `secateurs compare default` (README, "Default method"): 2.5x lower
# perplexity than any other at 50%, 6% above block-influence at 20%.
DEFAULT_METHOD = "policy-gradient"

# -- dataclass <-> argparse ---------------------------------------------------------------------------


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_tuple(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _sweep_of(base: type) -> Any:
    """An argparse type for `compare`: "A,B,C" -> [A, B, C], each converted by `base`; a list is a sweep."""

    def parse(text: str) -> list[Any]:
        return [base(x.strip()) for x in text.split(",") if x.strip()]

    parse.__name__ = f"{base.__name__} list"  # argparse names it in "invalid ... value"
    return parse


def _defaults(cls: type) -> dict[str, Any]:
    """A dataclass's defaults by field name (what its constructor uses for an option not given)."""
    missing = dataclasses.MISSING
    return {
        f.name: f.default if f.default is not missing else f.default_factory()  # type: ignore[misc]
        for f in dataclasses.fields(cls)
    }


def _show_default(value: Any) -> str:
    """How help text shows a default: tuples as the comma list one would type, enums by value."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "empty"
    return str(value)


def _add_field(
    container: Any,
    cls: type,
    name: str,
    *,
    default_text: str | None = None,
    hidden: bool = False,
    sweep: bool = False,
) -> None:
    """Add `cls`'s field `name` as an option of `container` (a parser or an argument group).

    The argparse default is SUPPRESS: only options the user gives reach the dataclass, whose own
    defaults apply otherwise, so the help text shows `cls`'s default but never decides it. `hidden`:
    parsed but not in the help. `sweep`: "A,B" becomes a list (see `_sweep_of`), except for tuple and
    bool fields, whose type says a comma list is one value.
    """
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    hint = typing.get_type_hints(cls)[name]
    base = typing.get_args(hint)[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    shown = _show_default(_defaults(cls)[name]) if default_text is None else default_text
    helptext = argparse.SUPPRESS
    if not hidden:
        helptext = (f.metadata.get("help", "") + f" (default: {shown})").strip().replace("%", "%%")
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": helptext, "dest": name}
    scalar = base if base in (int, float, str) else str
    if base is bool:
        container.add_argument(_option(name), action=argparse.BooleanOptionalAction, **kwargs)
    elif typing.get_origin(base) is tuple or base is tuple:
        container.add_argument(_option(name), type=_parse_tuple, metavar="A,B", **kwargs)
    elif sweep:
        container.add_argument(_option(name), type=_sweep_of(scalar), metavar="V[,V...]", **kwargs)
    else:
        container.add_argument(_option(name), type=scalar, **kwargs)


def _field_names(cls: type, skip: typing.Iterable[str] = ()) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in set(skip)]


def _build(cls: type, values: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


# -- commands ------------------------------------------------------------------------------------------


def _setup_common(p: argparse.ArgumentParser) -> None:
    # Any string: `resolve_device` (when the model loads) accepts cuda:N and says in one line what is wrong.
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per evaluation forward (default: 8)")


def _add_placement(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models larger than one device (accelerate's big-model loading)")
    g.add_argument(
        "--device-map",
        default=None,
        choices=["auto"],
        help="spread one copy over the GPUs, CPU memory and disk (with --device cpu: CPU and disk only; with "
        "--workers: each rank's own GPU, CPU and disk)",
    )
    g.add_argument(
        "--max-memory", default=None, help="per device, e.g. 0=20GiB,cpu=60GiB (per rank with --workers)"
    )
    g.add_argument(
        "--offload-folder", default=None, help="where disk-offloaded weights go (default: a temp dir)"
    )


def _load(args):
    from secateurs.models.loading import Placement, load_model, model_id

    placement = Placement(
        getattr(args, "device_map", None),
        getattr(args, "max_memory", None),
        getattr(args, "offload_folder", None),
    )
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, placement=placement)
    return model, tok, model_id(args.model)


def cmd_methods(args) -> int:
    from secateurs.methods import REGISTRY

    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        tag = "  [BACKPROP reference]" if cls.uses_backprop else ""
        print(f"{name:18s} {cls.description}{tag}")
    return 0


def cmd_info(args) -> int:
    from secateurs.units.space import SPARSITY_DEFINITION, UnitSpace, count_parameters

    model, _, name = _load(args)
    space = UnitSpace.from_model(model)
    rows = space.describe()
    print(f"model: {name}  ({space.adapter.name}, {space.n_layers} layers, hidden {space.hidden_size})")
    print(_table(rows, list(rows[0])))
    print(f"prunable parameters: {space.total_cost:,} of {count_parameters(model):,} total")
    print(SPARSITY_DEFINITION)
    return 0


def cmd_eval(args) -> int:
    from secateurs.eval.loss import perplexity
    from secateurs.eval.tasks import TaskConfig, load_tasks, run_tasks
    from secateurs.pipeline import DataConfig, evaluation_windows
    from secateurs.units.space import UnitSpace, count_parameters

    data = _build(DataConfig, vars(args) | {"eval": args.data})
    tasks = _build(TaskConfig, vars(args))
    suite = load_tasks(tasks) if tasks.enabled else None  # an unknown task or unreadable dataset fails now
    model, tok, name = _load(args)
    data.check_context(model, {"eval_seq_len": "--seq-len"})
    windows, _ = evaluation_windows(tok, data)
    r = perplexity(model, windows, args.batch_size)
    space = UnitSpace.from_model(model)
    print(f"model: {name}")
    print(
        f"perplexity {r['ppl']:.3f} on {r['tokens']:,} held-out tokens of {args.data} "
        f"({r['windows']} windows x seq_len {r['seq_len']}); {data.describe()}"
    )
    print(f"parameters: {count_parameters(model):,} total, {space.total_cost:,} prunable (attn+MLP)")
    if suite is not None:
        r["tasks"] = run_tasks(model, tok, suite, args.batch_size)
        print(_table(_task_rows(None, r["tasks"]), ["task", "metric", "value"]))
    if args.json:
        print(json.dumps(r))
    return 0


def _task_rows(dense: dict | None, pruned: dict) -> list[dict]:
    """One row per task and metric: the value (and, given `dense`, the dense model's beside it)."""
    from secateurs.eval.tasks import metrics_of, show

    rows = []
    for task, figures in pruned["tasks"].items():
        for metric in metrics_of(figures):
            if dense is None:
                rows.append({"task": task, "metric": metric, "value": show(figures, metric)})
                continue
            label = f"{task} {metric} ({figures['samples']} ex., {figures['n_shot']}-shot)"
            before = dense["tasks"].get(task, {})
            rows.append(
                {"": label, "before": show(before, metric), "after": show(figures, metric), "removed": ""}
            )
    return rows


def cmd_bench(args) -> int:
    from secateurs.eval.measure import bench_speed
    from secateurs.models.loading import load_model

    dense, _ = load_model(args.dense, device=args.device, dtype=args.dtype)
    pruned, _ = load_model(args.pruned, device=args.device, dtype=args.dtype)
    r = bench_speed(
        {"dense": dense, "pruned": pruned}, args.prompt_len, args.batch, args.new_tokens, args.repeats
    )
    d, p = r["dense"], r["pruned"]
    bound = d["macs_per_token"] / p["macs_per_token"]
    print(
        f"prompt {args.prompt_len} tokens x batch {args.batch}; decode {args.new_tokens} tokens; "
        f"median of {args.repeats} interleaved runs after 1 warm-up"
    )
    rows = [
        {
            "metric": "prefill tok/s",
            "dense": f"{d['prefill_tok_s']:.1f}",
            "pruned": f"{p['prefill_tok_s']:.1f}",
            "ratio": f"{p['prefill_tok_s'] / d['prefill_tok_s']:.2f}x",
            "MAC bound": f"{bound:.2f}x",
        },
        {
            "metric": "decode tok/s",
            "dense": f"{d['decode_tok_s']:.1f}",
            "pruned": f"{p['decode_tok_s']:.1f}",
            "ratio": f"{p['decode_tok_s'] / d['decode_tok_s']:.2f}x",
            "MAC bound": f"{bound:.2f}x",
        },
    ]
    print(_table(rows, list(rows[0])))
    if args.json:
        print(json.dumps(r))
    return 0


def cmd_prune(args) -> int:
    from secateurs import distributed

    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1 and not distributed.requested():
        return _launch_workers(args)
    if distributed.requested():
        if args.workers > 1 and args.workers != int(os.environ["WORLD_SIZE"]):
            raise ConfigError(
                f"--workers {args.workers} under a launcher that started {os.environ['WORLD_SIZE']}"
            )
        args.device = distributed.init(args.device)
    try:
        return _prune(args)
    finally:
        distributed.shutdown()


def _launch_workers(args) -> int:
    """`--workers N`: the same command line as N local ranks (`distributed.launch`); a killed rank 0's
    temporary output is cleared once every worker is gone."""
    from secateurs import distributed
    from secateurs.io import remove_stale_tmp

    _prune_settings(args)  # a bad setting fails here, once, not in every worker
    out = Path(args.out) if args.out else None
    return distributed.launch(
        args.argv, args.workers, on_exit=(lambda: remove_stale_tmp(out)) if out else None
    )


def _prune_settings(args) -> tuple[Any, Any, Any, Any, list[str]]:
    """The method, data, repair and task configs and the export formats of `prune`, validated (before
    anything loads, and before `--workers` starts anything)."""
    from secateurs.eval.tasks import TaskConfig
    from secateurs.methods import get_method
    from secateurs.pipeline import DataConfig
    from secateurs.surgery.reconstruct import ReconstructConfig

    values = vars(args)
    method_cls = get_method(args.method)
    known = {f.name for f in dataclasses.fields(method_cls.config_class)}
    foreign = [k for k in values if k in _all_method_fields() and k not in known]
    if foreign:
        raise ConfigError(
            f"method {args.method!r} has no setting(s) {', '.join(_option(k) for k in foreign)}"
        )
    config = _build(method_cls.config_class, values)  # validates sparsity etc. before loading anything
    data = _build(DataConfig, values)
    repair = _build(ReconstructConfig, values)
    tasks = _build(TaskConfig, values)
    return config, data, repair, tasks, _export_formats(args)


def _prune(args) -> int:
    from secateurs import distributed
    from secateurs.eval.measure import phase
    from secateurs.io import reserved_dir
    from secateurs.pipeline import run_prune
    from secateurs.units.space import SPARSITY_DEFINITION

    values = vars(args)
    config, data, repair, tasks, formats = _prune_settings(args)
    main = distributed.is_main()
    phases: dict[str, Any] = {}
    # an unwritable --out fails before the load (rank 0 writes it; the other ranks wait for its save)
    with reserved_dir(args.out if main else None, args.overwrite) as reserved:
        with phase(phases, "load"):
            model, tok, name = _load(args)
        if "batch_rows" not in values:
            config = _sized_batch(config, model, data)
        if formats:  # a target that cannot run what the search may produce fails now, not after it
            from secateurs.export import check_before_search

            check_before_search(
                formats,
                model,
                config.units,
                repair.adds_biases,
                config.uniform_attention,
                **_export_options(args),
            )
        res = run_prune(
            model,
            tok,
            args.method,
            config,
            data,
            name,
            args.out,
            args.overwrite,
            evaluate=not args.no_eval,
            batch_size=args.batch_size,
            reserved=reserved,
            repair=repair,
            tasks=tasks,
            phases=phases.get("phases"),
        )
    for fmt in formats:
        path = distributed.on_main(lambda f=fmt: _export_into_out(args, f), "export")
        if main:
            print(f"exported {fmt}: {path}")
    if not main:
        return 0
    _print_summary(res.record, args.out)
    print(SPARSITY_DEFINITION)
    if args.json:
        print(json.dumps(res.record["parameters"] | {"report": res.record["report"]}))
    return 0


def _sized_batch(config, model, data):
    """On CUDA, sub-model batches sized from free memory when `--batch-rows` is not given (the same on
    every rank: the smallest)."""
    from secateurs import distributed
    from secateurs.eval.loss import rows_for_free_memory

    rows = rows_for_free_memory(model, data.seq_len)
    if rows is None:
        return config
    rows = distributed.all_min(rows, "sizing batches")
    log.info("sub-model batches of %d rows, sized from free GPU memory (--batch-rows to set)", rows)
    return dataclasses.replace(config, batch_rows=rows)


def _export_into_out(args, fmt: str) -> Path:
    from secateurs.export import EXPORTERS, export

    return export(args.out, fmt, Path(args.out) / EXPORTERS[fmt].filename, **_export_options(args, fmt))


def _export_formats(args) -> list[str]:
    from secateurs.export import parse_formats

    formats = parse_formats(getattr(args, "export", None))
    if formats and not args.out:
        raise ConfigError("--export writes into the output directory: give --out DIR")
    return formats


def _export_options(args, fmt: str | None = None) -> dict[str, Any]:
    """The export options given on the command line that `fmt`'s target takes (all given when None)."""
    from secateurs.export import EXPORTERS

    given = {k: getattr(args, k) for k in ("outtype", "pad") if getattr(args, k, None) is not None}
    if fmt is None:
        return given
    names = {f.name for f in dataclasses.fields(EXPORTERS[fmt].options_class)}
    return {k: v for k, v in given.items() if k in names}


def cmd_export(args) -> int:
    from secateurs.export import export, output_bytes

    path = export(
        args.model, args.format, args.out, overwrite=args.overwrite, **_export_options(args, args.format)
    )
    print(f"exported {args.model} as {args.format} to {path} ({output_bytes(path) / 2**20:,.1f} MB)")
    return 0


def _add_export_options(parser: Any) -> None:
    parser.add_argument(
        "--outtype",
        default=None,
        help="GGUF tensor type: f32 | f16 | bf16 | q8_0 (default: f16; 1-D tensors f32)",
    )
    parser.add_argument(
        "--pad",
        action="store_true",
        default=None,
        help="GGUF: zero-pad per-layer shapes to one shape where llama.cpp has no per-layer architecture for "
        "the family (Qwen3); exact, but no speed-up where it pads",
    )


def _add_export(sub: Any) -> None:
    from secateurs.export import EXPORTERS

    ex = sub.add_parser(
        "export",
        help="write a model directory (dense or pruned) for another runtime, e.g. GGUF for llama.cpp",
        description="Written atomically; an existing --out is replaced only with --overwrite.",
    )
    ex.add_argument("model", help="a model directory (dense, or written by secateurs)")
    ex.add_argument("--format", required=True, choices=sorted(EXPORTERS), help="export target")
    ex.add_argument("--out", required=True, help="output file (gguf: model.gguf) or directory (vllm)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_export_options(ex)
    ex.set_defaults(func=cmd_export)


def _all_method_fields() -> set[str]:
    """Settings that belong to some method only (not shared, not data settings)."""
    from secateurs.methods import REGISTRY
    from secateurs.methods.base import MethodConfig
    from secateurs.pipeline import DataConfig

    shared = set(_field_names(MethodConfig)) | set(_field_names(DataConfig))
    return {n for c in REGISTRY.values() for n in _field_names(c.config_class)} - shared


def _print_summary(record: dict, out) -> None:
    p, r = record["parameters"], record["report"]
    print(
        f"\nmethod {record['method']} on {r['model']}  (time {r['method_time_s']:.1f} s, "
        f"peak RSS {r['method_peak_rss_mb']:.0f} MB)"
    )
    rows = [
        {
            "": "prunable (attn+MLP)",
            "before": f"{p['dense_prunable']:,}",
            "after": f"{p['pruned_prunable']:,}",
            "removed": f"{p['sparsity']:.2%}",
        },
        {
            "": "all parameters",
            "before": f"{p['dense_total']:,}",
            "after": f"{p['pruned_total']:,}",
            "removed": f"{p['total_removed_share']:.2%}",
        },
    ]
    if "pruned_eval" in r:
        d, q = r["dense_eval"], r["pruned_eval"]
        rows.append(
            {
                "": f"perplexity (seq {q['seq_len']}, {q['tokens']:,} tok)",
                "before": f"{d['ppl']:.3f}",
                "after": f"{q['ppl']:.3f}",
                "removed": "",
            }
        )
    if "pruned_tasks" in r:
        rows += _task_rows(r["dense_tasks"], r["pruned_tasks"])
    print(_table(rows, list(rows[0])))
    phases = [
        {
            "phase": name,
            "time s": f"{ph['seconds']:.1f}",
            "peak RSS MB": f"{ph['peak_rss_mb']:.0f}",
            "peak CUDA MB": f"{ph['cuda_peak_mb']:.0f}" if "cuda_peak_mb" in ph else "-",
        }
        for name, ph in r.get("phases", {}).items()
    ]
    if phases:
        workers = r.get("workers", 1)
        print(f"time and peak memory per phase{f' (busiest of {workers} ranks)' if workers > 1 else ''}:")
        print(_table(phases, list(phases[0])))
    shape = [
        {
            "layer": u["layer"],
            "attn groups": "dropped"
            if u["drop_attn"]
            else ("all" if u["kept_groups"] is None else len(u["kept_groups"])),
            "mlp channels": "dropped"
            if u["drop_mlp"]
            else ("all" if u["n_kept_channels"] is None else u["n_kept_channels"]),
        }
        for u in record["removed_units"]
    ]
    print("per-layer shape chosen:")
    print(_table(shape, ["layer", "attn groups", "mlp channels"]))
    print(f"data: {r['split']}")
    if out:
        print(
            f"saved to {out}  (plan.json records the plan, settings, seed and versions; README.md is the model card):"
        )
        for path in sorted(Path(out).iterdir()):
            print(f"  {path.name}{'/' if path.is_dir() else ''}  ({_size(path)})")


def _size(path: Path) -> str:
    """A file's or a directory's size, in KB under 1 MB."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    size = sum(p.stat().st_size for p in files)
    return f"{size / 2**20:,.1f} MB" if size >= 2**20 else f"{size / 2**10:,.1f} KB"


def cmd_apply(args) -> int:
    from secateurs.io import reserved_dir
    from secateurs.pipeline import DataConfig, run_repair
    from secateurs.surgery.reconstruct import ReconstructConfig
    from secateurs.surgery.saving import plan_record, save_pruned
    from secateurs.units.plan import Plan
    from secateurs.units.space import UnitSpace, count_parameters

    plan = Plan.load(args.plan)
    recorded = json.loads(Path(args.plan).read_text(encoding="utf-8"))
    repair = _build(ReconstructConfig, _recorded_repair(recorded) | vars(args))
    data = _build(DataConfig, _recorded_calib(recorded) | vars(args))
    with reserved_dir(args.out, args.overwrite) as reserved:
        model, tok, _ = _load(args)
        space = UnitSpace.from_model(model)
        plan = plan.canonical(space)  # a plan for another model fails here, before anything is written
        dense_params = count_parameters(model)
        repaired, plan = run_repair(model, plan, tok, data, repair, args.batch_size)
        record = plan_record(plan, dense_params, space.total_cost, model) | {"reconstruct": repaired}
        save_pruned(model, args.out, plan, tok, overwrite=args.overwrite, record=record, reserved=reserved)
    p = record["parameters"]
    print(
        f"applied {args.plan} ({plan.method}, repair {repair.reconstruct}): sparsity {p['sparsity']:.2%} of "
        f"attn+MLP, {p['total_removed_share']:.2%} of all parameters; saved to {args.out}"
    )
    return 0


def _recorded_repair(recorded: dict) -> dict[str, Any]:
    """The repair settings a plan.json records (none before secateurs recorded them: the defaults), with
    the window shape the run used, so a later change of the default windows does not change `apply`."""
    repair = recorded.get("reconstruct") or {}
    settings = dict(repair.get("settings") or {})
    if not settings:
        return settings
    if "reconstruct_toward" not in settings:
        settings["reconstruct_toward"] = (
            "zero"  # recorded before the ridge could pull toward the kept weights
        )
    # recorded before the repair could choose the units itself: the plan's units, as they were
    settings.setdefault("reconstruct_select", "plan")
    used = repair.get("calib") or {}
    # Recorded before the shape was: 0 then meant the method's own windows (`report.data`).
    data = (recorded.get("report") or {}).get("data") or {}
    for key, data_key in (("reconstruct_nsamples", "nsamples"), ("reconstruct_seq_len", "seq_len")):
        if not settings.get(key):
            settings[key] = used.get(data_key) or data.get(data_key) or 0
    return settings


def _recorded_calib(recorded: dict) -> dict[str, Any]:
    """The calibration text a plan.json's run used, so `apply` refits on the same windows."""
    data = (recorded.get("report") or {}).get("data") or {}
    return {k: data[k] for k in ("calib", "text_field", "seed", "nsamples", "seq_len") if k in data}


def cmd_compare(args) -> int:
    from secateurs.compare import CompareConfig, run_compare, setting_names, to_markdown
    from secateurs.eval.tasks import TaskConfig

    values = vars(args)
    settings = {k: values[k] for k in sorted(setting_names()) if k in values}
    tasks = _build(TaskConfig, values)
    cfg = _build(
        CompareConfig, values | {"settings": settings, "evaluate": not args.no_eval, "task_eval": tasks}
    )
    rows = run_compare(cfg)
    print(to_markdown(rows))
    written = ", ".join(p.name for p in sorted(Path(cfg.results).glob("compare.*")))
    print(f"\nwritten to {cfg.results}: {written}")
    return 0


def _table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(str(c)), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    line = "| " + " | ".join(str(c).ljust(widths[c]) for c in cols) + " |"
    sep = "|" + "|".join("-" * (widths[c] + 2) for c in cols) + "|"
    body = ["| " + " | ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) + " |" for r in rows]
    return "\n".join([line, sep, *body])


# -- parser --------------------------------------------------------------------------------------------


def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    """The `secateurs` parser, one step per subcommand.

    `method`: the `--method` given to prune (see `_chosen_method`); its help then shows that method's
    settings and defaults only. None shows every method's group, and the default method's defaults for
    the shared settings.
    """
    p = argparse.ArgumentParser(prog="secateurs", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings in the log")
    sub = p.add_subparsers(dest="command", required=True)
    _add_prune(sub, method)
    _add_eval(sub)
    _add_bench(sub)
    _add_apply(sub)
    _add_info(sub)
    _add_methods(sub)
    _add_compare(sub)
    _add_export(sub)
    return p


def _add_prune(sub: Any, method: str | None) -> None:
    """prune: run options, the shared settings with the chosen method's defaults, the data settings,
    then one group per method shown (see `_add_method_groups`)."""
    from secateurs.methods import get_method
    from secateurs.methods.base import MethodConfig
    from secateurs.pipeline import DataConfig

    chosen = get_method(method or DEFAULT_METHOD)  # an unknown --method fails here, in one line
    pr = sub.add_parser(
        "prune",
        help="prune a model and save the smaller one",
        description="`secateurs prune --method NAME --help` shows that method's settings and defaults.",
    )
    pr.add_argument("model", help="default | model dir | file.gguf | hub id")
    pr.add_argument(
        "--method", default=DEFAULT_METHOD, help=f"a registered method (default: {DEFAULT_METHOD})"
    )
    pr.add_argument("--out", default=None, help="output directory (written atomically)")
    pr.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out and start over an existing --checkpoint-dir",
    )
    pr.add_argument("--no-eval", action="store_true", help="skip perplexity before/after")
    pr.add_argument("--json", action="store_true", help="also print the record as JSON")
    pr.add_argument(
        "--workers",
        type=int,
        default=1,
        help="data-parallel ranks started locally (gloo on CPU, NCCL with one GPU each on CUDA); the plan is "
        "the same for any number (default: 1; under torchrun, its --nproc-per-node)",
    )
    pr.add_argument(
        "--export",
        default=None,
        metavar="FMT[,FMT]",
        help="also write OUT/model.gguf (gguf), OUT/vllm/ (vllm); checked against the target before the search",
    )
    _add_export_options(pr)
    _setup_common(pr)
    _add_placement(pr)
    shared = pr.add_argument_group(
        "settings every method shares", f"defaults shown are those of --method {chosen.name}"
    )
    for name in _field_names(MethodConfig):
        _add_field(shared, chosen.config_class, name)
    data = pr.add_argument_group("calibration and evaluation text")
    for name in _field_names(DataConfig, skip=("seed",)):  # seed: the shared one seeds both
        _add_field(data, DataConfig, name)
    _add_repair_group(pr)
    _add_task_group(pr)
    _add_method_groups(pr, chosen, all_shown=method is None)
    pr.set_defaults(func=cmd_prune)


def _add_method_groups(pr: argparse.ArgumentParser, chosen: type, all_shown: bool) -> None:
    """One argument group per method shown (every registered one, or only `chosen`), with its own
    defaults; the options of methods not shown are parsed but hidden, so that `cmd_prune` refuses them
    in one line ("method 'x' has no setting(s) --y") instead of argparse's usage message.

    An option two methods share (--channel-bundle) is listed under the first; the other's group names
    it with its own default. A method whose default for a shared setting differs from the one shown
    above (wanda-sp's --allocation) says so in its group's description.
    """
    from secateurs.methods import REGISTRY
    from secateurs.methods.base import MethodConfig
    from secateurs.pipeline import DataConfig

    shared = _field_names(MethodConfig)
    common = set(shared) | set(_field_names(DataConfig))
    shown = [REGISTRY[n] for n in sorted(REGISTRY)] if all_shown else [chosen]
    base = _defaults(chosen.config_class)
    listed: set[str] = set()
    for cls in shown:
        defaults = _defaults(cls.config_class)
        own = [n for n in _field_names(cls.config_class) if n not in common]
        notes = [cls.description]
        differ = [f"{_option(n)} {_show_default(defaults[n])}" for n in shared if defaults[n] != base[n]]
        if differ:
            notes.append(f"its defaults of shared settings: {', '.join(differ)}")
        again = [f"{_option(n)} (default: {_show_default(defaults[n])})" for n in own if n in listed]
        if again:
            notes.append(f"also takes {', '.join(again)}, listed above")
        group = pr.add_argument_group(f"{cls.name} settings", "; ".join(notes))
        for name in own:
            if name not in listed:
                _add_field(group, cls.config_class, name)
                listed.add(name)
    for cls in REGISTRY.values():
        for name in _field_names(cls.config_class):
            if name not in common and name not in listed:
                _add_field(pr, cls.config_class, name, hidden=True)
                listed.add(name)


def _add_eval(sub: Any) -> None:
    from secateurs.pipeline import DataConfig

    ev = sub.add_parser("eval", help="held-out perplexity and parameter counts")
    ev.add_argument("model")
    ev.add_argument("--data", default="default", help="default | FILE.txt | FILE.jsonl | wikitext2 | c4")
    ev.add_argument("--json", action="store_true")
    _setup_common(ev)
    _add_placement(ev)
    for name in _field_names(DataConfig, skip=("calib", "eval", "nsamples", "seq_len", "seed")):
        _add_field(ev, DataConfig, name)
    ev.add_argument(
        "--seq-len",
        dest="eval_seq_len",
        type=int,
        default=argparse.SUPPRESS,
        help=f"evaluation window length (default: {_defaults(DataConfig)['eval_seq_len']})",
    )
    _add_task_group(ev)
    ev.set_defaults(func=cmd_eval)


def _add_bench(sub: Any) -> None:
    be = sub.add_parser("bench", help="prefill and decode speed, dense vs pruned, in one run")
    be.add_argument("dense")
    be.add_argument("pruned")
    be.add_argument("--prompt-len", type=int, default=256)
    be.add_argument("--batch", type=int, default=1)
    be.add_argument("--new-tokens", type=int, default=32)
    be.add_argument("--repeats", type=int, default=5)
    be.add_argument("--json", action="store_true")
    _setup_common(be)
    be.set_defaults(func=cmd_bench)


def _add_task_group(parser: argparse.ArgumentParser) -> None:
    from secateurs.eval.tasks import TaskConfig

    group = parser.add_argument_group(
        "task accuracy through lm-eval (pip install -e '.[eval]'; --batch-size rows per forward)"
    )
    shown = {"include_path": "none", "limit": "all", "num_fewshot": "each task's own, else 0"}
    for name in _field_names(TaskConfig):
        _add_field(group, TaskConfig, name, default_text=shown.get(name))


def _add_repair_group(parser: argparse.ArgumentParser) -> None:
    from secateurs.surgery.reconstruct import ReconstructConfig

    group = parser.add_argument_group("repair after removal (surgery.reconstruct)")
    for name in _field_names(ReconstructConfig):
        _add_field(group, ReconstructConfig, name)


def _add_apply(sub: Any) -> None:
    from secateurs.pipeline import DataConfig

    ap = sub.add_parser(
        "apply",
        help="apply a saved plan.json to a model and save the result",
        description="The repair settings and calibration text default to those plan.json records.",
    )
    ap.add_argument("model")
    ap.add_argument("--plan", required=True, help="plan.json written by a previous prune")
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true")
    _setup_common(ap)
    _add_placement(ap)
    for name in ("calib", "text_field", "seed", "nsamples", "seq_len"):  # the repair's windows
        _add_field(ap, DataConfig, name)
    _add_repair_group(ap)
    ap.set_defaults(func=cmd_apply)


def _add_info(sub: Any) -> None:
    inf = sub.add_parser("info", help="prunable units per layer, their costs and totals")
    inf.add_argument("model")
    _setup_common(inf)
    _add_placement(inf)
    inf.set_defaults(func=cmd_info)


def _add_methods(sub: Any) -> None:
    me = sub.add_parser("methods", help="list registered methods")
    me.set_defaults(func=cmd_methods)


def _add_compare(sub: Any) -> None:
    """compare: its own axes (methods, sparsities), then every prune setting, sweepable (see
    `secateurs.compare`); an option it does not know is refused in `main`."""
    from secateurs.compare import CompareConfig

    co = sub.add_parser(
        "compare",
        help="every method at every sparsity on the same data; one table (markdown + JSON)",
        description="Every prune setting goes to each method that has it. A comma list (--seed 0,1,2) "
        "runs each value, several give their product; tuple settings (--units A,B, --alphas) take it as "
        "one value.",
    )
    co.add_argument("model", nargs="?", default="default", help="as for prune (default: default)")
    defaults = _defaults(CompareConfig)
    for name, what in (("methods", "methods"), ("sparsity", "targets")):
        shown = _show_default(defaults[name])
        co.add_argument(_option(name), default=shown, help=f"comma-separated {what} (default: {shown})")
    co.add_argument("--results", default=defaults["results"], help="where compare.md / compare.json go")
    co.add_argument("--rerun", action="store_true", help="ignore cached results")
    co.add_argument("--no-eval", action="store_true", help="skip perplexity (time and memory only)")
    _setup_common(co)
    _add_task_group(co)
    _add_prune_settings(co.add_argument_group("prune settings (each goes to the methods that have it)"))
    co.set_defaults(func=cmd_compare)


def _add_prune_settings(group: Any) -> None:
    """Every setting `compare` forwards, shared ones first; a default that differs between methods is
    shown as "each method's own"."""
    from secateurs.compare import setting_names
    from secateurs.methods import REGISTRY
    from secateurs.methods.base import MethodConfig
    from secateurs.pipeline import DataConfig
    from secateurs.surgery.reconstruct import ReconstructConfig

    classes = [
        MethodConfig,
        DataConfig,
        ReconstructConfig,
        *(REGISTRY[n].config_class for n in sorted(REGISTRY)),
    ]
    names = setting_names()
    for cls in classes:
        for name in _field_names(cls):
            if name not in names:
                continue
            names.discard(name)
            values = {_show_default(_defaults(c)[name]) for c in classes[3:] if name in _field_names(c)} or {
                _show_default(_defaults(cls)[name])
            }
            shown = values.pop() if len(values) == 1 else "each method's own"
            _add_field(group, cls, name, default_text=shown, sweep=True)


def _chosen_method(argv: list[str]) -> str | None:
    """The value of prune's `--method` (exact `--method X` / `--method=X`), read before the parser is
    built because its help shows that method's defaults; None for other commands or when not given.
    (An abbreviated --meth still selects the method; only the help shows every method then.)"""
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is None or argv[command] != "prune":
        return None
    rest = argv[command + 1 :]
    for i, a in enumerate(rest):
        if a == "--method" and i + 1 < len(rest):
            return rest[i + 1]
        if a.startswith("--method="):
            return a.partition("=")[2]
    return None


def _rank_tag() -> str:
    """ "[rank R] " in a data-parallel worker other than rank 0, so that its error says whose it is."""
    rank = os.environ.get("RANK")
    return f"[rank {rank}] " if rank not in (None, "0") and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        parser = build_parser(_chosen_method(argv))
        args, extra = parser.parse_known_args(argv)
        if extra and args.command == "compare":
            names = [a.partition("=")[0] for a in extra if a.startswith("-")] or extra
            raise ConfigError(f"compare has no option(s) {' '.join(names)}; it takes the settings of prune")
        if extra:
            parser.error(f"unrecognised arguments: {' '.join(extra)}")
        logging.basicConfig(
            level=logging.WARNING if args.quiet else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        args.argv = argv  # `--workers` starts the same command line again
        return args.func(args)
    except SecateursError as e:
        if debug:
            raise
        print(f"secateurs: error: {_rank_tag()}{e}", file=sys.stderr)
        return 2
    except OSError as e:  # an I/O failure a user can fix (permissions, space, a vanished file)
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"secateurs: error: {_rank_tag()}{where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("secateurs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
