"""The teacher: one interface (:mod:`kdtrain.teacher.base`), the local SmolLM2-135M backend and an
OpenAI-compatible API client, and the self-verifying logit cache the trainer reads."""
