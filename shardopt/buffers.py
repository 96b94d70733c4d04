"""The tensors one rank holds for one bucket of a :class:`~shardopt.plan.ShardPlan`.

Per bucket:

* ``param_flat``: the whole bucket in the model's dtype. Model parameters are
  views of it, so the all-gather after the step writes them with no copy-out.
* ``master``: this rank's region in fp32. For fp32 models it *is* the region of
  ``param_flat`` (no second copy); for bf16/fp16 models a separate fp32 tensor.
* ``grad_region``: this rank's averaged gradient region (stage 2), or a view of
  ``grad_flat`` (stage 1, which keeps the full averaged gradient).
* ``grad_flat``: the full bucket of local gradients, the reduce-scatter's (or
  all-reduce's) input. Stage 2 frees it after every step.
* ``states``: the rule's declared state for the region, allocated on the
  first step (lazily, like torch.optim), over the region's used elements only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .plan import Bucket
from .rules.base import StateShape, StateSpec, allocate_state


@dataclass
class BucketBuffers:
    bucket: Bucket
    rank: int
    param_flat: Tensor
    master: Tensor
    reduce_dtype: torch.dtype
    keep_grad_flat: bool
    grad_flat: Tensor | None = None
    grad_region: Tensor | None = None
    states: dict[str, Tensor] = field(default_factory=dict)
    matrix_states: list[dict[str, Tensor]] = field(default_factory=list)

    @property
    def used_numel(self) -> int:
        return self.bucket.used_region_numel(self.rank)

    @property
    def region(self) -> tuple[int, int]:
        return self.bucket.region_bounds(self.rank)

    def param_region(self) -> Tensor:
        start, end = self.region
        return self.param_flat[start:end]

    def master_separate(self) -> bool:
        return self.master.data_ptr() != self.param_region().data_ptr() or (
            self.master.dtype != self.param_flat.dtype
        )

    def ensure_grad_flat(self) -> Tensor:
        if self.grad_flat is None:
            # Uninitialised: every slot is written by a gradient (or zeros when it
            # has none), and the reducer zeroes the padding before the collective.
            self.grad_flat = torch.empty(
                self.bucket.flat_numel, dtype=self.reduce_dtype, device=self.param_flat.device
            )
        return self.grad_flat

    def ensure_grad_region(self) -> Tensor:
        if self.keep_grad_flat:
            start, end = self.region
            self.grad_region = self.ensure_grad_flat()[start:end]
        elif self.grad_region is None:
            self.grad_region = torch.empty(
                self.bucket.region_numel, dtype=self.reduce_dtype, device=self.param_flat.device
            )
        return self.grad_region

    def release_grad_flat(self) -> None:
        if not self.keep_grad_flat:
            self.grad_flat = None

    def allocate_states(
        self, specs: tuple[StateSpec, ...], matrix_views: list[tuple[int, int, tuple[int, ...]]]
    ) -> None:
        """Allocate ``specs`` for the used part of the region.

        ``matrix_views`` (matrix rules) lists ``(region_offset, numel, shape)`` for each
        owned matrix; its state dicts are views into the flat state tensors.
        """
        if self.states:
            return
        used = self.master[: self.used_numel]
        self.states = allocate_state(specs, used)
        self.matrix_states = []
        for offset, numel, shape in matrix_views:
            per_matrix: dict[str, Tensor] = {}
            for spec in specs:
                if spec.shape is StateShape.PARAM:
                    per_matrix[spec.name] = self.states[spec.name][offset : offset + numel].view(shape)
                else:
                    per_matrix[spec.name] = allocate_state((spec,), used)[spec.name]
            self.matrix_states.append(per_matrix)

    def state_tensors(self) -> dict[str, list[Tensor]]:
        """Every state tensor this bucket holds, by state name."""
        found: dict[str, list[Tensor]] = {name: [t] for name, t in self.states.items()}
        for per_matrix in self.matrix_states:
            for name, tensor in per_matrix.items():
                if name not in self.states or self.states[name].dim() == 0:
                    found.setdefault(name, []).append(tensor)
        return found


def storage_bytes(tensors: list[Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
