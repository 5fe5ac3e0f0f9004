"""Export a model (dense, or pruned by secateurs) to another runtime's format: one module per target.

`EXPORTERS` maps a format name to its `Exporter` class (`base.py`); a new target is one module and one
line here. `export(model_or_dir, format, path, **opts)` writes one file atomically (a temporary sibling
renamed into place; nothing is left behind on failure), refusing an existing file unless
`overwrite=True`.

>>> secateurs.export("smollm2-pruned", "gguf", "model.gguf", outtype="q8_0")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from secateurs.errors import ConfigError
from secateurs.export.base import Exporter, ExportError, Shapes, atomic_output, possible_shapes, shapes_of
from secateurs.export.gguf import GGUFExporter
from secateurs.export.vllm import VLLMExporter
from secateurs.io import atomic_dir

log = logging.getLogger(__name__)

EXPORTERS: dict[str, type[Exporter]] = {
    GGUFExporter.name: GGUFExporter,
    VLLMExporter.name: VLLMExporter,
}


def get_exporter(format: str, **opts: Any) -> Exporter:
    """The target `format` with its options built (and validated) from `opts`."""
    try:
        cls = EXPORTERS[format]
    except KeyError:
        raise ConfigError(
            f"unknown export format {format!r}: choose from {', '.join(sorted(EXPORTERS))}"
        ) from None
    names = {f.name for f in dataclasses.fields(cls.options_class)}
    unknown = sorted(set(opts) - names)
    if unknown:
        raise ConfigError(f"export format {format!r} has no option(s) {', '.join(unknown)}")
    return cls(cls.options_class(**opts))


def parse_formats(text: str | None) -> list[str]:
    """`--export gguf,vllm` -> ["gguf", "vllm"], each checked against the registry."""
    formats = [f.strip() for f in (text or "").split(",") if f.strip()]
    for f in formats:
        get_exporter(f)
    return formats


def export(
    model_or_dir, format: str, path: str | Path, overwrite: bool = False, tokenizer=None, **opts: Any
) -> Path:
    """Write `model_or_dir` (a model directory, or an in-memory model with `tokenizer`) as `format`.

    An in-memory model is saved first (`secateurs.save`, into a temporary directory next to `path`),
    so both go through the one path that reads a directory: shapes from its skeleton, tensors streamed
    from its safetensors files.
    """
    exporter = get_exporter(format, **opts)
    path = Path(path)
    if isinstance(model_or_dir, str | Path):
        return _export_dir(exporter, Path(model_or_dir), path, overwrite)
    from secateurs.surgery.saving import save_pruned

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.model-", dir=path.parent))
    try:
        save_pruned(model_or_dir, tmp / "model", tokenizer=tokenizer)
        return _export_dir(exporter, tmp / "model", path, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export_dir(exporter: Exporter, source: Path, path: Path, overwrite: bool) -> Path:
    from secateurs.errors import ModelSourceError

    if not source.is_dir():
        raise ModelSourceError(f"no model directory at {source}")
    from secateurs.surgery.saving import load_skeleton

    exporter.check_expressible(shapes_of(load_skeleton(source)))  # before the output is touched
    output = atomic_dir(path, overwrite) if exporter.writes_directory else atomic_output(path, overwrite)
    with output as tmp:
        info = exporter.write(source, tmp)
    log.info("exported %s to %s (%s, %.1f MB)", source, path, info, output_bytes(path) / 2**20)
    return path


def output_bytes(path: Path) -> int:
    """Size of an export: a file, or every file in a directory target."""
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )


def check_before_search(
    formats: list[str],
    model,
    units: tuple[str, ...],
    adds_biases: bool,
    uniform_attention: bool = False,
    **opts,
) -> None:
    """`prune --export`: fail before the search when a target cannot express what it may produce."""
    shapes = possible_shapes(shapes_of(model), units, adds_biases, uniform_attention)
    for f in formats:
        get_exporter(f, **opts).check_expressible(shapes)


__all__ = [
    "EXPORTERS",
    "ExportError",
    "Exporter",
    "Shapes",
    "check_before_search",
    "export",
    "get_exporter",
    "output_bytes",
    "parse_formats",
    "possible_shapes",
    "shapes_of",
]
