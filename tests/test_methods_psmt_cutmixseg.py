"""PS-MT and CutMix-Seg: named losses, where gradients go, the alternating teachers, the box samplers,
the losses' normalisation, the CLI, exact resume after a kill, torchrun on gloo, export and parity."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from export.package import export_package
from training.checkpoint import load_checkpoint
from training.cli import main
from training.engine import Trainer
from training.methods import StepContext
from training.models import build_model
from training.methods.cutmixseg import area_boxes, gated_consistency
from training.methods.psmt import assisted_logits, beta_boxes, cosine_rampup, strict_confidence_ce

from .conftest import tiny_config
from .test_engine import assert_killed_run_resumes_exactly
from .test_engine import test_torchrun_two_processes_gloo as torchrun_two_processes
from .test_methods import CTX, N, S, batches, make

MID = StepContext(iteration=50, epoch=0, total_iters=100, iters_per_epoch=5)  # past any ramp-up


def test_psmt_step_names_losses_and_trains_the_student_only():
    method = make("psmt", conf_thresh=0.0, rampup_epochs=0.0)
    losses = method(*batches(), MID)
    assert set(losses) == {"loss", "loss_x", "loss_u", "unsup_weight", "mask_ratio"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_u"] > 0 and losses["unsup_weight"] == 1.5
    assert torch.isclose(losses["loss"], losses["loss_x"] + 1.5 * losses["loss_u"])
    losses["loss"].backward()
    assert all(p.grad is None for t in method.teachers for p in t.parameters())
    student = list(method.model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student)
    assert method.inference_model() is method.teachers[0]
    assert [id(n) for n in method.trained_networks()] == [id(method.model)]


def test_psmt_unlabelled_loss_reaches_the_student_through_the_mixed_strong_view():
    method = make("psmt", conf_thresh=0.0, rampup_epochs=0.0)
    labeled, unl, _ = batches()
    labeled["mask"].fill_(255)  # no labelled loss: every gradient comes from the unlabelled one
    method(labeled, unl, None, MID)["loss"].backward()
    assert method.model.encoder.stem[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for t in method.teachers for p in t.parameters())


def test_tvat_noise_is_a_constant_of_norm_eps_that_raises_the_teachers_divergence():
    method = make("psmt", vat_xi=1.0, vat_eps=2.0)
    x = batches()[1]["weak"]
    f = method.model.decoder_input(*method.model.encode(x))
    torch.manual_seed(3)
    noise = method.tvat_noise(f, x.shape[-2:])
    assert not noise.requires_grad and noise.grad_fn is None  # not learned: no path back to f or a network
    assert torch.allclose(noise.flatten(1).norm(dim=1), torch.full((N,), 2.0), atol=1e-4)
    assert all(p.grad is None for t in method.teachers for p in t.parameters())
    assert all(t.training for t in method.teachers)  # the teachers' modes are restored

    def divergence(r):
        with torch.no_grad():
            for t in method.teachers:
                t.eval()
            mean = sum(t.decode_from(f.detach())[0] for t in method.teachers) / 2
            shifted = sum(t.decode_from(f.detach() + r)[0] for t in method.teachers) / 2
            for t in method.teachers:
                t.train()
            return F.kl_div(shifted.log_softmax(1), mean.softmax(1), reduction="batchmean")

    random = torch.randn(f.shape, generator=torch.Generator().manual_seed(0))
    random = 2.0 * random / random.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert divergence(noise) > divergence(random)


def test_psmt_updates_one_teacher_per_epoch_alternating():
    method = make("psmt", ema_decay=0.9)
    for epoch, moved in [(0, 0), (1, 1), (2, 0), (3, 1)]:
        with torch.no_grad():
            for p in method.model.parameters():
                p.add_(1.0)
        before = [[p.clone() for p in t.parameters()] for t in method.teachers]
        student = [p.clone() for p in method.model.parameters()]
        method.after_step(StepContext(epoch * 5 + 2, epoch, 20, 5))
        for k, teacher in enumerate(method.teachers):
            now = list(teacher.parameters())
            if k == moved:
                assert all(torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-6) for t, t0, s in zip(now, before[k], student))
            else:
                assert all(torch.equal(t, t0) for t, t0 in zip(now, before[k]))


def test_psmt_pseudo_labels_come_from_both_teachers_with_the_active_ones_assist():
    core = torch.tensor([10.0, 20.0, 30.0, 40.0]).view(1, 4, 1, 1)
    assist = torch.tensor([4.0, 1.0, 3.0, 2.0]).view(1, 4, 1, 1)
    assert assisted_logits(core, assist, 2).flatten().tolist() == [4.0, 20.0, 3.0, 40.0]
    assert torch.equal(assisted_logits(core, assist, 7), assist)  # k above the class count keeps all
    method = make("psmt", teacher_gamma=0.25, assist_topk=7)
    with torch.no_grad():  # make the teachers differ
        for p in method.teachers[1].parameters():
            p.mul_(0.5)
    x = batches()[1]["weak"]
    torch.manual_seed(0)
    with torch.no_grad():
        t1, t2 = method.teachers[0](x), method.teachers[1](x)
    got = method.teacher_logits(x, active=0)
    assert torch.allclose(got, 0.25 * t1 + 0.75 * t2, atol=1e-5)


def test_psmt_cosine_rampup_and_weight():
    assert cosine_rampup(0, 10) == 0 and cosine_rampup(5, 10) == pytest.approx(0.5) and cosine_rampup(12, 10) == 1
    method = make("psmt", rampup_epochs=2.0, unsup_weight=3.0)
    weights = [method.unsup_weight(StepContext(i, i // 5, 40, 5)) for i in range(12)]
    assert weights[0] == 0 and weights == sorted(weights) and weights[10] == weights[11] == 3.0


def test_strict_confidence_ce_averages_over_confident_pixels():
    logits = torch.zeros(1, 2, 1, 3)
    target = torch.tensor([[[[5.0, 0.0, 5.0]], [[0.0, 0.0, 0.0]]]])  # confident, 0.5, confident-but-padding
    ignore = torch.tensor([[[0, 0, 255]]])
    loss, ratio = strict_confidence_ce(logits, target, ignore, 0.6)
    conf = torch.tensor([5.0, 0.0]).softmax(0)[0]
    assert torch.isclose(loss, conf * torch.log(torch.tensor(2.0)))  # only pixel 0 counts, weighted by conf
    assert ratio == pytest.approx(1 / 3)
    zero, _ = strict_confidence_ce(logits.requires_grad_(), target, ignore, 0.999)
    assert zero == 0 and zero.requires_grad


def test_psmt_cutmix_boxes_follow_the_official_beta_box():
    torch.manual_seed(0)
    areas = []
    for _ in range(200):
        box = beta_boxes(1, 64, 64, 4.0, "cpu")[0]
        ys, xs = box.any(1).nonzero(), box.any(0).nonzero()
        assert box.sum() == len(ys) * len(xs)  # one rectangle
        areas.append(float(box.float().mean()))
    # sides sqrt(1 - lambda) with lambda ~ Beta(4, 4): about half the crop before clipping, less after
    assert 0.2 < sum(areas) / len(areas) < 0.5


def test_cutmixseg_step_names_losses_and_trains_the_student_only():
    method = make("cutmixseg", conf_thresh=0.0)
    assert method.num_strong_views == 0 and method.needs_partner
    losses = method(*batches(), CTX)
    assert set(losses) == {"loss", "loss_x", "loss_cons", "conf_rate"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_cons"] > 0 and losses["conf_rate"] == 1
    losses["loss"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.model.parameters())
    assert method.inference_model() is method.teacher
    assert make("cutmixseg", student_strong=True).num_strong_views == 1


def test_cutmixseg_target_is_the_same_mix_of_the_teachers_predictions(monkeypatch):
    from training.methods import cutmixseg as module
    method = make("cutmixseg")
    labeled, unl, partner = batches()
    box = torch.zeros(N, S, S, dtype=torch.bool)
    box[:, 8:24, 0:16] = True
    monkeypatch.setattr(module, "area_boxes", lambda *a: box)
    seen = {}
    real = module.gated_consistency

    def spy(logits, teacher_logits, valid, thresh, per_pixel):
        seen.update(teacher=teacher_logits, valid=valid)
        return real(logits, teacher_logits, valid, thresh, per_pixel)

    monkeypatch.setattr(module, "gated_consistency", spy)
    state = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    method(labeled, unl, partner, CTX)
    method.teacher.load_state_dict(state)  # the step's train-mode forwards moved the BN statistics
    with torch.no_grad():
        t0, t1 = method.teacher(unl["weak"]), method.teacher(partner["weak"])
    inside = box.unsqueeze(1).expand_as(t0)
    assert torch.allclose(seen["teacher"][inside], t1[inside], atol=1e-5)
    assert torch.allclose(seen["teacher"][~inside], t0[~inside], atol=1e-5)
    assert not seen["valid"][:, -4:, 16:].any() and seen["valid"][:, :4].all()  # padding rows stay invalid


def test_cutmixseg_consistency_gate_and_normalisation():
    logits = torch.zeros(1, 2, 1, 2)  # student: 0.5 / 0.5 everywhere
    teacher = torch.tensor([[[[9.0, 0.0]], [[0.0, 0.0]]]])  # pixel 0 confident, pixel 1 not
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    p0 = torch.tensor([9.0, 0.0]).softmax(0)
    sq0 = ((p0 - 0.5) ** 2).sum()
    loss, rate = gated_consistency(logits, teacher, valid, 0.97, per_pixel=False)
    assert rate == 0.5 and torch.isclose(loss, 0.5 * (sq0 + 0.0) / 2)  # scalar gate: the confident fraction
    loss, _ = gated_consistency(logits, teacher, valid, 0.97, per_pixel=True)
    assert torch.isclose(loss, sq0 / 2)  # per-pixel gate, still averaged over every pixel
    loss, _ = gated_consistency(logits, teacher, torch.tensor([[[False, True]]]), 0.97, per_pixel=False)
    assert loss == 0


def test_cutmixseg_boxes_cover_half_the_crop_inside_it():
    torch.manual_seed(0)
    shapes = set()
    for box in area_boxes(100, 40, 48, (0.5, 0.5), "cpu"):
        ys, xs = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        h, w = len(ys), len(xs)
        assert box.sum() == h * w and 20 <= h <= 40 and 24 <= w <= 48
        assert abs(h * w - 0.5 * 40 * 48) <= 40 + 48  # area 0.5 up to the rounding of each side
        shapes.add((h, w))
    assert len(shapes) > 10  # random aspect ratio


def test_mean_teacher_ema_helper_still_follows_the_student():
    method = make("cutmixseg", ema_decay=0.5)
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(2.0)
        method.model.encoder.stem[1].running_mean.fill_(4.0)
    before = next(method.teacher.parameters()).clone()
    method.after_step(CTX)
    assert torch.allclose(next(method.teacher.parameters()), before + 1.0)
    assert torch.allclose(method.teacher.encoder.stem[1].running_mean, torch.full((64,), 2.0))


@pytest.mark.parametrize("method,flags", [("psmt", ["--vat-eps", "--assist-topk", "--rampup-epochs", "(default: 0.996)"]),
                                          ("cutmixseg", ["--conf-per-pixel", "--box-area", "(default: 0.5,0.5)", "(default: 0.97)"])])
def test_train_help_lists_the_methods_options(capsys, method, flags):
    with pytest.raises(SystemExit):
        main(["train", "--method", method, "--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in flags)


def test_psmt_trains_every_group_at_one_lr(tiny_data):
    from training.cli import parse_train_args
    assert parse_train_args([str(tiny_data), "--method", "psmt"]).optim.head_lr_mult == 1.0
    assert parse_train_args([str(tiny_data), "--method", "cutmixseg"]).optim.head_lr_mult == 10.0


def _train_cmd(data, out, method: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training.cli", "train", str(data), "--method", method, "--backbone", "resnet18", "--pretrained", "none",
            "--crop-size", "32", "--batch-size", "2", "--max-iters", "8", "--save-every", "1", "--eval-every", "4",
            "--num-workers", "1", "--lr", "0.01", "--device", "cpu", "--out", str(out), *extra]


@pytest.mark.parametrize("method,extra", [("psmt", ["--rampup-epochs", "0.5", "--vat-xi", "1"]),
                                          ("cutmixseg", ["--conf-thresh", "0.3"])])
def test_killed_and_resumed_run_ends_with_identical_weights(tiny_data, tmp_path, method, extra):
    """Both PS-MT teachers included: 12 unlabelled images / batch 2 = 6 iterations per epoch, so the run
    crosses from teacher 1's epoch into teacher 2's after the resume."""
    final = assert_killed_run_resumes_exactly(lambda out, *more: _train_cmd(tiny_data, out, method, *extra, *more),
                                             tmp_path, 3, 8, timeout=300)
    if method == "psmt":  # teacher 1 followed the student for 6 iterations, teacher 2 for 2: they differ
        state = final["method_state"]
        assert not torch.equal(state["teachers.0.classifier.weight"], state["teachers.1.classifier.weight"])
        records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records if "loss" in r] == [0] * 6 + [1] * 2


@pytest.mark.parametrize("method", ["psmt", "cutmixseg"])
def test_torchrun_two_processes_gloo(tiny_data, tmp_path, method):
    torchrun_two_processes(tiny_data, tmp_path, method)


@pytest.mark.parametrize("method", ["psmt", "cutmixseg"])
def test_export_has_the_plain_network_and_passes_parity(tiny_data, tmp_path, method):
    cfg = tiny_config(tiny_data, tmp_path / "run", method=method)
    cfg.run.max_iters = 1
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    saved = ckpt["inference"]["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in trainer.method.inference_model().state_dict().items())
    plain = build_model(cfg.model, 5).state_dict()
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in plain.items()}
    meta = export_package(tmp_path / "run" / "last.pt", tmp_path / "pkg", data=tiny_data, progress=lambda m: None)
    assert meta["method"] == method and meta["parity"]["passed"]
    weights = sum(v.numel() * v.element_size() for k, v in plain.items() if "num_batches_tracked" not in k)
    # one network and nothing else (Conv+BatchNorm folding may shave off the BN tensors)
    assert 0.95 * weights < (tmp_path / "pkg" / "model.onnx").stat().st_size < 1.02 * weights
