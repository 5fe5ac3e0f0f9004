"""`secateurs` command line: prune, eval, bench, info, methods, compare.

Options for a method's settings are generated from its config dataclass, so a new method's settings
appear here without touching this file. Input errors print one line (a traceback only with --debug)
and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from typing import Any

from secateurs.errors import ConfigError, SecateursError

log = logging.getLogger("secateurs")

# -- dataclass <-> argparse ---------------------------------------------------------------------------


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_tuple(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, seen: set[str], skip=()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in seen or f.name in skip:
            continue
        seen.add(f.name)
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        helptext = f.metadata.get("help", "") + f" (default: {default})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": helptext, "dest": f.name}
        base = (
            typing.get_args(hint)[0] if typing.get_origin(hint) in (typing.Union, type(int | None)) else hint
        )
        if base is bool:
            parser.add_argument(_option(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(base) is tuple or base is tuple:
            parser.add_argument(_option(f.name), type=_parse_tuple, metavar="A,B", **kwargs)
        elif base in (int, float, str):
            parser.add_argument(_option(f.name), type=base, **kwargs)
        else:
            parser.add_argument(_option(f.name), type=str, **kwargs)


def _build(cls: type, values: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


# -- commands ------------------------------------------------------------------------------------------


def _method_config_classes() -> list[type]:
    from secateurs.methods import REGISTRY

    seen, out = set(), []
    for cls in REGISTRY.values():
        if cls.config_class not in seen:
            seen.add(cls.config_class)
            out.append(cls.config_class)
    return out


def _setup_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per evaluation forward")


def _load(args):
    from secateurs.models.loading import load_model, model_id

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
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
    from secateurs.pipeline import DataConfig, evaluation_windows
    from secateurs.units.space import UnitSpace, count_parameters

    data = _build(DataConfig, vars(args) | {"eval": args.data})
    model, tok, name = _load(args)
    windows, _ = evaluation_windows(tok, data)
    r = perplexity(model, windows, args.batch_size)
    space = UnitSpace.from_model(model)
    print(f"model: {name}")
    print(
        f"perplexity {r['ppl']:.3f} on {r['tokens']:,} held-out tokens of {args.data} "
        f"({r['windows']} windows x seq_len {r['seq_len']}); {data.describe()}"
    )
    print(f"parameters: {count_parameters(model):,} total, {space.total_cost:,} prunable (attn+MLP)")
    if args.json:
        print(json.dumps(r))
    return 0


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
    from secateurs.io import check_output_dir
    from secateurs.methods import get_method
    from secateurs.pipeline import DataConfig, run_prune
    from secateurs.units.space import SPARSITY_DEFINITION

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
    if args.out:
        check_output_dir(args.out, args.overwrite)
    model, tok, name = _load(args)
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
    )
    _print_summary(res.record, args.out)
    print(SPARSITY_DEFINITION)
    if args.json:
        print(json.dumps(res.record["parameters"] | {"report": res.record["report"]}))
    return 0


def _all_method_fields() -> set[str]:
    """Settings that belong to some method only (not shared, not data settings)."""
    from secateurs.methods.base import MethodConfig
    from secateurs.pipeline import DataConfig

    shared = {f.name for f in dataclasses.fields(MethodConfig)} | {
        f.name for f in dataclasses.fields(DataConfig)
    }
    return {f.name for c in _method_config_classes() for f in dataclasses.fields(c)} - shared


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
    print(_table(rows, list(rows[0])))
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
        print(f"saved to {out}  (plan.json records the plan, settings, seed and versions)")


def cmd_apply(args) -> int:
    from secateurs.io import check_output_dir
    from secateurs.surgery.apply import apply_plan_
    from secateurs.surgery.saving import plan_record, save_pruned
    from secateurs.units.plan import Plan
    from secateurs.units.space import UnitSpace, count_parameters

    plan = Plan.load(args.plan)
    check_output_dir(args.out, args.overwrite)
    model, tok, _ = _load(args)
    space = UnitSpace.from_model(model)
    plan = plan.canonical(space)  # a plan for another model fails here, before anything is written
    dense_params = count_parameters(model)
    apply_plan_(model, plan)
    record = plan_record(plan, dense_params, space.total_cost, model)
    save_pruned(model, args.out, plan, tok, overwrite=args.overwrite, record=record)
    p = record["parameters"]
    print(
        f"applied {args.plan} ({plan.method}): sparsity {p['sparsity']:.2%} of attn+MLP, "
        f"{p['total_removed_share']:.2%} of all parameters; saved to {args.out}"
    )
    return 0


def cmd_compare(args) -> int:
    from secateurs.compare import CompareConfig, run_compare

    cfg = _build(CompareConfig, vars(args))
    run_compare(cfg, passthrough=args.extra)
    return 0


def _table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(str(c)), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    line = "| " + " | ".join(str(c).ljust(widths[c]) for c in cols) + " |"
    sep = "|" + "|".join("-" * (widths[c] + 2) for c in cols) + "|"
    body = ["| " + " | ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) + " |" for r in rows]
    return "\n".join([line, sep, *body])


# -- parser --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from secateurs.methods.base import MethodConfig
    from secateurs.pipeline import DataConfig

    p = argparse.ArgumentParser(prog="secateurs", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings in the log")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prune", help="prune a model and save the smaller one")
    pr.add_argument("model", help="default | model dir | file.gguf | hub id")
    pr.add_argument(
        "--method", default=DEFAULT_METHOD, help=f"a registered method (default {DEFAULT_METHOD})"
    )
    pr.add_argument("--out", default=None, help="output directory (written atomically)")
    pr.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    pr.add_argument("--no-eval", action="store_true", help="skip perplexity before/after")
    pr.add_argument("--json", action="store_true", help="also print the record as JSON")
    _setup_common(pr)
    seen: set[str] = set()
    _add_dataclass_options(pr, MethodConfig, seen)
    _add_dataclass_options(pr, DataConfig, seen, skip=("seed",))
    for cls in _method_config_classes():
        _add_dataclass_options(pr, cls, seen)
    pr.set_defaults(func=cmd_prune)

    ev = sub.add_parser("eval", help="held-out perplexity and parameter counts")
    ev.add_argument("model")
    ev.add_argument("--data", default="default", help="default | FILE.txt | FILE.jsonl | wikitext2 | c4")
    ev.add_argument("--json", action="store_true")
    _setup_common(ev)
    _add_dataclass_options(ev, DataConfig, set(), skip=("calib", "eval", "nsamples", "seq_len", "seed"))
    ev.add_argument(
        "--seq-len",
        dest="eval_seq_len",
        type=int,
        default=argparse.SUPPRESS,
        help="evaluation window length (default 256)",
    )
    ev.set_defaults(func=cmd_eval)

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

    ap = sub.add_parser("apply", help="apply a saved plan.json to a model and save the result")
    ap.add_argument("model")
    ap.add_argument("--plan", required=True, help="plan.json written by a previous prune")
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true")
    _setup_common(ap)
    ap.set_defaults(func=cmd_apply)

    inf = sub.add_parser("info", help="prunable units per layer, their costs and totals")
    inf.add_argument("model")
    _setup_common(inf)
    inf.set_defaults(func=cmd_info)

    me = sub.add_parser("methods", help="list registered methods")
    me.set_defaults(func=cmd_methods)

    try:
        from secateurs.compare import add_compare_parser

        add_compare_parser(sub, cmd_compare)
    except ImportError:
        pass
    return p


# Best forward-only method measured by `secateurs compare default` (README, "Default method"): 2.5x lower
# perplexity than any other at 50%, 6% above block-influence at 20%.
DEFAULT_METHOD = "policy-gradient"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "compare":
            parser.error(f"unrecognised arguments: {' '.join(extra)}")
        args.extra = extra
        logging.basicConfig(
            level=logging.WARNING if args.quiet else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        return args.func(args)
    except SecateursError as e:
        if debug:
            raise
        print(f"secateurs: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("secateurs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
