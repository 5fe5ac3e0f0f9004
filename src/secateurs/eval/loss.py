"""The one evaluator: a batch of masks goes in, one loss per mask comes out.

Bonsai's sub-models, the policy gradient's K samples and the metric methods' checks all get losses here,
so batching, chunked cross-entropy and data-parallel workers live in one place. With torch.distributed
initialised, each rank runs its share of a call's micro-batches and the losses are gathered, exactly, so
that every rank continues with the numbers one process would have computed (`secateurs.distributed`). Losses never need
full-vocabulary logits for every token at once: the decoder's final hidden states go through `lm_head`
a few thousand tokens at a time, then through what the family's `*ForCausalLM` does after it
(`FamilyAdapter.final_logits`: Granite's logits scaling, Gemma's soft-capping).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from secateurs import distributed
from secateurs.errors import LossError
from secateurs.models.adapters import adapter_for
from secateurs.models.placement import input_device
from secateurs.progress import progress as progress_bar
from secateurs.units.masks import Masks, masked
from secateurs.units.space import UnitSpace

log = logging.getLogger(__name__)
_IDLE_WARNED: list[bool] = []

LOGIT_CHUNK_TOKENS = 2048  # rows of [tokens, vocab] logits alive at once: 2048 x 49k fp32 = 400 MB


def token_nll(model: nn.Module, input_ids: torch.Tensor, chunk: int = LOGIT_CHUNK_TOKENS) -> torch.Tensor:
    """Per-row summed next-token NLL, [B], computed without materialising [B, T, vocab] logits."""
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    head = model.get_output_embeddings()
    final = adapter_for(model).final_logits
    labels = input_ids[:, 1:]
    b, t, d = hidden.shape
    flat_h, flat_y = hidden.reshape(-1, d), labels.reshape(-1)
    out = torch.empty(b * t, device=hidden.device, dtype=torch.float32)
    for s in range(0, b * t, chunk):
        logits = final(model.config, head(flat_h[s : s + chunk]).float())
        nll = F.cross_entropy(logits, flat_y[s : s + chunk].to(logits.device), reduction="none")
        out[s : s + chunk] = nll.to(out.device)  # lm_head may sit on another device (--device-map)
    return out.view(b, t).sum(dim=1)


# Activations alive per token in one layer's forward under inference mode, in units of the hidden size
# (residual, norm output, q/k/v/o, attention output; sdpa keeps no [T, T] scores) plus 3 x the MLP width
# (gate, up, their product): an estimate, with room to spare in `FREE_MEMORY_SHARE`.
ACTIVATION_HIDDEN_FACTOR = 8
FREE_MEMORY_SHARE = 0.5  # of the memory free after loading, for one forward's activations
MAX_AUTO_ROWS = 256  # beyond this a forward is long enough; more rows only delay progress reports


def rows_for_free_memory(model: nn.Module, seq_len: int) -> int | None:
    """Rows of `seq_len` tokens per forward that fit in `FREE_MEMORY_SHARE` of the free CUDA memory of the
    model's input device (an estimate from the layer widths), or None on CPU. The logits are chunked
    (`LOGIT_CHUNK_TOKENS`) and taken off the budget first."""
    device = input_device(model)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cfg = model.config
    element = next(model.parameters()).element_size()
    per_token = (ACTIVATION_HIDDEN_FACTOR * cfg.hidden_size + 3 * cfg.intermediate_size) * element
    logits = LOGIT_CHUNK_TOKENS * cfg.vocab_size * 4 * 2  # fp32 logits and their softmax
    budget = FREE_MEMORY_SHARE * free - logits
    return int(max(1, min(MAX_AUTO_ROWS, budget // (per_token * seq_len))))


@dataclass
class EvalStats:
    """Work done: `forwards` / `tokens` over all ranks (what one process would have done, the same for
    any number of workers), `local_*` this rank's share of them."""

    forwards: int = 0  # batched forward calls
    tokens: int = 0  # tokens pushed through the model (rows x length)
    local_forwards: int = 0
    local_tokens: int = 0


