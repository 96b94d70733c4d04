"""torch's fused update kernels, called as torch.optim calls them with ``fused=True``.

torch has one-pass CPU and CUDA kernels for four rules: ``torch._fused_adam_``,
``torch._fused_adamw_``, ``torch._fused_sgd_`` and ``torch._fused_adagrad_``
(aten/src/ATen/native/cpu/Fused*Kernel.cpp and native/cuda/fused_*). Each reads
every element of the parameter, gradient and states once and writes the new
values once, with no temporaries, which is why it runs near memory bandwidth
where the foreach and for-loop paths make several passes and allocate
model-sized intermediates. The rules call them from their ``update`` when a
group says ``fused=True``; the arguments are prepared exactly as
``torch/optim/{adam,sgd,adagrad}.py`` (``_fused_adam`` and its siblings) prepare
them, so the results are bitwise those of torch.optim with ``fused=True``:

* tensors are grouped by (device, dtype), one kernel call per group;
* ``step`` is a float32 tensor on the parameter's device, incremented with a
  foreach add before the kernel (which reads it on the device: no host sync);
* a Tensor ``lr`` on a CUDA (or other non-CPU) device is moved to each group's
  device and passed as a Tensor; a CPU Tensor ``lr`` is passed as it is (the
  kernels' ``tensor_lr`` overload);
* ``grad_scale`` and ``found_inf`` (what ``torch.amp.GradScaler`` sets on an
  optimizer whose ``_step_supports_amp_scaling`` is true) go to the kernel, which
  unscales the gradients and skips the update where ``found_inf`` is non-zero;
  the step counts are then decremented by ``found_inf``, as torch does.

The kernels are elementwise, but an element's result may depend on where it sits:
the CPU kernels run a vectorised loop (with fused multiply-adds) and a scalar
tail at each tensor's end, which round differently (measured on torch 2.13 for
SGD with momentum and for Adam with ``maximize``). One call over the ZeRO
engine's flat area would move the tails; the engine passes one view per
parameter piece instead (``ZeroOptimizer._apply_rules``), which gives torch's
tails wherever a parameter lies whole in one area.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

# Keys the single-process optimizers add to a group's hyperparameters for one step
# when torch.amp.GradScaler has set ``grad_scale``/``found_inf`` on the optimizer.
GRAD_SCALE, FOUND_INF = "_grad_scale", "_found_inf"


def by_device_and_dtype(lists: Sequence[Sequence[Any]]) -> list[tuple[torch.device, list[list[Any]]]]:
    """``lists`` (parallel lists, the first one of tensors) split by the first list's
    (device, dtype), in order of first appearance, as torch.optim's
    ``_group_tensors_by_device_and_dtype`` splits them for one kernel call per group."""
    groups: dict[tuple[torch.device, torch.dtype], list[list[Any]]] = {}
    for index, tensor in enumerate(lists[0]):
        key = (tensor.device, tensor.dtype)
        if key not in groups:
            groups[key] = [[] for _ in lists]
        for out, source in zip(groups[key], lists):
            out.append(source[index])
    return [(device, columns) for (device, _), columns in groups.items()]


def kernel_lr(lr: Any, device: torch.device) -> Any:
    """``lr`` as torch.optim hands it to a fused kernel on ``device``: a Tensor on a
    non-CPU device is moved there (``lr_dict`` in torch's ``_fused_adam``), a CPU
    Tensor and a number are passed unchanged."""
    if isinstance(lr, Tensor) and lr.device.type != "cpu" and lr.device != device:
        return lr.to(device=device, non_blocking=True)
    return lr


def amp_tensors(hp: Mapping[str, Any], device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_scale, found_inf)`` of this step on ``device`` (None when not set)."""
    scale, found = hp.get(GRAD_SCALE), hp.get(FOUND_INF)
    if scale is not None:
        scale = scale.to(device, non_blocking=True)
    if found is not None:
        found = found.to(device, non_blocking=True)
    return scale, found


def advance_steps(steps: list[Tensor]) -> None:
    """``step += 1`` on the device, as torch's fused paths do before the kernel."""
    torch._foreach_add_(steps, 1)


def undo_skipped_steps(steps: list[Tensor], found_inf: Tensor | None) -> None:
    """Take back the step increment where GradScaler found non-finite gradients."""
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))
