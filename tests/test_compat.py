"""Artefacts made before a change keep working: a checkpoint and a run folder from before `--pretrained
imagenet`, `--encoder-bn`, `--decoder` and config.yaml, and a model package whose meta.json is format 1."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import tritonclient.http as triton
import yaml

from serving.segmenter import Segmenter
from tests.test_serving import Server
from training.checkpoint import load_checkpoint, load_inference_model
from training.cli import main as scaleseg, parse_train_args
from training.config import CONFIG_FILE

# meta.json as `scaleseg export` wrote it for the tests' package (resnet18, 5 classes, --with-probs, CIF 0.5,2),
# frozen so that a later change to export or serving cannot drop what format 1 promised.
FORMAT1_META = Path(__file__).parent / "compat" / "meta-format1.json"


def as_before(config: dict) -> dict:
    """A saved config dict in the shape earlier versions wrote: `pretrained: ""` meant random init, and
    there were no encoder_bn, decoder or snapshot_every fields."""
    config = json.loads(json.dumps(config))
    config["model"]["pretrained"] = ""
    del config["model"]["encoder_bn"], config["model"]["decoder"]
    del config["run"]["snapshot_every"]
    return config


def old_run(checkpoint: Path, out: Path, **run) -> Path:
    """A run folder as earlier versions left it: last.pt with the old config and config.json (no config.yaml),
    config.json recording the invocation's --force / --resume as they were given."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    ckpt["config"] = as_before(ckpt["config"])
    ckpt["config"]["run"].update(out=str(out), **run)
    out.mkdir(parents=True)
    torch.save(ckpt, out / "last.pt")
    (out / "config.json").write_text(json.dumps(ckpt["config"], indent=2))
    return out


def test_old_checkpoint_evaluates_resumes_and_fine_tunes(checkpoints, tiny_data, tmp_path):
    run = old_run(checkpoints["supervised"], tmp_path / "old")
    model, classes, cfg = load_inference_model(load_checkpoint(run / "last.pt"), run / "last.pt")
    assert cfg.model.encoder_bn == "train" and cfg.model.decoder == "standard" and cfg.run.snapshot_every == 0  # what those runs did
    assert len(classes) == 5
    assert scaleseg(["eval", str(run / "last.pt"), str(tiny_data)]) == 0
    # --resume takes the old run's settings as its base; no ImageNet weights are fetched for it
    assert scaleseg(["train", "--out", str(run), "--resume", "--max-iters", "2", "--allow-changed", "max_iters"]) == 0
    assert load_checkpoint(run / "last.pt")["iteration"] == 2
    # the app's retraining fine-tunes from a package's checkpoint.pt without naming --pretrained
    tuned = tmp_path / "tuned"
    assert scaleseg(["train", str(tiny_data), "--init-from", str(run / "last.pt"), "--backbone", "resnet18", "--crop-size",
                     "32", "--batch-size", "2", "--num-workers", "0", "--max-iters", "1", "--device", "cpu",
                     "--out", str(tuned)]) == 0
    assert (tuned / "last.pt").is_file()


def test_old_run_config_json_reruns_without_replacing_the_run(checkpoints, tmp_path, capsys):
    """An earlier run's config.json recorded --force as given (the demo always passed it) and its own --out:
    rerunning it must not replace that run."""
    run = old_run(checkpoints["supervised"], tmp_path / "old", force=True)
    old = json.loads((run / "config.json").read_text())
    cfg = parse_train_args(["--config", str(run / "config.json")])
    assert cfg.run.out == str(run) and cfg.run.force is False and cfg.run.resume is False
    assert cfg.model.pretrained == "" and cfg.model.encoder_bn == "train"  # random init, as that run trained
    assert scaleseg(["train", "--config", str(run / "config.json")]) != 0
    assert "--force to replace it" in capsys.readouterr().err and (run / "last.pt").is_file()

    rerun = tmp_path / "rerun"
    assert scaleseg(["train", "--config", str(run / "config.json"), "--out", str(rerun), "--max-iters", "1"]) == 0
    written = yaml.safe_load((rerun / CONFIG_FILE).read_text())
    for section in ("data", "optim", "aux"):
        assert written[section] == old[section]
    assert {k: v for k, v in written["model"].items() if k not in ("encoder_bn", "decoder")} == old["model"]
    assert written["model"]["decoder"] == "standard"
    assert written["method"] == old["method"] and written["method_cfg"] == old["method_cfg"]


def test_format1_package_with_an_old_checkpoint_serves(package, tiny_data, tmp_path):
    pkg = tmp_path / "seg"
    shutil.copytree(package, pkg)
    meta = json.loads(FORMAT1_META.read_text())
    assert meta["format_version"] == 1
    (pkg / "meta.json").write_text(json.dumps(meta))
    ckpt = torch.load(pkg / "checkpoint.pt", map_location="cpu", weights_only=False)
    ckpt["config"] = as_before(ckpt["config"])
    torch.save(ckpt, pkg / "checkpoint.pt")

    image = tiny_data / "images" / "synth_00000.png"
    for cif in (False, True):
        labels, confidence = Segmenter.load(pkg, cif=cif, backend="onnxruntime").predict(image)
        assert labels.shape == (48, 48) and labels.max() < len(meta["classes"]) and confidence.shape == labels.shape
    with Server(pkg) as server:
        client = server.client()
        batch = np.zeros((1, 3, 40, 56), np.uint8)
        inp = triton.InferInput("image", list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch)
        for name in ("seg", "seg_cif"):
            assert client.infer(name, [inp]).as_numpy("labels").shape == (1, 40, 56)
    model, _, cfg = load_inference_model(load_checkpoint(pkg / "checkpoint.pt"), pkg / "checkpoint.pt")
    assert model.cif is not None and dataclasses.asdict(cfg)["model"]["encoder_bn"] == "train"