def masks_per_call(n_windows: int, max_rows: int) -> int:
    """Masks per `losses` call so that calls fill whole forwards on every worker: callers that split a
    long evaluation into calls (for a progress bar) lose no parallelism. The micro-batches, hence the
    losses, do not depend on it."""
    return max(1, math.lcm(n_windows, max_rows) // n_windows) * distributed.world_size()


class SubmodelEvaluator:
    """Scores sub-models of one model on a fixed set of calibration windows.

    Every mask is scored on the same `windows` ([N, T] token ids), so losses are comparable across masks.
    `max_rows` bounds the rows of one forward (memory); masks are packed so that a forward carries
    several masks x windows at once. The micro-batches are rows `[j * max_rows, (j + 1) * max_rows)` of
    the call's masks x windows, whatever the number of workers; rank `j % world` runs micro-batch j.
    """

    def __init__(
        self, model: nn.Module, windows: torch.Tensor, max_rows: int = 16, space: UnitSpace | None = None
    ):
        self.model = model
        self.space = space or UnitSpace.from_model(model)
        self.device = input_device(model)
        self.windows = windows.to(self.device)
        self.max_rows = max(1, max_rows)
        self.stats = EvalStats()

    @property
    def n_windows(self) -> int:
        return self.windows.shape[0]

    def refresh(self) -> None:
        """Call after the model was pruned in place (shapes changed)."""
        self.space = UnitSpace.from_model(self.model)

    @torch.inference_mode()
    def losses(self, masks: Masks | None = None, progress: str | None = None) -> torch.Tensor:
        """Mean per-token NLL of each mask's sub-model over all windows: [masks.batch] (or [1] if None).

        `progress`: a label to show a progress bar over the forwards (for long evaluations).
        """
        n, t = self.windows.shape
        k = 1 if masks is None else masks.batch
        rows = masks.repeat_interleave(n) if masks is not None else None
        total = torch.zeros(k * n, dtype=torch.float32)  # zeros: the other ranks' rows (see gather)
        starts = range(0, k * n, self.max_rows)
        if len(starts) < distributed.world_size() and not _IDLE_WARNED:
            _IDLE_WARNED.append(True)  # once per process: the policy gradient makes an evaluator per step
            log.warning(
                "%d micro-batch(es) of %d rows per call for %d workers: some workers idle; a smaller "
                "--batch-rows spreads them (plans are the same for the same --batch-rows)",
                len(starts), self.max_rows, distributed.world_size(),
            )  # fmt: skip
        mine = [starts[j] for j in distributed.my_share(len(starts))]
        for s in mine if progress is None else progress_bar(mine, desc=progress, unit="fwd", leave=False):
            e = min(s + self.max_rows, k * n)
            ids = self.windows[torch.arange(s, e) % n]
            if rows is None:
                total[s:e] = token_nll(self.model, ids).cpu()
            else:
                with masked(self.model, rows.rows(s, e), self.space):
                    total[s:e] = token_nll(self.model, ids).cpu()
            self.stats.local_forwards += 1
            self.stats.local_tokens += (e - s) * t
        total = distributed.gather_disjoint(total, "sub-model losses")
        self.stats.forwards += len(starts)
        self.stats.tokens += k * n * t
        out = total.view(k, n).sum(dim=1) / (n * (t - 1))
        if not torch.isfinite(out).all():
            raise LossError(f"non-finite loss from {int((~torch.isfinite(out)).sum())} of {k} sub-models")
        return out


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Held-out perplexity over contiguous windows; reports the token count and sequence length with it."""
    ev = SubmodelEvaluator(model, windows, max_rows=batch_size)
    nll = float(ev.losses(progress=f"perplexity ({windows.numel():,} tokens)")[0])
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "tokens": int(windows.numel()),
        "seq_len": int(windows.shape[1]),
        "windows": int(windows.shape[0]),
    }
