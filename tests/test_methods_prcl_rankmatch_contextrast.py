"""PRCL, RankMatch and the Contextrast auxiliary loss: their formulas against hand or direct computation,
finite losses on tiny inputs, prototypes that survive --resume, torchrun and export."""
from __future__ import annotations

import gc
import itertools
import json
import math
import subprocess
import sys

import pytest
import torch

from export.package import export_package
from training.checkpoint import load_checkpoint
from training.config import AuxConfig, ConfigError, ModelConfig
from training.engine import Trainer
from training.methods import StepContext, build_aux
from training.methods.contextrast import anchor_infonce, bane_negatives, erosion_depth
from training.methods.prcl import mutual_likelihood_score
from training.methods.rankmatch import orthogonal_agents, rank_correlation_loss, ranking_distributions
from training.models import build_model

from .conftest import SMALL_SAMPLING, tiny_config
from .test_engine import env
from .test_methods import CTX, batches, make

SMALL_PRCL = SMALL_SAMPLING["prcl"]


# --- RankMatch ------------------------------------------------------------------------------------------
def test_rankmatch_ranking_distribution_by_hand():
    p_w = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p_s = torch.tensor([0.1, 0.2, 0.3, 0.4])
    rank_w, rank_s = ranking_distributions(p_w, p_s, k=2)
    # top-2 agents of p_w are 0 then 1; orderings (0,1), (1,0)
    assert torch.allclose(rank_w, torch.tensor([0.5 / 0.8, 0.3 / 0.8]))
    assert torch.allclose(rank_s, torch.tensor([0.1 / 0.3, 0.2 / 0.3]))
    rank_w, _ = ranking_distributions(p_w, p_s, k=3)
    orders = list(itertools.permutations(range(3)))
    assert orders[0] == (0, 1, 2) and orders[5] == (2, 1, 0)
    assert rank_w[0].item() == pytest.approx(0.5 / 0.95 * 0.3 / 0.45)
    assert rank_w[5].item() == pytest.approx(0.15 / 0.95 * 0.3 / 0.8)
    assert rank_w.sum().item() == pytest.approx(1.0)


def test_rankmatch_agents_are_near_orthogonal():
    e = torch.eye(3)
    pixels = torch.stack([e[0], e[0] + 0.1 * e[1], e[1], e[2]])  # two nearly parallel pixels
    feat = pixels.T.reshape(1, 3, 2, 2)
    for seed in range(8):
        torch.manual_seed(seed)
        chosen = set(orthogonal_agents(feat, 3)[0].tolist())
        assert {2, 3} <= chosen and len(chosen & {0, 1}) == 1
    assert orthogonal_agents(feat, 64).shape == (1, 4)  # never more agents than pixels


def test_rankmatch_correlation_loss_zero_for_identical_views_and_positive_otherwise():
    torch.manual_seed(0)
    f = torch.randn(2, 8, 4, 4)
    assert rank_correlation_loss(f, f.clone(), 6, 4).abs() < 1e-6
    assert rank_correlation_loss(f, torch.randn(2, 8, 4, 4), 6, 4) > 0


def test_rankmatch_is_unimatch_plus_the_correlation_term():
    labeled, unl, partner = batches()
    uni_method, rank = make("unimatch"), make("rankmatch", corr_weight=0.5)
    torch.manual_seed(3)
    uni = uni_method(labeled, unl, partner, CTX)
    torch.manual_seed(3)
    losses = rank(labeled, unl, partner, CTX)
    for key in ("loss_x", "loss_s", "loss_fp"):
        assert torch.equal(losses[key], uni[key]), key
    assert losses["loss_corr"] > 0
    assert torch.isclose(losses["loss"], uni["loss"] + 0.5 * losses["loss_corr"])
    losses["loss"].backward()
    assert rank.model.aspp.project[0].weight.grad.abs().sum() > 0


