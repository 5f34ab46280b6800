"""Class lists with colours, as users write them, and colour masks turned into class-id masks.

A palette is read from a YAML or JSON file, or given inline (``--palette background=#000000,car=#ff0000``).
Files hold either a list (``[{"name": "car", "color": [255, 0, 0]}, ...]``, classes.json's own form, ids in
list order) or a mapping in class order (``car: "#ff0000"`` or ``car: [255, 0, 0]``). A class may leave its
colour out when the masks hold class ids; it then gets the VOC palette colour of its id.

Colours that no class (and no ignore colour) claims are collected over the whole dataset with their pixel
counts, so the user sees every one at once and can name it, instead of losing those pixels silently.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .folder import IGNORE, ClassInfo, DatasetError, _default_color, load_classes, write_classes

MAX_LISTED = 20  # unknown colours or values named in one error message


def parse_color(text, where: str) -> tuple[int, int, int]:
    """'#rrggbb', 'rrggbb' or [r, g, b] -> (r, g, b)."""
    if isinstance(text, (list, tuple)) and len(text) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in text):
        return tuple(text)
    if isinstance(text, str):
        hexa = text.strip().lstrip("#")
        if len(hexa) == 6:
            try:
                return tuple(int(hexa[i:i + 2], 16) for i in (0, 2, 4))
            except ValueError:
                pass
    raise DatasetError(f"{where}: colour {text!r} is not '#rrggbb' or [r, g, b] with integers 0..255.")


def hex_color(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


def parse_inline(text: str) -> list[tuple[str, tuple[int, int, int] | None]]:
    """'background=#000000,car=#ff0000' (or names only, 'background,car') -> [(name, colour or None)]."""
    entries = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, color = part.partition("=")
        entries.append((name.strip(), parse_color(color, f"--palette {part!r}") if color.strip() else None))
    return entries


def read_palette_file(path: str | Path) -> list[tuple[str, tuple[int, int, int] | None]]:
    """The (name, colour or None) entries of a YAML or JSON palette file, in class-id order."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such palette file. Pass a .yaml/.yml/.json file, or the classes inline "
                           "with --palette name=#rrggbb,name=#rrggbb.")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as err:  # YAML and JSON raise their own error types; both mean a syntax error
        raise DatasetError(f"{path}: cannot be parsed ({err}). Fix the syntax.") from None
    if isinstance(raw, dict):
        return [(str(name), None if color is None else parse_color(color, f"{path}: class {name!r}"))
                for name, color in raw.items()]
    if isinstance(raw, list) and all(isinstance(item, dict) and "name" in item for item in raw):
        if any("id" in item for item in raw):
            raw = sorted(raw, key=lambda item: item.get("id", 0))
        return [(str(item["name"]), parse_color(item["color"], f"{path}: class {item['name']!r}") if "color" in item else None)
                for item in raw]
    raise DatasetError(f"{path}: expected a mapping (name: '#rrggbb') or a list of {{name, color}} objects, in class-id order.")


def load_palette(spec: str | None) -> list[ClassInfo] | None:
    """``--palette``: a file path or inline entries -> classes with ids 0..K-1; None when not given."""
    if not spec:
        return None
    looks_like_file = Path(spec).suffix.lower() in (".yaml", ".yml", ".json") or Path(spec).is_file()
    entries = read_palette_file(spec) if looks_like_file else parse_inline(spec)
    return classes_from_entries(entries, spec)


def classes_from_entries(entries, where: str) -> list[ClassInfo]:
    names = [name for name, _ in entries]
    if not names or not all(n.strip() for n in names):
        raise DatasetError(f"{where}: every class needs a non-empty name.")
    if len(set(names)) != len(names):
        raise DatasetError(f"{where}: class names repeat: {sorted({n for n in names if names.count(n) > 1})}.")
    if len(names) > IGNORE:
        raise DatasetError(f"{where}: {len(names)} classes; at most {IGNORE} (id 255 means ignore).")
    classes = [ClassInfo(i, name, color or tuple(_default_color(i))) for i, (name, color) in enumerate(entries)]
    given = [c for (_, given), c in zip(entries, classes) if given is not None]
    seen: dict[tuple, str] = {}
    for c in given:
        if c.color in seen:
            raise DatasetError(f"{where}: classes {seen[c.color]!r} and {c.name!r} share the colour {hex_color(c.color)}; "
                               "a colour mask could not tell them apart.")
        seen[c.color] = c.name
    return classes


