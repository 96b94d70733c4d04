"""Integrations of shardopt with other training frameworks.

* :mod:`shardopt.integrations.deepspeed`: select shardopt (ZeroOptimizer and its
  distributed Muon) from a ``"shardopt"`` section of a DeepSpeed JSON config
  (``shardopt.integrations.deepspeed.initialize``); the pure translation of that
  config lives in :mod:`shardopt.integrations.deepspeed_config`.

Nothing here is imported by ``import shardopt``; importing
:mod:`shardopt.integrations.deepspeed` imports DeepSpeed only when
``initialize`` is called.
"""
