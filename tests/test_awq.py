"""AWQ from scratch: folding keeps the float model, the scale search beats round-to-nearest where some
channels are salient, the GQA mapping of o_proj onto v_proj, clipping, a tiny Llama end to end, bad input,
and the salient-channel experiments."""

import copy
import re

import pytest
import torch
from torch import nn

from course_utils.quant import awq, awq_layout, rtn
from course_utils.quant import salient as salient_mod
from course_utils.quant.activations import InputStats, capture_inputs, input_statistics
from course_utils.quant.layerwise import layer_inputs, run_layer
from course_utils.quant.linear import QuantLinear, RTNConfig, quantize_model

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tiny models: see conftest


def salient_inputs(n=2048, cols=256, seed=0, n_salient=8, boost=20.0):
    """Correlated inputs (n, cols) in which ``n_salient`` channels are ``boost`` times larger."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 2 * torch.randn(cols, cols, generator=gen) / cols**0.5
    x = torch.randn(n, cols, generator=gen) @ mix
    salient = torch.randperm(cols, generator=gen)[:n_salient]
    x[:, salient] *= boost
    return x, salient


W = torch.randn(96, 256, generator=torch.Generator().manual_seed(1))


def mse(w, q, x):
    """Mean over tokens and outputs of ((W - Q) x)^2."""
    return float(((w - q) @ x.T).pow(2).mean())


# ------------------------------------------------------------------------------ folding


@pytest.mark.parametrize("heads,kv_heads,bias", [(4, 2, False), (4, 4, False), (4, 1, True)])
def test_folding_scales_leaves_the_float_model_unchanged(heads, kv_heads, bias, tiny_llama, logits_of):
    model = tiny_llama(heads=heads, kv_heads=kv_heads, bias=bias)
    before = logits_of(model)
    gen = torch.Generator().manual_seed(3)
    for i, layer in enumerate(model.model.layers):
        awq_layout.random_fold(layer, f"model.layers.{i}", gen)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, tiny_llama(heads=heads, kv_heads=kv_heads, bias=bias).model.layers[0].input_layernorm.weight)
    # folding is exact in real numbers; in float32 through two layers the logits (below 1 in size) move by
    # about 3e-7: 1e-5 allows for that and is far below what a misplaced scale does (0.27, next test)
    torch.testing.assert_close(logits_of(model), before, rtol=1e-5, atol=1e-5)


def test_o_proj_scales_are_shared_by_the_heads_that_read_one_value_head(tiny_llama, logits_of):
    model = tiny_llama()  # 4 heads of 16 share 2 key/value heads: heads 0,1 read kv 0; heads 2,3 read kv 1
    layer = model.model.layers[0]
    expand = awq_layout.attention_expand(layer, "model.layers.0")
    assert expand.tolist() == [c % 16 + 16 * (c // 32) for c in range(64)]
    # the tempting "channel c reads v channel c mod 32" is wrong with GQA: the float output changes
    before = logits_of(model)
    s = torch.linspace(0.5, 2.0, 32)
    wrong = copy.deepcopy(model)
    awq_layout.fold_scales(wrong.model.layers[0].self_attn.v_proj, [wrong.model.layers[0].self_attn.o_proj], s, torch.arange(64) % 32)
    assert (logits_of(wrong) - before).abs().max() > 1e-2  # about 0.27 over seeds 0-3, folding noise 3e-7
    awq_layout.fold_scales(layer.self_attn.v_proj, [layer.self_attn.o_proj], s, expand)
    torch.testing.assert_close(logits_of(model), before, rtol=1e-5, atol=1e-5)  # float32 noise, as above


# ------------------------------------------------------------------------------ the searches


def test_scale_search_beats_rtn_where_some_channels_are_salient():
    x, salient = salient_inputs()
    stats = InputStats.from_inputs(x)
    torch.testing.assert_close(stats.mean_abs, x.abs().mean(0))
    # a running mean and one product: 2048 float32 terms summed in two orders; entries reach 400 (channels x20)
    torch.testing.assert_close(stats.gram, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    for symmetric in (True, False):
        found = awq.search_scale(W, stats, 4, 64, symmetric)
        assert found.alphas == tuple(i / 20 for i in range(20)) and len(found.errors) == 20
        # the chosen alpha is the first one with the smallest error, and the scales are that alpha's
        assert found.alpha == found.alphas[found.errors.index(min(found.errors))]
        assert torch.equal(found.scales, awq.normalized_scales(stats.mean_abs, found.alpha))
        assert found.error == min(found.errors) and found.rtn_error == found.errors[0]
        q_rtn = rtn.fake_quantize(W, 4, 64, symmetric)
        q_awq = rtn.fake_quantize(W * found.scales, 4, 64, symmetric) / found.scales
        # the Gram-matrix errors are the errors measured on the inputs themselves: two float32 routes
        # to one sum, about 1e-7 apart (1e-5 allowed)
        assert found.rtn_error == pytest.approx(mse(W, q_rtn, x), rel=1e-5)
        assert found.error == pytest.approx(mse(W, q_awq, x), rel=1e-5)
        # every alpha's error, recomputed on the inputs from the definition (a few, to stay quick)
        for alpha, error in list(zip(found.alphas, found.errors))[::5]:
            s = awq.normalized_scales(x.abs().mean(0), alpha)
            assert error == pytest.approx(mse(W, rtn.fake_quantize(W * s, 4, 64, symmetric) / s, x), rel=1e-5)
        # 8 channels 20 times larger: over seeds 0-5 AWQ's error is 0.31-0.38 of RTN's (so alpha > 0:
        # alpha = 0 is RTN itself); 0.5 leaves room and still fails a search that does not help
        assert found.error < 0.5 * found.rtn_error
        # the salient channels got the largest scales
        assert set(torch.topk(found.scales, 8).indices.tolist()) == set(salient.tolist())


def test_normalized_scales_straddle_one_and_alpha_zero_is_rtn():
    m = torch.tensor([0.0, 0.01, 1.0, 4.0])
    s = awq.normalized_scales(m, 0.5)
    assert float(s.max() * s.min()) == pytest.approx(1.0) and (s > 0).all()
    assert torch.equal(awq.normalized_scales(m, 0.0), torch.ones(4))
    x, _ = salient_inputs(512, 256, boost=1.0)  # nothing salient: round-to-nearest may well be the best
    found = awq.search_scale([W[:40], W[40:]], InputStats.from_inputs(x), 4, 64, n_grid=5)
    assert found.alpha in (0.0, 0.2, 0.4, 0.6, 0.8) and found.error <= found.rtn_error
    with pytest.raises(ValueError, match="n_grid"):
        awq.alpha_grid(0)
    with pytest.raises(ValueError, match="128 features"):
        awq.search_scale(W, InputStats.from_inputs(x[:, :128]))


def test_clip_search_picks_a_ratio_per_group_and_lowers_the_output_error():
    x, _ = salient_inputs(boost=1.0)
    gram = x.T @ x / x.shape[0]
    heavy = W.clone()
    heavy[:, ::37] *= 6  # a few outlier weights stretch their groups' ranges
    ratio = awq.search_clip(heavy, gram, 4, 64)
    assert ratio.shape == (96, 4)
    assert all(any(abs(v - r) < 1e-6 for r in awq.CLIP_RATIOS) for v in ratio.unique().tolist())  # float32 copies (6e-8)
    assert (ratio < 1).any()
    clipped = rtn.quantize(heavy, 4, 64, True, ratio).dequantize()
    assert mse(heavy, clipped, x) < mse(heavy, rtn.fake_quantize(heavy, 4, 64), x)


# ------------------------------------------------------------------------------ a whole model


def test_awq_quantizes_a_tiny_llama_and_beats_rtn(tiny_llama, tiny_calibration, logits_of):
    model = tiny_llama()
    reference = copy.deepcopy(model)
    config = awq.AWQConfig(4, 32)
    report = awq.quantize_model(model, config, tiny_calibration, progress=False, batch_size=3)
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(layers) == report.n_layers == 14 and set(layers) == set(report.clip_ratio)
    assert type(model.lm_head) is nn.Linear and report.n_tokens == 256
    assert report.notes == ("grouped-query attention: each o_proj scale is shared by the 2 heads that read one value head",)
    assert set(report.alpha) == {f"model.layers.{i}.{g}" for i in (0, 1) for g in ("qkv", "o", "gate_up", "down")}
    assert all(a in awq.alpha_grid(20) for a in report.alpha.values())
    assert all(after <= before for before, after in report.errors.values())
    assert set(report.alpha_by_group()) == {"qkv", "o", "gate_up", "down"} and len(report.alpha_by_group()["o"]) == 2
    assert all(report.clip_ratio[f"model.layers.{i}.self_attn.{p}"] == 1.0 for i in (0, 1) for p in ("q_proj", "k_proj"))
    # the summary is the mean over the clipped Linears (all but q and k), and some groups were clipped
    clipped = [k for k in report.clip_ratio if not k.endswith(("q_proj", "k_proj"))]
    summary = report.clip_summary()
    assert summary["mean_ratio"] == pytest.approx(sum(report.clip_ratio[k] for k in clipped) / len(clipped))
    assert summary["clipped_fraction"] == pytest.approx(sum(report.clipped[k] for k in clipped) / len(clipped))
    assert 0 < summary["clipped_fraction"] and summary["mean_ratio"] < 1.0
    # a Linear's mean ratio lies between the smallest candidate and 1, and is below 1 exactly when clipped
    assert all(min(awq.CLIP_RATIOS) <= report.clip_ratio[k] <= 1.0 and (report.clip_ratio[k] < 1) == (report.clipped[k] > 0) for k in clipped)
    assert config.label() == "awq int4 g32 sym clip"
    rounded = copy.deepcopy(reference)
    quantize_model(rounded, RTNConfig(4, 32))
    ref, out, out_rtn = logits_of(reference), logits_of(model), logits_of(rounded)
    assert torch.isfinite(out).all()
    # AWQ's logits error over RTN's: 0.50-0.78 over seeds 0-5 of the tiny Llama (below 1: each group's
    # error is at most RTN's); 0.9 holds for all of them
    assert (out - ref).pow(2).mean() < 0.9 * (out_rtn - ref).pow(2).mean()
    with pytest.raises(ValueError, match="already quantized"):
        awq.quantize_model(model, config, tiny_calibration, progress=False)


def test_groups_can_be_left_unscaled(tiny_llama, tiny_calibration):
    model = tiny_llama()
    config = awq.AWQConfig(4, 32, clip=False, groups=("qkv",))
    report = awq.quantize_model(model, config, tiny_calibration, progress=False)
    assert set(report.alpha) == {"model.layers.0.qkv", "model.layers.1.qkv"} and "only for" in report.notes[0]
    assert set(report.clipped.values()) == {0.0} and config.label() == "awq int4 g32 sym scales:qkv"


def test_bad_input_is_refused_before_anything_changes(tiny_llama, tiny_calibration):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"100 tokens .* fewer than AWQ's minimum of 256"):
        awq.quantize_model(model, calibration=torch.randint(0, 256, (2, 50)), progress=False)
    with pytest.raises(ValueError, match="token ids"):
        awq.quantize_model(model, calibration=torch.randn(8, 32), progress=False)
    with pytest.raises(ValueError, match="does not divide"):
        awq.quantize_model(model, awq.AWQConfig(group_size=48), tiny_calibration, progress=False)
    with pytest.raises(ValueError, match="per tensor"):
        awq.quantize_model(model, awq.AWQConfig(group_size="tensor"), tiny_calibration, progress=False)
    with pytest.raises(ValueError, match="bits"):
        awq.quantize_model(model, awq.AWQConfig(bits=1), tiny_calibration, progress=False)
    with pytest.raises(ValueError, match="unknown AWQ groups"):
        awq.quantize_model(model, awq.AWQConfig(groups=("qkv", "lm_head")), tiny_calibration, progress=False)
    with pytest.raises(ValueError, match="model.model.layers"):
        awq.quantize_model(nn.Sequential(nn.Linear(4, 4)), calibration=tiny_calibration, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_nan_inputs_are_refused_by_the_statistics_the_scale_search_reads():
    x, _ = salient_inputs(512, 256)
    bad = x.clone()
    bad[7, 9] = float("nan")
    with pytest.raises(ValueError, match=r"a batch of layer inputs holds 1 NaN or infinite value\(s\), the first at index \(7, 9\)"):
        InputStats.from_inputs(bad)
    stats = InputStats.from_inputs(x[:256])
    bad[300, 17] = float("-inf")  # a later batch: refused whole, the statistics keep only the good batches
    with pytest.raises(ValueError, match=r"holds 2 NaN or infinite value\(s\), the first at index \(7, 9\)"):
        stats.add(bad)
    assert stats.n_tokens == 256 and torch.isfinite(stats.gram).all()
    found = awq.search_scale(W, stats, 4, 64)
    assert found.error == pytest.approx(mse(W, rtn.fake_quantize(W * found.scales, 4, 64) / found.scales, x[:256]), rel=1e-5)


@pytest.mark.parametrize("where", ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"])
def test_quantize_model_names_the_layer_holding_a_nan_weight(where, tiny_llama, tiny_calibration):
    model = tiny_llama()
    with torch.no_grad():
        model.get_submodule(where).weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=re.escape(f"{where}.weight holds 1 NaN or infinite value(s), the first at index (3, 5)")):
        awq.quantize_model(model, awq.AWQConfig(4, 32), tiny_calibration, progress=False)

class _FusedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(64, 256), nn.Linear(128, 64)

    def forward(self, x):
        a, b = self.fc_in(x).chunk(2, dim=-1)
        return self.fc_out(nn.functional.silu(a) * b)


class _OnePlusNorm(nn.Module):
    """Gemma's RMSNorm: ``x * (1 + weight)``, which a per-channel scale cannot be folded into."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.eps = nn.Parameter(norm.weight.detach() - 1), norm.variance_epsilon

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


