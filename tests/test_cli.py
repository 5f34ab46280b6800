"""The command line explains itself: --version, help text and defaults for every flag, --x/--no-x switches,
and `scaleseg train --config` reading a run's written config.yaml (or an older run's config.json) back."""
from __future__ import annotations

import argparse
import json

import pytest
import yaml

from training import __version__
from training.checkpoint import load_checkpoint
from training.cli import _train_parser, build_parser, main, parse_train_args
from training.config import ConfigError, resolved_config
from training.methods import METHODS, get_method


def every_parser() -> list[argparse.ArgumentParser]:
    """Every parser behind `scaleseg`, sub-commands included."""
    import app.cli
    import app.demo
    import app.main
    import export.cli
    import serving.cli
    import training.pretrain
    parsers = [training.pretrain.parser(), export.cli.export_parser(), export.cli.verify_parser(), serving.cli.parser(),
               app.main.parser(), app.demo.parser(), app.cli.parser(), build_parser()]
    parsers += [_train_parser(get_method(name)) for name in METHODS]
    found, todo = [], parsers
    while todo:
        parser = todo.pop()
        found.append(parser)
        for action in parser._actions:  # argparse keeps sub-commands only here
            if isinstance(action, argparse._SubParsersAction):
                todo += [p for p in action.choices.values() if p.add_help]
    return found


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"scaleseg {__version__}"


def test_every_flag_of_every_command_has_help_and_shows_its_default():
    parsers = every_parser()
    assert len(parsers) > 25
    for parser in parsers:
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"{name}: no help text"
            if action.option_strings and action.default not in (None, argparse.SUPPRESS, False, ""):
                assert f"default: {action.default}" in text, f"{name}: default {action.default!r} not shown"
            if action.default is argparse.SUPPRESS and parser.prog == "scaleseg train":
                assert "default: " in action.help, f"{name}: default not shown"


def test_boolean_settings_are_switches(tiny_data):
    cfg = parse_train_args([str(tiny_data), "--no-amp", "--amp-cpu", "--method", "cps", "--no-cutmix"])
    assert (cfg.optim.amp, cfg.optim.amp_cpu, cfg.method_cfg.cutmix) == (False, True, False)
    assert parse_train_args([str(tiny_data)]).optim.amp is True
    with pytest.raises(SystemExit):
        parse_train_args([str(tiny_data), "--amp", "false"])  # the old --x VALUE form is gone


def test_config_file_round_trip_flags_win_and_old_config_json(tiny_data, tmp_path):
    out = tmp_path / "run"
    argv = ["train", str(tiny_data), "--method", "fixmatch", "--backbone", "resnet18", "--pretrained", "none", "--crop-size", "32",
            "--batch-size", "2", "--max-iters", "1", "--eval-every", "1", "--num-workers", "0", "--lr", "0.02",
            "--device", "cpu", "--no-amp", "--conf-thresh", "0.8", "--val-scales", "0.5,1", "--out", str(out), "--force"]
    assert main(argv) == 0
    written = out / "config.yaml"
    expected = resolved_config(parse_train_args(argv[1:]))
    assert yaml.safe_load(written.read_text()) == json.loads(json.dumps(expected))
    assert expected["run"]["force"] is False  # a rerun from the file does not replay --force

    rerun = parse_train_args(["--config", str(written)])
    assert resolved_config(rerun) == expected
    assert rerun.method == "fixmatch" and rerun.method_cfg.conf_thresh == 0.8 and rerun.run.val_scales == (0.5, 1.0)
    changed = parse_train_args(["--config", str(written), "--lr", "0.05", "--amp", "--out", str(tmp_path / "b")])
    assert (changed.optim.lr, changed.optim.amp, changed.run.out) == (0.05, True, str(tmp_path / "b"))
    assert changed.data.root == str(tiny_data)  # the dataset comes from the file too

    old = tmp_path / "config.json"  # what runs wrote before config.yaml
    old.write_text(json.dumps(parse_train_args(argv[1:]).to_dict(), indent=2))
    assert resolved_config(parse_train_args(["--config", str(old)])) == expected


