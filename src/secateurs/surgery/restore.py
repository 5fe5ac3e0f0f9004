"""Put a model's decoder layers back as they were, without holding a second copy of the model.

Why: a method that prunes in place (Bonsai slices the model round after round) must hand the dense
model back to the repair (`reconstruct_` refits each layer against its unpruned weights). A deep copy
would double the memory, which is what forward-only pruning exists to avoid. The weights are on disk
already: `LayerSnapshot` keeps the layers' structure on the meta device (no memory) and, when the
model's own safetensors hold exactly its current layer weights (checked tensor by tensor when the
snapshot is taken), `restore_` rebuilds the layers and reads their weights back, one tensor at a time.
Only a model without such a checkpoint (built or changed in memory) falls back to a copy of its decoder
layers, and the log says so. A model spread over devices (`--device-map`) gets each layer back where it
was: on its device, or offloaded to CPU memory or disk (`models.placement`).
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
from secateurs.models.placement import onloaded, place_, placement_of

log = logging.getLogger(__name__)


_HOOK_ATTRS = ("_hf_hook", "_old_forward", "forward")  # what accelerate's hooks add to a module


def _meta_copy(module: nn.Module, shared: object) -> nn.Module:
    """`module`'s structure with every parameter and buffer on the meta device (no memory); `shared`
    (the config the layers point to) stays the same object. Accelerate's hooks (and the weights they
    keep offloaded) are left out: `restore_` puts each layer back where it was."""
    memo: dict[int, object] = {id(shared): shared}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = (
            nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
        )
    for m in module.modules():
        if hasattr(m, "_hf_hook"):
            memo[id(m._hf_hook)] = None
    out = copy.deepcopy(module, memo)
    for m in out.modules():
        for attr in _HOOK_ATTRS:
            m.__dict__.pop(attr, None)
    return out


class LayerSnapshot:
    """The decoder layers and config of `model` as they are now, restorable by `restore_`."""

    def __init__(self, model: nn.Module):
        a = adapter_for(model)
        self._path = a.layers
        self._config_state = copy.deepcopy(vars(model.config))
        layers = a.decoder_layers(model)
        self._placements = [placement_of(layer) for layer in layers]
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
            for i, layer in enumerate(layers):
                with onloaded(layer):  # offloaded weights are compared too, one layer at a time
                    for file, tensors in self._by_file(layer, i, files).items():
                        with safe_open(file, framework="pt") as f:
                            for key, t in tensors:
                                if not torch.equal(f.get_tensor(key).to(t.dtype), t.detach().cpu()):
                                    return None
        except Exception:  # noqa: BLE001 - missing keys, unreadable or foreign files: not a source
            return None
        return files

    def _by_file(self, layer: nn.Module, index: int, files: dict[str, Path]) -> dict[Path, list]:
        """Layer `index`'s tensors grouped by the file that holds them (KeyError if one is missing)."""
        by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
        for name, t in itertools.chain(layer.named_parameters(), layer.named_buffers()):
            key = f"{self._path}.{index}.{name}"
            by_file.setdefault(files[key], []).append((key, t))
        return by_file

    def restore_(self, model: nn.Module) -> nn.Module:
        """Give `model` back the snapshot's layers and config, in place (once); returns `model`."""
        if self._files is None:
            layers = self._layers
        else:
            layers = self._layers
            with torch.no_grad():
                for i, (layer, where) in enumerate(zip(layers, self._placements, strict=True)):
                    layer.to_empty(device="cpu" if where.storage else where.device)
                    for file, tensors in self._by_file(layer, i, self._files).items():
                        with safe_open(file, framework="pt") as f:
                            for key, t in tensors:
                                t.copy_(f.get_tensor(key))
                    place_(model, layer, where)  # back on its device, or offloaded as it was
        parent, _, child = self._path.rpartition(".")
        setattr(model.get_submodule(parent), child, layers)
        vars(model.config).clear()
        vars(model.config).update(copy.deepcopy(self._config_state))
        return model
