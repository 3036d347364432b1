"""Shared fixtures: tiny Hugging Face models and engines, built once per session.

Session-scoped directories are read-only by convention; a test that tampers with one
copies it first (`copy_tree(src, tmp_path / ...)`).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from helpers import make_tiny_model, torch_threads  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """Each test on one torch thread (a module opts in with `pytestmark = pytest.mark.usefixtures(...)`);
    see helpers.torch_threads for why."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny single-file Llama checkpoint (GQA, untied) with the bundled tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("hf") / "llama", "LlamaForCausalLM", seed=0)


@pytest.fixture(scope="session")
def tiny_llama_sharded(tmp_path_factory):
    """The same weights as `tiny_llama` (same seed), saved as several shards + index."""
    return make_tiny_model(tmp_path_factory.mktemp("hf") / "llama-sharded", "LlamaForCausalLM", seed=0, max_shard_size="40KB")


@pytest.fixture(scope="session")
def tiny_engine(tiny_llama, tmp_path_factory):
    """`tiny_llama` converted to an fp32 engine with --tp 1."""
    from lmkiln.convert.hf_to_engine import convert_hf_to_engine

    return convert_hf_to_engine(tiny_llama, tmp_path_factory.mktemp("eng") / "llama.engine")
