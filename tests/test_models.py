"""DeepLabV3+ shapes and strides, pretrained loading, the O(T) WKV against the O(T^2) definition, CIF."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from training.config import ConfigError, ModelConfig
from training.models import DeepLabV3Plus, build_model
from training.models.cif import CIF, q_shift
from training.models.wkv import bi_wkv


def naive_bi_wkv(w, u, k, v, eps=1e-6):
    """The definition, pairwise over tokens (O(T^2)), in float64 with a per-token max shift."""
    t = torch.arange(k.shape[1], dtype=k.dtype)
    dist = (t[:, None] - t[None, :]).abs()
    e = -(dist[..., None] - 1) * w + k[:, None, :, :]          # [B, t, i, C]
    eye = torch.eye(k.shape[1], dtype=torch.bool)[None, :, :, None]
    e = torch.where(eye, (u + k)[:, None].expand_as(e), e)
    m = e.amax(2, keepdim=True)
    num = (torch.exp(e - m) * v[:, None]).sum(2)
    den = torch.exp(e - m).sum(2) + eps * torch.exp(-m[:, :, 0])
    return num / den


@pytest.mark.parametrize("key_scale", [1.0, 40.0])
def test_wkv_matches_pairwise_definition(key_scale):
    g = torch.Generator().manual_seed(0)
    b, t, c = 2, 37, 6
    k = torch.randn(b, t, c, generator=g, dtype=torch.float64) * key_scale
    v = torch.randn(b, t, c, generator=g, dtype=torch.float64)
    w = torch.randn(c, generator=g, dtype=torch.float64) * 5 / t
    u = torch.randn(c, generator=g, dtype=torch.float64) / t
    ref = naive_bi_wkv(w, u, k, v)
    out = bi_wkv(w, u, k, v).double()
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4)


def test_wkv_gradients_match_definition():
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(6, generator=g) * 0.2, torch.randn(6, generator=g) * 0.1,
            torch.randn(1, 15, 6, generator=g), torch.randn(1, 15, 6, generator=g)]
    a1 = [x.clone().double().requires_grad_() for x in args]
    a2 = [x.clone().double().requires_grad_() for x in args]
    weight = torch.randn(1, 15, 6, generator=g).double()
    (bi_wkv(*a1).double() * weight).sum().backward()
    (naive_bi_wkv(*a2) * weight).sum().backward()
    for x, y in zip(a1, a2):
        assert torch.allclose(x.grad, y.grad, atol=1e-4, rtol=1e-3)


def test_wkv_runs_past_the_official_kernel_token_limit():
    """The official CUDA kernel asserts T <= 65536; the cumulative-sum form has no limit and linear memory
    (the pairwise form would need 70,000^2 entries per channel)."""
    t = 70_000
    k, v = torch.randn(1, t, 4), torch.randn(1, t, 4)
    y = bi_wkv(torch.full((4,), -3.0 / t), torch.zeros(4), k, v)
    assert y.shape == (1, t, 4) and torch.isfinite(y).all()


def test_q_shift_moves_each_quarter_one_pixel():
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(1, 8, 2, 3)  # [B, C, H, W]
    tokens = x.flatten(2).transpose(1, 2)
    out = q_shift(tokens, (2, 3)).transpose(1, 2).reshape(1, 8, 2, 3)
    assert torch.equal(out[0, 0, :, 1:], x[0, 0, :, :-1]) and (out[0, 0, :, 0] == 0).all()   # from the left
    assert torch.equal(out[0, 2, :, :-1], x[0, 2, :, 1:]) and (out[0, 2, :, -1] == 0).all()  # from the right
    assert torch.equal(out[0, 4, 1:], x[0, 4, :-1]) and (out[0, 4, 0] == 0).all()            # from above
    assert torch.equal(out[0, 6, :-1], x[0, 6, 1:]) and (out[0, 6, -1] == 0).all()           # from below


@pytest.mark.parametrize("backbone,os_", [("resnet18", 16), ("resnet18", 8), ("resnet50", 16)])
def test_deeplab_shapes_and_strides(backbone, os_):
    model = build_model(ModelConfig(backbone=backbone, output_stride=os_, pretrained="none"), num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    c1, c4 = model.encode(x)
    assert c1.shape[-1] == 16 and c4.shape[-1] == 64 // os_
    assert c1.shape[1] == (64 if backbone == "resnet18" else 256)
    logits, feat = model.forward_features(x)
    assert logits.shape == (1, 3, 64, 64) and feat.shape == (1, 256, 16, 16)


def test_feature_perturbation_and_scaling():
    model = build_model(ModelConfig(backbone="resnet18", pretrained="none"), 3).train()
    x = torch.randn(2, 3, 64, 64)
    clean, feat, fp, _ = model.forward_fp(x, feature_scale=0.75)
    assert clean.shape == fp.shape == (2, 3, 64, 64)
    assert feat.shape[-1] == 12  # 16 * 0.75
    assert not torch.allclose(clean, fp)


def test_cif_gate_and_multiscale_inference():
    model = build_model(ModelConfig(backbone="resnet18", pretrained="none"), 4, cif=True).eval()
    x = torch.randn(1, 3, 48, 64)
    s = model.cif(torch.randn(1, 256, 12, 16), torch.randn(1, 256, 12, 16))
    assert s.shape == (1, 1, 12, 16) and (s > 0).all() and (s < 1).all()
    with torch.no_grad():
        fused = model.forward_multiscale(x, (0.5, 2.0))
        single = model(x)
    assert fused.shape == single.shape and not torch.allclose(fused, single)
    assert 0.1e6 < sum(p.numel() for p in CIF().parameters()) < 0.2e6  # ~0.16M in the paper's model


def test_pretrained_encoder_from_local_file(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(ModelConfig(backbone="resnet18", pretrained=str(path)), 3)
    assert torch.equal(model.encoder.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    with pytest.raises(ConfigError, match="resnet18 weights, but --backbone is resnet50"):
        build_model(ModelConfig(backbone="resnet50", pretrained=str(path)), 3)
    with pytest.raises(ConfigError, match="not found"):
        build_model(ModelConfig(backbone="resnet18", pretrained=str(tmp_path / "nope.pth")), 3)


def test_wkv_exports_to_onnx_with_dynamic_tokens(tmp_path):
    ort = pytest.importorskip("onnxruntime")

    class Mix(torch.nn.Module):
        def forward(self, k, v):
            c = k.shape[-1]
            return bi_wkv(torch.linspace(-4, 4, c) / k.shape[1], torch.zeros(c), k, v)

    path = tmp_path / "wkv.onnx"
    k, v = torch.randn(1, 20, 4), torch.randn(1, 20, 4)
    torch.onnx.export(Mix(), (k, v), path, input_names=["k", "v"], output_names=["y"], opset_version=17,
                      dynamic_axes={"k": {1: "T"}, "v": {1: "T"}}, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    k, v = torch.randn(1, 53, 4) * 10, torch.randn(1, 53, 4)
    out = session.run(None, {"k": k.numpy(), "v": v.numpy()})[0]
    assert abs(out - Mix()(k, v).numpy()).max() < 1e-4


def lite0(decoder: str, cif: bool = False):
    return build_model(ModelConfig(backbone="efficientnet_lite0", pretrained="none", decoder=decoder), 3, cif=cif)


def test_light_decoder_runs_every_forward_variant_and_standard_keeps_its_weights():
    standard, light = lite0("standard", cif=True), lite0("light", cif=True)
    # standard: the papers' full 3x3 convolutions under the keys earlier checkpoints hold
    assert standard.fuse[0][0].weight.shape == (256, 304, 3, 3)
    assert standard.aspp.branches[3][0].weight.shape == (256, 320, 3, 3)
    # light: depthwise 3x3 (the ASPP's keeps its atrous rate), then pointwise 1x1, each with BN + ReLU
    assert light.fuse[0][0].weight.shape == (304, 1, 3, 3) and light.fuse[0][3].weight.shape == (256, 304, 1, 1)
    assert light.aspp.branches[3][0].groups == 320 and light.aspp.branches[3][0].dilation == (18, 18)
    with pytest.raises(RuntimeError, match="size mismatch"):  # a checkpoint must say which head it holds
        standard.load_state_dict(light.state_dict())

    x = torch.randn(4, 3, 64, 64)
    light.train()
    clean, feat, fp, plain = light.forward_fp(x, feature_scale=0.75, plain=2, fp_from=2)
    assert clean.shape == (4, 3, 64, 64) and fp.shape == (2, 3, 64, 64) and plain.shape == (2, 3, 64, 64)
    assert feat.shape == (4, DeepLabV3Plus.FEATURE_CHANNELS, 12, 12)
    f = light.decoder_input(*light.encode(x))
    logits, feat = light.decode_from(f)
    assert f.shape == (4, 304, 16, 16) and logits.shape == (4, 3, 16, 16) and feat.shape == (4, 256, 16, 16)
    with torch.no_grad():
        fused = light.eval().forward_multiscale(x[:1], (0.5, 2.0))
    assert fused.shape == (1, 3, 64, 64) and torch.isfinite(fused).all()
    with pytest.raises(ConfigError, match="--decoder mobile: choose standard or light"):
        lite0("mobile")


def test_light_decoder_costs_a_fraction_of_the_standard_head():
    """Lite0 at 512x512: 27.5 GMAC with the standard head, 21 of them in the stride-4 fuse convolutions; the
    depthwise-separable head brings the whole network under a quarter of that and its head under a quarter
    of the parameters."""
    from bench.decoder_cost import head_parameters, macs_by_module

    standard, light = lite0("standard"), lite0("light")
    s, li = macs_by_module(standard, 512), macs_by_module(light, 512)
    assert 27e9 < s[""] < 28e9 and 20e9 < s["fuse"] < 22e9  # the count: the counter sees the real head
    assert li["encoder"] == s["encoder"]  # only the head changes
    assert li["fuse"] < s["fuse"] / 8 and li["aspp"] < s["aspp"] / 3
    assert li[""] < s[""] / 4
    assert head_parameters(light) < head_parameters(standard) / 4


class _FrozenNorm(nn.Module):
    """Stands for an encoder with --encoder-bn frozen: its train() keeps its BN in inference mode."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def train(self, mode: bool = True):
        super().train(mode)
        self.bn.eval()
        return self

    def forward(self, x):
        return self.bn(x)


