"""`scaleseg pretrain`: the geometry that matches dense cells across views, the BYOL target, and the weights file."""
import numpy as np
import pytest
import torch

from training.cli import main
from training.models.encoders.resnet import ResNetEncoder
from training.pretrain import DenseBYOL, PretrainConfig, correspondence, sample_crop, target_momentum


def test_cells_of_one_crop_map_onto_themselves_or_their_mirror():
    box = torch.tensor([[10.0, 20.0, 50.0, 60.0]])
    no, yes = torch.tensor([False]), torch.tensor([True])
    grid, valid = correspondence(box, no, box, no, 4)
    centres = (torch.arange(4) + 0.5) / 4 * 2 - 1
    assert valid.all()
    assert torch.allclose(grid[0, :, :, 0], centres[None].expand(4, 4)) and torch.allclose(grid[0, :, :, 1], centres[:, None].expand(4, 4))
    grid, _ = correspondence(box, no, box, yes, 4)  # same crop, mirrored: columns reverse
    assert torch.allclose(grid[0, :, :, 0], centres.flip(0)[None].expand(4, 4))


def test_only_cells_inside_the_other_crop_count():
    a = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    right_half = torch.tensor([[20.0, 0.0, 60.0, 40.0]])
    apart = torch.tensor([[100.0, 100.0, 140.0, 140.0]])
    flip = torch.tensor([False])
    _, valid = correspondence(a, flip, right_half, flip, 4)
    assert valid[0].tolist() == [[False, False, True, True]] * 4
    # a's cell (row 1, col 3) sits at image (35, 15): 15/40 of the way across right_half, 15/40 down
    grid, _ = correspondence(a, flip, right_half, flip, 4)
    assert torch.allclose(grid[0, 1, 3], torch.tensor([15 / 40 * 2 - 1, 15 / 40 * 2 - 1]))
    assert not correspondence(a, flip, apart, flip, 4)[1].any()


def test_random_crops_cover_the_asked_area_inside_the_image():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0, x1, y1 = sample_crop(120, 80, rng, (0.3, 1.0))
        assert 0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 80
        assert (x1 - x0) * (y1 - y0) <= 120 * 80 + 1e-6 and (x1 - x0) * (y1 - y0) >= 0.3 * 120 * 80 * 0.74


def test_target_network_is_an_ema_with_no_gradient():
    torch.manual_seed(0)
    model = DenseBYOL(PretrainConfig(data="", hidden_dim=32, proj_dim=16))
    n = 2
    batch = {"a": torch.randn(n, 3, 64, 64), "b": torch.randn(n, 3, 64, 64),
             "box_a": torch.tensor([[0.0, 0, 64, 64]] * n), "box_b": torch.tensor([[16.0, 16, 64, 64]] * n),
             "flip_a": torch.tensor([False] * n), "flip_b": torch.tensor([True] * n)}
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values()) and 0 < losses["overlap"] < 1
    losses["loss"].backward()
    assert all(p.grad is None for p in model.target.parameters())
    assert model.online.encoder.stem[0].weight.grad.abs().sum() > 0
    before = model.target.encoder.stem[0].weight.clone()
    with torch.no_grad():
        model.online.encoder.stem[0].weight.add_(1.0)
    model.update_target(0.9)
    assert torch.allclose(model.target.encoder.stem[0].weight, 0.9 * before + 0.1 * model.online.encoder.stem[0].weight)
    assert target_momentum(0.99, 0, 100) == pytest.approx(0.99) and target_momentum(0.99, 100, 100) == pytest.approx(1.0)


def test_pretrain_writes_weights_that_train_loads(tiny_data, tmp_path, capsys):
    out = tmp_path / "pre"
    argv = ["pretrain", str(tiny_data), "--out", str(out), "--iters", "3", "--batch-size", "4", "--crop", "32",
            "--num-workers", "0", "--device", "cpu", "--log-every", "1", "--hidden-dim", "32", "--proj-dim", "16"]
    assert main(argv) == 0
    weights = out / "encoder.pth"
    trained = ResNetEncoder("resnet18", 16, str(weights))
    torch.manual_seed(0)
    fresh = ResNetEncoder("resnet18", 16)
    assert not torch.equal(trained.stem[0].weight, fresh.stem[0].weight)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert "--pretrained" in capsys.readouterr().out
    assert main(argv) == 2 and "pass --force" in capsys.readouterr().err  # never overwrites silently
    assert main([argv[0], str(tmp_path / "nowhere"), *argv[2:]]) == 2
    assert "nowhere" in capsys.readouterr().err