def add_class(root: str | Path, name: str, color: tuple[int, int, int] | None = None) -> ClassInfo:
    """Append a class to DATA/classes.json (atomically) with the next id, and ``color`` or the first VOC palette
    colour from that id on that no class has. Existing masks keep their meaning: the ids before it do not move."""
    path = Path(root) / "classes.json"
    classes = load_classes(root)
    name = name.strip()
    if not name:
        raise DatasetError(f"{path}: a class needs a non-empty name.")
    same = next((c for c in classes if c.name.casefold() == name.casefold()), None)
    if same is not None:
        raise DatasetError(f"{path}: already has the class {same.name!r} (id {same.id}); choose another name.")
    new_id = len(classes)
    if new_id >= IGNORE:
        raise DatasetError(f"{path}: already has {new_id} classes (ids 0..{IGNORE - 1}); id {IGNORE} means 'ignore', "
                           "so no class can be added.")
    owners = {c.color: c.name for c in classes}
    if color is not None and color in owners:
        raise DatasetError(f"{path}: the class {owners[color]!r} already has the colour {hex_color(color)}; a colour mask "
                           "could not tell them apart. Choose another --color.")
    if color is None:
        color = next(rgb for rgb in (tuple(_default_color(i % 256)) for i in range(new_id, new_id + 256)) if rgb not in owners)
    added = ClassInfo(new_id, name, color)
    write_classes(root, [*classes, added])
    return added


class ColorMapper:
    """RGB masks -> class ids by exact colour, tallying colours that no class or ignore colour claims."""

    def __init__(self, classes: list[ClassInfo], ignore_colors: list[tuple[int, int, int]] = ()):
        self.lut = {_key(c.color): c.id for c in classes}
        for color in ignore_colors:
            self.lut.setdefault(_key(color), IGNORE)
        self.unknown_pixels: dict[int, int] = defaultdict(int)
        self.unknown_files: dict[int, list[str]] = defaultdict(list)

    def convert(self, rgb: np.ndarray, where: str) -> np.ndarray:
        """uint8 [H, W] class ids of an RGB uint8 [H, W, 3] mask; unknown colours become IGNORE and are tallied."""
        keys = _key_array(rgb)
        colors, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        ids = np.array([self.lut.get(int(k), -1) for k in colors], np.int16)
        for k, n in zip(colors[ids < 0], counts[ids < 0]):
            self.unknown_pixels[int(k)] += int(n)
            self.unknown_files[int(k)].append(where)
        return np.where(ids < 0, IGNORE, ids).astype(np.uint8)[inverse.reshape(keys.shape)]

    def check(self) -> None:
        """Raise DatasetError listing every unknown colour with its pixel count and where it occurs."""
        if not self.unknown_pixels:
            return
        ranked = sorted(self.unknown_pixels, key=self.unknown_pixels.get, reverse=True)
        lines = [f"  {hex_color(_rgb(k))}: {self.unknown_pixels[k]:,} pixels in {len(self.unknown_files[k])} mask(s), "
                 f"e.g. {self.unknown_files[k][0]}" for k in ranked[:MAX_LISTED]]
        more = f"\n  ... and {len(ranked) - MAX_LISTED} more" if len(ranked) > MAX_LISTED else ""
        raise DatasetError(
            f"the masks use {len(ranked)} colour(s) that are not in the palette:\n" + "\n".join(lines) + more +
            "\nName each one in the palette (name=#rrggbb) or mark it ignored with --ignore-color #rrggbb; "
            "nothing was written.")


def _key(rgb) -> int:
    return (int(rgb[0]) << 16) | (int(rgb[1]) << 8) | int(rgb[2])


def _key_array(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _rgb(key: int) -> tuple[int, int, int]:
    return (key >> 16) & 255, (key >> 8) & 255, key & 255


class ValueChecker:
    """Class-id masks: maps the user's ignore value to 255 and tallies values beyond the class list."""

    def __init__(self, num_classes: int, ignore_value: int = IGNORE):
        self.num_classes, self.ignore_value = num_classes, ignore_value
        self.largest = -1  # the largest class id seen: the class count of masks imported without a palette
        self.unknown_pixels: dict[int, int] = defaultdict(int)
        self.unknown_files: dict[int, list[str]] = defaultdict(list)

    def convert(self, ids: np.ndarray, where: str) -> np.ndarray:
        counts = np.bincount(ids.ravel(), minlength=self.num_classes)
        for value in np.flatnonzero(counts).tolist():
            if value < self.num_classes and value != self.ignore_value:
                self.largest = max(self.largest, value)
            if value >= self.num_classes and value not in (self.ignore_value, IGNORE):
                self.unknown_pixels[value] += int(counts[value])
                self.unknown_files[value].append(where)
        return np.where((ids == self.ignore_value) | (ids >= self.num_classes), IGNORE, ids).astype(np.uint8)

    def check(self) -> None:
        if not self.unknown_pixels:
            return
        ranked = sorted(self.unknown_pixels)
        lines = [f"  value {v}: {self.unknown_pixels[v]:,} pixels in {len(self.unknown_files[v])} mask(s), "
                 f"e.g. {self.unknown_files[v][0]}" for v in ranked[:MAX_LISTED]]
        raise DatasetError(
            f"the masks hold {len(ranked)} class id(s) beyond the {self.num_classes} classes (0..{self.num_classes - 1}):\n"
            + "\n".join(lines) + "\nList every class in the palette (--palette), or pass --ignore-value for the "
            "value that means 'not labelled'; nothing was written.")
