"""Models spread over several devices (`--device-map auto`): where inputs go, and weights that are not there.

A model loaded with accelerate's big-model loading (`device_map`, `max_memory`, `offload_folder`) has
each module's weights on a GPU, in CPU memory or on disk. Offloaded weights sit on the `meta` device
outside forward: accelerate's hook (`AlignDevicesHook`) puts them on the module's execution device for
its forward and takes them away after. Two consequences, handled here once:

* Reading weights outside forward (scores, fingerprints, the repair's targets) needs them put back for
  a moment: `onloaded(module)` and `tensors(model)`, one module at a time.
* Editing weights (surgery slices and replaces modules) needs them for good: `editable(model, layer)`
  makes one decoder layer ordinary tensors on its execution device, and on exit puts the layer, as it
  now is, back where its weights lived: CPU memory, or a new safetensors file in the offload folder.
  So surgery and the layer-wise repair hold one layer on the accelerator at a time.

Hooks: accelerate moves a module's inputs to its execution device inside its forward, after the
ordinary `register_forward_pre_hook` hooks have run. Hooks that combine an input with a tensor of their
own (the masks, `units.masks`) therefore move theirs to the input's device, never the other way.

`input_device(model)` is where token ids go: the embedding's execution device.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

OFFLOAD_ATTR = "_secateurs_offload_folder"  # set on a model loaded with a device map (models.loading)
_FILE_ATTR = "_secateurs_offload_file"  # the file a re-offloaded layer's weights live in


def _hook(module: nn.Module) -> Any | None:
    return getattr(module, "_hf_hook", None)


def has_offloaded_params(module: nn.Module) -> bool:
    hook = _hook(module)
    return hook is not None and bool(getattr(hook, "offload", False))


def uses_device_map(model: nn.Module) -> bool:
    return bool(getattr(model, "hf_device_map", None))


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its hook's execution device, else its first real parameter's device."""
    for m in module.modules():
        hook = _hook(m)
        if hook is not None and getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
        for p in m.parameters(recurse=False):
            if p.device.type != "meta":
                return p.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's token ids go: the execution device of its input embeddings."""
    return execution_device(model.get_input_embeddings())


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype  # meta tensors keep their dtype


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """Inside, every offloaded weight of `module` (and its submodules) is a real tensor on its execution
    device; outside, back on `meta`. A no-op for a model without offload."""
    with contextlib.ExitStack() as stack:
        from accelerate.utils import align_module_device

        for m in module.modules():
            if has_offloaded_params(m):
                stack.enter_context(align_module_device(m))
        yield module


def tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter of `module` by name, as `named_parameters` lists them (a tied one once), real:
    offloaded ones loaded one module at a time."""
    seen: set[int] = set()
    for prefix, m in module.named_modules():
        with onloaded(m):
            for name, p in m.named_parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    yield f"{prefix}.{name}" if prefix else name, p


# -- one layer out of and back into offload -----------------------------------------------------------
@dataclass
class LayerPlacement:
    """Where a decoder layer lives: its own input-moving hook (if any), its execution device, and where
    its weights are kept between forwards (None: on the execution device; "cpu" or "disk")."""

    hook: Any | None
    device: torch.device
    storage: str | None


def _storage(hook: Any, name: str) -> str:
    """'cpu' or 'disk': where an offload hook's weights map keeps `name`."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    wm, key = hook.weights_map, name
    while isinstance(wm, PrefixedDataset):
        key, wm = wm.prefix + key, wm.dataset
    if isinstance(wm, OffloadedWeightsLoader):
        return "cpu" if key in wm.state_dict else "disk"
    return "cpu"


def placement_of(layer: nn.Module) -> LayerPlacement:
    own = _hook(layer)
    offloaded = [m for m in layer.modules() if has_offloaded_params(m)]
    storage = None
    if offloaded:
        name = next(n for n, _ in offloaded[0].named_parameters(recurse=False))
        storage = _storage(offloaded[0]._hf_hook, name)
    return LayerPlacement(own if not has_offloaded_params(layer) else None, execution_device(layer), storage)


