"""AdvSemSeg and GCT: finite losses, the critic and the segmenter never train each other, GCT's flaw detector learns
the error map, exact resume with the critic and its Adam, export of the plain network, torchrun on gloo."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from export.package import export_package
from training.checkpoint import load_checkpoint
from training.config import ModelConfig
from training.engine import Trainer
from training.losses import cross_entropy
from training.methods import StepContext, get_method
from training.methods.critics import critic_adam, one_hot
from training.methods.gct import error_map, gaussian_taps
from training.models import build_model

from .conftest import tiny_config
from .test_engine import env

K, N, S = 4, 2, 32
CRITIC = {"advsemseg": "discriminator", "gct": "flaw_detector"}
SMALL = {"advsemseg": {"d_channels": 8}, "gct": {"fd_channels": 8}}  # narrow critics keep the tests fast


def batches(seed: int = 0, side: int = S):
    g = torch.Generator().manual_seed(seed)
    ignore = torch.zeros(N, side, side, dtype=torch.long)
    ignore[:, -4:] = 255  # padded rows
    mask = torch.randint(0, K, (N, side, side), generator=g)
    mask[:, :2] = 255
    labeled = {"image": torch.randn(N, 3, side, side, generator=g), "mask": mask}
    return labeled, {"weak": torch.randn(N, 3, side, side, generator=g), "ignore": ignore}


def make(name: str, **overrides):
    torch.manual_seed(0)
    cls = get_method(name)
    return cls(cls.Config(**{**SMALL[name], **overrides}), ModelConfig(backbone="resnet18", pretrained="none"), K, cross_entropy).train()


def ctx(iteration: int = 5, total: int = 10) -> StepContext:
    return StepContext(iteration=iteration, epoch=0, total_iters=total, iters_per_epoch=5)


def grads(loss: torch.Tensor, params) -> list:
    return torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)


def nonzero(gs) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in gs)


# mask_t 0: every unlabelled pixel is trusted. dc_threshold -1: every pixel is bad for both GCT models, so only
# flaw correction acts; 2: none is, so only the dynamic consistency acts (where the other's flaw is lower; a fresh
# detector's flaws are all under flaw_clip, which would zero them, hence flaw_clip -1).
ACTIVE = [("advsemseg", {"mask_t": 0.0, "semi_start": 0.0}, ["loss_x", "loss_adv", "loss_semi_adv", "loss_semi", "loss_d"]),
          ("gct", {"dc_threshold": -1.0}, ["loss_x", "loss_fc", "loss_fd"]),
          ("gct", {"dc_threshold": 2.0, "flaw_clip": -1.0}, ["loss_x", "loss_dc", "loss_fd"])]


@pytest.mark.parametrize("name,overrides,terms", ACTIVE)
def test_every_term_finite_and_active(name, overrides, terms):
    method = make(name, **overrides)
    losses = method(*batches(), None, ctx())
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(losses[t] > 0 for t in terms), losses
    losses["loss"].backward()
    critic = getattr(method, CRITIC[name])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())


def test_advsemseg_semi_loss_starts_at_its_iteration_and_skips_untrusted_pixels():
    method = make("advsemseg", semi_start=0.5, mask_t=1.1)  # sigmoid never reaches 1.1: nothing trusted
    assert method(*batches(), None, ctx(4))["loss_semi"] == 0
    assert method(*batches(), None, ctx(5))["semi_ratio"] == 0
    method.cfg.mask_t = 0.0
    before, after = method(*batches(), None, ctx(4)), method(*batches(), None, ctx(5))
    assert before["loss_semi"] == 0 and before["semi_ratio"] == 0
    assert after["loss_semi"] > 0 and after["semi_ratio"] == pytest.approx((S - 4) / S)  # padding never trusted


def test_advsemseg_discriminator_and_segmenter_never_train_each_other():
    method = make("advsemseg", semi_start=0.0, mask_t=0.0)
    labeled, unlabeled = batches()
    seg_params, d_params = list(method.model.parameters()), list(method.discriminator.parameters())
    logits = method.model(torch.cat([labeled["image"], unlabeled["weak"]]))
    seg = method.segmenter_losses(logits, labeled, unlabeled, ctx())
    for term in ("loss_adv", "loss_semi_adv"):
        assert all(g is None for g in grads(seg[term], d_params)), f"{term} reached the discriminator"
        assert nonzero(grads(seg[term], seg_params)), f"{term} should train the segmenter"
    loss_d = method.discriminator_loss(logits, labeled, unlabeled)
    assert all(g is None for g in grads(loss_d, seg_params)), "D's loss reached the segmenter"
    assert all(g is not None and g.abs().sum() > 0 for g in grads(loss_d, d_params))


@pytest.mark.parametrize("dc_threshold,term", [(-1.0, "loss_fc"), (2.0, "loss_dc")])
def test_gct_flaw_detector_and_segmenters_never_train_each_other(dc_threshold, term):
    method = make("gct", dc_threshold=dc_threshold, flaw_clip=-1.0)
    labeled, unlabeled = batches()
    seg_params = [*method.model.parameters(), *method.model2.parameters()]
    fd_params = list(method.flaw_detector.parameters())
    image = torch.cat([labeled["image"], unlabeled["weak"]])
    logits = [method.model(image), method.model2(image)]
    probs = [z.softmax(1) for z in logits]
    loss_fd, flaws = method.flaw_detector_loss(image, probs, labeled)
    assert all(g is None for g in grads(loss_fd, seg_params)), "the detector's loss reached a segmenter"
    assert nonzero(grads(loss_fd, fd_params))
    seg = method.segmenter_losses(image, logits, probs, flaws, labeled, unlabeled, ctx())
    assert all(g is None for g in grads(seg[term], fd_params)), f"{term} reached the flaw detector"
    for net in (method.model, method.model2):
        assert nonzero(grads(seg[term], net.parameters())), f"{term} should train both segmenters"


def test_gct_error_map_marks_the_wrong_region():
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    target = one_hot(labels, K)
    assert error_map(target.clone(), target, 0.5, 1).abs().max() < 1e-6  # a perfect prediction has no flaw
    prob = target.clone()
    prob[:, :, 40:56, 40:56] = torch.eye(K)[1].view(1, K, 1, 1)  # wrong class inside one box
    emap = error_map(prob, target, 0.5, 1)
    assert emap.max() == pytest.approx(1.0) and emap.min() == pytest.approx(0.0)
    assert emap[0, 0, 40:56, 40:56].mean() > 0.8 and emap[0, 0, :16, :16].max() < 0.05


def test_gct_flaw_detector_learns_its_error_map_target():
    method = make("gct")
    labeled, _ = batches(side=64)
    labeled["mask"] = torch.zeros_like(labeled["mask"])
    prob = one_hot(labeled["mask"], K)
    prob[:, :, 8:28, 30:60] = torch.eye(K)[2].view(1, K, 1, 1)  # the prediction is wrong in this box
    optimizer = critic_adam(method.flaw_detector, 3e-3, (0.9, 0.99))
    history = []
    for _ in range(30):
        loss, flaws = method.flaw_detector_loss(labeled["image"], [prob, prob], labeled)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    assert history[-1] < 0.3 * history[0], history
    flaw = flaws[0].detach()[:, 0]
    assert flaw[:, 8:28, 30:60].mean() > flaw[:, 40:, :20].mean() + 0.3


def test_gct_blur_kernel_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    for size in (3, 9, 41):
        delta = torch.zeros(size, size, dtype=torch.float64)
        delta[size // 2, size // 2] = 1
        ref = torch.from_numpy(ndimage.gaussian_filter(delta.numpy(), 0.3 * ((size - 1) * 0.5 - 1) + 0.8))
        taps = torch.tensor(gaussian_taps(size), dtype=torch.float64)
        assert torch.allclose(torch.outer(taps, taps), ref, atol=1e-12)


def test_defaults_follow_the_official_recipes():
    adv, gct = get_method("advsemseg").Config(), get_method("gct").Config()
    assert (adv.lambda_adv, adv.lambda_semi_adv, adv.lambda_semi, adv.mask_t, adv.d_lr, adv.d_betas) == \
        (0.01, 0.001, 0.1, 0.2, 1e-4, (0.9, 0.99))
    assert adv.semi_start == 5000 / 20000
    assert (gct.dc_weight, gct.fc_weight, gct.dc_threshold, gct.fd_weight, gct.fd_lr, gct.mu, gct.nu) == \
        (100.0, 1.0, 0.6, 10.0, 1e-4, 0.5, 1)
    assert gct.dc_rampup == 3 / 20
    for cfg in (adv, gct):
        assert all(f.metadata.get("help") for f in dataclasses.fields(cfg))


@pytest.mark.parametrize("name", ["advsemseg", "gct"])
def test_critic_has_its_own_adam_outside_the_segmenter_groups(tiny_data, tmp_path, name):
    trainer = Trainer(tiny_config(tiny_data, tmp_path / "run", name, **SMALL[name]), progress=False)
    critic = getattr(trainer.method, CRITIC[name])
    critic_ids = {id(p) for p in critic.parameters()}
    main_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not critic_ids & main_ids
    (adam,) = trainer.extra_optimizers
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["betas"] == (0.9, 0.99)
    assert {id(p) for g in adam.param_groups for p in g["params"]} == critic_ids
    assert adam.param_groups[0]["base_lr"] == 1e-4


@pytest.mark.parametrize("name", ["advsemseg", "gct"])
def test_interrupted_and_resumed_run_matches_straight_run(tiny_data, tmp_path, monkeypatch, name):
    straight = tiny_config(tiny_data, tmp_path / "straight", name, **SMALL[name])
    Trainer(straight, progress=False).fit()

    real_save = Trainer._save

    def save_then_die(self, file_name, payload=None):
        real_save(self, file_name, payload)
        if file_name == "last.pt" and self.iteration == 2:
            raise KeyboardInterrupt("killed after iteration 2")

    broken = tiny_config(tiny_data, tmp_path / "broken", name, **SMALL[name])
    monkeypatch.setattr(Trainer, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(broken, progress=False).fit()
    monkeypatch.setattr(Trainer, "_save", real_save)
    assert load_checkpoint(tmp_path / "broken" / "last.pt")["iteration"] == 2
    broken.run.resume = True
    Trainer(broken, progress=False).fit()

    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "broken" / "last.pt")
    assert a["iteration"] == b["iteration"] == 4
    assert any(k.startswith(CRITIC[name] + ".") for k in a["method_state"])
    for key, value in a["method_state"].items():
        assert torch.equal(value, b["method_state"][key]), key
    (sa,), (sb,) = a["extra_optimizers"], b["extra_optimizers"]
    assert sa["state"] and sa["param_groups"][0]["lr"] < 1e-4  # stepped, and poly-decayed
    for pid, state in sa["state"].items():
        for k, v in state.items():
            assert torch.equal(v, sb["state"][pid][k]), (pid, k)


@pytest.mark.parametrize("name", ["advsemseg", "gct"])
def test_export_keeps_the_plain_segmenter(tiny_data, checkpoints, tmp_path, name):
    cfg = tiny_config(tiny_data, tmp_path / "run", name, **SMALL[name])
    cfg.run.max_iters = 1
    Trainer(cfg, progress=False).fit()
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    plain = build_model(cfg.model, 5).state_dict()
    exported = ckpt["inference"]["state_dict"]
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in plain.items()}
    meta = export_package(tmp_path / "run" / "last.pt", tmp_path / "pkg", progress=lambda m: None)  # checks parity
    export_package(checkpoints["supervised"], tmp_path / "sup", progress=lambda m: None)
    assert meta["method"] == name
    size, plain_size = (tmp_path / "pkg" / "model.onnx").stat().st_size, (tmp_path / "sup" / "model.onnx").stat().st_size
    assert abs(size - plain_size) < 0.01 * plain_size


@pytest.mark.parametrize("name", ["advsemseg", "gct"])
def test_torchrun_two_processes_gloo(tiny_data, tmp_path, name):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.cli", "train", str(tiny_data), "--method", name, "--backbone", "resnet18", "--pretrained", "none",
           "--crop-size", "32", "--batch-size", "2", "--max-iters", "3", "--eval-every", "3", "--num-workers", "0",
           "--device", "cpu", "--out", str(out), "--d-channels" if name == "advsemseg" else "--fd-channels", "8"]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["iteration"] == 3 and len(ckpt["rng"]) == 2 and ckpt["extra_optimizers"][0]["state"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_miou" in r for r in records)
    assert all("loss_d" in r or "loss_fd" in r for r in records if "loss" in r)
