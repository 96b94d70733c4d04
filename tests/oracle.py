"""The unsharded oracle given exactly what ZeroOptimizer computes with.

ZeroOptimizer averages the ranks' gradients by summing them in rank order and
dividing by the number of ranks (``shardopt/comm.py``), and a bf16 model steps
fp32 master weights copied from its own rounded weights. :class:`RankMeanOracle`
does the same in one process: each rank's slice backpropagated on its own, the
gradients cast to fp32, summed in rank order, divided, stepped on fp32 master
weights that are then rounded into the model. Compared with it, a sharded run
must agree bit for bit (bf16 Newton-Schulz included, which would turn any
last-bit difference of its input into bf16 ulps of the update).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


class RankMeanOracle:
    def __init__(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        self.model = model
        fp32 = all(p.dtype == torch.float32 for p in model.parameters())
        self.master = model if fp32 else copy.deepcopy(model).float()
        self.opt = make_optimizer(self.master)

    def step(self, slices: list[torch.Tensor], loss_of: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        total = [torch.zeros_like(p) for p in self.master.parameters()]
        for part in slices:
            loss_of(self.model, part).backward()
            for acc, p in zip(total, self.model.parameters()):
                acc.add_(p.grad.float())
                p.grad = None
        for acc, p in zip(total, self.master.parameters()):
            p.grad = acc.div_(len(slices))
        self.opt.step()
        self.opt.zero_grad()
        if self.model is not self.master:
            with torch.no_grad():
                for p, m in zip(self.model.parameters(), self.master.parameters()):
                    p.copy_(m)
