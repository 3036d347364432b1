"""Files shipped inside the package: the default model and texts, with their licenses."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent


def bundled_model_path() -> Path:
    """stories260K, a real 260K-parameter TinyStories Llama (MIT), the embedded default."""
    return ASSETS / "stories260K"
