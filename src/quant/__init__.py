"""Quantization: primitives, calibration, AWQ."""
