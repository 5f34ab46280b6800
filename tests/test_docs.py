"""The code blocks of README.md and docs/*.md run as written, so the documentation cannot rot.

A fenced block whose info string is ``bash runnable`` or ``python runnable`` runs; ``bash long`` (make demo,
compose, TensorRT: minutes or hardware) is only parsed with ``bash -n``. The blocks of one page run in
order in one temporary folder, with ``scaleseg`` on PATH; before they run, the sizes in them are shrunk
(images, iterations, crops) and the serving ports replaced by free ones, so a page takes seconds. Write
runnable blocks with the flags below spelled out (``--max-iters 300``, ``crop_size: 96``) so they shrink.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(bash|python)[ \t]+(runnable|long)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
# (pattern, replacement): a flag or a config-file key and the small value the test uses instead
SHRINK = [
    (r"(--n-labeled|--n-unlabeled)\s+\d+", r"\1 4"),
    (r"--n-val\s+\d+", "--n-val 2"),
    (r"(scaleseg data synth \S+)", r"\1 --size 48"),
    (r"--max-iters\s+\d+|max_iters:\s*\d+", lambda m: "--max-iters 2" if m[0].startswith("-") else "max_iters: 2"),
    (r"--crop-size\s+\d+|crop_size:\s*\d+", lambda m: "--crop-size 32" if m[0].startswith("-") else "crop_size: 32"),
    (r"--batch-size\s+\d+|batch_size:\s*\d+", lambda m: "--batch-size 2" if m[0].startswith("-") else "batch_size: 2"),
]
BLOCK_TIMEOUT_S = 300


def blocks(page: Path) -> list[tuple[str, str, str]]:
    """(language, kind, code) of the page's marked blocks, in page order."""
    return [(m[1], m[2], m[3]) for m in FENCE.finditer(page.read_text())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shrink(code: str, ports: dict[str, str]) -> str:
    for pattern, replacement in SHRINK:
        code = re.sub(pattern, replacement, code)
    for port, free in ports.items():
        code = re.sub(rf"\b{port}\b", free, code)
    return code


def environment(tmp_path: Path) -> dict[str, str]:
    """`scaleseg` and `python` are this interpreter with this checkout, as after `pip install -e .`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "scaleseg"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m training.cli "$@"\n')
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(REPO), "NO_COLOR": "1"}


def test_pages_mark_their_commands():
    marked = {page.name: [kind for _, kind, _ in blocks(page)] for page in PAGES}
    assert "runnable" in marked["README.md"] and "long" in marked["README.md"]
    assert sum(kinds.count("runnable") for kinds in marked.values()) >= 5
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_page_blocks_run(page, tmp_path):
    env = environment(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    ports = {"8000": str(free_port()), "8001": str(free_port())}
    groups = []  # each block's process group: servers a block starts in the background are stopped at the end
    try:
        for number, (language, kind, code) in enumerate(blocks(page), 1):
            where = f"{page.relative_to(REPO)} block {number} ({language} {kind})"
            if kind == "long":
                assert language == "bash", f"{where}: only bash blocks can be marked long"
                done = subprocess.run(["bash", "-n"], input=code, text=True, capture_output=True)
                assert done.returncode == 0, f"{where}: not valid bash: {done.stderr}"
                continue
            script = shrink(code, ports)
            argv = ["bash", "-euo", "pipefail", "-c", script] if language == "bash" else [sys.executable, "-c", script]
            run_block(argv, work, env, groups, where, script)
    finally:
        stop_groups(groups)


def run_block(argv: list[str], work: Path, env: dict, groups: list[int], where: str, script: str,
              stdin: str | None = None) -> None:
    """Run one block in its own process group (kept in ``groups``, so servers it leaves behind can be stopped);
    fail the test with its output if it fails or outlives BLOCK_TIMEOUT_S."""
    proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.PIPE if stdin is not None else None,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    groups.append(proc.pid)
    try:
        out, _ = proc.communicate(stdin, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{where}: still running after {BLOCK_TIMEOUT_S} s\n{script}\n--- output ---\n{out[-3000:]}")
    assert proc.returncode == 0, f"{where}: exit {proc.returncode}\n{script}\n--- output ---\n{out[-3000:]}"


def stop_groups(groups: list[int]) -> None:
    for group in groups:
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            pass


def test_shrink_reaches_flags_and_config_keys():
    code = ("scaleseg data synth DATA --n-labeled 32 --n-unlabeled 128 --n-val 32\n"
            "scaleseg train DATA --crop-size 96 --batch-size 4 --max-iters 1500\n"
            "data: {root: data, crop_size: 96, batch_size: 4}\nrun: {max_iters: 300}\ncurl localhost:8000/v2 :8001\n")
    assert shrink(code, {"8000": "5", "8001": "6"}) == (
        "scaleseg data synth DATA --size 48 --n-labeled 4 --n-unlabeled 4 --n-val 2\n"
        "scaleseg train DATA --crop-size 32 --batch-size 2 --max-iters 2\n"
        "data: {root: data, crop_size: 32, batch_size: 2}\nrun: {max_iters: 2}\ncurl localhost:5/v2 :6\n")
