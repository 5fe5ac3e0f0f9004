"""The GPU path at real shapes, in one short run: random-weight Llama-3-8B and Qwen2.5-7B, built from
their configs in code (no weights are downloaded), then one policy-gradient step (its wanda-sp init
pass included), one Bonsai round (prior pass, sub-model scoring, regression, surgery) and the
least-squares repair of a two-layer model of the same widths. Prints time, peak GPU memory and
tokens/s per phase as one table (tokens: those pushed through the model; for the repair, the
calibration tokens, each through 3 passes of the two layers).

    python bench/gpu_check.py                # on a GPU: bf16, about 2-4 min on an H100-class GPU (estimate)
    python bench/gpu_check.py --tiny         # tiny shapes, CPU or GPU: what the test suite runs

Sub-model batches are sized from free GPU memory (as `secateurs prune` does on CUDA); fp32 on CPU.
Random weights give meaningless plans: this checks that the path runs, its memory and its speed.
Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import transformers

from secateurs.eval.loss import rows_for_free_memory
from secateurs.eval.measure import measure
from secateurs.methods.bonsai import Bonsai, BonsaiConfig
from secateurs.methods.policy_gradient import PolicyGradient, PolicyGradientConfig
from secateurs.models.loading import resolve_dtype
from secateurs.scoring.select import target_params
from secateurs.surgery.apply import apply_plan_
from secateurs.surgery.reconstruct import ReconstructConfig, reconstruct_
from secateurs.testing import uniform_plan
from secateurs.units.space import UnitSpace

# The published configs' shapes (config.json of meta-llama/Meta-Llama-3-8B and Qwen/Qwen2.5-7B).
REAL = {
    "llama-3-8b": lambda: transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "qwen2.5-7b": lambda: transformers.Qwen2Config(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
}  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
TINY_VOCAB = 256


def build(name: str, tiny: bool, device: torch.device, dtype: torch.dtype, layers: int | None = None):
    """A random-weight model of `name`'s shapes, initialised on `device` itself (transformers' own init:
    normal(0, 0.02), unit norms, zero biases), so that 8B parameters take seconds, not a CPU's minutes."""
    cfg = REAL[name]()
    if tiny:
        for k, v in TINY.items():
            setattr(cfg, k, v)
        cfg.vocab_size = TINY_VOCAB
    if layers is not None:
        cfg.num_hidden_layers = layers
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def windows(n: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def row(model_name: str, phase: str, m, tokens: int) -> dict[str, str]:
    return {
        "model": model_name,
        "phase": phase,
        "time s": f"{m.seconds:.1f}",
        "peak GPU MB": f"{m.cuda_peak_mb:,.0f}" if m.cuda_peak_mb is not None else "-",
        "tokens": f"{tokens:,}" if tokens else "-",
        "tokens/s": f"{tokens / max(m.seconds, 1e-9):,.0f}" if tokens else "-",
    }


def check(name: str, tiny: bool, device: torch.device, dtype: torch.dtype, args) -> list[dict[str, str]]:
    rows = []
    with measure() as m:
        model = build(name, tiny, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    rows.append(row(name, f"build ({n_params:,} params, {str(dtype)[6:]})", m, 0))
    space = UnitSpace.from_model(model)
    calib = windows(args.nsamples, args.seq_len, model.config.vocab_size)
    batch = rows_for_free_memory(model, args.seq_len) or args.batch_rows

    pg = PolicyGradient(PolicyGradientConfig(sparsity=0.5, steps=1, batch_rows=batch))
    with measure() as m:
        plan = pg.plan(model, space, calib)
    rows.append(row(name, "policy-gradient: init pass + 1 step", m, int(calib.numel()) + plan.info["tokens"]))

    cfg = BonsaiConfig(sparsity=0.1, prune_frac=0.1, batch_rows=batch, masks_per_round=args.masks_per_round)
    bonsai = Bonsai(cfg)
    budget = target_params(space, cfg.sparsity)
    with measure() as m:
        result = bonsai.run_round(model, space, calib, budget, torch.Generator().manual_seed(0), 0, 1)
        apply_plan_(model, result.plan)  # the round's surgery (the dense model is not needed again)
    tokens = result.info["tokens"] + result.info["prior_tokens"]
    rows.append(row(name, f"bonsai round ({cfg.masks_per_round} sub-models, surgery)", m, tokens))
    del model, bonsai, result
    if device.type == "cuda":
        torch.cuda.empty_cache()

    two = build(name, tiny, device, dtype, layers=2)
    sp2 = UnitSpace.from_model(two)
    lu = sp2.layers[0]
    half = uniform_plan(sp2, groups=max(1, lu.n_groups // 2), channels=max(1, lu.n_channels // 2))
    with measure() as m:
        reconstruct_(two, half, calib, ReconstructConfig(), batch_rows=batch)
    rows.append(row(name, "repair of 2 layers at 50% (lstsq)", m, int(calib.numel())))
    return rows


def table(rows: list[dict[str, str]]) -> str:
    cols = list(rows[0])
    w = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = [
        "| " + " | ".join(c.ljust(w[c]) for c in cols) + " |",
        "|" + "|".join("-" * (w[c] + 2) for c in cols) + "|",
    ]
    lines += ["| " + " | ".join(r[c].ljust(w[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes of the same families (CPU or GPU)")
    ap.add_argument("--models", default=",".join(REAL), help=f"comma list of {', '.join(REAL)}")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (the CLI default)")
    ap.add_argument("--seq-len", type=int, default=128, help="their length (the CLI default)")
    ap.add_argument("--masks-per-round", type=int, default=40, help="Bonsai's sub-models (its default)")
    ap.add_argument(
        "--batch-rows", type=int, default=8, help="rows per forward on CPU (CUDA: from free memory)"
    )
    args = ap.parse_args(argv)
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    if not args.tiny and device.type != "cuda":
        print(
            "gpu_check: real shapes need a GPU (about 16 GB per model in bf16); use --tiny on CPU",
            file=sys.stderr,
        )
        return 2
    dtype = resolve_dtype(None, device)
    t0 = time.perf_counter()
    rows = []
    for name in (m.strip() for m in args.models.split(",") if m.strip()):
        rows += check(name, args.tiny, device, dtype, args)
    gpu = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"gpu_check on {gpu}; {args.nsamples} x {args.seq_len}-token calibration windows; {'tiny' if args.tiny else 'real'} shapes"
    )
    print(table(rows))
    print(f"total {math.ceil(time.perf_counter() - t0)} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
