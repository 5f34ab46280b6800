"""The subprocesses the app starts (training, export, evaluation, Label Studio's venv) import scaleseg's own
packages, even when started from a folder that has its own `app/` and `training/` packages."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.spawn import ROOT, python_command, python_env
from app.versions import RetrainRecipe, _run, export_command, train_command


@pytest.fixture
def shadowing_folder(tmp_path, monkeypatch):
    """The working directory is a user's project whose own `app` and `training` packages refuse to import."""
    for name in ("app", "training"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user project\\'s own {name} package')\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_plain_module_run_is_shadowed_there(shadowing_folder):
    """What the app used to start: the user's training package wins, so the tests below can fail."""
    done = subprocess.run([sys.executable, "-m", "training.cli", "--help"], capture_output=True, text=True, env=python_env())
    assert done.returncode != 0 and "the user project's own training package" in done.stderr


def test_app_subprocesses_import_scaleseg(shadowing_folder):
    log_path = shadowing_folder / "job.log"
    with open(log_path, "w") as log:
        train = train_command(RetrainRecipe(), shadowing_folder / "data", "supervised", 5, shadowing_folder / "run", None)
        _run("training", [*train, "--help"], log)
        _run("export", [*export_command(shadowing_folder / "c.pt", shadowing_folder / "m", shadowing_folder, "supervised",
                                        False), "--help"], log)
    text = log_path.read_text()
    assert "usage: scaleseg train" in text and "usage: scaleseg export" in text


def test_python_310_form_imports_scaleseg(shadowing_folder):
    """Python 3.10 has no -P; its form (which runs on any version) drops the working directory itself."""
    cmd = python_command("training.cli", "data", "check", "--help", version=(3, 10))
    assert "-P" not in cmd
    done = subprocess.run(cmd, capture_output=True, text=True, env=python_env())
    assert done.returncode == 0 and "usage: scaleseg data check" in done.stdout, done.stderr


def test_python_command_uses_safe_path_where_python_has_it():
    assert python_command("training.cli", "train", version=(3, 12)) == [sys.executable, "-P", "-m", "training.cli", "train"]


def test_child_finds_a_checkout_that_only_the_working_directory_provided(monkeypatch):
    """Run in place from a checkout (no install, no PYTHONPATH), the parent found scaleseg through the working
    directory, which -P drops: the child gets the checkout on PYTHONPATH instead."""
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setattr(sys, "path", [str(ROOT), "/usr/lib/python3"])
    monkeypatch.setattr(sys, "flags", type("Flags", (), {"safe_path": False})())
    assert python_env()["PYTHONPATH"] == os.pathsep.join([str(ROOT), "/elsewhere"])
    monkeypatch.setattr(sys, "path", ["", str(ROOT), "/usr/lib/python3"])  # found through PYTHONPATH or an install
    assert python_env()["PYTHONPATH"] == "/elsewhere"
