"""Where the prunable pieces live in each supported model family, described as data.

Every family secateurs supports is one `FamilyAdapter` row in `ADAPTERS`, keyed by the
`config.architectures[0]` string that Hugging Face writes into `config.json`. Code elsewhere never asks
"is this Llama?"; it reads the row. What a new family needs:

- `q/k/v/o` and `gate/up/down` linears (any names), with GQA groups in contiguous rows of `k`/`v`
  (`head_dim` rows each) and `q` (`q_per_kv * head_dim` rows each): then one row here;
- q/k/v fused into one linear, rows all q heads, then all k heads, then all v heads, split by the
  attention's forward at `config.num_attention_heads` query heads and its own `num_key_value_heads`
  (Phi-3's `qkv_proj`): the `fused_qkv=` strategy (the fused linear's name); gate/up fused as gate rows
  then up rows, split in half by the MLP (Phi-3's `gate_up_proj`): `fused_gate_up=`. Code elsewhere
  reads the input-side projections only through `attn_in` / `attn_in_parts` / `attn_in_rows` (and the
  `mlp_*` twins), so it never knows which layout it has;
- q/k norms: per head (`head_dim` wide: Qwen3, Gemma 3) need nothing; norms over the whole projected
  width (OLMo 2) are the `QK_NORM_FULL_WIDTH` strategy (`qk_norm=`), whose weights follow the kept rows;
- norms before or after the blocks, multipliers inside the decoder (Granite's embedding, residual and
  attention multipliers, Gemma's embedding scaling), residual dropout (Phi-3) need nothing: masks and
  surgery act on the output projections, and a removed block's zero output stays zero through a
  post-norm;
- anything the `*ForCausalLM` does to the logits after `lm_head` must be named here
  (`logits_divisor`, `logits_softcap`), because the evaluator computes losses from the decoder's hidden
  states and `lm_head` itself (chunked) and applies them with `final_logits`;
- a stock config that rejects the rewritten head count (Phi-3's longrope factors are checked against
  `hidden_size // num_attention_heads`) needs nothing: `surgery.apply` then writes the per-layer record
  (`config.secateurs`) even for uniform shapes.

Mixture-of-experts MLPs have no strategy yet: they are rows of `NOT_YET`, refused by name before any
weights load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.models.reshape import SkipAttention, SkipMLP


class UnsupportedModelError(SecateursError):
    """The model's architecture has no adapter; the message names the table to extend."""


QK_NORM_FULL_WIDTH = "full_width"  # one q (k) norm over all heads' rows (OLMo 2), not one per head


