"""PseudoSeg and CCT: named losses, which parameters each loss reaches, the paper's settings, the plain
exported graph, exact resume with the training-only heads, torchrun on gloo, and the CLI."""
from __future__ import annotations

import math
import sys

import onnx
import pytest
import torch
from onnx import numpy_helper

from export.onnx_export import SegmentationGraph, export_graph
from export.package import export_package
from training.checkpoint import load_checkpoint
from training.cli import main, parse_train_args
from training.config import ModelConfig
from training.engine import Trainer
from training.methods import StepContext
from training.methods.cct import PERTURBATIONS, cutout_mask, object_boxes
from training.models import build_model

from .conftest import tiny_config
from .test_engine import assert_killed_run_resumes_exactly
from .test_engine import test_torchrun_two_processes_gloo as engine_torchrun_test
from .test_methods import CTX, batches, make

OWN_METHODS = ["pseudoseg", "cct"]


def reached(loss: torch.Tensor, module: torch.nn.Module) -> bool:
    """Whether ``loss`` sends a non-zero gradient to any parameter of ``module``."""
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def decoder_modules(model):
    """Everything in the segmentation network but its encoder."""
    return [model.aspp, model.reduce, model.fuse, model.classifier]


@pytest.mark.parametrize("name,expected", [
    ("pseudoseg", {"loss", "loss_x", "loss_cls", "loss_att", "loss_u", "mask_ratio"}),
    ("cct", {"loss", "loss_x", "loss_u", "unsup_weight"}),
])
def test_one_step_returns_finite_named_losses(name, expected):
    losses = make(name)(*batches(), CTX)
    assert set(losses) == expected
    assert losses["loss"].requires_grad and all(torch.isfinite(v).all() for v in losses.values())
    assert losses["loss_u"] > 0


def test_pseudoseg_heads_learn_from_their_own_losses():
    """Classifier: multi-label BCE only (with the encoder). Self-attention: the SGC segmentation loss
    only (CAMs and hypercolumn are stop-gradient). The segmentation network: L_sup and L_cons, never
    through the heads."""
    method = make("pseudoseg")
    losses = method.compute_losses(*batches()[:2], CTX)
    m, cls, att = method.model, method.classifier, method.attention
    assert reached(losses["loss_cls"], cls) and reached(losses["loss_cls"], m.encoder)
    assert not reached(losses["loss_cls"], att) and not any(reached(losses["loss_cls"], d) for d in decoder_modules(m))
    assert reached(losses["loss_att"], att)
    assert not reached(losses["loss_att"], cls) and not reached(losses["loss_att"], m)
    for name in ("loss_x", "loss_u"):
        assert reached(losses[name], m.encoder) and reached(losses[name], m.classifier)
        assert not reached(losses[name], cls) and not reached(losses[name], att)


def test_pseudoseg_pseudo_label_is_the_sharpened_calibrated_fusion():
    method = make("pseudoseg")
    _, unl, _ = batches()
    valid = unl["ignore"] != 255
    target = method.pseudo_labels(unl["weak"], valid)
    assert torch.allclose(target.sum(1), torch.ones_like(target[:, 0]), atol=1e-5)
    flat = make("pseudoseg", temperature=1.0).pseudo_labels(unl["weak"], valid)
    # sharpening with T = 0.5 squares and renormalises the averaged distribution
    assert torch.allclose(target, flat.pow(2) / flat.pow(2).sum(1, keepdim=True), atol=1e-5)
    assert (target.max(1).values >= flat.max(1).values - 1e-6).all()


def test_pseudoseg_strong_view_is_colour_jitter_and_cutout_only():
    method = make("pseudoseg", jitter_prob=0.0, cutout_size=0.25)
    _, unl, _ = batches()
    strong, cut = method.strong_view(unl["weak"], unl["ignore"])
    assert cut.any(1).any(1).all() and (cut.sum((1, 2)) <= 8 * 8).all()
    assert torch.allclose(strong, unl["weak"].masked_fill(cut.unsqueeze(1), 0.0), atol=1e-5)  # no geometric change
    jittered, _ = make("pseudoseg").strong_view(unl["weak"], unl["ignore"])
    assert not torch.allclose(jittered, strong, atol=1e-3)
    # CutOut pixels leave the consistency loss and its normaliser (the code's valid mask)
    torch.manual_seed(3)
    loss_all = method.compute_losses(*batches()[:2], CTX)
    assert 0 < loss_all["mask_ratio"] < (unl["ignore"] != 255).float().mean()


def test_cct_aux_decoders_learn_from_the_unsupervised_loss_only():
    method = make("cct")
    losses = method.compute_losses(*batches()[:2], CTX)
    m = method.model
    assert not reached(losses["loss_x"], method.aux_decoders)
    assert all(reached(losses["loss_u"], dec) for dec in method.aux_decoders)
    # the main decoder learns from labels only; the shared encoder from both
    assert not reached(losses["loss_u"], m.classifier) and reached(losses["loss_x"], m.classifier)
    assert reached(losses["loss_u"], m.encoder) and reached(losses["loss_u"], m.fuse)


