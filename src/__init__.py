"""lmkiln: Hugging Face checkpoints to packed, quantized, verified engines."""

__version__ = "0.1.0"
