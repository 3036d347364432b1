"""AWQ at the algorithm level: one transformers decoder layer through lmkiln.quant.awq.

Every model here is a seeded random tiny Llama (tests/helpers.build_model); the
calibration inputs are embeddings of seeded random token ids, so each number below is
reproducible run to run.
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import build_model, torch_threads
from lmkiln.convert.architectures import get_architecture
from lmkiln.errors import QuantizationError
from lmkiln.quant.awq import (
    QuantOptions,
    Master,
    apply_clip,
    awq_layer,
    fold_scale,
    group_applies,
    linear_roles,
    qdq,
    quantize_weight,
    rtn_layer,
    search_clip,
)
from lmkiln.quant.primitives import pad_to_multiple

ARCH = get_architecture("LlamaForCausalLM")
W4G32 = QuantOptions(bits=4, group_size=32)
SALIENT = [5, 17, 42]  # input channels whose activations are made 50x larger
N, T = 8, 64  # calibration samples x tokens


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _model(salient: bool = False, seed: int = 0, **overrides):
    """A tiny Llama (hidden 64, 4 heads; GQA with 2 kv heads unless overridden)."""
    model = build_model("LlamaForCausalLM", seed=seed, attn_implementation="sdpa", **overrides)
    if salient:
        with torch.no_grad():
            for lay in model.model.layers:
                lay.input_layernorm.weight[SALIENT] *= 50
                lay.post_attention_layernorm.weight[SALIENT] *= 50
    return model


@torch.no_grad()
def _inputs(model, seed: int = 1, n: int = N, t: int = T):
    """(hidden states entering layer 0, the layer kwargs the pipeline passes)."""
    ids = torch.randint(3, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))
    x = model.model.embed_tokens(ids)
    pos = torch.arange(t)[None]
    return x, {"position_embeddings": model.model.rotary_emb(x, pos), "attention_mask": None}


def _out(y):
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def _run(layer, x, kw):
    return _out(layer(x, **kw))


@torch.no_grad()
def _with_weights(layer, qts):
    """`layer` with each linear replaced by its dequantized quantized weight."""
    for role, qt in qts.items():
        layer.get_submodule(ARCH.module_of(role)).weight.copy_(qt.dequantize())
    return layer


def _mse(a, b):
    return float((a.double() - b.double()).pow(2).mean())


def _group(prev: str):
    return next(g for g in ARCH.awq_groups if g.prev == prev)


# -- 1. AWQ beats round-to-nearest on salient input channels ------------------------------


def test_awq_beats_rtn_on_salient_channels():
    model = _model(salient=True)
    x, kw = _inputs(model)
    fp_layer = model.model.layers[0]
    ref = _run(fp_layer, x, kw)

    rtn = copy.deepcopy(fp_layer)
    _with_weights(rtn, rtn_layer(rtn, ARCH, W4G32))
    mse_rtn = _mse(_run(rtn, x, kw), ref)

    awq = copy.deepcopy(fp_layer)
    qts, out, report = awq_layer(awq, ARCH, x, kw, W4G32, layer_idx=0)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the fp output of the ORIGINAL layer travels on
    assert set(qts) == set(linear_roles(ARCH))
    _with_weights(awq, qts)  # awq's norms now carry the folded 1/s
    mse_awq = _mse(_run(awq, x, kw), ref)

    assert mse_awq < 0.7 * mse_rtn, (mse_awq, mse_rtn)

    groups = {g["prev"]: g for g in report["groups"]}
    # The group fed by the salient attention norm protects those channels: alpha > 0.
    assert groups["attn_norm"]["alpha"] > 0, groups["attn_norm"]
    assert groups["ffn_norm"]["alpha"] > 0, groups["ffn_norm"]
    for prev in ("attn_norm", "ffn_norm", "up"):
        g = groups[prev]
        assert 0 <= g["alpha"] < 1
        assert g["mse_scaled"] <= g["mse_rtn"]
        assert g["mse_final"] < g["mse_rtn"], g
    assert "skipped" in groups["v"]  # GQA: 2 kv heads for 4 query heads


@torch.no_grad()
def _linear_inputs(layer, x, kw) -> dict[str, torch.Tensor]:
    """Every linear's input (tokens, in) when `layer` runs on x."""
    got, hooks = {}, []
    for role in linear_roles(ARCH):
        m = layer.get_submodule(ARCH.module_of(role))
        hooks.append(m.register_forward_pre_hook(lambda mod, a, role=role: got.__setitem__(role, a[0].reshape(-1, a[0].shape[-1]))))
    try:
        layer(x, **kw)
    finally:
        for h in hooks:
            h.remove()
    return got