def test_unsupported_architectures_are_named_not_silently_broken(tiny_llama, tiny_calibration):
    model = tiny_llama()
    for layer in model.model.layers:
        layer.mlp = _FusedMLP()
    with pytest.raises(ValueError, match=r"model.layers.0 \(LlamaDecoderLayer\) has no module 'mlp.gate_proj'"):
        awq.quantize_model(model, calibration=tiny_calibration, progress=False)
    model = tiny_llama()
    model.model.layers[1].mlp.extra = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"outside the Llama layout.*mlp.extra"):
        awq.quantize_model(model, calibration=tiny_calibration, progress=False)
    model = tiny_llama()
    for layer in model.model.layers:
        layer.input_layernorm = _OnePlusNorm(layer.input_layernorm)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"model.layers.0: folding the AWQ scales changed the float layer's output"):
        awq.quantize_model(model, calibration=tiny_calibration, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # found on a copy


# ------------------------------------------------------------------------------ salient channels


def test_salient_channels_by_each_criterion():
    x, salient = salient_inputs(512)
    by_act = salient_mod.salient_channels(W, 8 / 256, "activation", x.abs().mean(0))
    assert by_act.tolist() == sorted(salient.tolist())
    w = W.clone()
    w[:, [3, 200]] *= 10
    assert salient_mod.salient_channels(w, 2 / 256, "weight").tolist() == [3, 200]
    rand = salient_mod.salient_channels(W, 0.1, "random", generator=torch.Generator().manual_seed(0))
    assert len(rand) == round(25.6) and len(set(rand.tolist())) == 26
    assert salient_mod.salient_channels(W, 0.0, "weight").numel() == 0
    with pytest.raises(ValueError, match="criterion"):
        salient_mod.salient_channels(W, 0.01, "gradient")
    with pytest.raises(ValueError, match="mean_abs"):
        salient_mod.salient_channels(W, 0.01, "activation")
    with pytest.raises(ValueError, match="fraction"):
        salient_mod.salient_channels(W, 1.5, "weight")


@pytest.mark.parametrize("criterion", salient_mod.CRITERIA)
def test_keep_channels_float_keeps_exactly_the_requested_columns(criterion, tiny_llama, tiny_calibration):

    model = tiny_llama()
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"}
    stats = input_statistics(model, tiny_calibration) if criterion == "activation" else None
    kept = salient_mod.keep_channels_float(model, 0.05, criterion, 4, 32, stats)
    assert set(kept) == set(original)
    modules = dict(model.named_modules())
    for name, w in original.items():
        n_keep = round(0.05 * w.shape[1])
        now = modules[name].weight
        assert type(modules[name]) is nn.Linear and len(kept[name]) == n_keep
        float_columns = (now == w).all(dim=0).nonzero().flatten()
        assert float_columns.tolist() == kept[name].tolist()
        others = torch.ones(w.shape[1], dtype=torch.bool)
        others[kept[name]] = False
        assert torch.equal(now[:, others], rtn.fake_quantize(w, 4, 32)[:, others])
        if criterion == "activation":
            top = torch.topk(stats[name].mean_abs, n_keep).indices
            assert set(kept[name].tolist()) == set(top.tolist())
    with pytest.raises(ValueError, match="input_statistics"):
        salient_mod.keep_channels_float(tiny_llama(), 0.01, "activation")


def test_scaling_channels_before_rounding(tiny_llama):
    x, salient = salient_inputs(1024)
    channels = torch.sort(salient).values
    assert torch.equal(salient_mod.scaled_fake_quantize(W, channels, 1.0), rtn.fake_quantize(W, 4, 64))
    errors = {s: mse(W, salient_mod.scaled_fake_quantize(W, channels, s), x) for s in (1.0, 2.0)}
    assert errors[2.0] < errors[1.0]  # the paper's point: scaling salient channels up protects them
    model = tiny_llama()
    chosen = salient_mod.scale_channels(model, 0.05, 2.0, "weight", 4, 32)
    w = model.model.layers[0].mlp.down_proj.weight
    assert len(chosen["model.layers.0.mlp.down_proj"]) == round(0.05 * 128) and torch.isfinite(w).all()
    with pytest.raises(ValueError, match="positive"):
        salient_mod.scaled_fake_quantize(W, channels, 0.0)


@pytest.mark.slow
def test_awq_search_beats_rtn_on_a_real_layer(default_model):
    from course_utils import data

    model, tokenizer = default_model
    layer = model.model.layers[2]
    inputs = layer_inputs(model, layer, data.calibration_batches(tokenizer, 2, 256), batch_size=2)
    with capture_inputs(layer.mlp.down_proj) as (seen,), torch.no_grad():
        for hidden, kwargs in inputs:
            run_layer(layer, hidden, kwargs)
    found = awq.search_scale(layer.mlp.down_proj.weight, InputStats.from_inputs(torch.cat(seen)), 4, 64)
    assert found.error < 0.5 * found.rtn_error  # about 0.24 on layer 2's down_proj (alpha 0.6)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_awq_quantizes_a_tiny_llama_on_cuda(tiny_llama, tiny_calibration, logits_of):
    cpu_model = tiny_llama()
    model = copy.deepcopy(cpu_model).cuda()
    report = awq.quantize_model(model, awq.AWQConfig(4, 32), tiny_calibration, progress=False)
    cpu_report = awq.quantize_model(cpu_model, awq.AWQConfig(4, 32), tiny_calibration, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == report.n_layers == 14 and all(m.packed.is_cuda for m in layers)
    assert sum(a != b for a, b in zip(report.alpha.values(), cpu_report.alpha.values())) <= 2  # float sums differ a little
    out = logits_of(model, tiny_calibration.cuda())
    assert torch.isfinite(out).all()
    # CUDA sums in another order and may pick another alpha for the 2 groups allowed above: a few percent at most
    torch.testing.assert_close(out.cpu(), logits_of(cpu_model), rtol=0.05, atol=0.05)
