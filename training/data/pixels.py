"""What decoding a dataset's files found, cached by file fingerprint so that only new or changed files
are decoded again: image sizes and the distinct values of each mask. Facts are cached, not verdicts, so
a changed classes.json is judged again without decoding anything."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .folder import atomic_write, load_image, mask_values, read_mask

CACHE_NAME = ".scaleseg-check.json"
CACHE_FORMAT = 1


def _fingerprint(path: Path) -> list[int]:
    st = os.stat(path)  # follows symlinks: an imported dataset's links are judged by their targets
    return [st.st_size, st.st_mtime_ns]


def image_facts(path: Path) -> dict:
    return {"size": list(load_image(path).size)}


def mask_facts(path: Path) -> dict:
    mask = read_mask(path)
    return {"size": [mask.shape[1], mask.shape[0]], "values": mask_values(mask)}


class FactCache:
    """``DATA/.scaleseg-check.json``: {relative path: [size, mtime_ns, facts]} for files that decoded."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / CACHE_NAME
        self.old = self._read()
        self.new: dict[str, list] = {}

    def _read(self) -> dict:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # absent or unreadable: everything is decoded again, nothing is lost
        return raw.get("files", {}) if isinstance(raw, dict) and raw.get("format") == CACHE_FORMAT else {}

    def facts(self, path: Path, read) -> dict:
        """``read(path)``'s result, from the cache while the file's size and mtime are unchanged.
        Raises what ``read`` raises (DatasetError); failures are not cached."""
        key = path.relative_to(self.root).as_posix()
        stamp = _fingerprint(path)
        entry = self.old.get(key)
        if entry is not None and entry[:2] == stamp:
            facts = entry[2]
        else:
            facts = read(path)
        self.new[key] = [*stamp, facts]
        return facts

    def save(self) -> None:
        """Keep the files seen in this check (removed ones drop out). A read-only dataset folder only
        loses the speed-up."""
        if self.new == self.old:
            return
        text = json.dumps({"format": CACHE_FORMAT, "files": self.new}, separators=(",", ":"))
        try:
            atomic_write(self.path, lambda fh: fh.write(text.encode()))
        except OSError:
            pass