def test_awq_report_per_linear_output_mse_matches_the_outputs():
    """Plain AWQ reports every linear's output MSE on the calibration tokens for RTN of the
    original weights, AWQ (scaled, clipped RTN) and what is stored: checked against the
    linears' outputs themselves."""
    model = _model(salient=True)
    x, kw = _inputs(model)
    fp_layer = model.model.layers[0]
    x_orig = _linear_inputs(fp_layer, x, kw)
    w_orig = {r: fp_layer.get_submodule(ARCH.module_of(r)).weight.detach().clone() for r in linear_roles(ARCH)}
    awq = copy.deepcopy(fp_layer)
    qts, _, report = awq_layer(awq, ARCH, x, kw, W4G32, layer_idx=0)
    x_folded = _linear_inputs(awq, x, kw)  # awq holds the folded fp weights: its linears read X / s

    def mse(xin, w, w_hat, out_scale=1.0):
        return float(((xin.double() @ (w.double() - w_hat.double()).t() * out_scale) ** 2).mean())

    lin = report["linears"]
    assert set(lin) == set(linear_roles(ARCH))
    for r, e in lin.items():
        rtn = quantize_weight(w_orig[r], W4G32).dequantize()  # RTN as stored (fp16 scales)
        assert e["mse_rtn"] == pytest.approx(mse(x_orig[r], w_orig[r], rtn), rel=1e-3), r
        w_folded = awq.get_submodule(ARCH.module_of(r)).weight.detach()
        # A linear that feeds a folded group (up -> down) outputs Y / s: the report states its
        # error in the original units, s recovered here from the fp outputs of both layers.
        y_orig, y_fold = x_orig[r].double() @ w_orig[r].double().t(), x_folded[r].double() @ w_folded.double().t()
        s_out = (y_orig * y_fold).sum(0) / (y_fold * y_fold).sum(0)
        assert (r == "up") == bool((s_out - 1).abs().max() > 1e-3), r
        assert e["mse_final"] == pytest.approx(mse(x_folded[r], w_folded, qts[r].dequantize(), s_out), rel=1e-3), r
        assert e["mse_awq"] == e["mse_final"]  # plain AWQ stores its scaled, clipped RTN
    # the salient channels make RTN lose much more than AWQ on the linears those norms feed
    for r in ("q", "k", "v", "gate", "up"):
        assert lin[r]["mse_final"] < lin[r]["mse_rtn"], (r, lin[r])


def test_awq_layer_is_deterministic():
    model = _model(salient=True)
    x, kw = _inputs(model)
    runs = []
    for _ in range(2):
        layer = copy.deepcopy(model.model.layers[0])
        qts, _, report = awq_layer(layer, ARCH, x, kw, W4G32, layer_idx=0)
        runs.append((qts, report))
    (qa, ra), (qb, rb) = runs
    assert ra == rb
    for role in qa:
        assert torch.equal(qa[role].codes, qb[role].codes)
        assert torch.equal(qa[role].scales, qb[role].scales)
        assert torch.equal(qa[role].zeros, qb[role].zeros)


