"""Tiny random models of every supported family, built in-process, for tests and examples.

Weights are drawn with a larger std than HF's default so that masking a unit visibly moves the logits;
a test that compares logits must be able to fail.
"""

from __future__ import annotations

import random

import torch
import transformers

from secateurs.units.plan import LayerPlan, Plan
from secateurs.units.space import UnitSpace

FAMILIES = (
    "llama",
    "llama-mha-bias",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "olmo2",
    "granite",
    "phi3",
)
# Each breaks an assumption of the first four: head_dim independent of hidden / heads, four norms per
# layer, soft-capping, sliding / full layer types (window 4 < the tests' 10-12 tokens, so types matter)
# and tied embeddings (Gemma); full-width q/k norms (OLMo 2); multipliers, logits scaling, biases
# (Granite); fused qkv_proj / gate_up_proj, rotary on half of each head with longrope factors, a sliding
# window on every layer and residual dropout (Phi-3 / Phi-3.5). Multipliers and caps are far from 1 so
# that a loss that ignores them is visibly wrong.


def tiny_config(family: str = "llama", layers: int = 4, vocab_size: int = 96):
    common = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif family == "llama-mha-bias":  # no GQA, and biases everywhere (attention_bias / mlp_bias)
        cfg = transformers.LlamaConfig(
            **{**common, "num_key_value_heads": 4}, attention_bias=True, mlp_bias=True
        )
    elif family == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(
            **{**common, "num_attention_heads": 6, "num_key_value_heads": 2}, head_dim=8
        )
    elif family in ("gemma2", "gemma3"):
        gemma = dict(
            common,
            head_dim=16,  # 4 heads x 16 = 64 != hidden 32
            query_pre_attn_scalar=16,
            sliding_window=4,
            layer_types=[_gemma_type(i) for i in range(layers)],
            final_logit_softcapping=3.0,
            attn_logit_softcapping=5.0,
            tie_word_embeddings=True,
        )
        if family == "gemma2":
            cfg = transformers.Gemma2Config(**gemma)
        else:
            cfg = transformers.Gemma3TextConfig(**gemma)
            cfg.architectures = ["Gemma3ForCausalLM"]  # the text-only checkpoints' class (gemma-3-270m)
            return cfg
    elif family == "olmo2":
        cfg = transformers.Olmo2Config(**common)
    elif family == "granite":
        cfg = transformers.GraniteConfig(
            **common,
            attention_bias=True,
            mlp_bias=True,
            embedding_multiplier=3.0,
            residual_multiplier=0.5,
            attention_multiplier=0.3,
            logits_scaling=4.0,
        )
    elif family == "phi3":
        rotary_half = 2  # head_dim 8 x partial_rotary_factor 0.5 = 4 rotary dims: one factor per pair
        cfg = transformers.Phi3Config(
            **common,
            pad_token_id=None,  # Phi-3's default (32000) is outside the tiny vocabulary
            eos_token_id=2,
            sliding_window=4,
            resid_pdrop=0.1,  # inactive in eval mode; a pass in training mode would show as noise
            original_max_position_embeddings=64,  # < max_position_embeddings: longrope's scaling applies
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0 + 0.5 * i for i in range(rotary_half)],
                "long_factor": [2.0 + 0.5 * i for i in range(rotary_half)],
            },
        )
    else:
        raise ValueError(family)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    return cfg


def _gemma_type(i: int) -> str:
    return "full_attention" if i % 3 == 2 else "sliding_attention"


def tiny_model(
    family: str = "llama", layers: int = 4, seed: int = 0, vocab_size: int = 96
) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = tiny_config(family, layers, vocab_size)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # biases start at zero in HF init; make them matter
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.2)
    return model.eval()


def random_plan(space: UnitSpace, seed: int = 0, drop_layer: bool = True, corrections: bool = True) -> Plan:
    """A heterogeneous plan: every layer keeps a different subset, one block and one layer go."""
    rng = random.Random(seed)
    layers = []
    for lu in space.layers:
        g = sorted(rng.sample(range(lu.n_groups), rng.randint(1, lu.n_groups))) if lu.n_groups else None
        c = sorted(rng.sample(range(lu.n_channels), rng.randint(1, lu.n_channels))) if lu.n_channels else None
        bias = (
            (lambda: [rng.gauss(0, 0.1) for _ in range(space.hidden_size)]) if corrections else (lambda: None)
        )
        layers.append(LayerPlan(keep_groups=g, keep_channels=c, attn_bias=bias(), mlp_bias=bias()))
    n = len(layers)
    if n >= 3:
        layers[1].drop_mlp = True
        layers[2].drop_attn = True
    if drop_layer and n >= 4:
        layers[3] = LayerPlan(drop_attn=True, drop_mlp=True)
    return Plan(layers, method="random-test", seed=seed)


def uniform_plan(space: UnitSpace, groups: int, channels: int, drop_layers: tuple[int, ...] = ()) -> Plan:
    layers = [
        LayerPlan(drop_attn=True, drop_mlp=True)
        if i in drop_layers
        else LayerPlan(keep_groups=list(range(groups)), keep_channels=list(range(channels)))
        for i in range(space.n_layers)
    ]
    return Plan(layers, method="uniform-test")
