"""kdcontracts: the contract language that the trainer and the plugin share.

Loading a contract file, validating it against its JSON Schema and typing it live here, in
one place that imports neither pytest nor training code (only the leaf ``kdtrain.errors``):
the value types a contract declares are defined in its model, ``kdtrain`` stages import them
from there, ``pytest_kdcontracts`` adds the checks.
"""
