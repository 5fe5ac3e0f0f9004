"""What every export target shares: the interface, the shapes a prune may produce, the atomic write.

A target (`gguf.py`; later `vllm.py`) is one `Exporter` subclass registered in `export.EXPORTERS`. It
reads shapes only through `layer_geometry` on the directory's meta-device skeleton
(`surgery.saving.load_skeleton`), never from config.json, so a dense directory, a secateurs output of
any schema and a directory of an earlier version are read alike.

`check_expressible(shapes)` is the one test of "can this target run these shapes exactly": the export
calls it on the real shapes, and `secateurs prune --export` calls it before the search on
`possible_shapes` (what a search with the chosen units may produce), so an inexpressible combination
fails in the first second, not after the search.
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from secateurs.errors import OutputError, OutputExistsError, SecateursError
from secateurs.io import remove_stale_tmp, tmp_sibling, user_mode
from secateurs.models.adapters import FamilyAdapter, LayerGeometry, adapter_for, layer_geometry


class ExportError(SecateursError):
    """The target cannot express the model exactly (a layer's shape, a tokenizer, a setting)."""


@dataclass(frozen=True)
class Shapes:
    """What a target needs to know about a model's shapes: per-layer geometry plus the few facts
    `LayerGeometry` does not carry (q/k/v biases, the hidden size, the family)."""

    family: str
    hidden: int
    layers: tuple[LayerGeometry, ...]
    qkv_bias: bool = False
    hypothetical: bool = False  # from `possible_shapes`: messages then say "a plan may give ..."

    @property
    def uniform(self) -> bool:
        """Every layer has both blocks with the same groups and channels (biases may still differ)."""
        first = self.layers[0] if self.layers else None
        return all(
            g.has_attn and g.has_mlp and (g.n_groups, g.intermediate) == (first.n_groups, first.intermediate)
            for g in self.layers
        )

    def where(self, i: int) -> str:
        return (
            f"the search with these units may give shapes such as these: layer {i}"
            if self.hypothetical
            else f"layer {i}"
        )


def shapes_of(model: nn.Module, adapter: FamilyAdapter | None = None) -> Shapes:
    """The shapes of a model (a meta-device skeleton is enough: only module shapes are read)."""
    adapter = adapter or adapter_for(model)
    layers = tuple(layer_geometry(model, adapter))
    qkv_bias = any(
        any(lin.bias is not None for lin in adapter.attn_in(layer))
        for layer, g in zip(adapter.decoder_layers(model), layers, strict=True)
        if g.has_attn
    )
    return Shapes(adapter.name, model.config.hidden_size, layers, qkv_bias)


def possible_shapes(
    shapes: Shapes, units: tuple[str, ...], adds_biases: bool, uniform_attention: bool = False
) -> Shapes:
    """Shapes a prune of `shapes` with `units` may produce, with every feature it can introduce.

    Before a search nothing is known of the plan but its units, so this asks the target about the worst
    case: one GQA group and one channel fewer in layer 0 only (even `--allocation uniform` tops up one
    unit per layer, so counts may differ by one; with `uniform_attention` one group fewer everywhere), layer 0 without attention, layer 1 without its MLP,
    and output biases everywhere when the repair adds them. Whole-layer removal keeps shapes as they are.
    """
    from secateurs.units.space import Kind

    layers = list(shapes.layers)

    def edit(i: int, **change: Any) -> None:
        if i < len(layers):
            layers[i] = dataclasses.replace(layers[i], **change)

    if Kind.ATTN_GROUP in units and uniform_attention:  # the same count everywhere (`select`'s bundles)
        for i, g in enumerate(layers):
            if g.n_groups > 1:
                edit(i, n_groups=g.n_groups - 1)
    elif Kind.ATTN_GROUP in units and layers and layers[0].n_groups > 1:
        edit(0, n_groups=layers[0].n_groups - 1)
    if Kind.MLP_CHANNEL in units and layers and layers[0].intermediate > 1:
        edit(0, intermediate=layers[0].intermediate - 1)
    if Kind.ATTN_BLOCK in units:
        edit(0, has_attn=False, n_groups=0, o_bias=False)
    if Kind.MLP_BLOCK in units:
        edit(1 if len(layers) > 1 else 0, has_mlp=False, intermediate=0, down_bias=False)
    if adds_biases:
        layers = [dataclasses.replace(g, o_bias=g.has_attn, down_bias=g.has_mlp) for g in layers]
    return dataclasses.replace(shapes, layers=tuple(layers), hypothetical=True)


class Exporter(ABC):
    """One export target. Subclasses set the class attributes and implement the two methods.

    `options_class` is a dataclass of the target's settings (validated in `__post_init__`), built from
    `export(..., **opts)`; the CLI passes them through by name.
    """

    name: ClassVar[str]
    filename: ClassVar[str]  # what `prune --export NAME` writes inside the output directory
    description: ClassVar[str]
    options_class: ClassVar[type]
    writes_directory: ClassVar[bool] = False  # `write` fills a directory (`io.atomic_dir`), not a file

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.options_class()

    @abstractmethod
    def check_expressible(self, shapes: Shapes) -> None:
        """Raise `ExportError` naming the first layer the target cannot run exactly, and why."""

    @abstractmethod
    def write(self, source: Path, path: Path) -> dict[str, Any]:
        """Write the export of the model directory `source` to the (temporary) file `path`; returns a
        short summary (architecture, sizes) for logs and reports."""


@contextmanager
def atomic_output(path: str | Path, overwrite: bool) -> Iterator[Path]:
    """A temporary file next to `path`, renamed onto it when the block succeeds and removed otherwise.

    The file-sized sibling of `io.atomic_dir`: exports stream gigabytes, so they write a path rather
    than hand `io.atomic_write` the bytes.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(
            f"output {path} is a directory; give a file name such as {path / 'model.gguf'}"
        )
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output file {path} exists (use --overwrite to replace it)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(path)
        tmp = tmp_sibling(path)
        tmp.touch(mode=user_mode())
    except OSError as e:
        raise OutputError(f"cannot write next to {path}: {e.strerror or e}") from None
    try:
        yield tmp
        os.chmod(tmp, user_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