def test_recomputed_bn_statistics_are_the_population_statistics_of_the_given_batches():
    from training.bn_stats import recompute_bn_statistics
    torch.manual_seed(0)
    model = nn.Sequential(_FrozenNorm(), nn.Conv2d(3, 4, 1), nn.Dropout(0.5), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    model.train()
    model[4].eval()  # a submodule in another mode than its parent keeps it
    bn, frozen = model[3], model[0].bn
    frozen_mean = frozen.running_mean.clone()
    batches = [torch.randn(n, 3, 8, 8) * (n + 1) + n for n in (2, 3, 2)]  # sizes differ: weighted by their values
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model[1](model[0](x)) for x in batches])
    model.train()
    model[4].eval()
    assert recompute_bn_statistics(model, iter(batches)) == 3
    assert torch.allclose(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, feats.var((0, 2, 3), unbiased=False), atol=1e-4)  # dropout off, population
    assert torch.equal(frozen.running_mean, frozen_mean)  # a frozen layer keeps its statistics
    assert model.training and not model[4].training and not frozen.training and bn.momentum == 0.1
    before = bn.running_mean.clone()
    with pytest.raises(ValueError, match="no images"):
        recompute_bn_statistics(model, [])
    with pytest.raises(ValueError, match="a batch of 1 image"):  # stopped part-way: everything as it was
        recompute_bn_statistics(model, [batches[0], torch.randn(1, 3, 8, 8)])
    assert torch.equal(bn.running_mean, before) and bn.momentum == 0.1 and model.training and not model[4].training
