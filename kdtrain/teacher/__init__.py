"""The teacher: SmolLM2-135M-Instruct from its GGUF file (local), later API teachers too."""
