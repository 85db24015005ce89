"""kdcontracts: the contract language that the trainer and the plugin share.

Loading a contract file, validating it against its JSON Schema and typing it live here, in
one place that imports neither pytest nor the training loop: ``kdtrain`` stages read their
settings through it, ``pytest_kdcontracts`` adds the checks.
"""