# --- PRCL -----------------------------------------------------------------------------------------------
def test_mls_matches_the_gaussian_likelihood_of_normalised_means():
    torch.manual_seed(0)
    mu0, mu1 = torch.randn(3, 5, 6), torch.randn(1, 5, 6)
    var0, var1 = torch.rand(3, 5, 6) + 0.1, torch.rand(1, 5, 6) + 0.1
    got = mutual_likelihood_score(mu0, mu1, var0, var1)
    a, b = mu0 / mu0.norm(dim=-1, keepdim=True), mu1 / mu1.norm(dim=-1, keepdim=True)
    # log N(a; b, s0 + s1) per dimension, averaged, without its constant -1/2 log(2 pi)
    direct = torch.distributions.Normal(b, (var0 + var1).sqrt()).log_prob(a).mean(-1) + 0.5 * math.log(2 * math.pi)
    assert got.shape == (3, 5) and torch.allclose(got, direct, atol=1e-5)
    by_hand = -0.5 * sum(((a[0, 0, d] - b[0, 0, d]) ** 2 / (var0[0, 0, d] + var1[0, 0, d])
                          + torch.log(var0[0, 0, d] + var1[0, 0, d])) for d in range(6)) / 6
    assert got[0, 0].item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_global_prototypes_are_the_precision_weighted_mean_of_every_pixel_seen():
    method = make("prcl", rep_dim=4)
    g = torch.Generator().manual_seed(0)
    steps = [(torch.randn(10, 4, generator=g), torch.rand(10, 4, generator=g) + 0.05,
              torch.tensor([0, 0, 1, 1, 1, 2, 0, 1, 2, 2])) for _ in range(2)]
    steps.append((torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g) + 0.05, torch.tensor([1, 1, 1])))
    for mu, var, labels in steps:
        method.update_prototypes(mu, var, labels)
    mu, var, labels = (torch.cat(t) for t in zip(*steps))
    for c in range(3):
        m, v = mu[labels == c], var[labels == c]
        closed_var = 1 / (1 / v).sum(0)
        closed_mu = closed_var * (m / v).sum(0)
        assert torch.allclose(method.proto_var[c], closed_var, rtol=1e-5)
        assert torch.allclose(method.proto_mu[c], closed_mu, rtol=1e-4, atol=1e-6)
    assert method.proto_seen.tolist() == [True, True, True, False]
    assert torch.equal(method.proto_var[3], torch.ones(4))  # never seen: untouched

    ema = make("prcl", rep_dim=4, prototype_update="momentum", prototype_momentum=0.9)
    first, second = steps[0], steps[2]
    ema.update_prototypes(*first)
    before = ema.proto_mu[1].clone()
    ema.update_prototypes(*second)
    v = second[1]
    batch_var = 1 / (1 / v).sum(0)
    assert torch.allclose(ema.proto_mu[1], 0.9 * before + 0.1 * batch_var * (second[0] / v).sum(0), atol=1e-6)


def test_prcl_losses_finite_with_virtual_negatives_and_teacher_exported():
    method = make("prcl")  # with SMALL_SAMPLING's caps
    for it in range(2):  # the second step has GDPs, hence virtual negatives
        losses = method(*batches(it), StepContext(it, 0, 10, 5))
        assert all(torch.isfinite(v).all() for v in losses.values())
        assert losses["loss_prcl"] > 0
    assert losses["prcl_weight"].item() == pytest.approx(math.exp(-5 * 0.1 ** 2))
    losses["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.unc_head.parameters())
    assert method.rep_head[0].weight.grad.abs().sum() > 0
    assert method.proto_seen.sum() >= 2
    # heads are training-only: the exported network is the teacher, a plain DeepLabV3+
    assert method.inference_model() is method.teacher
    assert not any("head" in k for k in method.inference_model().state_dict())
    groups = method.param_groups(0.01, 1.0)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in method.parameters() if p.requires_grad)
    assert groups[-1]["lr"] == pytest.approx(0.01 * 5e-5 / 3.2e-3)


