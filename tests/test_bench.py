"""The label-efficiency benchmark: the real-texture scene generator and the resumable study script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench.texture_scenes import CLASS_SOURCES, RADIUS_RANGE, render, synthesize_textures
from tests.conftest import tiny_config
from training.data.validate import check_dataset

REPO = Path(__file__).resolve().parents[1]


def test_texture_scenes_are_deterministic_multiscale_and_valid(tmp_path):
    a, b, other = render(3, 0, 96), render(3, 0, 96), render(3, 1, 96)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], other[0])
    masks = [render(i, 0, 96)[1] for i in range(80)]
    assert set(np.unique(np.stack(masks))) == set(range(len(CLASS_SOURCES) + 1))
    areas = [float((m == c).mean()) for m in masks for c in np.unique(m[m > 0])]
    # radii span 8x, so object areas span well over an order of magnitude
    assert RADIUS_RANGE[1] / RADIUS_RANGE[0] == 8 and max(areas) / min(areas) > 20
    data = synthesize_textures(tmp_path / "tex", 3, 2, 2, size=48, seed=0)
    assert check_dataset(data) == []


def object_chroma(variety: str, cid: int, n: int = 120) -> list[np.ndarray]:
    """Mean (R-G, B-Y) of every object of class ``cid`` wider than 6 px in the first ``n`` scenes."""
    out = []
    for i in range(n):
        img, mask = render(i, 0, 64, variety=variety)
        if (mask == cid).sum() > 36:
            rgb = img[mask == cid].astype(np.float32)
            out.append(np.array([(rgb[:, 0] - rgb[:, 1]).mean(), (rgb[:, 2] - rgb[:, :2].mean(1)).mean()]))
    return out


def test_recoloured_scenes_vary_colour_within_a_class_as_the_strong_view_does():
    """Cat fur keeps one colour family in ``textures``; ``recoloured`` turns its hue and greys some objects, so
    colour stops telling the classes apart while the masks stay valid."""
    fur = 1 + list(CLASS_SOURCES).index("fur")
    narrow, recoloured = object_chroma("narrow", fur), object_chroma("recoloured", fur)
    assert len(narrow) > 5 and len(recoloured) > 5
    spread = lambda chroma: float(np.linalg.norm(np.std(np.stack(chroma), 0)))  # noqa: E731
    assert spread(recoloured) > 2 * spread(narrow)
    # some objects are grey: only the per-channel gain of the scene noise is left (narrow: 30 or more)
    assert min(np.linalg.norm(c) for c in recoloured) < 12 < min(np.linalg.norm(c) for c in narrow)
    a, b = render(5, 0, 64, variety="recoloured"), render(5, 0, 64, variety="recoloured")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="variety 'bright': choose one of narrow, wide, recoloured"):
        render(0, 0, 64, variety="bright")


def study(work: Path, results: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "bench" / "label_efficiency.py"), "--benchmarks", "synthetic", "--fractions", "1/4",
           "--methods", "supervised", "--seeds", "0,1", "--iters", "6", "--eval-every", "3", "--pool", "8", "--n-val", "2",
           "--size", "48", "--crop", "32", "--batch", "2", "--work", str(work), "--results", str(results), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_label_efficiency_study_is_resumable_run_by_run(tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    first = study(work, results)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    payload = json.loads((results / "label_efficiency.json").read_text())
    assert sorted(r["seed"] for r in payload["rows"]) == [0, 1]
    assert [len(r["curve"]) for r in payload["rows"]] == [2, 2]  # validated at iterations 3 and 6
    assert all(r["threads"] == max(1, (os.cpu_count() or 1)) for r in payload["rows"])  # one job: every core
    (line,) = payload["summary"]
    assert line["method"] == "supervised" and line["seeds"] == [0, 1] and len(line["miou_x1.0"]) == 2
    assert (results / "label_efficiency_curves.png").stat().st_size > 0
    assert "± " in (results / "label_efficiency.md").read_text()

    refused = study(work, results)
    assert refused.returncode != 0 and "pass --resume" in refused.stderr

    runs = sorted(work.glob("synthetic/*/supervised/seed*"))
    kept = (runs[0] / "row.json").stat().st_mtime_ns
    (runs[1] / "row.json").unlink()  # seed 1 unfinished: its checkpoint is there, its row is not (here or published)
    published_seed0 = {**payload, "rows": [r for r in payload["rows"] if r["seed"] == 0]}
    (results / "label_efficiency.json").write_text(json.dumps(published_seed0))
    again = study(work, results, "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (runs[0] / "row.json").stat().st_mtime_ns == kept
    assert "seed 1: 2 labelled (resumed)" in again.stdout and "seed 0" not in again.stdout
    resumed = json.loads((runs[1] / "row.json").read_text())
    first_seed1 = next(r for r in payload["rows"] if r["seed"] == 1)
    assert resumed["miou_x1.0"] == first_seed1["miou_x1.0"]
    assert resumed["wall_s"] > first_seed1["wall_s"]  # a resumed run adds its earlier invocations' time

    # Killed before its first checkpoint, a run starts over, and the killed attempt's time is not its own.
    (runs[1] / "row.json").unlink()
    (runs[1] / "last.pt").unlink()
    (runs[1] / "wall_s.txt").write_text("100000")
    (results / "label_efficiency.json").write_text(json.dumps(published_seed0))
    restarted = study(work, results, "--resume")
    assert restarted.returncode == 0 and "(resumed)" not in restarted.stdout, restarted.stderr[-2000:]
    assert json.loads((runs[1] / "row.json").read_text())["wall_s"] < 1000

    changed = study(work, results, "--resume", "--lr", "0.02")
    assert changed.returncode != 0 and "one study keeps one budget" in changed.stderr

    (results / "label_efficiency.json").unlink()
    published = study(work, results, "--publish-only", "--lr", "0.02")  # the study's own budget, nothing trained
    assert published.returncode == 0 and "==" not in published.stdout
    assert len(json.loads((results / "label_efficiency.json").read_text())["rows"]) == 2

    # Another machine or working stretch: a fresh --work continues from the committed results, training nothing.
    elsewhere = study(tmp_path / "elsewhere", results)
    assert elsewhere.returncode == 0 and "==" not in elsewhere.stdout, elsewhere.stderr[-2000:]
    assert len(json.loads((results / "label_efficiency.json").read_text())["rows"]) == 2
    assert "the committed row (" not in again.stdout + elsewhere.stdout  # no teacher there, nothing retrained
    committed = next(r for r in json.loads((results / "label_efficiency.json").read_text())["rows"]
                     if (r["method"], r["seed"]) == ("supervised", 0))["miou_x1.0"]
    # selftrain's teacher needs a checkpoint, which a published row does not carry: it is trained again first
    student = study(tmp_path / "student", results, "--methods",
                    "supervised,selftrain,selftrain:teacher=scalematch,supervised:init-from=teacher", "--seeds", "0")
    assert student.returncode == 0, student.stdout[-2000:] + student.stderr[-2000:]
    assert "supervised seed 0" in student.stdout and "selftrain seed 0" in student.stdout
    # and says so, once, with what the committed row held, since the study's supervised row is then the new run
    assert student.stdout.count("the committed row (") == 1
    assert f"the committed row ({committed:.1f} at x1.0)" in student.stdout
    assert f"(the committed run: {committed:.1f})" in student.stdout
    rows = {r["method"]: r for r in json.loads((results / "label_efficiency.json").read_text())["rows"] if r["seed"] == 0}
    selftrain = rows["selftrain"]
    assert 0 <= selftrain["pseudo_miou"] <= 100 and 0 <= selftrain["pseudo_miou_reliable"] <= 100
    # the equal-time control continues the teacher's weights on the labels alone, and counts the teacher's time
    control, teacher = rows["supervised:init-from=teacher"], tmp_path / "student" / "synthetic" / "1_4" / "supervised" / "seed0"
    assert str(teacher / "last.pt") in (teacher.parent.parent / "supervised:init-from=teacher" / "seed0" / "train.log").read_text()
    assert control["total_s"] > control["wall_s"] > 0 and selftrain["total_s"] > selftrain["wall_s"] > 0
    # selftrain:teacher=scalematch is taught by the seed's ScaleMatch run, by CIF, ranked over its snapshots
    cif_student = tmp_path / "student" / "synthetic" / "1_4" / "selftrain:teacher=scalematch" / "seed0"
    identity = json.loads((cif_student / "pseudo" / "teacher" / "manifest.json").read_text())["identity"]
    assert identity["mode"] == "cif" and len(identity["ranked_by"]) == 3  # snapshots at 2 and 4, then last.pt
    assert str(teacher.parent.parent / "scalematch" / "seed0") in yaml.safe_load((cif_student / "config.yaml").read_text())["method_cfg"]["teacher"]
    cif_row = rows["selftrain:teacher=scalematch"]
    assert cif_row["total_s"] == pytest.approx(cif_row["wall_s"] + rows["scalematch"]["wall_s"])
    assert "minutes, teacher included" in (results / "label_efficiency.md").read_text()
    assert "pseudo-labels scored against the pool's hidden masks" in (results / "label_efficiency.md").read_text()
    other_budget = study(tmp_path / "other", results, "--lr", "0.02", "--seeds", "0")  # never mixed with those rows
    assert other_budget.returncode == 0 and "another budget" in other_budget.stdout and "==" in other_budget.stdout
    assert [r["seed"] for r in json.loads((results / "label_efficiency.json").read_text())["rows"]] == [0]


def test_label_efficiency_keeps_a_runs_wall_time_current_while_it_trains(tmp_path, monkeypatch):
    import bench.label_efficiency as le
    monkeypatch.setattr(le, "TICK_S", 0.1)
    ticks = []
    rss = le.run([sys.executable, "-c", "import time; time.sleep(1.0)"], tmp_path / "log", 1, lambda: ticks.append(1))
    assert len(ticks) >= 5 and rss > 0  # a study killed mid-run loses at most TICK_S of the run's time
    with pytest.raises(SystemExit, match="failed with exit code 3"):
        le.run([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log", 1)


@pytest.mark.parametrize("flag, value", [("--save-every", "-100"), ("--threads", "0"), ("--iters", "0"), ("--crop", "8")])
def test_label_efficiency_refuses_bad_counts_before_it_writes_anything(tmp_path, monkeypatch, flag, value):
    import bench.label_efficiency as le
    work = tmp_path / "study"
    monkeypatch.setattr(sys, "argv", ["label_efficiency.py", "--work", str(work), flag, value])
    with pytest.raises(SystemExit, match=rf"{flag} {value} \(must be \d+ or more\)"):
        le.main()
    assert not work.exists()


def test_label_efficiency_warm_start_is_shared_by_every_method_of_a_seed(tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    both = study(work, results, "--methods", "supervised:init-from=teacher", "--warm-start", "2")
    assert both.returncode != 0 and "leave out --warm-start" in both.stderr and not work.exists()
    done = study(work, results, "--methods", "supervised,fixmatch", "--seeds", "0", "--warm-start", "2", "--name", "warm",
                 "--iters", "2", "--eval-every", "1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("warm-up (supervised) seed 0") == 1  # one warm-up, two methods
    warm = next(work.glob("synthetic/*/warm-up/seed0"))
    payload = json.loads((results / "warm.json").read_text())
    assert payload["budget"]["warm_start"] == 2 and (results / "warm_curves.png").stat().st_size > 0
    for row in payload["rows"]:
        assert [p["iter"] for p in row["curve"]] == [1, 2, 3, 4]  # the warm-up's evaluations, then the method's
        assert row["curve"][:2] == json.loads((warm / "curve.json").read_text())
        config = yaml.safe_load((next(work.glob(f"synthetic/*/{row['method']}/seed0")) / "config.yaml").read_text())
        assert config["model"]["init_from"] == str(warm / "last.pt")
    assert "from a supervised run of 2 iterations" in (results / "warm.md").read_text()


def test_active_learning_summary_on_fake_rows(tmp_path):
    from bench.active_learning import labels_to_reach, markdown, publish, summarise

    def row(strategy, seed, labeled, miou, effort=None):
        return {"benchmark": "synthetic", "seed": seed, "strategy": strategy, "labeled": labeled, "miou": miou,
                "effort": effort}

    rows = [row("random", 0, 8, 10.0, 0.5), row("random", 0, 16, 20.0, 0.3), row("random", 0, 24, 30.0),
            row("random", 1, 8, 12.0, 0.5), row("random", 1, 16, 22.0, 0.1), row("random", 1, 24, 34.0),
            row("entropy", 0, 8, 10.0), row("entropy", 0, 16, 33.0), row("entropy", 0, 24, 40.0),
            row("entropy", 1, 8, 12.0), row("entropy", 1, 16, 31.0), row("entropy", 1, 24, 38.0),
            row("scale_disagreement", 0, 8, 10.0), row("scale_disagreement", 0, 16, 30.0), row("scale_disagreement", 0, 24, 42.0),
            row("scale_disagreement", 1, 8, 12.0), row("scale_disagreement", 1, 16, 30.0), row("scale_disagreement", 1, 24, 42.0)]
    assert labels_to_reach([(8, 1.0), (16, 5.0), (24, 4.0)], 4.5) == 16 and labels_to_reach([(8, 1.0)], 2.0) is None
    random, entropy, scale = summarise(rows)
    assert [s["strategy"] for s in (random, entropy, scale)] == ["random", "entropy", "scale_disagreement"]
    assert random["seeds"] == [0, 1] and [p["labeled"] for p in random["curve"]] == [8, 16, 24]
    assert random["final_miou"] == (32.0, pytest.approx(2 ** 0.5 * 2))  # 30 and 34
    assert random["effort"] == (pytest.approx(0.35), pytest.approx(0.191485, abs=1e-5))
    # random ends at 32.0 with 24 labels; entropy's mean curve (32.0 at 16) gets there with 16, two thirds
    assert random["labels_to_random_final"] == 24 and entropy["labels_to_random_final"] == 16
    assert entropy["label_fraction_of_random"] == pytest.approx(2 / 3) and entropy["effort"] is None
    # scale disagreement minus entropy, paired by seed and round: 0, -3, 2, 0, -1, 4
    assert scale["gain_over_entropy"] == (pytest.approx(1 / 3), pytest.approx(2.4221, abs=1e-4))
    assert "gain_over_entropy" not in entropy
    table = markdown(summarise(rows))
    # last round, paired by seed: entropy 40 - 30 and 38 - 34
    assert entropy["final_gain_over_random"] == (7.0, pytest.approx(18 ** 0.5))
    assert "final_gain_over_random" not in random
    assert "| entropy | 2 | 11.0 ± 1.4 | 32.0 ± 1.4 | 39.0 ± 1.4 | 16 (67 %) | 7.0 ± 4.2 | - | - |" in table
    assert "| random | 2 |" in table and "35.0 ± 19.1" in table
    budget = {"backbone": "resnet18", "pretrained": "none", "method": "scalematch", "initial": 8, "k": 8, "rounds": 2,
              "iters": 40, "initial_iters": 200, "crop_size": 64, "batch_size": 2, "lr": 0.01, "pool": 120, "size": 64,
              "n_val": 40}
    publish(rows, budget, tmp_path, "al")
    assert json.loads((tmp_path / "al.json").read_text())["rows"] == rows
    md = (tmp_path / "al.md").read_text()
    assert table in md and "round 0 trained 200 iterations once per seed" in md
    assert "on synthetic: DeepLabV3+ on resnet18 (random init) trained with scalematch" in md
    assert "gain over entropy: scale disagreement minus entropy" in md
    assert "![curves](al_curves.png)" in md and "`bench/active_learning.py`" in md
    assert (tmp_path / "al_curves.png").read_bytes()[:4] == b"\x89PNG"
    # a study without scale disagreement has no such column, and a budget from before encoders were a choice
    # (no backbone or pretrained key) was ResNet-18 from random init
    without = [r for r in rows if r["strategy"] != "scale_disagreement"]
    assert "gain over entropy" not in markdown(summarise(without))
    old = {k: v for k, v in budget.items() if k not in ("backbone", "pretrained")}
    publish(without, old, tmp_path, "old")
    md = (tmp_path / "old.md").read_text()
    assert "DeepLabV3+ on resnet18 (random init)" in md and "gain over entropy" not in md


def test_train_speed_ratios_are_taken_per_round_over_scalematchs_draw():
    import statistics

    import torch

    from bench.train_speed import ratio_rows
    from tests.test_methods import make

    draws = make("scalematch").scale_draws()
    assert {(v, t) for v, t, _ in draws} == {(0.25, 1.0), (0.25, 1.25), (0.5, 1.0), (0.5, 1.25), (1.5, 0.75), (1.5, 1.0),
                                            (2.0, 0.75), (2.0, 1.0)}
    assert sum(p for _, _, p in draws) == pytest.approx(1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = ratio_rows("resnet18", 64, 2, 2, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    sec = result["seconds"]
    assert all(len(ts) == 2 and min(ts) > 0 for ts in sec.values())
    first = result["ratios"][0]
    assert first["ratio"] == "scalematch fp32 / unimatch fp32"
    assert first["median"] == pytest.approx(statistics.median(a / b for a, b in zip(sec["scalematch fp32"], sec["unimatch fp32"])))
    flops = result["flops"]
    assert first["flop_ratio"] == pytest.approx(flops["scalematch fp32"] / flops["unimatch fp32"])
    # the plain path's extra decoder pass is the only FLOP difference from the official (fused-only) step
    assert flops["scalematch fp32"] > flops["scalematch fp32 official"] > flops["unimatch fp32"] > 0


def test_expected_flops_weigh_each_draw_and_count_the_backward_pass():
    import torch

    from bench.train_speed import expected_flops

    layer = torch.nn.Linear(8, 4, bias=False)

    def step(n):
        return lambda: layer(torch.randn(n, 8)).sum().backward()
    # forward 2*n*8*4; backward: the weight's gradient only (the input needs none), as much again
    assert expected_flops([(step(3), 1.0)]) == 2 * (2 * 3 * 8 * 4)
    assert expected_flops([(step(3), 0.25), (step(5), 0.75)]) == pytest.approx(0.25 * 384 + 0.75 * 640)


def test_label_efficiency_method_with_aux_loss_and_bf16_flags_reach_the_training_command():
    from argparse import Namespace

    from bench.label_efficiency import METHODS, ordered, teacher_of, train_argv
    args = Namespace(crop=64, batch=4, eval_every=100, save_every=0, backbone="resnet18", pretrained="none", device="cpu",
                     head_lr_mult=None, amp_cpu=False)
    argv = train_argv(args, "unimatch+contextrast", Path("d"), Path("o"), 0, 10, 0.01, 1.0)
    assert argv[argv.index("--device") + 1] == "cpu" and "--no-amp" not in argv
    gpu = train_argv(Namespace(**{**vars(args), "device": "cuda"}), "unimatch", Path("d"), Path("o"), 0, 10, 0.01, 1.0)
    assert gpu[gpu.index("--device") + 1] == "cuda" and "--no-amp" in gpu  # float32 on both devices
    assert argv[argv.index("--method") + 1] == "unimatch" and argv[argv.index("--aux") + 1] == "contextrast"
    assert "--aux" not in train_argv(args, "unimatch", Path("d"), Path("o"), 0, 10, 0.01, 1.0)
    assert "--warmup-epochs" in train_argv(args, "scalematch+contextrast", Path("d"), Path("o"), 0, 10, 0.01, 8.0)
    assert {"supervised+contextrast", "fixmatch+contextrast", "scalematch+contextrast"} <= set(METHODS)
    assert "--amp-cpu" not in argv
    assert argv[argv.index("--save-every") + 1] == "100"  # at every evaluation unless --save-every is given
    saving = Namespace(**{**vars(args), "save_every": 25})
    saved = train_argv(saving, "unimatch", Path("d"), Path("o"), 0, 10, 0.01, 1.0)
    assert saved[saved.index("--save-every") + 1] == "25"
    argv = train_argv(args, "prcl:num-queries=32:num-negatives=64", Path("d"), Path("o"), 0, 10, 0.01, 1.0)
    assert argv[argv.index("--method") + 1] == "prcl" and argv[-4:] == ["--num-queries", "32", "--num-negatives", "64"]
    argv = train_argv(args, "fixmatch+contextrast:aux-weight=0.2", Path("d"), Path("o"), 0, 10, 0.01, 1.0)
    assert argv[argv.index("--aux") + 1] == "contextrast" and argv[-2:] == ["--aux-weight", "0.2"]
    argv = train_argv(args, "scalematch:warmup-epochs=3", Path("d"), Path("o"), 0, 10, 0.01, 8.0)
    assert argv[len(argv) - argv[::-1].index("--warmup-epochs")] == "3"  # the given flag is the last one, so it wins
    assert "--snapshot-every" in train_argv(args, "scalematch", Path("d"), Path("o"), 0, 12, 0.01, 8.0)  # a teacher
    assert teacher_of("selftrain") == ("selftrain", "supervised")
    assert teacher_of("selftrain:teacher=scalematch:conf-thresh=0.9") == ("selftrain:conf-thresh=0.9", "scalematch")
    for wrong in ("fixmatch:teacher=supervised", "selftrain:teacher=unimatch", "selftrain:teacher=selftrain"):
        with pytest.raises(SystemExit, match="teacher"):
            teacher_of(wrong)
    assert train_argv(args, "cps:cutmix=false", Path("d"), Path("o"), 0, 10, 0.01, 1.0)[-1:] == ["--no-cutmix"]
    assert train_argv(args, "cps:cutmix=true", Path("d"), Path("o"), 0, 10, 0.01, 1.0)[-1:] == ["--cutmix"]
    assert ordered(["prcl:num-queries=32", "fixmatch+contextrast", "prcl", "supervised", "fixmatch"]) == \
        ["supervised", "fixmatch", "fixmatch+contextrast", "prcl", "prcl:num-queries=32"]
    with pytest.raises(SystemExit, match="METHOD:flag=value"):
        train_argv(args, "prcl:num-queries", Path("d"), Path("o"), 0, 10, 0.01, 1.0)
    args.amp_cpu = True
    assert "--amp-cpu" in train_argv(args, "unimatch", Path("d"), Path("o"), 0, 10, 0.01, 1.0)
    assert "--head-lr-mult" not in train_argv(args, "psmt", Path("d"), Path("o"), 0, 10, 0.01, 1.0)
    args.head_lr_mult = 10.0
    argv = train_argv(args, "psmt", Path("d"), Path("o"), 0, 10, 0.01, 1.0)
    assert argv[argv.index("--head-lr-mult") + 1] == "10.0"


def test_label_efficiency_gap_closed_and_labels_supervised_needs():
    from bench.label_efficiency import markdown, summarise

    def row(frac, labeled, method, seed, miou):
        return {"benchmark": "photos", "fraction": frac, "labeled": labeled, "method": method, "seed": seed,
                "miou_x0.5": miou, "miou_x1.0": miou, "miou_x2.0": miou}
    rows = [row("1/32", 19, "supervised", s, m) for s, m in ((0, 40), (1, 42))]
    rows += [row("1/8", 75, "supervised", s, m) for s, m in ((0, 50), (1, 52))]
    rows += [row("1", 600, "supervised", s, m) for s, m in ((0, 60), (1, 62))]
    rows += [row("1/32", 19, "unimatch", s, m) for s, m in ((0, 50), (1, 52))]   # as good as 1/8 supervised
    rows += [row("1/32", 19, "cps", s, m) for s, m in ((0, 30), (1, 30))]
    rows += [row("1/8", 75, "unimatch", s, m) for s, m in ((0, 70), (1, 70))]
    lines = {(s["fraction"], s["method"]): s for s in summarise(rows)}
    uni = lines[("1/32", "unimatch")]
    assert uni["gain_x1.0"] == (10.0, 0.0) and uni["gap_closed"] == 50.0 and uni["labels_to_match"] == 75
    assert lines[("1/32", "cps")]["labels_to_match"] == "<=19" and lines[("1/32", "cps")]["gap_closed"] < 0
    assert lines[("1/8", "unimatch")]["labels_to_match"] == ">600"
    # a method with fewer seeds is measured against supervised and full supervision on its own seeds only;
    # where full supervision lacks the seed, against full supervision's mean
    few = rows + [row("1/32", 19, "scalematch", 1, 52), row("1/32", 19, "supervised", 2, 31), row("1/32", 19, "mt", 2, 41)]
    lines = {(s["fraction"], s["method"]): s for s in summarise(few)}
    assert lines[("1/32", "scalematch")]["gap_closed"] == 50.0
    assert lines[("1/32", "mt")]["gap_closed"] == 100 * 10 / (61 - 31)
    half = 0.5 * (51 + 61)  # halfway from 1/8 to full supervised, in log(labels)
    assert summarise(rows + [row("1/32", 19, "fixmatch", 0, half)])[-1]["labels_to_match"] == round((75 * 600) ** 0.5, 1)
    assert "labels supervised needs" in markdown(summarise(rows))
    # with supervised measured at 19 and 600 labels only, a score between them is not interpolated
    sparse = [r for r in rows if r["fraction"] != "1/8"]
    assert {(s["fraction"], s["method"]): s for s in summarise(sparse)}[("1/32", "unimatch")]["labels_to_match"] is None


def test_pseudo_label_quality_scores_teacher_and_student_labels_on_the_pools_masks(tmp_path):
    from bench.label_efficiency import pseudo_label_quality
    from training.data.folder import write_mask, write_split
    from training.pseudo_labels import CACHE_FORMAT, MANIFEST
    data, run = tmp_path / "data", tmp_path / "run"
    (data / "classes.json").parent.mkdir(parents=True)
    (data / "classes.json").write_text(json.dumps([{"id": 0, "name": "a", "color": [0, 0, 0]},
                                                   {"id": 1, "name": "b", "color": [255, 0, 0]}]))
    truth = np.zeros((4, 4), np.uint8)
    truth[:, 2:] = 1  # half a, half b
    ids = ["i0", "i1", "i2", "i3"]
    write_split(data, "unlabeled", ids)
    for i in ids:
        write_mask(data / "masks" / f"{i}.png", truth)
    # The teacher is right on its two most stable images and calls everything "a" on the others.
    stability = {"i0": 90.0, "i1": 80.0, "i2": 10.0, "i3": 5.0}
    teacher = run / "pseudo" / "teacher"
    for i in ids:
        write_mask(teacher / "labels" / f"{i}.png", truth if stability[i] > 50 else np.zeros_like(truth))
    (teacher / MANIFEST).write_text(json.dumps({"format": CACHE_FORMAT, "identity": {}, "complete": True, "seconds": 0,
                                                "images": {i: {"confidence": 0.9, "stability": stability[i]} for i in ids}}))
    student = run / "pseudo" / "round1"  # round 1 re-labels the less reliable half, and gets it right
    for i in ("i2", "i3"):
        write_mask(student / "labels" / f"{i}.png", truth)
    (run / "config.yaml").write_text(yaml.safe_dump({"method_cfg": {"reliable_fraction": 0.5}}))
    quality = pseudo_label_quality(run, data)
    # every image: a is right on its 32 pixels, plus 16 of b's called a (IoU 32/48); b is right on 16 of 32 (IoU 1/2)
    assert quality == {"pseudo_miou": 58.33, "pseudo_miou_reliable": 100.0,
                       "pseudo_miou_relabelled_teacher": 25.0, "pseudo_miou_relabelled_student": 100.0}


def test_pseudo_label_sentence_names_only_what_the_recipe_had():
    from bench.label_efficiency import pseudo_label_sentence

    def cell(v):
        return f"{v[0]:.1f}"
    st_pp = {"method": "selftrain", "pseudo_miou": [40.0, 1.0], "pseudo_miou_reliable": [44.0, 1.0],
             "pseudo_miou_relabelled_teacher": [36.0, 1.0], "pseudo_miou_relabelled_student": [31.0, 1.0]}
    assert pseudo_label_sentence(st_pp, cell).endswith(
        "40.0 on every unlabelled image, 44.0 on the most reliable share trained on first; on the images "
        "re-labelled in round 1, the teacher's 36.0 and the student's 31.0.")
    # every image from the start: the "reliable share" is the whole pool, and no round re-labels anything
    every = {"method": "selftrain:reliable-fraction=1", "pseudo_miou": [40.0, 1.0], "pseudo_miou_reliable": [40.0, 1.0],
             "pseudo_miou_relabelled_teacher": None, "pseudo_miou_relabelled_student": None}
    assert pseudo_label_sentence(every, cell).endswith("the teacher's 40.0 on every unlabelled image.")


def test_augment_sensitivity_scores_every_view_through_the_shared_scorer(checkpoints, tiny_data, tmp_path):
    import torch

    from bench.augment_sensitivity import VIEWS, ViewSet, markdown, sensitivity, summarise
    from training.checkpoint import load_checkpoint, load_inference_model
    from training.data.datasets import EvalSet
    from training.data.folder import load_classes, read_split
    from training.data.transforms import MEAN, STD
    from training.evaluate import evaluate
    run = checkpoints["supervised"].parent
    row = sensitivity(run, tiny_data)
    assert list(row["views"]) == list(VIEWS) and row["method"] == run.parent.name
    names, ids = [c.name for c in load_classes(tiny_data)], read_split(tiny_data, "val")
    model = load_inference_model(load_checkpoint(run / "last.pt"))[0]
    plain = evaluate(model, EvalSet(tiny_data, ids, len(names)), names, torch.device("cpu"))["scales"]["1.0"]["miou"]
    assert row["views"]["none"]["miou"] == pytest.approx(plain)  # the untouched view is `scaleseg eval`'s score
    assert sensitivity(run, tiny_data) == row  # every view's draws are seeded per image
    gray = ViewSet(tiny_data, ids, len(names), VIEWS["grayscale"])[0]["image"]
    pixels = gray * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[1], pixels[2], atol=1e-5)
    jittered = ViewSet(tiny_data, ids, len(names), VIEWS["colour jitter"])[0]["image"]
    assert not torch.equal(jittered, ViewSet(tiny_data, ids, len(names), VIEWS["none"])[0]["image"])
    (line,) = summarise([row, {**row, "seed": "seed1"}])
    assert line["runs"] == 2 and line["views"]["none"]["miou"] == (row["views"]["none"]["miou"], 0.0)
    assert "| grayscale |" in markdown([line])
    bad = subprocess.run([sys.executable, str(REPO / "bench" / "augment_sensitivity.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "not a finished `scaleseg train --out` folder" in bad.stderr


def test_demo_recipe_summary_checks_every_class_on_every_seed(tmp_path):
    from bench.demo_recipe import run_result, summarise
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"iter": 1, "sec_per_iter": 0.5}, {"iter": 2, "sec_per_iter": 0.25},
             {"iter": 2, "val": {"miou": 70.0, "iou": {"background": 95.0, "disc": 45.0}}}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert run_result(run) == {"miou": 70.0, "iou": {"background": 95.0, "disc": 45.0}, "train_s": 0.75}

    def row(recipe, seed, disc, minutes):
        return {"recipe": recipe, "seed": seed, "miou": (90 + disc) / 2, "iou": {"background": 90.0, "disc": disc},
                "train_s": minutes * 60}
    rows = [row("a", 0, 80.0, 4), row("a", 1, 69.0, 4), row("b", 0, 80.0, 4), row("b", 1, 90.0, 6), row("c", 0, 75.0, 4),
            row("c", 1, 70.0, 5)]
    a, b, c = summarise(rows)
    assert (a["meets_target"], b["meets_target"], c["meets_target"]) == (False, False, True)
    assert a["weakest"] == {"iou": 69.0, "class": "disc", "seed": 1}
    assert a["iou"]["disc"][0] == pytest.approx(74.5) and b["minutes"][0] == pytest.approx(5.0)


def test_demo_recipe_folders_change_with_the_recipe_not_with_the_seed(tmp_path):
    from app.demo import stage_args
    from bench.demo_recipe import recipe_slug

    def slug(seed=0, out="a", bf16=False, extra=()):
        supervised, _ = stage_args(tmp_path, tmp_path / out, tmp_path / "run", 1100, 80, seed, cpu_bf16=bf16)
        return recipe_slug(supervised + list(extra))
    assert slug() == slug(seed=3, out="b")
    assert slug().startswith("1100-")
    assert len({slug(), slug(bf16=True), slug(extra=["--crop-size", "128"])}) == 3
    second = [stage_args(tmp_path, tmp_path / f"warm{seed}", tmp_path / "run", 1100, 80, seed, lr)[1]
              for seed, lr in ((0, 0.005), (4, 0.005), (0, 0.0025))]
    assert recipe_slug(second[0]) == recipe_slug(second[1]) != recipe_slug(second[2])


def test_linear_probe_separates_separable_pixels_and_uses_the_studys_subsets():
    import random

    import torch

    from bench.label_efficiency import labelled_subset
    from bench.linear_probe import probe

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=gen) * 4
    labels = torch.randint(0, 3, (600,), generator=gen)
    feats = centres[labels] + torch.randn(600, 8, generator=gen)
    labels[:5] = 255  # ignored pixels are left out of the fit and the score
    miou, per_class = probe(feats[:400], labels[:400], feats[400:], labels[400:], 3, seed=0)
    assert miou > 95 and len(per_class) == 3
    shuffled = torch.randint(0, 3, (400,), generator=gen)  # labels unrelated to the features: chance level
    assert probe(feats[:400], shuffled, feats[400:], labels[400:], 3, seed=0)[0] < 50

    pool = [f"tex_{i:05d}" for i in range(64)]
    expected = list(pool)
    random.Random(2).shuffle(expected)
    assert labelled_subset(pool, 2, 2) == sorted(expected[:2])


def run_in_own_temp(cmd: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """Runs a benchmark with its own temp folder, one thread; returns the folder to check what was left there.
    (a native library, by its strings ONNX Runtime, leaves a 51-byte .ses file there, so callers look for the
    benchmark's own folders.)"""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)})
    return result, scratch


def test_decoder_cost_rows_for_both_heads(tmp_path):
    """bench/decoder_cost.py, shrunk: one FP32 and one INT8 row per head, the light one far fewer MACs."""
    cmd = [sys.executable, str(REPO / "bench" / "decoder_cost.py"), "--size", "64", "--rounds", "2", "--threads", "1",
           "--calib-count", "1", "--results", str(tmp_path)]
    result, scratch = run_in_own_temp(cmd, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(scratch.glob("scaleseg-*"))  # its exported graphs (up to 120 MB a run) must not outlive it
    rows = json.loads((tmp_path / "decoder_cost.json").read_text())["rows"]
    assert [(r["decoder"], r["precision"]) for r in rows] == [
        (d, p) for d in ("standard", "light") for p in ("fp32", "int8", "int8, float Pads")]
    assert all(r["runs"] == 2 and r["images_per_sec_min"] <= r["images_per_sec"] <= r["images_per_sec_max"] for r in rows)
    assert rows[3]["gmac"] < rows[0]["gmac"] / 3 and rows[0]["speedup_over_standard"] == 1.0
    assert rows[1]["speedup_over_float_pads"] == rows[1]["images_per_sec"] / rows[2]["images_per_sec"]
    assert "| light | int8 |" in (tmp_path / "decoder_cost.md").read_text()


def test_inference_bench_times_each_head_and_says_where_the_time_goes(tmp_path):
    """bench/inference.py, shrunk: every engine for the light head, and ONNX Runtime's kernel time by module."""
    cmd = [sys.executable, str(REPO / "bench" / "inference.py"), "--size", "64", "--batches", "1", "--backbones", "resnet18",
           "--decoders", "light", "--repeats", "1", "--threads", "1", "--calib-count", "1", "--profile-runs", "1",
           "--name", "speed", "--results", str(tmp_path)]
    result, scratch = run_in_own_temp(cmd, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(scratch.glob("scaleseg-*"))  # its exported graphs (up to 120 MB a run) must not outlive it
    out = json.loads((tmp_path / "speed.json").read_text())
    assert {(r["engine"], r["graph"]) for r in out["rows"]} >= {("onnxruntime cpu int8", "single"), ("pytorch eager", "cif 0.5,1,2")}
    assert all(r["decoder"] == "light" and r["min_ms"] <= r["p50_ms"] <= r["max_ms"] for r in out["rows"])
    assert [s["engine"] for s in out["time_shares"]] == ["onnxruntime cpu", "onnxruntime cpu int8"]
    for shares in out["time_shares"]:
        assert sum(shares["by_module"].values()) == pytest.approx(100) and sum(shares["by_op"].values()) == pytest.approx(100)
        assert {"encoder", "aspp"} <= set(shares["by_module"])
    assert "QLinearConv" in out["time_shares"][1]["by_op"] and "QLinearConv" not in out["time_shares"][0]["by_op"]
    assert "| light |" in (tmp_path / "speed.md").read_text()


def test_int8_gate_bench_records_every_graph_and_the_default_gates_verdict(checkpoints, tiny_data, tmp_path):
    from bench.int8_gate import main
    from export.quantize import MAX_MIOU_DROP, MIN_AGREEMENT
    runs = [checkpoints["scalematch"].parent, checkpoints["supervised"].parent]
    main([*map(str, runs), "--data", str(tiny_data), "--calib-count", "2", "--threads", "1", "--name", "gate",
          "--results", str(tmp_path)])
    rows = json.loads((tmp_path / "gate.json").read_text())["rows"]
    assert [(r["run"].split("/")[-1], r["graph"]) for r in rows] == [
        (runs[0].name, "model.int8.onnx"), (runs[0].name, "model.cif.int8.onnx"), (runs[1].name, "model.int8.onnx")]
    for r in rows:
        assert r["miou_change"] == pytest.approx(r["miou_int8"] - r["miou_fp32"])
        passes = r["label_agreement_pct"] >= 100 * MIN_AGREEMENT and -r["miou_change"] <= MAX_MIOU_DROP
        assert r["ships"] == ("yes" if passes else "no") and 0 <= r["uncertain_pct"] <= 100
        assert r["agreement_confident_pct"] is None if r["uncertain_pct"] == 100 else 0 <= r["agreement_confident_pct"] <= 100
    assert not list(tmp_path.glob("*.onnx")) and "| model.cif.int8.onnx |" in (tmp_path / "gate.md").read_text()
    with pytest.raises(SystemExit, match="no last.pt"):
        main([str(tmp_path)])


def test_label_efficiency_results_name_the_machine_the_runs_trained_on(tmp_path, monkeypatch):
    import bench.label_efficiency as le
    budget = {"iters": 10, "eval_every": 5, "crop": 64, "size": 96, "batch": 4, "lr": 0.01, "pool": 32, "n_val": 8,
              "device": "cuda"}
    gpu_box = {"cpu": "x86_64", "cores": 16, "torch": "2.11.0", "threads": 1, "cuda": "NVIDIA H200", "python": "3.12"}
    here = {**gpu_box, "cores": 2, "cuda": None}
    monkeypatch.setattr(le, "machine", lambda: here)

    def write_row(seed, trained_on):
        run = tmp_path / "work" / "textures" / "1_32" / "supervised" / f"seed{seed}"
        run.mkdir(parents=True)
        row = {"benchmark": "textures", "fraction": "1/32", "labeled": 1, "method": "supervised", "seed": seed,
               "warm_start": 0, "miou_x0.5": 30.0, "miou_x1.0": 40.0, "miou_x2.0": 35.0, "sec_per_iter": 0.05,
               "total_s": 60.0, "peak_rss_mib": 900.0, "curve": [{"iter": 10, "x0.5": 30.0, "x1.0": 40.0, "x2.0": 35.0}]}
        run.joinpath("row.json").write_text(json.dumps({**row, **({"machine": trained_on} if trained_on else {})}))
    results = tmp_path / "results"
    write_row(0, None)  # a run from before rows named their machine
    le.publish(tmp_path / "work", budget, results, "s")
    assert json.loads((results / "s.json").read_text())["machine"] == here
    write_row(1, gpu_box)
    write_row(2, gpu_box)
    le.publish(tmp_path / "work", budget, results, "s")  # published on this box, trained on the GPU one
    assert json.loads((results / "s.json").read_text())["machine"] == gpu_box
    text = (results / "s.md").read_text()
    assert "GPU NVIDIA H200" in text and "trained on CUDA" in text


def test_label_efficiency_datasets_share_one_rendered_pool(tmp_path):
    from bench.label_efficiency import make_data
    from training.data.folder import read_split
    cell = tmp_path / "work" / "synthetic" / "1_4"
    a = make_data("synthetic", cell / "data_seed0", 4, 12, 4, 32, 0)
    b = make_data("synthetic", cell / "data_seed1", 4, 12, 4, 32, 1)
    pool = tmp_path / "work" / "synthetic" / "pool-synthetic-16-val4-32px"
    assert len(read_split(pool, "labeled")) == 16 and read_split(pool, "unlabeled", required=False) == []
    for folder in (a, b):
        assert len(read_split(folder, "labeled")) == 4 and len(read_split(folder, "unlabeled")) == 12
    assert read_split(a, "labeled") != read_split(b, "labeled")  # each seed labels its own subset
    image = next((pool / "images").iterdir()).name
    assert (a / "images" / image).stat().st_ino == (pool / "images" / image).stat().st_ino  # linked, not copied
    assert sorted(p.name for p in cell.iterdir()) == ["data_seed0", "data_seed1"]  # no staging folder left
    # bench/active_learning.py keeps each benchmark's data in WORK/BENCH/data: one parent, two pools
    shapes = make_data("synthetic", tmp_path / "al" / "synthetic" / "data", 4, 12, 4, 32, 0)
    textures = make_data("textures", tmp_path / "al" / "textures" / "data", 4, 12, 4, 32, 0)
    assert read_split(shapes, "val")[0].startswith("synth_") and read_split(textures, "val")[0].startswith("tex_")
    (a / "splits" / "labeled.txt").write_text("only_one\n")  # a folder an interrupted older version left
    with pytest.raises(SystemExit, match="1 labelled images where this study labels 4"):
        make_data("synthetic", a, 4, 12, 4, 32, 0)


def test_benchmark_children_find_this_checkout_first_and_keep_the_callers_path(monkeypatch):
    from bench.common import child_env
    monkeypatch.setenv("PYTHONPATH", "/site/extra")
    env = child_env(threads=1)
    assert env["PYTHONPATH"] == os.pathsep.join([str(REPO), "/site/extra"]) and env["OMP_NUM_THREADS"] == "1"
    monkeypatch.delenv("PYTHONPATH")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = child_env()
    assert env["PYTHONPATH"] == str(REPO) and "OMP_NUM_THREADS" not in env  # no empty entry: it would mean the cwd


def test_pseudoseg_branches_scores_decoder_sgc_and_fused_labels_on_kept_masks(tiny_data, data_copy, tmp_path):
    import torch
    from PIL import Image

    import bench.pseudoseg_branches as pb
    from bench.common import load_trained_method, set_mode, whole_image_batches
    from training.checkpoint import load_checkpoint, load_inference_model
    from training.data.datasets import EvalSet
    from training.data.folder import load_classes, read_split
    from training.evaluate import evaluate
    from training.engine import Trainer
    from training.methods.pseudoseg import image_labels
    from training.models.deeplabv3plus import resize
    cfg = tiny_config(tiny_data, tmp_path / "pseudoseg" / "seed0", method="pseudoseg")
    cfg.run.max_iters = 1
    Trainer(cfg, progress=False).fit()
    run = Path(cfg.run.out)
    names = [c.name for c in load_classes(tiny_data)]
    k = len(names)
    row = pb.score_run(run, tiny_data)
    model = load_inference_model(load_checkpoint(run / "last.pt"))[0]
    plain = evaluate(model, EvalSet(tiny_data, read_split(tiny_data, "val"), k), names, torch.device("cpu"))
    assert row["inference"]["val"]["decoder"] == pytest.approx(plain["scales"]["1.0"]["miou"], abs=0.01)  # the exported model
    assert row["inference"]["unlabeled"] is None and row["training"]["unlabeled"] is None  # no masks, as a user's pool
    assert set(pb.BRANCHES) <= set(row["training"]["labeled"])
    assert "| val (1) |" in pb.markdown([row]) and "### training mode" in pb.markdown([row])

    # Each branch is what its name says: the classifier's own image labels (here: none) or the true ones.
    method, _ = load_trained_method(run, "pseudoseg", k)
    set_mode(method, "inference")
    x, y = next(whole_image_batches(tiny_data, read_split(tiny_data, "val"), k, "val", 2))
    with torch.no_grad():
        method.classifier.weight.fill_(1e-3)  # positive CAMs wherever the encoder's features are
        method.classifier.bias.fill_(-20.0)
        got = pb.predictions(method, x, y)
        valid = torch.ones_like(y, dtype=torch.bool)
        _, c3, c4 = method.model.encoder.stages(x)
        truth, none = image_labels(y, k), torch.zeros(len(y), k - 1)
        assert truth.sum() > 0 and got["image_labels"].sum() == 0
        assert torch.allclose(got["sgc"], resize(method.sgc_logits(c3, c4, none, valid), x.shape[-2:]).softmax(1))
        assert not torch.allclose(got["sgc"], got["sgc_true_labels"])
        assert torch.allclose(got["fused"], method.pseudo_labels(x, valid, none))
        assert torch.allclose(got["fused_true_labels"], method.pseudo_labels(x, valid, truth))
        assert not torch.allclose(got["fused"], got["fused_true_labels"])
    labelled = read_split(tiny_data, "labeled")
    assert [len(x) for x, _ in whole_image_batches(tiny_data, labelled, k, "labeled", 4)] == [4, 2]
    assert [len(x) for x, _ in whole_image_batches(tiny_data, labelled, k, "labeled", 5)] == [6]  # never a batch of one
    # Training mode normalises by the batch and leaves the running statistics alone.
    norms = [m for m in method.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    set_mode(method, "training")
    assert not torch.allclose(pb.predictions(method, x, y)["decoder"], got["decoder"])
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, norms))

    # With the pool's masks kept (class 1 alone in each), the classifier's labels are counted against them.
    for i in read_split(data_copy, "unlabeled"):
        Image.new("L", Image.open(next((data_copy / "images").glob(f"{i}.*"))).size, 1).save(data_copy / "masks" / f"{i}.png")
    set_mode(method, "inference")
    for bias, found, named in ((-20.0, 0.0, 0.0), (20.0, 100.0, k - 1)):
        with torch.no_grad():
            method.classifier.bias.fill_(bias)
        pool = pb.score_split(method, data_copy, read_split(data_copy, "unlabeled"), names, "unlabeled", 4)
        assert (pool["present_class_recall"], pool["classes_named_per_image"]) == (found, named)
        assert pool["classes_present_per_image"] == 1.0


def test_scalematch_cif_scores_each_draws_members_and_fusion_as_the_training_step_builds_them(checkpoints, tiny_data):
    import torch

    import bench.scalematch_cif as sc
    from bench.common import load_trained_method
    from training.data.folder import load_classes, read_split
    run = checkpoints["scalematch"].parent
    names = [c.name for c in load_classes(tiny_data)]
    with pytest.raises(SystemExit, match="a supervised run"):
        load_trained_method(checkpoints["supervised"].parent, "scalematch", len(names))
    method, cfg = load_trained_method(run, "scalematch", len(names))
    assert sc.draws(method) == [(0.25, 1.0), (0.25, 1.25), (0.5, 1.0), (0.5, 1.25), (1.5, 0.75), (1.5, 1.0),
                                (2.0, 0.75), (2.0, 1.0)]
    norms = [m for m in method.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    val = read_split(tiny_data, "val")
    # The gate weights the lower-resolution member: held at 1 the fusion is the x v view when v < 1 and the
    # original view when v > 1; held at 0, the other one.
    for s in (1.0, 0.0):
        handle = method.model.cif.register_forward_hook(lambda _m, _a, out: torch.full_like(out, s))
        got = sc.score_split(method, 32, tiny_data, val, names, "val", 4)
        handle.remove()
        assert any(got[f"v{v}_t{t}"]["ori"] != got[f"v{v}_t{t}"]["x_v"] for v, t in sc.draws(method))
        for v, t in sc.draws(method):
            d = got[f"v{v}_t{t}"]
            low, high = ("x_v", "ori") if v < 1 else ("ori", "x_v")
            assert d["fused"] == {**d[low if s == 1.0 else high], "gate": s}
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, norms))  # training mode leaves them alone
    # Coverage counts the pixels at tau or more.
    method.cfg.conf_thresh = 0.0
    every = sc.score_split(method, 32, tiny_data, val, names, "val", 4)["eval"]["eval_x1"]
    method.cfg.conf_thresh = 1.01
    none = sc.score_split(method, 32, tiny_data, val, names, "val", 4)["eval"]["eval_x1"]
    assert every["coverage"] == 100.0 and none["coverage"] == 0.0 and every["miou"] == none["miou"]
    grid = torch.arange(48 * 40).reshape(1, 48, 40)
    assert torch.equal(sc.centre_crop(grid, 32, tiny_data), grid[:, 8:40, 4:36])
    with pytest.raises(SystemExit, match="smaller than the run's 64-pixel crop"):
        sc.centre_crop(grid, 64, tiny_data)

    row = sc.score_run(run)
    assert row["splits"]["unlabeled"] is None and (row["crop"], row["batch"]) == (32, 4)  # the pool keeps no masks
    table = sc.markdown([row, {**row, "seed": "seed1"}])
    assert "| 0.25, 1 | 8 (1) |" in table and "| 2, 1 | 64 (4) |" in table and "### val (2 runs)" in table
    assert " ± 0.0 |" in table
    with pytest.raises(SystemExit, match="score runs of one setting together"):
        sc.markdown([row, {**row, "crop": 64}])


def test_bn_statistics_rescores_the_exported_model_with_recomputed_statistics(checkpoints, tiny_data, tmp_path,
                                                                              monkeypatch):
    import torch

    from bench.bn_statistics import SOURCES, markdown, score_run, summarise
    from training.checkpoint import load_checkpoint, load_inference_model
    from training.data.datasets import EvalSet
    from training.data.folder import load_classes, read_split
    from training.evaluate import evaluate
    run = checkpoints["supervised"].parent
    row = score_run(run, 4, tiny_data)  # the pool keeps no masks: images are all the recomputation needs
    names = [c.name for c in load_classes(tiny_data)]
    model = load_inference_model(load_checkpoint(run / "last.pt"))[0]
    plain = evaluate(model, EvalSet(tiny_data, read_split(tiny_data, "val"), len(names)), names, torch.device("cpu"))
    assert row["as trained"] == pytest.approx(plain["scales"]["1.0"]["miou"], abs=0.01)
    assert row["labelled"] != row["as trained"]  # one iteration leaves statistics far from the images'
    (line,) = summarise([row, {**row, "seed": "seed1", "labelled": row["labelled"] + 2}])
    assert line["runs"] == 2 and line["labelled change"][0] == pytest.approx(row["labelled"] - row["as trained"] + 1)
    assert all(f"recomputed on {s}" in markdown([line]) for s in SOURCES)

    # "All training images" are the labelled and the unlabelled ones, batch after batch (6 + 12 images, batches of 4).
    import bench.bn_statistics as bs
    counted = {}
    real = bs.recompute_bn_statistics
    monkeypatch.setattr(bs, "recompute_bn_statistics", lambda model, batches: counted.setdefault(len(counted), real(model, batches)))
    score_run(run, 4, tiny_data)
    assert list(counted.values()) == [2, 5]
    monkeypatch.setattr(sys, "argv", ["bn_statistics.py", str(run), "--batch", "1", "--results", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs two images or more"):
        bs.main()


def test_scripts_that_score_runs_refuse_a_run_still_training(checkpoints, tmp_path):
    import shutil

    import torch

    from bench.common import require_finished_runs
    finished = checkpoints["supervised"].parent
    require_finished_runs([finished])
    training = tmp_path / "still-training"
    shutil.copytree(finished, training)
    ckpt = torch.load(training / "last.pt", map_location="cpu", weights_only=False)
    torch.save({**ckpt, "iteration": 0}, training / "last.pt")  # last.pt as an epoch's end writes it
    with pytest.raises(SystemExit, match="a run still training"):
        require_finished_runs([finished, training])
