"""GGUF for llama.cpp, heterogeneous shapes included, streamed tensor by tensor from safetensors.

Which llama.cpp architecture a model gets:

* every layer with both blocks and the same GQA groups and MLP channels: the family's stock
  architecture (`llama` for Llama and Mistral, `qwen2`, `qwen3`), as llama.cpp's own converter writes it;
* anything else (groups or channels per layer, a removed attention or MLP block) for the Llama-style
  families: `deci` (Nemotron-NAS), whose graph reads head counts and FFN width per layer. A layer with
  no attention is `head_count = 0` (the input passes through); a layer with no MLP is written as a
  one-channel MLP with zero weights, because `feed_forward_length = 0` makes `deci` skip the rest of
  the layer, attention output included. Removed layers are not written;
* families without such an architecture (Qwen3: `deci` has no q/k norms) refuse per-layer shapes with
  an error naming the layer, unless `pad=True`: every layer is then zero-padded to the largest
  group and channel counts in the stock architecture. Padding is exact (zero heads and channels add
  nothing) but gives no speed-up where it pads.

What the bundled llama.cpp accepts is in `ARCHS` (tensors it declares, bias widths, rope style); the
tests run every combination through a real llama.cpp and compare with transformers.

Tokenizer: byte-level BPE from `tokenizer.json` (`tokenizer.ggml.model = gpt2`), with special tokens,
`add_bos`, and the chat template. llama.cpp picks its pre-tokenizer (the regex that splits text before
BPE) by the name in `tokenizer.ggml.pre`; `pre_tokenizer_name` derives it from what the tokenizer
itself does, see there. SentencePiece tokenizers are refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secateurs.errors import ConfigError, ModelSourceError
from secateurs.export.base import Exporter, ExportError, Shapes, shapes_of
from secateurs.models.adapters import FamilyAdapter, LayerGeometry, adapter_for

log = logging.getLogger(__name__)


# -- what the bundled llama.cpp runs -----------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """One llama.cpp architecture, as the llama.cpp that the tests run (xllamacpp's) loads it.

    `rope_norm`: llama.cpp's NORM rope rotates consecutive pairs, HF's `rotate_half` the two halves of
    a head, so q/k rows are permuted per head (NEOX-rope architectures take HF's order as it is).
    `q_hidden`: `attn_q.weight` is declared hidden x hidden, so the query heads must fill the hidden size.
    `q_bias_hidden`: `attn_q.bias` declared with the hidden size rather than heads x head_dim (some
    llama.cpp versions; not the bundled one). `biases`: the bias tensors it declares (optional unless in
    `required_biases`); a tensor it does not declare fails the load ("wrong number of tensors").
    """

    name: str
    rope_norm: bool
    per_layer: bool = False
    qk_norm: bool = False
    q_hidden: bool = False
    q_bias_hidden: bool = False
    biases: frozenset[str] = frozenset()
    required_biases: frozenset[str] = frozenset()


_QKV = frozenset({"q", "k", "v"})
_ALL_BIASES = _QKV | {"o", "gate", "up", "down"}
ARCHS = {
    "llama": Arch("llama", rope_norm=True, biases=_ALL_BIASES),
    "deci": Arch("deci", rope_norm=True, per_layer=True, biases=_ALL_BIASES),
    "qwen2": Arch("qwen2", rope_norm=False, q_hidden=True, biases=_QKV, required_biases=_QKV),
    "qwen3": Arch("qwen3", rope_norm=False, qk_norm=True),
}


@dataclass(frozen=True)
class Family:
    """A secateurs family (adapter name) in llama.cpp: its stock architecture, the one that runs
    per-layer shapes (None: there is none) and why. Tensor names come from the family's
    `FamilyAdapter` row; whether q/k norms are written, from the architecture (`Arch.qk_norm`)."""

    uniform: str
    per_layer: str | None
    why_not_per_layer: str = ""


FAMILIES = {
    "llama": Family("llama", "deci"),
    "mistral": Family("llama", "deci"),
    "qwen2": Family("qwen2", "deci"),
    "qwen3": Family("qwen3", None, "deci has no q/k norms"),
}


# -- options -------------------------------------------------------------------------------------------
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class GGUFOptions:
    outtype: str = field(default="f16", metadata={"help": "f32 | f16 | bf16 | q8_0 (1-D tensors stay f32)"})
    pad: bool = field(
        default=False,
        metadata={
            "help": "zero-pad per-layer shapes to one uniform shape where llama.cpp has no per-layer "
            "architecture for the family (exact, but no speed-up where it pads)"
        },
    )

    def __post_init__(self) -> None:
        self.outtype = str(self.outtype).lower()
        if self.outtype not in OUTTYPES:
            raise ConfigError(f"unknown GGUF --outtype {self.outtype!r}: use one of {', '.join(OUTTYPES)}")


# -- the layout: which architecture, which shape per written layer --------------------------------------
@dataclass(frozen=True)
class OutLayer:
    """One layer as written: its source index and the shapes llama.cpp will build it with."""

    source: int
    geometry: LayerGeometry
    groups: int  # KV heads written (padding included); 0: attention-free (deci only)
    channels: int  # FFN width written (padding or the one zero channel included)


@dataclass(frozen=True)
class Layout:
    arch: Arch
    family: Family
    layers: tuple[OutLayer, ...]
    q_per_kv: int
    head_dim: int
    padded: bool
    qkv_bias: bool = False

    @property
    def per_layer(self) -> bool:
        return self.arch.per_layer


def _biases(g: LayerGeometry, qkv: bool) -> set[str]:
    out = {"q", "k", "v"} if g.has_attn and qkv else set()
    if g.o_bias:
        out.add("o")
    if g.down_bias:
        out.add("down")
    return out


def _misfit(arch: Arch, g: LayerGeometry, groups: int, shapes: Shapes) -> str | None:
    """Why `arch` cannot run layer geometry `g` written with `groups` KV heads, or None."""
    have = _biases(g, shapes.qkv_bias)
    missing = sorted(have - arch.biases)
    if missing:
        return f"has a {', '.join(missing)} bias, which llama.cpp's {arch.name} architecture does not declare"
    lacking = sorted(arch.required_biases - have) if groups else []
    if lacking:
        return f"lacks the {', '.join(lacking)} biases llama.cpp's {arch.name} architecture requires"
    width = groups * g.q_per_kv * g.head_dim
    if groups and arch.q_hidden and width != shapes.hidden:
        return (
            f"keeps {groups * g.q_per_kv} query heads ({width} values), but llama.cpp's {arch.name} architecture "
            f"declares attn_q with the hidden size {shapes.hidden}"
        )
    if groups and "q" in have and arch.q_bias_hidden and width != shapes.hidden:
        return (
            f"has a q bias of {width} values, but llama.cpp's {arch.name} architecture declares attn_q.bias "
            f"with the hidden size {shapes.hidden}"
        )
    return None


# llama.cpp derives the head size (and rope dimension) only when layer 0 has heads: with
# `head_count[0] = 0` it sets both to 0 although key_length / rope.dimension_count are written, and every
# later attention fails to load. So a first layer without attention is written with one GQA group of
# zero weights (its output is exactly zero), the one place the per-layer layout spends compute.
LAYER0_ATTENTION = 1


def layout(shapes: Shapes, pad: bool = False) -> Layout:
    """The architecture and per-layer shapes to write, or an `ExportError` naming the layer and why.

    Uniform shapes the stock architecture runs -> stock; else `pad` -> stock, zero-padded to the largest
    shape; else the family's per-layer architecture (`deci`); else an error.
    """
    if shapes.family not in FAMILIES:
        raise ExportError(
            f"GGUF export does not know the family {shapes.family!r} (supported: "
            f"{', '.join(sorted(FAMILIES))}; its tensors and llama.cpp architecture were never checked "
            "against llama.cpp): add a Family row to FAMILIES in secateurs/export/gguf.py"
        )
    fam = FAMILIES[shapes.family]
    stock = ARCHS[fam.uniform]
    kept = [(i, g) for i, g in enumerate(shapes.layers) if g.has_attn or g.has_mlp]
    if not kept:
        raise ExportError("every layer is removed; llama.cpp needs at least one")
    g0 = kept[0][1]
    hd, r = g0.head_dim, g0.q_per_kv
    if hd % 2:
        raise ExportError(f"head dimension {hd} is odd; llama.cpp's rope needs an even one")

    def first_misfit(arch: Arch, layers: list[tuple[int, LayerGeometry, int]]) -> tuple[int, str] | None:
        return next(((i, why) for i, g, n in layers if (why := _misfit(arch, g, n, shapes))), None)

    def uniform_layout(groups: int, channels: int, padded: bool) -> Layout:
        out = tuple(OutLayer(i, g, groups, channels) for i, g in kept)
        return Layout(stock, fam, out, r, hd, padded, shapes.qkv_bias)

    failed: tuple[int, str] | None = None
    if shapes.uniform:
        failed = first_misfit(stock, [(i, g, g.n_groups) for i, g in kept])
        if failed is None:
            return uniform_layout(g0.n_groups, g0.intermediate, padded=False)
    if pad:
        groups = max(g.n_groups for _, g in kept)
        channels = max(g.intermediate for _, g in kept)
        if groups == 0 or channels == 0:
            what = "attention" if groups == 0 else "an MLP"
            raise ExportError(f"no layer keeps {what}, so there is no shape to pad to")
        if stock.q_hidden or (shapes.qkv_bias and stock.q_bias_hidden):
            groups = max(groups, shapes.hidden // (r * hd))  # the query heads must fill the hidden size
        padded = [(i, dataclasses.replace(g, has_attn=True, n_groups=groups), groups) for i, g in kept]
        failed = first_misfit(stock, padded)
        if failed is None:
            return uniform_layout(groups, channels, padded=True)
        raise ExportError(f"{shapes.where(failed[0])} {failed[1]}; padding cannot change that")
    if fam.per_layer is None:
        if failed is None:
            i, g = next(
                ((i, g) for i, g in kept if not (g.has_attn and g.has_mlp)),
                next(
                    (
                        (i, g)
                        for i, g in kept
                        if (g.n_groups, g.intermediate) != (g0.n_groups, g0.intermediate)
                    )
                ),
            )
            failed = (
                i,
                f"{_describe(g, g0)}, but llama.cpp's {stock.name} architecture has one shape for every layer",
            )
        raise ExportError(
            f"{shapes.where(failed[0])} {failed[1]}, and no llama.cpp architecture with per-layer shapes runs the "
            f"{shapes.family} family ({fam.why_not_per_layer}); export with --pad (exact, zero-padded, no "
            "speed-up where it pads) or prune with --units layer"
            + (" and a repair that adds no biases" if "bias" in failed[1] else "")
        )
    arch = ARCHS[fam.per_layer]
    out: list[OutLayer] = []
    for i, g in kept:
        groups = g.n_groups if g.has_attn else (LAYER0_ATTENTION if not out else 0)
        out.append(OutLayer(i, g, groups, g.intermediate if g.has_mlp else 1))
    failed = first_misfit(arch, [(o.source, o.geometry, o.groups) for o in out])
    if failed is not None:
        raise ExportError(f"{shapes.where(failed[0])} {failed[1]}")
    return Layout(arch, fam, tuple(out), r, hd, False, shapes.qkv_bias)


def _describe(g: LayerGeometry, g0: LayerGeometry) -> str:
    if not g.has_attn:
        return "has no attention"
    if not g.has_mlp:
        return "has no MLP"
    return (
        f"keeps {g.n_groups} GQA groups and {g.intermediate} MLP channels where the first layer keeps "
        f"{g0.n_groups} and {g0.intermediate}"
    )


# -- tokenizer ---------------------------------------------------------------------------------------
# llama.cpp splits text with one of its built-in regex sets before BPE, chosen by `tokenizer.ggml.pre`.
# The names come from llama.cpp's converter (which recognises tokenizers by hashing their output on a
# test string). Here the name is derived from what the tokenizer does, read from its tokenizer.json:
#   * a `Split` pre-tokenizer with the Llama-3 regex (numbers in runs of up to 3 digits) -> "llama-bpe"
#   * a `Split` with the Qwen2 regex (the same, single digits)                        -> "qwen2"
#   * GPT-2's byte-level regex (`ByteLevel(use_regex=True)`), digits split one by one (an explicit
#     `Digits(individual_digits=True)`, or a vocabulary without multi-digit tokens, as SmolLM's)
#                                                                                     -> "smollm"
#   * GPT-2's byte-level regex with multi-digit tokens                                -> "gpt2"
# Anything else is refused with an error naming what was found, rather than guessed.
_LLAMA3_DIGITS = r"\p{N}{1,3}"
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"|\p{N}|", "|" + _LLAMA3_DIGITS + "|")


def _pre_steps(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    return (
        [s for p in pre.get("pretokenizers", [pre]) for s in _pre_steps(p) or [p]]
        if pre.get("type") == "Sequence"
        else [pre]
    )


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json (see the table above)."""
    steps = _pre_steps(tokenizer_json.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    splits = [s for s in steps if s.get("type") == "Split"]
    if splits:
        pattern = splits[0].get("pattern", {})
        regex = pattern.get("Regex") or pattern.get("String")
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == _QWEN2_SPLIT:
            return "qwen2"
        raise ExportError(f"unknown pre-tokenizer regex {regex!r}; GGUF export knows Llama-3's and Qwen2's")
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if byte_level and byte_level[0].get("use_regex", True) and set(kinds) <= {"ByteLevel", "Digits"}:
        digits = any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps)
        vocab = tokenizer_json.get("model", {}).get("vocab", {})
        multi_digit = any(re.fullmatch(r"Ġ?[0-9]{2,}", t) for t in vocab)
        return "smollm" if digits or not multi_digit else "gpt2"
    raise ExportError(f"unknown pre-tokenizer {kinds or 'none'}; GGUF export knows byte-level BPE ones")


def tokenizer_metadata(source: Path, vocab_size: int) -> dict[str, Any]:
    """Everything llama.cpp needs to tokenize and chat: tokens, types, merges, special ids, template."""
    path = source / "tokenizer.json"
    if not path.is_file():
        raise ExportError(
            f"{source} has no tokenizer.json; llama.cpp needs the vocabulary inside the GGUF (save the model "
            "with its tokenizer)"
        )
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte fallback)" if model.get("byte_fallback") else model.get("type")
        raise ExportError(f"tokenizer type {kind} is not supported for GGUF export (byte-level BPE only)")
    pre = pre_tokenizer_name(tj)
    # Read the files themselves, not through AutoTokenizer: that reads config.json, and a secateurs output
    # names its own model type there.
    cfg_path = source / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise ExportError(f"the tokenizer has {n} tokens but the model's embedding only {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows of the embedding no token uses
    types = [5] * vocab_size  # UNUSED, until filled
    for text, i in vocab.items():
        tokens[i] = text
        a = added.get(i)
        types[i] = 1 if a is None else (3 if a.get("special") else 4)  # NORMAL, CONTROL, USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def special(key: str) -> int | None:
        value = tcfg.get(f"{key}_token")
        text = value.get("content") if isinstance(value, dict) else value
        return vocab.get(text) if isinstance(text, str) else None

    from tokenizers import Tokenizer

    probe = Tokenizer.from_file(str(path)).encode("a", add_special_tokens=True).ids
    bos, eos = special("bos"), special("eos")
    template_file = source / "chat_template.jinja"
    template = (
        template_file.read_text(encoding="utf-8") if template_file.is_file() else tcfg.get("chat_template")
    )
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = next(
            (t["template"] for t in template if t.get("name") == "default"), template[0]["template"]
        )
    meta: dict[str, Any] = {
        "model": "gpt2",
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "add_bos": bool(tcfg.get("add_bos_token", bos is not None and probe[:1] == [bos])),
        "add_eos": bool(tcfg.get("add_eos_token", eos is not None and probe[-1:] == [eos])),
        "chat_template": template,
    }
    for key in ("bos", "eos", "unk", "pad"):
        if special(key) is not None:
            meta[f"{key}_id"] = special(key)
    return meta


# -- tensors -------------------------------------------------------------------------------------------
class Safetensors:
    """The tensors of a model directory (one file or an index of shards), read one at a time."""

    def __init__(self, source: Path, stack: ExitStack):
        from safetensors import safe_open

        from secateurs.models.loading import weight_files

        layout = weight_files(source)
        if layout is None:
            raise ModelSourceError(f"{source} has no readable model.safetensors (or shard index)")
        self.where: dict[str, Any] = {}
        for file in sorted(set(layout.values())):
            try:
                handle = stack.enter_context(safe_open(str(file), framework="pt"))
            except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
                raise ModelSourceError(f"cannot read {file}: {exc}") from exc
            for key in handle.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                self.where[key] = handle

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name).to(torch.float32)


Producer = Callable[[], torch.Tensor]


@dataclass
class TensorOut:
    name: str
    shape: tuple[int, ...]  # numpy order (rows, columns), as torch
    produce: Producer


def _permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate_half layout -> llama.cpp's NORM rope (consecutive pairs), per head."""
    rest = w.shape[1:]
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *rest).transpose(1, 2).reshape(w.shape)


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


