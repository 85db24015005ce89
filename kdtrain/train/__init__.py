"""The distillation trainer.

- :mod:`kdtrain.train.config`: ``DistillConfig`` loaded from YAML (``configs/*.yaml``), its
  fingerprint and the key-by-key diff that strict resume reports;
- :mod:`kdtrain.train.checkpoint`: ``save_checkpoint`` / ``load_latest`` (safetensors and
  JSON only, never pickle) and ``check_resume``;
- :mod:`kdtrain.train.data`: verified examples in a resumable, rank-strided order;
- :mod:`kdtrain.train.balance`: per-loss gradient norms and the dominance alert;
- :mod:`kdtrain.train.loop`: ``Distiller`` (the loop, the smoke gate, DDP under torchrun);
- :mod:`kdtrain.train.ablations`: the three canonical mini experiments;
- :mod:`kdtrain.train.stage`: pipeline stages ``distill`` and ``ablations``.
"""
