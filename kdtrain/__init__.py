"""kdtrain: the thin distillation trainer and the stages whose artifacts kdcontracts verifies.

Each stage (``kdtrain/<stage>/``) writes into one artifacts folder described by its
``manifest.json`` (see :mod:`kdtrain.artifacts`); the pytest plugin reads that folder only.
"""

__version__ = "0.1.0"