class Plan:
    """Every tensor to write, in order, each with its shape and how to produce it."""

    def __init__(self, lay: Layout, adapter: FamilyAdapter, st: Safetensors, config):
        self.lay, self.a, self.st, self.config = lay, adapter, st, config
        self.tensors: list[TensorOut] = []
        self.used: set[str] = set()

    def source(self, name: str, ops: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = ()) -> Producer:
        if name not in self.st:
            raise ModelSourceError(f"tensor {name} is missing from the model files")
        self.used.add(name)

        def produce() -> torch.Tensor:
            t = self.st.get(name)
            for op in ops:
                t = op(t)
            return t

        return produce

    def add(self, name: str, shape: tuple[int, ...], produce: Producer) -> None:
        self.tensors.append(TensorOut(name, tuple(int(s) for s in shape), produce))

    def build(self) -> list[TensorOut]:
        lay, a, cfg = self.lay, self.a, self.config
        hidden = cfg.hidden_size
        self.add("token_embd.weight", self.st.shape(f"{a.embed}.weight"), self.source(f"{a.embed}.weight"))
        self.add("output_norm.weight", (hidden,), self.source(f"{a.final_norm}.weight"))
        head = f"{a.head}.weight"
        if not getattr(cfg, "tie_word_embeddings", False):
            if head not in self.st:
                raise ModelSourceError(f"{head} is missing and the config does not tie it to the embedding")
            self.add("output.weight", self.st.shape(head), self.source(head))
        elif head in self.st:
            self.used.add(head)  # tied: llama.cpp reuses token_embd
        for j, out in enumerate(lay.layers):
            self._layer(j, out, hidden)
        return self.tensors

    def _layer(self, j: int, out: OutLayer, hidden: int) -> None:
        a, lay, g = self.a, self.lay, out.geometry
        pre = f"{a.layers}.{out.source}"
        attn, mlp = f"{pre}.{a.attn}", f"{pre}.{a.mlp}"
        blk = f"blk.{j}"
        r, hd = lay.q_per_kv, lay.head_dim
        q_rows, kv_rows = out.groups * r * hd, out.groups * hd
        norm_ops = lambda name, n: self.source(name) if name in self.st else (lambda: torch.ones(n))  # noqa: E731
        if out.groups:  # attention (padded where the layout pads; zeros where the block was removed)
            self.add(f"{blk}.attn_norm.weight", (hidden,), norm_ops(f"{pre}.{a.attn_norm}.weight", hidden))
            for key, gguf, rows, heads in (
                ("q", "attn_q", q_rows, out.groups * r),
                ("k", "attn_k", kv_rows, out.groups),
                ("v", "attn_v", kv_rows, out.groups),
            ):
                name = f"{attn}.{getattr(a, key)}"
                rope = lay.arch.rope_norm and key in ("q", "k")
                ops = (lambda t, n=rows: _pad(t, 0, n),) + ((lambda t, h=heads: _permute_rows(t, h)),) * rope
                if g.has_attn:
                    self.add(f"{blk}.{gguf}.weight", (rows, hidden), self.source(f"{name}.weight", ops))
                    if f"{name}.bias" in self.st:
                        self.add(f"{blk}.{gguf}.bias", (rows,), self.source(f"{name}.bias", ops))
                else:  # padding a removed block: zero heads (and zero biases where the family has them)
                    self.add(f"{blk}.{gguf}.weight", (rows, hidden), lambda s=(rows, hidden): torch.zeros(s))
                    if lay.qkv_bias:
                        self.add(f"{blk}.{gguf}.bias", (rows,), lambda n=rows: torch.zeros(n))
            o = f"{attn}.{a.o}"
            if g.has_attn:
                self.add(
                    f"{blk}.attn_output.weight",
                    (hidden, q_rows),
                    self.source(f"{o}.weight", (lambda t: _pad(t, 1, q_rows),)),
                )
                if g.o_bias:
                    self.add(f"{blk}.attn_output.bias", (hidden,), self.source(f"{o}.bias"))
            else:
                self.add(f"{blk}.attn_output.weight", (hidden, q_rows), lambda: torch.zeros(hidden, q_rows))
            if lay.arch.qk_norm:
                for key, gguf in ((a.q_norm, "attn_q_norm"), (a.k_norm, "attn_k_norm")):
                    self.add(f"{blk}.{gguf}.weight", (hd,), norm_ops(f"{attn}.{key}.weight", hd))
        else:
            self.used.add(f"{pre}.{a.attn_norm}.weight")  # an attention-free deci layer has no norm
        # MLP (padded, or the one zero channel that keeps an attention-only deci layer's output)
        n = out.channels
        self.add(f"{blk}.ffn_norm.weight", (hidden,), norm_ops(f"{pre}.{a.mlp_norm}.weight", hidden))
        if g.has_mlp:
            for key, gguf in (("gate", "ffn_gate"), ("up", "ffn_up")):
                name = f"{mlp}.{getattr(a, key)}"
                self.add(
                    f"{blk}.{gguf}.weight",
                    (n, hidden),
                    self.source(f"{name}.weight", (lambda t: _pad(t, 0, n),)),
                )
                if f"{name}.bias" in self.st:
                    self.add(
                        f"{blk}.{gguf}.bias", (n,), self.source(f"{name}.bias", (lambda t: _pad(t, 0, n),))
                    )
            down = f"{mlp}.{a.down}"
            self.add(
                f"{blk}.ffn_down.weight",
                (hidden, n),
                self.source(f"{down}.weight", (lambda t: _pad(t, 1, n),)),
            )
            if g.down_bias:
                self.add(f"{blk}.ffn_down.bias", (hidden,), self.source(f"{down}.bias"))
        else:
            for gguf in ("ffn_gate", "ffn_up"):
                self.add(f"{blk}.{gguf}.weight", (n, hidden), lambda: torch.zeros(n, hidden))
            self.add(f"{blk}.ffn_down.weight", (hidden, n), lambda: torch.zeros(hidden, n))

    def check_all_used(self) -> None:
        """Every tensor in the files has a place (a tensor silently left out would change the model)."""
        left = sorted(set(self.st.where) - self.used)
        if left:
            raise ExportError(
                f"{len(left)} tensor(s) in the model files have no place in the GGUF export, first {left[0]!r}"
            )


