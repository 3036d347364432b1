"""Typed errors. Every error a user can cause is a LmkilnError: the CLI prints its
message as one line and exits 2; anything else is a bug and keeps its traceback."""


class LmkilnError(Exception):
    """Base: a problem with the user's input or environment, with a message that says the fix."""

    exit_code = 2


class InputError(LmkilnError):
    """A path, option or file the user gave is missing or unusable."""


class OutputExistsError(LmkilnError):
    """The output already exists and --force was not given."""


class UnsupportedArchitectureError(LmkilnError):
    """config.json names an architecture the architecture table does not have."""


class CheckpointError(LmkilnError):
    """A Hugging Face checkpoint is inconsistent: index vs files, unknown or missing tensors, bad shapes."""


class SafetensorsFormatError(LmkilnError):
    """A .safetensors file is malformed or truncated (found before any data is read)."""


class EngineFormatError(LmkilnError):
    """An engine directory violates docs/engine-format.md."""


class ChecksumError(EngineFormatError):
    """A weight file's sha256 differs from the manifest."""


class QuantizationError(LmkilnError):
    """Quantization cannot proceed (non-finite statistics, impossible shapes, bad options)."""


class DiskFullError(LmkilnError):
    """The filesystem an output goes to ran out of space (or quota), or a file there hit the largest size
    allowed (`ulimit -f`, FAT32), while writing it."""


# Python API arguments, checked where each public function starts (the CLI's parser gives these types
# already): a flag given as the string "False" is true to Python, and force="False" replaced an output.
def check_flag(name: str, value) -> None:
    if not isinstance(value, bool) and not (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")):
        raise InputError(f"{name}={value!r}: give True or False")


def check_path(name: str, value) -> None:
    import os

    if not isinstance(value, (str, os.PathLike)):
        raise InputError(f"{name}={value!r}: give a path (a str or pathlib.Path)")


def check_callable(name: str, value) -> None:
    if value is not None and not callable(value):
        raise InputError(f"{name}={value!r}: give a function (or None)")
