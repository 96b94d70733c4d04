"""shardopt on PyTorch's own parameter-sharding engines: FSDP2 (``fully_shard``) and
tensor parallelism, whose parameters are DTensors (``docs/design/dtensor.md``).

The elementwise optimizers (:class:`shardopt.SGD` ... :class:`shardopt.Lion`) need
nothing from here: they step DTensor parameters shard by shard with no
communication. :func:`clip_grad_norm_` clips by the global gradient norm across
every shard and mesh, which ``torch.nn.utils.clip_grad_norm_`` cannot do once
parameters live on different meshes (FSDP2 x TP with parameters left out of TP).
"""

from .clip import clip_grad_norm_, grad_norm

__all__ = ["clip_grad_norm_", "grad_norm"]
