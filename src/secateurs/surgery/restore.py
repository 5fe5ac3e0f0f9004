"""Put a model's decoder layers back as they were, without holding a second copy of the model.

Why: a method that prunes in place (Bonsai slices the model round after round) must hand the dense
model back to the repair (`reconstruct_` refits each layer against its unpruned weights). A deep copy
would double the memory, which is what forward-only pruning exists to avoid. The weights are on disk
already: `LayerSnapshot` keeps the layers' structure on the meta device (no memory) and, when the
model's own safetensors hold exactly its current layer weights (checked tensor by tensor when the
snapshot is taken), `restore_` rebuilds the layers and reads their weights back, one tensor at a time.
Only a model without such a checkpoint (built or changed in memory) falls back to a copy of its decoder
layers, and the log says so.
"""

from __future__ import annotations

import copy
import itertools
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from secateurs.models.adapters import adapter_for
from secateurs.models.loading import weight_files

log = logging.getLogger(__name__)


def _meta_copy(module: nn.Module, shared: object) -> nn.Module:
    """`module`'s structure with every parameter and buffer on the meta device (no memory); `shared`
    (the config the layers point to) stays the same object."""
    memo: dict[int, object] = {id(shared): shared}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = (
            nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
        )
    return copy.deepcopy(module, memo)


class LayerSnapshot:
    """The decoder layers and config of `model` as they are now, restorable by `restore_`."""

    def __init__(self, model: nn.Module):
        a = adapter_for(model)
        self._path = a.layers
        self._config_state = copy.deepcopy(vars(model.config))
        layers = a.decoder_layers(model)
        self._files = self._matching_files(model, layers)
        if self._files is None:
            log.info(
                "restore: no checkpoint on disk matches the model's weights; keeping a copy of its layers"
            )
            self._layers = copy.deepcopy(layers)
        else:
            self._layers = _meta_copy(layers, model.config)

    @property
    def holds_a_copy(self) -> bool:
        return self._files is None

    def _matching_files(self, model: nn.Module, layers: nn.ModuleList) -> dict[str, Path] | None:
        """The model's own weight files if they hold exactly these layers' tensors (compared one at a
        time, so that a model changed after loading never restores to stale weights)."""
        source = getattr(model.config, "_name_or_path", "") or ""
        files = weight_files(Path(source)) if source and Path(source).is_dir() else None
        if files is None:
            return None
        try:
            by_file = self._by_file(layers, files)
            for file, tensors in by_file.items():
                with safe_open(file, framework="pt") as f:
                    for key, t in tensors:
                        if not torch.equal(f.get_tensor(key).to(t.dtype), t.detach().cpu()):
                            return None
        except Exception:  # noqa: BLE001 - missing keys, unreadable or foreign files: not a source
            return None
        return files

    def _by_file(self, layers: nn.ModuleList, files: dict[str, Path]) -> dict[Path, list]:
        """The layers' tensors grouped by the file that holds them (KeyError if one is missing)."""
        by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
        for name, t in itertools.chain(layers.named_parameters(), layers.named_buffers()):
            key = f"{self._path}.{name}"
            by_file.setdefault(files[key], []).append((key, t))
        return by_file

    def restore_(self, model: nn.Module) -> nn.Module:
        """Give `model` back the snapshot's layers and config, in place (once); returns `model`."""
        if self._files is None:
            layers = self._layers
        else:
            device = next(model.parameters()).device
            layers = self._layers.to_empty(device=device)
            with torch.no_grad():
                for file, tensors in self._by_file(layers, self._files).items():
                    with safe_open(file, framework="pt") as f:
                        for key, t in tensors:
                            t.copy_(f.get_tensor(key))
        parent, _, child = self._path.rpartition(".")
        setattr(model.get_submodule(parent), child, layers)
        vars(model.config).clear()
        vars(model.config).update(copy.deepcopy(self._config_state))
        return model