def _weight(linear: nn.Linear) -> torch.Tensor:
    return linear.weight


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
    q: str = "q_proj"  # q/k/v and gate/up: unused where the strategy below fuses them
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    # input-side projection strategy: None (separate linears) or the name of the one fused linear whose
    # rows are the parts stacked in order (q heads, k heads, v heads; gate channels, up channels)
    fused_qkv: str | None = None
    fused_gate_up: str | None = None
    o_bias_native: str | None = None
    down_bias_native: str | None = None
    model_type: str = ""  # the config's `model_type` when it is not `name` (configs built in code)
    # q/k norm strategy: None (no norms, or per-head norms, which no unit changes) or QK_NORM_FULL_WIDTH
    # (one norm over all heads' rows: its weight is sliced with them, masks renormalise over kept rows).
    qk_norm: str | None = None
    q_norm: str = "q_norm"
    k_norm: str = "k_norm"
    qk_norm_eps: str = "variance_epsilon"  # the full-width norms' epsilon attribute
    # checkpoint tensor names outside the prunable linears, for exports that rename every tensor: the
    # embedding, final norm and head, and per layer the norms before the attention and before the MLP
    # (Gemma's post-block norms and OLMo 2's norms after the blocks are not named: exports refuse those
    # families, and masks and surgery never touch a norm)
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    # config keys of what the CausalLM does to the logits after lm_head (see `final_logits`)
    logits_divisor: str | None = None  # logits / config[key] (Granite's logits_scaling)
    logits_softcap: str | None = None  # cap * tanh(logits / cap) (Gemma's final_logit_softcapping)

    # -- module access ---------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attn)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp)

    def o_proj(self, layer: nn.Module) -> nn.Linear:
        return getattr(self.attention(layer), self.o)

    def down_proj(self, layer: nn.Module) -> nn.Linear:
        return getattr(self.mlp_module(layer), self.down)

    # -- input-side projections: separate or fused (the one place that knows which) ---------------
    def attn_in(self, layer: nn.Module) -> list[nn.Linear]:
        """The attention's input-side linears: q, k, v, or the one fused q/k/v."""
        return self._in(self.attention(layer), (self.q, self.k, self.v), self.fused_qkv)

    def mlp_in(self, layer: nn.Module) -> list[nn.Linear]:
        """The MLP's input-side linears: gate, up, or the one fused gate/up."""
        return self._in(self.mlp_module(layer), (self.gate, self.up), self.fused_gate_up)

    def attn_in_parts(self, layer: nn.Module, g: LayerGeometry, of=_weight) -> tuple:
        """`of(linear)` (its weight by default; a bias, a gradient-weighted saliency) of each input-side
        linear, split into q, k and v rows: [heads * head_dim, ...], [kv * head_dim, ...] twice. For a
        fused q/k/v these are views of its row blocks; `None` stays `None` (a missing bias)."""
        q = g.n_groups * g.q_per_kv * g.head_dim
        kv = g.n_groups * g.head_dim
        return self._parts([of(lin) for lin in self.attn_in(layer)], (q, kv, kv), self.fused_qkv)

    def mlp_in_parts(self, layer: nn.Module, g: LayerGeometry, of=_weight) -> tuple:
        """As `attn_in_parts`, for gate and up ([intermediate, ...] each)."""
        return self._parts([of(lin) for lin in self.mlp_in(layer)], (g.intermediate,) * 2, self.fused_gate_up)

    def attn_in_rows(self, g: LayerGeometry, q_rows: torch.Tensor, kv_rows: torch.Tensor) -> list:
        """[(linear name, rows to keep)] for the attention's input side, given the kept rows of q and of
        k / v (`surgery.apply.head_rows`)."""
        widths = (g.n_groups * g.q_per_kv * g.head_dim, g.n_groups * g.head_dim, g.n_groups * g.head_dim)
        return self._rows((q_rows, kv_rows, kv_rows), widths, (self.q, self.k, self.v), self.fused_qkv)

    def mlp_in_rows(self, g: LayerGeometry, rows: torch.Tensor) -> list:
        """[(linear name, rows to keep)] for the MLP's input side, given the kept channels."""
        return self._rows((rows, rows), (g.intermediate,) * 2, (self.gate, self.up), self.fused_gate_up)

    def module_names(self) -> dict[str, str]:
        """The module names `reshape_` rebuilds a layer with (saved as `config.secateurs["names"]`): a
        fused linear appears under "qkv" / "gate_up" instead of its parts, full-width norms as
        "q_norm" / "k_norm"."""
        names = {"layers": self.layers, "attn": self.attn, "o": self.o, "mlp": self.mlp, "down": self.down}
        names |= {"qkv": self.fused_qkv} if self.fused_qkv else {"q": self.q, "k": self.k, "v": self.v}
        names |= {"gate_up": self.fused_gate_up} if self.fused_gate_up else {"gate": self.gate, "up": self.up}
        if self.full_width_qk_norm:  # reshape_ resizes these norms with the projections
            names |= {"q_norm": self.q_norm, "k_norm": self.k_norm}
        return names

    @staticmethod
    def _in(block: nn.Module, separate: tuple[str, ...], fused: str | None) -> list[nn.Linear]:
        return [getattr(block, fused)] if fused else [getattr(block, n) for n in separate]

    @staticmethod
    def _parts(per_linear: list, widths: tuple[int, ...], fused: str | None) -> tuple:
        if not fused:
            return tuple(per_linear)
        (t,) = per_linear
        return (None,) * len(widths) if t is None else tuple(t.split(widths))

    @staticmethod
    def _rows(rows: tuple, widths: tuple[int, ...], separate: tuple[str, ...], fused: str | None) -> list:
        if not fused:
            return list(zip(separate, rows, strict=True))
        offsets = [sum(widths[:i]) for i in range(len(widths))]
        return [(fused, torch.cat([r + off for r, off in zip(rows, offsets, strict=True)]))]

    @property
    def full_width_qk_norm(self) -> bool:
        return self.qk_norm == QK_NORM_FULL_WIDTH

    def qk_norms(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The full-width q/k norms of a layer (only for `QK_NORM_FULL_WIDTH` families)."""
        a = self.attention(layer)
        return getattr(a, self.q_norm), getattr(a, self.k_norm)

    def final_logits(self, config, logits: torch.Tensor) -> torch.Tensor:
        """What the family's `*ForCausalLM.forward` does to `lm_head`'s output, for losses computed from
        hidden states (`eval.loss.token_nll`)."""
        if self.logits_divisor is not None:
            logits = logits / getattr(config, self.logits_divisor)
        cap = getattr(config, self.logits_softcap, None) if self.logits_softcap else None
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


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
    # Gemma 2: four norms per layer (post-norms see a removed block's zeros), embedding scaling, attention
    # and final-logit soft-capping, sliding/full `layer_types`, tied embeddings, GELU-tanh gating.
    "Gemma2ForCausalLM": FamilyAdapter(
        name="gemma2",
        modeling_module="transformers.models.gemma2.modeling_gemma2",
        causal_lm_class="Gemma2ForCausalLM",
        logits_softcap="final_logit_softcapping",
    ),
    # Gemma 3 (text): as Gemma 2, plus per-head q/k norms (head_dim wide, untouched by any unit).
    "Gemma3ForCausalLM": FamilyAdapter(
        name="gemma3",
        model_type="gemma3_text",
        modeling_module="transformers.models.gemma3.modeling_gemma3",
        causal_lm_class="Gemma3ForCausalLM",
        logits_softcap="final_logit_softcapping",
    ),
    # OLMo 2: q/k RMS norms over the whole projected width; norms after the blocks.
    "Olmo2ForCausalLM": FamilyAdapter(
        name="olmo2",
        modeling_module="transformers.models.olmo2.modeling_olmo2",
        causal_lm_class="Olmo2ForCausalLM",
        qk_norm=QK_NORM_FULL_WIDTH,
    ),
    # Granite: embedding / residual / attention multipliers live inside the decoder; logits_scaling not.
    "GraniteForCausalLM": FamilyAdapter(
        name="granite",
        modeling_module="transformers.models.granite.modeling_granite",
        causal_lm_class="GraniteForCausalLM",
        o_bias_native="attention_bias",
        down_bias_native="mlp_bias",
        logits_divisor="logits_scaling",
    ),
    # Phi-3 / Phi-3.5: fused qkv_proj and gate_up_proj, partial rotary dims and longrope factors (per
    # rotary dim: no unit changes them), an optional sliding window on every layer, residual dropout.
    "Phi3ForCausalLM": FamilyAdapter(
        name="phi3",
        modeling_module="transformers.models.phi3.modeling_phi3",
        causal_lm_class="Phi3ForCausalLM",
        fused_qkv="qkv_proj",
        fused_gate_up="gate_up_proj",
    ),
}

# Architectures users bring whose structure secateurs cannot prune yet: what is missing, said before any
# weights load (a row moves to ADAPTERS when its strategy exists).
NOT_YET: dict[str, str] = {
    "MixtralForCausalLM": "mixture-of-experts MLPs (experts and a router instead of one gate/up/down)",
    "Qwen2MoeForCausalLM": "mixture-of-experts MLPs (experts and a router instead of one gate/up/down)",
    "Qwen3MoeForCausalLM": "mixture-of-experts MLPs (experts and a router instead of one gate/up/down)",
    "OlmoeForCausalLM": "mixture-of-experts MLPs (experts and a router instead of one gate/up/down)",
    "GraniteMoeForCausalLM": "mixture-of-experts MLPs (experts and a router instead of one gate/up/down)",
    "Gemma3ForConditionalGeneration": "the vision tower of multimodal Gemma 3 (text-only Gemma3ForCausalLM "
    "checkpoints, such as gemma-3-270m and gemma-3-1b, are supported)",
}


LEGACY_ARCHITECTURE = "SecateursForCausalLM"  # what secateurs <= 0.1.0 wrote for heterogeneous outputs


def architecture_of(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if archs and archs[0] != LEGACY_ARCHITECTURE:
        return archs[0]
    # Configs built in code (tests, from_config) carry no `architectures`; the model_type names the family.
    by_type = {a.model_type or a.name: arch for arch, a in ADAPTERS.items()}
    return by_type.get(getattr(config, "model_type", ""), getattr(config, "model_type", "?"))


def adapter_for(model_or_config) -> FamilyAdapter:
    """Look up the adapter by architecture; an unknown one is a clear error, not a guess."""
    config = getattr(model_or_config, "config", model_or_config)
    arch = architecture_of(config)
    if arch in NOT_YET:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported yet: secateurs cannot prune {NOT_YET[arch]}. "
            f"Supported: {', '.join(sorted(ADAPTERS))}."
        )
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
                n_groups=o.in_features // (q_per_kv * head_dim) if has_attn else 0,
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
