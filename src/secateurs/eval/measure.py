"""Timing and memory for reports, and speed of dense vs pruned models measured side by side."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

MIN_SECONDS = 1e-9  # a decode time difference at timer resolution must not divide by zero


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (what the OS had to give it).

    Linux: `VmHWM` from /proc/self/status, the high-water mark of this process image. `ru_maxrss` is
    carried across fork + exec, so a child started by a process that had touched 800 MB reports at
    least 800 MB; compare's per-run figures would be the parent's, not the run's.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _reset_peak_rss() -> bool:
    """Restart the kernel's high-water mark (`VmHWM`) at the current RSS (Linux >= 4.0); False where it
    cannot, and then `peak_rss_mb` stays the process peak."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Measured:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0  # the block's own peak where the OS can say so, else the process peak
    cuda_peak_mb: float | None = None

    def record(self) -> dict[str, float]:
        out = {"seconds": round(self.seconds, 2), "peak_rss_mb": round(self.peak_rss_mb, 1)}
        if self.cuda_peak_mb is not None:
            out["cuda_peak_mb"] = round(self.cuda_peak_mb, 1)
        return out


_OPEN: list[Measured] = []  # enclosing `measure` blocks: a nested one's reset must not lose their peaks


def _carry_peaks() -> None:
    """Before a reset: what the enclosing blocks have seen so far goes into their figures."""
    rss = peak_rss_mb()
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    for m in _OPEN:
        m.peak_rss_mb = max(m.peak_rss_mb, rss)
        if cuda is not None:
            m.cuda_peak_mb = max(m.cuda_peak_mb or 0.0, cuda)


@contextmanager
def measure() -> Iterator[Measured]:
    """Wall time and peak memory of a block: peak RSS on CPU (the kernel's high-water mark, restarted at
    entry where Linux allows), `torch.cuda.max_memory_allocated` on CUDA (reset at entry). Blocks nest:
    an inner block's reset is carried into the outer ones first."""
    m = Measured()
    cuda = torch.cuda.is_available()
    _carry_peaks()
    _reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _OPEN.append(m)
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        _OPEN.remove(m)
        if cuda:
            torch.cuda.synchronize()
            m.cuda_peak_mb = max(m.cuda_peak_mb or 0.0, torch.cuda.max_memory_allocated() / 2**20)
        m.seconds = time.perf_counter() - t0
        m.peak_rss_mb = max(m.peak_rss_mb, peak_rss_mb())
        for outer in _OPEN:  # what this block saw is part of the enclosing blocks too
            outer.peak_rss_mb = max(outer.peak_rss_mb, m.peak_rss_mb)
            if m.cuda_peak_mb is not None:
                outer.cuda_peak_mb = max(outer.cuda_peak_mb or 0.0, m.cuda_peak_mb)


@contextmanager
def phase(report: dict, name: str) -> Iterator[Measured]:
    """`measure` a phase of a job into `report["phases"][name]`; with data-parallel workers, the peaks
    of the busiest rank (each rank holds its own copy of the model)."""
    from secateurs import distributed

    with measure() as m:
        yield m
    m.peak_rss_mb = distributed.all_max(m.peak_rss_mb, "peak memory")
    if m.cuda_peak_mb is not None:
        m.cuda_peak_mb = distributed.all_max(m.cuda_peak_mb, "peak memory")
    report.setdefault("phases", {})[name] = m.record()


def linear_macs_per_token(model: nn.Module) -> int:
    """Multiply-adds per token in linear layers (lm_head included): the bound on a pruning speed-up.

    Attention score/value products are left out; they are small next to the projections at short
    context and shrink in proportion to the kept heads.
    """
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def _prefill_seconds(model: nn.Module, ids: torch.Tensor) -> float:
    _sync(ids.device)
    t0 = time.perf_counter()
    model(ids, use_cache=False, logits_to_keep=1)
    _sync(ids.device)
    return time.perf_counter() - t0


@torch.inference_mode()
def _generate_seconds(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    """Wall time of greedy `generate` of exactly `new_tokens` tokens (KV cache on, as users run it)."""
    _sync(ids.device)
    t0 = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    _sync(ids.device)
    return time.perf_counter() - t0


def _decode_seconds(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds per generated token with a KV cache: `generate` of 1 + n tokens minus `generate` of 1 (the
    prompt's prefill and the first token), over n. Through `generate`, the public API, rather than a
    hand-driven cache, whose keyword (`past_key_values` -> `cache`) moves between transformers versions."""
    first = _generate_seconds(model, ids, 1)
    both = _generate_seconds(model, ids, 1 + new_tokens)
    return max(both - first, MIN_SECONDS) / new_tokens


def bench_speed(
    models: dict[str, nn.Module],
    prompt_len: int = 256,
    batch: int = 1,
    new_tokens: int = 32,
    repeats: int = 5,
    vocab: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Prefill tokens/s and decode tokens/s for each model, runs interleaved so drift hits all alike.

    The first run of each model is a warm-up and is discarded; the median of `repeats` is reported.
    """
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    vocab = vocab or first.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed)).to(
        device
    )
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in models}
    for r in range(repeats + 1):
        for name, model in models.items():
            p = _prefill_seconds(model, ids)
            d = _decode_seconds(model, ids[:, : min(prompt_len, 32)], new_tokens)
            if r:  # run 0 is warm-up
                times[name]["prefill"].append(p)
                times[name]["decode"].append(d)
    return {
        name: {
            "prefill_tok_s": batch * prompt_len / statistics.median(t["prefill"]),
            "decode_tok_s": batch / statistics.median(t["decode"]),
            "macs_per_token": linear_macs_per_token(models[name]),
        }
        for name, t in times.items()
    }
