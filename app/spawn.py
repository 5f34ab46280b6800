"""Python subprocesses that import scaleseg's own packages, never a user's folder of the same name.

scaleseg's import names are app, training, export and serving. `python -m training.cli` puts the working
directory first on sys.path, so started from a project that has its own training/ or app/ package (common
in Gradio and FastAPI projects) the child would import that one. `-P` (Python 3.11+) leaves the working
directory out and keeps everything else: PYTHONPATH, which tests and benchmarks use to point at a checkout,
and the user's site-packages. `-I` would drop both, so a checkout named only by PYTHONPATH would not be
found. Python 3.10 has no `-P`: there the child removes sys.path[0] itself before it imports anything.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the folder holding this scaleseg's app/, training/, export/, serving/
# `python -c` puts '' (the working directory) at sys.path[0]; the module to run and its arguments follow.
RUN_MODULE = ("import runpy, sys; del sys.path[0]; sys.argv.pop(0); "
              "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")


def python_command(module: str, *args: str, version: tuple[int, ...] = tuple(sys.version_info)) -> list[str]:
    """`python -m module args...` with this interpreter, without the working directory on sys.path."""
    if version >= (3, 11):
        return [sys.executable, "-P", "-m", module, *args]
    return [sys.executable, "-c", RUN_MODULE, module, *args]


def python_env() -> dict[str, str]:
    """The environment of such a child: this one's, plus ROOT first on PYTHONPATH when only the working directory
    put it on sys.path here (a checkout run in place without installing), so the child imports the same code."""
    env = dict(os.environ)
    searched = sys.path if getattr(sys.flags, "safe_path", False) else sys.path[1:]
    if any(entry and Path(entry).resolve() == ROOT for entry in searched):
        return env
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env
