"""Quantization: the per-submodule recipe, calibration data, and INT8 packages from FP16 ones."""
