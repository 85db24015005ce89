"""The teacher: one interface (:mod:`kdtrain.teacher.base`), a local transformers backend (source.py) and an
OpenAI-compatible API client, and the self-verifying logit cache the trainer reads."""
