"""On-disk formats: safetensors I/O, HF checkpoints, the engine."""
