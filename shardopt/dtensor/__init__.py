"""shardopt on PyTorch's own parameter-sharding engines: FSDP2 (``fully_shard``) and
tensor parallelism, whose parameters are DTensors (``docs/design/dtensor.md``).

The elementwise optimizers (:class:`shardopt.SGD` ... :class:`shardopt.Lion`) need
nothing from here: they step DTensor parameters shard by shard with no
communication. :func:`clip_grad_norm_` clips by the global gradient norm across
every shard and mesh, which ``torch.nn.utils.clip_grad_norm_`` cannot do once
parameters live on different meshes (FSDP2 x TP with parameters left out of TP).

:func:`dtensor_matrix_update` is the distributed matrix step (Muon) that
:class:`shardopt.Muon` runs by itself on DTensor parameters: each matrix
orthogonalized once in the whole job, on one owner, after a bucketed
``all_to_all_single``.
"""

from .clip import clip_grad_norm_, grad_norm
from .exchange import DEFAULT_BUCKET_NUMEL, assign_owners
from .muon import dtensor_matrix_update

__all__ = ["DEFAULT_BUCKET_NUMEL", "assign_owners", "clip_grad_norm_", "dtensor_matrix_update", "grad_norm"]
