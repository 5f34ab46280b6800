"""Each method: one step gives finite named losses; gradients reach exactly the parameters they should."""
from __future__ import annotations

import pytest
import torch

from training.config import ModelConfig
from training.losses import balanced_class_weights, cross_entropy, ohem_cross_entropy, pseudo_label_loss
from training.methods import METHODS, StepContext, get_method
from training.methods import scalematch as scalematch_module
from training.methods.base import mixed_targets, paste

from .conftest import SMALL_SAMPLING

K, N, S = 4, 2, 32


def batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def unl():
        ignore = torch.zeros(N, S, S, dtype=torch.long)
        ignore[:, -4:] = 255  # padded rows
        box = torch.zeros(N, S, S, dtype=torch.uint8)
        box[:, 4:12, 6:20] = 1
        return {"weak": torch.randn(N, 3, S, S, generator=g), "strong1": torch.randn(N, 3, S, S, generator=g),
                "strong2": torch.randn(N, 3, S, S, generator=g), "ignore": ignore, "box1": box, "box2": box.flip(-1)}

    pasted = torch.zeros(N, S, S, dtype=torch.uint8)
    pasted[0, 2:10, 3:9] = 1
    # box and pseudo: selftrain's mixed batches mark and CutMix their pseudo-labelled images; others ignore them
    labeled = {"image": torch.randn(N, 3, S, S, generator=g), "mask": torch.randint(0, K, (N, S, S), generator=g),
               "box": pasted, "pseudo": torch.tensor([True, False])}
    return labeled, unl(), unl()


def make(name: str, backbone: str = "resnet18", decoder: str = "standard", **overrides):
    torch.manual_seed(0)
    overrides = {**SMALL_SAMPLING.get(name, {}), **overrides}
    cls = get_method(name)
    return cls(cls.Config(**overrides), ModelConfig(backbone=backbone, pretrained="none", decoder=decoder), K,
               cross_entropy).train()


CTX = StepContext(iteration=0, epoch=0, total_iters=10, iters_per_epoch=5)


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
@pytest.mark.parametrize("name", list(METHODS))
def test_one_step_returns_finite_named_losses(name, backbone):
    assert_one_step_trains(make(name, backbone))


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_steps_on_the_light_decoder(name):
    """--decoder light (depthwise-separable head) on the encoder it is meant for: every forward variant the
    methods use (FP decoding, PS-MT's decoder input, CIF, hooks on the fuse convolutions) runs and trains."""
    method = make(name, "efficientnet_lite0", decoder="light")
    assert method.model.fuse[0][0].groups == 304  # the depthwise convolution really is there
    assert_one_step_trains(method)


def assert_one_step_trains(method) -> None:
    losses = method(*batches(), CTX)
    assert "loss" in losses and losses["loss"].requires_grad
    assert all(torch.isfinite(v).all() for v in losses.values())
    losses["loss"].backward()
    trained = [p for net in method.trained_networks() for p in net.parameters()]
    assert sum(p.grad is not None and p.grad.abs().sum() > 0 for p in trained) > 0.9 * len(trained)