def test_decoder_by_flag_or_config_file_and_fine_tuning_needs_the_same_head(tiny_data, tmp_path, capsys):
    assert parse_train_args([str(tiny_data)]).model.decoder == "standard"  # the papers' head stays the default
    assert parse_train_args([str(tiny_data), "--decoder", "light"]).model.decoder == "light"
    path = tmp_path / "run.yaml"
    path.write_text("model: {decoder: light}\n")
    assert parse_train_args([str(tiny_data), "--config", str(path)]).model.decoder == "light"
    argv = ["train", str(tiny_data), "--backbone", "resnet18", "--pretrained", "none", "--crop-size", "32", "--batch-size",
            "2", "--max-iters", "1", "--eval-every", "1", "--num-workers", "0", "--device", "cpu"]
    assert main([*argv, "--decoder", "light", "--out", str(tmp_path / "light")]) == 0
    assert load_checkpoint(tmp_path / "light" / "last.pt")["config"]["model"]["decoder"] == "light"
    capsys.readouterr()
    assert main([*argv, "--init-from", str(tmp_path / "light" / "last.pt"), "--out", str(tmp_path / "std")]) != 0
    assert "--decoder standard" in capsys.readouterr().err
    assert main([*argv, "--decoder", "mobile", "--out", str(tmp_path / "bad")]) != 0
    assert "--decoder mobile: choose standard or light" in capsys.readouterr().err


def test_hand_written_config_file_flat_or_by_section(tiny_data, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"method: scalematch\ndata: {{root: {tiny_data}}}\ncrop-size: 64\nlr: 1e-3\namp: false\n"
                    "optim: {head_lr_mult: 1}\nfeat_scales_up: [0.75]\n")
    cfg = parse_train_args(["--config", str(path)])
    assert (cfg.method, cfg.data.crop_size, cfg.optim.lr, cfg.optim.amp, cfg.optim.head_lr_mult) == \
        ("scalematch", 64, 0.001, False, 1.0)
    assert cfg.method_cfg.feat_scales_up == (0.75,)


@pytest.mark.parametrize("text, message", [
    ("crop_sise: 64\n", "unknown setting(s) crop_sise"),
    ("crop_size: 1.5\n", "crop_size: 1.5 is not an int"),
    ("amp: 3\n", "amp: 3 is not true or false"),
    ("method: nosuch\n", "'nosuch' is not a method"),
    ("- lr\n", "expected settings as `name: value` lines"),
    ("lr: [\n", "not valid YAML"),
])
def test_bad_config_file_is_one_clear_line(tiny_data, tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", str(tiny_data), "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and message in err and "Traceback" not in err, err


def test_missing_config_file(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        parse_train_args([str(tiny_data), "--config", str(tmp_path / "none.yaml")])


def test_shipped_small_data_recipe_by_name(tiny_data):
    cfg = parse_train_args([str(tiny_data), "--config", "small-data", "--lr", "0.005"])
    assert (cfg.model.backbone, cfg.model.pretrained, cfg.data.crop_size, cfg.data.batch_size) == \
        ("efficientnet_lite0", "imagenet", 96, 4)
    assert cfg.optim.lr == 0.005  # the command line wins over the recipe
    recipe = parse_train_args([str(tiny_data), "--config", "small-data"]).optim
    assert (recipe.optimizer, recipe.lr, recipe.head_lr_mult) == ("adamw", 0.0004, 10.0)


def test_app_help_and_refusals_exit_without_importing_torch():
    """--help and the app's own refusals end in SystemExit, which must not reach the import of the training errors."""
    import subprocess
    import sys
    code = ("import sys\nfrom training.cli import main\n"
            "for argv in (['app', '--help'], ['app', 'm', 'd', '--crop-size', '8']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