def _blocks_of_32(lay: Layout) -> Layout:
    """Q8_0 quantises rows in blocks of 32 values; a pruned MLP width that is not a multiple of 32 would
    leave ffn_down in f16 (slower than Q8_0 on CPUs). Zero channels up to the next multiple make it
    quantisable and change nothing (zero gate/up rows, zero down columns)."""
    layers = tuple(
        dataclasses.replace(o, channels=-(-o.channels // 32) * 32) if o.geometry.has_mlp else o
        for o in lay.layers
    )
    return dataclasses.replace(lay, layers=layers)


# -- numbers on disk -------------------------------------------------------------------------------------
def _qtype(outtype: str, shape: tuple[int, ...]):
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or outtype == "f32":
        return Q.F32
    if outtype == "q8_0":
        return Q.Q8_0 if shape[-1] % 32 == 0 else Q.F16  # Q8_0 blocks are 32 values of a row
    return Q.BF16 if outtype == "bf16" else Q.F16


def _encode(t: torch.Tensor, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    arr = t.contiguous().numpy().astype(np.float32, copy=False)
    if qtype == Q.F32:
        return arr
    if qtype == Q.F16:
        return arr.astype(np.float16)
    return quants.quantize(arr, qtype)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf import quants

    return int(np.prod(quants.quant_shape_to_byte_shape(shape, qtype)))


FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType: ALL_F32, MOSTLY_*


def _rope(config) -> tuple[float, dict]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ExportError(f"rope scaling {kind!r} is not supported for GGUF export (default and linear are)")
    return float(theta), params if kind == "linear" else {}


def _metadata(writer, lay: Layout, config, tok: dict, options: GGUFOptions, name: str) -> None:
    from gguf import RopeScalingType

    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[options.outtype])
    if options.outtype == "q8_0":
        from gguf import GGML_QUANT_VERSION

        writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(lay.layers))
    heads = [o.groups * lay.q_per_kv for o in lay.layers]
    kv = [o.groups for o in lay.layers]
    ff = [o.channels for o in lay.layers]
    if lay.per_layer:
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv)
        writer.add_feed_forward_length(ff)
    else:
        writer.add_head_count(heads[0])
        writer.add_head_count_kv(kv[0])
        writer.add_feed_forward_length(ff[0])
    # Head size is global in llama.cpp and derived from layer 0's head count unless written: always write
    # it (layer 0 may have no attention), and the rope dimension with it (deci asserts they are equal).
    writer.add_key_length(lay.head_dim)
    writer.add_value_length(lay.head_dim)
    writer.add_rope_dimension_count(lay.head_dim)
    theta, linear = _rope(config)
    writer.add_rope_freq_base(theta)
    if linear:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(linear["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_tokenizer_model(tok["model"])
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    if tok["merges"]:
        writer.add_token_merges(tok["merges"])
    for key in ("bos", "eos", "unk", "pad"):
        if f"{key}_id" in tok:
            getattr(writer, f"add_{key}_token_id")(tok[f"{key}_id"])
    writer.add_add_bos_token(tok["add_bos"])
    writer.add_add_eos_token(tok["add_eos"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])


def _warn_sliding_window(config) -> None:
    window = getattr(config, "sliding_window", None)
    used = getattr(config, "use_sliding_window", window is not None)
    if used and window and window < config.max_position_embeddings:
        log.warning(
            "the model uses a sliding window of %d tokens; llama.cpp's architecture attends to the whole "
            "context, so outputs differ beyond that length",
            window,
        )


class GGUFExporter(Exporter):
    name = "gguf"
    filename = "model.gguf"
    description = "one .gguf file for llama.cpp (llama-cli, llama-server); per-layer shapes as `deci`"
    options_class = GGUFOptions

    def check_expressible(self, shapes: Shapes) -> None:
        layout(shapes, self.options.pad)

    def write(self, source: Path, path: Path) -> dict[str, Any]:
        import gguf

        from secateurs.surgery.saving import load_skeleton

        logging.getLogger("gguf").setLevel(
            max(logging.WARNING, logging.getLogger("gguf").level)
        )  # per-file chatter
        skeleton = load_skeleton(source)
        adapter = adapter_for(skeleton)
        config = skeleton.config
        lay = layout(shapes_of(skeleton, adapter), self.options.pad)
        if self.options.outtype == "q8_0":
            lay = _blocks_of_32(lay)
        _rope(config)
        _warn_sliding_window(config)
        tok = tokenizer_metadata(source, int(config.vocab_size))
        with ExitStack() as stack:
            st = Safetensors(source, stack)
            plan = Plan(lay, adapter, st, config)
            tensors = plan.build()
            plan.check_all_used()
            writer = gguf.GGUFWriter(path, lay.arch.name)
            stack.callback(writer.close)
            _metadata(
                writer, lay, config, tok, self.options, getattr(config, "_name_or_path", "") or source.name
            )
            qtypes = [_qtype(self.options.outtype, t.shape) for t in tensors]
            for t, q in zip(tensors, qtypes, strict=True):
                writer.add_tensor_info(
                    t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, q), raw_dtype=q
                )
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t, q in zip(tensors, qtypes, strict=True):
                data = t.produce()
                if tuple(data.shape) != t.shape:
                    raise ModelSourceError(
                        f"{t.name}: the model files hold shape {tuple(data.shape)}, its config says {t.shape}"
                    )
                writer.write_tensor_data(_encode(data, q))
        return {
            "architecture": lay.arch.name,
            "layers": len(lay.layers),
            "padded": lay.padded,
            "outtype": self.options.outtype,
            "tensors": len(tensors),
        }
