"""Data: batching (padding and its mask), chat rendering and loss-label masking."""
