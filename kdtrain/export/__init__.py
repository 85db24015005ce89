"""Export: static-shape prefill/decode programs, torch.export per enumerated length, the graph linter."""
