"""Every family in the architecture table, end to end on a tiny random model built from its
transformers config class: convert -> engine runner == transformers (fp32, --tp 1 and 2,
greedy identical); quantize W4 g32 (AWQ) -> engine and AWQ-GEMM -> engine == the
fake-quantized transformers model; what a family refuses, refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import ARCHS, FAMILY_ARCHS, load_hf_model, make_tiny_model
from lmkiln.convert.architectures import ARCHITECTURES
from lmkiln.convert.hf_to_engine import convert_hf_to_engine
from lmkiln.formats.engine import MANIFEST, Engine
from lmkiln.runtime.engine_model import EngineModel

ALL = sorted(ARCHITECTURES)
TIED = {"Gemma2ForCausalLM", "Gemma3ForCausalLM", "Qwen2ForCausalLM"}


def test_every_table_entry_is_tested():
    assert set(ALL) == set(ARCHS) | set(FAMILY_ARCHS)


@pytest.fixture(scope="module", params=ALL)
def family(request, tmp_path_factory):
    arch = request.param
    d = tmp_path_factory.mktemp(arch)
    hf = make_tiny_model(d / "hf", arch, seed=5, tie_word_embeddings=arch in TIED)
    return arch, d, hf


def _ids(T=12, B=2):
    return torch.randint(3, 512, (B, T), generator=torch.Generator().manual_seed(2))


def _greedy(step, ids, n=8):
    for _ in range(n):
        ids = torch.cat([ids, step(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def test_convert_matches_transformers(family):
    arch, d, hf = family
    ref_model = load_hf_model(hf, attn="eager")
    ids = _ids()
    with torch.no_grad():
        ref = ref_model(ids).logits
    for tp in (1, 2):
        eng = convert_hf_to_engine(hf, d / f"tp{tp}.engine", tp=tp, force=True)
        model = EngineModel.from_path(eng)
        got = model(ids)
        assert (got - ref).abs().max().item() <= 1e-4, f"{arch} tp{tp}"
        with torch.no_grad():
            want = _greedy(lambda x: ref_model(x).logits, ids[:1])
        assert torch.equal(_greedy(model, ids[:1]), want)


def test_manifest_version(family):
    """Families with v2 fields write format v2 (v1 readers refuse them); the others stay v1."""
    arch, d, hf = family
    eng = convert_hf_to_engine(hf, d / "v.engine", force=True)
    m = json.loads((eng / MANIFEST).read_text())
    assert m["format_version"] == (2 if arch.startswith("Gemma") else 1)
    assert Engine(eng).model["architecture"] == arch
