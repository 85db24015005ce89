"""Data: the tool registry and the reference corpus (generated, validated, migrated), chat
rendering and loss-label masking, batching, and the trainer's view of samples with verified
teacher targets (:mod:`kdtrain.data.targets`)."""