def test_cct_paper_decoders_and_rampup():
    method = make("cct")
    counts = {kind: method.kinds.count(kind) for kind in PERTURBATIONS}
    assert counts == {"vat": 2, "dropout": 6, "cutout": 6, "context": 2, "object": 2, "featdrop": 6, "noise": 6}
    assert len(method.aux_decoders) == 30
    # 80 epochs of 10 iterations: the weight ramps over int(0.1 x 80) = 8 epochs from 30 e^-5 to 30
    weights = [method.consistency_weight(StepContext(i, i // 10, 800, 10)) for i in range(0, 100, 10)]
    assert weights[0] == pytest.approx(30 * math.exp(-5))
    assert weights == sorted(weights) and weights[8] == weights[9] == 30.0 and weights[7] < 30.0
    groups = method.param_groups(0.01, 10)
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in method.parameters())
    assert {id(p) for p in method.aux_decoders.parameters()} <= {id(p) for g in groups if g["lr"] == 0.1 for p in g["params"]}


def test_cct_guided_cutout_erases_part_of_each_large_object():
    mask = torch.zeros(1, 48, 48, dtype=torch.bool)
    mask[0, 4:34, 6:26] = True     # outline 96 px: an object
    mask[0, 40:44, 40:44] = True   # outline 12 px: too small
    mask[0, 38:40, 2:4] = True
    boxes = object_boxes(mask, min_outline=50)
    assert boxes == [[(4, 33, 6, 25)]]
    torch.manual_seed(0)
    keep = cutout_mask(boxes, (48, 48), 0.4, "cpu")[0, 0]
    erased = (keep == 0).nonzero()
    assert keep.sum() == 48 * 48 - int(29 * 0.4) * int(19 * 0.4)
    assert erased[:, 0].min() >= 4 and erased[:, 0].max() <= 33 and erased[:, 1].min() >= 6 and erased[:, 1].max() <= 25


@pytest.mark.parametrize("method", OWN_METHODS)
def test_export_is_the_plain_network_and_passes_parity(tiny_data, tmp_path, method):
    cfg = tiny_config(tiny_data, tmp_path / "run", method=method)
    cfg.run.max_iters = 1
    Trainer(cfg, progress=False).fit()
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    plain = build_model(ModelConfig(backbone="resnet18", pretrained="none"), 5)
    assert set(ckpt["inference"]["state_dict"]) == set(plain.state_dict())
    meta = export_package(tmp_path / "run" / "last.pt", tmp_path / "pkg", data=tiny_data, progress=lambda m: None)
    assert meta["parity"]["passed"] and meta["method"] == method

    def weights(model: onnx.ModelProto) -> list[int]:
        return sorted(numpy_helper.to_array(t).size for t in model.graph.initializer)

    # the same weights in a plain DeepLabV3+ (no heads) export to a graph of the same size and layout
    plain.load_state_dict(ckpt["inference"]["state_dict"])
    reference = export_graph(SegmentationGraph(plain), tmp_path / "plain.onnx")
    exported = onnx.load(str(tmp_path / "pkg" / "model.onnx"))
    assert weights(exported) == weights(reference)
    assert [n.op_type for n in exported.graph.node] == [n.op_type for n in reference.graph.node]


def train_cmd(data, out, method: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training.cli", "train", str(data), "--method", method, "--backbone", "resnet18", "--pretrained", "none",
            "--crop-size", "32", "--batch-size", "2", "--max-iters", "6", "--save-every", "1", "--eval-every", "3",
            "--num-workers", "1", "--lr", "0.01", "--device", "cpu", "--out", str(out), *extra]


@pytest.mark.parametrize("method,head", [("pseudoseg", "attention.key.weight"), ("cct", "aux_decoders.29.weight")])
def test_killed_and_resumed_run_ends_with_identical_weights(tiny_data, tmp_path, method, head):
    final = assert_killed_run_resumes_exactly(lambda out, *extra: train_cmd(tiny_data, out, method, *extra),
                                              tmp_path, 2, 6, timeout=300)
    assert head in final["method_state"]  # the training-only heads are saved and resumed too


@pytest.mark.parametrize("method", OWN_METHODS)
def test_torchrun_two_processes_gloo(tiny_data, tmp_path, method):
    engine_torchrun_test(tiny_data, tmp_path, method)


@pytest.mark.parametrize("method,flags", [
    ("pseudoseg", ["--temperature", "--cutout-size", "--attention-dim", "--cls-thresh", "(default: 0.5,0.5,0.5,0.25)"]),
    ("cct", ["--vat-eps", "--noise-decoders", "--featdrop-range", "--rampup", "(default: 30.0)"]),
])
def test_train_cli_help_lists_the_methods_options(capsys, method, flags):
    with pytest.raises(SystemExit):
        main(["train", "--method", method, "--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in flags)


def test_cli_defaults_follow_the_official_code(tiny_data, tmp_path, capsys):
    pseudoseg = parse_train_args([str(tiny_data), "--method", "pseudoseg"])
    assert pseudoseg.optim.head_lr_mult == 1.0 and pseudoseg.method_cfg.temperature == 0.5
    cct = parse_train_args([str(tiny_data), "--method", "cct", "--vat-decoders", "0"])
    assert cct.optim.head_lr_mult == 10.0 and cct.method_cfg.unsup_weight == 30.0 and cct.method_cfg.vat_decoders == 0
    assert main(["train", str(tiny_data), "--method", "cct", *[f"--{k}-decoders=0" for k in PERTURBATIONS],
                 "--backbone", "resnet18", "--pretrained", "none", "--device", "cpu", "--out", str(tmp_path / "run")]) == 2
    assert "every auxiliary decoder count is 0" in capsys.readouterr().err and not (tmp_path / "run").exists()

