"""On-disk formats, the bottom layer: safetensors I/O, HF checkpoints, the engine, the
AWQ-GEMM layout, code packing, QTensor, the tokenizer files, atomic outputs.

Imports nothing from lmkiln above `errors` (tests/test_layering.py).
"""
