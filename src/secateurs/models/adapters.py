"""Where the prunable pieces live in each supported model family, described as data.

Every family secateurs supports is one `FamilyAdapter` row in `ADAPTERS`, keyed by the
`config.architectures[0]` string that Hugging Face writes into `config.json`. Code elsewhere never asks
"is this Llama?"; it reads the row. Adding a family with the usual `q/k/v/o` + `gate/up/down` layout is
one new entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.models.reshape import SkipAttention, SkipMLP


class UnsupportedModelError(SecateursError):
    """The model's architecture has no adapter; the message names the table to extend."""


@dataclass(frozen=True)
class FamilyAdapter:
    """Names of a decoder-only family's modules and config keys.

    `modeling_module` and `causal_lm_class` let the saved self-contained modelling file subclass the
    stock class. `o_bias_native` / `down_bias_native` say whether a config flag exists that gives
    `o_proj` / `down_proj` a bias, so a plan that adds bias corrections can sometimes load without
    remote code; `None` means the family hard-codes `bias=False` there.
    """

    name: str
    modeling_module: str
    causal_lm_class: str
    layers: str = "model.layers"
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    o_bias_native: str | None = None
    down_bias_native: str | None = None

    # -- module access ---------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attn)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp)

    def attn_linears(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        a = self.attention(layer)
        return getattr(a, self.q), getattr(a, self.k), getattr(a, self.v), getattr(a, self.o)

    def mlp_linears(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        m = self.mlp_module(layer)
        return getattr(m, self.gate), getattr(m, self.up), getattr(m, self.down)


ADAPTERS: dict[str, FamilyAdapter] = {
    "LlamaForCausalLM": FamilyAdapter(
        name="llama",
        modeling_module="transformers.models.llama.modeling_llama",
        causal_lm_class="LlamaForCausalLM",
        o_bias_native="attention_bias",
        down_bias_native="mlp_bias",
    ),
    "MistralForCausalLM": FamilyAdapter(
        name="mistral",
        modeling_module="transformers.models.mistral.modeling_mistral",
        causal_lm_class="MistralForCausalLM",
    ),
    "Qwen2ForCausalLM": FamilyAdapter(
        name="qwen2",
        modeling_module="transformers.models.qwen2.modeling_qwen2",
        causal_lm_class="Qwen2ForCausalLM",
    ),
    "Qwen3ForCausalLM": FamilyAdapter(
        name="qwen3",
        modeling_module="transformers.models.qwen3.modeling_qwen3",
        causal_lm_class="Qwen3ForCausalLM",
    ),
}


LEGACY_ARCHITECTURE = "SecateursForCausalLM"  # what secateurs <= 0.1.0 wrote for heterogeneous outputs


def architecture_of(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if archs and archs[0] != LEGACY_ARCHITECTURE:
        return archs[0]
    # Configs built in code (tests, from_config) carry no `architectures`; the model_type names the family.
    by_type = {a.name: arch for arch, a in ADAPTERS.items()}
    return by_type.get(getattr(config, "model_type", ""), getattr(config, "model_type", "?"))


def adapter_for(model_or_config) -> FamilyAdapter:
    """Look up the adapter by architecture; an unknown one is a clear error, not a guess."""
    config = getattr(model_or_config, "config", model_or_config)
    arch = architecture_of(config)
    try:
        return ADAPTERS[arch]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported architecture {arch!r}: secateurs supports {', '.join(sorted(ADAPTERS))}. "
            "To add a family, add a FamilyAdapter row to ADAPTERS in secateurs/models/adapters.py."
        ) from None


@dataclass(frozen=True)
class LayerGeometry:
    """The shape facts about one decoder layer as it is now (possibly pruned), read from its modules.

    The one shape reader: unit spaces, surgery's config rewrite and exports all read shapes here, and
    `spec()` is the per-layer record saved in `config.secateurs` that `reshape_` rebuilds from.
    """

    n_groups: int  # KV heads; each is one prunable unit with its query heads
    q_per_kv: int
    head_dim: int
    intermediate: int
    has_attn: bool
    has_mlp: bool
    o_bias: bool = False
    down_bias: bool = False

    def spec(self) -> dict:
        return {
            "kv_heads": self.n_groups,
            "q_per_kv": self.q_per_kv,
            "head_dim": self.head_dim,
            "intermediate": self.intermediate,
            "attn": self.has_attn,
            "mlp": self.has_mlp,
            "o_bias": self.o_bias,
            "down_bias": self.down_bias,
        }


def layer_geometry(model: nn.Module, adapter: FamilyAdapter | None = None) -> list[LayerGeometry]:
    """Read each layer's current shape from its modules, so pruned and dense models are read alike.

    A removed block is a `SkipAttention` / `SkipMLP` (the only stand-ins surgery and `reshape_` put in).
    """
    adapter = adapter or adapter_for(model)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_per_kv = config.num_attention_heads // config.num_key_value_heads
    out = []
    for layer in adapter.decoder_layers(model):
        attn, mlp = adapter.attention(layer), adapter.mlp_module(layer)
        has_attn = not isinstance(attn, SkipAttention)
        has_mlp = not isinstance(mlp, SkipMLP)
        o = getattr(attn, adapter.o) if has_attn else None
        down = getattr(mlp, adapter.down) if has_mlp else None
        out.append(
            LayerGeometry(
                n_groups=getattr(attn, adapter.k).out_features // head_dim if has_attn else 0,
                q_per_kv=q_per_kv,
                head_dim=head_dim,
                intermediate=down.in_features if has_mlp else 0,
                has_attn=has_attn,
                has_mlp=has_mlp,
                o_bias=o is not None and o.bias is not None,
                down_bias=down is not None and down.bias is not None,
            )
        )
    return out


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters())
    return p.dtype, p.device
