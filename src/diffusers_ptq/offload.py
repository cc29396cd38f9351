"""Quantizing a UNet that accelerate streams in module by module (sequential CPU offload).

`pipe.enable_sequential_cpu_offload()` (accelerate's `cpu_offload`) leaves every weight on the meta device
and copies it to the execution device inside each module's forward hook. Quantization reads and rewrites
the weights themselves (scale searches, GPTQ, reconstruction), so for its duration `onloaded` puts the real
weights back, removes the hooks and holds the UNet on the hooks' execution device, where the pipeline
sends its inputs. Afterwards, also on failure, the same offload is installed again on the UNet as it then
is (quantized, or restored to float), so the offloaded copy never holds stale weights.
Model CPU offload (`enable_model_cpu_offload`) keeps real weights and needs none of this.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _offloading_hooks(module: nn.Module) -> list[tuple[nn.Module, object]]:
    hooks = []
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        if (
            hook is not None
            and getattr(hook, "offload", False)
            and getattr(hook, "weights_map", None) is not None
        ):
            hooks.append((m, hook))
    return hooks


def is_sequentially_offloaded(module: nn.Module) -> bool:
    """True when accelerate hooks stream `module`'s weights in from an offload map."""
    return bool(_offloading_hooks(module))


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[torch.device | None]:
    """Within the block, a sequentially offloaded `module` has real weights, no hooks, and sits on the
    hooks' execution device (yielded; None and nothing done for a module that is not offloaded)."""
    hooks = _offloading_hooks(module)
    if not hooks:
        yield None
        return
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    device = torch.device(hooks[0][1].execution_device)
    offload_buffers = any(getattr(hook, "offload_buffers", False) for _, hook in hooks)
    for m, hook in hooks:
        names = [n for n, _ in m.named_parameters(recurse=False)]
        if offload_buffers:
            names += [n for n, _ in m.named_buffers(recurse=False)]
        for name in names:
            set_module_tensor_to_device(m, name, "cpu", value=hook.weights_map[name])
    remove_hook_from_module(module, recurse=True)
    module.to(device)
    try:
        yield device
    finally:
        module.to("cpu")
        cpu_offload(module, execution_device=device, offload_buffers=offload_buffers)
