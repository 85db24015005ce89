"""Export: static-shape prefill/decode/verify programs, torch.export per enumerated length, the graph linter."""
