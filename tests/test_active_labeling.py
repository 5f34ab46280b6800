"""Diversity-aware selection, the labelling-effort metric and the oracle simulation (`scaleseg label simulate`)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from app import acquisition
from app.cli import main as label_main
from app.labeling import effort_by_version, labeling_effort
from app.scoring import select_next
from app.simulate import SimulationError, simulate
from training.data.folder import read_split

# --- selection on hand-made features ---------------------------------------------------------------------
POOL = np.array([[0, 0.1], [0, 0.2], [10, 0], [10, 0.1], [0, 10], [5, 5]])


def test_coreset_picks_the_points_farthest_from_everything_chosen():
    # from the labelled point (0, 0): (10, 0.1) is farthest; then (0, 10); then (5, 5), about 7 from both;
    # the near-duplicates of the labelled point and of the first pick are never taken
    assert acquisition.k_center_greedy(POOL, 3, labeled=np.array([[0.0, 0.0]])) == [3, 4, 5]
    # without labelled images the first pick is the point farthest from the pool's mean (4.2, 2.6): (0, 10)
    assert acquisition.k_center_greedy(POOL, 1) == [4]
    # identical features still give k distinct images
    assert sorted(acquisition.k_center_greedy(np.ones((4, 3)), 3)) == [0, 1, 2]
    assert acquisition.k_center_greedy(POOL, 0) == [] and len(acquisition.k_center_greedy(POOL, 99)) == 6


def test_combined_takes_the_most_uncertain_image_of_each_cluster():
    # three groups of near-duplicates; uncertainty alone would take all three of the first group
    features = np.array([[0, 0], [0, 0.1], [0.1, 0], [10, 10], [10, 10.1], [-10, 10]], float)
    scores = np.array([0.9, 0.95, 0.8, 0.3, 0.5, 0.1])
    assert sorted(np.argsort(-scores)[:3].tolist()) == [0, 1, 2]
    assert acquisition.uncertain_per_cluster(features, scores, 3) == [1, 4, 5]
    # duplicates leave fewer clusters than k: the most uncertain of the rest fill up
    assert acquisition.uncertain_per_cluster(np.zeros((4, 2)), np.array([0.1, 0.4, 0.3, 0.2]), 2) == [1, 2]


def test_diversity_strategies_select_from_the_package(package, tiny_data):
    labeled = set(read_split(tiny_data, "labeled"))
    for function in acquisition.DIVERSITY:
        scored, picks = select_next(package, tiny_data, function, 4)
        assert len(scored) == 12 and all(s.features is not None and s.features.shape == (512,) for s in scored)
        assert np.allclose([np.linalg.norm(s.features) for s in scored], 1, atol=1e-5)
        ids = [p.image_id for p in picks]
        assert len(set(ids)) == 4 and not set(ids) & labeled
    entropy = {s.image_id: s.score for s in select_next(package, tiny_data, "entropy", 1)[0]}
    combined = {s.image_id: s.score for s in select_next(package, tiny_data, "combined", 1)[0]}
    assert combined == pytest.approx(entropy)  # combined ranks each cluster by entropy


def test_app_and_cli_offer_the_diversity_strategies(package, data_copy, tmp_path):
    from app.cli import parser
    from app.ui import App

    app = App(package, data_copy, tmp_path / "work")
    for function in acquisition.DIVERSITY:
        gallery, table, message = app.rank(function, 3, 1.0)
        assert len(gallery) == 3 and len({row[0] for row in table}) == 3
        assert f"Selected 3 of 12 unlabelled images by {function}" in message
        assert parser().parse_args(["push", str(package), str(data_copy), "--function", function]).function == function


def test_push_takes_the_model_optionally(tmp_path):
    from app.cli import parse

    model, data = tmp_path / "model", tmp_path / "data"
    for argv in (["push", str(model), str(data)], ["push", str(model), "-k", "3", str(data)],
                 ["push", "-k", "3", str(model), str(data)]):  # every order that parsed before the model was optional
        args = parse(argv)
        assert (args.model, args.data, args.function) == (model, data, "entropy")
    args = parse(["push", str(data), "-k", "3"])
    assert (args.model, args.data, args.function, args.top_k) == (None, data, "coreset", 3)
    assert parse(["push", str(data), "--function", "random"]).function == "random"
    for function in ("margin", "combined"):  # refused before Label Studio is contacted
        with pytest.raises(SystemExit, match=f"--function {function} needs a model's predictions; pass a model package"):
            parse(["push", str(data), "--function", function])
    with pytest.raises(SystemExit):
        parse(["push", str(model), str(data), "extra"])


def test_cold_start_selects_by_imagenet_features_or_at_random(data_copy):
    from PIL import Image

    from app.features import EncoderFeatures
    from app.scoring import select_without_model
    from training.data.folder import find_image, write_split

    data = data_copy
    # three near-copies of one pool image (one pixel changed): covering the pool never takes two of them
    with Image.open(find_image(data, read_split(data, "unlabeled")[0])) as img:
        base = np.array(img.convert("RGB"))
    twins = []
    for n in range(3):
        twin = base.copy()
        twin[n, n] = 255 - twin[n, n]
        Image.fromarray(twin).save(data / "images" / f"twin_{n}.png")
        twins.append(f"twin_{n}")
    pool = read_split(data, "unlabeled") + twins
    write_split(data, "unlabeled", pool)
    encoder = EncoderFeatures.pretrained()
    assert encoder.encoder.weights_source.startswith("ImageNet")
    steps = []
    picks = select_without_model(data, "coreset", 6, encoder=encoder, progress=lambda f, m: steps.append(m))
    assert len(set(picks)) == 6 and set(picks) <= set(pool) and len(set(picks) & {read_split(data, "unlabeled")[0], *twins}) <= 1
    assert len(steps) == len(pool) + len(read_split(data, "labeled"))  # every pool and labelled image, one step each
    # images already sent for labelling are never picked again, and the next picks keep away from them
    again = select_without_model(data, "coreset", 3, chosen=picks, encoder=encoder)
    assert len(again) == 3 and not set(again) & set(picks)
    drawn = select_without_model(data, "random", 4, seed=3, chosen=picks)
    assert drawn == select_without_model(data, "random", 4, seed=3, chosen=picks) and not set(drawn) & set(picks)
    assert len(select_without_model(data, "random", 99)) == len(pool)
    for function in ("entropy", "combined"):
        with pytest.raises(ValueError, match=f"--function {function} needs a model's predictions; pass a model package"):
            select_without_model(data, function, 2)


# --- labelling effort ---------------------------------------------------------------------------------------
def test_labeling_effort_on_a_hand_made_case():
    pre = np.array([[0, 0, 1], [1, 2, 2]], np.uint8)
    final = np.array([[0, 1, 1], [255, 2, 0]], np.uint8)
    # 5 labelled pixels (255 is not counted); the labeller changed (0, 1) 0 -> 1 and (1, 2) 2 -> 0
    assert labeling_effort(pre, final) == pytest.approx(2 / 5)
    assert labeling_effort(pre, pre) == 0.0 and labeling_effort(pre, np.full_like(pre, 255)) is None
    with pytest.raises(ValueError, match="same image size"):
        labeling_effort(pre, final[:1])
    state = {"pulled": {"a": {"effort": 0.2, "model_version": "v1"}, "b": {"effort": 0.4, "model_version": "v1"},
                        "c": {"effort": 0.1, "model_version": "v2"}, "d": {"effort": None, "model_version": "v2"},
                        "e": {"annotation_id": 3}}}
    assert effort_by_version(state) == {"v1": (pytest.approx(0.3), 2), "v2": (pytest.approx(0.1), 1)}


# --- the simulation -------------------------------------------------------------------------------------------
TINY = ["--strategies", "random,coreset", "--initial", "2", "-k", "2", "--rounds", "1", "--iters", "2",
        "--initial-iters", "3", "--crop-size", "32", "--batch-size", "2", "--backbone", "resnet18", "--pretrained", "none"]


def settings(**changes) -> dict:
    base = {"strategies": ["random", "coreset"], "initial": 2, "k": 2, "rounds": 1, "method": "supervised", "iters": 2,
            "initial_iters": 3, "init_from": "", "crop_size": 32, "batch_size": 2, "backbone": "resnet18", "pretrained": "none", "lr": 0.01, "balance": 1.0, "seed": 0,
            "device": "cpu"}
    return {**base, **changes}


def test_simulation_curve_and_resume(tiny_data, tmp_path, monkeypatch, capsys):
    from training.engine import Trainer

    splits = {s: read_split(tiny_data, s) for s in ("labeled", "unlabeled", "val")}
    real_fit, trained = Trainer.fit, []

    def recorded(trainer):
        trained.append((trainer.out.relative_to(tmp_path / "whole").parts[0], trainer.total_iters))
        return real_fit(trainer)

    monkeypatch.setattr(Trainer, "fit", recorded)
    assert label_main(["simulate", str(tiny_data), "--out", str(tmp_path / "whole"), *TINY]) == 0
    monkeypatch.setattr(Trainer, "fit", real_fit)
    assert "simulation.png" in capsys.readouterr().out
    # round 0 is the same for every strategy: trained once, for --initial-iters; later rounds for --iters
    assert trained == [("initial", 3), ("random", 2), ("coreset", 2)]
    whole = json.loads((tmp_path / "whole" / "simulation.json").read_text())
    assert list(whole["curves"]) == ["random", "coreset"]
    assert whole["curves"]["random"][0]["miou"] == whole["curves"]["coreset"][0]["miou"]
    pool = set(splits["labeled"]) | set(splits["unlabeled"])
    for strategy, rows in whole["curves"].items():
        assert [r["labeled"] for r in rows] == [2, 4] and [r["round"] for r in rows] == [0, 1]
        assert all(0 <= r["miou"] <= 100 for r in rows)
        assert len(set(rows[0]["picks"])) == 2 and set(rows[0]["picks"]) <= pool and rows[1]["picks"] == []
        assert 0 <= rows[0]["effort"] <= 1 and rows[1]["effort"] is None
        # the last round trained on the initial images and the ones revealed
        revealed = read_split(tmp_path / "whole" / strategy / "data", "labeled")
        assert len(set(revealed)) == 4 and set(rows[0]["picks"]) <= set(revealed)
    assert {s: read_split(tiny_data, s) for s in splits} == splits  # DATA is never written
    table = (tmp_path / "whole" / "simulation.md").read_text()
    assert "| labelled | random | coreset |" in table and "| 4 |" in table
    assert (tmp_path / "whole" / "simulation.png").read_bytes()[:4] == b"\x89PNG"

    # killed while training round 1, after round 0 and its selection were recorded
    def killed(trainer):
        if "round1" in str(trainer.out):
            raise KeyboardInterrupt
        return real_fit(trainer)

    monkeypatch.setattr(Trainer, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        simulate(tiny_data, tmp_path / "resumed", settings(strategies=["coreset"]), progress=lambda m: None)
    assert not (tmp_path / "resumed" / "simulation.json").exists()
    monkeypatch.setattr(Trainer, "fit", real_fit)
    messages = []
    resumed = simulate(tiny_data, tmp_path / "resumed", settings(strategies=["coreset"]), progress=messages.append)
    assert messages[0] == "coreset round 1: training on 4 labelled images"  # round 0 is not trained again
    assert resumed["curves"]["coreset"] == whole["curves"]["coreset"]  # the curve of the run never interrupted


def test_simulation_refuses_what_it_cannot_run(tiny_data, tmp_path, capsys):
    with pytest.raises(SimulationError, match="need 20"):
        simulate(tiny_data, tmp_path / "a", settings(initial=10, k=5, rounds=2), progress=lambda m: None)
    with pytest.raises(SimulationError, match="--method scalematch"):
        simulate(tiny_data, tmp_path / "a", settings(strategies=["scale_disagreement"]), progress=lambda m: None)
    with pytest.raises(SimulationError, match="unknown strategies"):
        simulate(tiny_data, tmp_path / "a", settings(strategies=["psychic"]), progress=lambda m: None)
    with pytest.raises(SimulationError, match="no such checkpoint"):
        simulate(tiny_data, tmp_path / "a", settings(init_from=str(tmp_path / "none.pt")), progress=lambda m: None)
    with pytest.raises(SimulationError, match=r"--batch-size 0 \(must be 1 or more\); --crop-size 8"):
        simulate(tiny_data, tmp_path / "a", settings(batch_size=0, crop_size=8), progress=lambda m: None)
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "settings.json").write_text(json.dumps({**settings(iters=5), "data": str(tiny_data.resolve())}))
    assert label_main(["simulate", str(tiny_data), "--out", str(tmp_path / "b"), *TINY]) == 2
    assert "iters: 5 -> 2" in capsys.readouterr().err