# -- 2. folding a scale is exact in floating point ----------------------------------------


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_fold_scale_keeps_fp_output(kv_heads):
    model = _model(num_key_value_heads=kv_heads)
    x, kw = _inputs(model)
    layer = copy.deepcopy(model.model.layers[0])
    ref = _run(layer, x, kw)
    master = Master(layer)

    g = torch.Generator().manual_seed(7)
    folded = []
    for gr in ARCH.awq_groups:
        if not group_applies(gr, ARCH, layer):
            continue
        width = layer.get_submodule(ARCH.module_of(gr.linears[0])).weight.shape[1]
        s = 0.25 + 3.75 * torch.rand(width, generator=g)  # random positive, in [0.25, 4]
        fold_scale(master, ARCH, gr, s)
        folded.append(gr.prev)
    assert folded == (["attn_norm", "ffn_norm", "up"] if kv_heads == 2 else ["attn_norm", "v", "ffn_norm", "up"])
    assert not torch.equal(layer.input_layernorm.weight, model.model.layers[0].input_layernorm.weight)
    torch.testing.assert_close(_run(layer, x, kw), ref, rtol=0, atol=1e-5)


def test_fold_into_bf16_module_keeps_fp32_master():
    """A bf16 module folds through its fp32 master: the master stays exact, the module gets casts."""
    model = _model(num_key_value_heads=4)
    layer = copy.deepcopy(model.model.layers[0])
    exact = {n: p.detach().clone() for n, p in layer.named_parameters()}
    layer = layer.to(torch.bfloat16)
    master = Master(layer, exact)
    s = torch.full((64,), 3.0)
    fold_scale(master, ARCH, _group("attn_norm"), s)
    want = model.model.layers[0].input_layernorm.weight / 3
    assert torch.equal(master.param("input_layernorm"), want)
    assert torch.equal(layer.input_layernorm.weight, want.to(torch.bfloat16))


# -- 3. clip search -----------------------------------------------------------------------


def _clip_case():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 80, generator=g)  # in 80: the last 32-group is half padding
    w[:, 7] *= 6  # a few outlier weights make clipping worthwhile
    w[3, 50] = 9.0
    x = torch.randn(256, 80, generator=g)
    x[:, 11] *= 10
    return w, x


def _group_errors(w, w_hat, x, g):
    """Squared error of each (output, group) contribution, mean over tokens: (out, groups)."""
    wp, _ = pad_to_multiple(w, 1, g)
    hp, _ = pad_to_multiple(w_hat, 1, g)
    xp, _ = pad_to_multiple(x, 1, g)
    ng = wp.shape[1] // g
    d = (xp.view(1, -1, ng, g) * (hp - wp).view(-1, 1, ng, g)).sum(-1)
    return d.pow(2).mean(1)


def test_search_clip_bounds_and_error():
    w, x = _clip_case()
    o = W4G32
    mv = search_clip(w, x, o)
    absmax = pad_to_multiple(w.abs(), 1, 32)[0].view(48, 3, 32).amax(-1)
    assert mv.shape == (48, 3)
    assert torch.isfinite(mv).all() and (mv > 0).all()
    assert (mv <= absmax).all()
    assert (mv >= (1 - o.max_shrink) * absmax - 1e-6).all()  # shrink is at most max_shrink
    assert (mv < absmax).any(), "the case should make at least one group clip"

    wc = apply_clip(w, mv, o)
    assert wc.shape == w.shape
    bound = mv.repeat_interleave(32, dim=1)[:, :80]
    assert (wc.abs() <= bound).all()
    inside = w.abs() <= bound
    assert torch.equal(wc[inside], w[inside])
    assert torch.equal(wc[~inside], torch.sign(w[~inside]) * bound[~inside])

    q_clip, q_plain = qdq(wc, o), qdq(w, o)
    # Per group the search only ever accepts an improvement over no clipping ...
    e_clip, e_plain = _group_errors(w, q_clip, x, 32), _group_errors(w, q_plain, x, 32)
    assert (e_clip <= e_plain * (1 + 1e-5) + 1e-9).all()
    assert e_clip.sum() < e_plain.sum()
    # ... and so the linear's whole output error on these tokens is lower too.
    err_clip = (x @ (q_clip - w).t()).pow(2).mean()
    err_plain = (x @ (q_plain - w).t()).pow(2).mean()
    assert err_clip <= err_plain, (float(err_clip), float(err_plain))


