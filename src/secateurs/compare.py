"""Side-by-side comparison: every method at every sparsity, same data, one table.

Each run is its own process (`secateurs prune ... --json`), so its peak memory is its own; the dense
evaluation is cached on disk and computed once; each run's result is cached under a key of (model,
method, sparsity, extra settings, the method's and the data's defaults, secateurs version), so a re-run
computes only what changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from secateurs.data.text import cache_dir
from secateurs.errors import ConfigError, SecateursError
from secateurs.io import atomic_write, atomic_write_json
from secateurs.pipeline import DataConfig

log = logging.getLogger(__name__)


@dataclass
class CompareConfig:
    model: str = "default"
    methods: tuple[str, ...] = ("magnitude", "wanda-sp", "flap", "random")
    sparsity: tuple[float, ...] = (0.2, 0.5)
    results: str = field(default="compare-results", metadata={"help": "where compare.md / compare.json go"})
    rerun: bool = field(default=False, metadata={"help": "ignore cached results"})
    device: str = "auto"
    dtype: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        if isinstance(self.sparsity, str):
            self.sparsity = tuple(float(s) for s in self.sparsity.split(",") if s.strip())
        from secateurs.methods import get_method

        for m in self.methods:
            get_method(m)
        for s in self.sparsity:
            if not 0 < s < 1:
                raise ConfigError(f"sparsity must be in (0, 1), got {s}")


def _settings_for(method: str, extra: dict[str, str]) -> list[str]:
    """Pass each extra setting only to the methods (or the data config) that have it."""
    from secateurs.methods import get_method

    names = {f.name for f in dataclasses.fields(get_method(method).config_class)}
    names |= {f.name for f in dataclasses.fields(DataConfig)}
    out = []
    for key, value in extra.items():
        if key.replace("-", "_") in names:
            out += [f"--{key}"] + ([] if value is None else [value])
    return out


def _defaults(method: str, sparsity: float) -> dict[str, Any]:
    """The method's and the data's default settings: part of the cache key, so that changing a default
    re-runs what it affects instead of serving a stale result."""
    from secateurs.methods import get_method

    config = get_method(method).config_class(sparsity=sparsity)
    return json.loads(
        json.dumps({"method": dataclasses.asdict(config), "data": dataclasses.asdict(DataConfig())})
    )


def _parse_extra(args: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}")
        key, _, value = a[2:].partition("=")
        if not value and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 1
        out[key] = value or None
        i += 1
    return out


def run_one(cfg: CompareConfig, method: str, sparsity: float, extra: list[str]) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "secateurs.cli",
        "-q",
        "prune",
        cfg.model,
        "--method",
        method,
        "--sparsity",
        str(sparsity),
        "--json",
        "--device",
        cfg.device,
        *extra,
    ]
    if cfg.dtype:
        cmd += ["--dtype", cfg.dtype]
    log.info("running %s", " ".join(cmd[2:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SecateursError(f"{method} at {sparsity}: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(method: str, sparsity: float, r: dict[str, Any]) -> dict[str, Any]:
    rep = r["report"]
    return {
        "method": method,
        "target": sparsity,
        "sparsity_attn_mlp": r["sparsity"],
        "sparsity_total": r["total_removed_share"],
        "ppl": rep["pruned_eval"]["ppl"],
        "dense_ppl": rep["dense_eval"]["ppl"],
        "time_s": rep["method_time_s"],
        "peak_rss_mb": rep["method_peak_rss_mb"],
        "cuda_peak_mb": rep.get("method_cuda_peak_mb"),
        "forwards": rep.get("forwards"),
        "tokens": rep.get("tokens"),
        "eval_tokens": rep["pruned_eval"]["tokens"],
        "eval_seq_len": rep["pruned_eval"]["seq_len"],
        "shapes": rep.get("shapes"),
    }


def to_markdown(rows: list[dict[str, Any]]) -> str:
    head = "| method | target | removed attn+MLP | removed total | held-out ppl | time (s) | peak RSS (MB) | forwards | tokens |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['target']:.0%} | {r['sparsity_attn_mlp']:.2%} | {r['sparsity_total']:.2%} | "
            f"{r['ppl']:.2f} | {r['time_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['forwards'] or '-'} | "
            f"{r['tokens'] or '-'} |"
        )
    if rows:
        r = rows[0]
        lines.append(
            f"\ndense perplexity {r['dense_ppl']:.2f}; evaluation: {r['eval_tokens']:,} held-out tokens, "
            f"seq_len {r['eval_seq_len']}. Peak RSS is each run's own process (model + method)."
        )
    return "\n".join(lines)


def run_compare(cfg: CompareConfig, passthrough: list[str] | None = None) -> list[dict[str, Any]]:
    from secateurs import __version__
    from secateurs.models.loading import model_id

    extra = _parse_extra(passthrough or [])
    rows = []
    jobs = [(m, s) for s in cfg.sparsity for m in cfg.methods]
    store = cache_dir() / "compare"
    store.mkdir(parents=True, exist_ok=True)
    for method, sparsity in tqdm(jobs, desc="compare", unit="run"):
        settings = _settings_for(method, extra)
        key = {
            "model": model_id(cfg.model),
            "method": method,
            "sparsity": sparsity,
            "settings": settings,
            "defaults": _defaults(method, sparsity),
            "device": cfg.device,
            "dtype": cfg.dtype,
            "version": __version__,
        }
        path = store / (hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")
        if path.is_file() and not cfg.rerun:
            result = json.loads(path.read_text())
        else:
            result = run_one(cfg, method, sparsity, settings)
            atomic_write_json(path, result)
        rows.append(_row(method, sparsity, result))
    out = Path(cfg.results)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(rows)
    atomic_write(out / "compare.md", md + "\n")
    atomic_write_json(out / "compare.json", rows)
    print(md)
    print(f"\nwritten to {out}/compare.md and compare.json")
    return rows


def add_compare_parser(sub, func) -> None:
    p = sub.add_parser(
        "compare",
        help="every method at every sparsity on the same data; one table (markdown + JSON)",
        description="Extra options (e.g. --nsamples 64, --masks-per-round 64) go to every method that has them.",
    )
    p.add_argument("model", nargs="?", default="default")
    p.add_argument("--methods", default=argparse_default(CompareConfig, "methods"))
    p.add_argument("--sparsity", default=argparse_default(CompareConfig, "sparsity"))
    p.add_argument("--results", default="compare-results")
    p.add_argument("--rerun", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.set_defaults(func=func)


def argparse_default(cls, name: str) -> str:
    value = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    return ",".join(str(v) for v in value)
