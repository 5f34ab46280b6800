"""PRCL, RankMatch and the Contextrast auxiliary loss: their formulas against hand or direct computation,
finite losses on tiny inputs, prototypes that survive --resume, torchrun and export."""
from __future__ import annotations

import itertools

import pytest
import torch

from training.methods import StepContext
from training.methods.rankmatch import orthogonal_agents, rank_correlation_loss, ranking_distributions

from .test_methods import CTX, batches, make


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