def test_scalematch_cif_learns_from_labels_only():
    # Labels all ignored: only unlabelled losses remain, and none of them may reach CIF.
    method = make("scalematch", conf_thresh=0.0, warmup_epochs=0)
    labeled, unl, partner = batches()
    labeled["mask"].fill_(255)
    losses = method(labeled, unl, partner, CTX)
    assert losses["loss_isvc"] > 0 and losses["loss_fsvc"] > 0 and losses["loss_s"] > 0
    losses["loss"].backward()
    cif_grads = [p.grad for p in method.model.cif.parameters()]
    assert all(g is None or g.abs().max() == 0 for g in cif_grads)
    assert method.model.encoder.layer1[0].conv1.weight.grad.abs().sum() > 0
    # With labels, CIF does receive gradient (through the fused labelled prediction).
    method.zero_grad()
    method(*batches(), CTX)["loss"].backward()
    assert sum(p.grad.abs().sum() for p in method.model.cif.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("epoch,expect", [(0, "ori"), (2, "ori"), (3, "joint"), (7, "joint")])
def test_scalematch_switches_to_fused_labels_at_warmup(monkeypatch, epoch, expect):
    method = make("scalematch", warmup_epochs=3)
    seen = {}
    real_forward, real_labels = method.two_scale_forward, scalematch_module.pseudo_labels

    def spy_forward(x, v, fs, plain=0, **kw):
        seen["out"] = real_forward(x, v, fs, plain, **kw)
        return seen["out"]

    def spy_labels(logits):
        seen["source"] = logits
        return real_labels(logits)

    monkeypatch.setattr(method, "two_scale_forward", spy_forward)
    monkeypatch.setattr(scalematch_module, "pseudo_labels", spy_labels)
    method(*batches(), StepContext(epoch * 5, epoch, 50, 5))
    assert torch.equal(seen["source"], seen["out"][expect][N:])


def test_scalematch_scale_pairs():
    # The released training logs: t in {0.75, 1.0} when v > 1 and {1.0, 1.25} when v < 1, so CIF also
    # sees the unscaled features that multi-scale inference feeds it.
    method = make("scalematch")
    draws = {method.draw_scales() for _ in range(400)}
    assert {v for v, _ in draws} == {0.25, 0.5, 1.5, 2.0}
    assert {fs for v, fs in draws if v > 1} == {0.75, 1.0}
    assert {fs for v, fs in draws if v < 1} == {1.0, 1.25}
    assert draws == {(v, t) for v, t, _ in method.scale_draws()}  # the pairs the benchmarks replay and weigh


@pytest.mark.parametrize("feature_scale", [0.75, 1.0])
def test_scalematch_supervises_the_plain_path(feature_scale):
    """The labelled loss also reaches the unscaled-feature prediction that single-scale inference runs,
    whatever feature scale the step drew; weight 0 restores the official fused-only loss."""
    method = make("scalematch", conf_thresh=1.01)
    method.draw_scales = lambda: (2.0, feature_scale)
    labeled, unl, partner = batches()
    x = torch.cat([labeled["image"], unl["weak"]])
    torch.manual_seed(7)
    losses = method(labeled, unl, partner, CTX)
    if feature_scale == 1.0:  # the clean half of the FP decode is the plain path (same dropout draws)
        torch.manual_seed(7)
        plain = method.model.forward_fp(x, 1.0, method.cfg.fp_dropout)[0][:N]
    else:
        c1, c4 = method.model.encode(x)
        plain = torch.nn.functional.interpolate(method.model.decode(c1[:N], c4[:N])[0], size=(S, S),
                                                mode="bilinear", align_corners=True)
    assert torch.isclose(losses["loss_x_plain"], cross_entropy(plain, labeled["mask"]), atol=1e-5)
    assert torch.isclose(losses["loss"], (losses["loss_x"] + losses["loss_x_plain"]) / 2)
    official = make("scalematch", conf_thresh=1.01, plain_sup_weight=0.0)
    official.draw_scales = lambda: (2.0, feature_scale)
    losses = official(labeled, unl, partner, CTX)
    assert losses["loss_x_plain"] == 0 and torch.isclose(losses["loss"], losses["loss_x"] / 2)


# Losses and per-module sums of |gradient| of one step, produced by main's code (commit f80fd48, before the
# labelled images' unused FP logits stopped being resized) with OMP_NUM_THREADS=1: the leaner step must
# compute the same numbers. Cases: (method, image scale v, feature scale t, epoch); epoch 12 is past
# ScaleMatch's warm-up, so its pseudo-labels come from the CIF-fused prediction. They were produced on an
# AVX-512 CPU. Other kernels round differently: on AVX2 (and with ATen's scalar kernels) the losses moved by
# up to 9e-6 relative, hence 1e-4; the gradient sums by up to 8e-4, hence 2e-3, except the encoder's at
# scale 0.5 (9e-3: the 16-pixel view leaves its stride-16 batch norm four values per channel), hence 2e-2
# there. A changed loss weight moves a loss past 1e-4; a wrongly detached term moves some module's sum past
# 2e-3 (detaching loss_s at scale 0.5: the classifier's by 0.2).
STEP_REFERENCE = {
    ("unimatch", None, None, 0): (
        {"loss": 1.2176674604415894, "loss_x": 1.448349952697754, "loss_s": 1.1196380853652954,
         "loss_fp": 0.8543318510055542, "mask_ratio": 0.875},
        {"encoder": 12016.191696694437, "aspp": 2704.431199907062, "reduce": 6.974399857419485,
         "fuse": 3111.846796912697, "classifier": 47.32186982932035}),
    ("scalematch", 2.0, 0.75, 0): (
        {"loss": 2.006641149520874, "loss_x": 1.4559496641159058, "loss_x_plain": 1.4710566997528076,
         "loss_s": 1.1707515716552734, "loss_isvc": 1.1068781614303589, "loss_fsvc": 1.0337375402450562,
         "mask_ratio": 0.875},
        {"encoder": 27837.969959045262, "aspp": 4224.146042364298, "reduce": 8.3114734250521,
         "fuse": 3517.3123134392563, "classifier": 24.361940018367022, "cif": 8.595690203602913}),
    ("scalematch", 0.5, 1.25, 0): (
        {"loss": 1.9688153266906738, "loss_x": 1.4704601764678955, "loss_x_plain": 1.4710566997528076,
         "loss_s": 1.1570245027542114, "loss_isvc": 1.069959282875061, "loss_fsvc": 0.8787357211112976,
         "mask_ratio": 0.875},
        {"encoder": 80690.67658354845, "aspp": 4311.777402393385, "reduce": 8.930999607437116,
         "fuse": 3758.8252337044755, "classifier": 38.59509867569432, "cif": 11.817264051912462}),
    ("scalematch", 1.5, 1.0, 12): (
        {"loss": 1.909516453742981, "loss_x": 1.445369005203247, "loss_x_plain": 1.448349952697754,
         "loss_s": 1.1348850727081299, "loss_isvc": 0.8959575295448303, "loss_fsvc": 0.8352065086364746,
         "mask_ratio": 0.875},
        {"encoder": 17659.938430739345, "aspp": 3427.6231977421808, "reduce": 8.12262094343896,
         "fuse": 3748.744086850589, "classifier": 49.35278430208564, "cif": 5.1757085951314785}),
}
GRAD_REL = {("scalematch", 0.5, 1.25, 0, "encoder"): 2e-2}  # the gradient sum the 16-pixel view makes noisy


@pytest.fixture
def one_thread():
    """The reference numbers were computed on one thread; reductions split over more threads round differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", list(STEP_REFERENCE), ids=lambda c: "-".join(map(str, c)))
def test_step_losses_and_gradients_equal_mains(case, one_thread):
    name, v, fs, epoch = case
    method = make(name, conf_thresh=0.0)
    if v is not None:
        method.draw_scales = lambda: (v, fs)
    torch.manual_seed(3)
    losses = method(*batches(), StepContext(iteration=0, epoch=epoch, total_iters=10, iters_per_epoch=5))
    losses["loss"].backward()
    want_losses, want_grads = STEP_REFERENCE[case]
    assert {k: float(t.detach()) for k, t in losses.items() if k != "scale"} == pytest.approx(want_losses, rel=1e-4)
    grads = {part: float(sum(p.grad.double().abs().sum() for p in getattr(method.model, part).parameters()))
             for part in want_grads}
    off = {part: (grads[part], want) for part, want in want_grads.items()
           if grads[part] != pytest.approx(want, rel=GRAD_REL.get((*case, part), 2e-3))}
    assert not off, off


def test_unimatch_loss_weights_and_normalisation():
    # Nothing passes tau > 1: every unlabelled term is exactly 0, so the total is L_x / 2.
    method = make("unimatch", conf_thresh=1.01)
    losses = method(*batches(), CTX)
    assert losses["loss_s"] == 0 and losses["loss_fp"] == 0
    assert torch.isclose(losses["loss"], losses["loss_x"] / 2)


def test_pseudo_label_loss_divides_by_valid_not_confident_pixels():
    logits = torch.zeros(1, 2, 2, 2)
    label = torch.zeros(1, 2, 2, dtype=torch.long)
    conf = torch.tensor([[[0.99, 0.5], [0.99, 0.99]]])
    ignore = torch.tensor([[[0, 0], [0, 255]]])
    # per-pixel CE = log 2; confident and valid: 2 pixels; valid: 3 pixels
    assert torch.isclose(pseudo_label_loss(logits, label, conf, ignore, 0.95), torch.log(torch.tensor(2.0)) * 2 / 3)


def test_ohem_keeps_hard_pixels():
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 0, 0, :2] = 10  # easy pixels (class 0 confident and correct)
    target = torch.zeros(1, 1, 4, dtype=torch.long)
    assert ohem_cross_entropy(logits, target, thresh=0.7, min_kept=1) == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-4)


def test_balanced_class_weights_by_hand():
    # shares 0.9 / 0.1 / 0: 1/sqrt(share) = 1.054, 3.162; their pixel-weighted mean 1.265 becomes 1
    w = balanced_class_weights([900, 100, 0])
    assert w[:2].tolist() == pytest.approx([0.8333, 2.5], abs=1e-4)
    assert float(0.9 * w[0] + 0.1 * w[1]) == pytest.approx(1.0)
    assert w[2] == w[1]  # a class with no labelled pixel gets the largest weight
    assert balanced_class_weights([5, 5]).tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="at least one labelled pixel"):
        balanced_class_weights([0, 0])


def test_weighted_cross_entropy_is_the_weighted_mean_over_valid_pixels():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).T.reshape(1, 2, 1, 3)
    target = torch.tensor([[[0, 1, 255]]])
    weight = torch.tensor([1.0, 3.0])
    ce = -torch.log_softmax(logits, 1)[0, :, 0]  # [class, pixel]
    expected = (1.0 * ce[0, 0] + 3.0 * ce[1, 1]) / (1.0 + 3.0)
    assert cross_entropy(logits, target, weight) == pytest.approx(float(expected))
    assert ohem_cross_entropy(logits, target, min_kept=10, weight=weight) == pytest.approx(float(expected))
    assert cross_entropy(logits, target) == pytest.approx(float((ce[0, 0] + ce[1, 1]) / 2))


def test_cutmix_mixing_of_targets():
    box = torch.zeros(1, 2, 2, dtype=torch.uint8)
    box[0, 0, 0] = 1
    label, p_label = torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2, dtype=torch.long)
    conf, p_conf = torch.full((1, 2, 2), 0.1), torch.full((1, 2, 2), 0.9)
    ign, p_ign = torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 255)
    lab, cf, ig = mixed_targets(box, conf, label, ign, p_conf, p_label, p_ign)
    assert lab.tolist() == [[[1, 0], [0, 0]]] and ig[0, 0, 0] == 255 and cf[0, 1, 1] == pytest.approx(0.1)
    img = paste(box, torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    assert img[0, :, 0, 0].tolist() == [1, 1, 1] and img[0, :, 1, 1].tolist() == [0, 0, 0]


def test_mean_teacher_ema_and_no_teacher_gradients():
    method = make("meanteacher", ema_decay=0.9)
    losses = method(*batches(), CTX)
    losses["loss"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.teacher.parameters()]
    student = [p.clone() for p in method.model.parameters()]
    ctx = StepContext(iteration=100, epoch=0, total_iters=200, iters_per_epoch=5)
    method.after_step(ctx)
    for t, t0, s in zip(method.teacher.parameters(), before, student):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-6)
    assert method.inference_model() is method.teacher
    # the warm-up of the decay: at the first step the teacher copies most of the student
    method2 = make("meanteacher", ema_decay=0.99)
    with torch.no_grad():
        for p in method2.model.parameters():
            p.add_(1.0)
    method2.after_step(StepContext(0, 0, 10, 5))
    t = next(method2.teacher.parameters())
    s = next(method2.model.parameters())
    assert torch.allclose(t, s - 0.5, atol=1e-6)  # alpha = min(1 - 1/2, 0.99) = 0.5


def test_mean_teacher_consistency_rampup():
    method = make("meanteacher", rampup=0.5, unsup_weight=2.0)
    weights = [method.consistency_weight(StepContext(i, 0, 10, 5)) for i in range(10)]
    assert weights[0] == pytest.approx(2.0 * torch.exp(torch.tensor(-5.0)).item())
    assert weights == sorted(weights) and weights[5] == 2.0


def test_cps_networks_are_distinct_and_both_trained():
    method = make("cps")
    w1 = method.model.classifier.weight
    w2 = method.model2.classifier.weight
    assert not torch.equal(w1, w2)
    losses = method(*batches(), CTX)
    losses["loss"].backward()
    assert w1.grad.abs().sum() > 0 and w2.grad.abs().sum() > 0
    groups = method.param_groups(0.01, 10)
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in method.parameters())
    assert method.inference_model() is method.model


def test_cps_without_cutmix_supervises_all_images():
    method = make("cps", cutmix=False)
    assert not method.needs_partner
    labeled, unl, _ = batches()
    losses = method(labeled, unl, None, CTX)
    assert torch.isfinite(losses["loss_cps"]) and losses["loss_cps"] > 0