def test_clip_in_awq_layer_reports_ratio():
    model = _model(salient=True)
    x, kw = _inputs(model)
    _, _, rep = awq_layer(copy.deepcopy(model.model.layers[0]), ARCH, x, kw, W4G32, layer_idx=0)
    assert rep["linears"]["q"]["clip"] is None and rep["linears"]["k"]["clip"] is None  # never clipped
    for role in ("v", "o", "gate", "up", "down"):
        assert 0.5 <= rep["linears"][role]["clip"] <= 1.0, (role, rep["linears"][role])
    _, _, rep = awq_layer(copy.deepcopy(model.model.layers[0]), ARCH, x, kw,
                          QuantOptions(bits=4, group_size=32, clip=False), layer_idx=0)
    assert all(v["clip"] is None for v in rep["linears"].values())


# -- 4. non-finite inputs -----------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_inputs_raise_with_layer(bad):
    model = _model()
    x, kw = _inputs(model)
    x = x.clone()
    x[2, 10, 5] = bad
    with pytest.raises(QuantizationError, match=r"layer 3\b.*non-finite"):
        awq_layer(copy.deepcopy(model.model.layers[0]), ARCH, x, kw, W4G32, layer_idx=3)


# -- 5. which groups apply -----------------------------------------------------------------


@pytest.mark.parametrize("kv_heads, v_applies", [(2, False), (1, False), (4, True)])
def test_group_applies_v_to_o_only_without_gqa(kv_heads, v_applies):
    model = _model(num_key_value_heads=kv_heads)
    layer = model.model.layers[0]
    applies = {g.prev: group_applies(g, ARCH, layer) for g in ARCH.awq_groups}
    assert applies == {"attn_norm": True, "v": v_applies, "ffn_norm": True, "up": True}

    x, kw = _inputs(model, n=2, t=32)
    _, _, rep = awq_layer(copy.deepcopy(layer), ARCH, x, kw, W4G32, layer_idx=0)
    v = next(g for g in rep["groups"] if g["prev"] == "v")
    if v_applies:
        assert "alpha" in v and "skipped" not in v
    else:
        assert "alpha" not in v and v["skipped"]


# -- 6. each group is scored on the inputs the unmodified layer produces --------------------------


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_group_inputs_are_the_fp_layers(kv_heads):
    """Scoring the MLP group runs down_proj with trial gate/up weights; the up -> down group
    must still be scored on the fp layer's down_proj input (and o on the fp attention's)."""
    model = _model(salient=True, num_key_value_heads=kv_heads)
    x, kw = _inputs(model)
    layer = copy.deepcopy(model.model.layers[0])
    seen = {}
    hooks = [layer.get_submodule(m).register_forward_pre_hook(lambda mod, a, m=m: seen.__setitem__(m, a[0]))
             for m in ("mlp.down_proj", "self_attn.o_proj")]
    with torch.no_grad():
        _run(layer, x, kw)
    for h in hooks:
        h.remove()
    _, _, rep = awq_layer(copy.deepcopy(layer), ARCH, x, kw, W4G32, layer_idx=0)
    groups = {g["prev"]: g for g in rep["groups"]}
    for prev, module in (("up", "mlp.down_proj"), ("v", "self_attn.o_proj")):
        if "alpha" not in groups[prev]:
            continue  # v -> o does not apply under GQA
        lin = layer.get_submodule(module)
        with torch.no_grad():
            ref = lin(seen[module])
            want = _mse(torch.nn.functional.linear(seen[module], qdq(lin.weight, W4G32)), ref)
        assert groups[prev]["mse_rtn"] == pytest.approx(want, rel=1e-4), (prev, groups[prev]["mse_rtn"], want)