def held_tensor_bytes() -> int:
    """Bytes of the distinct tensor storages Python objects reference now."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_prcl_keeps_no_candidate_tensors_between_forward_and_backward():
    """Every class's Q x (1 + N + V) x D candidates were kept for backward (9 GB at 21 classes, crop 48):
    what the forward leaves behind must not grow with the number of negatives beyond their indices."""
    held = {}
    for n in (16, 256):
        method = make("prcl", num_queries=32, num_negatives=n, num_virtual=2, rep_dim=64)
        g = torch.Generator().manual_seed(0)
        k = method.proto_mu.shape[0]
        mu = torch.randn(2, 64, 12, 12, generator=g, requires_grad=True)
        var = (torch.rand(2, 64, 12, 12, generator=g) + 0.1).requires_grad_()
        labels, prob = torch.randint(0, k, (2, 12, 12), generator=g), torch.full((2, k, 12, 12), 0.1)
        method.prcl_loss(mu, var, labels, prob)  # GDPs first, so the second call has virtual negatives too
        before = held_tensor_bytes()
        loss = method.prcl_loss(mu, var, labels, prob)
        held[n] = held_tensor_bytes() - before
        loss.backward()
        assert torch.isfinite(mu.grad).all() and mu.grad.abs().sum() > 0
    index_bytes = k * 32 * (256 - 16) * 8
    assert held[256] - held[16] < 2 * index_bytes, held


def test_prcl_checkpointed_loss_equals_the_direct_computation(monkeypatch):
    """Backward rebuilds each class's candidates (the virtual negatives from the restored RNG state): loss
    and gradients equal those of the same loss computed without checkpointing."""
    import training.methods.prcl as prcl

    def run():
        method = make("prcl", num_queries=16, num_negatives=32, num_virtual=2, rep_dim=32)
        g = torch.Generator().manual_seed(0)
        k = method.proto_mu.shape[0]
        mu = torch.randn(2, 32, 8, 8, generator=g, requires_grad=True)
        var = (torch.rand(2, 32, 8, 8, generator=g) + 0.1).requires_grad_()
        labels, prob = torch.randint(0, k, (2, 8, 8), generator=g), torch.rand(2, k, 8, 8, generator=g)
        torch.manual_seed(1)
        method.prcl_loss(mu, var, labels, prob)  # GDPs first: the second call draws virtual negatives
        loss = method.prcl_loss(mu, var, labels, prob)
        loss.backward()
        return loss.detach(), mu.grad, var.grad

    checkpointed = run()
    monkeypatch.setattr(prcl, "checkpoint", lambda fn, *args, use_reentrant: fn(*args))
    direct = run()
    assert checkpointed[1].abs().sum() > 0
    for a, b in zip(checkpointed, direct):
        assert torch.equal(a, b)


def test_prcl_exact_resume_restores_the_prototypes(tiny_data, tmp_path, monkeypatch):
    def config(out):
        cfg = tiny_config(tiny_data, out, "prcl", **SMALL_PRCL)
        cfg.run.eval_every = 4
        return cfg

    Trainer(config(tmp_path / "straight"), progress=False).fit()

    real_save = Trainer._save

    def save_then_die(self, name, payload=None):
        real_save(self, name, payload)
        if name == "last.pt" and self.iteration == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config(tmp_path / "killed"), progress=False).fit()
    monkeypatch.setattr(Trainer, "_save", real_save)
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["iteration"] == 2
    resumed = config(tmp_path / "killed")
    resumed.run.resume = True
    Trainer(resumed, progress=False).fit()

    a, b = (load_checkpoint(tmp_path / run / "last.pt")["method_state"] for run in ("straight", "killed"))
    assert a["proto_seen"].sum() >= 2 and not torch.equal(a["proto_var"], torch.ones_like(a["proto_var"]))
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


# --- Contextrast ----------------------------------------------------------------------------------------
def test_bane_picks_the_false_positives_nearest_the_error_edge():
    label = torch.zeros(1, 9, 9, dtype=torch.long)
    pred = torch.zeros(1, 9, 9, dtype=torch.long)
    pred[0, 2:7, 2:7] = 1  # a 5x5 false-positive region of class 1 inside class 0
    label[0, 8, 8], pred[0, 8, 8] = 1, 0  # a missed class-1 pixel: a negative of class 0, never of class 1
    allowed = label != 255
    assert erosion_depth(pred == 1)[0, 2:7, 4].tolist() == [1, 2, 3, 2, 1]
    picked = bane_negatives(pred, label, 1, allowed, 0.5)[0]
    ring = torch.zeros(9, 9, dtype=torch.bool)
    ring[2:7, 2:7] = True
    ring[3:6, 3:6] = False  # 16 edge pixels: distances 1 (16), 2 (8), 3 (1); the median is 1
    assert torch.equal(picked, ring)
    assert torch.equal(bane_negatives(pred, label, 1, allowed, 1.0)[0], pred[0] == 1)
    assert bane_negatives(pred, label, 0, allowed, 0.5)[0].nonzero().tolist() == [[8, 8]]
    allowed[0, 2, 2] = False  # ignored pixels are never negatives
    assert not bane_negatives(pred, label, 1, allowed, 0.5)[0, 2, 2]


def test_pixel_to_anchor_infonce_by_hand():
    anchor = torch.tensor([1.0, 0.0])
    pos = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    tau = 0.5
    by_hand = sum(-math.log(math.exp(p / tau) / (math.exp(p / tau) + math.exp(0.0) + math.exp(-1 / tau)))
                  for p in (0.6, 1.0)) / 2
    assert anchor_infonce(anchor, pos, neg, tau).item() == pytest.approx(by_hand, rel=1e-6)


def with_contextrast(name: str, **aux):
    method = make(name)
    method.aux = build_aux(AuxConfig(aux="contextrast", **aux), method.model, 4)
    return method


@pytest.mark.parametrize("name", ["fixmatch", "scalematch", "supervised"])
def test_contextrast_adds_finite_losses_to_any_method(name):
    method = with_contextrast(name, contrast_min_pixels=1)
    labeled, unl, partner = batches()
    unl["ignore"].zero_()
    losses = method(labeled, unl, partner, StepContext(5, 1, 10, 5))
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert losses["loss_ctr_l"] > 0
    assert ("loss_ctr_u" in losses) == (name != "supervised")
    losses["loss"].backward()
    for head in method.aux.heads:
        assert head[0].weight.grad.abs().sum() > 0
    groups = method.param_groups(0.01, 10.0)
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in method.trained_networks()[0].parameters()) + \
        sum(1 for _ in method.aux.parameters()) + sum(1 for _ in method.trained_networks()[1:] for _ in _.parameters())
    assert not any(k.startswith("aux") or "heads" in k for k in method.inference_model().state_dict())
    assert method.aux.bank_seen.any() == (name != "supervised")


def test_contextrast_unknown_aux_and_bad_level_weights_are_config_errors():
    method = make("fixmatch")
    with pytest.raises(ConfigError, match="--aux 'contrast'"):
        build_aux(AuxConfig(aux="contrast"), method.model, 4)
    with pytest.raises(ConfigError, match="--contrast-level-weights"):
        build_aux(AuxConfig(aux="contextrast", contrast_level_weights=(1.0,)), method.model, 4)


# --- the CLI under torchrun, then export -----------------------------------------------------------------
DDP_RUNS = {
    "prcl": ["--method", "prcl", "--num-queries", "8", "--num-negatives", "16", "--num-virtual", "2"],
    "rankmatch": ["--method", "rankmatch"],
    "fixmatch+contextrast": ["--method", "fixmatch", "--aux", "contextrast", "--contrast-min-pixels", "1"],
    "scalematch+contextrast": ["--method", "scalematch", "--aux", "contextrast", "--aux-weight", "0.2"],
}
# One run on the ImageNet Lite0 encoder (its weights ship with scaleseg), so torchrun covers both encoder families.
DDP_ENCODER = {"scalematch+contextrast": ("efficientnet_lite0", "imagenet")}


@pytest.mark.parametrize("run", list(DDP_RUNS))
def test_torchrun_two_processes_then_export_with_parity(tiny_data, tmp_path, run):
    out = tmp_path / "ddp"
    backbone, weights = DDP_ENCODER.get(run, ("resnet18", "none"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.cli", "train", str(tiny_data), *DDP_RUNS[run], "--backbone", backbone, "--pretrained", weights, "--crop-size", "32",
           "--batch-size", "2", "--max-iters", "2", "--eval-every", "2", "--num-workers", "0", "--device", "cpu",
           "--out", str(out)]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["iteration"] == 2 and len(ckpt["rng"]) == 2
    state = ckpt["method_state"]
    heads = [k for k in state if k.startswith(("aux.", "rep_head.", "unc_head.", "proto_"))]
    assert bool(heads) == (run != "rankmatch"), "the training-only parts are trained and saved (RankMatch has none)"
    plain = build_model(ModelConfig(backbone=backbone, pretrained="none"), 5, cif=run.startswith("scalematch"))
    assert ckpt["inference"]["state_dict"].keys() == plain.state_dict().keys()  # export: the plain network
    if run == "prcl":
        assert state["proto_seen"].sum() >= 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    key = {"prcl": "loss_prcl", "rankmatch": "loss_corr"}.get(run, "loss_ctr_l")
    assert all(key in r for r in records if "loss" in r)

    pkg = tmp_path / "pkg"
    export_package(out / "last.pt", pkg, data=tiny_data, progress=lambda m: None)
    meta = json.loads((pkg / "meta.json").read_text())
    assert meta["parity"]["passed"] and meta["method"] == run.split("+")[0] and meta["backbone"] == backbone
