"""The shared loop: exact resume after a kill, torchrun/DDP on gloo, checkpoints, evaluation and CLI errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import checkpoint as checkpoint_module
from training.checkpoint import CheckpointError, load_checkpoint, training_finished
from training.cli import main
from training.config import ConfigError, RunConfig
from training.data.folder import class_pixel_counts, read_split
from training.engine import Trainer, autocast_dtype, check_bf16_input_size, cpu_has_bf16, poly_lr
from training.evaluate import confusion_matrix, metrics_from_confusion
from training.losses import balanced_class_weights
from training.run_settings import SNAPSHOTS, drop_metrics_after, start_out_dir

from .conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training.cli", "train", str(data), "--method", "scalematch", "--backbone", "resnet18", "--pretrained", "none",
            "--crop-size", "32", "--batch-size", "2", "--max-iters", "8", "--save-every", "1", "--eval-every", "4",
            "--num-workers", "1", "--lr", "0.01", "--warmup-epochs", "1", "--conf-thresh", "0.5", "--device", "cpu",
            "--out", str(out), *extra]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def assert_killed_run_resumes_exactly(cmd, tmp_path: Path, kill_at: int, total: int, timeout: float = 120) -> dict:
    """Train straight; train again, SIGKILL it once it has saved iteration ``kill_at`` and ``--resume`` it;
    both must end with bit-identical method states (every network and head). ``cmd(out, *extra)`` gives
    the command line. Returns the straight run's last checkpoint."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(cmd(straight), check=True, env=env(), capture_output=True)

    proc = subprocess.Popen(cmd(killed), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline:
        last = killed / "last.pt"
        if last.is_file() and load_checkpoint(last)["iteration"] >= kill_at:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = load_checkpoint(killed / "last.pt")["iteration"]
    assert kill_at <= stopped_at < total, "the run should have been killed part-way"
    assert not training_finished(killed / "last.pt") and training_finished(straight / "last.pt")
    subprocess.run(cmd(killed, "--resume"), check=True, env=env(), capture_output=True)

    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(killed / "last.pt")
    assert a["iteration"] == b["iteration"] == total and training_finished(killed / "last.pt")
    logged = [[(r["iter"], "val" in r) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
              for run in (straight, killed)]
    assert logged[0] == logged[1]  # each iteration logged once, wherever the kill fell between a log and a save
    for key, value in a["method_state"].items():
        assert torch.equal(value, b["method_state"][key]), key
    assert not list(killed.glob(".*.tmp"))  # no half-written checkpoint left behind
    return a


def test_killed_and_resumed_run_ends_with_identical_weights(tiny_data, tmp_path):
    assert_killed_run_resumes_exactly(lambda out, *extra: train_cmd(tiny_data, out, *extra), tmp_path, 3, 8)


def test_resume_drops_the_records_logged_after_its_checkpoint(tmp_path):
    records = [{"iter": 1, "loss": 0.5}, {"iter": 2, "loss": 0.4}, {"iter": 2, "val_miou": 10.0}, {"iter": 3, "loss": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"iter": 4, "lo')
    drop_metrics_after(tmp_path, 2)  # the last line is what a kill in the middle of a write leaves
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == records[:3]
    drop_metrics_after(tmp_path / "missing", 2)  # a run that logged nothing yet


@pytest.mark.parametrize("resume", [True, False])
def test_start_removes_the_temp_files_of_writes_a_kill_cut_short(tmp_path, resume):
    (tmp_path / SNAPSHOTS).mkdir()
    (tmp_path / "last.pt").write_bytes(b"kept")
    partial = [tmp_path / ".last.pt.k2x9.tmp", tmp_path / ".best.pt.a1.tmp", tmp_path / SNAPSHOTS / ".iter_4.pt.q.tmp"]
    for path in [*partial, tmp_path / ".notes.tmp"]:
        path.write_bytes(b"half")
    start_out_dir(tmp_path, RunConfig(resume=resume), 2)
    assert not [path for path in partial if path.exists()]
    assert (tmp_path / ".notes.tmp").exists()  # not a temp file of the run's own writes
    assert (tmp_path / "last.pt").exists() == resume  # a new run replaces the old results; a resumed one keeps them


def test_autocast_dtype_per_device():
    assert autocast_dtype("cuda", amp=True, amp_cpu=False, cpu_bf16=False) == torch.float16
    assert autocast_dtype("cuda", amp=False, amp_cpu=True, cpu_bf16=True) is None
    assert autocast_dtype("cpu", amp=True, amp_cpu=True, cpu_bf16=True) == torch.bfloat16
    assert autocast_dtype("cpu", amp=False, amp_cpu=True, cpu_bf16=True) == torch.bfloat16
    assert autocast_dtype("cpu", amp=True, amp_cpu=False, cpu_bf16=True) is None  # --amp alone keeps CPUs in float32
    with pytest.raises(ConfigError, match="--amp-cpu: this CPU has no native bfloat16"):
        autocast_dtype("cpu", amp=True, amp_cpu=True, cpu_bf16=False)


def test_amp_cpu_refuses_images_too_small_for_bfloat16_gradients(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, method="scalematch")  # crop 32, smallest image scale 0.25: 8 px
    with pytest.raises(ConfigError, match="smallest training image would be 8 px"):
        check_bf16_input_size(cfg)
    cfg.method_cfg.img_scales = (0.5, 2.0)
    check_bf16_input_size(cfg)
    check_bf16_input_size(tiny_config(tiny_data, tmp_path))


def test_balanced_class_weights_come_from_the_labelled_masks_and_reach_the_loss(tiny_data, tmp_path):
    ids = read_split(tiny_data, "labeled")
    counts = np.zeros(5, np.int64)
    for i in ids:
        mask = np.array(Image.open(tiny_data / "masks" / f"{i}.png"))
        counts += np.bincount(mask[mask != 255].ravel(), minlength=5)
    assert class_pixel_counts(tiny_data, ids, 5).tolist() == counts.tolist()

    cfg = tiny_config(tiny_data, tmp_path / "run")
    cfg.optim.class_weights = "balanced"
    trainer = Trainer(cfg, progress=False)
    assert torch.equal(trainer.class_weights, balanced_class_weights(counts))
    logits, target = torch.randn(2, 5, 4, 4), torch.randint(0, 5, (2, 4, 4))
    expected = torch.nn.functional.cross_entropy(logits, target, weight=trainer.class_weights)
    assert trainer.method.sup_loss(logits, target) == pytest.approx(float(expected))
    assert Trainer(tiny_config(tiny_data, tmp_path / "plain"), progress=False).class_weights is None

    cfg.optim.class_weights = "inverse"
    with pytest.raises(ConfigError, match="--class-weights must be none or balanced, got 'inverse'"):
        Trainer(cfg, progress=False)


needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX)")


@needs_bf16
def test_amp_cpu_trains_in_bfloat16_and_validates_in_float32(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run")
    cfg.optim.amp_cpu, cfg.run.max_iters = True, 2
    trainer = Trainer(cfg, progress=False)
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    seen = []
    trainer.method.model.classifier.register_forward_hook(
        lambda module, args, out: seen.append((module.training, out.dtype)))
    trainer.fit()
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    assert {dtype for training, dtype in seen if not training} == {torch.float32}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


@needs_bf16
def test_amp_cpu_killed_and_resumed_run_ends_with_identical_weights(tiny_data, tmp_path):
    assert_killed_run_resumes_exactly(lambda out, *extra: train_cmd(tiny_data, out, "--amp-cpu", "--img-scales", "0.5,1.5,2.0", *extra),
                                     tmp_path, 3, 8)


@pytest.mark.parametrize("method", ["supervised", "fixmatch", "unimatch", "meanteacher", "cps", "scalematch"])
def test_torchrun_two_processes_gloo(tiny_data, tmp_path, method):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.cli", "train", str(tiny_data), "--method", method, "--backbone", "resnet18", "--pretrained", "none",
           "--crop-size", "32", "--batch-size", "2", "--max-iters", "3", "--eval-every", "3", "--num-workers", "0",
           "--device", "cpu", "--out", str(out)]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["iteration"] == 3 and len(ckpt["rng"]) == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_miou" in r for r in records)
    # 12 unlabelled images / (2 per process x 2 processes) = 3 iterations per epoch
    assert [r["epoch"] for r in records if "loss" in r] == [0, 0, 0]


def test_resume_refuses_other_classes(data_copy, tmp_path):
    cfg = tiny_config(data_copy, tmp_path / "run")
    cfg.run.max_iters = 1
    Trainer(cfg, progress=False).fit()
    classes = json.loads((data_copy / "classes.json").read_text())
    classes[1]["name"] = "renamed"
    (data_copy / "classes.json").write_text(json.dumps(classes))
    cfg.run.resume = True
    with pytest.raises(CheckpointError, match="trained on classes"):
        Trainer(cfg, progress=False)


def test_checkpoint_write_failure_keeps_previous_file(tiny_data, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_data, tmp_path / "run")
    cfg.run.max_iters = 1
    Trainer(cfg, progress=False).fit()
    last = tmp_path / "run" / "last.pt"
    before = last.read_bytes()

    def disk_full(obj, fh):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        checkpoint_module.save_checkpoint(last, {"inference": {}})
    assert last.read_bytes() == before
    assert not list(last.parent.glob(".*.tmp"))


def test_poly_lr_and_head_multiplier(tiny_data, tmp_path):
    trainer = Trainer(tiny_config(tiny_data, tmp_path / "run"), progress=False)
    lrs = sorted({g["base_lr"] for g in trainer.optimizer.param_groups})
    assert lrs == [pytest.approx(0.01), pytest.approx(0.1)]
    assert poly_lr(trainer.optimizer, 0, 10, 0.9) == pytest.approx(0.01)
    assert poly_lr(trainer.optimizer, 5, 10, 0.9) == pytest.approx(0.01 * 0.5 ** 0.9)


def test_miou_from_confusion():
    pred = torch.tensor([0, 0, 1, 1, 2, 255 - 254])
    target = torch.tensor([0, 1, 1, 1, 255, 2])
    cm = confusion_matrix(pred, target, 3)
    m = metrics_from_confusion(cm, ["a", "b", "c"])
    assert m["iou"]["a"] == pytest.approx(50.0)       # I=1, U=2
    assert m["iou"]["b"] == pytest.approx(2 / 4 * 100)  # I=2, U=4 (3 gt + 1 pred from c)
    assert m["iou"]["c"] == pytest.approx(0.0)
    assert m["miou"] == pytest.approx((50 + 50 + 0) / 3)


def test_eval_cli_scales_sliding_and_json(tiny_data, tmp_path, capsys):
    cfg = tiny_config(tiny_data, tmp_path / "run", method="scalematch")
    cfg.run.max_iters = 2
    Trainer(cfg, progress=False).fit()
    ckpt = tmp_path / "run" / "best.pt"
    report = tmp_path / "eval.json"
    assert main(["eval", str(ckpt), str(tiny_data), "--json", str(report), "--device", "cpu"]) == 0
    result = json.loads(report.read_text())
    assert list(result["scales"]) == ["0.5", "1.0", "2.0"] and result["images"] == 4
    assert "IoU @x0.5" in capsys.readouterr().out
    assert main(["eval", str(ckpt), str(tiny_data), "--mode", "sliding", "--window", "24", "--scales", "1",
                 "--device", "cpu"]) == 0
    assert main(["eval", str(ckpt), str(tiny_data), "--cif-scales", "0.5,2", "--scales", "1", "--device", "cpu"]) == 0


def test_eval_refuses_other_class_set_and_non_checkpoints(tiny_data, data_copy, tmp_path, capsys):
    cfg = tiny_config(tiny_data, tmp_path / "run")
    cfg.run.max_iters = 1
    Trainer(cfg, progress=False).fit()
    classes = json.loads((data_copy / "classes.json").read_text())[:3]
    (data_copy / "classes.json").write_text(json.dumps(classes))
    assert main(["eval", str(tmp_path / "run" / "last.pt"), str(data_copy)]) == 2
    assert "trained on 5 classes" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    assert main(["eval", str(junk), str(tiny_data)]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "run" / "last.pt"), str(tiny_data), "--cif-scales", "0.5"]) == 2
    assert "has no CIF module" in capsys.readouterr().err


def test_train_cli_reports_corrupt_image_by_name(data_copy, tmp_path, capsys):
    (data_copy / "images" / "synth_00003.png").write_bytes(b"\x89PNG broken")
    code = main(["train", str(data_copy), "--backbone", "resnet18", "--pretrained", "none", "--crop-size", "32", "--batch-size", "2",
                 "--max-iters", "2", "--num-workers", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "synth_00003.png: cannot be read as an image" in err and "Traceback" not in err


def test_train_cli_empty_labeled_split(data_copy, tmp_path, capsys):
    (data_copy / "splits" / "labeled.txt").write_text("")
    assert main(["train", str(data_copy), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert "labeled.txt: empty" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_cli_help_lists_the_methods_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--method", "scalematch", "--help"])
    out = capsys.readouterr().out
    assert "--warmup-epochs" in out and "--isvc-weight" in out and "(default: 0.25,0.5,1.5,2.0)" in out


def test_train_cli_refuses_batch_of_one(tiny_data, tmp_path, capsys):
    assert main(["train", str(tiny_data), "--batch-size", "1", "--device", "cpu", "--out", str(tmp_path / "r")]) == 2
    assert "needs at least 2 images per process" in capsys.readouterr().err


DDP_PROBE = """
import sys
import torch
from training.cli import parse_train_args
from training.distributed import shutdown
from training.engine import Trainer
trainer = Trainer(parse_train_args(sys.argv[2:]), progress=False)
trainer.fit()
torch.save({"rng": torch.get_rng_state(), "state": trainer.method.state_dict()}, f"{sys.argv[1]}/rank{trainer.dist.rank}.pt")
shutdown()
"""


def test_torchrun_ranks_draw_independently_and_share_batchnorm_statistics(tiny_data, tmp_path):
    """Each process draws its own image scale, feature scale and dropout masks (its own random stream
    after the identical initialisation), and the BatchNorm statistics that are validated, saved and
    continued from are one set across processes, so the logged val mIoU is the saved model's."""
    probe, out = tmp_path / "probe.py", tmp_path / "run"
    probe.write_text(DDP_PROBE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(probe), str(tmp_path),
           str(tiny_data), "--method", "scalematch", "--backbone", "resnet18", "--pretrained", "none", "--crop-size", "32", "--batch-size", "2",
           "--max-iters", "3", "--eval-every", "3", "--num-workers", "0", "--device", "cpu", "--out", str(out)]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert not torch.equal(r0["rng"], r1["rng"])
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key

    from training.checkpoint import load_inference_model
    from training.data.datasets import EvalSet
    from training.data.folder import read_split
    from training.evaluate import evaluate
    model, classes, _ = load_inference_model(load_checkpoint(out / "last.pt"))
    names = [c["name"] for c in classes]
    saved = evaluate(model, EvalSet(tiny_data, read_split(tiny_data, "val"), len(names)), names, torch.device("cpu"))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_miou"] for r in logged if "val_miou" in r][-1] == pytest.approx(saved["scales"]["1.0"]["miou"], abs=1e-6)


def test_eval_cif_with_sliding_windows(tiny_data, checkpoints, tmp_path):
    """--cif-scales with --mode sliding predicts every window by CIF multi-scale inference; it used to
    ignore the mode and predict the whole image."""
    from training.checkpoint import load_inference_model
    from training.evaluate import predict, sliding_window_logits
    model, _, _ = load_inference_model(load_checkpoint(checkpoints["scalematch"]))
    model.eval()
    image = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        windows = sliding_window_logits(lambda x: model.forward_multiscale(x, (0.5, 2.0)), image, 24, model.num_classes)
        whole = model.forward_multiscale(image, (0.5, 2.0))
    got = predict(model, image, "sliding", 24, (0.5, 2.0))
    assert torch.equal(got, windows.argmax(1)) and not torch.equal(windows.softmax(1), whole.softmax(1))
    report = tmp_path / "eval.json"
    assert main(["eval", str(checkpoints["scalematch"]), str(tiny_data), "--mode", "sliding", "--window", "24",
                 "--cif-scales", "0.5,2", "--scales", "1", "--device", "cpu", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["mode"] == "sliding+cif:0.5,2.0"


def test_cps_fine_tuning_keeps_two_different_networks(tiny_data, checkpoints, tmp_path):
    """--init-from gives both CPS networks the checkpoint's encoder but only network 1 its decoder, so
    the two stay different (equal networks reduce CPS to self-training)."""
    cfg = tiny_config(tiny_data, tmp_path / "run", method="cps")
    cfg.model.init_from = str(checkpoints["supervised"])
    trainer = Trainer(cfg, progress=False)
    source = load_checkpoint(checkpoints["supervised"])["inference"]["state_dict"]
    net1, net2 = trainer.method.model.state_dict(), trainer.method.model2.state_dict()
    assert all(torch.equal(net1[k], source[k]) for k in net1)
    assert all(torch.equal(net2[k], source[k]) for k in net2 if k.startswith("encoder."))
    assert not torch.equal(net2["classifier.weight"], source["classifier.weight"])
    trainer.fit()
    net1, net2 = trainer.method.model.state_dict(), trainer.method.model2.state_dict()
    assert not all(torch.equal(net1[k], net2[k]) for k in net1)


def test_cps_defaults_follow_the_official_cutmix_recipe(tiny_data):
    """With CutMix (the default) the official weight is 1.0 on VOC, and every group trains at one LR."""
    from training.cli import parse_train_args
    cps = parse_train_args([str(tiny_data), "--method", "cps"])
    assert cps.method_cfg.cps_weight == 1.0 and cps.optim.head_lr_mult == 1.0
    assert parse_train_args([str(tiny_data), "--method", "cps", "--head-lr-mult", "10"]).optim.head_lr_mult == 10.0
    assert parse_train_args([str(tiny_data), "--method", "unimatch"]).optim.head_lr_mult == 10.0


def test_tensorboard_logs_losses_lr_and_val_miou_per_scale(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = tiny_config(tiny_data, tmp_path / "run", method="fixmatch")
    cfg.run.tensorboard, cfg.run.val_scales = True, (0.5, 1.0, 2.0)
    Trainer(cfg, progress=False).fit()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/mask_ratio", "val/miou_x0.5", "val/miou_x1.0", "val/miou_x2.0"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in logged if "val_miou" in r]
    assert [e.value for e in events.Scalars("val/miou_x2.0")] == pytest.approx([r["val_miou_by_scale"]["2.0"] for r in val])
    cfg.run.force = True  # a replaced run's events do not mix with the new run's
    Trainer(cfg, progress=False).fit()
    assert len(list((tmp_path / "run" / "tensorboard").iterdir())) == 1
