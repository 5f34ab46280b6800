"""The walkthrough "Your own data, start to finish" of docs/data.md runs as written.

Its ``bash walkthrough`` and ``python walkthrough`` blocks run in page order in one temporary folder, as the
commands of one shell session, shrunk as tests/test_docs.py shrinks its pages (that test runs only ``runnable``
and ``long`` blocks, so these run once, here). Label Studio is the session's real server: its URL replaces the
page's, and the token goes to the page's ``read`` prompt as a reader would type it. Where the page asks the reader
to label in Label Studio, the test annotates every new task through Label Studio's API, as a labeller would.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from app.labeling import load_state, prediction_result
from app.labelstudio import LabelStudio
from tests.test_docs import FENCE as DOCS_FENCE, environment, free_port, run_block, shrink, stop_groups
from training.checkpoint import load_checkpoint
from training.data.folder import class_dicts, load_classes, mask_path, read_split

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "data.md"
FENCE = re.compile(r"^```(bash|python)[ \t]+walkthrough[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
PAGE_LABEL_STUDIO = "http://localhost:8080"  # the URL the page tells the reader to start Label Studio on


def blocks() -> list[tuple[str, str]]:
    """(language, code) of the walkthrough's blocks, in page order."""
    return [(m[1], m[2]) for m in FENCE.finditer(PAGE.read_text())]


def label_new_tasks(data: Path, client: LabelStudio) -> int:
    """Annotate every task of the dataset's project that has no annotation yet: road below the middle, sky above,
    a car, and once the dataset has a fourth class (the tree the page adds), a tree in a corner."""
    classes = class_dicts(load_classes(data))
    labelled = 0
    for task in client.tasks(load_state(data)["project_id"]):
        if task["annotations"]:
            continue
        (image,) = (data / "images").glob(task["data"]["scaleseg_id"] + ".*")
        width, height = Image.open(image).size
        mask = np.zeros((height, width), np.uint8)
        mask[height // 2:] = 1
        mask[height // 2:height // 2 + 16, :32] = 2
        if len(classes) > 3:
            mask[:16, -32:] = 3
        client.create_annotation(task["id"], prediction_result(mask, classes))
        labelled += 1
    return labelled


def test_walkthrough_tells_the_whole_story():
    """From a folder to predictions, a served model and the Label Studio loop, with a class added later; linked from
    the README, and in blocks that tests/test_docs.py leaves alone."""
    code = "\n".join(code for _, code in blocks())
    for step in ("scaleseg data import folder photos/", "scaleseg data add data/", "scaleseg train data/", "scaleseg export",
                 "scaleseg eval model-v1", "scaleseg predict", "Segmenter.load", "scaleseg serve", "/v1/segment",
                 "LABEL_STUDIO_API_KEY", "scaleseg label push", "scaleseg label pull", "--init-from",
                 "scaleseg data add-class", "--known-classes model-v2"):
        assert step in code, f"the walkthrough lost its step {step!r}"
    assert "docs/data.md#your-own-data-start-to-finish" in (REPO / "README.md").read_text()
    assert "\n## Your own data, start to finish\n" in PAGE.read_text()
    assert not {m[3] for m in DOCS_FENCE.finditer(PAGE.read_text())} & {code for _, code in blocks()}


def test_walkthrough_runs(label_studio, tmp_path):
    env = environment(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    ports = {"8000": str(free_port())}
    client = LabelStudio(label_studio.url, label_studio.token)
    labelled, groups = [], []  # each block's process group: the server a block starts is stopped at the end
    try:
        for number, (language, code) in enumerate(blocks(), 1):
            where = f"docs/data.md walkthrough block {number} ({language})"
            script = shrink(code, ports).replace(PAGE_LABEL_STUDIO, label_studio.url)
            argv = ["bash", "-euo", "pipefail", "-c", script] if language == "bash" else [sys.executable, "-c", script]
            run_block(argv, work, env, groups, where, script, stdin=f"{label_studio.token}\n")  # what `read` is typed
            if "export LABEL_STUDIO_URL" in script:  # the reader's shell keeps them for the blocks that follow
                env.update(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.token)
            if "scaleseg label push" in script:
                labelled.append(label_new_tasks(work / "data", client))
    finally:
        stop_groups(groups)

    # what the reader ends with: both pushes labelled and pulled, the tree in the masks and in the last model
    data = work / "data"
    assert labelled == [4, 4]
    assert [c.name for c in load_classes(data)] == ["sky", "road", "car", "tree"]
    pulled = load_state(data)["pulled"]
    assert len(pulled) == 8 and set(pulled) <= set(read_split(data, "labeled"))
    assert sum((np.array(Image.open(mask_path(data, i))) == 3).any() for i in pulled) == 4
    assert [c["name"] for c in load_checkpoint(work / "runs" / "v3" / "best.pt")["classes"]][-1] == "tree"
    assert len((work / "predictions" / "predictions.csv").read_text().splitlines()) == 1 + 6