def materialise_(layer: nn.Module) -> nn.Module:
    """Give every offloaded weight of `layer` its value for good, on its execution device, and remove
    the offload hooks (the layer's own input-moving hook stays)."""
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    for m in list(layer.modules()):
        if not has_offloaded_params(m):
            continue
        hook = m._hf_hook
        device = hook.execution_device
        names = [n for n, _ in m.named_parameters(recurse=False)]
        if hook.offload_buffers:
            names += [n for n, _ in m.named_buffers(recurse=False)]
        values = {n: hook.weights_map[n] for n in names}
        remove_hook_from_module(m)
        for n, v in values.items():
            set_module_tensor_to_device(m, n, device, value=v)
    return layer


def offload_folder(model: nn.Module) -> Path:
    """The directory re-offloaded layers are written to: under the model's offload folder, or a
    temporary one; removed when the process exits."""
    root = getattr(model, OFFLOAD_ATTR, None)
    if root is not None:
        Path(root).mkdir(parents=True, exist_ok=True)
    own = Path(tempfile.mkdtemp(prefix="secateurs-offload-", dir=root))
    atexit.register(shutil.rmtree, own, True)
    setattr(model, OFFLOAD_ATTR + "_own", own)
    return own


def place_(model: nn.Module, layer: nn.Module, where: LayerPlacement) -> nn.Module:
    """Put a layer with ordinary tensors where `where` says: on its device, or offloaded to CPU memory or
    to a file (its weights then on `meta` outside forward), with its input-moving hook."""
    from accelerate.hooks import add_hook_to_module, attach_align_device_hook
    from accelerate.utils import OffloadedWeightsLoader, set_module_tensor_to_device
    from safetensors.torch import save_file

    if where.storage is None:
        layer.to(where.device)
    else:
        state = {n: p.detach().to("cpu").contiguous() for n, p in layer.named_parameters()}
        old = getattr(layer, _FILE_ATTR, None)
        if where.storage == "disk":
            folder = getattr(model, OFFLOAD_ATTR + "_own", None) or offload_folder(model)
            path = Path(folder) / f"layer-{uuid.uuid4().hex[:12]}.safetensors"
            save_file(state, str(path))
            index = {n: {"safetensors_file": str(path), "weight_name": n, "dtype": str(t.dtype)[6:]}
                     for n, t in state.items()}  # fmt: skip
            weights: Any = OffloadedWeightsLoader(index=index)
            setattr(layer, _FILE_ATTR, path)
            state = {}
        else:
            weights = state
        for n in [n for n, _ in layer.named_parameters()]:
            set_module_tensor_to_device(layer, n, "meta")
        attach_align_device_hook(layer, execution_device=where.device, offload=True, weights_map=weights)
        if old is not None:
            Path(old).unlink(missing_ok=True)
    if where.hook is not None and _hook(layer) is None:
        add_hook_to_module(layer, where.hook)
    return layer


@contextlib.contextmanager
def editable(model: nn.Module, layer: nn.Module) -> Iterator[nn.Module]:
    """Inside, `layer`'s weights are ordinary tensors on its execution device (surgery may slice and
    replace its modules); on exit the layer as it then is goes back where its weights were kept. A
    no-op for a layer without offloaded weights."""
    where = placement_of(layer)
    if where.storage is None:
        yield layer
        return
    materialise_(layer)
    try:
        yield layer
    finally:
        place_(model, layer, where)


def renumber_device_map_(model: nn.Module, prefix: str, keep: list[int]) -> None:
    """After layers leave the model, `hf_device_map` names the survivors by their new indices."""
    old = getattr(model, "hf_device_map", None)
    if not old:
        return
    new_index = {str(i): str(j) for j, i in enumerate(keep)}
    out = {}
    for key, value in old.items():
        if key.startswith(prefix + "."):
            idx, _, rest = key[len(prefix) + 1 :].partition(".")
            if idx not in new_index:
                continue
            key = f"{prefix}.{new_index[idx]}" + (f".{rest}" if rest else "")
        out[key] = value
    model.hf_device_map = out
